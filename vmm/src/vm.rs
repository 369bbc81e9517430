//! One QEMU guest: start (daemons, QEMU, QMP), control, teardown.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    accel::Accel,
    cmdline::{QemuArgs, VsockDevice},
    config::{resolve_program, VmConfig},
    console::Console,
    daemon::{kill_recorded, tail_of, ChildNetns, Daemon, DaemonError, Identity},
    qmp::{Qmp, QmpError},
    SharedFs, VsockSetting,
};

/// Where the agent's vsock port is reached from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChannel {
    /// AF_VSOCK to this guest CID.
    Vsock { cid: u32 },
    /// Unix socket of vhost-device-vsock (hybrid vsock: `CONNECT <port>\n`).
    Hybrid { uds: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what} {path} does not exist: {fix}")]
    MissingFile { what: &'static str, path: String, fix: &'static str },
    #[error("cannot create {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket path {path} is {len} bytes, longer than the 107 a unix socket allows: use a shorter runtime root")]
    SocketPathTooLong { path: String, len: usize },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Cid(#[from] crate::vsockcid::CidError),
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited during start ({status}); {log}: {tail}")]
    QemuExited { status: String, log: String, tail: String },
    #[error("QEMU did not open its QMP socket: {source}; {log}: {tail}")]
    Qmp {
        #[source]
        source: QmpError,
        log: String,
        tail: String,
    },
    #[error("cannot read the guest console of QEMU ({socket}): {source}; {log}: {tail}")]
    Console {
        socket: String,
        #[source]
        source: std::io::Error,
        log: String,
        tail: String,
    },
    #[error("QEMU did not start the guest (QMP cont): {source}")]
    Cont {
        #[source]
        source: QmpError,
    },
    #[error(transparent)]
    HostId(#[from] crate::hostid::HostIdError),
    #[error("socket directory {path} of vhost-device-vsock: {source}")]
    SocketDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the VM state file {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What is needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Sandbox id, used in the QEMU process name.
    pub id: String,
    /// Private runtime directory of this VM (sockets, logs, state).
    pub dir: PathBuf,
    /// Host directory shared into the guest.
    pub shared_dir: PathBuf,
    pub config: VmConfig,
    pub accel: Accel,
    pub extra_kernel_params: Vec<String>,
    /// A line the guest prints on its console once it is ready ([`Vm::console_marker_seen`]).
    pub ready_marker: String,
    /// The network namespace QEMU runs in (the helper daemons stay in the caller's).
    pub netns: Netns,
}

/// Where QEMU runs, network-wise: that namespace is the one the task pid (QEMU's) shows to hooks and
/// to clients such as `ctr run --cni`, which configure networks in `/proc/<pid>/ns/net`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Netns {
    /// The caller's (a container on the host's network).
    #[default]
    Inherit,
    /// A new one of its own.
    New,
    /// An existing one, e.g. `/var/run/netns/cni-…` from the spec.
    Path(PathBuf),
}

/// Processes recorded on disk, so that a later `delete` can clean up after a dead owner.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct VmState {
    pub pids: Vec<u32>,
    /// A string every recorded process has in its command line (the VM directory).
    pub marker: String,
    /// The VM's host identity, given back by a cleanup after a dead owner.
    #[serde(default)]
    pub host_id: Option<crate::hostid::HostId>,
}

pub const STATE_FILE: &str = "vm.json";

/// A running VM. Dropping it kills every process it owns; [`Vm::shutdown`] stops them cleanly.
pub struct Vm {
    dir: PathBuf,
    qemu: Option<Daemon>,
    daemons: Vec<Daemon>,
    qmp: Qmp,
    agent: AgentChannel,
    console: Console,
    shutdown_timeout: Duration,
    pub accel: Accel,
    /// QEMU's network namespace, pinned (none when QEMU shares the caller's).
    netns: Option<std::fs::File>,
    network_ports: u32,
    /// vhost-device-vsock's uid and gid; last, so that it is given back after the processes
    /// are killed when the VM is dropped.
    host_id: Option<crate::hostid::Claim>,
}

