//! A container's states, the one table of which operation may begin in which state, and the claims
//! and reservations that hold a transient state across an operation's await.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

use crate::container::Container;

/// A container's state. The transient states are claims of a long operation in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
    /// Removed from the table (a caller that still holds the container sees this).
    Removed,
    Starting,
    Restoring,
    Pausing,
    Resuming,
    /// runc checkpoint runs: signals, ps and stats still answer; pause, resume, exec and remove are
    /// refused until it ends.
    Checkpointing,
    Removing,
}

impl Status {
    pub fn is_transient(self) -> bool {
        matches!(self, Status::Starting | Status::Restoring | Status::Pausing | Status::Resuming | Status::Checkpointing | Status::Removing)
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
            Status::Removed => "removed",
            Status::Starting => "being started",
            Status::Restoring => "being restored",
            Status::Pausing => "being paused",
            Status::Resuming => "being resumed",
            Status::Checkpointing => "being checkpointed",
            Status::Removing => "being removed",
        }
    }
}

/// The long operations, each with the transient state it claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Restore,
    Pause,
    Resume,
    Checkpoint,
    Remove,
}

impl Op {
    pub fn claims(self) -> Status {
        match self {
            Op::Start => Status::Starting,
            Op::Restore => Status::Restoring,
            Op::Pause => Status::Pausing,
            Op::Resume => Status::Resuming,
            Op::Checkpoint => Status::Checkpointing,
            Op::Remove => Status::Removing,
        }
    }
}

/// The one transition table: whether `op` may begin on a container in `status` (`restorable`: it was
/// created for a restore and runc has not taken its stdio; `init_exited`: its init has exited).
pub fn can(op: Op, status: Status, restorable: bool, init_exited: bool) -> std::result::Result<(), String> {
    use Status::*;
    let ok = match (op, status) {
        (_, s) if s.is_transient() => false,
        (_, Removed) => false,
        (Op::Start, Created) => !restorable,
        (Op::Restore, Created) => restorable,
        (Op::Checkpoint, Running | Paused) => !init_exited,
        (Op::Pause | Op::Resume, Created | Running | Paused | Stopped) => true,
        (Op::Remove, _) => true,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let what = match op {
        Op::Start if status == Created => "it was created for a restore: it is started by its restore".to_string(),
        Op::Restore if status == Created => "it was not created for a restore".to_string(),
        Op::Start | Op::Restore => "only a created container can be started or restored".to_string(),
        Op::Checkpoint => "only a running or paused container can be checkpointed".to_string(),
        Op::Pause | Op::Resume | Op::Remove => format!("{op:?} waits for no other operation").to_lowercase(),
    };
    let state = if init_exited && !status.is_transient() && status != Removed { "stopped" } else { status.name() };
    Err(format!("it is {state}: {what}"))
}

/// One container of the table: its state behind a synchronous lock, and a notice of each settled claim.
pub struct Entry {
    pub state: Mutex<Container>,
    pub settled: Notify,
}

impl Entry {
    pub fn lock(&self) -> MutexGuard<'_, Container> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A transient state claimed by a long operation: committed with its outcome, or rolled back to
/// the state before when dropped (the operation failed, or its caller went away).
pub struct Claim {
    pub entry: Arc<Entry>,
    pub before: Status,
    pub done: bool,
}

impl Claim {
    pub fn commit(mut self, f: impl FnOnce(&mut Container)) {
        f(&mut self.entry.lock());
        self.done = true;
        self.entry.settled.notify_waiters();
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            self.entry.lock().status = self.before;
            self.entry.settled.notify_waiters();
        }
    }
}

#[derive(Default)]
pub struct Table {
    pub live: HashMap<String, Arc<Entry>>,
    /// Ids whose create runs.
    pub reserved: HashSet<String>,
}

/// An id reserved for a create in flight: released when dropped, unless the container was inserted.
pub struct Reservation {
    pub table: Arc<Mutex<Table>>,
    pub id: String,
}

impl Reservation {
    /// The create succeeded: the reserved id becomes the live container `entry`, in one step under
    /// the table's lock (no lookup sees neither).
    pub fn fill(self, entry: Arc<Entry>) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.reserved.remove(&self.id);
        t.live.insert(self.id.clone(), entry);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).reserved.remove(&self.id);
    }
}

