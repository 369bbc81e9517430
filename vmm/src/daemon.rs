//! Helper processes of a VM (QEMU itself, virtiofsd, vhost-device-vsock): spawn, wait for their
//! socket, stop and reap. Every child gets PR_SET_PDEATHSIG=SIGKILL, so none outlives its owner
//! even when the owner is killed; `Drop` kills what was not stopped explicitly.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

use crate::hostid::HostId;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: &'static str,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited before creating {socket} ({status}); its log {log}: {tail}")]
    EarlyExit { name: &'static str, socket: String, status: String, log: String, tail: String },
    #[error("{name} did not create {socket} within {waited:?}; its log {log}: {tail}")]
    NoSocket { name: &'static str, socket: String, waited: Duration, log: String, tail: String },
}

/// The network namespace a child runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildNetns {
    /// The parent's.
    Inherit,
    /// A new, empty one (only loopback, down).
    New,
    /// The one this descriptor (of the parent, open across the fork) refers to.
    Join(std::os::fd::RawFd),
}

/// A running helper process, its log file, and the socket it serves.
pub struct Daemon {
    pub name: &'static str,
    child: Child,
    pub log: PathBuf,
    pub pid: u32,
}

/// Last `max` bytes of a file (only those are read), lossy UTF-8, trimmed.
pub fn tail_of(path: &Path, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))?;
        let mut b = Vec::with_capacity(max.min(1 << 20));
        f.take(max as u64).read_to_end(&mut b)?;
        Ok(b)
    };
    match read() {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(e) => format!("(cannot read: {e})"),
    }
}

/// Who a daemon runs as.
#[derive(Clone, Copy, Debug, Default)]
pub struct Identity {
    /// This uid and gid (no supplementary group) from its first instruction; else the caller's.
    pub user: Option<HostId>,
    /// Only these capabilities (a mask of `1 << CAP_*`) in its bounding set, none inheritable or
    /// ambient: a root program then holds exactly these after exec, whatever its file says.
    pub capabilities: Option<u64>,
}

/// Capability numbers (linux/capability.h).
pub mod cap {
    pub const CHOWN: u64 = 1 << 0;
    pub const DAC_OVERRIDE: u64 = 1 << 1;
    pub const DAC_READ_SEARCH: u64 = 1 << 2;
    pub const FOWNER: u64 = 1 << 3;
    pub const FSETID: u64 = 1 << 4;
    pub const NET_ADMIN: u64 = 1 << 12;
}

