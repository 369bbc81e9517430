//! The QEMU command line, derived from settings and resolved choices only.
use std::path::PathBuf;

use crate::{accel::Accel, config::VmConfig, SharedFs};

/// The virtio-fs / 9p tag the guest mounts.
pub const SHARED_TAG: &str = "kataShared";

/// The id of the `index`th empty PCIe root port for network interfaces.
pub fn network_port(index: u32) -> String {
    format!("netport{index}")
}

/// How the agent channel device is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice {
    /// `vhost-vsock-pci` with a host-unique guest CID.
    /// Kernel vhost-vsock; `vhostfd`: a descriptor of /dev/vhost-vsock with the CID already claimed.
    Vhost { guest_cid: u32, vhostfd: Option<i32> },
    /// `vhost-user-vsock-pci` connected to a vhost-device-vsock socket.
    VhostUser { socket: PathBuf },
}

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct QemuArgs<'a> {
    pub config: &'a VmConfig,
    pub accel: Accel,
    pub name: &'a str,
    pub qmp_socket: PathBuf,
    /// QEMU serves the serial console on this socket; the host reads it (bounded, see `console`).
    pub console_socket: PathBuf,
    pub vsock: VsockDevice,
    /// virtiofsd socket (virtio-fs) or the shared directory itself (9p).
    pub virtiofsd_socket: Option<PathBuf>,
    pub shared_dir: PathBuf,
    /// Extra kernel parameters decided at start (after the configured ones).
    pub extra_kernel_params: Vec<String>,
}

