//! Faults and concurrency through a real containerd: Kill, State and Delete answer while a checkpoint
//! or a restore runs, and a VM that dies (QEMU SIGKILLed) during a checkpoint or a restore is noticed at
//! once: the call fails naming the cause, containerd hears the exit, and removal leaves nothing.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use containerd_shim::protos::{api::CheckpointTaskRequest, ttrpc::context};
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
fn checkpoint_in_thread(c: &Containerd, id: &str, dir: PathBuf) -> std::thread::JoinHandle<Result<(), String>> {
    let shim = c.shim_client(id);
    let id = id.to_string();
    std::thread::spawn(move || {
        let req = CheckpointTaskRequest { id, path: dir.display().to_string(), ..Default::default() };
        shim.checkpoint(context::with_timeout(0), &req).map(|_| ()).map_err(|e| e.to_string())
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
    let (took, o) = timed(&c, &["task", "ls"]);
    assert_fast("State (task ls) during a checkpoint", took, &o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("m1"));
    let (took, o) = timed(&c, &["task", "kill", "-s", "SIGUSR1", "m1"]);
    assert_fast("Kill during a checkpoint", took, &o);
    assert!(o.status.success(), "a signal during a checkpoint is delivered: {}", String::from_utf8_lossy(&o.stderr));
    let (took, o) = timed(&c, &["task", "rm", "m1"]);
    assert_fast("Delete during a checkpoint", took, &o);
    assert!(!o.status.success(), "a running task is not deleted");
    assert!(!h.is_finished(), "the checkpoint was still running when the calls were answered");
    h.join().unwrap().expect("the checkpoint itself succeeds");
    assert!(c.dir.join("ck1/inventory.img").is_file());
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
    let e = h.join().unwrap().expect_err("a checkpoint whose VM died must fail");
    eprintln!("checkpoint with QEMU killed: {e} (after {:?})", killed_at.elapsed());
    assert!(e.contains("the VM is gone") && e.contains("QEMU"), "{e}");
    assert!(killed_at.elapsed() < Duration::from_secs(10), "the failure came {:?} after QEMU died", killed_at.elapsed());
    assert_eq!(std::fs::read_dir(&ck).map(|r| r.count()).unwrap_or(0), 0, "no partial image");
    c.wait_status("m1", "STOPPED", Duration::from_secs(10));
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
