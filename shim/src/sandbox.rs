//! A sandbox: one VM and the connection to its agent.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_client::{AgentClient, AgentError, Transport, AGENT_PORT};
use tracing::{info, warn};
use vmm::{accel, AgentChannel, Vm, VmError, VmSpec};

use crate::config::Config;

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
}

/// The line the guest agent prints on the console once it listens on its vsock port.
pub const AGENT_READY_MARKER: &str = "KATA_RS_AGENT_READY";

pub struct Sandbox {
    pub id: String,
    pub vm: Vm,
    pub agent: AgentClient,
    pub dir: PathBuf,
    pub shared_dir: PathBuf,
    /// Launch of QEMU to the agent's first answer.
    pub boot_time: Duration,
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

    /// Boots a VM for sandbox `id` and waits for its agent.
    pub async fn start(config: &Config, id: &str) -> Result<Sandbox, SandboxError> {
        let dir = Self::dir_for(config, id);
        let shared_dir = dir.join("shared");
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
        };
        let start = Instant::now();
        let mut vm = Vm::start(spec).await?;
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
            if vm.console_tail(64 * 1024).contains(AGENT_READY_MARKER) {
                break;
            }
            if let Some(status) = vm.qemu_exited() {
                let err = SandboxError::QemuDied { status: status.to_string(), console: vm.console_log().display().to_string(), tail: console_tail(&vm) };
                vm.shutdown().await;
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
                        let err = SandboxError::QemuDied {
                            status: status.to_string(),
                            console: vm.console_log().display().to_string(),
                            tail: console_tail(&vm),
                        };
                        vm.shutdown().await;
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
                        return Err(err);
                    }
                }
            }
        };
        let boot_time = start.elapsed();
        info!(id, boot_s = boot_time.as_secs_f64(), "guest agent ready");
        Ok(Sandbox { id: id.to_string(), vm, agent, dir, shared_dir, boot_time })
    }

    /// Stops the VM and its daemons, removes the container's mounts (when given) and then the sandbox
    /// directory (never following symlinks or crossing mounts).
    pub async fn stop(self, mounts: Option<&crate::mounts::ContainerMounts>) {
        self.vm.shutdown().await;
        if let Some(m) = mounts {
            m.teardown();
        }
        if let Err(e) = remove_dir_all_no_follow(&self.dir) {
            warn!(dir = %self.dir.display(), error = %e, "removing the sandbox directory");
        }
    }
}

/// Removes a directory tree without following symlinks and without crossing into other mounts
/// (a bind-mounted rootfs below it must be unmounted first, never emptied).
pub fn remove_dir_all_no_follow(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let top = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    fn walk(p: &Path, dev: u64) -> std::io::Result<()> {
        for entry in std::fs::read_dir(p)? {
            let entry = entry?;
            let path = entry.path();
            let m = std::fs::symlink_metadata(&path)?;
            if m.is_dir() {
                if m.dev() != dev {
                    return Err(std::io::Error::other(format!("{} is a mount point; not removing it", path.display())));
                }
                walk(&path, dev)?;
                std::fs::remove_dir(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
    walk(dir, top.dev())?;
    std::fs::remove_dir(dir)
}
