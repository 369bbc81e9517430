//! containerd's task service (API v2): one VM per shim, holding one container (its own VM) or every
//! container of a Kubernetes pod (the VM its sandbox container booted).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agent_client::{agent as ag, AgentClient};
use async_trait::async_trait;
use containerd_shim::{
    api::*,
    asynchronous::{publisher::RemotePublisher, ExitSignal},
    protos::{
        events::task::*,
        protobuf::well_known_types::timestamp::Timestamp,
        shim_async::Task,
        topics::*,
        ttrpc::{self, r#async::TtrpcContext},
    },
    util::{convert_to_any, timestamp},
};
use tokio::{
    sync::{watch, Mutex},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    cgroups,
    checkpoint::{self, Staging, CHECKPOINT_DIR},
    config::Config,
    error::TaskError,
    events::{self, Events},
    hooks, mounts, network,
    safefs::Dir,
    sandbox::Sandbox,
    spec, stdio,
};

/// Agent calls that last as long as the process does.
const LONG: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long Wait waits for the last output after a process exited; forwarders still running then are
/// aborted (their FIFOs closed), whatever the guest does.
const IO_DRAIN: Duration = Duration::from_secs(10);
/// How long a process has to exit after SIGKILL before the host ends it itself (the VM, or for a pod's
/// container its place in the VM).
const KILL_GRACE: Duration = Duration::from_secs(10);
/// An agent that does not answer a SIGKILL within this (runc's `kill --all` within the longer one) is
/// taken for one that never will: the host ends the process itself. Above what the guest's container
/// lock may be held for by a `runc exec` under TCG.
const SIGNAL_CALL: Duration = Duration::from_secs(15);
const SIGNAL_ALL_CALL: Duration = Duration::from_secs(20);
/// The exit status the host reports for a process it ended itself (128 + SIGKILL, as runc reports it).
const KILLED_STATUS: u32 = 137;

fn agent_err(e: agent_client::AgentError) -> ttrpc::Error {
    TaskError::Agent(e).into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PStatus {
    Created,
    /// Start is running (runc start or exec in the guest); reported as created.
    Starting,
    /// Start of a task created from a checkpoint is restoring it; reported as created.
    Restoring,
    Running,
    Paused,
    Stopped,
}

/// Only a created process can be started.
fn can_start(id: &str, exec_id: &str, status: PStatus) -> Result<(), TaskError> {
    match status {
        PStatus::Created => Ok(()),
        PStatus::Starting | PStatus::Restoring => Err(TaskError::Precondition(format!("process {id}/{exec_id} is already being started"))),
        _ => Err(TaskError::Precondition(format!("process {id}/{exec_id} is not in the created state"))),
    }
}

/// A process can be deleted when it has not started or has stopped; never while it starts, runs or restores.
fn can_delete(id: &str, status: PStatus) -> Result<(), TaskError> {
    match status {
        PStatus::Created | PStatus::Stopped => Ok(()),
        PStatus::Starting | PStatus::Restoring => Err(TaskError::Precondition(format!("{id} is being started; delete it when its start has ended"))),
        PStatus::Running | PStatus::Paused => Err(TaskError::Precondition(format!("{id} is still running; kill it first"))),
    }
}

type ExitInfo = Option<(u32, Timestamp)>;

/// Waits until a process's exit is recorded: the exit, or `None` when its state is gone.
async fn wait_exit(mut rx: watch::Receiver<ExitInfo>) -> ExitInfo {
    loop {
        if let Some(e) = rx.borrow_and_update().clone() {
            return Some(e);
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

struct Proc {
    /// The guest's pid of the process: for the shim's logs only, never given to containerd.
    guest_pid: u32,
    status: PStatus,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// Exec processes: the OCI process (JSON), kept until Start.
    spec: Vec<u8>,
    exit_tx: Arc<watch::Sender<ExitInfo>>,
    exit_rx: watch::Receiver<ExitInfo>,
    io: Vec<JoinHandle<()>>,
    /// The stdin forwarder (it ends with containerd's stdin, not with the process): aborted at the exit.
    stdin_io: Option<JoinHandle<()>>,
    /// Tells the stdin forwarder that containerd closed stdin (CloseIO): taken by the first CloseIO.
    stdin_close: Option<tokio::sync::oneshot::Sender<()>>,
    /// The host is ending this process (the guest would not): its exit is [`KILLED_STATUS`], whoever
    /// reports it first.
    ended_by_host: bool,
    /// The guest answered WaitProcess: the exit is recorded once the output has drained (the kill
    /// watchdog does not end a process that is only draining).
    guest_reported_exit: bool,
}

impl Proc {
    fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Proc {
        let (tx, rx) = watch::channel(None);
        Proc {
            guest_pid: 0,
            status: PStatus::Created,
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
            spec: vec![],
            exit_tx: Arc::new(tx),
            exit_rx: rx,
            io: vec![],
            stdin_io: None,
            stdin_close: None,
            ended_by_host: false,
            guest_reported_exit: false,
        }
    }

    fn start_io(&mut self, agent: &AgentClient, cid: &str, exec_id: &str) {
        let a = || agent.clone();
        self.io.push(tokio::spawn(stdio::forward_output(a(), cid.into(), exec_id.into(), self.stdout.clone(), false)));
        self.io.push(tokio::spawn(stdio::forward_output(a(), cid.into(), exec_id.into(), self.stderr.clone(), true)));
        if !self.stdin.is_empty() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.stdin_close = Some(tx);
            self.stdin_io = Some(tokio::spawn(stdio::forward_input(a(), cid.into(), exec_id.into(), self.stdin.clone(), rx)));
        }
    }

    /// Ends the stdio forwarders still running: containerd's FIFOs are closed.
    fn abort_io(&mut self) {
        for h in self.io.drain(..).chain(self.stdin_io.take()) {
            h.abort();
        }
    }
}

/// The VM of this shim: one container's, or a pod's (booted by its sandbox container, joined by the
/// pod's other containers, stopped when the last of them is deleted).
struct PodVm {
    /// The pod's sandbox id, or the id of the container the VM is for.
    id: String,
    /// A pod's VM: the pod's other containers may join it.
    pod: bool,
    sandbox: Sandbox,
    /// Interfaces of QEMU's network namespace mirrored into the VM so far.
    network: network::Network,
    guest_mem_mib: u64,
}

impl PodVm {
    /// Ends the VM without waiting for the guest (its host cgroup goes with it).
    async fn kill(self) {
        self.sandbox.kill().await;
    }

    /// Stops the VM (its host cgroup goes with it).
    async fn stop(self, mounts: Option<&mounts::ContainerMounts>) {
        self.sandbox.stop(mounts).await;
    }
}

/// Everything the shim holds, under one lock.
#[derive(Default)]
struct Shim {
    vm: Option<PodVm>,
    tasks: HashMap<String, TaskState>,
    /// Checkpoints made in this VM so far: numbers their staging directories and logs.
    checkpoints: u32,
}

impl Shim {
    fn task_mut(&mut self, id: &str) -> Option<&mut TaskState> {
        self.tasks.get_mut(id)
    }
}

struct TaskState {
    id: String,
    bundle: PathBuf,
    /// Own VM, pod sandbox, or one of a pod's containers.
    role: spec::PodRole,
    /// The container was taken out of the VM (agent's RemoveContainer, mounts undone): its Delete only
    /// reports it.
    released: bool,
    agent: AgentClient,
    init: Proc,
    execs: HashMap<String, Proc>,
    mounts: mounts::ContainerMounts,
    /// The sandbox's shared directory, pinned (the guest writes there).
    shared: Arc<Dir>,
    /// QEMU's pid: the task pid containerd and host tools see, for the init and every exec.
    host_pid: u32,
    /// Images staged for the restore that Start will do.
    restore_staging: Option<checkpoint::Staging>,
    /// Deadline of one checkpoint/restore (configuration or the container's annotation), seconds.
    deadline_s: u64,
    /// The container's annotation asks every checkpoint to keep established TCP connections.
    open_tcp: bool,
    /// Set when the task was created from a checkpoint: Start restores instead of starting.
    restore_pending: bool,
    /// A checkpoint runs (without the lock): a second one and Delete are refused meanwhile.
    checkpointing: bool,
    /// Why the VM is gone, once it is (the watcher saw QEMU exit, a panic, a shutdown or a reset).
    vm_gone: Option<String>,
    guest_mem_mib: u64,
    /// The VM's host cgroup, read to bound the guest's stats.
    meter: crate::cgroups::HostMeter,
    /// The spec's OCI hooks (run on the host), and the spec parts their state needs.
    hooks: hooks::Hooks,
    hook_spec: serde_json::Value,
}

impl TaskState {
    fn hook_state(&self, status: &str) -> Vec<u8> {
        let pid = if status == "stopped" { 0 } else { self.host_pid };
        hooks::state_json(&self.hook_spec, &self.id, status, pid, &self.bundle.display().to_string())
    }

    fn proc_mut(&mut self, exec_id: &str) -> ttrpc::Result<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| TaskError::not_found(format!("exec {exec_id} of {} not found", self.id)))
    }
}

#[derive(Clone)]
pub struct TaskService {
    state: Arc<Mutex<Shim>>,
    /// Create requests while their VM boots or their container is made (the state lock is not held
    /// meanwhile): State answers "created" for them, a second Create of the same id is refused.
    creating: Arc<std::sync::Mutex<HashMap<String, CreateTaskRequest>>>,
    events: Events,
    exit: Arc<ExitSignal>,
    /// Held while the host ends a VM itself ([`Self::force_exit`]): Shutdown waits for it.
    ending: Arc<Mutex<()>>,
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

    fn creating_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CreateTaskRequest>> {
        self.creating.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error for a call on a task this shim does not hold: "being created" while its VM boots (so
    /// that containerd does not take it for gone), else not found.
    fn no_task(&self, id: &str) -> ttrpc::Error {
        if self.creating_lock().contains_key(id) {
            TaskError::precondition(format!("task {id} is being created (its VM is booting); try again when Create has returned"))
        } else {
            TaskError::not_found(format!("task {id} not found"))
        }
    }


    /// Waits for a started process to exit, lets its output drain, then records and publishes the exit.
    fn spawn_waiter(&self, agent: AgentClient, cid: String, exec_id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let req = ag::ProcessRequest { container_id: cid.clone(), exec_id: exec_id.clone(), ..Default::default() };
            let (code, reported) = match agent.call("WaitProcess", LONG, |c, ctx| async move { c.wait_process(ctx, &req).await }).await {
                Ok(r) => {
                    if r.oom_killed && exec_id.is_empty() {
                        // Before its exit, as runc's shim does: containerd's CRI then gives the
                        // container the reason OOMKilled.
                        info!(cid, "the guest kernel OOM-killed a process of the container");
                        me.events.queue(TASK_OOM_EVENT_TOPIC, Box::new(TaskOOM { container_id: cid.clone(), ..Default::default() }));
                    }
                    (r.exit_status as u32, true)
                }
                Err(e) => {
                    warn!(cid, exec_id, error = %e, "lost the process (VM gone?); reporting exit 255");
                    (255, false)
                }
            };
            let io = {
                let mut g = me.state.lock().await;
                let Some(st) = g.task_mut(&cid) else { return };
                let Ok(p) = st.proc_mut(&exec_id) else { return };
                p.guest_reported_exit = reported;
                std::mem::take(&mut p.io)
            };
            // One bound for all of the process's output.
            let deadline = tokio::time::Instant::now() + IO_DRAIN;
            for mut h in io {
                if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
                    warn!(cid, exec_id, "the process's output did not end within {IO_DRAIN:?} of its exit: its forwarder is aborted");
                    h.abort();
                }
            }
            me.record_exit(&cid, &exec_id, code).await;
        });
    }

    /// Records a process's exit and publishes it, once: whichever of its waiter and the VM watcher
    /// comes first reports it.
    async fn record_exit(&self, cid: &str, exec_id: &str, code: u32) {
        let mut g = self.state.lock().await;
        let Some(st) = g.task_mut(cid) else { return };
        let host_pid = st.host_pid;
        let Ok(p) = st.proc_mut(exec_id) else { return };
        if p.exit_rx.borrow().is_some() {
            return;
        }
        let code = if p.ended_by_host { KILLED_STATUS } else { code };
        p.abort_io();
        self.commit_exit(p, cid, exec_id, host_pid, code);
        drop(g);
        info!(cid, exec_id, code, "process exited");
    }

    /// The one place a process becomes Stopped (under the shim's lock): its exit is kept for Wait,
    /// State and Delete, and its TaskExit queued after every event of the process before it.
    fn commit_exit(&self, p: &mut Proc, cid: &str, exec_id: &str, host_pid: u32, code: u32) {
        let ts = timestamp().unwrap_or_default();
        p.status = PStatus::Stopped;
        let _ = p.exit_tx.send(Some((code, ts.clone())));
        let id = if exec_id.is_empty() { cid } else { exec_id };
        self.events.queue(
            TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit { container_id: cid.into(), id: id.into(), pid: host_pid, exit_status: code, exited_at: Some(ts).into(), ..Default::default() }),
        );
    }

    /// After a SIGKILL: the process exits within [`KILL_GRACE`], or the host ends it ([`Self::force_exit`]).
    fn spawn_kill_watchdog(&self, cid: String, exec_id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let rx = {
                let mut g = me.state.lock().await;
                let Some(st) = g.task_mut(&cid) else { return };
                let Ok(p) = st.proc_mut(&exec_id) else { return };
                p.exit_rx.clone()
            };
            if tokio::time::timeout(KILL_GRACE, wait_exit(rx)).await.is_err() {
                me.force_exit(&cid, &exec_id, &format!("it did not exit within {KILL_GRACE:?} of SIGKILL")).await;
            }
        });
    }

    /// Ends a process the guest will not end, from the host, and reports it exited ([`KILLED_STATUS`]):
    /// an exec is reported exited (its output forwarders end); a pod container is taken out of the VM
    /// (its mounts in the shared directory are revoked, the agent is asked to remove it); the init of a
    /// VM's own container or of a pod's sandbox ends the VM (QMP quit, then SIGKILL), and with it every
    /// process in it.
    async fn force_exit(&self, cid: &str, exec_id: &str, why: &str) {
        // Exited already (or only draining its output): nothing to end.
        let gone = |p: &Proc| p.exit_rx.borrow().is_some() || p.guest_reported_exit;
        if !exec_id.is_empty() {
            {
                let mut g = self.state.lock().await;
                let Some(p) = g.task_mut(cid).and_then(|st| st.execs.get_mut(exec_id)) else { return };
                if gone(p) {
                    return;
                }
                p.ended_by_host = true;
            }
            warn!(cid, exec_id, why, "the host reports the exec exited ({KILLED_STATUS})");
            self.record_exit(cid, exec_id, KILLED_STATUS).await;
            return;
        }
        let pod_container = {
            let g = self.state.lock().await;
            let Some(st) = g.tasks.get(cid) else { return };
            if gone(&st.init) {
                return;
            }
            let others = g.tasks.iter().any(|(k, t)| k != cid && !t.released);
            matches!(st.role, spec::PodRole::Container(_)) && others
        };
        if pod_container {
            warn!(cid, why, "the host takes the container out of the pod's VM and revokes its mounts");
            let (agent, execs) = {
                let mut g = self.state.lock().await;
                let Some(st) = g.task_mut(cid) else { return };
                if gone(&st.init) {
                    return; // it exited meanwhile
                }
                st.init.ended_by_host = true;
                let mut execs = vec![];
                for (k, p) in st.execs.iter_mut().filter(|(_, p)| p.exit_rx.borrow().is_none()) {
                    p.ended_by_host = true;
                    execs.push(k.clone());
                }
                if !st.released {
                    st.released = true;
                    st.mounts.teardown_in_running_vm(&st.shared);
                    if let Some(s) = st.restore_staging.take() {
                        s.remove();
                    }
                }
                (st.agent.clone(), execs)
            };
            for e in &execs {
                self.record_exit(cid, e, KILLED_STATUS).await;
            }
            self.record_exit(cid, "", KILLED_STATUS).await;
            let req = ag::ContainerRequest { container_id: cid.to_string(), ..Default::default() };
            if let Err(e) = agent.call("RemoveContainer", SIGNAL_ALL_CALL, |c, ctx| async move { c.remove_container(ctx, &req).await }).await {
                warn!(cid, error = %e, "the agent did not remove the container (its mounts are revoked already)");
            }
            return;
        }
        let (vm, ids) = {
            let mut g = self.state.lock().await;
            let reason = format!("ended by the host: {cid} {why}");
            let mut ids: Vec<(String, String)> = vec![];
            for st in g.tasks.values_mut() {
                st.vm_gone = Some(reason.clone());
                for (k, p) in st.execs.iter_mut().filter(|(_, p)| p.exit_rx.borrow().is_none()) {
                    p.ended_by_host = true;
                    ids.push((st.id.clone(), k.clone()));
                }
                if st.init.exit_rx.borrow().is_none() {
                    st.init.ended_by_host = true;
                    ids.push((st.id.clone(), String::new()));
                }
            }
            (g.vm.take(), ids)
        };
        warn!(cid, why, processes = ids.len(), "the host ends the VM");
        // Once QEMU is gone the waiters may report the exits, containerd delete the tasks and shut the
        // shim down: Shutdown waits for this guard, so the VM's directory and cgroup are gone first.
        if let Some(vm) = vm {
            let _ending = self.ending.lock().await;
            vm.kill().await;
        }
        for (c, e) in ids {
            self.record_exit(&c, &e, KILLED_STATUS).await;
        }
    }

    /// Waits for the sandbox's VM to go away by itself (not a stop the shim asked for): every process of
    /// it is then reported exited, with the reason and the console's end in the log.
    fn spawn_vm_watch(&self, mut gone: watch::Receiver<Option<String>>) {
        let me = self.clone();
        tokio::spawn(async move {
            let reason = loop {
                if let Some(r) = gone.borrow_and_update().clone() {
                    break r;
                }
                if gone.changed().await.is_err() {
                    return; // stopped by the shim
                }
            };
            let (ids, tail) = {
                let mut g = me.state.lock().await;
                let live = |p: &Proc| matches!(p.status, PStatus::Running | PStatus::Paused | PStatus::Starting | PStatus::Restoring);
                let mut ids: Vec<(String, String)> = vec![];
                for st in g.tasks.values_mut() {
                    st.vm_gone = Some(reason.clone());
                    ids.extend(st.execs.iter().filter(|(_, p)| live(p)).map(|(k, _)| (st.id.clone(), k.clone())));
                    if live(&st.init) {
                        ids.push((st.id.clone(), String::new()));
                    }
                }
                (ids, g.vm.as_ref().map(|v| v.sandbox.vm.console_tail(2000)).unwrap_or_default())
            };
            warn!(reason, processes = ids.len(), console_tail = %tail, "the VM is gone: its processes are reported exited ({VM_GONE_STATUS}); the guest console's end follows");
            for (cid, exec_id) in ids {
                me.record_exit(&cid, &exec_id, VM_GONE_STATUS).await;
            }
        });
    }

    /// A new VM for a container of its own or a pod's sandbox container: the sandbox directory, the
    /// container's mounts, the boot, then the container in it and the namespace's interfaces.
    async fn create_with_vm(&self, req: &CreateTaskRequest, c: Parsed) -> ttrpc::Result<(PodVm, TaskState)> {
        let mut config = c.config.clone();
        if let spec::PodRole::Sandbox(_) = c.role {
            let h = &config.hypervisor;
            let (mem, cpus) = spec::pod_size(&c.spec_json, h.memory_mib, h.vcpus, MAX_POD_MEMORY_MIB, MAX_POD_VCPUS)
                .map_err(|e| TaskError::invalid(format!("{}/config.json: {e}", req.bundle)))?;
            info!(memory_mib = mem, vcpus = cpus, base_memory_mib = h.memory_mib, base_vcpus = h.vcpus, "pod VM size: the base plus the pod's limits");
            config.hypervisor.memory_mib = mem;
            config.hypervisor.vcpus = cpus;
        }
        let mut prepared = Sandbox::prepare(&config, c.role.group(&req.id)).map_err(|e| TaskError::internal(e.to_string()))?;
        prepared.netns = spec::network_namespace(&c.spec_json);
        // Every VM runs in a host cgroup with a memory limit: the spec's (a pod's, below the kubelet's
        // pod cgroup: its accounting and limits cover the VM), else one of kata-rs's own.
        let cgroup_path = c.spec_json.pointer("/linux/cgroupsPath").and_then(serde_json::Value::as_str).filter(|p| !p.is_empty());
        let cgroup_path = cgroup_path.map(str::to_string).unwrap_or_else(|| format!("/kata-rs/{}", c.role.group(&req.id)));
        if let Err(e) = cgroups::relative_path(&cgroup_path) {
            prepared.discard();
            return Err(TaskError::invalid(e.to_string()));
        }
        let mem = config.hypervisor.memory_mib as u64;
        prepared.cgroup = Some((cgroup_path, cgroups::vm_memory_limit(mem, crate::sandbox::shared_dir_bytes(mem))));
        info!(netns = ?prepared.netns, "QEMU's network namespace");
        let mounts = match mounts::ContainerMounts::setup(&c.bundle, &req.rootfs, &c.adapted.volumes, prepared.shared(), &req.id) {
            Ok(m) => m,
            Err(e) => {
                prepared.discard();
                return Err(mount_err(e));
            }
        };
        let sandbox = match Sandbox::boot(&config, prepared).await {
            Ok(s) => s,
            Err(e) => {
                mounts.teardown();
                return Err(TaskError::internal(e.to_string()));
            }
        };
        let (agent, shared, qemu_pid, mem) = (sandbox.agent.clone(), sandbox.shared.clone(), sandbox.vm.qemu_pid(), config.hypervisor.memory_mib as u64);
        let network = network::Network::default();
        let vm = PodVm {
            id: c.role.group(&req.id).to_string(),
            pod: matches!(c.role, spec::PodRole::Sandbox(_)),
            sandbox,
            network,
            guest_mem_mib: mem,
        };
        let mut st = match self.create_in_vm(req, c, agent.clone(), shared, qemu_pid, mem, mounts).await {
            Ok(st) => st,
            Err((e, mounts)) => {
                warn!(id = %req.id, error = %e, console_tail = %vm.sandbox.vm.console_tail(4000), "create failed; the guest console's end follows");
                vm.stop(Some(&mounts)).await;
                return Err(e);
            }
        };
        st.meter = vm.sandbox.meter();
        // Interfaces already in the namespace (CRI's pod network, a createRuntime hook's) reach the
        // container now; later ones (ctr run --cni) at Start.
        let mut vm = vm;
        if let Err(e) = sync_network(&mut vm.network, &vm.sandbox.vm, &agent, &req.id).await {
            vm.stop(Some(&st.mounts)).await;
            return Err(e);
        }
        Ok((vm, st))
    }

    /// One of a pod's containers, in the VM its sandbox container booted: mounts made in the running
    /// VM's shared directory (through pinned descriptors: the guest writes there), then the container.
    async fn create_in_pod(&self, req: &CreateTaskRequest, c: Parsed) -> ttrpc::Result<TaskState> {
        let (agent, shared, host_pid, mem, meter) = {
            let g = self.state.lock().await;
            let vm = g.vm.as_ref().ok_or_else(|| TaskError::precondition(format!("container {}: its pod's VM is gone", req.id)))?;
            (vm.sandbox.agent.clone(), vm.sandbox.shared.clone(), vm.sandbox.vm.qemu_pid(), vm.guest_mem_mib, vm.sandbox.meter())
        };
        let mounts = mounts::ContainerMounts::setup(&c.bundle, &req.rootfs, &c.adapted.volumes, &shared, &req.id).map_err(mount_err)?;
        let shared2 = shared.clone();
        match self.create_in_vm(req, c, agent, shared, host_pid, mem, mounts).await {
            Ok(st) => Ok(TaskState { meter, ..st }),
            Err((e, mut mounts)) => {
                mounts.teardown_in_running_vm(&shared2);
                Err(e)
            }
        }
    }

    /// The container in a running VM: a restore's images staged, the createRuntime and prestart hooks,
    /// the agent's CreateContainer. On failure the mounts come back for the caller to undo.
    #[allow(clippy::too_many_arguments)]
    async fn create_in_vm(
        &self,
        req: &CreateTaskRequest,
        c: Parsed,
        agent: AgentClient,
        shared: Arc<Dir>,
        host_pid: u32,
        guest_mem_mib: u64,
        mounts: mounts::ContainerMounts,
    ) -> Result<TaskState, (ttrpc::Error, mounts::ContainerMounts)> {
        let restore = !req.checkpoint.is_empty();
        let mut restore_staging = None;
        if restore {
            // Images from containerd (trusted, but bounded all the same) into the guest-writable shared
            // directory, through pinned descriptors: nothing the guest placed there is followed.
            let limits = checkpoint::image_limits(max_image_bytes(guest_mem_mib));
            let (shared, from_path, id) = (shared.clone(), PathBuf::from(&req.checkpoint), req.id.clone());
            // Blocking file I/O of up to gigabytes: off the async workers, so other calls still answer.
            let staged = tokio::task::spawn_blocking(move || {
                Staging::for_restore(&shared, &id).and_then(|st| {
                    let from = Dir::open_host(&from_path)?;
                    let r = crate::safefs::copy_tree(&from, &st.dir, limits);
                    if r.is_err() {
                        st.remove();
                    }
                    r.map(|_| st)
                })
            })
            .await
            .unwrap_or_else(|e| Err(crate::safefs::SafeFsError::Io { path: req.checkpoint.clone(), source: std::io::Error::other(e.to_string()) }));
            match staged {
                Ok(st) => restore_staging = Some(st),
                Err(e) => return Err((TaskError::invalid(format!("staging checkpoint {} for the guest: {e}", req.checkpoint)), mounts)),
            }
        }
        let unstage = |s: &Option<Staging>| {
            if let Some(s) = s {
                s.remove();
            }
        };
        // createRuntime, then prestart: the VM runs (their state's pid is QEMU's), the container is not
        // created yet.
        let state = hooks::state_json(&c.hook_spec, &req.id, "creating", host_pid, &req.bundle);
        for (point, list) in [("createRuntime", &c.hooks.create_runtime), ("prestart", &c.hooks.prestart)] {
            if let Err(e) = hooks::run_all(point, list, &state).await {
                unstage(&restore_staging);
                return Err((TaskError::precondition(e.to_string()), mounts));
            }
        }
        let (sandbox_id, sandbox_namespaces) = match &c.role {
            spec::PodRole::Own => (String::new(), vec![]),
            spec::PodRole::Sandbox(s) => (s.clone(), vec![]),
            spec::PodRole::Container(s) => (s.clone(), c.adapted.dropped_namespace_paths.clone()),
        };
        let creq = ag::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec: c.adapted.spec,
            rootfs: format!("{GUEST_SHARED}/{}/rootfs", req.id),
            for_restore: restore,
            sandbox_id,
            sandbox_namespaces,
            ..Default::default()
        };
        let guest_pid = match agent.call_default("CreateContainer", |cl, ctx| async move { cl.create_container(ctx, &creq).await }).await {
            Ok(r) => r.pid,
            Err(e) => {
                unstage(&restore_staging);
                return Err((agent_err(e), mounts));
            }
        };
        let mut init = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        init.guest_pid = guest_pid;
        init.start_io(&agent, &req.id, "");
        Ok(TaskState {
            id: req.id.clone(),
            bundle: c.bundle,
            role: c.role,
            released: false,
            agent,
            init,
            execs: HashMap::new(),
            mounts,
            shared,
            host_pid,
            restore_staging,
            deadline_s: c.deadline_s,
            open_tcp: c.open_tcp,
            restore_pending: restore,
            checkpointing: false,
            vm_gone: None,
            guest_mem_mib,
            meter: Default::default(),
            hooks: c.hooks,
            hook_spec: c.hook_spec,
        })
    }

    /// Takes task `id` out of the VM, once: the agent removes its container and its mounts are undone;
    /// the VM stops when no other task is left in it. The task stays listed (for Delete to report).
    async fn release(g: &mut Shim, id: &str, creating: bool) {
        // A container being created in the VM counts: the VM stays for it.
        let others = creating || g.tasks.iter().any(|(k, t)| k != id && !t.released);
        let Some(st) = g.tasks.get_mut(id) else {
            return;
        };
        if st.released {
            return;
        }
        st.released = true;
        // Images staged for a restore that never ran (deleted before Start).
        if let Some(s) = st.restore_staging.take() {
            s.remove();
        }
        if st.vm_gone.is_none() {
            let req = ag::ContainerRequest { container_id: st.id.clone(), ..Default::default() };
            if let Err(e) = st.agent.call("RemoveContainer", Duration::from_secs(30), |c, ctx| async move { c.remove_container(ctx, &req).await }).await {
                warn!(id, error = %e, "the agent could not remove the container");
            }
        }
        if others {
            st.mounts.teardown_in_running_vm(&st.shared);
        } else if let Some(vm) = g.vm.take() {
            let id = vm.id.clone();
            vm.stop(Some(&st.mounts)).await;
            info!(vm = %id, "VM stopped: no task left in it");
        } else {
            st.mounts.teardown();
        }
    }
}