/// In a child before exec (async-signal-safe calls only): drops every capability not in `keep` from
/// the bounding set and clears the inheritable and ambient sets. The effective set is left as it is,
/// for the rest of pre_exec.
fn limit_capabilities(keep: u64) -> std::io::Result<()> {
    // SAFETY: prctl and capget/capset with pointers to locals.
    unsafe {
        for c in 0..64 {
            if keep & (1 << c) == 0 && libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) != 0 {
                let e = std::io::Error::last_os_error();
                // Past the kernel's last capability.
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(e);
            }
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut h = Header { version: 0x2008_0522, pid: 0 };
        let mut d = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
        if libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        d[0].inheritable = 0;
        d[1].inheritable = 0;
        if libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Daemon {
    /// Spawns `program args...` with stdout/stderr appended to `log`.
    pub fn spawn(name: &'static str, program: &Path, args: &[String], log: PathBuf) -> Result<Daemon, DaemonError> {
        Self::spawn_in(name, program, args, log, None, ChildNetns::Inherit, Identity::default())
    }

    /// Like [`Daemon::spawn`], as `user` (uid, gid, no supplementary group) from its first instruction.
    pub fn spawn_as(name: &'static str, program: &Path, args: &[String], log: PathBuf, user: HostId) -> Result<Daemon, DaemonError> {
        Self::spawn_in(name, program, args, log, None, ChildNetns::Inherit, Identity { user: Some(user), ..Default::default() })
    }

    /// Like [`Daemon::spawn`], with the child in the network namespace `netns`, inheriting descriptor
    /// `keep` (its close-on-exec flag is cleared in the child only), e.g. QEMU's `vhostfd`, and with
    /// the user and capabilities of `id`. Every child runs with no_new_privs: no exec can give it more
    /// than it has.
    pub fn spawn_in(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        keep: Option<std::os::fd::RawFd>,
        netns: ChildNetns,
        id: Identity,
    ) -> Result<Daemon, DaemonError> {
        let Identity { user, capabilities } = id;
        let spawn_err = |source| DaemonError::Spawn { name, program: program.display().to_string(), source };
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err).kill_on_drop(true);
        // SAFETY: setgroups, setgid, setuid, prctl, capset, fcntl, unshare and setns are
        // async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| if r != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
                // The namespace first: joining one needs root, which the user change below gives up.
                check(match netns {
                    ChildNetns::Inherit => 0,
                    ChildNetns::New => libc::unshare(libc::CLONE_NEWNET),
                    ChildNetns::Join(fd) => libc::setns(fd, libc::CLONE_NEWNET),
                })?;
                if let Some(u) = user {
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setgid(u.gid))?;
                    check(libc::setuid(u.uid))?;
                }
                if let Some(keep) = capabilities {
                    limit_capabilities(keep)?;
                }
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                // After the user change, which clears the parent-death signal.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
                if let Some(fd) = keep {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        let pid = child.id().unwrap_or(0);
        debug!(name, pid, program = %program.display(), ?args, "spawned");
        Ok(Daemon { name, child, log, pid })
    }

    /// Waits until `socket` exists, failing early if the process exits.
    pub async fn wait_for_socket(&mut self, socket: &Path, limit: Duration) -> Result<(), DaemonError> {
        let start = tokio::time::Instant::now();
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(DaemonError::EarlyExit {
                    name: self.name,
                    socket: socket.display().to_string(),
                    status: status.to_string(),
                    log: self.log.display().to_string(),
                    tail: tail_of(&self.log, 2000),
                });
            }
            if start.elapsed() > limit {
                return Err(DaemonError::NoSocket {
                    name: self.name,
                    socket: socket.display().to_string(),
                    waited: limit,
                    log: self.log.display().to_string(),
                    tail: tail_of(&self.log, 2000),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Has the process exited? Returns its status if so.
    pub fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit by itself for up to `grace`, then kills it; always reaps. The
    /// processes it forked (virtiofsd's sandboxed server is its child, ended by its parent-death
    /// signal) are gone too when this returns: each gets up to a second to exit, then SIGKILL.
    pub async fn stop(mut self, grace: Duration) -> std::process::ExitStatus {
        let forked = descendants(self.pid);
        let status = self.stop_self(grace).await;
        for (pid, fd) in forked {
            end_process(self.name, pid, fd).await;
        }
        status
    }

    async fn stop_self(&mut self, grace: Duration) -> std::process::ExitStatus {
        if let Ok(Ok(status)) = tokio::time::timeout(grace, self.child.wait()).await {
            return status;
        }
        if let Err(e) = self.child.start_kill() {
            warn!(name = self.name, pid = self.pid, error = %e, "kill failed");
        }
        match self.child.wait().await {
            Ok(s) => s,
            Err(e) => {
                warn!(name = self.name, pid = self.pid, error = %e, "wait failed");
                std::os::unix::process::ExitStatusExt::from_raw(9)
            }
        }
    }

    /// Sends SIGTERM (a clean stop request).
    pub fn terminate(&self) {
        if self.pid != 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// The live descendants of `pid` (the children of each of its threads, recursively), each held by a
/// pidfd. A child read from its parent's list can only be reaped by that parent, which is alive here.
fn descendants(pid: u32) -> Vec<(u32, std::os::fd::OwnedFd)> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    // Bounded: a daemon forks one or two processes; a runaway tree is not followed further.
    while let Some(p) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if found.len() >= 64 {
                    return found;
                }
                if let Ok(fd) = crate::watch::pidfd_open(c) {
                    found.push((c, fd));
                    queue.push(c);
                }
            }
        }
    }
    found
}

/// Waits up to a second for a process (held by `fd`) to exit, then kills it and waits up to another.
async fn end_process(name: &'static str, pid: u32, fd: std::os::fd::OwnedFd) {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: the pidfd is owned and registered once, as the watcher does.
    let Ok(fd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else { return };
    async fn exited(fd: &AsyncFd<std::os::fd::OwnedFd>) -> bool {
        tokio::time::timeout(Duration::from_secs(1), fd.readable()).await.is_ok()
    }
    if exited(&fd).await {
        return;
    }
    warn!(name, pid, "a process forked by the daemon outlived it by a second; killing it");
    let _ = crate::watch::pidfd_kill(fd.get_ref(), libc::SIGKILL);
    if !exited(&fd).await {
        warn!(name, pid, "a process forked by the daemon did not exit after SIGKILL");
    }
}

/// Does a command line (NUL-separated arguments) name a path inside directory `marker`? `/run/k/c1`
/// matches an argument holding `/run/k/c1/qmp.sock`, never `/run/k/c10/qmp.sock`.
fn names_dir(cmdline: &str, marker: &str) -> bool {
    let dir = format!("{}/", marker.trim_end_matches('/'));
    !marker.is_empty() && cmdline.split('\0').any(|arg| arg.contains(&dir) || arg.ends_with(marker.trim_end_matches('/')))
}

/// Kills processes recorded in a VM's state file whose command line still names a path inside the
/// directory `marker` (guards against pid reuse). Used by cleanup after the owner died.
pub fn kill_recorded(pids: &[u32], marker: &str) -> Vec<u32> {
    let mut killed = Vec::new();
    for &pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if names_dir(&cmdline, marker) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            killed.push(pid);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    /// A daemon whose forked child outlives it (as virtiofsd's sandboxed server briefly does): the
    /// stop returns only once that child is gone too.
    #[tokio::test]
    async fn a_stop_ends_what_the_daemon_forked() {
        let dir = std::env::temp_dir().join(format!("kata-rs-daemon-fork-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let d = super::Daemon::spawn("forker", std::path::Path::new("/bin/sh"), &["-c".into(), script], dir.join("log")).unwrap();
        let start = std::time::Instant::now();
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile).ok().and_then(|t| t.trim().parse::<u32>().ok()) {
                break p;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "the child never started");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let fd = crate::watch::pidfd_open(pid).unwrap();
        d.stop(std::time::Duration::ZERO).await;
        // Exited: its pidfd is readable (a zombie of whoever reaps it now, or reaped).
        let mut p = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&fd), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 1, "the daemon's child {pid} still runs after the stop");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_sandbox_directory_does_not_match_a_longer_one() {
        use super::names_dir;
        let qemu = "qemu-system-x86_64\0-qmp\0unix:/run/kata-rs/c10/qmp.sock,server=on\0";
        assert!(names_dir(qemu, "/run/kata-rs/c10"));
        assert!(!names_dir(qemu, "/run/kata-rs/c1"));
        assert!(names_dir("virtiofsd\0--socket-path=/run/kata-rs/c1/vfs.sock\0", "/run/kata-rs/c1"));
        assert!(!names_dir("anything", ""));
    }
}
