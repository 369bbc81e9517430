//! One process of a container (its init or an exec): stdio pipes or a terminal, the exit watch.
use std::{
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use nix::fcntl::OFlag;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::{
    cmd,
    container::ContainerError,
    error::io,
    fdio::{ConsoleSocket, FdStream},
    reaper::Reaper,
};

type Result<T> = std::result::Result<T, ContainerError>;

/// runc create/exec deadline: below the host's RPC timeout (a contract in agent-client), so a hung
/// runc is reported as such.
pub use agent_client::RUNC_SPAWN_DEADLINE;

/// Where runc's console sockets are made (one per terminal process, while runc starts it).
const CONSOLE_DIR: &str = "/run/kata-rs/tty";

/// Exit of a process: status code and time.
#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub code: i32,
    pub at: SystemTime,
}

/// One process (container init or exec) and the agent's ends of its stdio pipes.
pub struct Process {
    pid: AtomicU32,
    pub stdin: Mutex<Option<FdStream>>,
    pub stdout: Mutex<Option<FdStream>>,
    pub stderr: Mutex<Option<FdStream>>,
    /// The pseudo-terminal master of a terminal process (for resizing).
    tty: std::sync::Mutex<Option<OwnedFd>>,
    pub exit: watch::Receiver<Option<ExitInfo>>,
    exit_tx: Arc<watch::Sender<Option<ExitInfo>>>,
}

/// The container-side ends of the pipes, handed to runc.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
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
pub enum IoSetup {
    Pipes(ChildStdio),
    Tty(ConsoleSocket, PathBuf),
}

/// Prepares stdio for a process: pipes, or a terminal's console socket.
pub fn prepare_io(terminal: bool) -> Result<(IoSetup, Process)> {
    if terminal {
        // Numbered, not named by the ids: a container id and an exec id (64 hex characters each in
        // CRI, up to 76 in containerd) would not fit a socket path (108 bytes).
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        fs::create_dir_all(CONSOLE_DIR).map_err(io("creating the console socket directory"))?;
        let path = Path::new(CONSOLE_DIR).join(format!("{}.sock", N.fetch_add(1, Ordering::Relaxed)));
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
pub async fn run_with_io(reaper: &Arc<Reaper>, mut cmd: Command, id: &str, mut io_setup: IoSetup, proc_: &mut Process) -> Result<cmd::Output> {
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
            pid: AtomicU32::new(0),
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

    /// The process's pid in the guest (0 before it runs).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// Watches `pid` through the reaper and publishes its exit.
    /// `since`: when the runc command that started the process began (an older status is not its exit).
    /// `kill_cgroup`: a container's init without a PID namespace of its own (it shares the pod's): when
    /// it exits, every other process of the container is killed through its cgroup, as runc's shim does,
    /// so that none of them keeps the container's stdio (and its Stop) open.
    pub fn watch_exit(&self, reaper: &Arc<Reaper>, pid: u32, since: Instant, kill_cgroup: Option<PathBuf>) {
        self.pid.store(pid, Ordering::SeqCst);
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
        let exit = rx.wait_for(Option::is_some).await.map(|e| *e);
        exit.ok().flatten().unwrap_or(ExitInfo { code: 255, at: SystemTime::now() })
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