fn check_socket_path(p: &Path) -> Result<(), VmError> {
    let len = p.as_os_str().len();
    if len > 107 {
        return Err(VmError::SocketPathTooLong { path: p.display().to_string(), len });
    }
    Ok(())
}

fn check_file(what: &'static str, p: &Path, fix: &'static str) -> Result<(), VmError> {
    if p.is_file() {
        Ok(())
    } else {
        Err(VmError::MissingFile { what, path: p.display().to_string(), fix })
    }
}

impl Vm {
    /// Starts the helper daemons and QEMU, and connects QMP. Does not wait for the guest agent.
    pub async fn start(spec: VmSpec) -> Result<Vm, VmError> {
        let c = &spec.config;
        let make_guest_image = "build it with 'make guest-image' or set hypervisor.kernel/initrd in configuration.toml";
        check_file("guest kernel", &c.kernel, make_guest_image)?;
        check_file("guest initramfs", &c.initrd, make_guest_image)?;
        let qemu_path = resolve_program(&c.qemu_path).ok_or_else(|| VmError::MissingFile {
            what: "QEMU binary",
            path: c.qemu_path.display().to_string(),
            fix: "install qemu-system-x86 (make setup) or set hypervisor.qemu_path",
        })?;
        for d in [&spec.dir, &spec.shared_dir] {
            std::fs::create_dir_all(d).map_err(|source| VmError::Dir { path: d.display().to_string(), source })?;
        }
        let dir = &spec.dir;
        let qmp_socket = dir.join("qmp.sock");
        let console_socket = dir.join("console.sock");
        let console_log = dir.join("console.log");
        check_socket_path(&qmp_socket)?;
        check_socket_path(&console_socket)?;
        let host_id = match c.run_as.as_str() {
            "root" => None,
            _ => Some(crate::hostid::claim(dir, c.host_id_base, c.host_id_count)?),
        };
        let user = host_id.as_ref().map(|h| h.id);
        let mut daemons = Vec::new();
        let mut state = VmState { pids: vec![], marker: dir.display().to_string(), host_id: user };
        let state_path = dir.join(STATE_FILE);
        let save_state = |state: &VmState| {
            std::fs::write(&state_path, serde_json::to_vec(state).expect("serializable"))
                .map_err(|source| VmError::State { path: state_path.display().to_string(), source })
        };

        // Agent channel.
        let use_vhost = match c.vsock {
            VsockSetting::Vhost => true,
            VsockSetting::VhostUser => false,
            VsockSetting::Auto => Path::new("/dev/vhost-vsock").exists(),
        };
        let mut vhost_fd = None;
        let (vsock, agent) = if use_vhost {
            let (fd, cid) = crate::vsockcid::reserve()?;
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            vhost_fd = Some(fd);
            (VsockDevice::Vhost { guest_cid: cid, vhostfd: Some(raw) }, AgentChannel::Vsock { cid })
        } else {
            let program = resolve_program(&c.vhost_device_vsock_path).ok_or_else(|| VmError::MissingFile {
                what: "vhost-device-vsock",
                path: c.vhost_device_vsock_path.display().to_string(),
                fix: "install it with 'make setup' (cargo install vhost-device-vsock) or set hypervisor.vhost_device_vsock_path",
            })?;
            // Its sockets in a directory of their own: the daemon's while it makes them (it runs as the
            // VM's user), root's again before the guest runs, so that nothing the daemon does later can
            // replace the socket the host dials for the agent.
            let sockets = dir.join("vs");
            let socket = sockets.join("vhu.sock");
            let uds = sockets.join("agent.sock");
            check_socket_path(&socket)?;
            check_socket_path(&uds)?;
            let sock_dir = |uid: u32, gid: u32, mode: u32| socket_dir_owner(&sockets, uid, gid, mode);
            fresh_dir(&sockets)?;
            let args = vec![
                "--guest-cid=3".to_string(),
                format!("--socket={}", socket.display()),
                format!("--uds-path={}", uds.display()),
            ];
            let log = dir.join("vhost-device-vsock.log");
            let mut d = match user {
                Some(u) => {
                    sock_dir(u.uid, u.gid, 0o700)?;
                    Daemon::spawn_as("vhost-device-vsock", &program, &args, log, u)?
                }
                None => Daemon::spawn("vhost-device-vsock", &program, &args, log)?,
            };
            state.pids.push(d.pid);
            save_state(&state)?;
            d.wait_for_socket(&socket, Duration::from_secs(5)).await?;
            d.wait_for_socket(&uds, Duration::from_secs(5)).await?;
            sock_dir(0, 0, 0o755)?;
            if user.is_some() {
                // QEMU (root without DAC_OVERRIDE) connects to the vhost-user socket: root's too,
                // changed now that the daemon can no longer replace it.
                root_owned_socket(&socket)?;
            }
            daemons.push(d);
            (VsockDevice::VhostUser { socket }, AgentChannel::Hybrid { uds })
        };

        // Shared filesystem.
        let virtiofsd_socket: Option<PathBuf> = if c.shared_fs == SharedFs::VirtioFs {
            let program = resolve_program(&c.virtiofsd_path).ok_or_else(|| VmError::MissingFile {
                what: "virtiofsd",
                path: c.virtiofsd_path.display().to_string(),
                fix: "install qemu-system-x86 (make setup), set hypervisor.virtiofsd_path, or use shared_fs = \"virtio-9p\"",
            })?;
            let socket = dir.join("vfs.sock");
            check_socket_path(&socket)?;
            let _ = std::fs::remove_file(&socket);
            let args = virtiofsd_args(&program, &socket, &spec.shared_dir, &c.virtiofs_cache, &c.virtiofsd_sandbox);
            let mut d = Daemon::spawn("virtiofsd", &program, &args, dir.join("virtiofsd.log"))?;
            state.pids.push(d.pid);
            save_state(&state)?;
            d.wait_for_socket(&socket, Duration::from_secs(5)).await?;
            daemons.push(d);
            Some(socket)
        } else {
            None
        };

        let _ = std::fs::remove_file(&qmp_socket);
        let _ = std::fs::remove_file(&console_socket);
        let args = QemuArgs {
            config: c,
            accel: spec.accel,
            name: &spec.id,
            qmp_socket: qmp_socket.clone(),
            console_socket: console_socket.clone(),
            vsock,
            virtiofsd_socket,
            shared_dir: spec.shared_dir.clone(),
            extra_kernel_params: spec.extra_kernel_params.clone(),
        }
        .build();
        let qemu_log = dir.join("qemu.log");
        let keep = vhost_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        // The namespace file is opened here (not in the child), so a bad path is a clear error.
        let netns_file = match &spec.netns {
            Netns::Path(p) => Some(std::fs::File::open(p).map_err(|source| VmError::Netns { path: p.display().to_string(), source })?),
            _ => None,
        };
        let child_netns = match (&spec.netns, &netns_file) {
            (Netns::New, _) => ChildNetns::New,
            (Netns::Path(_), Some(f)) => ChildNetns::Join(std::os::fd::AsRawFd::as_raw_fd(f)),
            _ => ChildNetns::Inherit,
        };
        // QEMU runs as root with only the capabilities it uses (docs/security.md): as the VM's user it
        // could not open /dev/net/tun (0600 on hosts such as this machine kind) for the taps
        // hot-plugged later, which needs the tap's descriptor passed over QMP. (QEMU's own -runas is no
        // way out: the user change clears its parent-death signal.)
        let id = Identity { user: None, capabilities: Some(qemu_capabilities(c.shared_fs)) };
        let mut qemu = Daemon::spawn_in("qemu", &qemu_path, &args, qemu_log.clone(), keep, child_netns, id)?;
        // A namespace of its own is pinned now, while QEMU (started paused) certainly lives in it.
        let netns_file = match spec.netns {
            Netns::New => {
                let p = format!("/proc/{}/ns/net", qemu.pid);
                match std::fs::File::open(&p) {
                    Ok(f) => Some(f),
                    Err(source) => {
                        teardown(Some(qemu), daemons, Duration::ZERO).await;
                        return Err(VmError::Netns { path: p, source });
                    }
                }
            }
            _ => netns_file,
        };
        // QEMU holds its own copy (and with it the CID); ours is not needed any more.
        drop(vhost_fd);
        state.pids.push(qemu.pid);
        save_state(&state)?;
        let limit = Duration::from_secs(c.qmp_timeout_s);
        let mut waited = qemu.wait_for_socket(&qmp_socket, limit).await;
        if waited.is_ok() {
            waited = qemu.wait_for_socket(&console_socket, limit).await;
        }
        if let Err(e) = waited {
            let status = qemu.try_exited();
            let tail = tail_of(&qemu_log, 2000);
            let log = qemu_log.display().to_string();
            let err = match status {
                Some(s) => VmError::QemuExited { status: s.to_string(), log, tail },
                None => VmError::Daemon(e),
            };
            teardown(Some(qemu), daemons, Duration::ZERO).await;
            return Err(err);
        }
        // QEMU waits (-S) until the console is read, so that no output is lost and none piles up.
        let console = match Console::attach(&console_socket, console_log, c.console_log_max_kib * 1024, &spec.ready_marker, limit).await {
            Ok(con) => con,
            Err(source) => {
                let tail = tail_of(&qemu_log, 2000);
                teardown(Some(qemu), daemons, Duration::ZERO).await;
                return Err(VmError::Console { socket: console_socket.display().to_string(), source, log: qemu_log.display().to_string(), tail });
            }
        };
        let qmp = match Qmp::connect(&qmp_socket, limit).await {
            Ok(q) => q,
            Err(source) => {
                let tail = tail_of(&qemu_log, 2000);
                teardown(Some(qemu), daemons, Duration::ZERO).await;
                return Err(VmError::Qmp { source, log: qemu_log.display().to_string(), tail });
            }
        };
        if let Err(source) = qmp.cont().await {
            teardown(Some(qemu), daemons, Duration::ZERO).await;
            return Err(VmError::Cont { source });
        }
        info!(id = %spec.id, accel = %spec.accel, qemu_pid = qemu.pid, "VM started");
        Ok(Vm {
            dir: dir.clone(),
            qemu: Some(qemu),
            daemons,
            qmp,
            agent,
            console,
            shutdown_timeout: Duration::from_secs(c.shutdown_timeout_s),
            accel: spec.accel,
            netns: netns_file,
            network_ports: c.network_ports,
            host_id,
        })
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub fn agent_channel(&self) -> &AgentChannel {
        &self.agent
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The console log file (capped; an older generation is `console.log.1`).
    pub fn console_log(&self) -> &Path {
        self.console.log_path()
    }

    /// The last `max` bytes the guest wrote on its serial console (at most the in-memory ring).
    pub fn console_tail(&self, max: usize) -> String {
        self.console.tail(max)
    }

    /// Has the guest printed the spec's `ready_marker` on its console?
    pub fn console_marker_seen(&self) -> bool {
        self.console.marker_seen()
    }

    /// Bytes the guest printed on its console so far.
    pub fn console_bytes_seen(&self) -> u64 {
        self.console.bytes_seen()
    }

    /// QEMU's network namespace (where its taps are), pinned; `None` when it shares the caller's.
    pub fn netns(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.netns.as_ref().map(std::os::fd::AsFd::as_fd)
    }

    /// How many network interfaces can be hot-plugged (empty root ports).
    pub fn network_ports(&self) -> u32 {
        self.network_ports
    }

    /// vhost-device-vsock's uid and gid (`None`: it runs as root).
    pub fn host_id(&self) -> Option<crate::hostid::HostId> {
        self.host_id.as_ref().map(|c| c.id)
    }

    /// Hot-plugs a virtio-net device with `mac` backed by the tap `tap` (QEMU creates it in its
    /// namespace) into root port `index`. The tap exists once this returns.
    pub async fn hotplug_nic(&self, index: u32, tap: &str, mac: &str) -> Result<(), QmpError> {
        let netdev = format!("net{index}");
        self.qmp.netdev_add_tap(&netdev, tap).await?;
        let mut props = serde_json::Map::new();
        props.insert("netdev".into(), netdev.clone().into());
        props.insert("mac".into(), mac.into());
        if let Err(e) = self.qmp.device_add("virtio-net-pci", &format!("nic{index}"), &crate::cmdline::network_port(index), props).await {
            let _ = self.qmp.netdev_del(&netdev).await;
            return Err(e);
        }
        info!(index, tap, mac, "network interface hot-plugged");
        Ok(())
    }

    /// QEMU's pid (the task pid containerd sees), 0 once QEMU was stopped.
    pub fn qemu_pid(&self) -> u32 {
        self.qemu.as_ref().map(|q| q.pid).unwrap_or(0)
    }

    /// What a watcher needs to notice this VM's end (see [`crate::watch::VmWatch::ended`]).
    pub fn watch(&self) -> crate::watch::VmWatch {
        let qemu = match crate::watch::pidfd_open(self.qemu_pid()) {
            Ok(fd) => Some(std::sync::Arc::new(fd)),
            Err(e) => {
                warn!(pid = self.qemu_pid(), error = %e, "no pidfd of QEMU");
                None
            }
        };
        crate::watch::VmWatch {
            events: self.qmp.subscribe(),
            qemu,
            daemons: self.daemons.iter().map(|d| (d.name, d.pid)).collect(),
            console: self.console.tail_handle(),
        }
    }

    /// Pids of QEMU and every helper daemon.
    pub fn pids(&self) -> Vec<u32> {
        self.qemu.iter().chain(self.daemons.iter()).map(|d| d.pid).collect()
    }

    /// Has QEMU exited?
    pub fn qemu_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.qemu.as_mut().and_then(|q| q.try_exited())
    }

    /// Stops the VM: QMP `quit`, then waits, kills what remains, and reaps QEMU and every daemon.
    pub async fn shutdown(mut self) {
        if let Some(status) = self.qemu_exited() {
            info!(%status, "QEMU had already exited");
        } else if let Err(e) = self.qmp.quit().await {
            warn!(error = %e, "QMP quit failed; killing QEMU");
        }
        let grace = self.shutdown_timeout;
        teardown(self.qemu.take(), std::mem::take(&mut self.daemons), grace).await;
        let _ = std::fs::remove_file(self.dir.join(STATE_FILE));
        info!(dir = %self.dir.display(), "VM stopped");
    }
}

impl Vm {
    /// Ends the VM whatever the guest does: one QMP quit with a short bound (a stopped or hung QEMU does
    /// not answer it), then SIGKILL, then the daemons. For a guest that would not let a process die.
    pub async fn kill(mut self) {
        if self.qemu_exited().is_none() {
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), self.qmp.quit()).await {
                warn!(error = %e, "QMP quit failed; killing QEMU");
            }
        }
        teardown(self.qemu.take(), std::mem::take(&mut self.daemons), Duration::from_millis(500)).await;
        let _ = std::fs::remove_file(self.dir.join(STATE_FILE));
        warn!(dir = %self.dir.display(), "VM ended by the host");
    }
}

