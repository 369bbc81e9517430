//! CRIU in the guest: the `criu check` verdict, the plan for shared-filesystem mounts, runc
//! checkpoint and restore with their deadlines, and CRIU's log in a failure.
use std::{
    fs,
    os::fd::OwnedFd,
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_client::agent::{CheckpointContainerRequest, RestoreContainerRequest};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::{
    cmd,
    container::ContainerError,
    process::{ChildStdio, Process},
    reaper::Reaper,
    runc,
};

type Result<T> = std::result::Result<T, ContainerError>;

pub const CRIU: &str = "/usr/sbin/criu";

/// How long an answer after a deadline waits for CRIU to release the container (the host allows
/// `DEADLINE_SLACK` past the deadline for the answer: a contract in agent-client).
use agent_client::CRIU_RELEASE_WAIT;
/// After this, a CRIU that still runs is killed (last resort).
const CRIU_RELEASE_LAST: Duration = Duration::from_secs(600);

/// The verdict of `criu check` in this VM, taken once, before the first checkpoint.
#[derive(Default)]
pub struct Verdict(OnceCell<std::result::Result<String, String>>);

impl Verdict {
    /// Ok(criu's output), or Err(why CRIU cannot checkpoint here).
    pub async fn get(&self, reaper: &Arc<Reaper>) -> &std::result::Result<String, String> {
        self.0
            .get_or_init(|| async {
                let v = check(reaper).await;
                info!(verdict = ?v, "criu check before the first checkpoint of this VM");
                v
            })
            .await
    }
}

async fn check(reaper: &Arc<Reaper>) -> std::result::Result<String, String> {
    match cmd::run(reaper, CRIU, &["check".into()], Some(Duration::from_secs(120))).await {
        Ok(o) if o.ok() => Ok(format!("{}{}", o.stdout, o.stderr).trim().to_string()),
        Ok(o) => Err(format!("criu check exited {}{}: {}{}", o.code, if o.timed_out { " (timed out)" } else { "" }, o.stdout, o.stderr).trim().to_string()),
        Err(e) => Err(format!("running criu check: {e}")),
    }
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

/// `runc checkpoint`'s arguments for the request's options.
pub fn dump_args(id: &str, req: &CheckpointContainerRequest) -> Vec<String> {
    let mut args: Vec<String> = vec!["checkpoint".into(), "--image-path".into(), req.image_path.clone(), "--work-path".into(), req.work_path.clone()];
    for (on, flag) in [
        (req.leave_running, "--leave-running"),
        (req.tcp_established, "--tcp-established"),
        (req.external_unix_sockets, "--ext-unix-sk"),
        (req.shell_job, "--shell-job"),
        (req.file_locks, "--file-locks"),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    for ns in &req.empty_namespaces {
        args.push("--empty-ns".into());
        args.push(ns.clone());
    }
    args.push(id.into());
    args
}

fn deadline(s: u32) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s as u64))
}

/// `runc checkpoint` of container `id`; returns CRIU's stats lines. After the deadline, the answer
/// says what became of the container.
pub async fn dump(reaper: &Arc<Reaper>, id: &str, req: &CheckpointContainerRequest, init: &Process) -> Result<String> {
    let args = dump_args(id, req);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    match runc::run(reaper, id, &argv, deadline(req.deadline_s)).await {
        Ok(_) => {
            let secs = started.elapsed().as_secs_f64();
            info!(id, secs, leave_running = req.leave_running, "runc checkpoint done");
            Ok(format!("runc_checkpoint_s={secs:.3}\n"))
        }
        Err(ContainerError::TimedOut { .. }) => {
            let outcome = release_after_deadline(reaper, id, req, init).await;
            let e = ContainerError::Runc {
                what: "runc checkpoint".into(),
                detail: format!("checkpoint deadline of {} s exceeded; runc was stopped, {outcome}", req.deadline_s),
            };
            Err(with_log(e, &req.work_path, "dump.log"))
        }
        Err(e) => Err(with_log(e, &req.work_path, "dump.log")),
    }
}

