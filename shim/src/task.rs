//! containerd's task service (API v2) for one container in its own VM.
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
        protobuf::{well_known_types::timestamp::Timestamp, MessageDyn},
        shim_async::Task,
        topics::*,
        ttrpc::{self, r#async::TtrpcContext, Code},
    },
    util::{convert_to_any, timestamp},
};
use tokio::{sync::{watch, Mutex}, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    checkpoint::{self, Staging, CHECKPOINT_DIR, RESTORE_DIR},
    config::Config,
    mounts,
    safefs::Dir,
    sandbox::Sandbox,
    spec, stdio,
};

/// Agent calls that last as long as the process does.
const LONG: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long Wait waits for the last output after a process exited.
const IO_DRAIN: Duration = Duration::from_secs(10);

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// An agent error as a ttrpc status: the guest's status code is a typed value (never parsed from the
/// message text the guest wrote), and only codes that tell containerd something are passed on.
fn agent_err(e: agent_client::AgentError) -> ttrpc::Error {
    let code = match e.guest_code() {
        Some(c @ (Code::NOT_FOUND | Code::INVALID_ARGUMENT | Code::ALREADY_EXISTS | Code::FAILED_PRECONDITION)) => c,
        _ => Code::INTERNAL,
    };
    err(code, e.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PStatus {
    Created,
    Running,
    Paused,
    Stopped,
}

type ExitInfo = Option<(u32, Timestamp)>;

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
        }
    }

    fn start_io(&mut self, agent: &AgentClient, cid: &str, exec_id: &str) {
        let a = || agent.clone();
        self.io.push(tokio::spawn(stdio::forward_output(a(), cid.into(), exec_id.into(), self.stdout.clone(), false)));
        self.io.push(tokio::spawn(stdio::forward_output(a(), cid.into(), exec_id.into(), self.stderr.clone(), true)));
        if !self.stdin.is_empty() {
            tokio::spawn(stdio::forward_input(a(), cid.into(), exec_id.into(), self.stdin.clone()));
        }
    }
}

struct TaskState {
    id: String,
    bundle: PathBuf,
    sandbox: Option<Sandbox>,
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
    /// Set when the task was created from a checkpoint: Start restores instead of starting.
    restore_pending: bool,
    checkpoints: u32,
    guest_mem_mib: u64,
}

impl TaskState {
    fn proc_mut(&mut self, exec_id: &str) -> ttrpc::Result<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} of {} not found", self.id)))
    }
}

#[derive(Clone)]
pub struct TaskService {
    state: Arc<Mutex<Option<TaskState>>>,
    publisher: Arc<RemotePublisher>,
    namespace: String,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(publisher: RemotePublisher, namespace: String, exit: Arc<ExitSignal>) -> Self {
        TaskService { state: Arc::new(Mutex::new(None)), publisher: Arc::new(publisher), namespace, exit }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.publish(ttrpc::context::Context::default(), topic, &self.namespace, event).await {
            warn!(topic, error = %e, "publishing event failed");
        }
    }

    /// Waits for a started process to exit, lets its output drain, then records and publishes the exit
    /// (with `host_pid`, QEMU's pid, as the task pid).
    fn spawn_waiter(&self, agent: AgentClient, cid: String, exec_id: String, host_pid: u32) {
        let me = self.clone();
        tokio::spawn(async move {
            let req = ag::ProcessRequest { container_id: cid.clone(), exec_id: exec_id.clone(), ..Default::default() };
            let code = match agent.call("WaitProcess", LONG, |c, ctx| async move { c.wait_process(ctx, &req).await }).await {
                Ok(r) => r.exit_status as u32,
                Err(e) => {
                    warn!(cid, exec_id, error = %e, "lost the process (VM gone?); reporting exit 255");
                    255
                }
            };
            let ts = timestamp().unwrap_or_default();
            let (io, tx) = {
                let mut g = me.state.lock().await;
                let Some(st) = g.as_mut() else { return };
                let Ok(p) = st.proc_mut(&exec_id) else { return };
                (std::mem::take(&mut p.io), p.exit_tx.clone())
            };
            for h in io {
                let _ = tokio::time::timeout(IO_DRAIN, h).await;
            }
            {
                let mut g = me.state.lock().await;
                if let Some(p) = g.as_mut().and_then(|st| st.proc_mut(&exec_id).ok()) {
                    p.status = PStatus::Stopped;
                }
            }
            let _ = tx.send(Some((code, ts.clone())));
            info!(cid, exec_id, code, "process exited");
            let id = if exec_id.is_empty() { cid.clone() } else { exec_id.clone() };
            me.publish(TASK_EXIT_EVENT_TOPIC, Box::new(TaskExit { container_id: cid, id, pid: host_pid, exit_status: code, exited_at: Some(ts).into(), ..Default::default() }))
                .await;
        });
    }