/// What Create reads from the bundle and the configuration before anything is made.
struct Parsed {
    config: Config,
    bundle: PathBuf,
    role: spec::PodRole,
    adapted: spec::Adapted,
    spec_json: serde_json::Value,
    deadline_s: u64,
    open_tcp: bool,
    hooks: hooks::Hooks,
    hook_spec: serde_json::Value,
}

/// A pod's VM at most: 256 GiB and 64 vCPUs, whatever limits the pod asks for.
const MAX_POD_MEMORY_MIB: u32 = 256 << 10;
const MAX_POD_VCPUS: u32 = 64;

fn mount_err(e: mounts::MountError) -> ttrpc::Error {
    match e {
        e @ mounts::MountError::VolumeSource { .. } => TaskError::invalid(e.to_string()),
        e => TaskError::internal(e.to_string()),
    }
}

fn parse_create(req: &CreateTaskRequest) -> ttrpc::Result<Parsed> {
    if !req.checkpoint.is_empty() && !Path::new(&req.checkpoint).join("inventory.img").is_file() {
        return Err(TaskError::invalid(format!("checkpoint {} holds no CRIU images (no inventory.img)", req.checkpoint)));
    }
    let explicit = match req.options.as_ref() {
        Some(o) => crate::config::config_path_from_options(&o.type_url, &o.value).map_err(|e| TaskError::invalid(e))?,
        None => None,
    };
    let config = Config::discover(explicit.as_deref()).map_err(|e| TaskError::invalid(e.to_string()))?;
    let bundle = PathBuf::from(&req.bundle);
    if let Some(p) = &explicit {
        std::fs::write(bundle.join(crate::shimcmd::CONFIG_PATH_FILE), p.as_os_str().as_encoded_bytes())
            .map_err(|e| TaskError::internal(format!("{}: {e}", bundle.display())))?;
    }
    let bad = |e: String| TaskError::invalid(format!("{}/config.json: {e}", req.bundle));
    let raw = std::fs::read(bundle.join("config.json")).map_err(|e| bad(e.to_string()))?;
    let spec_json: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    let role = spec::pod_role(&spec_json, &req.id).map_err(|e| bad(e.to_string()))?;
    let adapted = spec::adapt_for_guest(&raw, &format!("{GUEST_SHARED}/{}", req.id)).map_err(|e| bad(e.to_string()))?;
    let deadline_s = checkpoint::deadline_from_spec(&spec_json, config.runtime.checkpoint_deadline_s)?;
    let open_tcp = checkpoint::open_tcp_from_spec(&spec_json)?;
    let hooks = hooks::Hooks::from_spec(&spec_json).map_err(|e| bad(e.to_string()))?;
    if !hooks.not_run.is_empty() {
        warn!(hooks = ?hooks.not_run, "these hooks would run in the container's namespaces, which are in the VM: not run");
    }
    let hook_spec = serde_json::json!({"ociVersion": spec_json.get("ociVersion"), "annotations": spec_json.get("annotations")});
    if !adapted.dropped_mounts.is_empty() || !adapted.dropped_namespace_paths.is_empty() {
        warn!(mounts = ?adapted.dropped_mounts, namespaces = ?adapted.dropped_namespace_paths, ?role, "host-only parts of the spec are not available in the VM (a pod's namespaces are joined in the VM)");
    }
    if !adapted.volumes.is_empty() {
        info!(volumes = ?adapted.volumes.iter().map(|v| (&v.source, &v.destination, v.readonly)).collect::<Vec<_>>(), "volumes (host bind mounts) shared with the VM");
    }
    Ok(Parsed { config, bundle, role, adapted, spec_json, deadline_s, open_tcp, hooks, hook_spec })
}

