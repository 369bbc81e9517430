//! Running guest tools (runc, criu) under the PID-1 reaper, with captured output and a deadline.
use std::{
    io::Read,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tracing::debug;

use crate::reaper::Reaper;

/// Output kept of a tool's stdout/stderr (each).
const MAX_OUTPUT: usize = 4 << 20;

#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == 0 && !self.timed_out
    }
}

fn read_bounded(mut r: impl Read) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if buf.len() < MAX_OUTPUT {
                    buf.extend_from_slice(&chunk[..n.min(MAX_OUTPUT - buf.len())]);
                }
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Runs a command to completion with stdout and stderr captured, killing it after `deadline`.
pub async fn run(reaper: &Arc<Reaper>, program: &str, args: &[String], deadline: Option<Duration>) -> std::io::Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    run_command(reaper, cmd, deadline).await
}

/// Runs a prepared command. Its stdout/stderr are captured when the caller set them to
/// `Stdio::piped()`; otherwise (container stdio handed to runc) the output fields stay empty.
pub async fn run_command(reaper: &Arc<Reaper>, mut cmd: Command, deadline: Option<Duration>) -> std::io::Result<Output> {
    debug!(?cmd, "run");
    let (mut child, exit) = reaper.spawn(&mut cmd)?;
    drop(cmd);
    let pid = exit.pid;
    let out_h = child.stdout.take().map(|out| tokio::task::spawn_blocking(move || read_bounded(out)));
    let err_h = child.stderr.take().map(|err| tokio::task::spawn_blocking(move || read_bounded(err)));
    let wait = exit.wait();
    let (code, timed_out) = match deadline {
        None => (wait.await, false),
        Some(d) => {
            tokio::pin!(wait);
            match tokio::time::timeout(d, &mut wait).await {
                Ok(c) => (c, false),
                Err(_) => {
                    // Through the reaper: the pid is signalled only while it is still this child.
                    let _ = reaper.signal(pid, nix::sys::signal::Signal::SIGKILL);
                    (wait.await, true)
                }
            }
        }
    };
    let stdout = match out_h {
        Some(h) => h.await.unwrap_or_default(),
        None => String::new(),
    };
    let stderr = match err_h {
        Some(h) => h.await.unwrap_or_default(),
        None => String::new(),
    };
    Ok(Output { code, stdout, stderr, timed_out })
}