    async fn create_inner(&self, req: &CreateTaskRequest) -> ttrpc::Result<TaskState> {
        let restore = !req.checkpoint.is_empty();
        if restore && !Path::new(&req.checkpoint).join("inventory.img").is_file() {
            return Err(err(Code::INVALID_ARGUMENT, format!("checkpoint {} holds no CRIU images (no inventory.img)", req.checkpoint)));
        }
        let explicit = match req.options.as_ref() {
            Some(o) => crate::config::config_path_from_options(&o.type_url, &o.value).map_err(|e| err(Code::INVALID_ARGUMENT, e))?,
            None => None,
        };
        let config = Config::discover(explicit.as_deref()).map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let bundle = PathBuf::from(&req.bundle);
        if let Some(p) = &explicit {
            std::fs::write(bundle.join(crate::shimcmd::CONFIG_PATH_FILE), p.as_os_str().as_encoded_bytes())
                .map_err(|e| err(Code::INTERNAL, format!("{}: {e}", bundle.display())))?;
        }
        let raw = std::fs::read(bundle.join("config.json")).map_err(|e| err(Code::INVALID_ARGUMENT, format!("{}/config.json: {e}", req.bundle)))?;
        let adapted = spec::adapt_for_guest(&raw).map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let spec_json: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| err(Code::INVALID_ARGUMENT, format!("{}/config.json: {e}", req.bundle)))?;
        let deadline_s = checkpoint::deadline_from_spec(&spec_json, config.runtime.checkpoint_deadline_s).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        if !adapted.dropped_mounts.is_empty() || !adapted.dropped_namespace_paths.is_empty() {
            warn!(mounts = ?adapted.dropped_mounts, namespaces = ?adapted.dropped_namespace_paths, "host-only parts of the spec are not available in the VM");
        }
        let prepared = Sandbox::prepare(&config, &req.id).map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        let mounts = match mounts::ContainerMounts::setup(&bundle, &req.rootfs, &prepared.shared_dir, &req.id) {
            Ok(m) => m,
            Err(e) => {
                prepared.discard();
                return Err(err(Code::INTERNAL, e.to_string()));
            }
        };
        let sandbox = match Sandbox::boot(&config, prepared).await {
            Ok(s) => s,
            Err(e) => {
                mounts.teardown();
                return Err(err(Code::INTERNAL, e.to_string()));
            }
        };
        let agent = sandbox.agent.clone();
        let mut restore_staging = None;
        if restore {
            // Images from containerd (trusted, but bounded all the same) into the guest-writable shared
            // directory, through pinned descriptors: nothing the guest placed there is followed.
            let limits = checkpoint::image_limits(max_image_bytes(config.hypervisor.memory_mib as u64));
            let staged = Staging::for_restore(&sandbox.shared).and_then(|st| {
                let from = Dir::open_host(Path::new(&req.checkpoint))?;
                let r = crate::safefs::copy_tree(&from, &st.dir, limits);
                if r.is_err() {
                    st.remove();
                }
                r.map(|_| st)
            });
            match staged {
                Ok(st) => restore_staging = Some(st),
                Err(e) => {
                    sandbox.stop(Some(&mounts)).await;
                    return Err(err(Code::INVALID_ARGUMENT, format!("staging checkpoint {} for the guest: {e}", req.checkpoint)));
                }
            }
        }
        let creq = ag::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec: adapted.spec,
            rootfs: format!("{GUEST_SHARED}/{}/rootfs", req.id),
            for_restore: restore,
            ..Default::default()
        };
        let guest_pid = match agent.call_default("CreateContainer", |c, ctx| async move { c.create_container(ctx, &creq).await }).await {
            Ok(r) => r.pid,
            Err(e) => {
                warn!(id = %req.id, error = %e, console_tail = %sandbox.vm.console_tail(4000), "CreateContainer failed; the guest console's end follows");
                sandbox.stop(Some(&mounts)).await;
                return Err(agent_err(e));
            }
        };
        let mut init = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        init.guest_pid = guest_pid;
        init.start_io(&agent, &req.id, "");
        let shared = sandbox.shared.clone();
        let host_pid = sandbox.vm.qemu_pid();
        Ok(TaskState {
            id: req.id.clone(),
            bundle,
            sandbox: Some(sandbox),
            agent,
            init,
            execs: HashMap::new(),
            mounts,
            shared,
            host_pid,
            restore_staging,
            deadline_s,
            restore_pending: restore,
            checkpoints: 0,
            guest_mem_mib: config.hypervisor.memory_mib as u64,
        })
    }

    /// Stops the VM and removes mounts and directories (idempotent).
    async fn teardown(st: &mut TaskState) {
        if let Some(sb) = st.sandbox.take() {
            let req = ag::ContainerRequest { container_id: st.id.clone(), ..Default::default() };
            let _ = st.agent.call("RemoveContainer", Duration::from_secs(30), |c, ctx| async move { c.remove_container(ctx, &req).await }).await;
            sb.stop(Some(&st.mounts)).await;
        }
    }
}

