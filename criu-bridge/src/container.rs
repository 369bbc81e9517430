//! Containers run by runc inside the guest: bundles, processes, stdio pipes, exits.
use std::{
    collections::HashMap,
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, SystemTime},
};

use nix::{fcntl::OFlag, sys::signal::Signal};
use serde_json::Value;
use tokio::sync::{watch, Mutex, OnceCell};
use tracing::{info, warn};

use crate::{
    cmd,
    fdio::{ConsoleSocket, FdStream},
    network,
    reaper::Reaper,
};

pub const RUNC: &str = "/usr/sbin/runc";
pub const RUNC_ROOT: &str = "/run/runc";
/// Bundles, runc logs, exec process files.
pub const CONTAINERS_DIR: &str = "/run/kata-rs/containers";
/// CRIU options of every restore (runc reads them from the file the `org.criu.config` annotation names).
const CRIU_RESTORE_CONF: &str = "/run/kata-rs/criu-restore.conf";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("process {exec_id} of container {id} not found")]
    ProcessNotFound { id: String, exec_id: String },
    #[error("container {0} already exists")]
    Exists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A signal for a process that has exited: containerd's NotFound, as runc's shim answers.
    #[error("process {0} already finished")]
    Finished(String),
    #[error("{what} failed: {detail}")]
    Runc { what: String, detail: String },
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

type Result<T> = std::result::Result<T, ContainerError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let w = what.into();
    move |e| ContainerError::Io(w, e)
}

/// Exit of a process: status code and time.
#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub code: i32,
    pub at: SystemTime,
}

/// One process (container init or exec) and the agent's ends of its stdio pipes.
pub struct Process {
    pid: std::sync::atomic::AtomicU32,
    pub stdin: Mutex<Option<FdStream>>,
    pub stdout: Mutex<Option<FdStream>>,
    pub stderr: Mutex<Option<FdStream>>,
    /// The pseudo-terminal master of a terminal process (for resizing).
    tty: std::sync::Mutex<Option<OwnedFd>>,
    pub exit: watch::Receiver<Option<ExitInfo>>,
    exit_tx: Arc<watch::Sender<Option<ExitInfo>>>,
}

/// The container-side ends of the pipes, handed to runc.
struct ChildStdio {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

fn make_pipes() -> Result<(ChildStdio, FdStream, FdStream, FdStream)> {
    let p = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ContainerError::Io("pipe2".into(), e.into()));
    let (in_r, in_w) = p()?;
    let (out_r, out_w) = p()?;
    let (err_r, err_w) = p()?;
    let stdin = FdStream::new(in_w).map_err(io("stdin pipe"))?;
    let stdout = FdStream::new(out_r).map_err(io("stdout pipe"))?;
    let stderr = FdStream::new(err_r).map_err(io("stderr pipe"))?;
    Ok((ChildStdio { stdin: in_r, stdout: out_w, stderr: err_w }, stdin, stdout, stderr))
}

/// How a process's stdio is set up: pipes, or a terminal whose master runc sends to a console socket.
enum IoSetup {
    Pipes(ChildStdio),
    Tty(ConsoleSocket, PathBuf),
}

/// Where runc's console sockets are made (one per terminal process, while runc starts it).
const CONSOLE_DIR: &str = "/run/kata-rs/tty";

