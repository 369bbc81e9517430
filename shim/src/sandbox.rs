//! A sandbox: one VM and the connection to its agent.
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_client::{AgentClient, AgentError, Transport, AGENT_PORT};
use tracing::{info, warn};
use vmm::{accel, AgentChannel, Vm, VmError, VmSpec};

use crate::{config::Config, safefs::Dir};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("guest agent not ready after {waited:?}: {source}\nguest console ({console}), last lines:\n{tail}")]
    Agent {
        waited: Duration,
        #[source]
        source: AgentError,
        console: String,
        tail: String,
    },
    #[error("QEMU exited while the guest was booting ({status}); guest console ({console}):\n{tail}")]
    QemuDied { status: String, console: String, tail: String },
    #[error("preparing the sandbox directory {path}: {message}")]
    Prepare { path: String, message: String },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
}

/// The line the guest agent prints on the console once it listens on its vsock port.
pub const AGENT_READY_MARKER: &str = "KATA_RS_AGENT_READY";

pub struct Sandbox {
    pub id: String,
    pub vm: Vm,
    pub agent: AgentClient,
    pub dir: PathBuf,
    /// Host path of the shared directory, for messages and for host-only setup before boot.
    pub shared_dir: PathBuf,
    /// The shared directory, pinned: the host reaches what the guest wrote there only through it.
    pub shared: Arc<Dir>,
    /// Launch of QEMU to the agent's first answer.
    pub boot_time: Duration,
    /// Holds why the VM is gone once it is (QEMU exited, the guest panicked, shut down or reset); the
    /// agent client fails every call at once from then on.
    pub gone: tokio::sync::watch::Receiver<Option<String>>,
    watcher: tokio::task::JoinHandle<()>,
    /// The host cgroup QEMU and its daemons run in (removed once they are gone).
    host_cgroup: Option<crate::cgroups::HostCgroup>,
}

/// Watches a VM for its end (vmm::watch): the first SHUTDOWN, GUEST_PANICKED or RESET, QEMU exiting
/// however it died, or a helper daemon exiting (then QEMU is killed) is sent as the reason the VM is gone.
fn watch_vm(vm: &Vm, id: &str) -> (tokio::sync::watch::Receiver<Option<String>>, tokio::task::JoinHandle<()>) {
    let watch = vm.watch();
    let (tx, rx) = tokio::sync::watch::channel(None);
    let id = id.to_string();
    let task = tokio::spawn(async move {
        let reason = watch.ended().await;
        warn!(id, reason, "the VM is gone");
        let _ = tx.send(Some(reason));
        // Keep the sender, so that receivers see the reason rather than a closed channel.
        std::future::pending::<()>().await;
    });
    (rx, task)
}

/// A sandbox directory with its shared directory mounted, before the VM boots.
pub struct Prepared {
    pub id: String,
    pub dir: PathBuf,
    pub shared_dir: PathBuf,
    shared: Arc<Dir>,
    /// The network namespace QEMU will run in (the caller's unless set).
    pub netns: vmm::Netns,
    /// The host cgroup (path, memory limit in bytes) QEMU and its daemons are moved into as soon as
    /// they run, before the guest boots: all the VM's memory is charged there.
    pub cgroup: Option<(String, u64)>,
}

impl Prepared {
    /// The shared directory, pinned.
    pub fn shared(&self) -> &Dir {
        &self.shared
    }

    /// Unmounts the shared directory and removes the sandbox directory (a failed create).
    pub fn discard(self) {
        remove_sandbox_dir(&self.dir);
    }
}

/// Bytes the guest may store in its shared directory (a tmpfs): images of a checkpoint of all its
/// memory twice over (dump and restore staging) plus 1 GiB. Container rootfs are bind mounts below it
/// and do not count.
pub fn shared_dir_bytes(guest_mem_mib: u64) -> u64 {
    (guest_mem_mib * 2 + 1024) << 20
}
/// Files and directories the guest may create in its shared directory.
pub const SHARED_DIR_INODES: u64 = 65536;

