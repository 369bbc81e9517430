//! The shim's runtime: everything it holds under one lock (the VM, the tasks), the service's handle on
//! it, and what every operation shares (timeouts, guest paths, exit statuses).
use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use agent_client::AgentClient;
use containerd_shim::{
    api::*,
    asynchronous::{publisher::RemotePublisher, ExitSignal},
    protos::ttrpc::{self, r#async::TtrpcContext},
};
use tokio::sync::Mutex;

use crate::{
    checkpoint::{self},
    error::TaskError,
    events::{self, Events},
    hooks, mounts, network,
    process::*,
    safefs::Dir,
    sandbox::Sandbox,
    spec,
};

/// Agent calls that last as long as the process does.
pub(crate) const LONG: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long Wait waits for the last output after a process exited; forwarders still running then are
/// aborted (their FIFOs closed), whatever the guest does.
pub(crate) const IO_DRAIN: Duration = Duration::from_secs(10);

/// How long a process has to exit after SIGKILL before the host ends it itself (the VM, or for a pod's
/// container its place in the VM).
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(10);

/// An agent that does not answer a SIGKILL within this (runc's `kill --all` within the longer one) is
/// taken for one that never will: the host ends the process itself. Above what the guest's container
/// lock may be held for by a `runc exec` under TCG.
pub(crate) const SIGNAL_CALL: Duration = Duration::from_secs(15);

pub(crate) const SIGNAL_ALL_CALL: Duration = Duration::from_secs(20);

/// The exit status the host reports for a process it ended itself (128 + SIGKILL, as runc reports it).
pub(crate) const KILLED_STATUS: u32 = 137;

pub(crate) fn agent_err(e: agent_client::AgentError) -> ttrpc::Error {
    TaskError::Agent(e).into()
}

/// The VM of this shim: one container's, or a pod's (booted by its sandbox container, joined by the
/// pod's other containers, stopped when the last of them is deleted).
pub(crate) struct PodVm {
    /// The pod's sandbox id, or the id of the container the VM is for.
    pub(crate) id: String,
    /// A pod's VM: the pod's other containers may join it.
    pub(crate) pod: bool,
    pub(crate) sandbox: Sandbox,
    /// Interfaces of QEMU's network namespace mirrored into the VM so far.
    pub(crate) network: network::Network,
    pub(crate) guest_mem_mib: u64,
}

impl PodVm {
    /// Ends the VM without waiting for the guest (its host cgroup goes with it).
    pub(crate) async fn kill(self) {
        self.sandbox.kill().await;
    }

    /// Stops the VM (its host cgroup goes with it).
    pub(crate) async fn stop(self, mounts: Option<&mounts::ContainerMounts>) {
        self.sandbox.stop(mounts).await;
    }
}

/// Everything the shim holds, under one lock.
#[derive(Default)]
pub(crate) struct Shim {
    pub(crate) vm: Option<PodVm>,
    pub(crate) tasks: HashMap<String, TaskState>,
    /// Checkpoints made in this VM so far: numbers their staging directories and logs.
    pub(crate) checkpoints: u32,
    /// A Create has reached this shim (see [`UNUSED_SHIM_EXIT`]).
    pub(crate) used: bool,
}

impl Shim {
    pub(crate) fn task_mut(&mut self, id: &str) -> Option<&mut TaskState> {
        self.tasks.get_mut(id)
    }
}

pub(crate) struct TaskState {
    pub(crate) id: String,
    pub(crate) bundle: PathBuf,
    /// Own VM, pod sandbox, or one of a pod's containers.
    pub(crate) role: spec::PodRole,
    /// The container was taken out of the VM (agent's RemoveContainer, mounts undone): its Delete only
    /// reports it.
    pub(crate) released: bool,
    pub(crate) agent: AgentClient,
    pub(crate) init: Proc,
    pub(crate) execs: HashMap<String, Proc>,
    pub(crate) mounts: mounts::ContainerMounts,
    /// The sandbox's shared directory, pinned (the guest writes there).
    pub(crate) shared: Arc<Dir>,
    /// QEMU's pid: the task pid containerd and host tools see, for the init and every exec.
    pub(crate) host_pid: u32,
    /// Images staged for the restore that Start will do.
    pub(crate) restore_staging: Option<checkpoint::Staging>,
    /// Deadline of one checkpoint/restore (configuration or the container's annotation), seconds.
    pub(crate) deadline_s: u64,
    /// The container's annotation asks every checkpoint to keep established TCP connections.
    pub(crate) open_tcp: bool,
    /// OOM kills in the container's guest cgroup already published as TaskOOM (by the OOM watch or
    /// at the init's exit, whichever saw them first).
    pub(crate) oom_seen: u64,
    /// Set when the task was created from a checkpoint: Start restores instead of starting.
    pub(crate) restore_pending: bool,
    /// True while a checkpoint runs (without the lock; claimed under it by [`CheckpointClaim`]): a
    /// second one and Delete are refused meanwhile, Pause and Resume wait for its end.
    pub(crate) checkpointing: tokio::sync::watch::Sender<bool>,
    /// Why the VM is gone, once it is (the watcher saw QEMU exit, a panic, a shutdown or a reset).
    pub(crate) vm_gone: Option<String>,
    pub(crate) guest_mem_mib: u64,
    /// The VM's host cgroup, read to bound the guest's stats.
    pub(crate) meter: crate::cgroups::HostMeter,
    /// The spec's OCI hooks (run on the host), and the spec parts their state needs.
    pub(crate) hooks: hooks::Hooks,
    pub(crate) hook_spec: serde_json::Value,
}

/// A running checkpoint's claim on its task: taken under the lock, given back when dropped (the
/// checkpoint ended, however it ended).
pub(crate) struct CheckpointClaim(tokio::sync::watch::Sender<bool>);

impl CheckpointClaim {
    /// Claims `st` for a checkpoint; None when one runs already.
    pub(crate) fn take(st: &TaskState) -> Option<Self> {
        (!st.checkpointing.send_replace(true)).then(|| CheckpointClaim(st.checkpointing.clone()))
    }
}

impl Drop for CheckpointClaim {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

impl TaskState {
    pub(crate) fn checkpoint_running(&self) -> bool {
        *self.checkpointing.borrow()
    }

    pub(crate) fn hook_state(&self, status: &str) -> Vec<u8> {
        let pid = if status == "stopped" { 0 } else { self.host_pid };
        hooks::state_json(&self.hook_spec, &self.id, status, pid, &self.bundle.display().to_string())
    }

    pub(crate) fn proc_mut(&mut self, exec_id: &str) -> ttrpc::Result<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| TaskError::not_found(format!("exec {exec_id} of {} not found", self.id)))
    }
}