/// An exec id reserved while its runc exec runs.
pub struct ExecReservation {
    pub entry: Arc<Entry>,
    pub exec_id: String,
}

impl ExecReservation {
    /// The exec started: the reserved exec id becomes the process `p`, in one step under the
    /// container's lock.
    pub fn fill(self, p: Arc<crate::process::Process>) {
        let mut c = self.entry.lock();
        c.exec_reserved.remove(&self.exec_id);
        c.execs.insert(self.exec_id.clone(), p);
    }
}

impl Drop for ExecReservation {
    fn drop(&mut self) {
        self.entry.lock().exec_reserved.remove(&self.exec_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::prepare_io;
    use std::path::PathBuf;

    #[test]
    fn the_transition_table() {
        use Status::*;
        assert!(can(Op::Start, Created, false, false).is_ok());
        assert!(can(Op::Start, Created, true, false).unwrap_err().contains("created for a restore"));
        assert!(can(Op::Restore, Created, true, false).is_ok());
        assert!(can(Op::Restore, Created, false, false).is_err());
        assert!(can(Op::Start, Running, false, false).unwrap_err().contains("it is running"));
        assert!(can(Op::Checkpoint, Running, false, false).is_ok());
        assert!(can(Op::Checkpoint, Paused, false, false).is_ok());
        assert!(can(Op::Checkpoint, Running, false, true).unwrap_err().contains("it is stopped"));
        assert!(can(Op::Checkpoint, Created, false, false).is_err());
        for s in [Starting, Restoring, Pausing, Resuming, Checkpointing, Removing] {
            for op in [Op::Start, Op::Restore, Op::Pause, Op::Resume, Op::Checkpoint, Op::Remove] {
                let e = can(op, s, false, false).unwrap_err();
                assert!(e.contains(s.name()), "{op:?} in {s:?}: {e}");
            }
        }
        assert!(can(Op::Pause, Running, false, false).is_ok() && can(Op::Resume, Paused, false, false).is_ok());
        assert!(can(Op::Remove, Stopped, false, true).is_ok() && can(Op::Remove, Removed, false, false).is_err());
    }


    fn entry(status: Status) -> Arc<Entry> {
        let (_, init) = prepare_io(false).unwrap();
        let c = Container {
            init: Arc::new(init),
            execs: HashMap::new(),
            exec_reserved: HashSet::new(),
            status,
            pending_stdio: None,
            external_mounts: vec![],
            netns: None,
            kill_cgroup: None,
            cgroup: PathBuf::new(),
        };
        Arc::new(Entry { state: Mutex::new(c), settled: Notify::new() })
    }

    #[tokio::test]
    async fn a_claim_is_rolled_back_when_dropped_and_kept_when_committed() {
        let e = entry(Status::Running);
        let claim = Claim { entry: e.clone(), before: Status::Running, done: false };
        e.lock().status = Status::Pausing;
        drop(claim);
        assert_eq!(e.lock().status, Status::Running);
        let claim = Claim { entry: e.clone(), before: Status::Running, done: false };
        claim.commit(|c| c.status = Status::Paused);
        assert_eq!(e.lock().status, Status::Paused);
    }

    #[test]
    fn a_reserved_id_is_taken_until_released() {
        let t: Arc<Mutex<Table>> = Arc::default();
        let reserve = |id: &str| {
            let mut g = t.lock().unwrap();
            (!g.live.contains_key(id) && g.reserved.insert(id.into())).then(|| Reservation { table: t.clone(), id: id.into() })
        };
        let r = reserve("c1").expect("free");
        assert!(reserve("c1").is_none(), "a second create of the same id while the first runs");
        drop(r);
        assert!(reserve("c1").is_some());
    }
}
