//! OCI hooks of the spec, run on the host by the shim (the guest has none of the host's programs).
//!
//! When (runtime spec, "Lifecycle"): `createRuntime` and then `prestart` during create, once the VM
//! runs (the state's pid is QEMU's, so a hook can enter its network namespace) and before the
//! container is created in the guest; `poststart` after Start; `poststop` after Delete. A failing
//! `createRuntime` or `prestart` hook fails the create (and the VM is torn down); a failing
//! `poststart` or `poststop` hook is logged and the lifecycle goes on, as the spec says.
//! `createContainer` and `startContainer` would run in the container's namespaces, which are in the
//! guest: they are not run, and create says so in the log.
//!
//! Each hook gets the state on stdin, runs with exactly its `env`, and is killed at its `timeout`
//! (or at [`DEFAULT_TIMEOUT`] if it has none: a shim call must not hang forever on a hook). Its
//! output is kept (bounded) for the error.
use std::{os::unix::process::CommandExt, path::PathBuf, process::Stdio, time::Duration};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

/// A hook without a timeout is killed after this.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Hooks per point; more is a mistake, not a workload.
pub const MAX_HOOKS: usize = 64;
/// Output of a hook kept for its error message.
const OUTPUT_LIMIT: u64 = 16 << 10;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HookError {
    #[error("config.json hooks: {0}")]
    Invalid(String),
    #[error("{point} hook {path}: {reason}")]
    Failed { point: &'static str, path: String, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    pub path: PathBuf,
    /// argv, `args[0]` included (as execv takes it); empty = the path alone.
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hooks {
    pub create_runtime: Vec<Hook>,
    pub prestart: Vec<Hook>,
    pub poststart: Vec<Hook>,
    pub poststop: Vec<Hook>,
    /// Hooks that would run inside the container's namespaces (in the guest): not run.
    pub not_run: Vec<String>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.create_runtime.is_empty() && self.prestart.is_empty() && self.poststart.is_empty() && self.poststop.is_empty()
    }

    /// Reads `hooks` of a spec. Every hook needs an absolute path; timeouts are positive.
    pub fn from_spec(spec: &Value) -> Result<Hooks, HookError> {
        let mut h = Hooks::default();
        let Some(obj) = spec.get("hooks") else { return Ok(h) };
        let obj = obj.as_object().ok_or_else(|| HookError::Invalid("not an object".into()))?;
        for (point, list) in obj {
            let list = list.as_array().ok_or_else(|| HookError::Invalid(format!("{point}: not a list")))?;
            if list.len() > MAX_HOOKS {
                return Err(HookError::Invalid(format!("{point}: more than {MAX_HOOKS} hooks")));
            }
            let parsed = list.iter().map(|v| parse_hook(point, v)).collect::<Result<Vec<_>, _>>()?;
            match point.as_str() {
                "createRuntime" => h.create_runtime = parsed,
                "prestart" => h.prestart = parsed,
                "poststart" => h.poststart = parsed,
                "poststop" => h.poststop = parsed,
                "createContainer" | "startContainer" => h.not_run.extend(parsed.iter().map(|x| format!("{point}: {}", x.path.display()))),
                other => return Err(HookError::Invalid(format!("unknown hook point {other:?}"))),
            }
        }
        Ok(h)
    }
}

fn parse_hook(point: &str, v: &Value) -> Result<Hook, HookError> {
    let bad = |m: &str| HookError::Invalid(format!("{point}: {m}"));
    let path = v.get("path").and_then(Value::as_str).ok_or_else(|| bad("a hook without a path"))?;
    if !path.starts_with('/') {
        return Err(bad(&format!("hook path {path:?} is not absolute")));
    }
    let strings = |key: &str| -> Result<Vec<String>, HookError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad(&format!("{key} holds a non-string")))).collect(),
            Some(_) => Err(bad(&format!("{key} is not a list"))),
        }
    };
    let timeout = match v.get("timeout") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_u64() {
            Some(s) if s > 0 => Some(Duration::from_secs(s)),
            _ => return Err(bad(&format!("timeout {t} is not a positive number of seconds"))),
        },
    };
    Ok(Hook { path: path.into(), args: strings("args")?, env: strings("env")?, timeout })
}