impl QemuArgs<'_> {
    pub fn cpu_model(&self) -> &str {
        if !self.config.cpu_model.is_empty() {
            return &self.config.cpu_model;
        }
        match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }

    /// vhost-user devices need guest memory that the daemons can map.
    fn needs_shared_memory(&self) -> bool {
        matches!(self.vsock, VsockDevice::VhostUser { .. }) || self.config.shared_fs == SharedFs::VirtioFs
    }

    pub fn kernel_cmdline(&self) -> String {
        let mut p = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "loglevel=3".into(),
            "panic=-1".into(),
            "reboot=t".into(),
            // Boot trims that weaken nothing the host relies on (measured in `make bench`'s guest
            // phases): no crypto self-tests at algorithm registration, no IO-APIC timer check.
            "cryptomgr.notests".into(),
            "no_timer_check".into(),
            format!("kata_rs.shared_fs={}", self.config.shared_fs.guest_name()),
            format!("kata_rs.shared_tag={SHARED_TAG}"),
        ];
        if self.accel == Accel::Tcg {
            // TCG's TSC is QEMU's own clock: nothing for the clocksource watchdog to catch, and its
            // checks cost boot time. Under KVM the guest uses kvm-clock and keeps its default.
            p.push("tsc=reliable".into());
        }
        if self.config.shared_fs == SharedFs::Virtio9p {
            p.push(format!("kata_rs.msize_9p={}", self.config.msize_9p));
        }
        p.extend(self.config.kernel_params.split_whitespace().map(str::to_string));
        p.extend(self.extra_kernel_params.iter().cloned());
        p.join(" ")
    }

    pub fn build(&self) -> Vec<String> {
        let c = self.config;
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-name", &format!("kata-rs-{},debug-threads=on", self.name)]);
        push(&["-no-user-config", "-nodefaults", "-nographic", "-no-reboot"]);
        // Start paused: the host attaches to the console first, then lets the guest run (QMP cont).
        push(&["-S"]);
        if c.seccomp_sandbox {
            push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
        }
        push(&["-machine", &c.machine]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm"]),
            Accel::Tcg => push(&["-accel", &format!("tcg,thread={}", c.tcg_thread)]),
        }
        push(&["-cpu", self.cpu_model()]);
        push(&["-smp", &c.vcpus.to_string()]);
        push(&["-m", &format!("{}M", c.memory_mib)]);
        if self.needs_shared_memory() {
            push(&["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", c.memory_mib)]);
            push(&["-numa", "node,memdev=mem"]);
        }
        push(&["-kernel", &c.kernel.to_string_lossy()]);
        push(&["-initrd", &c.initrd.to_string_lossy()]);
        push(&["-append", &self.kernel_cmdline()]);
        push(&["-chardev", &format!("socket,id=console0,path={},server=on,wait=off", self.console_socket.display())]);
        push(&["-serial", "chardev:console0"]);
        push(&["-qmp", &format!("unix:{},server=on,wait=off", self.qmp_socket.display())]);
        push(&["-nic", "none"]);
        // Network interfaces arrive after boot (CNI runs after the task exists): empty root ports take them.
        for i in 0..c.network_ports {
            push(&["-device", &format!("pcie-root-port,id={},bus=pcie.0,chassis={},slot={}", network_port(i), i + 1, i + 1)]);
        }
        match &self.vsock {
            VsockDevice::Vhost { guest_cid, vhostfd } => {
                let fd = vhostfd.map(|fd| format!(",vhostfd={fd}")).unwrap_or_default();
                push(&["-device", &format!("vhost-vsock-pci,id=vsock0,guest-cid={guest_cid}{fd}")]);
            }
            VsockDevice::VhostUser { socket } => {
                push(&["-chardev", &format!("socket,id=vsockchr,path={}", socket.display())]);
                push(&["-device", "vhost-user-vsock-pci,id=vsock0,chardev=vsockchr"]);
            }
        }
        match c.shared_fs {
            SharedFs::VirtioFs => {
                let sock = self.virtiofsd_socket.as_ref().expect("virtio-fs needs a virtiofsd socket");
                push(&["-chardev", &format!("socket,id=vfschr,path={}", sock.display())]);
                push(&["-device", &format!("vhost-user-fs-pci,id=vfs0,chardev=vfschr,tag={SHARED_TAG}")]);
            }
            SharedFs::Virtio9p => {
                push(&[
                    "-fsdev",
                    &format!("local,id=fs9p,path={},security_model=none,multidevs=remap", self.shared_dir.display()),
                ]);
                push(&["-device", &format!("virtio-9p-pci,id=fs0,fsdev=fs9p,mount_tag={SHARED_TAG}")]);
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(config: &VmConfig, accel: Accel, vsock: VsockDevice) -> QemuArgs<'_> {
        QemuArgs {
            config,
            accel,
            name: "c1",
            qmp_socket: "/run/k/qmp.sock".into(),
            console_socket: "/run/k/console.sock".into(),
            vsock,
            virtiofsd_socket: Some("/run/k/vfs.sock".into()),
            shared_dir: "/run/k/shared".into(),
            extra_kernel_params: vec!["kata_rs.log=debug".into()],
        }
    }

    fn has_pair(v: &[String], flag: &str, value: &str) -> bool {
        v.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn tcg_with_hybrid_vsock_and_virtiofs() {
        let c = VmConfig { memory_mib: 1024, vcpus: 2, ..Default::default() };
        let v = args(&c, Accel::Tcg, VsockDevice::VhostUser { socket: "/run/k/vhu.sock".into() }).build();
        assert!(has_pair(&v, "-accel", "tcg,thread=multi"));
        assert!(has_pair(&v, "-cpu", "max"));
        assert!(has_pair(&v, "-m", "1024M"));
        assert!(has_pair(&v, "-object", "memory-backend-memfd,id=mem,size=1024M,share=on"));
        assert!(has_pair(&v, "-device", "vhost-user-vsock-pci,id=vsock0,chardev=vsockchr"));
        assert!(has_pair(&v, "-device", "vhost-user-fs-pci,id=vfs0,chardev=vfschr,tag=kataShared"));
        assert!(has_pair(&v, "-qmp", "unix:/run/k/qmp.sock,server=on,wait=off"));
        assert!(has_pair(&v, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
        assert!(has_pair(&v, "-chardev", "socket,id=console0,path=/run/k/console.sock,server=on,wait=off"));
        assert!(has_pair(&v, "-serial", "chardev:console0"));
        assert!(v.iter().any(|x| x == "-S"), "starts paused until the console is attached");
        assert!(has_pair(&v, "-device", "pcie-root-port,id=netport0,bus=pcie.0,chassis=1,slot=1"));
        assert!(has_pair(&v, "-device", "pcie-root-port,id=netport3,bus=pcie.0,chassis=4,slot=4"));
        assert!(!v.iter().any(|x| x.contains("netport4")));
        let c = VmConfig { seccomp_sandbox: false, ..c };
        let v = args(&c, Accel::Tcg, VsockDevice::VhostUser { socket: "/run/k/vhu.sock".into() }).build();
        assert!(!v.iter().any(|x| x == "-sandbox"));
        let single = VmConfig { tcg_thread: "single".into(), ..c.clone() };
        let vs = args(&single, Accel::Tcg, VsockDevice::VhostUser { socket: "/run/k/vhu.sock".into() }).build();
        assert!(has_pair(&vs, "-accel", "tcg,thread=single"));
        let append = &v[v.iter().position(|x| x == "-append").unwrap() + 1];
        assert!(append.contains("kata_rs.shared_fs=virtiofs"));
        assert!(append.contains(" cryptomgr.notests no_timer_check ") && append.contains(" tsc=reliable "), "{append}");
        assert!(append.ends_with("kata_rs.log=debug"));
    }

    #[test]
    fn kvm_with_vhost_vsock_and_9p_needs_no_memfd() {
        let c = VmConfig { shared_fs: SharedFs::Virtio9p, ..Default::default() };
        let v = args(&c, Accel::Kvm, VsockDevice::Vhost { guest_cid: 7, vhostfd: None }).build();
        assert!(has_pair(&v, "-accel", "kvm"));
        assert!(has_pair(&v, "-cpu", "host"));
        assert!(has_pair(&v, "-device", "vhost-vsock-pci,id=vsock0,guest-cid=7"));
        assert!(!v.iter().any(|x| x.starts_with("memory-backend-memfd")));
        assert!(v.iter().any(|x| x.starts_with("local,id=fs9p,path=/run/k/shared")));
        let append = &v[v.iter().position(|x| x == "-append").unwrap() + 1];
        assert!(append.contains("kata_rs.shared_fs=9p") && append.contains("kata_rs.msize_9p=512000"));
        assert!(!append.contains("tsc=reliable"), "KVM keeps the clocksource watchdog: {append}");
    }

    #[test]
    fn configured_cpu_model_wins() {
        let c = VmConfig { cpu_model: "qemu64".into(), ..Default::default() };
        let v = args(&c, Accel::Kvm, VsockDevice::Vhost { guest_cid: 3, vhostfd: Some(9) }).build();
        assert!(has_pair(&v, "-cpu", "qemu64"));
        assert!(has_pair(&v, "-device", "vhost-vsock-pci,id=vsock0,guest-cid=3,vhostfd=9"));
    }
}
