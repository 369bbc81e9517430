//! Hypervisor settings: the `[hypervisor]` table of `configuration.toml`.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    /// KVM when `/dev/kvm` really runs the guest kernel, otherwise TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SharedFs {
    /// virtio-fs with one virtiofsd per VM.
    #[default]
    VirtioFs,
    /// virtio-9p served by QEMU itself.
    Virtio9p,
}

impl SharedFs {
    /// The name the guest agent understands (kernel parameter `kata_rs.shared_fs`).
    pub fn guest_name(self) -> &'static str {
        match self {
            SharedFs::VirtioFs => "virtiofs",
            SharedFs::Virtio9p => "9p",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VsockSetting {
    /// vhost-vsock when `/dev/vhost-vsock` exists, otherwise vhost-user-vsock + vhost-device-vsock.
    #[default]
    Auto,
    /// Kernel vhost-vsock (AF_VSOCK on the host).
    Vhost,
    /// vhost-user-vsock-pci served by a vhost-device-vsock daemon (hybrid vsock on the host).
    VhostUser,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// QEMU binary; a bare name is looked up on PATH.
    pub qemu_path: PathBuf,
    /// Guest kernel (vmlinux) and initramfs built by `make guest-image`.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    pub vcpus: u32,
    /// QEMU machine type.
    pub machine: String,
    /// `-cpu` model; empty = `host` under KVM, `max` under TCG.
    pub cpu_model: String,
    pub accel: AccelSetting,
    /// TCG only: "multi" (one host thread per vCPU, QEMU's default) or "single" (all vCPUs take turns
    /// on one host thread). Ignored under KVM.
    pub tcg_thread: String,
    /// Extra guest kernel parameters.
    pub kernel_params: String,
    pub shared_fs: SharedFs,
    pub virtiofsd_path: PathBuf,
    /// virtiofsd cache mode: auto, always or none.
    pub virtiofs_cache: String,
    /// 9p msize in bytes.
    pub msize_9p: u32,
    pub vsock: VsockSetting,
    pub vhost_device_vsock_path: PathBuf,
    /// How long QEMU may take to open its QMP socket, in seconds.
    pub qmp_timeout_s: u64,
    /// Time given to the guest to power off before QEMU is killed, in seconds.
    pub shutdown_timeout_s: u64,
    /// QEMU's seccomp sandbox (`-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
    /// resourcecontrol=deny`). Turning it off is unsafe: a guest that exploits QEMU then has every
    /// system call of a root process.
    pub seccomp_sandbox: bool,
    /// Who vhost-device-vsock runs as: "per-vm" (a uid and gid of its own for each VM, from
    /// `host_id_base .. host_id_base + host_id_count`: no capability, no host file, no other VM's
    /// processes) or "root" (UNSAFE: a guest that exploits it has a root process on the host).
    pub run_as: String,
    /// First id of the per-VM range; pick a range no host user, file or user namespace uses.
    pub host_id_base: u32,
    /// Size of the per-VM range: the most VMs one host runs at once.
    pub host_id_count: u32,
    /// virtiofsd's own sandbox: "namespace" (mount, pid and net namespaces, pivot_root into the shared
    /// directory) or "chroot" where namespaces are not available. There is no "none".
    pub virtiofsd_sandbox: String,
    /// Size of the console log file in KiB; one older file of the same size is kept, the rest dropped.
    pub console_log_max_kib: u64,
    /// Empty PCIe root ports on q35 for network interfaces hot-plugged after boot (one each); the
    /// most interfaces one VM can take. 0 = no network interfaces.
    pub network_ports: u32,
}

/// 0x6b72_0000 ("kr"): above the ranges that useradd and /etc/subuid hand out by default.
pub const DEFAULT_HOST_ID_BASE: u32 = 0x6b72_0000;

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            qemu_path: "qemu-system-x86_64".into(),
            kernel: "/usr/share/kata-rs/vmlinux".into(),
            initrd: "/usr/share/kata-rs/initramfs.cpio".into(),
            memory_mib: 2048,
            vcpus: 2,
            machine: "q35".into(),
            network_ports: 4,
            cpu_model: String::new(),
            accel: AccelSetting::Auto,
            tcg_thread: "multi".into(),
            kernel_params: String::new(),
            shared_fs: SharedFs::VirtioFs,
            virtiofsd_path: "/usr/lib/qemu/virtiofsd".into(),
            virtiofs_cache: "auto".into(),
            msize_9p: 512000,
            vsock: VsockSetting::Auto,
            vhost_device_vsock_path: "vhost-device-vsock".into(),
            qmp_timeout_s: 10,
            shutdown_timeout_s: 5,
            seccomp_sandbox: true,
            virtiofsd_sandbox: "namespace".into(),
            run_as: "per-vm".into(),
            host_id_base: DEFAULT_HOST_ID_BASE,
            host_id_count: 65536,
            console_log_max_kib: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("hypervisor.{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl VmConfig {
    /// Checks values that serde cannot (ranges, enumerations in strings). Files are checked at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.memory_mib < 256 {
            return bad("memory_mib", format!("{} MiB is too small: the guest needs at least 256", self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > 255 {
            return bad("vcpus", format!("{} is out of range 1..=255", self.vcpus));
        }
        if !matches!(self.virtiofs_cache.as_str(), "auto" | "always" | "none") {
            return bad("virtiofs_cache", format!("{:?} is not one of auto, always, none", self.virtiofs_cache));
        }
        if !matches!(self.tcg_thread.as_str(), "multi" | "single") {
            return bad("tcg_thread", format!("{:?} is not one of multi, single", self.tcg_thread));
        }
        if self.msize_9p < 4096 {
            return bad("msize_9p", format!("{} is below 4096", self.msize_9p));
        }
        if self.machine.is_empty() || self.machine.contains(',') {
            return bad("machine", format!("{:?} is not a QEMU machine type name", self.machine));
        }
        if self.kernel_params.contains('\n') {
            return bad("kernel_params", "must be one line".into());
        }
        if !matches!(self.virtiofsd_sandbox.as_str(), "namespace" | "chroot") {
            return bad("virtiofsd_sandbox", format!("{:?} is not one of namespace, chroot (virtiofsd always runs sandboxed)", self.virtiofsd_sandbox));
        }
        if !matches!(self.run_as.as_str(), "per-vm" | "root") {
            return bad("run_as", format!("{:?} is not one of per-vm, root", self.run_as));
        }
        if self.host_id_base < 65536 || self.host_id_count == 0 || self.host_id_base as u64 + self.host_id_count as u64 > u32::MAX as u64 {
            return bad(
                "host_id_base",
                format!("{}..+{} must start at 65536 or above, hold at least one id and end below 2^32-1 (host_id_count)", self.host_id_base, self.host_id_count),
            );
        }
        if self.network_ports > 16 {
            return bad("network_ports", format!("{} is above 16", self.network_ports));
        }
        if self.network_ports > 0 && !self.machine.starts_with("q35") && !self.machine.starts_with("pc-q35") {
            return bad("network_ports", format!("network interfaces are hot-plugged into PCIe root ports, which machine {:?} has not: use q35 or set 0", self.machine));
        }
        if !(16..=1 << 20).contains(&self.console_log_max_kib) {
            return bad("console_log_max_kib", format!("{} is out of range 16..=1048576", self.console_log_max_kib));
        }
        Ok(())
    }
}

/// Resolves a bare program name on PATH; paths with a slash are returned as they are.
pub fn resolve_program(p: &std::path::Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.exists().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|d| d.join(p)).find(|c| c.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        VmConfig::default().validate().unwrap();
    }

    #[test]
    fn rejects_unknown_tcg_thread() {
        let c = VmConfig { tcg_thread: "many".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("tcg_thread"));
        VmConfig { tcg_thread: "single".into(), ..Default::default() }.validate().unwrap();
    }

    #[test]
    fn rejects_small_memory_and_bad_cache() {
        let c = VmConfig { memory_mib: 64, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("memory_mib"));
        let c = VmConfig { virtiofs_cache: "sometimes".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("virtiofs_cache"));
        let c = VmConfig { vcpus: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("vcpus"));
        let c = VmConfig { virtiofsd_sandbox: "none".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("virtiofsd_sandbox"));
        let c = VmConfig { run_as: "nobody".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("run_as"));
        let c = VmConfig { host_id_base: 1000, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("host_id_base"));
        let c = VmConfig { host_id_base: u32::MAX - 10, host_id_count: 11, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("host_id_count"));
        VmConfig { run_as: "root".into(), ..Default::default() }.validate().unwrap();
    }

    #[test]
    fn resolve_program_finds_sh_on_path() {
        assert!(resolve_program(std::path::Path::new("sh")).is_some());
        assert!(resolve_program(std::path::Path::new("/nonexistent/qemu")).is_none());
    }
}
