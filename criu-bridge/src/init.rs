//! PID-1 duties: a pivotable root, mounts, kernel modules, loopback, the shared directory.
use std::{
    ffi::CString,
    fs,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use tracing::{info, warn};

/// Settings read from the kernel command line (`kata_rs.*`).
#[derive(Debug, Clone)]
pub struct BootParams {
    pub shared_fs: String,
    pub shared_tag: String,
    pub msize_9p: u32,
    pub log: String,
    pub probe: bool,
    pub port: u32,
    /// A fault the host's test suite injects (`kata_rs.test_fault=`), see [`TestFault`].
    pub test_fault: Option<TestFault>,
}

/// `kata_rs.test_fault=agent-exit-in-checkpoint:<ms>` (or `-in-restore:`): the agent, PID 1, exits that
/// long after a checkpoint (restore) request arrives, so the guest kernel panics in the middle of it.
/// `kata_rs.test_fault=ignore-signals:0`: the agent answers every SignalProcess with OK and signals
/// nothing (a guest that will not let its processes die; WaitProcess then never answers).
/// `kata_rs.test_fault=absurd-stats:0`: every number in the agent's StatsContainer answers is u64::MAX
/// (a guest that lies about its containers' use).
/// `kata_rs.test_fault=stop-criu-in-restore:<ms>`: that long after a restore request arrives, the first
/// `criu` process that has its restore.log open is SIGSTOPped (a CRIU that never finishes: the restore
/// must end at its deadline).
/// `kata_rs.test_fault=vsock-flood:<ms>`: that long after the agent listens, a thread of normal priority
/// opens vsock streams to the host (CID 2) on every port in turn without end, 256 in flight, and prints
/// `KATA_RS_VSOCK_FLOOD attempts=<n>` on the console every second (a guest flooding the host's vsock).
/// The fault tests use it to crash a guest at a known moment. Only the host sets the kernel command
/// line (configuration.toml, `hypervisor.kernel_params`); nothing in the guest can turn it on.
#[derive(Debug, Clone, PartialEq)]
pub struct TestFault {
    pub during: FaultDuring,
    pub after_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultDuring {
    Checkpoint,
    Restore,
    /// Not an exit: signals are answered and ignored.
    IgnoreSignals,
    /// Not an exit: stats are answered with the largest numbers.
    AbsurdStats,
    /// Not an exit: the restore's CRIU is stopped.
    StopCriuInRestore,
    /// Not an exit: vsock connections to the host without end.
    VsockFlood,
}

impl TestFault {
    fn parse(v: &str) -> Option<TestFault> {
        let (what, ms) = v.split_once(':')?;
        let during = match what {
            "agent-exit-in-checkpoint" => FaultDuring::Checkpoint,
            "agent-exit-in-restore" => FaultDuring::Restore,
            "ignore-signals" => FaultDuring::IgnoreSignals,
            "absurd-stats" => FaultDuring::AbsurdStats,
            "stop-criu-in-restore" => FaultDuring::StopCriuInRestore,
            "vsock-flood" => FaultDuring::VsockFlood,
            _ => return None,
        };
        Some(TestFault { during, after_ms: ms.parse().ok()? })
    }

    /// If this fault is for `now`: exits the process `after_ms` from now (from another thread).
    pub fn arm(&self, now: FaultDuring) {
        let ms = self.after_ms;
        if self.during == FaultDuring::StopCriuInRestore && now == FaultDuring::Restore {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                for _ in 0..3000 {
                    let criu = std::fs::read_dir("/proc").into_iter().flatten().flatten().find_map(|e| {
                        let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
                        // A CRIU in the middle of the restore: its log is open.
                        let logging = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten().any(|f| std::fs::read_link(f.path()).is_ok_and(|l| l.ends_with("restore.log")));
                        (std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim() == "criu" && logging).then_some(pid)
                    });
                    if let Some(pid) = criu {
                        warn!(pid, "kata_rs.test_fault: the restore's CRIU is stopped");
                        // SAFETY: kill takes a pid and a signal.
                        unsafe { libc::kill(pid, libc::SIGSTOP) };
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            });
            return;
        }
        if self.during == FaultDuring::VsockFlood && now == FaultDuring::VsockFlood {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                vsock_flood();
            });
            return;
        }
        if self.during != now || matches!(now, FaultDuring::IgnoreSignals | FaultDuring::AbsurdStats | FaultDuring::StopCriuInRestore | FaultDuring::VsockFlood) {
            return;
        }
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            warn!(fault = ?now, "kata_rs.test_fault: the agent exits now");
            std::process::exit(70);
        });
    }
}