/// Prepares stdio for a process: pipes, or a terminal's console socket.
fn prepare_io(terminal: bool) -> Result<(IoSetup, Process)> {
    if terminal {
        // Numbered, not named by the ids: a container id and an exec id (64 hex characters each in
        // CRI, up to 76 in containerd) would not fit a socket path (108 bytes).
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        fs::create_dir_all(CONSOLE_DIR).map_err(io("creating the console socket directory"))?;
        let path = Path::new(CONSOLE_DIR).join(format!("{}.sock", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let sock = ConsoleSocket::bind(&path).map_err(io("binding the console socket"))?;
        return Ok((IoSetup::Tty(sock, path), Process::new(None, None, None)));
    }
    let (child, stdin, stdout, stderr) = make_pipes()?;
    Ok((IoSetup::Pipes(child), Process::new(Some(stdin), Some(stdout), Some(stderr))))
}

impl IoSetup {
    /// Gives runc its stdio (pipes) or its console socket (terminal).
    fn apply(&mut self, cmd: &mut Command) {
        match self {
            IoSetup::Pipes(c) => {
                let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null());
                cmd.stdin(dup(&c.stdin)).stdout(dup(&c.stdout)).stderr(dup(&c.stderr));
            }
            IoSetup::Tty(_, path) => {
                cmd.arg("--console-socket").arg(path.as_os_str()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
    }
}

/// Runs a prepared runc command (create/exec) and, for a terminal, receives the pty master meanwhile.
/// `cmd` holds runc's flags; the container id is appended after the stdio flags.
/// runc create/exec deadline: below the host's 60 s RPC timeout, so a hung runc is reported as such.
const RUNC_SPAWN_DEADLINE: Duration = Duration::from_secs(45);

async fn run_with_io(reaper: &Arc<Reaper>, mut cmd: Command, id: &str, io_setup: IoSetup, proc_: &mut Process) -> Result<cmd::Output> {
    let mut io_setup = io_setup;
    io_setup.apply(&mut cmd);
    cmd.arg(id);
    match io_setup {
        IoSetup::Pipes(child) => {
            let out = cmd::run_command(reaper, cmd, Some(RUNC_SPAWN_DEADLINE)).await.map_err(io("running runc"))?;
            drop(child);
            Ok(out)
        }
        IoSetup::Tty(sock, path) => {
            let (out, master) = tokio::join!(cmd::run_command(reaper, cmd, Some(RUNC_SPAWN_DEADLINE)), sock.receive(RUNC_SPAWN_DEADLINE));
            let _ = fs::remove_file(&path);
            let out = out.map_err(io("running runc"))?;
            if out.ok() {
                let master = master.map_err(io("receiving the terminal from runc"))?;
                proc_.attach_tty(master)?;
            }
            Ok(out)
        }
    }
}

impl Process {
    fn new(stdin: Option<FdStream>, stdout: Option<FdStream>, stderr: Option<FdStream>) -> Process {
        let (tx, rx) = watch::channel(None);
        Process {
            pid: std::sync::atomic::AtomicU32::new(0),
            stdin: Mutex::new(stdin),
            stdout: Mutex::new(stdout),
            stderr: Mutex::new(stderr),
            tty: std::sync::Mutex::new(None),
            exit: rx,
            exit_tx: Arc::new(tx),
        }
    }

    /// Uses a pty master for stdin and stdout (a terminal has no separate stderr).
    fn attach_tty(&mut self, master: OwnedFd) -> Result<()> {
        let r = FdStream::new(master.try_clone().map_err(io("dup tty"))?).map_err(io("tty"))?;
        let w = FdStream::new(master.try_clone().map_err(io("dup tty"))?).map_err(io("tty"))?;
        *self.stdout.get_mut() = Some(r);
        *self.stdin.get_mut() = Some(w);
        *self.tty.get_mut().unwrap() = Some(master);
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let g = self.tty.lock().unwrap();
        let fd = g.as_ref().ok_or_else(|| ContainerError::Invalid("the process has no terminal".into()))?;
        crate::fdio::resize(std::os::fd::AsRawFd::as_raw_fd(fd), rows, cols).map_err(io("resizing the terminal"))
    }

    /// Watches `pid` through the reaper and publishes its exit.
    pub fn pid(&self) -> u32 {
        self.pid.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `since`: when the runc command that started the process began (an older status is not its exit).
    /// `kill_cgroup`: a container's init without a PID namespace of its own (it shares the pod's): when
    /// it exits, every other process of the container is killed through its cgroup, as runc's shim does,
    /// so that none of them keeps the container's stdio (and its Stop) open.
    fn watch_exit(&self, reaper: &Arc<Reaper>, pid: u32, since: std::time::Instant, kill_cgroup: Option<PathBuf>) {
        self.pid.store(pid, std::sync::atomic::Ordering::SeqCst);
        let tx = self.exit_tx.clone();
        // Registered now, before this returns: from here on a signal reaches this process or nothing.
        let exit = reaper.watch(pid as i32, since);
        tokio::spawn(async move {
            let code = exit.wait().await;
            info!(pid, code, "process exited");
            if let Some(cg) = kill_cgroup {
                kill_cgroup_processes(&cg);
            }
            let _ = tx.send(Some(ExitInfo { code, at: SystemTime::now() }));
        });
    }

    pub fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return ExitInfo { code: 255, at: SystemTime::now() };
            }
        }
    }

    /// Reads up to `max` bytes of stdout or stderr; `Ok(empty)` means end of stream.
    pub async fn read(&self, stderr: bool, max: usize) -> Result<Vec<u8>> {
        let lock = if stderr { &self.stderr } else { &self.stdout };
        let mut g = lock.lock().await;
        let Some(r) = g.as_mut() else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; max.clamp(1, 1 << 20)];
        let n = r.read(&mut buf).await.map_err(io("reading process output"))?;
        if n == 0 {
            *g = None;
        }
        buf.truncate(n);
        Ok(buf)
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let mut g = self.stdin.lock().await;
        let w = g.as_mut().ok_or_else(|| ContainerError::Invalid("stdin is closed".into()))?;
        w.write_all(data).await.map_err(io("writing stdin"))?;
        Ok(data.len())
    }

    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }
}

/// Kills every process of the cgroup `dir` (cgroup v2's `cgroup.kill`, in one go: no process can fork
/// away meanwhile).
fn kill_cgroup_processes(dir: &Path) {
    match fs::write(dir.join("cgroup.kill"), "1") {
        Ok(()) => info!(cgroup = %dir.display(), "the container's init exited: its other processes were killed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(cgroup = %dir.display(), error = %e, "killing the container's remaining processes"),
    }
}

/// The guest cgroup of container `id` (runc's cgroupsPath below the cgroup v2 root).
fn cgroup_dir(cgroups_path: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(cgroups_path.trim_start_matches('/'))
}

/// Whether the kernel OOM-killed a process of the cgroup `dir` (or one below it): its
/// `memory.events` `oom_kill` count.
pub fn oom_killed_in(dir: &Path) -> bool {
    fs::read_to_string(dir.join("memory.events")).is_ok_and(|t| oom_kills(&t) > 0)
}

/// The `oom_kill` count of a cgroup v2 `memory.events` file.
fn oom_kills(events: &str) -> u64 {
    events.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Whether the spec gives the container a PID namespace of its own (one without a path to join).
fn has_own_pid_ns(spec: &Value) -> bool {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|n| n.get("type").and_then(Value::as_str) == Some("pid") && n.get("path").and_then(Value::as_str).unwrap_or("").is_empty()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    /// runc checkpoint runs; the container's lock is not held meanwhile, so signals, ps and stats
    /// still answer. Pause, resume, exec and remove are refused until it ends.
    Checkpointing,
    Stopped,
}

pub struct Container {
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    pub execs: HashMap<String, Arc<Process>>,
    pub status: Status,
    /// Stdio for the first start/restore, kept until runc takes it.
    pending_stdio: Option<ChildStdio>,
    /// Extra guest paths the host asked to treat as external mounts (checked at checkpoint).
    pub external_mounts: Vec<String>,
    /// The container's named network namespace (`network::NETNS_DIR/<id>`), when its spec asks for one.
    pub netns: Option<String>,
    /// The container's cgroup, when its init has no PID namespace of its own: emptied when the init exits.
    kill_cgroup: Option<PathBuf>,
    /// The container's cgroup (v2), read for its OOM kills.
    cgroup: PathBuf,
}

/// Which pod a container is part of, and the namespaces it shares with the pod's sandbox container.
#[derive(Debug, Default, Clone)]
pub struct PodJoin {
    pub sandbox_id: String,
    pub namespaces: Vec<String>,
}

/// Points the spec's namespace of `kind` (when it lists one) at `path`. Returns whether it did.
pub fn set_ns_path(spec: &mut Value, kind: &str, path: &str) -> bool {
    let Some(nss) = spec.pointer_mut("/linux/namespaces").and_then(Value::as_array_mut) else {
        return false;
    };
    for ns in nss.iter_mut() {
        if ns.get("type").and_then(Value::as_str) == Some(kind) {
            if let Some(o) = ns.as_object_mut() {
                o.insert("path".into(), Value::String(path.into()));
                return true;
            }
        }
    }
    false
}

/// virtio-fs and 9p mounts (mount point as the container sees it, fs type) from a mountinfo text.
pub fn shared_fs_mounts(mountinfo: &str) -> Vec<(String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split_whitespace().nth(4)?;
            let fstype = right.split_whitespace().next()?;
            matches!(fstype, "virtiofs" | "9p").then(|| (mp.replace("\\040", " "), fstype.to_string()))
        })
        .collect()
}

