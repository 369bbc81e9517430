//! One process of a task (its init or an exec) as the host tracks it: its state, the checks of
//! which request fits which state, its stdio forwarders and its recorded exit.
use std::sync::Arc;

use agent_client::AgentClient;
use containerd_shim::{api::*, protos::protobuf::well_known_types::timestamp::Timestamp};
use tokio::{sync::watch, task::JoinHandle};

use crate::{error::TaskError, stdio};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PStatus {
    Created,
    /// Start is running (runc start or exec in the guest); reported as created.
    Starting,
    /// Start of a task created from a checkpoint is restoring it; reported as created.
    Restoring,
    Running,
    /// Pause is in the guest (the shim's lock is not held meanwhile); reported as pausing.
    Pausing,
    Paused,
    /// Resume is in the guest; reported as paused until it has returned.
    Resuming,
    Stopped,
}

/// Only a created process can be started.
pub(crate) fn can_start(id: &str, exec_id: &str, status: PStatus) -> Result<(), TaskError> {
    match status {
        PStatus::Created => Ok(()),
        PStatus::Starting | PStatus::Restoring => Err(TaskError::Precondition(format!("process {id}/{exec_id} is already being started"))),
        _ => Err(TaskError::Precondition(format!("process {id}/{exec_id} is not in the created state"))),
    }
}

/// A process can be deleted when it has not started or has stopped; never while it starts, runs or restores.
pub(crate) fn can_delete(id: &str, status: PStatus) -> Result<(), TaskError> {
    match status {
        PStatus::Created | PStatus::Stopped => Ok(()),
        PStatus::Starting | PStatus::Restoring => Err(TaskError::Precondition(format!("{id} is being started; delete it when its start has ended"))),
        PStatus::Running | PStatus::Pausing | PStatus::Paused | PStatus::Resuming => {
            Err(TaskError::Precondition(format!("{id} is still running; kill it first")))
        }
    }
}

pub(crate) type ExitInfo = Option<(u32, Timestamp)>;

/// Waits until a process's exit is recorded: the exit, or `None` when its state is gone.
pub(crate) async fn wait_exit(mut rx: watch::Receiver<ExitInfo>) -> ExitInfo {
    loop {
        if let Some(e) = rx.borrow_and_update().clone() {
            return Some(e);
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

pub(crate) struct Proc {
    /// The guest's pid of the process: for the shim's logs only, never given to containerd.
    pub(crate) guest_pid: u32,
    pub(crate) status: PStatus,
    pub(crate) stdin: String,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) terminal: bool,
    /// Exec processes: the OCI process (JSON), kept until Start.
    pub(crate) spec: Vec<u8>,
    pub(crate) exit_tx: Arc<watch::Sender<ExitInfo>>,
    pub(crate) exit_rx: watch::Receiver<ExitInfo>,
    pub(crate) io: Vec<JoinHandle<()>>,
    /// The stdin forwarder (it ends with containerd's stdin, not with the process): aborted at the exit.
    pub(crate) stdin_io: Option<JoinHandle<()>>,
    /// Tells the stdin forwarder that containerd closed stdin (CloseIO): taken by the first CloseIO.
    pub(crate) stdin_close: Option<tokio::sync::oneshot::Sender<()>>,
    /// The host is ending this process (the guest would not): its exit is [`KILLED_STATUS`], whoever
    /// reports it first.
    pub(crate) ended_by_host: bool,
    /// The guest answered WaitProcess: the exit is recorded once the output has drained (the kill
    /// watchdog does not end a process that is only draining).
    pub(crate) guest_reported_exit: bool,
}

impl Proc {
    pub(crate) fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Proc {
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

    pub(crate) fn start_io(&mut self, agent: &AgentClient, cid: &str, exec_id: &str) {
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
    pub(crate) fn abort_io(&mut self) {
        for h in self.io.drain(..).chain(self.stdin_io.take()) {
            h.abort();
        }
    }
}

/// Only a running or paused task can be checkpointed (containerd pauses before it checkpoints).
pub(crate) fn checkpointable(id: &str, status: PStatus, restore_pending: bool) -> Result<(), TaskError> {
    match status {
        PStatus::Running | PStatus::Paused => Ok(()),
        PStatus::Created if restore_pending => {
            Err(TaskError::Precondition(format!("task {id} is Created (from a checkpoint, not yet restored): start it before checkpointing it")))
        }
        PStatus::Starting | PStatus::Restoring => Err(TaskError::Precondition(format!("task {id} is being started: checkpoint it once it runs"))),
        PStatus::Pausing | PStatus::Resuming => {
            Err(TaskError::Precondition(format!("task {id} is being paused or resumed: checkpoint it once that has returned")))
        }
        PStatus::Created => {
            Err(TaskError::Precondition(format!("task {id} is Created: start it before checkpointing it; only a running or paused task can be checkpointed")))
        }
        PStatus::Stopped => Err(TaskError::Precondition(format!("task {id} is Stopped: only a running or paused task can be checkpointed"))),
    }
}

pub(crate) fn status_of(s: PStatus) -> Status {
    match s {
        PStatus::Created | PStatus::Starting | PStatus::Restoring => Status::CREATED,
        PStatus::Running => Status::RUNNING,
        PStatus::Pausing => Status::PAUSING,
        PStatus::Paused | PStatus::Resuming => Status::PAUSED,
        PStatus::Stopped => Status::STOPPED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Pause and Resume in the guest: still running for Delete and Start, not checkpointable, and
        // containerd sees PAUSING, then PAUSED until Resume has returned.
        for s in [PStatus::Pausing, PStatus::Resuming] {
            assert!(can_delete("task c", s).unwrap_err().to_string().contains("kill it first"));
            assert!(can_start("c", "", s).is_err());
            assert!(checkpointable("c", s, false).unwrap_err().to_string().contains("being paused or resumed"));
        }
        assert_eq!(status_of(PStatus::Pausing), Status::PAUSING);
        assert_eq!(status_of(PStatus::Resuming), Status::PAUSED);
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
}