async fn teardown(qemu: Option<Daemon>, daemons: Vec<Daemon>, grace: Duration) {
    if let Some(q) = qemu {
        q.stop(grace).await;
    }
    for d in daemons {
        d.terminate();
        d.stop(Duration::from_secs(1)).await;
    }
}

/// A new, empty directory at `d` (whatever was there before is removed).
fn fresh_dir(d: &Path) -> Result<(), VmError> {
    let _ = std::fs::remove_dir_all(d);
    std::fs::create_dir(d).map_err(|source| VmError::SocketDir { path: d.display().to_string(), source })
}

/// The capabilities QEMU keeps (as root, every other one is out of its bounding set). NET_ADMIN:
/// attaching to a tap made by the shim (TUNSETIFF on a tap without an owner), including taps
/// hot-plugged after boot. With 9p QEMU serves the shared directory itself, so it also keeps what a
/// file server needs for files of every owner (as virtiofsd does, less SETUID and SETGID, which
/// `-sandbox` denies anyway). Nothing else: no SYS_ADMIN, SYS_PTRACE, SYS_MODULE, MKNOD, KILL,
/// SETPCAP; it opens only root's own files and sockets (/dev/kvm, /dev/net/tun, /dev/vhost-net, the
/// kernel, the daemons' sockets) and the descriptors it is given.
pub fn qemu_capabilities(shared_fs: SharedFs) -> u64 {
    use crate::daemon::cap;
    match shared_fs {
        SharedFs::VirtioFs => cap::NET_ADMIN,
        SharedFs::Virtio9p => cap::NET_ADMIN | cap::CHOWN | cap::DAC_OVERRIDE | cap::DAC_READ_SEARCH | cap::FOWNER | cap::FSETID,
    }
}

