//! runc as the agent runs it: one argv builder with the global flags, one way to run a command and
//! read its failure from runc's JSON log.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;

use crate::{cmd, container::ContainerError, reaper::Reaper};

pub const RUNC: &str = "/usr/sbin/runc";
pub const RUNC_ROOT: &str = "/run/runc";
/// Bundles, runc logs, exec process files.
pub const CONTAINERS_DIR: &str = "/run/kata-rs/containers";

type Result<T> = std::result::Result<T, ContainerError>;

/// The bundle of container `id`.
pub fn bundle(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id)
}

/// runc's JSON log of container `id` (every runc command of the container writes it).
pub fn log_path(id: &str) -> PathBuf {
    bundle(id).join("runc.log")
}

/// Whether runc has state for container `id` (it was created or restored and not deleted).
pub fn has_state(id: &str) -> bool {
    Path::new(RUNC_ROOT).join(id).exists()
}

/// `runc --root … --log … --log-format json <args>`: the one place runc's global flags are written.
pub fn command<S: AsRef<std::ffi::OsStr>>(id: &str, args: impl IntoIterator<Item = S>) -> Command {
    let mut c = Command::new(RUNC);
    c.arg("--root").arg(RUNC_ROOT).arg("--log").arg(log_path(id)).args(["--log-format", "json"]).args(args);
    c
}

/// The last error messages runc wrote to its JSON log (at most three).
pub fn log_error(id: &str) -> String {
    log_error_in(&fs::read_to_string(log_path(id)).unwrap_or_default())
}

fn log_error_in(text: &str) -> String {
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
pub fn failure(what: impl Into<String>, detail: &str) -> ContainerError {
    let what = what.into();
    let prefix = format!("{what} failed: ");
    let detail = detail.strip_prefix(&prefix).unwrap_or(detail).to_string();
    ContainerError::Runc { what, detail }
}

/// The outcome of a finished runc command as an error: a typed timeout when the deadline killed
/// it, else runc's logged message (its stderr when the log says nothing).
pub fn check(id: &str, what: &str, out: cmd::Output) -> Result<cmd::Output> {
    if out.ok() {
        return Ok(out);
    }
    let mut detail = log_error(id);
    if detail.is_empty() {
        detail = out.stderr.trim().to_string();
    }
    if out.timed_out {
        return Err(ContainerError::TimedOut { what: what.to_string(), detail });
    }
    Err(failure(what, &detail))
}

/// Runs `runc <args>` for container `id` with captured output.
pub async fn run(reaper: &Arc<Reaper>, id: &str, args: &[&str], deadline: Option<Duration>) -> Result<cmd::Output> {
    let mut c = command(id, args);
    c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let out = cmd::run_command(reaper, c, deadline).await.map_err(|e| ContainerError::Io("running runc".into(), e))?;
    check(id, &format!("runc {}", args.first().unwrap_or(&"")), out)
}

/// The pid runc wrote to a `--pid-file`.
pub fn read_pid(p: &Path) -> Result<u32> {
    let s = fs::read_to_string(p).map_err(|e| ContainerError::Io(format!("reading {}", p.display()), e))?;
    s.trim().parse().map_err(|_| ContainerError::Runc { what: "runc".into(), detail: format!("bad pid file {}: {s:?}", p.display()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_flags_come_first_and_the_log_is_the_containers() {
        let c = command("c1", ["exec", "-d"]);
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(c.get_program(), RUNC);
        assert_eq!(args, ["--root", RUNC_ROOT, "--log", "/run/kata-rs/containers/c1/runc.log", "--log-format", "json", "exec", "-d"]);
    }

    #[test]
    fn the_logs_last_errors_are_the_detail_and_a_timeout_is_typed() {
        let log = "{\"level\":\"info\",\"msg\":\"x\"}\nnot json\n{\"level\":\"error\",\"msg\":\"a\"}\n{\"level\":\"error\",\"msg\":\"a\"}\n{\"level\":\"fatal\",\"msg\":\"b\"}\n";
        assert_eq!(log_error_in(log), "a; b");
        match failure("runc start", "runc start failed: no such container") {
            ContainerError::Runc { what, detail } => assert_eq!((what.as_str(), detail.as_str()), ("runc start", "no such container")),
            other => panic!("{other:?}"),
        }
        let timed = check("no-such-container-here", "runc checkpoint", cmd::Output { code: -9, stdout: String::new(), stderr: "killed".into(), timed_out: true });
        assert!(matches!(timed, Err(ContainerError::TimedOut { ref what, .. }) if what == "runc checkpoint"), "{timed:?}");
        // A failure whose text says "timed out" is not a timeout.
        let text = check("no-such-container-here", "runc checkpoint", cmd::Output { code: 1, stdout: String::new(), stderr: "criu: timed out".into(), timed_out: false });
        assert!(matches!(text, Err(ContainerError::Runc { .. })), "{text:?}");
    }
}