#[derive(Clone)]
pub struct TaskService {
    pub(crate) state: Arc<Mutex<Shim>>,
    /// Create requests while their VM boots or their container is made (the state lock is not held
    /// meanwhile): State answers "created" for them, a second Create of the same id is refused.
    pub(crate) creating: Arc<std::sync::Mutex<HashMap<String, CreateTaskRequest>>>,
    pub(crate) events: Events,
    pub(crate) exit: Arc<ExitSignal>,
    /// Held while the host ends a VM itself ([`Self::force_exit`]): Shutdown waits for it.
    pub(crate) ending: Arc<Mutex<()>>,
}

/// Mirrors new interfaces of QEMU's namespace into the VM and has the agent configure them all.
pub(crate) async fn sync_network(net: &mut network::Network, vm: &vmm::Vm, agent: &AgentClient, cid: &str) -> ttrpc::Result<()> {
    match net.sync(vm, cid).await {
        Ok(None) => Ok(()),
        Ok(Some(r)) => {
            agent.call_default("UpdateNetwork", |c, ctx| async move { c.update_network(ctx, &r).await }).await.map_err(agent_err)?;
            Ok(())
        }
        Err(e @ network::NetworkError::TooMany { .. }) => Err(TaskError::invalid(e.to_string())),
        Err(e) => Err(TaskError::internal(e.to_string())),
    }
}

/// A shim that no Create has reached this long after it started exits by itself. containerd 2.x starts
/// the shim before it checks the runtime's features (`-info`) and, when the check fails (a spec with
/// idmapped mounts), returns without ending the shim (containerd's `TaskManager.Create`); nothing else
/// would end it.
pub(crate) const UNUSED_SHIM_EXIT: Duration = Duration::from_secs(30);

/// The shared directory and CRIU's work directories as the guest sees them.
pub(crate) const GUEST_SHARED: &str = "/run/kata-rs/shared";

pub(crate) const GUEST_WORK: &str = "/run/kata-rs/work";

/// Exit status reported for a task whose restore failed (it never ran in this VM).
pub(crate) const RESTORE_FAILED_STATUS: u32 = 255;

/// Exit status reported for the processes of a VM that went away (QEMU exited, the guest panicked).
pub(crate) const VM_GONE_STATUS: u32 = 255;

/// The shim's report of a checkpoint, written beside the images and next to the bundle.
pub(crate) const STATS_FILE: &str = "kata-rs-checkpoint-stats.json";

/// The caller's own deadline for this request, which containerd passes on as the ttrpc timeout.
pub(crate) fn request_deadline(ctx: &TtrpcContext) -> Option<Duration> {
    (ctx.timeout_nano > 0).then(|| Duration::from_nanos(ctx.timeout_nano as u64))
}

/// Images can hold at most guest memory plus file contents: bound them at twice the guest memory + 1 GiB.
pub(crate) fn max_image_bytes(guest_mem_mib: u64) -> u64 {
    (guest_mem_mib * 2 + 1024) << 20
}

impl TaskService {
    pub fn new(publisher: RemotePublisher, namespace: String, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            state: Arc::new(Mutex::new(Shim::default())),
            creating: Arc::default(),
            events: Events::new(events::Containerd { publisher, namespace }),
            exit,
            ending: Arc::default(),
        }
    }

    /// Ends the shim at `after` if no Create has reached it by then ([`UNUSED_SHIM_EXIT`]).
    pub fn exit_if_unused(&self, after: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let g = me.state.lock().await;
            if !g.used && g.tasks.is_empty() && g.vm.is_none() && me.creating_lock().is_empty() {
                tracing::warn!(after = ?after, "no Create reached this shim since it started: it exits (containerd refused the task before creating it?)");
                drop(g);
                me.exit.signal();
            }
        });
    }

    pub(crate) fn creating_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CreateTaskRequest>> {
        self.creating.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error for a call on a task this shim does not hold: "being created" while its VM boots (so
    /// that containerd does not take it for gone), else not found.
    pub(crate) fn no_task(&self, id: &str) -> ttrpc::Error {
        if self.creating_lock().contains_key(id) {
            TaskError::precondition(format!("task {id} is being created (its VM is booting); try again when Create has returned"))
        } else {
            TaskError::not_found(format!("task {id} not found"))
        }
    }

    pub(crate) async fn agent_of(&self, id: &str) -> ttrpc::Result<(AgentClient, String)> {
        let g = self.state.lock().await;
        let st = g.tasks.get(id).ok_or_else(|| self.no_task(id))?;
        Ok((st.agent.clone(), st.id.clone()))
    }
}
