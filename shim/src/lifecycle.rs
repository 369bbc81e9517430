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
    /// Under the lock only the decision is made (the task is marked released, what it needs is moved
    /// out); the agent call (up to 30 s) and the VM's stop run without the lock, the latter holding
    /// [`TaskService::ending`] so that Shutdown waits for it.
    pub(crate) async fn release(&self, mut g: tokio::sync::MutexGuard<'_, Shim>, id: &str, creating: bool) {
        let Some(r) = Release::take(&mut g, id, creating) else {
            return;
        };
        self.finish_release(g, r).await;
    }

    /// Drops the lock `g` and runs `r` (holding `ending` while it stops the VM).
    async fn finish_release(&self, g: tokio::sync::MutexGuard<'_, Shim>, r: Release) {
        let ending = match r.vm.is_some() {
            true => Some(self.ending.clone().lock_owned().await),
            false => None,
        };
        drop(g);
        r.finish().await;
        drop(ending);
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
                self.release(g, &cid, creating).await;
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
        if req.exec_id.is_empty() {
            self.spawn_oom_watch(agent.clone(), cid.clone());
        }
        self.spawn_waiter(agent, cid, req.exec_id);
        Ok(StartResponse { pid: host_pid, ..Default::default() })
    }

    /// Pause or Resume: the state moves to Pausing/Resuming under the lock, the agent call runs without
    /// it (State, Kill and the pod's other containers answer meanwhile), and the result is committed
    /// unless the process exited in between (its exit wins).
    pub(crate) async fn pause_resume(&self, id: &str, pause: bool) -> ttrpc::Result<Empty> {
        let (want_from, during, to) =
            if pause { (PStatus::Running, PStatus::Pausing, PStatus::Paused) } else { (PStatus::Paused, PStatus::Resuming, PStatus::Running) };
        let (agent, cid) = loop {
            let mut g = self.state.lock().await;
            let st = g.task_mut(id).ok_or_else(|| self.no_task(id))?;
            if st.checkpoint_running() {
                // CRIU freezes and thaws the container itself: a Resume now would thaw what it dumps,
                // a Pause be undone by its thaw. Wait for its end (bounded by its own deadline), as
                // containerd's client resumes a task whose checkpoint call was cut short.
                let mut end = st.checkpointing.subscribe();
                drop(g);
                let _ = end.wait_for(|running| !*running).await;
                continue;
            }
            if st.init.status != want_from {
                return Err(TaskError::precondition(format!("task {id} is {:?}, not {want_from:?}", st.init.status)));
            }
            st.init.status = during;
            break (st.agent.clone(), st.id.clone());
        };
        let r = ag::ContainerRequest { container_id: cid.clone(), ..Default::default() };
        let result = if pause {
            agent.call_default("PauseContainer", |c, ctx| async move { c.pause_container(ctx, &r).await }).await
        } else {
            agent.call_default("ResumeContainer", |c, ctx| async move { c.resume_container(ctx, &r).await }).await
        };
        let mut g = self.state.lock().await;
        let st = g.task_mut(&cid).ok_or_else(|| TaskError::not_found(format!("task {cid} was deleted while it was paused or resumed")))?;
        if st.init.status != during {
            // It exited meanwhile (or its VM went away: then the agent's error says so).
            return Err(match result {
                Err(e) => agent_err(e),
                Ok(_) => TaskError::not_found(format!("task {cid} exited while it was paused or resumed")),
            });
        }
        if let Err(e) = result {
            st.init.status = want_from;
            return Err(agent_err(e));
        }
        st.init.status = to;
        if pause {
            self.events.queue(TASK_PAUSED_EVENT_TOPIC, Box::new(TaskPaused { container_id: cid, ..Default::default() }));
        } else {
            self.events.queue(TASK_RESUMED_EVENT_TOPIC, Box::new(TaskResumed { container_id: cid, ..Default::default() }));
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
            // The guest forgets the exec too (its pipes and files), without the lock and without the
            // caller waiting for a guest that may not answer.
            let (agent, r) = (st.agent.clone(), ag::ProcessRequest { container_id: st.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() });
            tokio::spawn(async move {
                if let Err(e) = agent.call_default("RemoveProcess", |c, ctx| async move { c.remove_process(ctx, &r).await }).await {
                    warn!(error = %e, "the guest did not forget a deleted exec");
                }
            });
            return Ok(DeleteResponse { pid: st.host_pid, exit_status: code, exited_at: Some(ts).into(), ..Default::default() });
        }
        can_delete(&format!("task {}", st.id), st.init.status)?;
        if st.checkpoint_running() {
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
        // Decided and out of the table in one step: a second Delete meanwhile finds no task (NotFound,
        // which containerd takes as deleted); only this one runs the release, the hooks and the event.
        let release = Release::take(&mut g, &cid, creating);
        g.tasks.remove(&cid);
        let left = g.tasks.len();
        if let Some(r) = release {
            self.finish_release(g, r).await;
        } else {
            drop(g);
        }
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
        let vm = g.vm.take();
        if let Some(vm) = vm {
            // A second Shutdown meanwhile waits for this stop (below), as for a release's.
            let ending = self.ending.clone().lock_owned().await;
            drop(g);
            vm.stop(None).await;
            drop(ending);
        } else {
            drop(g);
        }
        // A VM the host is ending itself finishes its teardown first.
        drop(self.ending.lock().await);
        self.events.flush(Duration::from_secs(5)).await;
        self.exit.signal();
        Ok(Empty::new())
    }
}

/// What the release of one task does once the lock is dropped (see [`TaskService::release`]).
pub(crate) struct Release {
    id: String,
    /// The agent, unless the VM is gone.
    agent: Option<agent_client::AgentClient>,
    mounts: crate::mounts::ContainerMounts,
    shared: std::sync::Arc<crate::safefs::Dir>,
    /// Other tasks (or a create) stay in the VM: only this container's mounts go.
    others: bool,
    /// The VM, when no other task is left in it: stopped.
    vm: Option<PodVm>,
}

impl Release {
    /// Under the lock: marks the task released (once) and moves out what its release needs.
    fn take(g: &mut Shim, id: &str, creating: bool) -> Option<Release> {
        // A container being created in the VM counts: the VM stays for it.
        let others = creating || g.tasks.iter().any(|(k, t)| k != id && !t.released);
        let st = g.tasks.get_mut(id)?;
        if st.released {
            return None;
        }
        st.released = true;
        // Images staged for a restore that never ran (deleted before Start).
        if let Some(s) = st.restore_staging.take() {
            s.remove();
        }
        let agent = st.vm_gone.is_none().then(|| st.agent.clone());
        let (mounts, shared) = (st.mounts.take(), st.shared.clone());
        let vm = if others { None } else { g.vm.take() };
        Some(Release { id: id.to_string(), agent, mounts, shared, others, vm })
    }

    async fn finish(mut self) {
        let id = self.id.as_str();
        if let Some(agent) = &self.agent {
            let req = ag::ContainerRequest { container_id: id.to_string(), ..Default::default() };
            if let Err(e) = agent.call("RemoveContainer", Duration::from_secs(30), |c, ctx| async move { c.remove_container(ctx, &req).await }).await {
                warn!(id, error = %e, "the agent could not remove the container");
            }
        }
        if self.others {
            self.mounts.teardown_in_running_vm(&self.shared);
        } else if let Some(vm) = self.vm {
            let vm_id = vm.id.clone();
            vm.stop(Some(&self.mounts)).await;
            info!(vm = %vm_id, "VM stopped: no task left in it");
        } else {
            self.mounts.teardown();
        }
    }
}
