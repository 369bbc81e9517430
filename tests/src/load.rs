//! Load through a real containerd, shared by the load test (which asserts) and `make bench` (which
//! prints): four containers created, checkpointed and restored at once; many checkpoints of one
//! container; checkpoint/restore cycles. Each measures the shim and the host before and after.
use std::time::{Duration, Instant};

use crate::containerd::Containerd;

/// A container that counts to `/count` once a second (the proof that a restored one runs on).
pub const COUNTER: &[&str] = &["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 1; done"];

/// What one containerd's kata-rs containers hold on the host at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Resident memory of the shim measured (KiB).
    pub shim_rss_kib: u64,
    /// Open descriptors of that shim.
    pub shim_fds: usize,
    /// Open descriptors of containerd.
    pub containerd_fds: usize,
    /// Host mounts below this containerd's directory (its snapshots, bundles and sandboxes).
    pub mounts: usize,
    /// Processes naming this containerd's directory: shims, QEMU, virtiofsd, vhost-device-vsock.
    pub processes: usize,
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|r| r.count()).unwrap_or(0)
}

/// The shim serving task `id`.
pub fn shim_pid(id: &str) -> u32 {
    let shims = crate::processes_mentioning(&format!("-id {id} "));
    assert_eq!(shims.len(), 1, "one shim of {id}: {shims:?}");
    shims[0].0
}

pub fn snapshot(c: &Containerd, shim: u32) -> Snapshot {
    let d = c.dir.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().filter(|l| l.contains(&d)).count();
    Snapshot {
        shim_rss_kib: rss_kib(shim),
        shim_fds: fds(shim),
        containerd_fds: fds(c.pid()),
        mounts,
        processes: crate::processes_mentioning(&d).iter().filter(|(_, cmd)| !cmd.starts_with("ctr ") && !cmd.contains("/ctr ")).count(),
    }
}

/// Runs `f(i)` for i in 0..n on n threads at once; returns the wall time of the slowest.
fn at_once(n: usize, f: impl Fn(usize) + Sync) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n).map(|i| s.spawn({ let f = &f; move || f(i) })).collect();
        for h in hs {
            h.join().expect("a parallel step failed");
        }
    });
    t.elapsed().as_secs_f64()
}