/// The state given to hooks on stdin (runtime spec, "State").
pub fn state_json(spec: &Value, id: &str, status: &str, pid: u32, bundle: &str) -> Vec<u8> {
    let mut s = serde_json::json!({
        "ociVersion": spec.get("ociVersion").and_then(Value::as_str).unwrap_or("1.0.2"),
        "id": id,
        "status": status,
        "bundle": bundle,
        "annotations": spec.get("annotations").filter(|a| a.is_object()).cloned().unwrap_or_else(|| serde_json::json!({})),
    });
    if pid > 0 {
        s["pid"] = pid.into();
    }
    serde_json::to_vec(&s).expect("serializable")
}

/// Runs `hooks` in order; the first failure stops them and is returned.
pub async fn run_all(point: &'static str, hooks: &[Hook], state: &[u8]) -> Result<(), HookError> {
    for h in hooks {
        run_one(point, h, state).await?;
    }
    Ok(())
}

/// Runs `hooks` in order; failures are logged and the others still run (poststart, poststop).
pub async fn run_all_warn(point: &'static str, hooks: &[Hook], state: &[u8]) {
    for h in hooks {
        if let Err(e) = run_one(point, h, state).await {
            warn!(error = %e, "hook failed; the lifecycle goes on (runtime spec)");
        }
    }
}

async fn run_one(point: &'static str, h: &Hook, state: &[u8]) -> Result<(), HookError> {
    let fail = |reason: String| HookError::Failed { point, path: h.path.display().to_string(), reason };
    let mut cmd = std::process::Command::new(&h.path);
    if let Some((arg0, rest)) = h.args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear();
    for kv in &h.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group, so a timeout kills what the hook started too.
    cmd.process_group(0);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| fail(format!("cannot be started: {e}")))?;
    let pid = child.id().unwrap_or(0);
    let mut stdin = child.stdin.take().expect("piped");
    let out = tokio::spawn(read_bounded(child.stdout.take()));
    let err = tokio::spawn(read_bounded(child.stderr.take()));
    let limit = h.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let work = async {
        // A hook may not read its stdin: a closed pipe is not its failure.
        let _ = stdin.write_all(state).await;
        drop(stdin);
        child.wait().await
    };
    let status = match tokio::time::timeout(limit, work).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(fail(format!("waiting for it: {e}"))),
        Err(_) => {
            if pid > 1 {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
            return Err(fail(format!("did not finish within its timeout of {}s and was killed", limit.as_secs())));
        }
    };
    if status.success() {
        info!(point, path = %h.path.display(), "hook ran");
        return Ok(());
    }
    // What it printed; a daemon it left behind may hold the pipes open, so wait for them only briefly.
    let grace = Duration::from_secs(1);
    let o = tokio::time::timeout(grace, out).await.ok().and_then(Result::ok).unwrap_or_default();
    let e = tokio::time::timeout(grace, err).await.ok().and_then(Result::ok).unwrap_or_default();
    let text = format!("{}{}", String::from_utf8_lossy(&o), String::from_utf8_lossy(&e));
    Err(fail(format!("{status}; its output: {}", text.trim())))
}

