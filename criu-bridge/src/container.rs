//! The agent's table of containers and each container's state machine. The table's lock covers a
//! lookup, a reservation and a removal only; a container's lock is a plain (synchronous) mutex, so it
//! cannot be held across runc or CRIU: a long operation claims a transient state in one critical
//! section and commits (or rolls back, also when its caller goes away) in another.
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::Notify;
use tracing::info;

pub use crate::error::ContainerError;
use crate::error::io;
use crate::state::{can, Claim, Entry, ExecReservation, Op, Reservation, Status, Table};
use crate::{
    bundle, criu, network,
    process::{prepare_io, run_with_io, ChildStdio, IoSetup, Process},
    reaper::Reaper,
    runc,
};

pub use crate::runc::{CONTAINERS_DIR, RUNC};

type Result<T> = std::result::Result<T, ContainerError>;

pub struct Container {
    pub init: Arc<Process>,
    pub(crate) execs: HashMap<String, Arc<Process>>,
    /// Exec ids whose runc exec runs (reserved, so a second exec of the same id is refused).
    pub(crate) exec_reserved: HashSet<String>,
    pub status: Status,
    /// Stdio for the first start/restore, kept until runc takes it.
    pub(crate) pending_stdio: Option<ChildStdio>,
    /// Extra guest paths the host asked to treat as external mounts (checked at checkpoint).
    pub external_mounts: Vec<String>,
    /// The container's named network namespace (`network::NETNS_DIR/<id>`), when its spec asks for one.
    pub netns: Option<String>,
    /// The container's cgroup, when its init has no PID namespace of its own: emptied when the init exits.
    pub(crate) kill_cgroup: Option<PathBuf>,
    /// The container's cgroup (v2), read for its OOM kills.
    pub(crate) cgroup: PathBuf,
}

/// Which pod a container is part of, and the namespaces it shares with the pod's sandbox container.
#[derive(Debug, Default, Clone)]
pub struct PodJoin {
    pub sandbox_id: String,
    pub namespaces: Vec<String>,
}

/// The agent's table of containers.
pub struct Containers {
    pub reaper: Arc<Reaper>,
    table: Arc<Mutex<Table>>,
    criu: criu::Verdict,
}

/// How long a Remove waits for a start, restore, pause or resume in flight to end.
const REMOVE_WAITS: Duration = Duration::from_secs(120);

