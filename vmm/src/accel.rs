//! Accelerator choice: KVM when `/dev/kvm` really runs the guest kernel, TCG otherwise.
//!
//! Opening `/dev/kvm` is not enough: on some hosts (nested setups) KVM accepts a VM but QEMU
//! aborts setting MSRs, or the guest kernel hangs before printing anything. So, after the ioctl
//! checks, a short boot of the real guest kernel and initramfs decides; the result is cached per
//! (QEMU, kernel, initramfs) in the runtime directory, which does not survive a host reboot.
use std::{
    fmt,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use crate::config::{AccelSetting, VmConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator chosen and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Marker the guest agent prints on the console when booted with `kata_rs.probe=1`.
pub const PROBE_MARKER: &str = "KATA_RS_PROBE_OK";

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;

/// Cheap checks of `/dev/kvm`: it opens, speaks API 12 and creates a VM.
pub fn kvm_ioctls_ok() -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: plain ioctls on a file we own; no pointers are passed.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v != 12 {
        return Err(format!("/dev/kvm: KVM_GET_API_VERSION returned {v}, expected 12"));
    }
    let vm = unsafe { libc::ioctl(f.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return Err(format!("/dev/kvm: KVM_CREATE_VM failed: {}", std::io::Error::last_os_error()));
    }
    unsafe { libc::close(vm) };
    Ok(())
}

#[derive(Serialize, Deserialize, PartialEq)]
struct ProbeKey {
    qemu: String,
    kernel: String,
    kernel_mtime: u64,
    initrd: String,
    initrd_mtime: u64,
    cpu: String,
}

#[derive(Serialize, Deserialize)]
struct ProbeCache {
    key: ProbeKey,
    choice: AccelChoice,
}

fn mtime(p: &Path) -> u64 {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Chooses the accelerator for `config`. `cache_dir` holds the probe verdict.
/// What TCG chosen by `accel = "auto"` means for isolation (QEMU's security policy covers only
/// virtualization with a hardware accelerator).
pub const TCG_WARNING: &str = "TCG is not a security boundary in QEMU's own policy (only KVM guests are); use KVM where the guest is untrusted";

/// [`choose_quiet`], with a warning logged when `auto` fell back to TCG.
pub async fn choose(config: &VmConfig, qemu: &Path, cache_dir: &Path) -> AccelChoice {
    let c = choose_quiet(config, qemu, cache_dir).await;
    if c.accel == Accel::Tcg && config.accel == AccelSetting::Auto {
        tracing::warn!(reason = %c.reason, "{TCG_WARNING}");
    }
    c
}

async fn choose_quiet(config: &VmConfig, qemu: &Path, cache_dir: &Path) -> AccelChoice {
    match config.accel {
        AccelSetting::Kvm => return AccelChoice { accel: Accel::Kvm, reason: "forced by hypervisor.accel = \"kvm\"".into() },
        AccelSetting::Tcg => return AccelChoice { accel: Accel::Tcg, reason: "forced by hypervisor.accel = \"tcg\"".into() },
        AccelSetting::Auto => {}
    }
    if let Err(e) = kvm_ioctls_ok() {
        return AccelChoice { accel: Accel::Tcg, reason: format!("KVM unusable ({e}); using TCG") };
    }
    let cpu = if config.cpu_model.is_empty() { "host".to_string() } else { config.cpu_model.clone() };
    let key = ProbeKey {
        qemu: qemu.display().to_string(),
        kernel: config.kernel.display().to_string(),
        kernel_mtime: mtime(&config.kernel),
        initrd: config.initrd.display().to_string(),
        initrd_mtime: mtime(&config.initrd),
        cpu: cpu.clone(),
    };
    let cache_file = cache_dir.join("kvm-probe.json");
    if let Ok(text) = std::fs::read_to_string(&cache_file) {
        if let Ok(c) = serde_json::from_str::<ProbeCache>(&text) {
            if c.key == key {
                return c.choice;
            }
        }
    }
    let choice = match probe_boot(qemu, config, &cpu, Duration::from_secs(8)).await {
        Ok(t) => AccelChoice { accel: Accel::Kvm, reason: format!("KVM booted the guest kernel in {:.1} s", t.as_secs_f64()) },
        Err(e) => AccelChoice { accel: Accel::Tcg, reason: format!("KVM present but cannot run the guest ({e}); using TCG") },
    };
    info!(accel = %choice.accel, reason = %choice.reason, "accelerator chosen");
    let _ = std::fs::create_dir_all(cache_dir);
    let tmp = cache_file.with_extension("tmp");
    if let Ok(text) = serde_json::to_string(&ProbeCache { key, choice: choice.clone() }) {
        if std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &cache_file)).is_err() {
            warn!(path = %cache_file.display(), "cannot cache the KVM probe result");
        }
    }
    choice
}

/// Boots the guest kernel under KVM with `kata_rs.probe=1` and waits for the agent's marker.
async fn probe_boot(qemu: &Path, config: &VmConfig, cpu: &str, limit: Duration) -> Result<Duration, String> {
    let start = std::time::Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args(["-no-user-config", "-nodefaults", "-nographic", "-no-reboot", "-accel", "kvm", "-cpu", cpu])
        .args(["-m", "256M", "-smp", "1", "-nic", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&config.kernel)
        .arg("-initrd")
        .arg(&config.initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 kata_rs.probe=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let mut seen = Vec::new();
    let mut errbuf = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = out.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(PROBE_MARKER.len()).any(|w| w == PROBE_MARKER.as_bytes()) {
                return true;
            }
            if seen.len() > 1 << 20 {
                seen.drain(..seen.len() - 4096);
            }
        }
    };
    let ok = tokio::time::timeout(limit, read).await;
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(2), err.read_to_end(&mut errbuf)).await;
    let _ = child.wait().await;
    match ok {
        Ok(true) => Ok(start.elapsed()),
        Ok(false) => {
            let msg = String::from_utf8_lossy(&errbuf);
            let line = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or("QEMU exited without output");
            Err(line.trim().to_string())
        }
        Err(_) => Err(format!("no guest output within {} s", limit.as_secs())),
    }
}

/// Where the probe verdict is cached by default.
/// The probe cache beside the sandbox directories: a name no container id can take (containerd ids
/// start with a letter or digit), so a container named `cache` cannot collide with it.
pub fn default_cache_dir(runtime_root: &Path) -> PathBuf {
    runtime_root.join(".accel-cache")
}