fn root_owned_socket(p: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| VmError::SocketDir { path: p.display().to_string(), source };
    let m = std::fs::symlink_metadata(p).map_err(err)?;
    if !m.file_type().is_socket() {
        return Err(err(std::io::Error::other("not a socket")));
    }
    std::os::unix::fs::lchown(p, Some(0), Some(0)).map_err(err)
}

fn socket_dir_owner(d: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), VmError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| VmError::SocketDir { path: d.display().to_string(), source };
    std::os::unix::fs::chown(d, Some(uid), Some(gid)).map_err(err)?;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// Kills what a dead owner left behind in `dir` (from its state file). Returns the pids killed.
pub fn cleanup_dir(dir: &Path) -> Vec<u32> {
    let path = dir.join(STATE_FILE);
    let Ok(text) = std::fs::read(&path) else { return vec![] };
    let Ok(state) = serde_json::from_slice::<VmState>(&text) else { return vec![] };
    let killed = kill_recorded(&state.pids, &state.marker);
    if let Some(id) = state.host_id {
        crate::hostid::release(dir, id);
    }
    let _ = std::fs::remove_file(&path);
    killed
}

/// Capabilities virtiofsd keeps by default and a guest never needs through the share: device nodes
/// (volumes are nodev anyway) and file capabilities (xattrs are off).
pub const VIRTIOFSD_DROPPED_CAPS: &str = "-mknod:-setfcap";

/// virtiofsd always runs in its own sandbox (`sandbox`: namespace or chroot) and with its seccomp filter.
fn virtiofsd_args(program: &Path, socket: &Path, shared: &Path, cache: &str, sandbox: &str) -> Vec<String> {
    // The C virtiofsd of QEMU <= 7.2 takes `-o` options; the Rust virtiofsd takes long flags.
    let rust_style = std::process::Command::new(program)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--shared-dir") || String::from_utf8_lossy(&o.stderr).contains("--shared-dir"))
        .unwrap_or(false);
    if rust_style {
        vec![
            format!("--socket-path={}", socket.display()),
            format!("--shared-dir={}", shared.display()),
            format!("--cache={cache}"),
            format!("--sandbox={sandbox}"),
            "--seccomp=kill".into(),
            format!("--modcaps={VIRTIOFSD_DROPPED_CAPS}"),
        ]
    } else {
        vec![
            format!("--socket-path={}", socket.display()),
            "-o".into(),
            format!("source={}", shared.display()),
            "-o".into(),
            format!("cache={cache}"),
            "-o".into(),
            format!("sandbox={sandbox}"),
            "-o".into(),
            format!("modcaps={VIRTIOFSD_DROPPED_CAPS}"),
        ]
    }
}

