//! Watching one VM for its end: QMP events (SHUTDOWN, GUEST_PANICKED, RESET), QMP closing (QEMU
//! exited), and the exit of a helper daemon (virtiofsd, vhost-device-vsock), seen through pidfds.
//!
//! A VM whose virtiofsd or vsock daemon died cannot serve its containers any more (file requests hang,
//! the agent cannot be reached), yet its guest would go on running them: the watcher then kills QEMU, so
//! that a container reported exited really is gone.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::{console::ConsoleTail, qmp::VmEvent};

/// A process watched through a pidfd: readable once it exited.
struct Watched {
    name: &'static str,
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

/// `pidfd_open(2)`: a descriptor of `pid` that stays bound to that process (no pid reuse race: the
/// watched processes are children of this process and are not reaped before the watch ends).
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    if pid == 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: a plain syscall with integer arguments; on success it returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, libc::PIDFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_send_signal(2)`.
pub(crate) fn pidfd_kill(fd: &OwnedFd, sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a plain syscall on a descriptor we hold; a null siginfo is allowed.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Everything needed to notice a VM's end, taken from a running [`crate::Vm`].
pub struct VmWatch {
    pub(crate) events: tokio::sync::broadcast::Receiver<VmEvent>,
    pub(crate) qemu: Option<Arc<OwnedFd>>,
    pub(crate) daemons: Vec<(&'static str, u32)>,
    pub(crate) console: ConsoleTail,
}

/// Lines of the console that tell a kernel panic, with the reason on the same line.
fn panic_line(console: &str) -> Option<String> {
    console.lines().rev().find(|l| l.contains("Kernel panic - not syncing")).map(|l| {
        let l = l.trim();
        let start = l.find("Kernel panic").unwrap_or(0);
        l[start..].chars().take(300).collect()
    })
}

impl VmWatch {
    /// Waits for the VM's end and returns why it ended, in words for logs and errors. When a helper
    /// daemon died, QEMU is killed first (its guest could still be running the containers).
    pub async fn ended(mut self) -> String {
        let mut watched = Vec::new();
        for (name, pid) in &self.daemons {
            // SAFETY: the OwnedFd moves into the AsyncFd, which owns it (open, same descriptor) until dropped.
            let registered = pidfd_open(*pid).and_then(|fd| unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(std::io::Error::from));
            match registered {
                Ok(fd) => watched.push(Watched { name, pid: *pid, fd }),
                Err(e) => warn!(name, pid, error = %e, "cannot watch the helper daemon"),
            }
        }
        let daemon_exit = async {
            if watched.is_empty() {
                return std::future::pending::<(&'static str, u32)>().await;
            }
            let futs = watched.iter().map(|w| {
                Box::pin(async move {
                    let _ = w.fd.readable().await;
                    (w.name, w.pid)
                })
            });
            futures::future::select_all(futs).await.0
        };
        let console = self.console.clone();
        // The console's last lines, once QEMU closed it (up to 1 s): a panic message may still be on its
        // way through the console socket when the QMP event arrives.
        let last_words = || async {
            let start = tokio::time::Instant::now();
            while !console.closed() && start.elapsed() < std::time::Duration::from_secs(1) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic_line(&console.tail(16 * 1024))
        };
        let qmp_end = async {
            loop {
                match self.events.recv().await {
                    Ok(VmEvent::GuestPanicked) => return "the guest kernel panicked".to_string(),
                    Ok(VmEvent::Shutdown { guest, reason }) => {
                        // A guest kernel panic reboots (panic=-1) and QEMU, run with -no-reboot, shuts
                        // down with reason guest-reset: the console says which it was.
                        if let Some(line) = last_words().await {
                            return format!("the guest kernel panicked ({line})");
                        }
                        return format!("QEMU shut down ({}, reason {reason})", if guest { "by the guest" } else { "by the host" });
                    }
                    Ok(VmEvent::Other(name)) if name == "RESET" => {
                        if let Some(line) = panic_line(&console.tail(16 * 1024)) {
                            return format!("the guest kernel panicked ({line})");
                        }
                        return "the guest reset".to_string();
                    }
                    Ok(VmEvent::Closed) | Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        // QEMU's console closes with it; a panic printed just before still counts.
                        if let Some(line) = last_words().await {
                            return format!("QEMU exited after the guest kernel panicked ({line})");
                        }
                        return "QEMU exited".to_string();
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                }
            }
        };
        tokio::pin!(qmp_end);
        let (name, pid) = tokio::select! {
            reason = &mut qmp_end => return reason,
            exited = daemon_exit => exited,
        };
        // A daemon also exits when QEMU ends (a guest panic, a shutdown): then QEMU's end is the cause,
        // and its event or QMP's close follows within moments.
        if let Ok(reason) = tokio::time::timeout(std::time::Duration::from_millis(1500), &mut qmp_end).await {
            return reason;
        }
        let why = format!("{name} (pid {pid}) exited, so the VM cannot serve its containers");
        match &self.qemu {
            Some(q) => match pidfd_kill(q, libc::SIGKILL) {
                Ok(()) => format!("{why}; QEMU was killed"),
                Err(e) => format!("{why}; killing QEMU failed: {e}"),
            },
            None => why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_line_is_found_and_cut() {
        let c = "boot\n[   12.3] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\nmore";
        assert_eq!(panic_line(c).unwrap(), "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009");
        assert_eq!(panic_line("all fine\n"), None);
        let long = format!("Kernel panic - not syncing: {}", "x".repeat(1000));
        assert_eq!(panic_line(&long).unwrap().chars().count(), 300);
    }

    #[tokio::test]
    async fn a_pidfd_becomes_readable_when_the_child_exits_and_kill_works() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        let fd2 = Arc::new(pidfd_open(child.id()).unwrap());
        // SAFETY: the AsyncFd owns the descriptor.
        let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(std::io::Error::from).unwrap();
        let not_yet = tokio::time::timeout(std::time::Duration::from_millis(200), afd.readable()).await;
        assert!(not_yet.is_err(), "a running child's pidfd is not readable");
        pidfd_kill(&fd2, libc::SIGKILL).unwrap();
        let _ready = tokio::time::timeout(std::time::Duration::from_secs(5), afd.readable()).await.expect("readable after the kill").unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        assert!(pidfd_open(0).is_err());
    }
}
