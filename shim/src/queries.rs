//! Calls that change no lifecycle state: State, Wait, Pids, Stats, Connect, Update, ResizePty,
//! CloseIO, and Exec (which only registers a process for its Start).

use agent_client::agent as ag;
use containerd_shim::{
    api::*,
    protos::{events::task::*, topics::*, ttrpc},
    util::convert_to_any,
};

use crate::{error::TaskError, process::*, runtime::*, stdio};

impl TaskService {
    pub(crate) async fn task_state(&self, req: StateRequest) -> ttrpc::Result<StateResponse> {
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

    pub(crate) async fn task_wait(&self, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
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

    pub(crate) async fn task_exec(&self, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
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

    pub(crate) async fn task_resize_pty(&self, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let (agent, cid) = self.agent_of(&req.id).await?;
        let r = ag::ResizeTtyRequest { container_id: cid, exec_id: req.exec_id, rows: req.height, cols: req.width, ..Default::default() };
        agent.call_default("ResizeTty", |c, ctx| async move { c.resize_tty(ctx, &r).await }).await.map_err(agent_err)?;
        Ok(Empty::new())
    }

    /// Stdin closed by containerd: the forwarder sends what was written before, then closes the guest's
    /// stdin (at once when there is no forwarder: no stdin, or it ended).
    pub(crate) async fn task_close_io(&self, req: CloseIORequest) -> ttrpc::Result<Empty> {
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

    /// The task's processes as host tools may use them: QEMU's pid (as Kata does). The guest's pids are
    /// numbers the guest chose; a host tool that looked them up would find unrelated host processes.
    pub(crate) async fn task_pids(&self, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let g = self.state.lock().await;
        let st = g.tasks.get(&req.id).ok_or_else(|| self.no_task(&req.id))?;
        let processes = vec![containerd_shim::protos::types::task::ProcessInfo { pid: st.host_pid, ..Default::default() }];
        Ok(PidsResponse { processes, ..Default::default() })
    }

    /// The guest's figures of the container, bounded by what the host measures of the whole VM (its
    /// host cgroup, read after the guest answered): `metrics::bound_by_host`.
    pub(crate) async fn task_stats(&self, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
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

    pub(crate) async fn task_update(&self, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let (agent, cid) = self.agent_of(&req.id).await?;
        let r = ag::UpdateContainerRequest { container_id: cid, resources: req.resources.value.clone(), ..Default::default() };
        agent.call_default("UpdateContainer", |c, ctx| async move { c.update_container(ctx, &r).await }).await.map_err(agent_err)?;
        Ok(Empty::new())
    }

    pub(crate) async fn task_connect(&self, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let g = self.state.lock().await;
        let task_pid = g.tasks.get(&req.id).map(|st| st.host_pid).unwrap_or(0);
        Ok(ConnectResponse { shim_pid: std::process::id(), task_pid, version: env!("CARGO_PKG_VERSION").into(), ..Default::default() })
    }
}