/// Mirrors new interfaces of QEMU's namespace into the VM and has the agent configure them all.
async fn sync_network(net: &mut network::Network, vm: &vmm::Vm, agent: &AgentClient, cid: &str) -> ttrpc::Result<()> {
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

/// Only a running or paused task can be checkpointed (containerd pauses before it checkpoints).
fn checkpointable(id: &str, status: PStatus, restore_pending: bool) -> Result<(), TaskError> {
    match status {
        PStatus::Running | PStatus::Paused => Ok(()),
        PStatus::Created if restore_pending => {
            Err(TaskError::Precondition(format!("task {id} is Created (from a checkpoint, not yet restored): start it before checkpointing it")))
        }
        PStatus::Starting | PStatus::Restoring => Err(TaskError::Precondition(format!("task {id} is being started: checkpoint it once it runs"))),
        PStatus::Created => {
            Err(TaskError::Precondition(format!("task {id} is Created: start it before checkpointing it; only a running or paused task can be checkpointed")))
        }
        PStatus::Stopped => Err(TaskError::Precondition(format!("task {id} is Stopped: only a running or paused task can be checkpointed"))),
    }
}

fn status_of(s: PStatus) -> Status {
    match s {
        PStatus::Created | PStatus::Starting | PStatus::Restoring => Status::CREATED,
        PStatus::Running => Status::RUNNING,
        PStatus::Paused => Status::PAUSED,
        PStatus::Stopped => Status::STOPPED,
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> ttrpc::Result<CreateTaskResponse> {
        let parsed = parse_create(&req)?;
        {
            let g = self.state.lock().await;
            let mut creating = self.creating_lock();
            if g.tasks.contains_key(&req.id) || creating.contains_key(&req.id) {
                return Err(TaskError::exists(format!("task {} exists already", req.id)));
            }
            match &parsed.role {
                spec::PodRole::Container(sid) => match &g.vm {
                    Some(vm) if vm.pod && &vm.id == sid => {
                        if let Some(why) = g.tasks.values().find_map(|t| t.vm_gone.clone()) {
                            return Err(TaskError::precondition(format!("container {}: the VM of pod {sid} is gone ({why})", req.id)));
                        }
                    }
                    _ => {
                        return Err(TaskError::precondition(format!(
                            "container {}: its pod's sandbox {sid} does not run in this shim (was it stopped?)",
                            req.id
                        )))
                    }
                },
                _ if g.vm.is_some() || !g.tasks.is_empty() || !creating.is_empty() => {
                    return Err(TaskError::exists(format!("this shim already runs a VM; {} cannot be added (only a pod's containers share one)", req.id)));
                }
                _ => {}
            }
            creating.insert(req.id.clone(), req.clone());
        }
        info!(id = %req.id, bundle = %req.bundle, role = ?parsed.role, "create");
        // Its own task, without the state lock: the boot (and a restore's image staging) finishes or
        // cleans up even if the caller goes away, and State answers meanwhile.
        let me = self.clone();
        let r2 = req.clone();
        let created = tokio::spawn(async move {
            let joins = matches!(parsed.role, spec::PodRole::Container(_));
            let r = if joins {
                me.create_in_pod(&r2, parsed).await.map(|st| (None, st))
            } else {
                me.create_with_vm(&r2, parsed).await.map(|(vm, st)| (Some(vm), st))
            };
            let mut g = me.state.lock().await;
            me.creating_lock().remove(&r2.id);
            // The pod's VM stopped while this container was made (its last task was deleted): the
            // container went with it.
            let r = match r {
                Ok((None, st)) if g.vm.is_none() => {
                    st.mounts.teardown();
                    Err(TaskError::precondition(format!("container {}: its pod's VM stopped while it was created", r2.id)))
                }
                r => r,
            };
            r.map(|(vm, st)| {
                let pid = st.host_pid;
                let gone = vm.as_ref().map(|v| v.sandbox.gone.clone());
                if let Some(vm) = vm {
                    g.vm = Some(vm);
                }
                g.tasks.insert(st.id.clone(), st);
                // Queued with the task's creation (before any event of its start), even if the
                // caller has gone.
                me.events.queue(
                    TASK_CREATE_EVENT_TOPIC,
                    Box::new(TaskCreate {
                        container_id: r2.id.clone(),
                        bundle: r2.bundle.clone(),
                        rootfs: r2.rootfs.clone(),
                        io: Some(TaskIO {
                            stdin: r2.stdin.clone(),
                            stdout: r2.stdout.clone(),
                            stderr: r2.stderr.clone(),
                            terminal: r2.terminal,
                            ..Default::default()
                        })
                        .into(),
                        checkpoint: r2.checkpoint.clone(),
                        pid,
                        ..Default::default()
                    }),
                );
                (pid, gone)
            })
        })
        .await
        .map_err(|e| TaskError::internal(format!("create task failed: {e}")))?;
        let (pid, gone) = created?;
        if let Some(gone) = gone {
            self.spawn_vm_watch(gone);
        }
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let request_deadline = request_deadline(ctx);
        // Its own task: should ttrpc drop this call at the caller's deadline (a restore outlasts a short
        // one), the start or restore still ends in a state Kill and Delete accept (Running or Stopped).
        let me = self.clone();
        tokio::spawn(async move { me.start_inner(req, request_deadline).await })
            .await
            .map_err(|e| TaskError::internal(format!("start task failed: {e}")))?
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let mut g = self.state.lock().await;
        if !g.tasks.contains_key(&req.id) && req.exec_id.is_empty() {
            if let Some(c) = self.creating_lock().get(&req.id) {
                return Ok(StateResponse {
                    id: c.id.clone(),
                    bundle: c.bundle.clone(),
                    status: Status::CREATED.into(),
                    stdin: c.stdin.clone(),
                    stdout: c.stdout.clone(),
                    stderr: c.stderr.clone(),
                    terminal: c.terminal,
                    ..Default::default()
                });
            }
        }
        let st = g.task_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
        let (id, bundle, host_pid) = (st.id.clone(), st.bundle.display().to_string(), st.host_pid);
        let p = st.proc_mut(&req.exec_id)?;
        let exit = p.exit_rx.borrow().clone();
        Ok(StateResponse {
            id,
            bundle,
            pid: if p.status == PStatus::Created && !req.exec_id.is_empty() { 0 } else { host_pid },
            status: status_of(p.status).into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status: exit.as_ref().map(|e| e.0).unwrap_or(0),
            exited_at: exit.map(|e| e.1).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let rx = {
            let mut g = self.state.lock().await;
            let st = g.task_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            st.proc_mut(&req.exec_id)?.exit_rx.clone()
        };
        match wait_exit(rx).await {
            Some((code, ts)) => Ok(WaitResponse { exit_status: code, exited_at: Some(ts).into(), ..Default::default() }),
            None => Err(TaskError::internal("process state lost")),
        }
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let (agent, cid, created) = {
            let mut g = self.state.lock().await;
            let st = g.task_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            let cid = st.id.clone();
            let agent = st.agent.clone();
            let p = st.proc_mut(&req.exec_id)?;
            // A process that never started has no waiter: its kill is the guest's, as before Start.
            let created = p.status == PStatus::Created;
            match p.status {
                PStatus::Stopped => return Err(TaskError::not_found(format!("process {cid}/{} already finished", req.exec_id))),
                PStatus::Starting | PStatus::Restoring => {
                    return Err(TaskError::precondition(format!("process {cid}/{} is being started; signal it once it runs", req.exec_id)))
                }
                _ => {}
            }
            (agent, cid, created)
        };
        let exec_id = req.exec_id.clone();
        let r = ag::SignalProcessRequest { container_id: cid.clone(), exec_id: req.exec_id, signal: req.signal, all: req.all, ..Default::default() };
        let bound = if req.all { SIGNAL_ALL_CALL } else { SIGNAL_CALL };
        let sigkill = req.signal == libc::SIGKILL as u32;
        match agent.call("SignalProcess", bound, |c, ctx| async move { c.signal_process(ctx, &r).await }).await {
            Ok(_) => {
                if sigkill && !created {
                    // Whatever the guest answered, the process is gone within the grace, or the host ends it.
                    self.spawn_kill_watchdog(cid, exec_id);
                }
                Ok(Empty::new())
            }
            Err(e @ agent_client::AgentError::Timeout { .. }) if sigkill => {
                // A guest that does not answer a SIGKILL does not decide whether it may be stopped. (Any
                // other signal is the caller's to escalate: its timeout is returned.)
                warn!(cid, exec_id, error = %e, "the guest did not answer SIGKILL: the host ends the process");
                self.force_exit(&cid, &exec_id, &format!("the guest did not answer SIGKILL within {bound:?}")).await;
                Ok(Empty::new())
            }
            Err(e) => {
                if sigkill && !created {
                    self.spawn_kill_watchdog(cid, exec_id);
                }
                Err(agent_err(e))
            }
        }
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let mut g = self.state.lock().await;
        let st = g.task_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
        if st.execs.contains_key(&req.exec_id) {
            return Err(TaskError::exists(format!("exec {} already exists", req.exec_id)));
        }
        let mut p = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        p.spec = req.spec.value.clone();
        st.execs.insert(req.exec_id.clone(), p);
        self.events.queue(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(TaskExecAdded { container_id: st.id.clone(), exec_id: req.exec_id, ..Default::default() }));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let (agent, cid) = self.agent_of(&req.id).await?;
        let r = ag::ResizeTtyRequest { container_id: cid, exec_id: req.exec_id, rows: req.height, cols: req.width, ..Default::default() };
        agent.call_default("ResizeTty", |c, ctx| async move { c.resize_tty(ctx, &r).await }).await.map_err(agent_err)?;
        Ok(Empty::new())
    }

    /// Stdin closed by containerd: the forwarder sends what was written before, then closes the guest's
    /// stdin (at once when there is no forwarder: no stdin, or it ended).
    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let (agent, cid, forwarder) = {
            let mut g = self.state.lock().await;
            let st = g.task_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            let (agent, cid) = (st.agent.clone(), st.id.clone());
            let p = st.proc_mut(&req.exec_id)?;
            (agent, cid, p.stdin_close.take())
        };
        if !forwarder.is_some_and(|tx| tx.send(()).is_ok()) {
            stdio::close_stdin(&agent, &cid, &req.exec_id).await;
        }
        Ok(Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.pause_resume(&req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.pause_resume(&req.id, false).await
    }

    /// The task's processes as host tools may use them: QEMU's pid (as Kata does). The guest's pids are
    /// numbers the guest chose; a host tool that looked them up would find unrelated host processes.
    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let g = self.state.lock().await;
        let st = g.tasks.get(&req.id).ok_or_else(|| self.no_task(&req.id))?;
        let processes = vec![containerd_shim::protos::types::task::ProcessInfo { pid: st.host_pid, ..Default::default() }];
        Ok(PidsResponse { processes, ..Default::default() })
    }

    /// The guest's figures of the container, bounded by what the host measures of the whole VM (its
    /// host cgroup, read after the guest answered): `metrics::bound_by_host`.
    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let (agent, cid, meter) = {
            let g = self.state.lock().await;
            let st = g.tasks.get(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            (st.agent.clone(), st.id.clone(), st.meter.clone())
        };
        let r = ag::ContainerRequest { container_id: cid, ..Default::default() };
        let raw = agent.call_default("StatsContainer", |c, ctx| async move { c.stats_container(ctx, &r).await }).await.map_err(agent_err)?;
        let mut m = crate::metrics::from_runc_stats(&raw.runc_stats).map_err(|e| TaskError::internal(e))?;
        crate::metrics::bound_by_host(&mut m, &meter.read());
        let any = convert_to_any(Box::new(m)).map_err(|e| TaskError::internal(e.to_string()))?;
        Ok(StatsResponse { stats: Some(any).into(), ..Default::default() })
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let (agent, cid) = self.agent_of(&req.id).await?;
        let r = ag::UpdateContainerRequest { container_id: cid, resources: req.resources.value.clone(), ..Default::default() };
        agent.call_default("UpdateContainer", |c, ctx| async move { c.update_container(ctx, &r).await }).await.map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let g = self.state.lock().await;
        let task_pid = g.tasks.get(&req.id).map(|st| st.host_pid).unwrap_or(0);
        Ok(ConnectResponse { shim_pid: std::process::id(), task_pid, version: env!("CARGO_PKG_VERSION").into(), ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let mut g = self.state.lock().await;
        let st = g.task_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
        if !req.exec_id.is_empty() {
            let p = st.execs.get(&req.exec_id).ok_or_else(|| TaskError::not_found(format!("exec {} not found", req.exec_id)))?;
            can_delete(&format!("exec {}", req.exec_id), p.status)?;
            let mut p = st.execs.remove(&req.exec_id).expect("checked");
            p.abort_io();
            let (code, ts) = p.exit_rx.borrow().clone().unwrap_or((0, timestamp().unwrap_or_default()));
            return Ok(DeleteResponse { pid: st.host_pid, exit_status: code, exited_at: Some(ts).into(), ..Default::default() });
        }
        can_delete(&format!("task {}", st.id), st.init.status)?;
        if st.checkpointing {
            return Err(TaskError::precondition(format!("task {} is being checkpointed; delete it when the checkpoint has ended", st.id)));
        }
        let (code, ts) = st.init.exit_rx.borrow().clone().unwrap_or((0, timestamp().unwrap_or_default()));
        st.init.abort_io();
        for p in st.execs.values_mut() {
            p.abort_io();
        }
        let pid = st.host_pid;
        let cid = st.id.clone();
        let poststop = (!st.hooks.poststop.is_empty()).then(|| (st.hooks.poststop.clone(), st.hook_state("stopped")));
        let creating = !self.creating_lock().is_empty();
        TaskService::release(&mut g, &cid, creating).await;
        g.tasks.remove(&cid);
        let left = g.tasks.len();
        drop(g);
        info!(id = %cid, tasks_left = left, "deleted");
        if let Some((list, state)) = poststop {
            hooks::run_all_warn("poststop", &list, &state).await;
        }
        self.events.queue(
            TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete { container_id: cid.clone(), pid, exit_status: code, exited_at: Some(ts.clone()).into(), id: cid, ..Default::default() }),
        );
        Ok(DeleteResponse { pid, exit_status: code, exited_at: Some(ts).into(), ..Default::default() })
    }

    /// Ends the shim once it holds no task: containerd asks after every Delete, and a pod's shim
    /// serves the pod's other containers until the last one is deleted.
    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let mut g = self.state.lock().await;
        if !g.tasks.is_empty() {
            info!(tasks = g.tasks.len(), "shutdown asked while tasks remain: the shim stays");
            return Ok(Empty::new());
        }
        if let Some(vm) = g.vm.take() {
            vm.stop(None).await;
        }
        drop(g);
        // A VM the host is ending itself finishes its teardown first.
        drop(self.ending.lock().await);
        self.events.flush(Duration::from_secs(5)).await;
        self.exit.signal();
        Ok(Empty::new())
    }

    async fn checkpoint(&self, ctx: &TtrpcContext, req: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        let request_deadline = request_deadline(ctx);
        // Its own task: should ttrpc drop this call at the caller's deadline, the cleanup still runs.
        let me = self.clone();
        tokio::spawn(async move { me.checkpoint_inner(req, request_deadline).await })
            .await
            .map_err(|e| TaskError::internal(format!("checkpoint task failed: {e}")))?
    }
}

/// The shared directory and CRIU's work directories as the guest sees them.
const GUEST_SHARED: &str = "/run/kata-rs/shared";
const GUEST_WORK: &str = "/run/kata-rs/work";
/// Exit status reported for a task whose restore failed (it never ran in this VM).
const RESTORE_FAILED_STATUS: u32 = 255;
/// Exit status reported for the processes of a VM that went away (QEMU exited, the guest panicked).
const VM_GONE_STATUS: u32 = 255;
/// The shim's report of a checkpoint, written beside the images and next to the bundle.
const STATS_FILE: &str = "kata-rs-checkpoint-stats.json";

/// The caller's own deadline for this request, which containerd passes on as the ttrpc timeout.
fn request_deadline(ctx: &TtrpcContext) -> Option<Duration> {
    (ctx.timeout_nano > 0).then(|| Duration::from_nanos(ctx.timeout_nano as u64))
}

/// The last `max_bytes` of a file the guest agent may read (its log and work directories). The answer
/// is the guest's: only the bytes that arrived count (its `file_size` is not used), at most `max_bytes`.
async fn read_guest_file(agent: &AgentClient, guest_path: &str, max_bytes: u32) -> Result<Vec<u8>, agent_client::AgentError> {
    let r = ag::ReadFileTailRequest { path: guest_path.into(), max_bytes, ..Default::default() };
    let mut data = agent.call("ReadFileTail", Duration::from_secs(30), |c, ctx| async move { c.read_file_tail(ctx, &r).await }).await?.data;
    let extra = data.len().saturating_sub(max_bytes as usize);
    data.drain(..extra);
    Ok(data)
}

/// Size of CRIU's stats image: a few hundred bytes; more than this is refused.
const MAX_STATS_IMAGE: u32 = 4096;

/// Adds CRIU's own figures from its stats image (`stats-dump`/`stats-restore`, which CRIU writes to the
/// work directory in the guest) to a report; returns the image's bytes to keep beside the images.
async fn add_criu_stats(agent: &AgentClient, report: &mut serde_json::Map<String, serde_json::Value>, guest_path: String) -> Option<Vec<u8>> {
    // Asks for one byte more than a stats image may have, to see a larger one and refuse it.
    let decoded = match read_guest_file(agent, &guest_path, MAX_STATS_IMAGE + 1).await {
        Ok(d) if d.len() > MAX_STATS_IMAGE as usize => Err(format!("{guest_path}: more than {MAX_STATS_IMAGE} bytes, too large for a stats image")),
        Ok(d) => crate::criu_stats::decode(&guest_path, &d).map(|m| (m, d)).map_err(|e| e.to_string()),
        Err(e) => Err(format!("{guest_path}: {e}")),
    };
    match decoded {
        Ok((m, data)) => {
            for (k, v) in m {
                report.insert(format!("criu.{k}"), v.into());
            }
            Some(data)
        }
        Err(e) => {
            report.insert("criu_stats_error".into(), e.into());
            None
        }
    }
}

/// Figures the agent reported ("key=value" lines): kept under `guest.`, so they never overwrite what the
/// host measured; at most 32 of them, keys of at most 64 plain characters, finite numbers only.
fn add_guest_figures(report: &mut serde_json::Map<String, serde_json::Value>, text: &str) {
    let plain = |k: &str| !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    let figures = text.lines().filter_map(|l| l.split_once('=')).filter_map(|(k, v)| Some((k.trim(), v.trim().parse::<f64>().ok().filter(|x| x.is_finite())?)));
    for (k, x) in figures.filter(|(k, _)| plain(k)).take(32) {
        report.insert(format!("guest.{k}"), x.into());
    }
}

fn write_report(path: &Path, report: &serde_json::Map<String, serde_json::Value>) {
    let text = serde_json::to_string_pretty(report).unwrap_or_default() + "\n";
    if let Err(e) = std::fs::write(path, text) {
        warn!(path = %path.display(), error = %e, "writing the checkpoint/restore report");
    }
}

/// Images can hold at most guest memory plus file contents: bound them at twice the guest memory + 1 GiB.
fn max_image_bytes(guest_mem_mib: u64) -> u64 {
    (guest_mem_mib * 2 + 1024) << 20
}

/// Most of a guest log copied next to the bundle: its last 4 MiB.
const GUEST_LOG_MAX: u64 = 4 << 20;
/// One piece of it per call: a ttrpc frame is at most 4 MiB, framing included.
const GUEST_LOG_PIECE: u32 = 1 << 20;

/// The last `total` bytes of a guest file, read in pieces of at most `piece` bytes by `read(offset, max)`
/// (`None`: the file's last `max` bytes), which answers the bytes and the file's size. The size is the
/// guest's word: it only places the pieces; what comes back is bounded by `total` and by the number of
/// calls, whatever the guest answers.
async fn read_tail_in_pieces<F, Fut, E>(mut read: F, total: u64, piece: u32) -> Result<Vec<u8>, E>
where
    F: FnMut(Option<u64>, u32) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<u8>, u64), E>>,
{
    let (mut last, size) = read(None, piece).await?;
    last.truncate(piece as usize);
    if size <= last.len() as u64 || last.len() < piece as usize {
        return Ok(last);
    }
    // The pieces before the last one, from where the last `total` bytes begin.
    let end = size - last.len() as u64;
    let mut at = size.saturating_sub(total);
    let mut out = Vec::new();
    for _ in 0..total.div_ceil(piece as u64) {
        if at >= end {
            break;
        }
        let want = (end - at).min(piece as u64) as u32;
        let (mut data, _) = read(Some(at), want).await?;
        data.truncate(want as usize);
        if data.is_empty() {
            break;
        }
        at += data.len() as u64;
        out.extend_from_slice(&data);
    }
    out.extend_from_slice(&last);
    let extra = out.len().saturating_sub(total as usize);
    out.drain(..extra);
    Ok(out)
}

/// Copies a guest log (CRIU's dump.log/restore.log) next to the bundle; returns its host path or why not.
/// The most checkpoints whose CRIU log and report stay in the bundle (each log up to
/// `GUEST_LOG_MAX`): a container checkpointed without end fills no disk.
pub const KEPT_DUMP_FILES: u32 = 8;

/// Removes the log and report of checkpoint `n - KEPT_DUMP_FILES` from the bundle (a host directory),
/// once checkpoint `n` has its own: the last `KEPT_DUMP_FILES` stay.
fn rotate_dump_files(bundle: &Path, n: u32) {
    if let Some(old) = n.checked_sub(KEPT_DUMP_FILES) {
        for name in [format!("criu-dump-{old}.log"), format!("criu-dump-{old}.stats.json")] {
            let _ = std::fs::remove_file(bundle.join(name));
        }
    }
}

async fn fetch_guest_log(agent: &AgentClient, guest_path: &str, bundle: &Path, name: &str) -> String {
    let read = |offset: Option<u64>, max_bytes: u32| {
        let r = ag::ReadFileTailRequest { path: guest_path.into(), max_bytes, at_offset: offset.is_some(), offset: offset.unwrap_or(0), ..Default::default() };
        async move {
            let a = agent.call("ReadFileTail", Duration::from_secs(30), |c, ctx| async move { c.read_file_tail(ctx, &r).await }).await?;
            Ok::<_, agent_client::AgentError>((a.data, a.file_size))
        }
    };
    match read_tail_in_pieces(read, GUEST_LOG_MAX, GUEST_LOG_PIECE).await {
        Ok(data) => {
            let host = bundle.join(format!("criu-{name}"));
            match std::fs::write(&host, &data) {
                Ok(()) => host.display().to_string(),
                Err(e) => format!("(cannot write {}: {e}; guest path {guest_path})", host.display()),
            }
        }
        // The reason the VM is gone is in the error already.
        Err(agent_client::AgentError::VmGone { .. }) => {
            format!("(not available: it stayed in the VM, which is gone; guest path {guest_path})")
        }
        Err(e) => format!("(not available: {e}; guest path {guest_path})"),
    }
}

impl TaskService {
    /// Start of a task's init or exec, or the restore of a task created from a checkpoint.
    async fn start_inner(&self, req: StartRequest, request_deadline: Option<Duration>) -> ttrpc::Result<StartResponse> {
        // Under the lock: the checks, the move to Starting/Restoring, and what the agent call needs.
        let (agent, cid, host_pid, restore, staging, deadline, bundle, process) = {
            let mut guard = self.state.lock().await;
            let g = &mut *guard;
            let st = g.tasks.get_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            let restore = req.exec_id.is_empty() && st.restore_pending;
            let status = st.proc_mut(&req.exec_id)?.status;
            can_start(&st.id, &req.exec_id, status)?;
            if let Some(why) = &st.vm_gone {
                return Err(TaskError::precondition(format!("task {}: the VM is gone ({why})", st.id)));
            }
            // Interfaces added since Create (ctr run --cni configures the namespace of the task's pid
            // between Create and Start) are hot-plugged before the container runs.
            if req.exec_id.is_empty() && !matches!(st.role, spec::PodRole::Container(_)) {
                if let Some(vm) = g.vm.as_mut() {
                    sync_network(&mut vm.network, &vm.sandbox.vm, &st.agent, &st.id).await?;
                }
            }
            let staging = if restore { st.restore_staging.take() } else { None };
            if restore {
                st.restore_pending = false;
            }
            let deadline = checkpoint::effective_deadline(st.deadline_s, request_deadline);
            let (agent, cid, host_pid, bundle) = (st.agent.clone(), st.id.clone(), st.host_pid, st.bundle.clone());
            let p = st.proc_mut(&req.exec_id)?;
            p.status = if restore { PStatus::Restoring } else { PStatus::Starting };
            (agent, cid, host_pid, restore, staging, deadline, bundle, p.spec.clone())
        };
        // Without the lock: the agent call (a restore can take minutes); Kill, State and Delete answer.
        let result = if restore {
            self.restore_init(&agent, &cid, deadline, &bundle, staging).await
        } else if req.exec_id.is_empty() {
            let r = ag::ContainerRequest { container_id: cid.clone(), ..Default::default() };
            agent.call_default("StartContainer", |c, ctx| async move { c.start_container(ctx, &r).await }).await.map(|r| r.pid).map_err(agent_err)
        } else {
            let r = ag::ExecProcessRequest { container_id: cid.clone(), exec_id: req.exec_id.clone(), process, ..Default::default() };
            agent.call_default("ExecProcess", |c, ctx| async move { c.exec_process(ctx, &r).await }).await.map(|r| r.pid).map_err(agent_err)
        };
        let mut g = self.state.lock().await;
        let st = g.task_mut(&cid).ok_or_else(|| TaskError::not_found(format!("task {cid} was deleted while it started")))?;
        let p = st.proc_mut(&req.exec_id)?;
        let guest_pid = match result {
            Ok(pid) if p.status == PStatus::Stopped => {
                // The VM went away meanwhile; its exit is already reported.
                return Err(TaskError::unavailable(format!("process {cid}/{} started (guest pid {pid}) but its VM is gone", req.exec_id)));
            }
            Ok(pid) => pid,
            Err(e) if restore => {
                // Nothing can run in this VM any more: stop it now, and report the task stopped.
                self.commit_exit(p, &cid, "", host_pid, RESTORE_FAILED_STATUS);
                let creating = !self.creating_lock().is_empty();
                TaskService::release(&mut g, &cid, creating).await;
                drop(g);
                warn!(cid, error = %e, "restore failed; the container is out of the VM (the VM stopped unless other containers of its pod run in it)");
                return Err(e);
            }
            Err(e) => {
                if p.status == PStatus::Starting {
                    p.status = PStatus::Created;
                }
                return Err(e);
            }
        };
        p.guest_pid = guest_pid;
        p.status = PStatus::Running;
        // Queued as Running is committed: the process's TaskExit (queued under this lock too, by its
        // waiter or the VM's watcher) comes after it, however soon the process exits.
        if req.exec_id.is_empty() {
            self.events.queue(TASK_START_EVENT_TOPIC, Box::new(TaskStart { container_id: cid.clone(), pid: host_pid, ..Default::default() }));
        } else {
            self.events.queue(
                TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted { container_id: cid.clone(), exec_id: req.exec_id.clone(), pid: host_pid, ..Default::default() }),
            );
            p.start_io(&agent, &cid, &req.exec_id);
        }
        let poststart = (req.exec_id.is_empty() && !st.hooks.poststart.is_empty()).then(|| (st.hooks.poststart.clone(), st.hook_state("running")));
        drop(g);
        if let Some((list, state)) = poststart {
            hooks::run_all_warn("poststart", &list, &state).await;
        }
        info!(cid, exec_id = %req.exec_id, guest_pid, host_pid, "started");
        self.spawn_waiter(agent, cid, req.exec_id);
        Ok(StartResponse { pid: host_pid, ..Default::default() })
    }

    /// The restore of a task created from a checkpoint (its Start): CRIU restore in the guest from the
    /// staged images; the CRIU log comes back on failure. Returns the guest pid.
    async fn restore_init(&self, agent: &AgentClient, cid: &str, deadline: (u64, &'static str), bundle: &Path, staging: Option<Staging>) -> ttrpc::Result<u32> {
        let (deadline_s, deadline_from) = deadline;
        // Per container: a pod's containers may restore at once.
        let work = format!("{GUEST_WORK}/restore-{cid}");
        let r = ag::RestoreContainerRequest {
            container_id: cid.to_string(),
            image_path: format!("{GUEST_SHARED}/{}", checkpoint::restore_dir(cid)),
            work_path: work.clone(),
            deadline_s: deadline_s as u32,
            ..Default::default()
        };
        let timeout = Duration::from_secs(deadline_s + 30);
        info!(cid, deadline_s, deadline_from, "restore");
        let started = std::time::Instant::now();
        let result = agent.call("RestoreContainer", timeout, |c, ctx| async move { c.restore_container(ctx, &r).await }).await;
        let restore_s = started.elapsed().as_secs_f64();
        match result {
            Ok(r) => {
                let mut report = serde_json::Map::new();
                report.insert("restore_s".into(), restore_s.into());
                add_criu_stats(agent, &mut report, format!("{work}/stats-restore")).await;
                write_report(&bundle.join("criu-restore.stats.json"), &report);
                info!(cid, restore_s, stats = %serde_json::Value::Object(report), "restored");
                if let Some(s) = staging {
                    s.remove();
                }
                Ok(r.pid)
            }
            Err(e) => {
                if let Some(s) = staging {
                    s.remove();
                }
                let log = fetch_guest_log(agent, &format!("{work}/restore.log"), bundle, "restore.log").await;
                Err(TaskError::internal(format!("restore of {cid} failed: {e}\nfull CRIU log: {log}")))
            }
        }
    }

    async fn checkpoint_inner(&self, req: CheckpointTaskRequest, request_deadline: Option<Duration>) -> ttrpc::Result<Empty> {
        let id = req.id.clone();
        let mut claimed = false;
        let r = self.checkpoint_unlocked(req, request_deadline, &mut claimed).await;
        if claimed {
            if let Some(st) = self.state.lock().await.task_mut(&id) {
                st.checkpointing = false;
            }
        }
        r
    }

    /// The checkpoint; marks the task as checkpointing (and sets `claimed`) once its checks passed, for
    /// the caller to clear.
    async fn checkpoint_unlocked(&self, req: CheckpointTaskRequest, request_deadline: Option<Duration>, claimed: &mut bool) -> ttrpc::Result<Empty> {
        let opts = checkpoint::parse_options(req.options.as_ref())?;
        let (agent, cid, paused, bundle, shared, deadline_s, n, max, open_tcp) = {
            let mut guard = self.state.lock().await;
            let g = &mut *guard;
            g.checkpoints += 1;
            let n = g.checkpoints;
            let st = g.tasks.get_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            let status = st.init.status;
            checkpointable(&st.id, status, st.restore_pending)?;
            if st.checkpointing {
                return Err(TaskError::precondition(format!("task {} is being checkpointed already", st.id)));
            }
            if let Some(why) = &st.vm_gone {
                return Err(TaskError::precondition(format!("task {}: the VM is gone ({why})", st.id)));
            }
            st.checkpointing = true;
            *claimed = true;
            (
                st.agent.clone(),
                st.id.clone(),
                status == PStatus::Paused,
                st.bundle.clone(),
                st.shared.clone(),
                st.deadline_s,
                n,
                max_image_bytes(st.guest_mem_mib),
                st.open_tcp,
            )
        };
        let (deadline_s, deadline_from) = checkpoint::effective_deadline(deadline_s, request_deadline);
        let target = PathBuf::from(if opts.image_path.is_empty() { &req.path } else { &opts.image_path });
        checkpoint::check_target_dir(&target)?;
        // Pinned before the guest writes there: later swaps of the name cannot redirect the host.
        let staging = Staging::for_checkpoint(&shared, n).map_err(|e| TaskError::internal(format!("checkpoint of {cid}: staging directory: {e}")))?;
        let work = format!("{GUEST_WORK}/checkpoint-{n}");
        let r = ag::CheckpointContainerRequest {
            container_id: cid.clone(),
            image_path: format!("{GUEST_SHARED}/{CHECKPOINT_DIR}/{n}"),
            work_path: work.clone(),
            leave_running: !opts.exit,
            tcp_established: opts.open_tcp || open_tcp,
            external_unix_sockets: opts.external_unix_sockets,
            shell_job: opts.terminal,
            file_locks: opts.file_locks,
            empty_namespaces: opts.empty_namespaces.clone(),
            already_frozen: paused,
            deadline_s: deadline_s as u32,
            ..Default::default()
        };
        info!(cid, n, paused, exit = opts.exit, target = %target.display(), deadline_s, deadline_from, "checkpoint");
        let started = std::time::Instant::now();
        let result =
            agent.call("CheckpointContainer", Duration::from_secs(deadline_s + 30), |c, ctx| async move { c.checkpoint_container(ctx, &r).await }).await;
        let log = fetch_guest_log(&agent, &format!("{work}/dump.log"), &bundle, &format!("dump-{n}.log")).await;
        rotate_dump_files(&bundle, n);
        let outcome = match result {
            Err(e) => {
                staging.remove();
                Err(TaskError::internal(format!("checkpoint of {cid} failed: {e}\nfull CRIU log: {log}")))
            }
            Ok(resp) => {
                // Blocking file I/O of up to gigabytes: off the async workers.
                let (staging, target) = (staging, target.clone());
                let copied = tokio::task::spawn_blocking(move || {
                    let r = checkpoint::copy_images(&staging.dir, &target, checkpoint::image_limits(max));
                    staging.remove();
                    r
                })
                .await
                .unwrap_or_else(|e| Err(crate::safefs::SafeFsError::Io { path: String::new(), source: std::io::Error::other(e.to_string()) }));
                copied
                    .map(|copied| (copied, resp.stats))
                    .map_err(|e| TaskError::internal(format!("copying checkpoint images of {cid} from the guest: {e}; CRIU log: {log}")))
            }
        };
        match outcome {
            Ok((copied, agent_stats)) => {
                let mut report = serde_json::Map::new();
                report.insert("checkpoint_s".into(), started.elapsed().as_secs_f64().into());
                report.insert("image_bytes".into(), copied.bytes.into());
                report.insert("image_files".into(), copied.files.into());
                add_guest_figures(&mut report, &agent_stats);
                if let Some(raw) = add_criu_stats(&agent, &mut report, format!("{work}/stats-dump")).await {
                    if let Err(e) = std::fs::write(target.join("stats-dump"), raw) {
                        warn!(error = %e, "writing stats-dump beside the images");
                    }
                }
                write_report(&target.join(STATS_FILE), &report);
                write_report(&bundle.join(format!("criu-dump-{n}.stats.json")), &report);
                info!(cid, n, log, stats = %serde_json::Value::Object(report), "checkpoint written");
                Ok(Empty::new())
            }
            Err(e) => {
                checkpoint::empty_host_dir(&Dir::open_host(&target).map_err(|e2| TaskError::internal(format!("{e:?}; emptying {}: {e2}", target.display())))?);
                Err(e)
            }
        }
    }

    async fn agent_of(&self, id: &str) -> ttrpc::Result<(AgentClient, String)> {
        let g = self.state.lock().await;
        let st = g.tasks.get(id).ok_or_else(|| self.no_task(id))?;
        Ok((st.agent.clone(), st.id.clone()))
    }

    async fn pause_resume(&self, id: &str, pause: bool) -> ttrpc::Result<Empty> {
        let mut g = self.state.lock().await;
        let st = g.task_mut(id).ok_or_else(|| self.no_task(id))?;
        let want_from = if pause { PStatus::Running } else { PStatus::Paused };
        if st.init.status != want_from {
            return Err(TaskError::precondition(format!("task {id} is {:?}, not {want_from:?}", st.init.status)));
        }
        let r = ag::ContainerRequest { container_id: st.id.clone(), ..Default::default() };
        if pause {
            st.agent.call_default("PauseContainer", |c, ctx| async move { c.pause_container(ctx, &r).await }).await.map_err(agent_err)?;
        } else {
            st.agent.call_default("ResumeContainer", |c, ctx| async move { c.resume_container(ctx, &r).await }).await.map_err(agent_err)?;
        }
        st.init.status = if pause { PStatus::Paused } else { PStatus::Running };
        if pause {
            self.events.queue(TASK_PAUSED_EVENT_TOPIC, Box::new(TaskPaused { container_id: st.id.clone(), ..Default::default() }));
        } else {
            self.events.queue(TASK_RESUMED_EVENT_TOPIC, Box::new(TaskResumed { container_id: st.id.clone(), ..Default::default() }));
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_figures_never_overwrite_host_fields_and_are_bounded() {
        let mut r = serde_json::Map::new();
        r.insert("checkpoint_s".into(), 2.5.into());
        r.insert("image_bytes".into(), 100u64.into());
        let mut lies = String::from("checkpoint_s=0\nimage_bytes=99999999999999\nrunc_checkpoint_s=1.25\nx=NaN\ny=inf\n\u{1b}[2J=1\n");
        lies.push_str(&format!("{}=1\n", "k".repeat(65)));
        for i in 0..1000 {
            lies.push_str(&format!("n{i}=1\n"));
        }
        add_guest_figures(&mut r, &lies);
        assert_eq!(r["checkpoint_s"], 2.5);
        assert_eq!(r["image_bytes"], 100);
        assert_eq!(r["guest.checkpoint_s"], 0.0);
        assert_eq!(r["guest.runc_checkpoint_s"], 1.25);
        assert!(!r.contains_key("guest.x") && !r.contains_key("guest.y"), "non-finite numbers dropped");
        assert!(r.keys().all(|k| !k.contains('\u{1b}') && k.len() <= 70));
        assert_eq!(r.keys().filter(|k| k.starts_with("guest.")).count(), 32);
    }

    #[test]
    fn start_and_delete_checks() {
        assert!(can_start("c", "", PStatus::Created).is_ok());
        for s in [PStatus::Starting, PStatus::Restoring] {
            assert!(can_start("c", "", s).unwrap_err().to_string().contains("already being started"));
            assert!(can_delete("task c", s).unwrap_err().to_string().contains("being started"));
        }
        for s in [PStatus::Running, PStatus::Paused, PStatus::Stopped] {
            assert!(can_start("c", "e", s).unwrap_err().to_string().contains("not in the created state"));
        }
        assert!(can_delete("task c", PStatus::Created).is_ok() && can_delete("task c", PStatus::Stopped).is_ok());
        assert!(can_delete("task c", PStatus::Running).unwrap_err().to_string().contains("kill it first"));
        assert_eq!(status_of(PStatus::Restoring), Status::CREATED);
        assert!(checkpointable("c", PStatus::Restoring, false).unwrap_err().to_string().contains("being started"));
    }

    #[test]
    fn only_running_or_paused_tasks_are_checkpointable() {
        assert!(checkpointable("c", PStatus::Running, false).is_ok());
        assert!(checkpointable("c", PStatus::Paused, false).is_ok());
        let e = checkpointable("c", PStatus::Created, false).unwrap_err().to_string();
        assert!(e.contains("task c is Created") && e.contains("start it"), "{e}");
        assert!(checkpointable("c", PStatus::Created, true).unwrap_err().to_string().contains("not yet restored"));
        assert!(checkpointable("c", PStatus::Stopped, false).unwrap_err().to_string().contains("task c is Stopped"));
    }

    /// A fake guest file behind `read_tail_in_pieces`: honest, or a liar about sizes and lengths.
    async fn pieces(file: &[u8], claimed: Option<u64>, pad: usize, total: u64, piece: u32) -> (Vec<u8>, usize) {
        let calls = std::cell::Cell::new(0);
        let read = |offset: Option<u64>, max: u32| {
            calls.set(calls.get() + 1);
            let size = file.len() as u64;
            let start = offset.map_or(size.saturating_sub(max as u64), |o| o.min(size)) as usize;
            let mut data = file[start..(start + max as usize).min(file.len())].to_vec();
            data.extend(std::iter::repeat_n(b'!', pad));
            async move { Ok::<_, ()>((data, claimed.unwrap_or(size))) }
        };
        let out = read_tail_in_pieces(read, total, piece).await.unwrap();
        (out, calls.get())
    }

    #[tokio::test]
    async fn a_large_guest_log_comes_in_pieces_bounded_whatever_the_guest_says() {
        let file: Vec<u8> = (0..(5u32 << 20) + 3).map(|i| (i % 251) as u8).collect();
        // Honest: the last 4 MiB, in 1 MiB pieces (the tail first, then the three before it).
        let (out, calls) = pieces(&file, None, 0, 4 << 20, 1 << 20).await;
        assert_eq!(out, file[file.len() - (4 << 20)..]);
        assert_eq!(calls, 4);
        // A small file: one call.
        let (out, calls) = pieces(b"short log", None, 0, 4 << 20, 1 << 20).await;
        assert_eq!((out.as_slice(), calls), (&b"short log"[..], 1));
        // A guest claiming 1 TiB and padding every answer: still at most `total` bytes, and at most
        // total/piece + 1 calls.
        let (out, calls) = pieces(&file, Some(1 << 40), 4096, 4 << 20, 1 << 20).await;
        assert!(out.len() <= 4 << 20, "{}", out.len());
        assert!(calls <= 5, "{calls}");
    }
}
