//! Faults and concurrency through a real containerd: Kill, State and Delete answer (and Pause waits) while a checkpoint
//! or a restore runs, and a VM that dies (QEMU SIGKILLed) during a checkpoint or a restore is noticed at
//! once: the call fails naming the cause, containerd hears the exit, and removal leaves nothing.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use containerd_shim::protos::{
    api::{CheckpointTaskRequest, StatsRequest},
    ttrpc::{context, Code},
};
use kata_rs_tests::{containerd::*, wait_counter, wait_file};

const T: Duration = Duration::from_secs(120);
const SLOW: Duration = Duration::from_secs(300);
const MEMHOG: &[&str] = &["/bin/memhog", "256"];

/// Runs a ctr command and returns how long it took to answer, with its output.
fn timed(c: &Containerd, args: &[&str]) -> (Duration, std::process::Output) {
    let t = Instant::now();
    let o = c.ctr(args);
    (t.elapsed(), o)
}

/// The task pid in `ctr task ls`, once the task has one (0 while it is being created).
fn task_pid(c: &Containerd, id: &str) -> u32 {
    let start = Instant::now();
    loop {
        let ls = c.ctr_ok(&["task", "ls"]);
        let pid: u32 = ls.lines().find(|l| l.split_whitespace().next() == Some(id)).and_then(|l| l.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or(0);
        if pid > 1 {
            return pid;
        }
        assert!(start.elapsed() < SLOW, "no pid of {id}: {ls}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `path` exists.
fn wait_path(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} did not appear within {limit:?}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The shim's Checkpoint into `dir`, in a thread.
/// A failure comes back as its status code and text.
fn checkpoint_in_thread(c: &Containerd, id: &str, dir: PathBuf) -> std::thread::JoinHandle<Result<(), (Option<Code>, String)>> {
    let shim = c.shim_client(id);
    let id = id.to_string();
    std::thread::spawn(move || {
        let req = CheckpointTaskRequest { id, path: dir.display().to_string(), ..Default::default() };
        shim.checkpoint(context::with_timeout(0), &req).map(|_| ()).map_err(|e| (rpc_code(&e), e.to_string()))
    })
}

fn assert_fast(what: &str, took: Duration, o: &std::process::Output) {
    eprintln!("{what}: answered in {:.0} ms ({})", took.as_secs_f64() * 1e3, String::from_utf8_lossy(&o.stderr).trim());
    assert!(took < Duration::from_secs(1), "{what} took {took:?} while another operation ran: {}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_answer_during_checkpoint_and_restore_and_a_dead_vm_is_reported() {
    let c = Containerd::start();
    c.run_detached("m1", &[], MEMHOG);
    wait_file(&c.rootfs("m1").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    wait_counter(&c.rootfs("m1").join("count"), 2, T).await;
    let shared1 = c.dir.join("kr/m1/shared");

    // 1. While a 256 MiB checkpoint runs: State, Kill and Delete answer within a second.
    let h = checkpoint_in_thread(&c, "m1", c.dir.join("ck1"));
    wait_path(&shared1.join(".checkpoints/1"), T);
    std::thread::sleep(Duration::from_millis(200));
    // CRIU freezes and thaws the container itself: a Pause meanwhile waits for the checkpoint's end.
    let pause = {
        let (addr, ctr) = (c.address.clone(), c.ctr_path());
        std::thread::spawn(move || std::process::Command::new(ctr).args(["--address", &addr, "task", "pause", "m1"]).output().unwrap())
    };
    let (took, o) = timed(&c, &["task", "ls"]);
    assert_fast("State (task ls) during a checkpoint", took, &o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("m1"));
    let (took, o) = timed(&c, &["task", "kill", "-s", "SIGUSR1", "m1"]);
    assert_fast("Kill during a checkpoint", took, &o);
    assert!(o.status.success(), "a signal during a checkpoint is delivered: {}", String::from_utf8_lossy(&o.stderr));
    let (took, o) = timed(&c, &["task", "rm", "m1"]);
    assert_fast("Delete during a checkpoint", took, &o);
    assert!(!o.status.success(), "a running task is not deleted");
    let paused_early = pause.is_finished();
    assert!(!h.is_finished(), "the checkpoint was still running when the calls were answered");
    assert!(!paused_early, "a Pause during a checkpoint waits for its end: {:?}", paused_early.then(|| pause.join().unwrap()));
    h.join().unwrap().expect("the checkpoint itself succeeds");
    assert!(c.dir.join("ck1/inventory.img").is_file());
    let o = pause.join().unwrap();
    assert!(o.status.success(), "the Pause goes through once the checkpoint ended: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(c.task_status("m1").as_deref(), Some("PAUSED"));
    c.ctr_ok(&["task", "resume", "m1"]);
    // The SIGUSR1 sent during the dump reached memhog: it re-summed its memory.
    let v = wait_file(&c.rootfs("m1").join("verify"), SLOW, |s| s.ends_with('\n')).await;
    assert!(v.contains(" ok"), "{v}");

    // 2. While a restore of it runs in a new VM: State, Kill and Delete answer within a second.
    c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--image", "m1", "kata-rs-test/faults:1"]);
    let addr = c.address.clone();
    let ctr = c.ctr_path();
    let restore = std::thread::spawn(move || std::process::Command::new(ctr).args(["--address", &addr, "--timeout", "900s", "containers", "restore", "--live", "m2", "kata-rs-test/faults:1"]).output().unwrap());
    // From the VM's boot through the image staging and the CRIU restore: State every 100 ms.
    let (mut polls, mut worst, mut listed) = (0, Duration::ZERO, false);
    while !restore.is_finished() {
        let (took, o) = timed(&c, &["task", "ls"]);
        polls += 1;
        worst = worst.max(took);
        assert!(took < Duration::from_secs(1), "State (task ls) took {took:?} during a restore: {}", String::from_utf8_lossy(&o.stderr));
        if !listed && String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("m2 ")) {
            listed = true;
            let (took, o) = timed(&c, &["task", "kill", "-s", "SIGUSR1", "m2"]);
            assert_fast("Kill during a restore", took, &o);
            let (took, o) = timed(&c, &["task", "rm", "m2"]);
            assert_fast("Delete during a restore", took, &o);
            assert!(!o.status.success(), "a task being created or restored is not deleted");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("State during the restore: {polls} calls, slowest {:.0} ms", worst.as_secs_f64() * 1e3);
    assert!(listed && polls >= 10, "the restore ended before it could be observed ({polls} polls)");
    let o = restore.join().unwrap();
    assert!(o.status.success(), "the restore itself succeeds: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(c.task_status("m2").as_deref(), Some("RUNNING"));

    // 3. QEMU SIGKILLed during a checkpoint: the checkpoint fails naming the dead VM, containerd hears
    //    the exit, no partial image is left, and removal leaves nothing.
    let qemu = task_pid(&c, "m1");
    let n_before = std::fs::read_dir(shared1.join(".checkpoints")).map(|r| r.count()).unwrap_or(0);
    let ck = c.dir.join("ck-killed");
    let h = checkpoint_in_thread(&c, "m1", ck.clone());
    let start = Instant::now();
    while std::fs::read_dir(shared1.join(".checkpoints")).map(|r| r.count()).unwrap_or(0) <= n_before {
        assert!(start.elapsed() < T, "the checkpoint never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let (code, e) = h.join().unwrap().expect_err("a checkpoint whose VM died must fail");
    eprintln!("checkpoint with QEMU killed: {code:?} {e} (after {:?})", killed_at.elapsed());
    assert!(e.contains("the VM is gone") && e.contains("QEMU"), "{e}");
    assert_eq!(code, Some(Code::FAILED_PRECONDITION), "the VM-gone code: {e}");
    assert!(killed_at.elapsed() < Duration::from_secs(10), "the failure came {:?} after QEMU died", killed_at.elapsed());
    assert_eq!(std::fs::read_dir(&ck).map(|r| r.count()).unwrap_or(0), 0, "no partial image");
    c.wait_status("m1", "STOPPED", Duration::from_secs(10));
    // A call that needs the gone VM gets the same code, through the agent's path.
    let e = c.shim_client("m1").stats(context::with_timeout(0), &StatsRequest { id: "m1".into(), ..Default::default() }).expect_err("stats of a dead VM");
    assert_eq!(rpc_code(&e), Some(Code::FAILED_PRECONDITION), "{e}");
    assert!(e.to_string().contains("the VM is gone"), "{e}");
    let (took, o) = timed(&c, &["task", "kill", "m1"]);
    assert!(took < Duration::from_secs(1) && !o.status.success(), "Kill of the dead task fails fast: {took:?}");
    c.ctr_ok(&["task", "rm", "m1"]);
    c.ctr_ok(&["container", "rm", "m1"]);

    // 4. QEMU SIGKILLed during a restore.
    let addr = c.address.clone();
    let ctr = c.ctr_path();
    let restore = std::thread::spawn(move || std::process::Command::new(ctr).args(["--address", &addr, "--timeout", "900s", "containers", "restore", "--live", "m3", "kata-rs-test/faults:1"]).output().unwrap());
    let start = Instant::now();
    while c.task_status("m3").is_none() {
        assert!(start.elapsed() < SLOW && !restore.is_finished(), "task m3 never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let qemu = task_pid(&c, "m3");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let o = restore.join().unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("restore with QEMU killed: {} {e}", o.status);
    if !o.status.success() {
        assert!(e.contains("the VM is gone") || e.contains("VM"), "the error names the dead VM: {e}");
    }
    c.wait_status("m3", "STOPPED", Duration::from_secs(10));
    c.ctr_ok(&["task", "rm", "m3"]);
    c.ctr_ok(&["container", "rm", "m3"]);
    c.kill_and_remove("m2");
    c.assert_clean();
}

/// `ctr containers checkpoint --task --image <id> <image>` in a thread.
fn ctr_checkpoint_in_thread(c: &Containerd, id: &str, image: &str) -> std::thread::JoinHandle<std::process::Output> {
    let (addr, ctr, id, image) = (c.address.clone(), c.ctr_path(), id.to_string(), image.to_string());
    std::thread::spawn(move || {
        std::process::Command::new(ctr).args(["--address", &addr, "--timeout", "900s", "containers", "checkpoint", "--task", "--image", &id, &image]).output().unwrap()
    })
}

/// `ctr containers restore --live <id> <image>` in a thread.
fn ctr_restore_in_thread(c: &Containerd, id: &str, image: &str) -> std::thread::JoinHandle<std::process::Output> {
    let (addr, ctr, id, image) = (c.address.clone(), c.ctr_path(), id.to_string(), image.to_string());
    std::thread::spawn(move || std::process::Command::new(ctr).args(["--address", &addr, "--timeout", "900s", "containers", "restore", "--live", &id, &image]).output().unwrap())
}

/// Waits until the shim of `id` made a new checkpoint staging directory (CRIU is dumping), then 300 ms more.
fn wait_dump_started(c: &Containerd, id: &str) {
    let staging = c.dir.join("kr").join(id).join("shared/.checkpoints");
    let start = Instant::now();
    while std::fs::read_dir(&staging).map(|r| r.count()).unwrap_or(0) == 0 {
        assert!(start.elapsed() < T, "the checkpoint of {id} never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or(0)
}

/// The pid of the helper `program` the shim of sandbox `id` started (a sibling of QEMU; a sandboxed
/// virtiofsd forks a child of its own, which is not it).
fn helper_pid(c: &Containerd, id: &str, program: &str) -> u32 {
    let shim = ppid(task_pid(c, id));
    let dir = c.dir.join("kr").join(id).display().to_string();
    let found: Vec<u32> = kata_rs_tests::processes_mentioning(&format!("{dir}/"))
        .into_iter()
        .filter(|(p, cmd)| cmd.split_whitespace().next().is_some_and(|a| a.ends_with(program)) && ppid(*p) == shim)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(found.len(), 1, "one {program} started by the shim {shim} of {id}: {found:?}");
    found[0]
}

/// After a failed `ctr containers restore`: the task, if containerd kept it, is stopped and removed
/// (its exit was published); the container record, if ctr kept it, is removed.
fn remove_failed_restore(c: &Containerd, ev: &Events, id: &str) {
    if c.task_status(id).is_some() {
        assert_exit_published_and_remove(c, ev, id);
    } else if c.ctr_ok(&["containers", "ls", "-q"]).lines().any(|l| l == id) {
        c.ctr_ok(&["container", "rm", id]);
    }
}

fn sigkill(pid: u32) {
    assert!(pid > 1, "refusing to kill pid {pid}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No checkpoint image named `image` was registered and containerd stages none.
fn assert_no_image(c: &Containerd, image: &str) {
    let ls = c.ctr_ok(&["images", "ls", "-q"]);
    assert!(!ls.lines().any(|l| l.contains(image)), "a failed checkpoint registered {image}: {ls}");
    assert!(c.staged_checkpoints().is_empty(), "containerd still stages {:?}", c.staged_checkpoints());
}

/// After a VM died during a call: containerd heard the exit, the task is STOPPED, and removal leaves nothing.
fn assert_exit_published_and_remove(c: &Containerd, ev: &Events, id: &str) {
    let line = ev.wait_for("/tasks/exit", id, Duration::from_secs(10));
    eprintln!("{id}: {line}");
    c.wait_status(id, "STOPPED", Duration::from_secs(10));
    c.ctr_ok(&["task", "rm", id]);
    c.ctr_ok(&["container", "rm", id]);
}

/// The guest kernel panics during a checkpoint (the agent, PID 1, exits: a test fault armed on the
/// kernel command line) and during a restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_kernel_panic_during_a_checkpoint_or_a_restore_is_reported() {
    let c = Containerd::start_with("kernel_params = \"kata_rs.test_fault=agent-exit-in-checkpoint:1500\"");
    let ev = c.events("panic");
    c.run_detached("p1", &[], &["/bin/memhog", "128"]);
    wait_file(&c.rootfs("p1").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    let o = ctr_checkpoint_in_thread(&c, "p1", "kata-rs-test/panic:1").join().unwrap();
    let e = stderr(&o);
    eprintln!("checkpoint with a guest panic: {e}");
    assert!(!o.status.success() && e.contains("the guest kernel panicked") && e.contains("Attempted to kill init"), "{e}");
    assert_no_image(&c, "kata-rs-test/panic:1");
    assert_exit_published_and_remove(&c, &ev, "p1");
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    assert!(log.contains("the VM is gone"), "the shim's log says why the task ended");
    c.assert_clean();
    drop(c);

    let c = Containerd::start_with("kernel_params = \"kata_rs.test_fault=agent-exit-in-restore:1000\"");
    let ev = c.events("panic-restore");
    c.run_detached("p2", &[], &["/bin/memhog", "64"]);
    wait_file(&c.rootfs("p2").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--image", "p2", "kata-rs-test/panic:2"]);
    c.kill_and_remove("p2");
    let o = ctr_restore_in_thread(&c, "p3", "kata-rs-test/panic:2").join().unwrap();
    let e = stderr(&o);
    eprintln!("restore with a guest panic: {} {e}", o.status);
    assert!(!o.status.success() && e.contains("the guest kernel panicked"), "{e}");
    remove_failed_restore(&c, &ev, "p3");
    c.assert_clean();
}

/// virtiofsd or vhost-device-vsock killed during a checkpoint, and virtiofsd during a restore: the VM
/// cannot serve its container any more, so QEMU is killed, the call fails naming the daemon, the exit is
/// published, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_daemon_killed_during_a_checkpoint_or_a_restore_ends_the_vm() {
    let c = Containerd::start();
    let ev = c.events("daemons");
    c.run_detached("d0", &[], &["/bin/memhog", "64"]);
    wait_file(&c.rootfs("d0").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--image", "d0", "kata-rs-test/daemons:0"]);
    c.kill_and_remove("d0");

    for (id, daemon) in [("d1", "virtiofsd"), ("d2", "vhost-device-vsock")] {
        c.run_detached(id, &[], &["/bin/memhog", "128"]);
        wait_file(&c.rootfs(id).join("fill"), SLOW, |s| s.ends_with('\n')).await;
        let qemu = task_pid(&c, id);
        let pid = helper_pid(&c, id, daemon);
        let h = ctr_checkpoint_in_thread(&c, id, &format!("kata-rs-test/daemons:{id}"));
        wait_dump_started(&c, id);
        sigkill(pid);
        let o = h.join().unwrap();
        let e = stderr(&o);
        eprintln!("checkpoint with {daemon} killed: {e}");
        assert!(!o.status.success() && e.contains(&format!("{daemon} (pid {pid}) exited")), "{e}");
        assert_no_image(&c, &format!("kata-rs-test/daemons:{id}"));
        assert_exit_published_and_remove(&c, &ev, id);
        assert!(!std::path::Path::new(&format!("/proc/{qemu}")).exists(), "QEMU {qemu} was killed with its VM");
    }

    // virtiofsd killed while the restore reads the images through it.
    let h = ctr_restore_in_thread(&c, "d3", "kata-rs-test/daemons:0");
    let start = Instant::now();
    while !c.dir.join("kr/d3/shared/.restore-images-d3").exists() {
        assert!(start.elapsed() < SLOW && !h.is_finished(), "the restore of d3 never staged its images");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = helper_pid(&c, "d3", "virtiofsd");
    sigkill(pid);
    let o = h.join().unwrap();
    let e = stderr(&o);
    eprintln!("restore with virtiofsd killed: {} {e}", o.status);
    assert!(!o.status.success() && e.contains(&format!("virtiofsd (pid {pid}) exited")), "{e}");
    remove_failed_restore(&c, &ev, "d3");
    c.assert_clean();
}

/// containerd restarted during a checkpoint: the shim goes on, the task is still running afterwards and
/// can be checkpointed again; what containerd was staging is either absent or a whole image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restarted_during_a_checkpoint() {
    let mut c = Containerd::start();
    c.run_detached("r1", &[], &["/bin/memhog", "128"]);
    wait_file(&c.rootfs("r1").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    let h = ctr_checkpoint_in_thread(&c, "r1", "kata-rs-test/restart:1");
    wait_dump_started(&c, "r1");
    c.restart();
    let o = h.join().unwrap();
    eprintln!("checkpoint with containerd restarted: {} {}", o.status, stderr(&o));
    assert!(!o.status.success(), "ctr lost its containerd");
    // The dump finishes in the shim; the task goes on running.
    let staging = c.dir.join("kr/r1/shared/.checkpoints");
    let start = Instant::now();
    while std::fs::read_dir(&staging).map(|r| r.count()).unwrap_or(0) > 0 {
        assert!(start.elapsed() < SLOW, "the shim's checkpoint never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.task_status("r1").as_deref(), Some("RUNNING"));
    for d in c.staged_checkpoints() {
        let d = c.dir.join("xdg").join(d);
        let n = std::fs::read_dir(&d).map(|r| r.count()).unwrap_or(0);
        eprintln!("containerd left its staging directory {} ({n} entries)", d.display());
        assert!(n == 0 || d.join("inventory.img").is_file(), "a partial image in {}", d.display());
    }
    let before = std::fs::read_to_string(c.rootfs("r1").join("count")).unwrap_or_default();
    c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--image", "r1", "kata-rs-test/restart:2"]);
    wait_counter(&c.rootfs("r1").join("count"), before.trim().parse::<u64>().unwrap_or(0) + 1, T).await;
    c.kill_and_remove("r1");
    c.assert_clean();
}

/// The shim SIGKILLed during a checkpoint: its VM dies with it, containerd publishes the exit and cleans
/// up with the shim's `delete`, and its staging directory is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_killed_during_a_checkpoint_is_cleaned_up() {
    let c = Containerd::start();
    let ev = c.events("shimkill");
    c.run_detached("s1", &[], &["/bin/memhog", "128"]);
    wait_file(&c.rootfs("s1").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    let shims = kata_rs_tests::processes_mentioning("-id s1 ");
    assert_eq!(shims.len(), 1, "{shims:?}");
    let h = ctr_checkpoint_in_thread(&c, "s1", "kata-rs-test/shimkill:1");
    wait_dump_started(&c, "s1");
    sigkill(shims[0].0);
    let o = h.join().unwrap();
    eprintln!("checkpoint with the shim killed: {}", stderr(&o));
    assert!(!o.status.success());
    assert_no_image(&c, "kata-rs-test/shimkill:1");
    let line = ev.wait_for("/tasks/exit", "s1", Duration::from_secs(30));
    eprintln!("{line}");
    let start = Instant::now();
    while c.task_status("s1").is_some() {
        assert!(start.elapsed() < T, "task s1 still listed after its shim was killed");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ctr_ok(&["container", "rm", "s1"]);
    c.assert_clean();
}

/// A checkpoint into a directory on a tiny tmpfs that fills up: the error says so, the directory is left
/// empty, the task runs on, and a checkpoint to a good directory then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_into_a_full_filesystem_fails_cleanly() {
    let c = Containerd::start();
    c.run_detached("f1", &[], &["/bin/memhog", "64"]);
    wait_file(&c.rootfs("f1").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    let tiny = c.dir.join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    nix::mount::mount(Some("tiny"), &tiny, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m")).unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _u = Unmount(tiny.clone());
    let target = tiny.join("ck");
    std::fs::create_dir(&target).unwrap();
    let (_, e) = checkpoint_in_thread(&c, "f1", target.clone()).join().unwrap().expect_err("1 MiB cannot hold 64 MiB of images");
    eprintln!("checkpoint into a full tmpfs: {e}");
    assert!(e.contains("No space left on device") && e.contains(&target.display().to_string()), "{e}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "no partial image");
    assert_eq!(c.task_status("f1").as_deref(), Some("RUNNING"));
    checkpoint_in_thread(&c, "f1", c.dir.join("ck-good")).join().unwrap().expect("a checkpoint to a good directory");
    assert!(c.dir.join("ck-good/inventory.img").is_file());
    c.kill_and_remove("f1");
    drop(_u);
    c.assert_clean();
}

/// `ctr --timeout 5s containers restore`: the caller gives up during the restore. containerd then removes
/// the task; the shim finishes or abandons the restore and leaves nothing, and the image still restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_caller_gives_up_leaves_nothing() {
    let c = Containerd::start();
    c.run_detached("t1", &[], &["/bin/memhog", "64"]);
    wait_file(&c.rootfs("t1").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--image", "t1", "kata-rs-test/timeout:1"]);
    c.kill_and_remove("t1");
    let started = Instant::now();
    let o = c.ctr(&["--timeout", "5s", "containers", "restore", "--live", "t2", "kata-rs-test/timeout:1"]);
    eprintln!("restore with a 5 s deadline: {} after {:?}: {}", o.status, started.elapsed(), stderr(&o));
    assert!(!o.status.success(), "a TCG restore takes longer than 5 s");
    assert!(stderr(&o).contains("deadline"), "{}", stderr(&o));
    // containerd removes the task it could not create (or it can be removed); then nothing of t2 is left.
    let start = Instant::now();
    while c.task_status("t2").is_some() {
        let _ = c.ctr(&["task", "rm", "-f", "t2"]);
        assert!(start.elapsed() < SLOW, "task t2 cannot be removed");
        std::thread::sleep(Duration::from_millis(500));
    }
    if c.ctr_ok(&["containers", "ls", "-q"]).lines().any(|l| l == "t2") {
        c.ctr_ok(&["container", "rm", "t2"]);
    }
    c.assert_clean();
    // Nothing was lost: the image restores.
    c.ctr_ok(&["--timeout", "900s", "containers", "restore", "--live", "t3", "kata-rs-test/timeout:1"]);
    assert_eq!(c.task_status("t3").as_deref(), Some("RUNNING"));
    c.kill_and_remove("t3");
    c.assert_clean();
}

/// A guest that never answers (QEMU SIGSTOPped: no vCPU, no device runs) cannot refuse to die:
/// `ctr task kill -s KILL` returns, the host ends the VM itself and reports exit 137, `ctr task rm`
/// works, all within 30 s, and nothing is left. A Pause stuck in that guest holds nothing: State
/// answers meanwhile (PAUSING) and the kill goes through; the Pause then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers_is_still_killed_and_removed() {
    let c = Containerd::start();
    let ev = c.events("frozen");
    c.run_detached("fz1", &[], &["sleep", "100000"]);
    c.wait_status("fz1", "RUNNING", T);
    let qemu = task_pid(&c, "fz1");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (ctr, address) = (c.ctr_path(), c.address.clone());
    let pause = std::thread::spawn(move || std::process::Command::new(ctr).args(["--address", &address, "task", "pause", "fz1"]).output().unwrap());
    // State answers while the Pause waits for the guest: the task shows PAUSING, not a stale RUNNING
    // after the Pause gave up.
    c.wait_status("fz1", "PAUSING", T);
    assert!(!pause.is_finished(), "the Pause returned although the guest is frozen: {:?}", pause.join().map(|o| stderr(&o)));
    let start = Instant::now();
    let o = c.ctr(&["task", "kill", "-s", "KILL", "fz1"]);
    eprintln!("kill of a frozen guest answered after {:?}: {} {}", start.elapsed(), o.status, stderr(&o));
    assert!(o.status.success(), "the kill is done by the host when the guest does not answer: {}", stderr(&o));
    let paused = pause.join().unwrap();
    assert!(!paused.status.success(), "the Pause of a VM the host ended succeeded");
    eprintln!("the stuck Pause: {}", stderr(&paused));
    assert_ended_by_host(&c, &ev, "fz1", qemu, start);
}

/// After a SIGKILL sent at `start` that the guest did not carry out: the exit (137) is published, the
/// task is stopped and removed, all within 30 s; QEMU is gone and nothing is left.
fn assert_ended_by_host(c: &Containerd, ev: &Events, id: &str, qemu: u32, start: Instant) {
    let line = ev.wait_for("/tasks/exit", id, Duration::from_secs(30));
    eprintln!("{id}: exit published {:?} after the kill: {line}", start.elapsed());
    assert!(line.contains("137"), "the host reports the SIGKILL's status: {line}");
    c.wait_status(id, "STOPPED", Duration::from_secs(10));
    c.ctr_ok(&["task", "rm", id]);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "kill and rm of {id} took {took:?}");
    assert!(!Path::new(&format!("/proc/{qemu}")).exists(), "QEMU {qemu} is gone");
    c.ctr_ok(&["container", "rm", id]);
    c.assert_clean();
}

/// A guest that answers SignalProcess with OK but signals nothing (a test fault of the agent), so
/// WaitProcess never answers: the host ends the VM 10 s after the SIGKILL and reports exit 137;
/// `ctr task rm` works; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_sigkill_is_ended_by_the_host() {
    let c = Containerd::start_with("kernel_params = \"kata_rs.test_fault=ignore-signals:0\"");
    let ev = c.events("ignore");
    c.run_detached("ig1", &[], &["sleep", "100000"]);
    c.wait_status("ig1", "RUNNING", T);
    let qemu = task_pid(&c, "ig1");
    let start = Instant::now();
    c.ctr_ok(&["task", "kill", "-s", "KILL", "ig1"]);
    assert_ended_by_host(&c, &ev, "ig1", qemu, start);
}

/// A CRIU that never finishes a restore (SIGSTOPped in the middle of it, its log open: a test fault)
/// does not outlive the restore's deadline: at the deadline the agent kills runc, finds the restore's
/// CRIU by the files it holds (its log, its images; another container's CRIU would be left alone),
/// kills it through a pidfd, then whatever it had restored into the container's cgroup. The error says
/// so, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_criu_hangs_ends_at_its_deadline_and_its_criu_is_killed() {
    let c = Containerd::start_with("kernel_params = \"kata_rs.test_fault=stop-criu-in-restore:0\"");
    let ev = c.events("criu-hangs");
    c.run_detached("h1", &["--annotation", "io.kata-rs.checkpoint.deadline_s=5"], &["sleep", "100000"]);
    c.wait_status("h1", "RUNNING", T);
    c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--image", "h1", "kata-rs-test/hang:1"]);
    c.kill_and_remove("h1");
    // No --timeout: the checkpointed spec's annotation (5 s) is the restore's deadline.
    let o = c.ctr(&["containers", "restore", "--live", "h2", "kata-rs-test/hang:1"]);
    let e = stderr(&o);
    eprintln!("restore whose CRIU hangs: {} {e}", o.status);
    assert!(!o.status.success() && e.contains("restore deadline of 5 s exceeded"), "{e}");
    let killed: u32 = e.split("its CRIU (").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(killed >= 1, "the restore's CRIU was found and killed: {e}");
    assert!(e.contains("the processes it had restored were killed") || e.contains("it had restored no process"), "{e}");
    remove_failed_restore(&c, &ev, "h2");
    c.assert_clean();
}