/// The `vsock-flood` test fault: non-blocking connects to the host on port after port, forever.
fn vsock_flood() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    // Back to the normal priority, as a container's process would run.
    // SAFETY: setpriority on the calling thread; no memory is passed.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) };
    let mut open = std::collections::VecDeque::new();
    let (mut attempts, mut port, mut last) = (0u64, 1u32, std::time::Instant::now());
    loop {
        if let Ok(fd) = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None) {
            let _ = connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(libc::VMADDR_CID_HOST, port));
            open.push_back(fd);
            attempts += 1;
        }
        if open.len() > 256 {
            open.pop_front();
        }
        port = if port >= 65535 { 1 } else { port + 1 };
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            console(&format!("KATA_RS_VSOCK_FLOOD attempts={attempts}"));
            last = std::time::Instant::now();
        }
    }
}

impl BootParams {
    pub fn parse(cmdline: &str) -> BootParams {
        let mut p = BootParams {
            shared_fs: "virtiofs".into(),
            shared_tag: "kataShared".into(),
            msize_9p: 512000,
            log: "info".into(),
            probe: false,
            port: agent_client::AGENT_PORT,
            test_fault: None,
        };
        for word in cmdline.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else { continue };
            match k {
                "kata_rs.shared_fs" => p.shared_fs = v.into(),
                "kata_rs.shared_tag" => p.shared_tag = v.into(),
                "kata_rs.msize_9p" => p.msize_9p = v.parse().unwrap_or(p.msize_9p),
                "kata_rs.log" => p.log = v.into(),
                "kata_rs.probe" => p.probe = v == "1",
                "kata_rs.port" => p.port = v.parse().unwrap_or(p.port),
                "kata_rs.test_fault" => p.test_fault = TestFault::parse(v),
                _ => {}
            }
        }
        p
    }
}

/// Where the shared directory is mounted in the guest.
pub const SHARED_MOUNT: &str = "/run/kata-rs/shared";

