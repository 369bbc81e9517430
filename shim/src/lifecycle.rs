//! Start (or the restore of a task created from a checkpoint), Kill, Pause and Resume, Delete and
//! Shutdown, and the release of a task from its VM.
use std::time::Duration;

use agent_client::agent as ag;
use containerd_shim::{
    api::*,
    protos::{events::task::*, topics::*, ttrpc},
    util::timestamp,
};
use tracing::{info, warn};

use crate::{
    checkpoint::{self},
    error::TaskError,
    hooks,
    process::*,
    runtime::*,
    spec,
};

impl TaskService {
    /// Takes task `id` out of the VM, once: the agent removes its container and its mounts are undone;
    /// the VM stops when no other task is left in it. The task stays listed (for Delete to report).
    pub(crate) async fn release(g: &mut Shim, id: &str, creating: bool) {
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

    /// Start of a task's init or exec, or the restore of a task created from a checkpoint.
    pub(crate) async fn start_inner(&self, req: StartRequest, request_deadline: Option<Duration>) -> ttrpc::Result<StartResponse> {
        // Under the lock: the checks, the move to Starting/Restoring, and what the agent call needs.
        let (agent, cid, host_pid, restore, staging, deadline, bundle, process) = {
            let mut guard = self.state.lock().await;
            let g = &mut *guard;
            let st = g.tasks.get_mut(&req.id).ok_or_else(|| self.no_task(&req.id))?;
            let restore = req.exec_id.is_empty() && st.restore_pending;
            let status = st.proc_mut(&req.exec_id)?.status;
            can_start(&st.id, &req.exec_id, status)?;
            if let Some(why) = &st.vm_gone {
                return Err(TaskError::vm_gone(format!("task {}: the VM is gone ({why})", st.id)));
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
                return Err(TaskError::vm_gone(format!("process {cid}/{} started (guest pid {pid}) but its VM is gone", req.exec_id)));
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

    pub(crate) async fn pause_resume(&self, id: &str, pause: bool) -> ttrpc::Result<Empty> {
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

    pub(crate) async fn task_start(&self, req: StartRequest, request_deadline: Option<Duration>) -> ttrpc::Result<StartResponse> {
        // Its own task: should ttrpc drop this call at the caller's deadline (a restore outlasts a short
        // one), the start or restore still ends in a state Kill and Delete accept (Running or Stopped).
        let me = self.clone();
        tokio::spawn(async move { me.start_inner(req, request_deadline).await }).await.map_err(|e| TaskError::internal(format!("start task failed: {e}")))?
    }

    pub(crate) async fn task_kill(&self, req: KillRequest) -> ttrpc::Result<Empty> {
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

    pub(crate) async fn task_delete(&self, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
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
    pub(crate) async fn task_shutdown(&self, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
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
}
