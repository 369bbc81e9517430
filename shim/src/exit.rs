//! How a process ends: its waiter, the one place its exit is recorded and published, the SIGKILL
//! watchdog, the host ending what the guest will not, and the VM's watch.

use agent_client::{agent as ag, AgentClient};
use containerd_shim::{
    protos::{events::task::*, topics::*},
    util::timestamp,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{process::*, runtime::*, spec};

impl TaskService {
    /// Waits for a started process to exit, lets its output drain, then records and publishes the exit.
    pub(crate) fn spawn_waiter(&self, agent: AgentClient, cid: String, exec_id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let req = ag::ProcessRequest { container_id: cid.clone(), exec_id: exec_id.clone(), ..Default::default() };
            let (code, reported) = match agent.call("WaitProcess", LONG, |c, ctx| async move { c.wait_process(ctx, &req).await }).await {
                Ok(r) => {
                    let kills = r.oom_kills.max(r.oom_killed as u64);
                    if kills > 0 && exec_id.is_empty() {
                        // Before its exit, as runc's shim does (containerd's CRI then gives the
                        // container the reason OOMKilled), unless the OOM watch published them.
                        let mut g = me.state.lock().await;
                        me.publish_oom_kills(&mut g, &cid, kills);
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

    /// Publishes TaskOOM whenever the guest kernel OOM-kills a process of a running container (a child
    /// killed while the init lives, as runc's shim reports it from the cgroup), by a long poll of the
    /// agent (WaitOom). It ends with the init's exit (which reports the kills it has not seen) or the
    /// agent; a guest answering at once again and again gets at most one event a second.
    pub(crate) fn spawn_oom_watch(&self, agent: AgentClient, cid: String) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let seen = {
                    let g = me.state.lock().await;
                    match g.tasks.get(&cid) {
                        Some(st) if st.init.status != PStatus::Stopped => st.oom_seen,
                        _ => return,
                    }
                };
                let req = ag::WaitOomRequest { container_id: cid.clone(), seen, ..Default::default() };
                let bound = agent_client::OOM_WAIT_MAX + agent_client::OOM_WAIT_SLACK;
                let r = match agent.call("WaitOom", bound, |c, ctx| async move { c.wait_oom(ctx, &req).await }).await {
                    Ok(r) => r,
                    Err(agent_client::AgentError::Timeout { .. }) => {
                        // A guest slowed down (by the memory pressure it should report?): ask again.
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(cid, error = %e, "the OOM watch ends");
                        return;
                    }
                };
                if !me.publish_oom_kills(&mut *me.state.lock().await, &cid, r.oom_kills) {
                    return;
                }
                if r.ended {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    /// Publishes one TaskOOM when the guest's count of OOM kills in `cid`'s cgroup (`kills`) is above
    /// what was published: under the shim's lock, and only while the init runs, so that a TaskOOM never
    /// follows its TaskExit (the host ended it, or the VM's watch did). False once the init has stopped
    /// or the task is gone.
    fn publish_oom_kills(&self, g: &mut Shim, cid: &str, kills: u64) -> bool {
        let Some(st) = g.task_mut(cid).filter(|st| st.init.status != PStatus::Stopped) else { return false };
        if kills > st.oom_seen {
            st.oom_seen = kills;
            info!(cid, kills, "the guest kernel OOM-killed a process of the container");
            self.events.queue(TASK_OOM_EVENT_TOPIC, Box::new(TaskOOM { container_id: cid.into(), ..Default::default() }));
        }
        true
    }

    /// Records a process's exit and publishes it, once: whichever of its waiter and the VM watcher
    /// comes first reports it.
    pub(crate) async fn record_exit(&self, cid: &str, exec_id: &str, code: u32) {
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
    pub(crate) fn commit_exit(&self, p: &mut Proc, cid: &str, exec_id: &str, host_pid: u32, code: u32) {
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
    pub(crate) fn spawn_kill_watchdog(&self, cid: String, exec_id: String) {
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
    pub(crate) async fn force_exit(&self, cid: &str, exec_id: &str, why: &str) {
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
    pub(crate) fn spawn_vm_watch(&self, mut gone: watch::Receiver<Option<String>>) {
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
                let live = |p: &Proc| matches!(p.status, PStatus::Running | PStatus::Pausing | PStatus::Paused | PStatus::Resuming | PStatus::Starting | PStatus::Restoring);
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
}