fn mnt(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<()> {
    fs::create_dir_all(target).ok();
    mount(Some(src), target, Some(fstype), flags, data).with_context(|| format!("mount {fstype} on {target}"))
}

/// First stage, still on the initramfs (run once: PID 1 is no longer re-executed, so no mark is kept): runc cannot pivot_root out of rootfs (the root mount of all,
/// which has no parent). A bind mount of it, moved over `/` and entered with chroot, is a mount with a
/// parent, which pivot_root accepts: the same tree, with nothing copied (copying the 34 MiB tree into
/// a tmpfs and `switch_root` there took about 0.9 s of the boot under TCG).
pub fn switch_root_if_needed() -> Result<()> {
    fs::create_dir_all("/newroot")?;
    mount(Some("/"), "/newroot", None::<&str>, MsFlags::MS_BIND, None::<&str>).context("bind mount of the initramfs on /newroot")?;
    std::env::set_current_dir("/newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).context("moving the bind mount over /")?;
    nix::unistd::chroot(".").context("chroot into the bind mount")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Mounts the pseudo filesystems PID 1 needs.
pub fn mount_basics() -> Result<()> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nodev, None)?;
    mnt("sysfs", "/sys", "sysfs", nodev, None)?;
    mnt("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mnt("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("newinstance,ptmxmode=0666,mode=0620"))?;
    mnt("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
    mnt("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
    mnt("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    // Give containers every controller the kernel offers.
    if let Ok(ctrls) = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let want: String = ctrls.split_whitespace().map(|c| format!("+{c} ")).collect();
        if let Err(e) = fs::write("/sys/fs/cgroup/cgroup.subtree_control", want.trim()) {
            warn!(error = %e, "enabling cgroup controllers");
        }
    }
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("/dev/pts/ptmx", "/dev/ptmx");
    Ok(())
}

/// Loads the kernel modules listed (in dependency order) in /etc/modules.order.
pub fn load_modules() -> Result<usize> {
    let order = fs::read_to_string("/etc/modules.order").unwrap_or_default();
    let mut n = 0;
    for m in order.lines().filter(|l| !l.trim().is_empty()) {
        let path = format!("/lib/modules/{m}");
        let f = fs::File::open(&path).with_context(|| format!("open {path}"))?;
        match nix::kmod::finit_module(&f, &CString::new("")?, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => n += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => warn!(module = m, error = %e, "finit_module failed"),
        }
    }
    Ok(n)
}

/// Brings up the loopback interface (CRIU's kerndat needs it) and sets the hostname.
pub fn setup_network() -> Result<()> {
    let st = Command::new("/bin/ip").args(["link", "set", "lo", "up"]).status().context("run ip")?;
    if !st.success() {
        bail!("ip link set lo up: {st}");
    }
    let _ = nix::unistd::sethostname("kata-rs");
    Ok(())
}

/// Mounts the host-shared directory (virtio-fs or 9p), retrying while the device settles.
pub fn mount_shared(p: &BootParams) -> Result<()> {
    fs::create_dir_all(SHARED_MOUNT)?;
    let mut last = None;
    for _ in 0..50 {
        let r = match p.shared_fs.as_str() {
            "virtiofs" => mount(Some(p.shared_tag.as_str()), SHARED_MOUNT, Some("virtiofs"), MsFlags::empty(), None::<&str>),
            "9p" => {
                let opts = format!("trans=virtio,version=9p2000.L,msize={},cache=mmap", p.msize_9p);
                mount(Some(p.shared_tag.as_str()), SHARED_MOUNT, Some("9p"), MsFlags::empty(), Some(opts.as_str()))
            }
            "none" => return Ok(()),
            other => bail!("unknown kata_rs.shared_fs={other}"),
        };
        match r {
            Ok(()) => {
                info!(fs = %p.shared_fs, tag = %p.shared_tag, "shared directory mounted at {SHARED_MOUNT}");
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("mounting {} tag {} on {SHARED_MOUNT}: {:?}", p.shared_fs, p.shared_tag, last)
}

/// Writes to the console directly (before logging is set up, and for the KVM probe marker).
pub fn console(msg: &str) {
    use std::io::Write;
    if let Ok(mut f) = fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(f, "{msg}");
    } else {
        eprintln!("{msg}");
    }
}

pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_params() {
        let p = BootParams::parse("console=ttyS0 kata_rs.shared_fs=9p kata_rs.msize_9p=262144 kata_rs.log=debug quiet");
        assert_eq!(p.shared_fs, "9p");
        assert_eq!(p.msize_9p, 262144);
        assert_eq!(p.log, "debug");
        assert!(!p.probe);
        assert_eq!(p.port, 1024);
        assert!(BootParams::parse("kata_rs.probe=1").probe);
        assert_eq!(p.test_fault, None);
        let f = BootParams::parse("kata_rs.test_fault=agent-exit-in-checkpoint:1500").test_fault.unwrap();
        assert_eq!((f.during, f.after_ms), (FaultDuring::Checkpoint, 1500));
        assert_eq!(BootParams::parse("kata_rs.test_fault=agent-exit-in-restore:0").test_fault.unwrap().during, FaultDuring::Restore);
        assert_eq!(BootParams::parse("kata_rs.test_fault=ignore-signals:0").test_fault.unwrap().during, FaultDuring::IgnoreSignals);
        assert_eq!(BootParams::parse("kata_rs.test_fault=vsock-flood:500").test_fault.unwrap().during, FaultDuring::VsockFlood);
        assert_eq!(BootParams::parse("kata_rs.test_fault=absurd-stats:0").test_fault.unwrap().during, FaultDuring::AbsurdStats);
        assert_eq!(BootParams::parse("kata_rs.test_fault=stop-criu-in-restore:0").test_fault.unwrap().during, FaultDuring::StopCriuInRestore);
        assert_eq!(BootParams::parse("kata_rs.test_fault=reboot:10").test_fault, None);
        assert_eq!(BootParams::parse("kata_rs.test_fault=agent-exit-in-restore:x").test_fault, None);
    }
}