/// Mounts a tmpfs on `shared` (size and inodes bounded; no devices, setuid or exec from it), so
/// that what the guest writes there is bounded and goes away with one unmount, no walk.
fn mount_shared(shared: &Path, bytes: u64) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    std::fs::create_dir_all(shared).map_err(|e| e.to_string())?;
    crate::mounts::unmount_if_mounted(shared);
    let opts = format!("size={bytes},nr_inodes={SHARED_DIR_INODES},mode=0755");
    mount(Some("kata-rs-shared"), shared, Some("tmpfs"), MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some(opts.as_str()))
        .map_err(|e| format!("mounting a tmpfs ({opts}): {e}"))?;
    // A shared mount: virtiofsd's copy of it (a slave, in its own mount namespace) then receives the
    // mounts made below it later, a pod's next containers.
    mount(None::<&str>, shared, None::<&str>, MsFlags::MS_SHARED, None::<&str>).map_err(|e| format!("making {} a shared mount: {e}", shared.display()))
}

/// The last lines of a console log, for error messages.
fn console_tail(vm: &Vm) -> String {
    let t = vm.console_tail(3000);
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

impl Sandbox {
    /// The directory of sandbox `id` under the runtime root.
    pub fn dir_for(config: &Config, id: &str) -> PathBuf {
        config.runtime.root.join(id)
    }

    /// Creates the sandbox directory and mounts its shared directory (no VM yet).
    pub fn prepare(config: &Config, id: &str) -> Result<Prepared, SandboxError> {
        let dir = Self::dir_for(config, id);
        let shared_dir = dir.join("shared");
        let fail = |message: String| SandboxError::Prepare { path: dir.display().to_string(), message };
        std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        if let Err(e) = mount_shared(&shared_dir, shared_dir_bytes(config.hypervisor.memory_mib as u64)) {
            remove_sandbox_dir(&dir);
            return Err(fail(e));
        }
        match Dir::open_host(&shared_dir) {
            Ok(d) => Ok(Prepared { id: id.to_string(), dir, shared_dir, shared: Arc::new(d), netns: vmm::Netns::Inherit, cgroup: None }),
            Err(e) => {
                remove_sandbox_dir(&dir);
                Err(fail(e.to_string()))
            }
        }
    }

    /// Boots a VM for sandbox `id` and waits for its agent.
    pub async fn start(config: &Config, id: &str) -> Result<Sandbox, SandboxError> {
        let p = Self::prepare(config, id)?;
        Self::boot(config, p).await
    }

    /// Boots the VM of a prepared sandbox and waits for its agent. On failure the sandbox directory is
    /// removed.
    pub async fn boot(config: &Config, p: Prepared) -> Result<Sandbox, SandboxError> {
        let r = Self::boot_inner(config, &p).await;
        if r.is_err() {
            p.discard();
        }
        r
    }

    async fn boot_inner(config: &Config, p: &Prepared) -> Result<Sandbox, SandboxError> {
        let (id, dir, shared_dir) = (p.id.as_str(), p.dir.clone(), p.shared_dir.clone());
        let qemu = vmm::config::resolve_program(&config.hypervisor.qemu_path).unwrap_or_else(|| config.hypervisor.qemu_path.clone());
        let choice = accel::choose(&config.hypervisor, &qemu, &accel::default_cache_dir(&config.runtime.root)).await;
        info!(id, accel = %choice.accel, reason = %choice.reason, "starting sandbox VM");
        let spec = VmSpec {
            id: id.to_string(),
            dir: dir.clone(),
            shared_dir: shared_dir.clone(),
            config: config.hypervisor.clone(),
            accel: choice.accel,
            extra_kernel_params: vec![format!("kata_rs.log={}", config.agent.log_level)],
            ready_marker: AGENT_READY_MARKER.into(),
            netns: p.netns.clone(),
        };
        let start = Instant::now();
        let mut vm = Vm::start(spec).await?;
        let host_cgroup = match &p.cgroup {
            Some((path, limit)) => match crate::cgroups::HostCgroup::place(path, &crate::cgroups::with_descendants(&vm.pids()), *limit) {
                Ok(cg) => {
                    cg.record(&dir);
                    Some(cg)
                }
                Err(e) => {
                    vm.shutdown().await;
                    return Err(e.into());
                }
            },
            None => None,
        };
        let fail = |cg: Option<crate::cgroups::HostCgroup>| {
            if let Some(cg) = cg {
                cg.remove();
            }
        };
        let transport = match vm.agent_channel() {
            AgentChannel::Vsock { cid } => Transport::Vsock { cid: *cid, port: AGENT_PORT },
            AgentChannel::Hybrid { uds } => Transport::Hybrid { uds: uds.clone(), port: AGENT_PORT },
        };
        let total = Duration::from_secs(config.agent.connect_timeout_s);
        let rpc_timeout = Duration::from_secs(config.agent.rpc_timeout_s);
        // Connect only once the agent says (on the console) that it listens: connection attempts made
        // while the guest's vsock device is still initialising can leave vhost-device-vsock unable to
        // forward later ones (seen with 0.3.0: handshakes unanswered for 90 s after the agent was ready).
        loop {
            if vm.console_marker_seen() {
                break;
            }
            if let Some(status) = vm.qemu_exited() {
                let err = SandboxError::QemuDied { status: status.to_string(), console: vm.console_log().display().to_string(), tail: console_tail(&vm) };
                vm.shutdown().await;
                fail(host_cgroup);
                return Err(err);
            }
            if start.elapsed() >= total {
                break; // the connect loop below reports the timeout with the console tail
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Short connect rounds, so that a QEMU that died is noticed at once.
        let agent = loop {
            match AgentClient::connect(transport.clone(), Duration::from_secs(1), rpc_timeout).await {
                Ok(a) => break a,
                Err(e) => {
                    if let Some(status) = vm.qemu_exited() {
                        let err =
                            SandboxError::QemuDied { status: status.to_string(), console: vm.console_log().display().to_string(), tail: console_tail(&vm) };
                        vm.shutdown().await;
                        fail(host_cgroup);
                        return Err(err);
                    }
                    if start.elapsed() >= total {
                        let err = SandboxError::Agent {
                            waited: start.elapsed(),
                            source: e,
                            console: vm.console_log().display().to_string(),
                            tail: console_tail(&vm),
                        };
                        vm.shutdown().await;
                        fail(host_cgroup);
                        return Err(err);
                    }
                }
            }
        };
        let boot_time = start.elapsed();
        info!(id, boot_s = boot_time.as_secs_f64(), "guest agent ready");
        let (gone, watcher) = watch_vm(&vm, id);
        let agent = agent.with_vm_watch(gone.clone());
        Ok(Sandbox { id: id.to_string(), vm, agent, dir, shared_dir, shared: p.shared.clone(), boot_time, gone, watcher, host_cgroup })
    }

    /// Stops the VM and its daemons, removes the container's mounts (when given) and then the sandbox
    /// directory: the shared directory's tmpfs is unmounted (with every mount below it), never walked.
    pub async fn stop(self, mounts: Option<&crate::mounts::ContainerMounts>) {
        self.end(mounts, false).await
    }

    /// Like [`Sandbox::stop`], but without waiting for the guest: QEMU gets a short-bounded QMP quit,
    /// then SIGKILL (for a guest that does not let its processes die).
    pub async fn kill(self) {
        self.end(None, true).await
    }

    /// What the host measures of this VM (its host cgroup; nothing when it has none).
    pub fn meter(&self) -> crate::cgroups::HostMeter {
        self.host_cgroup.as_ref().map(|c| c.meter()).unwrap_or_default()
    }

    async fn end(self, mounts: Option<&crate::mounts::ContainerMounts>, kill: bool) {
        // A stop the host asked for is not a VM that died.
        self.watcher.abort();
        if kill {
            self.vm.kill().await;
        } else {
            self.vm.shutdown().await;
        }
        if let Some(cg) = &self.host_cgroup {
            cg.remove_when_empty(std::time::Duration::from_secs(2)).await;
        }
        drop(self.shared);
        remove_sandbox_dir(&self.dir);
        if let Some(m) = mounts {
            m.teardown();
        }
    }
}

/// Unmounts `<dir>/shared` (lazily, with every mount below it) and removes the sandbox directory, which
/// then holds only what the host made (sockets, logs, state). Never follows a symlink or crosses a mount.
pub fn remove_sandbox_dir(dir: &Path) {
    crate::mounts::unmount_if_mounted(&dir.join("shared"));
    if let Err(e) = remove_dir_all_no_follow(dir) {
        warn!(dir = %dir.display(), error = %e, "removing the sandbox directory");
    }
}

/// Removes a directory tree through pinned descriptors: no symlink is followed and no other mount is
/// entered (a bind-mounted rootfs below it must be unmounted first, never emptied).
pub fn remove_dir_all_no_follow(dir: &Path) -> Result<(), crate::safefs::SafeFsError> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(crate::safefs::SafeFsError::Refused { path: dir.display().to_string(), why: "no parent directory".into() });
    };
    match Dir::open_host(parent) {
        Ok(p) => p.remove_tree(OsStr::new(name)).map(|_| ()),
        Err(crate::safefs::SafeFsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