/// Destinations of the spec's bind mounts: runc hands each to CRIU as an external mount.
pub fn spec_bind_destinations(spec: &Value) -> Vec<String> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return vec![];
    };
    mounts
        .iter()
        .filter(|m| {
            m.get("type").and_then(Value::as_str) == Some("bind")
                || m.get("options").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| matches!(x.as_str(), Some("bind") | Some("rbind"))))
        })
        .filter_map(|m| m.get("destination").and_then(Value::as_str).map(|d| d.trim_end_matches('/').to_string()))
        .collect()
}

/// How each virtio-fs/9p mount of the container will be dumped; an error names the ones CRIU cannot dump.
pub fn plan_shared_mounts(mounts: &[(String, String)], binds: &[String], extra: &[String]) -> std::result::Result<Vec<String>, String> {
    let mut plan = vec![];
    let mut bad = vec![];
    for (mp, fstype) in mounts {
        let mp_n = if mp == "/" { "/" } else { mp.trim_end_matches('/') };
        if mp_n == "/" {
            plan.push(format!("{mp} ({fstype}): container root, given to CRIU as --root"));
        } else if binds.iter().any(|b| b == mp_n) || extra.iter().any(|b| b == mp_n) {
            plan.push(format!("{mp} ({fstype}): external bind mount (runc passes it to CRIU as ext-mount {mp})"));
        } else {
            bad.push(format!("{mp} ({fstype})"));
        }
    }
    if bad.is_empty() {
        Ok(plan)
    } else {
        Err(format!(
            "CRIU cannot dump these shared-filesystem mounts, which were made inside the container rather than declared as bind mounts in the OCI spec: {}",
            bad.join(", ")
        ))
    }
}

/// `criu check` of this VM: Ok(output) or Err(why), run once before the first checkpoint.
async fn criu_check(reaper: &Arc<Reaper>) -> std::result::Result<String, String> {
    match cmd::run(reaper, "/usr/sbin/criu", &["check".into()], Some(Duration::from_secs(120))).await {
        Ok(o) if o.ok() => Ok(format!("{}{}", o.stdout, o.stderr).trim().to_string()),
        Ok(o) => Err(format!("criu check exited {}{}: {}{}", o.code, if o.timed_out { " (timed out)" } else { "" }, o.stdout, o.stderr).trim().to_string()),
        Err(e) => Err(format!("running criu check: {e}")),
    }
}

/// The agent's table of containers.
pub struct Containers {
    pub reaper: Arc<Reaper>,
    map: Mutex<HashMap<String, Arc<Mutex<Container>>>>,
    /// Verdict of `criu check`, run once before the first checkpoint of this VM.
    criu_verdict: OnceCell<std::result::Result<String, String>>,
}

fn valid_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || id.starts_with('.') {
        return Err(ContainerError::Invalid(format!("id {id:?} must be 1-128 of [A-Za-z0-9_.-] and not start with '.'")));
    }
    Ok(())
}

/// Last error message runc wrote to its JSON log.
fn runc_log_error(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| matches!(v.get("level").and_then(Value::as_str), Some("error") | Some("fatal")))
        .filter_map(|v| v.get("msg").and_then(Value::as_str).map(str::to_string))
        .collect();
    msgs.dedup();
    let tail: Vec<String> = msgs.into_iter().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
    tail.join("; ")
}

/// A runc failure; runc's own message often repeats "<what> failed: ", which is dropped.
fn runc_err(what: String, detail: &str) -> ContainerError {
    let prefix = format!("{what} failed: ");
    let detail = detail.strip_prefix(&prefix).unwrap_or(detail).to_string();
    ContainerError::Runc { what, detail }
}