/// At most [`OUTPUT_LIMIT`] bytes of a hook's stdout or stderr.
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
    let mut v = Vec::new();
    if let Some(r) = r {
        let _ = r.take(OUTPUT_LIMIT).read_to_end(&mut v).await;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn hook(path: &std::path::Path, args: &[&str], env: &[&str], timeout: Option<u64>) -> Hook {
        Hook { path: path.into(), args: args.iter().map(|s| s.to_string()).collect(), env: env.iter().map(|s| s.to_string()).collect(), timeout: timeout.map(Duration::from_secs) }
    }

    #[test]
    fn parses_the_points_and_rejects_bad_hooks() {
        let spec = serde_json::json!({"hooks": {
            "createRuntime": [{"path": "/bin/a", "args": ["a", "x"], "env": ["K=V"], "timeout": 5}],
            "prestart": [{"path": "/bin/b"}],
            "poststart": [{"path": "/bin/c"}],
            "poststop": [{"path": "/bin/d"}],
            "createContainer": [{"path": "/bin/e"}]
        }});
        let h = Hooks::from_spec(&spec).unwrap();
        assert_eq!(h.create_runtime, [Hook { path: "/bin/a".into(), args: vec!["a".into(), "x".into()], env: vec!["K=V".into()], timeout: Some(Duration::from_secs(5)) }]);
        assert_eq!((h.prestart.len(), h.poststart.len(), h.poststop.len()), (1, 1, 1));
        assert_eq!(h.not_run, ["createContainer: /bin/e"]);
        for bad in [
            serde_json::json!({"hooks": {"prestart": [{"path": "rel"}]}}),
            serde_json::json!({"hooks": {"prestart": [{"args": []}]}}),
            serde_json::json!({"hooks": {"prestart": [{"path": "/a", "timeout": 0}]}}),
            serde_json::json!({"hooks": {"prestart": [{"path": "/a", "env": "K=V"}]}}),
            serde_json::json!({"hooks": {"afterparty": []}}),
            serde_json::json!({"hooks": []}),
        ] {
            assert!(matches!(Hooks::from_spec(&bad), Err(HookError::Invalid(_))), "{bad}");
        }
        assert!(Hooks::from_spec(&serde_json::json!({})).unwrap().is_empty());
    }

    #[test]
    fn state_has_the_pid_and_annotations() {
        let spec = serde_json::json!({"ociVersion": "1.1.0", "annotations": {"a": "b"}});
        let s: Value = serde_json::from_slice(&state_json(&spec, "c1", "created", 42, "/b")).unwrap();
        assert_eq!(s, serde_json::json!({"ociVersion": "1.1.0", "id": "c1", "status": "created", "pid": 42, "bundle": "/b", "annotations": {"a": "b"}}));
        let s: Value = serde_json::from_slice(&state_json(&spec, "c1", "stopped", 0, "/b")).unwrap();
        assert!(s.get("pid").is_none());
    }

    #[tokio::test]
    async fn a_hook_gets_the_state_its_args_and_only_its_env() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        // argv as execv takes it: args[0] is the hook's $0 here, not its path.
        let body = format!("/bin/cat > {o}.stdin; echo \"$0 $1 $K ${{HOME:-nohome}}\" > {o}.args", o = out.display());
        run_all("prestart", &[hook(Path::new("/bin/sh"), &["sh", "-c", &body, "myname", "one"], &["K=V"], None)], b"{\"id\":\"c\"}").await.unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("out.stdin")).unwrap(), "{\"id\":\"c\"}");
        assert_eq!(std::fs::read_to_string(d.path().join("out.args")).unwrap(), "myname one V nohome\n");
    }

    #[tokio::test]
    async fn a_failing_hook_stops_the_rest_and_says_why() {
        let d = tempfile::tempdir().unwrap();
        let bad = script(d.path(), "bad", "echo no network for you >&2; exit 3");
        let later = script(d.path(), "later", &format!("touch {}", d.path().join("ran").display()));
        let e = run_all("createRuntime", &[hook(&bad, &[], &[], None), hook(&later, &[], &[], None)], b"{}").await.unwrap_err();
        let m = e.to_string();
        assert!(m.contains("createRuntime hook") && m.contains("exit status: 3") && m.contains("no network for you"), "{m}");
        assert!(!d.path().join("ran").exists());
        // Warn-only points run every hook.
        run_all_warn("poststop", &[hook(&bad, &[], &[], None), hook(&later, &[], &[], None)], b"{}").await;
        assert!(d.path().join("ran").exists());
        let e = run_all("prestart", &[hook(&d.path().join("missing"), &[], &[], None)], b"{}").await.unwrap_err();
        assert!(e.to_string().contains("cannot be started"), "{e}");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("child");
        let p = script(d.path(), "slow", &format!("sleep 300 & echo $! > {}; wait", pidfile.display()));
        let t = std::time::Instant::now();
        let e = run_all("prestart", &[hook(&p, &[], &[], Some(1))], b"{}").await.unwrap_err();
        assert!(e.to_string().contains("timeout of 1s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(30));
        let child: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        assert!(child > 1);
        // Reaped by nobody here (the test process is not its parent): gone or a zombie.
        std::thread::sleep(Duration::from_millis(300));
        let st = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        assert!(st.is_empty() || st.contains(") Z"), "the hook's child still runs: {st}");
    }
}
