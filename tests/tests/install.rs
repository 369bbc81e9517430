//! `make install` and `make uninstall` on this machine: after install, a containerd started with a
//! standard PATH and no kata-rs environment variable finds the shim, the shim finds
//! /etc/kata-rs/configuration.toml and the guest image in /usr/share/kata-rs, and a container runs, is
//! checkpointed and restored. Uninstall removes what install put there.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kata_rs_tests::{containerd::*, processes_mentioning, read_counter, wait_counter};

const SHIM: &str = "/usr/local/bin/containerd-shim-kata-rs-v2";
const SHARE: &str = "/usr/share/kata-rs";
const ETC_CONFIG: &str = "/etc/kata-rs/configuration.toml";
const T: Duration = Duration::from_secs(180);
const COUNTER: &[&str] = &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.2; done"];

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// `make <target>` in this checkout without rebuilding (make test built everything already).
fn make(target: &str) {
    let o = Command::new("make").arg("-C").arg(top()).args(["-o", "build", "-o", "guest-image", target]).output().expect("running make");
    assert!(o.status.success(), "make {target} failed: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// Uninstalls even when the test fails half-way.
struct Installed;
impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("make").arg("-C").arg(top()).args(["-o", "build", "-o", "guest-image", "uninstall"]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_make_install_containerd_runs_and_checkpoints_with_no_environment() {
    assert!(
        !Path::new(SHIM).exists() && !Path::new(ETC_CONFIG).exists(),
        "kata-rs is already installed on this machine ({SHIM} or {ETC_CONFIG}); this test installs and uninstalls it, so it refuses to touch an existing installation"
    );
    make("install");
    let guard = Installed;
    for f in [SHIM.to_string(), format!("{SHARE}/vmlinux"), format!("{SHARE}/initramfs.cpio"), format!("{SHARE}/configuration.toml"), ETC_CONFIG.to_string()] {
        assert!(Path::new(&f).is_file(), "make install did not install {f}");
    }

    let c = Containerd::start_installed();
    let (a, b) = ("kata-rs-install-a", "kata-rs-install-b");
    c.run_detached(a, &[], COUNTER);
    let count = c.rootfs(a).join("count");
    wait_counter(&count, 3, T).await;
    // The installed shim, with the default runtime root and the installed guest image.
    let shims: Vec<u32> = processes_mentioning(&format!("-id {a} ")).into_iter().filter(|(_, cmd)| cmd.contains("containerd-shim-kata-rs-v2")).map(|(p, _)| p).collect();
    assert_eq!(shims.len(), 1, "one shim for {a}");
    assert_eq!(std::fs::read_link(format!("/proc/{}/exe", shims[0])).unwrap(), Path::new(SHIM), "containerd started the installed shim");
    let qemu: Vec<(u32, String)> = processes_mentioning(&format!("/run/kata-rs/{a}/")).into_iter().filter(|(_, cmd)| cmd.contains("qemu-system")).collect();
    assert_eq!(qemu.len(), 1, "one VM in the default runtime root: {qemu:?}");
    assert!(qemu[0].1.contains(&format!("{SHARE}/vmlinux")), "the VM boots the installed kernel: {}", qemu[0].1);

    let before = read_counter(&count);
    c.ctr_ok(&["--timeout", "600s", "containers", "checkpoint", "--task", "--image", a, "kata-rs-test/install:1"]);
    c.kill_and_remove(a);
    c.ctr_ok(&["--timeout", "600s", "containers", "restore", "--live", b, "kata-rs-test/install:1"]);
    let count_b = c.rootfs(b).join("count");
    let first = wait_counter(&count_b, 1, T).await;
    assert!(first >= before, "restored from memory, {b} goes on from the checkpoint: it is at {first}, {a} was at {before} before it");
    wait_counter(&count_b, first + 3, T).await;
    c.kill_and_remove(b);
    c.ctr_ok(&["images", "rm", "--sync", "kata-rs-test/install:1"]);
    c.assert_clean();
    drop(c);

    drop(guard);
    for f in [SHIM.to_string(), format!("{SHARE}/vmlinux"), ETC_CONFIG.to_string()] {
        assert!(!Path::new(&f).exists(), "make uninstall left {f}");
    }
    assert!(!Path::new(SHARE).exists(), "make uninstall left {SHARE}");
}