/// Runs `runc <args>` (global flags added) with captured output; an error names the runc log's message.
pub async fn runc(reaper: &Arc<Reaper>, id: &str, args: &[&str], deadline: Option<Duration>) -> Result<cmd::Output> {
    let log = Path::new(CONTAINERS_DIR).join(id).join("runc.log");
    let mut full = vec!["--root".to_string(), RUNC_ROOT.into(), "--log".into(), log.display().to_string(), "--log-format".into(), "json".into()];
    full.extend(args.iter().map(|s| s.to_string()));
    let out = cmd::run(reaper, RUNC, &full, deadline).await.map_err(io("running runc"))?;
    if !out.ok() {
        let mut detail = runc_log_error(&log);
        if detail.is_empty() {
            detail = out.stderr.trim().to_string();
        }
        if out.timed_out {
            detail = format!("timed out; {detail}");
        }
        return Err(runc_err(format!("runc {}", args.first().unwrap_or(&"")), &detail));
    }
    Ok(out)
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Containers {
        Containers { reaper, map: Mutex::new(HashMap::new()), criu_verdict: OnceCell::new() }
    }

    /// The container's cgroup (taken before a wait: the container's lock is not waited for after
    /// the exit, while runc or CRIU may hold it).
    pub async fn cgroup(&self, id: &str) -> Option<PathBuf> {
        let c = self.get(id).await.ok()?;
        let dir = c.lock().await.cgroup.clone();
        Some(dir)
    }

    pub async fn get(&self, id: &str) -> Result<Arc<Mutex<Container>>> {
        self.map.lock().await.get(id).cloned().ok_or_else(|| ContainerError::NotFound(id.into()))
    }

    pub async fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let c = self.get(id).await?;
        let c = c.lock().await;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs.get(exec_id).cloned().ok_or_else(|| ContainerError::ProcessNotFound { id: id.into(), exec_id: exec_id.into() })
    }

    /// Writes the bundle and, unless it will be restored from images, runs `runc create`.
    pub async fn create(&self, id: &str, spec: &[u8], rootfs: &str, external_mounts: Vec<String>, for_restore: bool, pod: &PodJoin) -> Result<u32> {
        valid_id(id)?;
        if !pod.sandbox_id.is_empty() {
            valid_id(&pod.sandbox_id)?;
        }
        if self.map.lock().await.contains_key(id) {
            return Err(ContainerError::Exists(id.into()));
        }
        let mut spec: Value = serde_json::from_slice(spec).map_err(|e| ContainerError::Invalid(format!("OCI spec: {e}")))?;
        if !Path::new(rootfs).is_absolute() || !Path::new(rootfs).is_dir() {
            return Err(ContainerError::Invalid(format!("rootfs {rootfs} is not a directory in the guest")));
        }
        let obj = spec.as_object_mut().ok_or_else(|| ContainerError::Invalid("OCI spec is not an object".into()))?;
        // The guest's copy of the rootfs, read-only where the spec says so (CRI's readonly_rootfs).
        let readonly = obj.get("root").and_then(|r| r.get("readonly")).and_then(Value::as_bool).unwrap_or(false);
        obj.insert("root".into(), serde_json::json!({"path": rootfs, "readonly": readonly}));
        let linux = obj.entry("linux").or_insert_with(|| serde_json::json!({}));
        // A pod's containers in cgroups under the pod's (the sandbox container's too).
        let cgroups_path = if pod.sandbox_id.is_empty() { format!("/kata-rs/{id}") } else { format!("/kata-rs/{}/{id}", pod.sandbox_id) };
        if let Some(l) = linux.as_object_mut() {
            l.insert("cgroupsPath".into(), Value::String(cgroups_path.clone()));
        }
        let joins_pod = !pod.sandbox_id.is_empty() && pod.sandbox_id != id;
        if joins_pod {
            self.join_sandbox_namespaces(&mut spec, pod).await?;
        }
        let kill_cgroup = (!has_own_pid_ns(&spec)).then(|| cgroup_dir(&cgroups_path));
        let wants_netns = spec
            .pointer("/linux/namespaces")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|n| n.get("type").and_then(Value::as_str) == Some("network")));
        if for_restore {
            // The restored container has new addresses: its established TCP connections come back
            // closed (CRIU's tcp-close; runc takes CRIU options from this file), listeners listen.
            fs::write(CRIU_RESTORE_CONF, "tcp-close\n").map_err(io("writing the CRIU restore configuration"))?;
            if let Some(o) = spec.as_object_mut() {
                let ann = o.entry("annotations").or_insert_with(|| serde_json::json!({}));
                if let Some(a) = ann.as_object_mut() {
                    a.insert("org.criu.config".into(), Value::String(CRIU_RESTORE_CONF.into()));
                }
            }
        }
        let bundle = Path::new(CONTAINERS_DIR).join(id);
        fs::create_dir_all(&bundle).map_err(io("creating the bundle"))?;
        let netns = if wants_netns && joins_pod && pod.namespaces.iter().any(|n| n == "network") {
            // The pod's namespace (made for its sandbox container): joined, not owned.
            let path = format!("{}/{}", network::NETNS_DIR, pod.sandbox_id);
            if !Path::new(&path).exists() {
                return Err(ContainerError::Invalid(format!("the network namespace of pod {} is gone (its sandbox container was removed?)", pod.sandbox_id)));
            }
            set_ns_path(&mut spec, "network", &path);
            None
        } else if wants_netns {
            let path =
                network::create_netns(&self.reaper, id).await.map_err(|e| ContainerError::Runc { what: "creating the network namespace".into(), detail: e })?;
            set_ns_path(&mut spec, "network", &path);
            Some(id.to_string())
        } else {
            None
        };
        if let Err(e) = fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&spec).unwrap()) {
            if netns.is_some() {
                network::delete_netns(&self.reaper, id).await;
            }
            return Err(io("writing config.json")(e));
        }
        let terminal = spec.pointer("/process/terminal").and_then(Value::as_bool).unwrap_or(false);
        if terminal && for_restore {
            return Err(ContainerError::Invalid("restoring a terminal container is not supported yet".into()));
        }
        let (io_setup, mut init) = prepare_io(terminal)?;
        let pending = if for_restore {
            match io_setup {
                IoSetup::Pipes(child) => Some(child),
                IoSetup::Tty(..) => unreachable!("refused above"),
            }
        } else {
            let pid_file = bundle.join("init.pid");
            let mut c = Command::new(RUNC);
            c.args(["--root", RUNC_ROOT, "--log"])
                .arg(bundle.join("runc.log"))
                .args(["--log-format", "json", "create", "--bundle"])
                .arg(&bundle)
                .arg("--pid-file")
                .arg(&pid_file);
            let since = std::time::Instant::now();
            let out = run_with_io(&self.reaper, c, id, io_setup, &mut init).await?;
            if !out.ok() {
                let detail = runc_log_error(&bundle.join("runc.log"));
                let _ = fs::remove_dir_all(&bundle);
                if netns.is_some() {
                    network::delete_netns(&self.reaper, id).await;
                }
                return Err(runc_err("runc create".into(), &detail));
            }
            let pid = read_pid(&pid_file)?;
            init.watch_exit(&self.reaper, pid, since, kill_cgroup.clone());
            None
        };
        let pid = init.pid();
        let c = Container { bundle, init: Arc::new(init), execs: HashMap::new(), status: Status::Created, pending_stdio: pending, external_mounts, netns, kill_cgroup, cgroup: cgroup_dir(&cgroups_path) };
        self.map.lock().await.insert(id.into(), Arc::new(Mutex::new(c)));
        info!(id, for_restore, pid, "container created");
        Ok(pid)
    }

    /// Points the IPC, UTS and PID namespaces a pod container shares (the shim says which: their host
    /// paths named the sandbox's) at the sandbox init's namespaces in this guest.
    async fn join_sandbox_namespaces(&self, spec: &mut Value, pod: &PodJoin) -> Result<()> {
        let kinds: Vec<&str> = pod.namespaces.iter().map(String::as_str).filter(|k| matches!(*k, "ipc" | "uts" | "pid")).collect();
        if kinds.is_empty() {
            return Ok(());
        }
        let sandbox =
            self.get(&pod.sandbox_id).await.map_err(|_| ContainerError::Invalid(format!("pod {}: its sandbox container is not in this VM", pod.sandbox_id)))?;
        let pid = sandbox.lock().await.init.pid();
        if pid == 0 {
            return Err(ContainerError::Invalid(format!("pod {}: its sandbox container has no process", pod.sandbox_id)));
        }
        for k in kinds {
            set_ns_path(spec, k, &format!("/proc/{pid}/ns/{k}"));
        }
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id).await?;
        let mut c = c.lock().await;
        if c.status != Status::Created || c.pending_stdio.is_some() {
            return Err(ContainerError::Invalid(format!("container {id} is not in the created state")));
        }
        runc(&self.reaper, id, &["start", id], Some(Duration::from_secs(60))).await?;
        c.status = Status::Running;
        Ok(c.init.pid())
    }

    pub async fn exec(&self, id: &str, exec_id: &str, process: &[u8]) -> Result<u32> {
        valid_id(exec_id)?;
        let c = self.get(id).await?;
        let mut c = c.lock().await;
        if c.execs.contains_key(exec_id) {
            return Err(ContainerError::Exists(format!("{id}/{exec_id}")));
        }
        if !matches!(c.status, Status::Running) {
            return Err(ContainerError::Invalid(format!("container {id} is not running")));
        }
        let p: Value = serde_json::from_slice(process).map_err(|e| ContainerError::Invalid(format!("process: {e}")))?;
        let terminal = p.get("terminal").and_then(Value::as_bool).unwrap_or(false);
        let pfile = c.bundle.join(format!("exec-{exec_id}.json"));
        let pid_file = c.bundle.join(format!("exec-{exec_id}.pid"));
        fs::write(&pfile, serde_json::to_vec(&p).unwrap()).map_err(io("writing the exec process"))?;
        let (io_setup, mut proc_) = prepare_io(terminal)?;
        let mut cmd_ = Command::new(RUNC);
        cmd_.args(["--root", RUNC_ROOT, "--log"])
            .arg(c.bundle.join("runc.log"))
            .args(["--log-format", "json", "exec", "-d", "--pid-file"])
            .arg(&pid_file)
            .arg("--process")
            .arg(&pfile);
        let since = std::time::Instant::now();
        let out = run_with_io(&self.reaper, cmd_, id, io_setup, &mut proc_).await?;
        if !out.ok() {
            return Err(runc_err("runc exec".into(), &runc_log_error(&c.bundle.join("runc.log"))));
        }
        let pid = read_pid(&pid_file)?;
        proc_.watch_exit(&self.reaper, pid, since, None);
        c.execs.insert(exec_id.into(), Arc::new(proc_));
        Ok(pid)
    }

    pub async fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        let signal = Signal::try_from(sig as i32).map_err(|_| ContainerError::Invalid(format!("signal {sig}")))?;
        let c = self.get(id).await?;
        let c = c.lock().await;
        if exec_id.is_empty() {
            // As runc's shim: a stopped init answers NotFound, `--all` or not (the rest of a container
            // without a PID namespace of its own was killed with its init's exit).
            if c.init.exited().is_some() {
                return Err(ContainerError::Finished(format!("{id} (the container's init)")));
            }
            if !all {
                // The init is this agent's (reparented) child: signalled through the reaper, at once
                // (no runc start-up, which takes seconds under TCG while CRIU dumps) and never after
                // it was reaped.
                return self.reaper.signal(c.init.pid() as i32, signal).map_err(|_| ContainerError::Finished(format!("{id} (the container's init)")));
            }
            let s = (sig).to_string();
            let mut args = vec!["kill"];
            if all {
                args.push("--all");
            }
            args.push(id);
            args.push(&s);
            runc(&self.reaper, id, &args, Some(Duration::from_secs(30))).await?;
            return Ok(());
        }
        let p = c.execs.get(exec_id).ok_or_else(|| ContainerError::ProcessNotFound { id: id.into(), exec_id: exec_id.into() })?;
        if p.exited().is_some() {
            return Err(ContainerError::Finished(format!("{id}/{exec_id}")));
        }
        // Through the reaper: never a pid that was reaped (and may have been reused) meanwhile.
        self.reaper.signal(p.pid() as i32, signal).map_err(|_| ContainerError::Finished(format!("{id}/{exec_id}")))
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.get(id).await?;
        let mut c = c.lock().await;
        if c.status == Status::Checkpointing {
            return Err(ContainerError::Invalid(format!("container {id} is being checkpointed; try again when the checkpoint ends")));
        }
        runc(&self.reaper, id, &[if pause { "pause" } else { "resume" }, id], Some(Duration::from_secs(60))).await?;
        c.status = if pause { Status::Paused } else { Status::Running };
        Ok(())
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.get(id).await?;
        let out = runc(&self.reaper, id, &["ps", "--format", "json", id], Some(Duration::from_secs(30))).await?;
        serde_json::from_str::<Vec<u32>>(out.stdout.trim()).map_err(|e| ContainerError::Runc { what: "runc ps".into(), detail: e.to_string() })
    }

    pub async fn stats(&self, id: &str) -> Result<Vec<u8>> {
        self.get(id).await?;
        let out = runc(&self.reaper, id, &["events", "--stats", id], Some(Duration::from_secs(30))).await?;
        Ok(out.stdout.into_bytes())
    }

    pub async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let c = self.get(id).await?;
        let c = c.lock().await;
        serde_json::from_slice::<Value>(resources).map_err(|e| ContainerError::Invalid(format!("resources: {e}")))?;
        let f = c.bundle.join("resources.json");
        fs::write(&f, resources).map_err(io("writing resources"))?;
        let f = f.display().to_string();
        runc(&self.reaper, id, &["update", "-r", &f, id], Some(Duration::from_secs(30))).await?;
        Ok(())
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id).await?;
        {
            let c = c.lock().await;
            if c.status == Status::Checkpointing {
                return Err(ContainerError::Invalid(format!("container {id} is being checkpointed; kill it or wait for the checkpoint to end")));
            }
            // `delete --force` kills a running container; a never-started restore target has no runc state.
            if c.pending_stdio.is_none() {
                if let Err(e) = runc(&self.reaper, id, &["delete", "--force", id], Some(Duration::from_secs(60))).await {
                    if !e.to_string().contains("does not exist") {
                        return Err(e);
                    }
                }
            }
            let _ = fs::remove_dir_all(&c.bundle);
            if c.netns.is_some() {
                network::delete_netns(&self.reaper, id).await;
            }
        }
        self.map.lock().await.remove(id);
        info!(id, "container removed");
        Ok(())
    }

    /// Configures the container's interfaces (hot-plugged by the host) in its network namespace.
    pub async fn update_network(&self, req: &agent_client::agent::UpdateNetworkRequest) -> Result<()> {
        let c = self.get(&req.container_id).await?;
        let ns = c.lock().await.netns.clone();
        let Some(ns) = ns else {
            return Err(ContainerError::Invalid(format!("container {} has no network namespace of its own (its spec lists none)", req.container_id)));
        };
        network::update(&self.reaper, &ns, req).await.map_err(|detail| ContainerError::Runc { what: "configuring the network".into(), detail })
    }

    /// `runc checkpoint` with the options mapped; returns CRIU's stats lines.
    pub async fn checkpoint(&self, req: &agent_client::agent::CheckpointContainerRequest) -> Result<String> {
        let id = req.container_id.as_str();
        let cont = self.get(id).await?;
        // Before the container's lock is taken: the first check takes seconds under TCG.
        let verdict = self
            .criu_verdict
            .get_or_init(|| async {
                let v = criu_check(&self.reaper).await;
                info!(verdict = ?v, "criu check before the first checkpoint of this VM");
                v
            })
            .await;
        if let Err(why) = verdict {
            return Err(ContainerError::Invalid(format!("CRIU cannot checkpoint in this VM (criu check, run before the first checkpoint): {why}")));
        }
        let mut c = cont.lock().await;
        if !matches!(c.status, Status::Running | Status::Paused) || c.init.exited().is_some() {
            let state = if c.init.exited().is_some() { "stopped".to_string() } else { format!("{:?}", c.status).to_lowercase() };
            return Err(ContainerError::Invalid(format!("container {id} is {state}: only a running or paused container can be checkpointed")));
        }
        // Every virtio-fs/9p mount the container sees must be one CRIU is told about.
        let mountinfo = fs::read_to_string(format!("/proc/{}/mountinfo", c.init.pid())).map_err(io("reading the container's mountinfo"))?;
        let spec: Value = serde_json::from_slice(&fs::read(c.bundle.join("config.json")).map_err(io("reading config.json"))?)
            .map_err(|e| ContainerError::Invalid(format!("config.json: {e}")))?;
        match plan_shared_mounts(&shared_fs_mounts(&mountinfo), &spec_bind_destinations(&spec), &c.external_mounts) {
            Ok(plan) => info!(id, ?plan, "shared-filesystem mounts for CRIU"),
            Err(why) => return Err(ContainerError::Invalid(why)),
        }
        for p in [&req.image_path, &req.work_path] {
            if !Path::new(p).is_absolute() {
                return Err(ContainerError::Invalid(format!("path {p:?} must be absolute")));
            }
            fs::create_dir_all(p).map_err(io(format!("creating {p}")))?;
        }
        let mut args: Vec<String> = vec!["checkpoint".into(), "--image-path".into(), req.image_path.clone(), "--work-path".into(), req.work_path.clone()];
        if req.leave_running {
            args.push("--leave-running".into());
        }
        if req.tcp_established {
            args.push("--tcp-established".into());
        }
        if req.external_unix_sockets {
            args.push("--ext-unix-sk".into());
        }
        if req.shell_job {
            args.push("--shell-job".into());
        }
        if req.file_locks {
            args.push("--file-locks".into());
        }
        for ns in &req.empty_namespaces {
            args.push("--empty-ns".into());
            args.push(ns.clone());
        }
        args.push(id.into());
        // The dump runs without the container's lock (signals and ps still answer); the status says
        // what runs, and is put back (or Stopped after a dump that ends the container) afterwards.
        let before = c.status;
        c.status = Status::Checkpointing;
        let init = c.init.clone();
        drop(c);
        let r = self.run_checkpoint(id, req, &args, &init).await;
        let mut c = cont.lock().await;
        c.status = match (&r, req.leave_running) {
            (Ok(_), false) => Status::Stopped,
            _ => before,
        };
        r
    }

    async fn run_checkpoint(&self, id: &str, req: &agent_client::agent::CheckpointContainerRequest, args: &[String], init: &Process) -> Result<String> {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let deadline = (req.deadline_s > 0).then(|| Duration::from_secs(req.deadline_s as u64));
        let started = std::time::Instant::now();
        if let Err(e) = runc(&self.reaper, id, &argv, deadline).await {
            let timed_out = e.to_string().contains("timed out");
            if timed_out {
                // runc was killed; its CRIU is not. SIGKILL while CRIU injects or cures its parasite
                // leaves a `syscall; int3` or a hardware breakpoint in the task, which then dies of
                // SIGTRAP (compel infect.c: compel_execute_syscall, parasite_fini_seized). Without runc,
                // CRIU fails at its next notification to runc and releases the tasks itself (cure,
                // TASK_ALIVE); the images it still writes are removed under it, which makes it fail
                // sooner. Wait for that, bounded by the host's margin; later, in the background.
                let _ = fs::remove_dir_all(&req.image_path);
                let (verb, left) = if req.already_frozen { ("pause", "paused") } else { ("resume", "running") };
                let released = wait_criu_gone(CRIU_RELEASE_WAIT).await;
                let outcome = if released {
                    if let Err(e) = runc(&self.reaper, id, &[verb, id], Some(Duration::from_secs(30))).await {
                        info!(id, error = %e, "after the deadline: runc {verb} (the container may already be {left})");
                    }
                    let _ = fs::remove_dir_all(&req.image_path);
                    let survived = init.exited().is_none() && Path::new(&format!("/proc/{}", init.pid())).exists();
                    match (survived, init.exited()) {
                        (true, _) => format!("CRIU released it and the container was left {left}"),
                        (false, Some(x)) => format!("the container did not survive it (its init ended with status {})", x.code),
                        (false, None) => "the container did not survive it".to_string(),
                    }
                } else {
                    let (reaper, id_, image_path) = (self.reaper.clone(), id.to_string(), req.image_path.clone());
                    tokio::spawn(async move {
                        if !wait_criu_gone(CRIU_RELEASE_LAST).await {
                            tracing::warn!(id = %id_, "CRIU still runs {CRIU_RELEASE_LAST:?} after the deadline: killed (the container may not survive)");
                            kill_criu();
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let _ = fs::remove_dir_all(&image_path);
                        if let Err(e) = runc(&reaper, &id_, &[verb, &id_], Some(Duration::from_secs(30))).await {
                            info!(id = %id_, error = %e, "after the deadline: runc {verb}");
                        }
                        info!(id = %id_, "CRIU gone after the deadline; container put back {left}");
                    });
                    format!("CRIU is still releasing the container (it stops at its next step; killing it could kill the container); the container is left {left} once it has")
                };
                let e = ContainerError::Runc {
                    what: "runc checkpoint".into(),
                    detail: format!("checkpoint deadline of {} s exceeded; runc was stopped, {outcome}", req.deadline_s),
                };
                return Err(with_criu_log(e, &req.work_path, "dump.log"));
            }
            return Err(with_criu_log(e, &req.work_path, "dump.log"));
        }
        let secs = started.elapsed().as_secs_f64();
        info!(id, secs, leave_running = req.leave_running, "runc checkpoint done");
        Ok(format!("runc_checkpoint_s={secs:.3}\n"))
    }

    /// `runc restore -d` of a container created with `for_restore`, with the new stdio pipes.
    pub async fn restore(&self, req: &agent_client::agent::RestoreContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        let c = self.get(id).await?;
        let mut c = c.lock().await;
        let child = c.pending_stdio.take().ok_or_else(|| ContainerError::Invalid(format!("container {id} was not created for restore")))?;
        fs::create_dir_all(&req.work_path).map_err(io("creating the restore work dir"))?;
        let pid_file = c.bundle.join("init.pid");
        let mut cmd_ = Command::new(RUNC);
        cmd_.args(["--root", RUNC_ROOT, "--log"])
            .arg(c.bundle.join("runc.log"))
            .args(["--log-format", "json", "restore", "-d", "--image-path", &req.image_path, "--work-path", &req.work_path, "--bundle"])
            .arg(&c.bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::from(child.stdin))
            .stdout(Stdio::from(child.stdout))
            .stderr(Stdio::from(child.stderr));
        let deadline = (req.deadline_s > 0).then(|| Duration::from_secs(req.deadline_s as u64));
        let since = std::time::Instant::now();
        let out = cmd::run_command(&self.reaper, cmd_, deadline).await.map_err(io("running runc restore"))?;
        if out.timed_out {
            // The deadline is the caller's (less the host's margin) or the container's: the answer
            // must say so, or a restore cut short reads as a restore that failed on its own.
            let e = ContainerError::Runc {
                what: "runc restore".into(),
                detail: format!(
                    "restore deadline of {} s exceeded; runc restore was stopped and the container was not restored (the checkpoint images are unchanged)",
                    req.deadline_s
                ),
            };
            return Err(with_criu_log(e, &req.work_path, "restore.log"));
        }
        if !out.ok() {
            let e = runc_err("runc restore".into(), &runc_log_error(&c.bundle.join("runc.log")));
            return Err(with_criu_log(e, &req.work_path, "restore.log"));
        }
        let pid = read_pid(&pid_file)?;
        c.init.watch_exit(&self.reaper, pid, since, c.kill_cgroup.clone());
        c.status = Status::Running;
        Ok(pid)
    }
}