/// Only a running or paused task can be checkpointed (containerd pauses before it checkpoints).
fn checkpointable(id: &str, status: PStatus, restore_pending: bool) -> Result<(), String> {
    match status {
        PStatus::Running | PStatus::Paused => Ok(()),
        PStatus::Created if restore_pending => Err(format!("task {id} is Created (from a checkpoint, not yet restored): start it before checkpointing it")),
        PStatus::Created => Err(format!("task {id} is Created: start it before checkpointing it; only a running or paused task can be checkpointed")),
        PStatus::Stopped => Err(format!("task {id} is Stopped: only a running or paused task can be checkpointed")),
    }
}

fn status_of(s: PStatus) -> Status {
    match s {
        PStatus::Created => Status::CREATED,
        PStatus::Running => Status::RUNNING,
        PStatus::Paused => Status::PAUSED,
        PStatus::Stopped => Status::STOPPED,
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> ttrpc::Result<CreateTaskResponse> {
        let mut g = self.state.lock().await;
        if g.is_some() {
            return Err(err(Code::ALREADY_EXISTS, format!("this shim already runs a task; {} cannot be added", req.id)));
        }
        info!(id = %req.id, bundle = %req.bundle, "create");
        let st = self.create_inner(&req).await?;
        let pid = st.host_pid;
        *g = Some(st);
        drop(g);
        self.publish(
            TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone(), terminal: req.terminal, ..Default::default() }).into(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let request_deadline = request_deadline(ctx);
        let mut g = self.state.lock().await;
        let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
        let agent = st.agent.clone();
        let cid = st.id.clone();
        let st_restore_pending = st.restore_pending;
        let host_pid = st.host_pid;
        let (deadline_s, deadline_from) = checkpoint::effective_deadline(st.deadline_s, request_deadline);
        let bundle = st.bundle.clone();
        if req.exec_id.is_empty() {
            st.restore_pending = false;
        }
        let restore_staging = if req.exec_id.is_empty() { st.restore_staging.take() } else { None };
        let p = st.proc_mut(&req.exec_id)?;
        if p.status != PStatus::Created {
            return Err(err(Code::FAILED_PRECONDITION, format!("process {}/{} is not in the created state", cid, req.exec_id)));
        }
        let restore = req.exec_id.is_empty() && st_restore_pending;
        let guest_pid = if restore {
            let work = format!("{GUEST_WORK}/restore");
            let r = ag::RestoreContainerRequest {
                container_id: cid.clone(),
                image_path: format!("{GUEST_SHARED}/{RESTORE_DIR}"),
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
                    add_criu_stats(&agent, &mut report, format!("{work}/stats-restore")).await;
                    write_report(&bundle.join("criu-restore.stats.json"), &report);
                    info!(cid, restore_s, stats = %serde_json::Value::Object(report), "restored");
                    if let Some(s) = restore_staging {
                        s.remove();
                    }
                    r.pid
                }
                Err(e) => {
                    let log = fetch_guest_log(&agent, &format!("{work}/restore.log"), &bundle, "restore.log").await;
                    // Nothing can run in this VM any more: stop it now, and report the task stopped.
                    let p = &mut st.init;
                    p.status = PStatus::Stopped;
                    let ts = timestamp().unwrap_or_default();
                    let _ = p.exit_tx.send(Some((RESTORE_FAILED_STATUS, ts.clone())));
                    TaskService::teardown(st).await;
                    drop(g);
                    warn!(cid, error = %e, log, "restore failed; VM stopped");
                    self.publish(
                        TASK_EXIT_EVENT_TOPIC,
                        Box::new(TaskExit { container_id: cid.clone(), id: cid.clone(), pid: host_pid, exit_status: RESTORE_FAILED_STATUS, exited_at: Some(ts).into(), ..Default::default() }),
                    )
                    .await;
                    return Err(err(Code::INTERNAL, format!("restore of {cid} failed: {e}\nfull CRIU log: {log}")));
                }
            }
        } else if req.exec_id.is_empty() {
            let r = ag::ContainerRequest { container_id: cid.clone(), ..Default::default() };
            agent.call_default("StartContainer", |c, ctx| async move { c.start_container(ctx, &r).await }).await.map_err(agent_err)?.pid
        } else {
            let r = ag::ExecProcessRequest { container_id: cid.clone(), exec_id: req.exec_id.clone(), process: p.spec.clone(), ..Default::default() };
            let pid = agent.call_default("ExecProcess", |c, ctx| async move { c.exec_process(ctx, &r).await }).await.map_err(agent_err)?.pid;
            p.start_io(&agent, &cid, &req.exec_id);
            pid
        };
        p.guest_pid = guest_pid;
        p.status = PStatus::Running;
        drop(g);
        info!(cid, exec_id = %req.exec_id, guest_pid, host_pid, "started");
        let pid = host_pid;
        self.spawn_waiter(agent, cid.clone(), req.exec_id.clone(), pid);
        if req.exec_id.is_empty() {
            self.publish(TASK_START_EVENT_TOPIC, Box::new(TaskStart { container_id: cid, pid, ..Default::default() })).await;
        } else {
            self.publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(TaskExecStarted { container_id: cid, exec_id: req.exec_id, pid, ..Default::default() })).await;
        }
        Ok(StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let mut g = self.state.lock().await;
        let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
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
        let mut rx = {
            let mut g = self.state.lock().await;
            let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
            st.proc_mut(&req.exec_id)?.exit_rx.clone()
        };
        loop {
            if let Some((code, ts)) = rx.borrow_and_update().clone() {
                return Ok(WaitResponse { exit_status: code, exited_at: Some(ts).into(), ..Default::default() });
            }
            if rx.changed().await.is_err() {
                return Err(err(Code::INTERNAL, "process state lost"));
            }
        }
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let (agent, cid) = {
            let mut g = self.state.lock().await;
            let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
            let cid = st.id.clone();
            let agent = st.agent.clone();
            let p = st.proc_mut(&req.exec_id)?;
            if p.status == PStatus::Stopped {
                return Err(err(Code::NOT_FOUND, format!("process {cid}/{} already finished", req.exec_id)));
            }
            (agent, cid)
        };
        let r = ag::SignalProcessRequest { container_id: cid, exec_id: req.exec_id, signal: req.signal, all: req.all, ..Default::default() };
        agent.call_default("SignalProcess", |c, ctx| async move { c.signal_process(ctx, &r).await }).await.map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let mut g = self.state.lock().await;
        let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
        if st.execs.contains_key(&req.exec_id) {
            return Err(err(Code::ALREADY_EXISTS, format!("exec {} already exists", req.exec_id)));
        }
        let mut p = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        p.spec = req.spec.value.clone();
        st.execs.insert(req.exec_id.clone(), p);
        let cid = st.id.clone();
        drop(g);
        self.publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(TaskExecAdded { container_id: cid, exec_id: req.exec_id, ..Default::default() })).await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let (agent, cid) = self.agent_of(&req.id).await?;
        let r = ag::ResizeTtyRequest { container_id: cid, exec_id: req.exec_id, rows: req.height, cols: req.width, ..Default::default() };
        agent.call_default("ResizeTty", |c, ctx| async move { c.resize_tty(ctx, &r).await }).await.map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let (agent, cid) = {
            let g = self.state.lock().await;
            let st = g.as_ref().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
            (st.agent.clone(), st.id.clone())
        };
        if req.stdin {
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
        let st = g.as_ref().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
        let processes = vec![containerd_shim::protos::types::task::ProcessInfo { pid: st.host_pid, ..Default::default() }];
        Ok(PidsResponse { processes, ..Default::default() })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let (agent, cid) = self.agent_of(&req.id).await?;
        let r = ag::ContainerRequest { container_id: cid, ..Default::default() };
        let raw = agent.call_default("StatsContainer", |c, ctx| async move { c.stats_container(ctx, &r).await }).await.map_err(agent_err)?;
        let m = crate::metrics::from_runc_stats(&raw.runc_stats).map_err(|e| err(Code::INTERNAL, e))?;
        let any = convert_to_any(Box::new(m)).map_err(|e| err(Code::INTERNAL, e.to_string()))?;
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
        let task_pid = g.as_ref().filter(|st| st.id == req.id).map(|st| st.host_pid).unwrap_or(0);
        Ok(ConnectResponse { shim_pid: std::process::id(), task_pid, version: env!("CARGO_PKG_VERSION").into(), ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let mut g = self.state.lock().await;
        let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
        if !req.exec_id.is_empty() {
            let p = st.execs.get(&req.exec_id).ok_or_else(|| err(Code::NOT_FOUND, format!("exec {} not found", req.exec_id)))?;
            if matches!(p.status, PStatus::Running | PStatus::Paused) {
                return Err(err(Code::FAILED_PRECONDITION, format!("exec {} is still running", req.exec_id)));
            }
            let p = st.execs.remove(&req.exec_id).expect("checked");
            let (code, ts) = p.exit_rx.borrow().clone().unwrap_or((0, timestamp().unwrap_or_default()));
            return Ok(DeleteResponse { pid: st.host_pid, exit_status: code, exited_at: Some(ts).into(), ..Default::default() });
        }
        if matches!(st.init.status, PStatus::Running | PStatus::Paused) {
            return Err(err(Code::FAILED_PRECONDITION, format!("task {} is still running; kill it first", st.id)));
        }
        let (code, ts) = st.init.exit_rx.borrow().clone().unwrap_or((0, timestamp().unwrap_or_default()));
        let pid = st.host_pid;
        TaskService::teardown(st).await;
        let cid = st.id.clone();
        *g = None;
        drop(g);
        info!(id = %cid, "deleted; VM stopped");
        self.publish(
            TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete { container_id: cid.clone(), pid, exit_status: code, exited_at: Some(ts.clone()).into(), id: cid, ..Default::default() }),
        )
        .await;
        Ok(DeleteResponse { pid, exit_status: code, exited_at: Some(ts).into(), ..Default::default() })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let mut g = self.state.lock().await;
        if let Some(st) = g.as_mut() {
            TaskService::teardown(st).await;
        }
        *g = None;
        self.exit.signal();
        Ok(Empty::new())
    }

    async fn checkpoint(&self, ctx: &TtrpcContext, req: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        let request_deadline = request_deadline(ctx);
        // Its own task: should ttrpc drop this call at the caller's deadline, the cleanup still runs.
        let me = self.clone();
        tokio::spawn(async move { me.checkpoint_inner(req, request_deadline).await })
            .await
            .map_err(|e| err(Code::INTERNAL, format!("checkpoint task failed: {e}")))?
    }
}

/// The shared directory and CRIU's work directories as the guest sees them.
const GUEST_SHARED: &str = "/run/kata-rs/shared";
const GUEST_WORK: &str = "/run/kata-rs/work";
/// Exit status reported for a task whose restore failed (it never ran in this VM).
const RESTORE_FAILED_STATUS: u32 = 255;
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

/// Copies a guest log (CRIU's dump.log/restore.log) next to the bundle; returns its host path or why not.
async fn fetch_guest_log(agent: &AgentClient, guest_path: &str, bundle: &Path, name: &str) -> String {
    match read_guest_file(agent, guest_path, 4 << 20).await {
        Ok(data) => {
            let host = bundle.join(format!("criu-{name}"));
            match std::fs::write(&host, &data) {
                Ok(()) => host.display().to_string(),
                Err(e) => format!("(cannot write {}: {e}; guest path {guest_path})", host.display()),
            }
        }
        Err(e) => format!("(not available: {e}; guest path {guest_path})"),
    }
}

impl TaskService {
    async fn checkpoint_inner(&self, req: CheckpointTaskRequest, request_deadline: Option<Duration>) -> ttrpc::Result<Empty> {
        let opts = checkpoint::parse_options(req.options.as_ref()).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let (agent, cid, paused, bundle, shared, deadline_s, n, max) = {
            let mut g = self.state.lock().await;
            let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
            let status = st.init.status;
            checkpointable(&st.id, status, st.restore_pending).map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
            st.checkpoints += 1;
            (st.agent.clone(), st.id.clone(), status == PStatus::Paused, st.bundle.clone(), st.shared.clone(), st.deadline_s, st.checkpoints, max_image_bytes(st.guest_mem_mib))
        };
        let (deadline_s, deadline_from) = checkpoint::effective_deadline(deadline_s, request_deadline);
        let target = PathBuf::from(if opts.image_path.is_empty() { &req.path } else { &opts.image_path });
        checkpoint::check_target_dir(&target).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        // Pinned before the guest writes there: later swaps of the name cannot redirect the host.
        let staging = Staging::for_checkpoint(&shared, n).map_err(|e| err(Code::INTERNAL, format!("checkpoint of {cid}: staging directory: {e}")))?;
        let work = format!("{GUEST_WORK}/checkpoint-{n}");
        let r = ag::CheckpointContainerRequest {
            container_id: cid.clone(),
            image_path: format!("{GUEST_SHARED}/{CHECKPOINT_DIR}/{n}"),
            work_path: work.clone(),
            leave_running: !opts.exit,
            tcp_established: opts.open_tcp,
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
        let result = agent.call("CheckpointContainer", Duration::from_secs(deadline_s + 30), |c, ctx| async move { c.checkpoint_container(ctx, &r).await }).await;
        let log = fetch_guest_log(&agent, &format!("{work}/dump.log"), &bundle, &format!("dump-{n}.log")).await;
        let outcome = match result {
            Err(e) => Err(err(Code::INTERNAL, format!("checkpoint of {cid} failed: {e}\nfull CRIU log: {log}"))),
            Ok(resp) => checkpoint::copy_images(&staging.dir, &target, checkpoint::image_limits(max))
                .map(|copied| (copied, resp.stats))
                .map_err(|e| err(Code::INTERNAL, format!("copying checkpoint images of {cid} from the guest: {e}; CRIU log: {log}"))),
        };
        staging.remove();
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
                checkpoint::empty_host_dir(&Dir::open_host(&target).map_err(|e2| err(Code::INTERNAL, format!("{e:?}; emptying {}: {e2}", target.display())))?);
                Err(e)
            }
        }
    }

    async fn agent_of(&self, id: &str) -> ttrpc::Result<(AgentClient, String)> {
        let g = self.state.lock().await;
        let st = g.as_ref().ok_or_else(|| err(Code::NOT_FOUND, format!("task {id} not found")))?;
        Ok((st.agent.clone(), st.id.clone()))
    }

    async fn pause_resume(&self, id: &str, pause: bool) -> ttrpc::Result<Empty> {
        let mut g = self.state.lock().await;
        let st = g.as_mut().ok_or_else(|| err(Code::NOT_FOUND, format!("task {id} not found")))?;
        let want_from = if pause { PStatus::Running } else { PStatus::Paused };
        if st.init.status != want_from {
            return Err(err(Code::FAILED_PRECONDITION, format!("task {id} is {:?}, not {want_from:?}", st.init.status)));
        }
        let r = ag::ContainerRequest { container_id: st.id.clone(), ..Default::default() };
        if pause {
            st.agent.call_default("PauseContainer", |c, ctx| async move { c.pause_container(ctx, &r).await }).await.map_err(agent_err)?;
        } else {
            st.agent.call_default("ResumeContainer", |c, ctx| async move { c.resume_container(ctx, &r).await }).await.map_err(agent_err)?;
        }
        st.init.status = if pause { PStatus::Paused } else { PStatus::Running };
        let cid = st.id.clone();
        drop(g);
        if pause {
            self.publish(TASK_PAUSED_EVENT_TOPIC, Box::new(TaskPaused { container_id: cid, ..Default::default() })).await;
        } else {
            self.publish(TASK_RESUMED_EVENT_TOPIC, Box::new(TaskResumed { container_id: cid, ..Default::default() })).await;
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
    fn only_running_or_paused_tasks_are_checkpointable() {
        assert!(checkpointable("c", PStatus::Running, false).is_ok());
        assert!(checkpointable("c", PStatus::Paused, false).is_ok());
        let e = checkpointable("c", PStatus::Created, false).unwrap_err();
        assert!(e.contains("task c is Created") && e.contains("start it"), "{e}");
        assert!(checkpointable("c", PStatus::Created, true).unwrap_err().contains("not yet restored"));
        assert!(checkpointable("c", PStatus::Stopped, false).unwrap_err().contains("task c is Stopped"));
    }
}