/// The counter's last value. The shell renames a new `/count` into place every second; read again (for up
/// to 2 s) until it holds a number (it does not exist before the first one); 0 when it never does.
fn count(c: &Containerd, id: &str) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(n) = std::fs::read_to_string(c.rootfs(id).join("count")).ok().and_then(|s| s.trim().parse().ok()) {
            return n;
        }
        if start.elapsed() > Duration::from_secs(2) {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until container `id` counted past `min`.
pub fn wait_count(c: &Containerd, id: &str, min: u64, limit: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let n = count(c, id);
        if n > min {
            return n;
        }
        assert!(start.elapsed() < limit, "{id} did not count past {min} within {limit:?} (at {n})");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Seconds taken by the slowest of four parallel steps.
#[derive(Debug)]
pub struct FourAtOnce {
    pub create_s: f64,
    pub checkpoint_s: f64,
    pub restore_s: f64,
}

/// Four containers run, are checkpointed (to images, with their writable layer), removed, and restored,
/// each step for all four at once. The restored ones count on from where they were (their `/count`
/// comes back with the layer, and goes on from the counter in their restored memory). Removes them at
/// the end.
pub fn four_at_once(c: &Containerd, tag: &str) -> FourAtOnce {
    let id = |i: usize| format!("{tag}{i}");
    let create_s = at_once(4, |i| {
        c.run_detached(&id(i), &[], COUNTER);
        wait_count(c, &id(i), 1, Duration::from_secs(300));
    });
    let before: Vec<u64> = (0..4).map(|i| count(c, &id(i))).collect();
    let checkpoint_s = at_once(4, |i| {
        c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--rw", "--image", &id(i), &format!("kata-rs-test/{tag}:{i}")]);
    });
    for i in 0..4 {
        c.kill_and_remove(&id(i));
    }
    let restore_s = at_once(4, |i| {
        c.ctr_ok(&["--timeout", "900s", "containers", "restore", "--live", "--rw", &id(i), &format!("kata-rs-test/{tag}:{i}")]);
    });
    for (i, b) in before.iter().enumerate() {
        assert_eq!(c.task_status(&id(i)).as_deref(), Some("RUNNING"));
        let restored = count(c, &id(i));
        assert!(restored >= *b, "{} restored at {restored}, before its checkpoint it was at {b}", id(i));
        wait_count(c, &id(i), restored, Duration::from_secs(120));
    }
    for i in 0..4 {
        c.kill_and_remove(&id(i));
        c.ctr_ok(&["images", "rm", "--sync", &format!("kata-rs-test/{tag}:{i}")]);
    }
    FourAtOnce { create_s, checkpoint_s, restore_s }
}

/// `n` checkpoints of running container `id` (to directories, each removed after); returns the
/// snapshots before and after, and each checkpoint's seconds.
pub fn repeated_checkpoints(c: &Containerd, id: &str, n: usize) -> (Snapshot, Snapshot, Vec<f64>) {
    use containerd_shim::protos::{api::CheckpointTaskRequest, ttrpc::context};
    let shim_pid = shim_pid(id);
    let client = c.shim_client(id);
    // One checkpoint first, so that what the first one allocates once is not counted as growth.
    let warm = c.dir.join("ck-warm");
    client
        .checkpoint(context::with_timeout(0), &CheckpointTaskRequest { id: id.into(), path: warm.display().to_string(), ..Default::default() })
        .expect("checkpoint");
    std::fs::remove_dir_all(&warm).unwrap();
    let before = snapshot(c, shim_pid);
    let mut times = Vec::new();
    for i in 0..n {
        let dir = c.dir.join(format!("ck-rep-{i}"));
        let t = Instant::now();
        client
            .checkpoint(context::with_timeout(0), &CheckpointTaskRequest { id: id.into(), path: dir.display().to_string(), ..Default::default() })
            .unwrap_or_else(|e| panic!("checkpoint {i}: {e}"));
        times.push(t.elapsed().as_secs_f64());
        assert!(dir.join("inventory.img").is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }
    drop(client);
    // The client's connection is closed by now; give the shim a moment to drop its side.
    std::thread::sleep(Duration::from_millis(300));
    (before, snapshot(c, shim_pid), times)
}

/// `n` cycles of: checkpoint container `id` to an image (with its writable layer), remove it, restore it
/// under the same id.
/// Returns the snapshots after the first and after the last cycle (each with the shim of the restored
/// container of that cycle), and each cycle's seconds.
pub fn cycles(c: &Containerd, id: &str, n: usize) -> (Snapshot, Snapshot, Vec<f64>) {
    let mut first = None;
    let mut times = Vec::new();
    let mut last_count = count(c, id);
    for i in 0..n {
        let image = format!("kata-rs-test/cycle-{id}:{i}");
        let t = Instant::now();
        c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--rw", "--image", id, &image]);
        c.kill_and_remove(id);
        c.ctr_ok(&["--timeout", "900s", "containers", "restore", "--live", "--rw", id, &image]);
        times.push(t.elapsed().as_secs_f64());
        // containerd 1.6 dedups the spec blob of the next image of the same container into this one's:
        // remove it (and its blobs) before the next checkpoint.
        c.ctr_ok(&["images", "rm", "--sync", &image]);
        let restored = count(c, id);
        assert!(restored >= last_count, "cycle {i}: restored at {restored}, before the checkpoint it was at {last_count}");
        last_count = wait_count(c, id, restored, Duration::from_secs(120));
        if first.is_none() {
            first = Some(snapshot(c, shim_pid(id)));
        }
    }
    (first.expect("n > 0"), snapshot(c, shim_pid(id)), times)
}

/// `n` execs in container `id`, one after another, made through its shim's task API as containerd
/// makes them (Exec, Start, Wait, Delete), each printing one line into the file `out` (the stdout URI
/// `file://`). Returns the snapshots after the first `warm` execs and after the last, and the mean
/// seconds per exec.
pub fn many_execs(c: &Containerd, id: &str, n: usize, warm: usize, out: &std::path::Path) -> (Snapshot, Snapshot, f64) {
    use containerd_shim::protos::{
        api::{DeleteRequest, ExecProcessRequest, StartRequest, WaitRequest},
        protobuf::well_known_types::any::Any,
        ttrpc::context,
    };
    let shim = c.shim_client(id);
    let pid = shim_pid(id);
    let ctx = || context::with_timeout(120_000_000_000);
    let stdout = format!("file://{}", out.display());
    let mut first = None;
    let t = Instant::now();
    for i in 0..n {
        if i == warm {
            first = Some(snapshot(c, pid));
        }
        let exec_id = format!("x{i}");
        let process = serde_json::json!({"args": ["echo", format!("exec {i}")], "env": ["PATH=/bin:/usr/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "terminal": false});
        let spec = Any { type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(), value: serde_json::to_vec(&process).unwrap(), ..Default::default() };
        let req = ExecProcessRequest { id: id.into(), exec_id: exec_id.clone(), stdout: stdout.clone(), spec: Some(spec).into(), ..Default::default() };
        shim.exec(ctx(), &req).unwrap_or_else(|e| panic!("exec {i}: {e}"));
        shim.start(ctx(), &StartRequest { id: id.into(), exec_id: exec_id.clone(), ..Default::default() }).unwrap_or_else(|e| panic!("start of exec {i}: {e}"));
        let w = shim.wait(ctx(), &WaitRequest { id: id.into(), exec_id: exec_id.clone(), ..Default::default() }).unwrap_or_else(|e| panic!("wait of exec {i}: {e}"));
        assert_eq!(w.exit_status, 0, "exec {i}");
        shim.delete(ctx(), &DeleteRequest { id: id.into(), exec_id, ..Default::default() }).unwrap_or_else(|e| panic!("delete of exec {i}: {e}"));
    }
    let per_exec = t.elapsed().as_secs_f64() / n as f64;
    (first.expect("warm < n"), snapshot(c, pid), per_exec)
}