fn valid_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || id.starts_with('.') {
        return Err(ContainerError::Invalid(format!("id {id:?} must be 1-128 of [A-Za-z0-9_.-] and not start with '.'")));
    }
    Ok(())
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Containers {
        Containers { reaper, table: Arc::default(), criu: criu::Verdict::default() }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Entry>> {
        self.table().live.get(id).cloned().ok_or_else(|| ContainerError::NotFound(id.into()))
    }

    /// Claims `op`'s transient state if the transition table allows it.
    fn claim(&self, id: &str, entry: &Arc<Entry>, op: Op) -> Result<Claim> {
        Self::claim_locked(id, entry, &mut entry.lock(), op)
    }

    fn claim_locked(id: &str, entry: &Arc<Entry>, c: &mut Container, op: Op) -> Result<Claim> {
        can(op, c.status, c.pending_stdio.is_some(), c.init.exited().is_some()).map_err(|why| ContainerError::Precondition(format!("container {id}: {why}")))?;
        let before = c.status;
        c.status = op.claims();
        Ok(Claim { entry: entry.clone(), before, done: false })
    }

    /// The container's cgroup (taken before a wait, which needs nothing of the container after the exit).
    pub fn cgroup(&self, id: &str) -> Option<PathBuf> {
        Some(self.get(id).ok()?.lock().cgroup.clone())
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let e = self.get(id)?;
        let c = e.lock();
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs.get(exec_id).cloned().ok_or_else(|| ContainerError::ProcessNotFound { id: id.into(), exec_id: exec_id.into() })
    }

    fn reserve(&self, id: &str) -> Result<Reservation> {
        let mut t = self.table();
        if t.live.contains_key(id) || !t.reserved.insert(id.to_string()) {
            return Err(ContainerError::Exists(id.into()));
        }
        Ok(Reservation { table: self.table.clone(), id: id.into() })
    }

    /// Writes the bundle and, unless it will be restored from images, runs `runc create`.
    pub async fn create(&self, id: &str, spec: &[u8], rootfs: &str, external_mounts: Vec<String>, for_restore: bool, pod: &PodJoin) -> Result<u32> {
        valid_id(id)?;
        if !pod.sandbox_id.is_empty() {
            valid_id(&pod.sandbox_id)?;
        }
        let reservation = self.reserve(id)?;
        let bundle::Bundle { mut spec, cgroups_path, terminal, wants_netns } = bundle::prepare(id, spec, rootfs, for_restore, pod)?;
        if terminal && for_restore {
            return Err(ContainerError::Invalid("restoring a terminal container is not supported yet".into()));
        }
        let joins_pod = !pod.sandbox_id.is_empty() && pod.sandbox_id != id;
        if joins_pod {
            self.join_sandbox_namespaces(&mut spec, pod)?;
        }
        let kill_cgroup = (!bundle::has_own_pid_ns(&spec)).then(|| bundle::cgroup_dir(&cgroups_path));
        if for_restore {
            bundle::write_restore_conf().map_err(io("writing the CRIU restore configuration"))?;
        }
        let dir = runc::bundle(id);
        fs::create_dir_all(&dir).map_err(io("creating the bundle"))?;
        let netns = if wants_netns && joins_pod && pod.namespaces.iter().any(|n| n == "network") {
            // The pod's namespace (made for its sandbox container): joined, not owned.
            let path = format!("{}/{}", network::NETNS_DIR, pod.sandbox_id);
            if !std::path::Path::new(&path).exists() {
                return Err(ContainerError::Precondition(format!("the network namespace of pod {} is gone (its sandbox container was removed?)", pod.sandbox_id)));
            }
            bundle::set_ns_path(&mut spec, "network", &path);
            None
        } else if wants_netns {
            let path = network::create_netns(&self.reaper, id).await.map_err(|e| ContainerError::Runc { what: "creating the network namespace".into(), detail: e })?;
            bundle::set_ns_path(&mut spec, "network", &path);
            Some(id.to_string())
        } else {
            None
        };
        let owns_netns = netns.is_some();
        let undo = |e: ContainerError| self.undo_create(id, owns_netns, e);
        if let Err(e) = fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec).unwrap()) {
            return Err(undo(io("writing config.json")(e)).await);
        }
        let (io_setup, mut init) = match prepare_io(terminal) {
            Ok(x) => x,
            Err(e) => return Err(undo(e).await),
        };
        let pending = match io_setup {
            IoSetup::Pipes(child) if for_restore => Some(child),
            IoSetup::Tty(..) if for_restore => unreachable!("refused above"),
            io_setup => {
                let pid_file = dir.join("init.pid");
                let mut c = runc::command(id, ["create", "--bundle"]);
                c.arg(&dir).arg("--pid-file").arg(&pid_file);
                let since = Instant::now();
                let out = match run_with_io(&self.reaper, c, id, io_setup, &mut init).await {
                    Ok(out) => out,
                    Err(e) => return Err(undo(e).await),
                };
                if let Err(e) = runc::check(id, "runc create", out) {
                    return Err(undo(e).await);
                }
                let pid = runc::read_pid(&pid_file)?;
                init.watch_exit(&self.reaper, pid, since, kill_cgroup.clone());
                None
            }
        };
        let pid = init.pid();
        let c = Container {
            init: Arc::new(init),
            execs: HashMap::new(),
            exec_reserved: HashSet::new(),
            status: Status::Created,
            pending_stdio: pending,
            external_mounts,
            netns,
            kill_cgroup,
            cgroup: bundle::cgroup_dir(&cgroups_path),
        };
        reservation.fill(Arc::new(Entry { state: Mutex::new(c), settled: Notify::new() }));
        info!(id, for_restore, pid, "container created");
        Ok(pid)
    }

    /// Removes what a failed create made (its bundle, its own network namespace); returns `e`.
    async fn undo_create(&self, id: &str, owns_netns: bool, e: ContainerError) -> ContainerError {
        let _ = fs::remove_dir_all(runc::bundle(id));
        if owns_netns {
            network::delete_netns(&self.reaper, id).await;
        }
        e
    }

    /// Points the IPC, UTS and PID namespaces a pod container shares (the shim says which: their host
    /// paths named the sandbox's) at the sandbox init's namespaces in this guest.
    fn join_sandbox_namespaces(&self, spec: &mut Value, pod: &PodJoin) -> Result<()> {
        let kinds: Vec<&str> = pod.namespaces.iter().map(String::as_str).filter(|k| matches!(*k, "ipc" | "uts" | "pid")).collect();
        if kinds.is_empty() {
            return Ok(());
        }
        let sandbox = self.get(&pod.sandbox_id).map_err(|_| ContainerError::Precondition(format!("pod {}: its sandbox container is not in this VM", pod.sandbox_id)))?;
        let pid = sandbox.lock().init.pid();
        if pid == 0 {
            return Err(ContainerError::Precondition(format!("pod {}: its sandbox container has no process", pod.sandbox_id)));
        }
        for k in kinds {
            bundle::set_ns_path(spec, k, &format!("/proc/{pid}/ns/{k}"));
        }
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<u32> {
        let e = self.get(id)?;
        let claim = self.claim(id, &e, Op::Start)?;
        runc::run(&self.reaper, id, &["start", id], Some(Duration::from_secs(60))).await?;
        let pid = e.lock().init.pid();
        claim.commit(|c| c.status = Status::Running);
        Ok(pid)
    }

    pub async fn exec(&self, id: &str, exec_id: &str, process: &[u8]) -> Result<u32> {
        valid_id(exec_id)?;
        let p: Value = serde_json::from_slice(process).map_err(|e| ContainerError::Invalid(format!("process: {e}")))?;
        let e = self.get(id)?;
        let reservation = {
            let mut c = e.lock();
            if c.execs.contains_key(exec_id) || c.exec_reserved.contains(exec_id) {
                return Err(ContainerError::Exists(format!("{id}/{exec_id}")));
            }
            if c.status != Status::Running {
                return Err(ContainerError::Precondition(format!("container {id} is {}: only a running container runs an exec", c.status.name())));
            }
            c.exec_reserved.insert(exec_id.into());
            ExecReservation { entry: e.clone(), exec_id: exec_id.into() }
        };
        let terminal = p.get("terminal").and_then(Value::as_bool).unwrap_or(false);
        let dir = runc::bundle(id);
        let pfile = dir.join(format!("exec-{exec_id}.json"));
        let pid_file = dir.join(format!("exec-{exec_id}.pid"));
        fs::write(&pfile, serde_json::to_vec(&p).unwrap()).map_err(io("writing the exec process"))?;
        let (io_setup, mut proc_) = prepare_io(terminal)?;
        let mut c = runc::command(id, ["exec", "-d", "--pid-file"]);
        c.arg(&pid_file).arg("--process").arg(&pfile);
        let since = Instant::now();
        let out = run_with_io(&self.reaper, c, id, io_setup, &mut proc_).await?;
        runc::check(id, "runc exec", out)?;
        let pid = runc::read_pid(&pid_file)?;
        proc_.watch_exit(&self.reaper, pid, since, None);
        reservation.fill(Arc::new(proc_));
        Ok(pid)
    }

    /// Forgets exec `exec_id` of container `id` once it has exited (the host deleted it): its pipes
    /// close and its process files go. Without this every exec kept descriptors in the agent until
    /// the container was removed (the agent ran out of them after about 1,000 execs).
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        valid_id(exec_id)?;
        let e = self.get(id)?;
        {
            let mut c = e.lock();
            let p = c.execs.get(exec_id).ok_or_else(|| ContainerError::ProcessNotFound { id: id.into(), exec_id: exec_id.into() })?;
            if p.exit.borrow().is_none() {
                return Err(ContainerError::Precondition(format!("exec {exec_id} of {id} is still running")));
            }
            c.execs.remove(exec_id);
        }
        let dir = runc::bundle(id);
        for f in [format!("exec-{exec_id}.json"), format!("exec-{exec_id}.pid")] {
            let _ = fs::remove_file(dir.join(f));
        }
        Ok(())
    }

    pub async fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        let signal = Signal::try_from(sig as i32).map_err(|_| ContainerError::Invalid(format!("signal {sig}")))?;
        let target = {
            let e = self.get(id)?;
            let c = e.lock();
            if exec_id.is_empty() {
                c.init.clone()
            } else {
                c.execs.get(exec_id).cloned().ok_or_else(|| ContainerError::ProcessNotFound { id: id.into(), exec_id: exec_id.into() })?
            }
        };
        let name = if exec_id.is_empty() { format!("{id} (the container's init)") } else { format!("{id}/{exec_id}") };
        // As runc's shim: a stopped process answers NotFound, `--all` or not (the rest of a container
        // without a PID namespace of its own was killed with its init's exit).
        if target.exited().is_some() {
            return Err(ContainerError::Finished(name));
        }
        if exec_id.is_empty() && all {
            runc::run(&self.reaper, id, &["kill", "--all", id, &sig.to_string()], Some(Duration::from_secs(30))).await?;
            return Ok(());
        }
        // The process is this agent's (reparented) child: signalled through the reaper, at once (no
        // runc start-up, which takes seconds under TCG while CRIU dumps) and never after it was
        // reaped (its pid may have been reused meanwhile).
        self.reaper.signal(target.pid() as i32, signal).map_err(|_| ContainerError::Finished(name))
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let e = self.get(id)?;
        let claim = self.claim(id, &e, if pause { Op::Pause } else { Op::Resume })?;
        runc::run(&self.reaper, id, &[if pause { "pause" } else { "resume" }, id], Some(Duration::from_secs(60))).await?;
        claim.commit(|c| c.status = if pause { Status::Paused } else { Status::Running });
        Ok(())
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.get(id)?;
        let out = runc::run(&self.reaper, id, &["ps", "--format", "json", id], Some(Duration::from_secs(30))).await?;
        serde_json::from_str::<Vec<u32>>(out.stdout.trim()).map_err(|e| ContainerError::Runc { what: "runc ps".into(), detail: e.to_string() })
    }

    pub async fn stats(&self, id: &str) -> Result<Vec<u8>> {
        self.get(id)?;
        let out = runc::run(&self.reaper, id, &["events", "--stats", id], Some(Duration::from_secs(30))).await?;
        Ok(out.stdout.into_bytes())
    }

    pub async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        self.get(id)?;
        serde_json::from_slice::<Value>(resources).map_err(|e| ContainerError::Invalid(format!("resources: {e}")))?;
        // One file per update: two updates in flight never read each other's.
        let f = runc::bundle(id).join(format!("resources-{}.json", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        fs::write(&f, resources).map_err(io("writing resources"))?;
        let r = runc::run(&self.reaper, id, &["update", "-r", &f.display().to_string(), id], Some(Duration::from_secs(30))).await;
        let _ = fs::remove_file(&f);
        r.map(drop)
    }

    /// Waits until no start, restore, pause or resume is in flight, then claims the removal.
    async fn claim_removal(&self, id: &str, e: &Arc<Entry>) -> Result<Option<Claim>> {
        let until = Instant::now() + REMOVE_WAITS;
        loop {
            let settled = e.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            {
                let mut c = e.lock();
                match c.status {
                    // A second remove of the same container: done when the first is.
                    Status::Removed => return Ok(None),
                    Status::Checkpointing => {
                        return Err(ContainerError::Precondition(format!("container {id} is being checkpointed; kill it or wait for the checkpoint to end")))
                    }
                    s if s.is_transient() => {}
                    _ => return Self::claim_locked(id, e, &mut c, Op::Remove).map(Some),
                }
            }
            if tokio::time::timeout_at(until.into(), settled).await.is_err() {
                return Err(ContainerError::Precondition(format!("container {id} is still {} after {REMOVE_WAITS:?}", e.lock().status.name())));
            }
        }
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        let e = self.get(id)?;
        let Some(claim) = self.claim_removal(id, &e).await? else {
            return Ok(());
        };
        // `delete --force` kills a running container; a never-started restore target (or one whose
        // create failed half-way) has no runc state.
        if runc::has_state(id) {
            runc::run(&self.reaper, id, &["delete", "--force", id], Some(Duration::from_secs(60))).await?;
        }
        let _ = fs::remove_dir_all(runc::bundle(id));
        if e.lock().netns.is_some() {
            network::delete_netns(&self.reaper, id).await;
        }
        self.table().live.remove(id);
        claim.commit(|c| c.status = Status::Removed);
        info!(id, "container removed");
        Ok(())
    }

    /// Configures the container's interfaces (hot-plugged by the host) in its network namespace.
    pub async fn update_network(&self, req: &agent_client::agent::UpdateNetworkRequest) -> Result<()> {
        let ns = self.get(&req.container_id)?.lock().netns.clone();
        let Some(ns) = ns else {
            return Err(ContainerError::Invalid(format!("container {} has no network namespace of its own (its spec lists none)", req.container_id)));
        };
        network::update(&self.reaper, &ns, req).await.map_err(|detail| ContainerError::Runc { what: "configuring the network".into(), detail })
    }

    /// `runc checkpoint` with the options mapped; returns CRIU's stats lines.
    pub async fn checkpoint(&self, req: &agent_client::agent::CheckpointContainerRequest) -> Result<String> {
        let id = req.container_id.as_str();
        let e = self.get(id)?;
        // Before the claim: the first check takes seconds under TCG.
        if let Err(why) = self.criu.get(&self.reaper).await {
            return Err(ContainerError::Precondition(format!("CRIU cannot checkpoint in this VM (criu check, run before the first checkpoint): {why}")));
        }
        let claim = self.claim(id, &e, Op::Checkpoint)?;
        let (init, external_mounts) = {
            let c = e.lock();
            (c.init.clone(), c.external_mounts.clone())
        };
        // Every virtio-fs/9p mount the container sees must be one CRIU is told about.
        let mountinfo = fs::read_to_string(format!("/proc/{}/mountinfo", init.pid())).map_err(io("reading the container's mountinfo"))?;
        let spec: Value = serde_json::from_slice(&fs::read(runc::bundle(id).join("config.json")).map_err(io("reading config.json"))?)
            .map_err(|e| ContainerError::Invalid(format!("config.json: {e}")))?;
        match criu::plan_shared_mounts(&criu::shared_fs_mounts(&mountinfo), &bundle::bind_destinations(&spec), &external_mounts) {
            Ok(plan) => info!(id, ?plan, "shared-filesystem mounts for CRIU"),
            Err(why) => return Err(ContainerError::Precondition(why)),
        }
        for p in [&req.image_path, &req.work_path] {
            if !std::path::Path::new(p).is_absolute() {
                return Err(ContainerError::Invalid(format!("path {p:?} must be absolute")));
            }
            fs::create_dir_all(p).map_err(io(format!("creating {p}")))?;
        }
        // Signals and ps still answer meanwhile; the claim is rolled back after a failure (and a
        // dump that ends the container leaves it Stopped).
        let stats = criu::dump(&self.reaper, id, req, &init).await?;
        if !req.leave_running {
            claim.commit(|c| c.status = Status::Stopped);
        }
        Ok(stats)
    }

    /// `runc restore -d` of a container created with `for_restore`, with the new stdio pipes.
    pub async fn restore(&self, req: &agent_client::agent::RestoreContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        let e = self.get(id)?;
        let claim = self.claim(id, &e, Op::Restore)?;
        let (child, kill_cgroup, init, cgroup) = {
            let mut c = e.lock();
            let child = c.pending_stdio.take().ok_or_else(|| ContainerError::Precondition(format!("container {id}: its stdio was taken")))?;
            (child, c.kill_cgroup.clone(), c.init.clone(), c.cgroup.clone())
        };
        let (pid, since) = criu::restore(&self.reaper, id, req, child, &cgroup).await?;
        init.watch_exit(&self.reaper, pid, since, kill_cgroup);
        claim.commit(|c| c.status = Status::Running);
        Ok(pid)
    }
}