/// runc was killed at the deadline; its CRIU is not. SIGKILL while CRIU injects or cures its parasite
/// leaves a `syscall; int3` or a hardware breakpoint in the task, which then dies of SIGTRAP (compel
/// infect.c: compel_execute_syscall, parasite_fini_seized). Without runc, CRIU fails at its next
/// notification to runc and releases the tasks itself (cure, TASK_ALIVE); the images it still writes
/// are removed under it, which makes it fail sooner. This waits for that, bounded by the host's
/// margin; later, in the background. Returns what became of the container.
async fn release_after_deadline(reaper: &Arc<Reaper>, id: &str, req: &CheckpointContainerRequest, init: &Process) -> String {
    let _ = fs::remove_dir_all(&req.image_path);
    let (verb, left) = if req.already_frozen { ("pause", "paused") } else { ("resume", "running") };
    if wait_gone(CRIU_RELEASE_WAIT).await {
        if let Err(e) = runc::run(reaper, id, &[verb, id], Some(agent_client::CRIU_PUT_BACK)).await {
            info!(id, error = %e, "after the deadline: runc {verb} (the container may already be {left})");
        }
        let _ = fs::remove_dir_all(&req.image_path);
        let survived = init.exited().is_none() && Path::new(&format!("/proc/{}", init.pid())).exists();
        return match (survived, init.exited()) {
            (true, _) => format!("CRIU released it and the container was left {left}"),
            (false, Some(x)) => format!("the container did not survive it (its init ended with status {})", x.code),
            (false, None) => "the container did not survive it".to_string(),
        };
    }
    let (reaper, id, image_path) = (reaper.clone(), id.to_string(), req.image_path.clone());
    tokio::spawn(async move {
        if !wait_gone(CRIU_RELEASE_LAST).await {
            warn!(id, "CRIU still runs {CRIU_RELEASE_LAST:?} after the deadline: killed (the container may not survive)");
            kill_all();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let _ = fs::remove_dir_all(&image_path);
        if let Err(e) = runc::run(&reaper, &id, &[verb, &id], Some(Duration::from_secs(30))).await {
            info!(id, error = %e, "after the deadline: runc {verb}");
        }
        info!(id, "CRIU gone after the deadline; container put back {left}");
    });
    format!("CRIU is still releasing the container (it stops at its next step; killing it could kill the container); the container is left {left} once it has")
}

/// `runc restore -d` of container `id` into its bundle, with the container's stdio; returns the
/// restored init's pid and when runc began.
pub async fn restore(reaper: &Arc<Reaper>, id: &str, req: &RestoreContainerRequest, child: ChildStdio, cgroup: &Path) -> Result<(u32, Instant)> {
    fs::create_dir_all(&req.work_path).map_err(|e| ContainerError::Io("creating the restore work dir".into(), e))?;
    let bundle = runc::bundle(id);
    let pid_file = bundle.join("init.pid");
    let mut c = runc::command(id, ["restore", "-d", "--image-path", &req.image_path, "--work-path", &req.work_path, "--bundle"]);
    c.arg(&bundle).arg("--pid-file").arg(&pid_file).arg(id);
    c.stdin(Stdio::from(child.stdin)).stdout(Stdio::from(child.stdout)).stderr(Stdio::from(child.stderr));
    let since = Instant::now();
    let out = cmd::run_command(reaper, c, deadline(req.deadline_s)).await.map_err(|e| ContainerError::Io("running runc restore".into(), e))?;
    match runc::check(id, "runc restore", out) {
        Ok(_) => Ok((runc::read_pid(&pid_file)?, since)),
        Err(ContainerError::TimedOut { .. }) => {
            // The deadline is the caller's (less the host's margin) or the container's: the answer
            // must say so, or a restore cut short reads as a restore that failed on its own.
            let stopped = stop_restore(id, &[Path::new(&req.work_path), Path::new(&req.image_path)], cgroup).await;
            let e = ContainerError::Runc {
                what: "runc restore".into(),
                detail: format!(
                    "restore deadline of {} s exceeded; runc restore was stopped, {stopped}; the container was not restored (the checkpoint images are unchanged)",
                    req.deadline_s
                ),
            };
            Err(with_log(e, &req.work_path, "restore.log"))
        }
        Err(e) => Err(with_log(e, &req.work_path, "restore.log")),
    }
}

/// After a restore's deadline killed runc: its CRIU (a `criu` with a descriptor below the restore's
/// work or image directory; another container's checkpoint or restore is left alone) is killed, and
/// then every process it had restored into the container's cgroup (nothing of it is the
/// container's yet: no runc state knows them). Says what was done.
async fn stop_restore(id: &str, dirs: &[&Path], cgroup: &Path) -> String {
    let criu: Vec<i32> = dirs.iter().flat_map(|d| pids_using("criu", d)).collect();
    for pid in &criu {
        kill_pinned(*pid, "criu");
    }
    let since = Instant::now();
    while criu.iter().any(|p| is_named(*p, "criu")) && since.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restored = match fs::write(cgroup.join("cgroup.kill"), "1") {
        Ok(()) => "the processes it had restored were killed",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "it had restored no process",
        Err(e) => {
            warn!(id, cgroup = %cgroup.display(), error = %e, "killing what a timed-out restore left");
            "the processes it had restored could not be killed"
        }
    };
    warn!(id, ?criu, restored, "restore deadline: CRIU killed");
    format!("its CRIU ({} process(es)) was killed and {restored}", criu.len())
}

/// Pids of processes named `comm` with a descriptor (or their working directory) below `dir`.
fn pids_using(comm: &str, dir: &Path) -> Vec<i32> {
    let below = |l: std::io::Result<std::path::PathBuf>| l.is_ok_and(|l| l.starts_with(dir));
    all_pids()
        .into_iter()
        .filter(|pid| is_named(*pid, comm))
        .filter(|pid| {
            below(fs::read_link(format!("/proc/{pid}/cwd")))
                || fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| fds.flatten().any(|f| below(fs::read_link(f.path()))))
        })
        .collect()
}

fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries.flatten().filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok()).collect()
}

/// Pids of running `criu` processes.
fn pids() -> Vec<i32> {
    all_pids().into_iter().filter(|pid| is_criu(*pid)).collect()
}

fn is_named(pid: i32, comm: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim() == comm).unwrap_or(false)
}

fn is_criu(pid: i32) -> bool {
    is_named(pid, "criu")
}

/// Waits until no `criu` runs, at most `limit`; true when none does.
async fn wait_gone(limit: Duration) -> bool {
    let since = Instant::now();
    loop {
        if pids().is_empty() {
            return true;
        }
        if since.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGKILLs every CRIU process in the guest (only checkpoints and restores run CRIU). Each process is
/// pinned with a pidfd before its name is checked, so a pid reused meanwhile is never signalled.
fn kill_all() {
    for pid in pids() {
        kill_pinned(pid, "criu");
    }
}

/// SIGKILLs `pid` if it is named `comm`, pinned with a pidfd before the name is checked (a pid reused
/// meanwhile is never signalled).
fn kill_pinned(pid: i32, comm: &str) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    if is_named(pid, comm) {
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0) };
    }
}

/// Adds CRIU's `Error` lines and the log path to a failed checkpoint/restore.
fn with_log(e: ContainerError, work: &str, name: &str) -> ContainerError {
    let path = Path::new(work).join(name);
    let text = fs::read_to_string(&path).unwrap_or_default();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error (")).collect();
    let mut tail = errors.iter().rev().take(8).rev().cloned().collect::<Vec<_>>().join("\n");
    if tail.is_empty() {
        let lines: Vec<&str> = text.lines().collect();
        tail = lines[lines.len().saturating_sub(5)..].join("\n");
    }
    match e {
        ContainerError::Runc { what, detail } => ContainerError::Runc { what, detail: format!("{detail}\nCRIU errors:\n{tail}\nCRIU log (guest): {}", path.display()) },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let binds = crate::bundle::bind_destinations(&spec);
        assert_eq!(binds, vec!["/data".to_string(), "/other".to_string()]);
        let m = shared_fs_mounts(MOUNTINFO);
        let err = plan_shared_mounts(&m, &binds, &[]).unwrap_err();
        assert!(err.contains("/mnt/my share (9p)") && !err.contains("/data"), "{err}");
        let plan = plan_shared_mounts(&m, &binds, &["/mnt/my share".into()]).unwrap();
        assert_eq!(plan.len(), 3);
        assert!(plan[0].contains("--root") && plan[1].contains("external"), "{plan:?}");
    }

    #[test]
    fn each_option_becomes_its_runc_flag() {
        let req = CheckpointContainerRequest {
            image_path: "/i".into(),
            work_path: "/w".into(),
            leave_running: true,
            file_locks: true,
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        assert_eq!(dump_args("c1", &req), ["checkpoint", "--image-path", "/i", "--work-path", "/w", "--leave-running", "--file-locks", "--empty-ns", "network", "c1"]);
    }

    #[test]
    fn the_processes_of_a_restore_are_found_by_their_open_files_and_killed_pinned() {
        let base = std::env::temp_dir().join(format!("criu-holders-{}", std::process::id()));
        let (dir, other) = (base.join("work"), base.join("other"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&other).unwrap();
        let out = fs::File::create(dir.join("restore.log")).unwrap();
        let mut child = std::process::Command::new("sleep").arg("60").stdout(out).spawn().unwrap();
        let pid = child.id() as i32;
        // The parent of a vfork'd exec may run before the kernel sets the new name.
        let since = Instant::now();
        while !is_named(pid, "sleep") {
            assert!(since.elapsed() < Duration::from_secs(10), "the child never became sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pids_using("sleep", &dir), [pid]);
        assert!(pids_using("sleep", &other).is_empty());
        assert!(pids_using("criu", &dir).is_empty(), "the name is checked");
        kill_pinned(pid, "criu");
        assert!(child.try_wait().unwrap().is_none(), "another name is never signalled");
        kill_pinned(pid, "sleep");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&child.wait().unwrap()), Some(libc::SIGKILL));
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_failure_carries_criu_errors_and_the_log_path() {
        let dir = std::env::temp_dir().join(format!("criu-log-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("dump.log"), "(00.1) ok\n(00.2) Error (criu/cr-dump.c:1): boom\n(00.3) more\n").unwrap();
        let e = with_log(runc::failure("runc checkpoint", "x"), dir.to_str().unwrap(), "dump.log").to_string();
        assert!(e.contains("Error (criu/cr-dump.c:1): boom") && !e.contains("(00.3) more") && e.contains(&format!("CRIU log (guest): {}/dump.log", dir.display())), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