/// SIGKILLs every CRIU process in the guest (only checkpoints and restores run CRIU). Each process is
/// pinned with a pidfd before its name is checked, so a pid reused meanwhile is never signalled.
/// How long an answer after a deadline waits for CRIU to release the container (the host allows 30 s
/// past the deadline for the answer).
const CRIU_RELEASE_WAIT: Duration = Duration::from_secs(20);
/// After this, a CRIU that still runs is killed (last resort).
const CRIU_RELEASE_LAST: Duration = Duration::from_secs(600);

/// Pids of running `criu` processes.
fn criu_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim() == "criu").unwrap_or(false))
        .collect()
}

/// Waits until no `criu` runs, at most `limit`; true when none does.
async fn wait_criu_gone(limit: Duration) -> bool {
    let since = std::time::Instant::now();
    loop {
        if criu_pids().is_empty() {
            return true;
        }
        if since.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill_criu() {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        if fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim() == "criu").unwrap_or(false) {
            // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0) };
        }
    }
}

/// Adds CRIU's `Error` lines and the log path to a failed checkpoint/restore.
fn with_criu_log(e: ContainerError, work: &str, name: &str) -> ContainerError {
    let path = Path::new(work).join(name);
    let text = fs::read_to_string(&path).unwrap_or_default();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error (")).collect();
    let mut tail = errors.iter().rev().take(8).rev().cloned().collect::<Vec<_>>().join("\n");
    if tail.is_empty() {
        let lines: Vec<&str> = text.lines().collect();
        tail = lines[lines.len().saturating_sub(5)..].join("\n");
    }
    match e {
        ContainerError::Runc { what, detail } => {
            ContainerError::Runc { what, detail: format!("{detail}\nCRIU errors:\n{tail}\nCRIU log (guest): {}", path.display()) }
        }
        other => other,
    }
}

fn read_pid(p: &Path) -> Result<u32> {
    let s = fs::read_to_string(p).map_err(io(format!("reading {}", p.display())))?;
    s.trim().parse().map_err(|_| ContainerError::Invalid(format!("bad pid file {}: {s:?}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"), 1);
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"), 0);
        assert_eq!(oom_kills(""), 0);
    }

    #[test]
    fn the_spec_joins_the_named_namespace() {
        let mut s = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}]}});
        assert!(set_ns_path(&mut s, "network", "/run/netns/c1"));
        assert!(set_ns_path(&mut s, "ipc", "/proc/7/ns/ipc"));
        assert_eq!(s["linux"]["namespaces"][1]["path"], "/run/netns/c1");
        assert_eq!(s["linux"]["namespaces"][2]["path"], "/proc/7/ns/ipc");
        assert!(s["linux"]["namespaces"][0].get("path").is_none());
        let mut none = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        assert!(!set_ns_path(&mut none, "network", "/run/netns/c1"));
    }

    const MOUNTINFO: &str = "\
2190 2150 0:27 /c1/rootfs / rw,relatime - virtiofs kataShared rw
2191 2190 0:60 / /proc rw,nosuid - proc proc rw
2192 2190 0:27 /data /data rw,relatime - virtiofs kataShared rw
2193 2190 0:61 / /mnt/my\\040share rw - 9p share rw,trans=virtio
2194 2190 0:62 / /dev rw,nosuid - tmpfs tmpfs rw
";

    #[test]
    fn finds_virtiofs_and_9p_mounts() {
        let m = shared_fs_mounts(MOUNTINFO);
        assert_eq!(m, vec![("/".into(), "virtiofs".into()), ("/data".into(), "virtiofs".into()), ("/mnt/my share".into(), "9p".into())]);
    }

    #[test]
    fn plans_root_and_spec_binds_and_names_the_rest() {
        let spec = serde_json::json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": "/x", "options": ["rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/other/", "type": "none", "source": "/y", "options": ["bind", "ro"]}
        ]});
        let binds = spec_bind_destinations(&spec);
        assert_eq!(binds, vec!["/data".to_string(), "/other".to_string()]);
        let m = shared_fs_mounts(MOUNTINFO);
        let err = plan_shared_mounts(&m, &binds, &[]).unwrap_err();
        assert!(err.contains("/mnt/my share (9p)") && !err.contains("/data"), "{err}");
        let plan = plan_shared_mounts(&m, &binds, &["/mnt/my share".into()]).unwrap();
        assert_eq!(plan.len(), 3);
        assert!(plan[0].contains("--root") && plan[1].contains("external"), "{plan:?}");
    }
}
