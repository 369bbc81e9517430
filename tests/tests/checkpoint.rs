//! Checkpoint and restore through containerd: ctr -> kata-rs shim -> runc/CRIU inside the guest.
use std::time::Duration;

use kata_rs_tests::{containerd::*, read_counter, wait_counter};

const T: Duration = Duration::from_secs(120);
const COUNTER: &[&str] = &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.1; done"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_and_restore_in_a_new_vm_continues_the_counter() {
    let c = Containerd::start();
    c.run_detached("c1", &[], COUNTER);
    let count1 = c.rootfs("c1").join("count");
    wait_counter(&count1, 20, T).await;
    c.ctr_ok(&["task", "exec", "--exec-id", "m", "c1", "sh", "-c", "echo kept > /marker"]);
    // containerd pauses, checkpoints (leave running) and resumes; --rw stores the rootfs diff.
    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", "--image", "c1", "kata-rs-test/ckpt:1"]);
    let at_checkpoint = read_counter(&count1);
    assert_eq!(c.task_status("c1").as_deref(), Some("RUNNING"), "leave-running is the default");
    wait_counter(&count1, at_checkpoint + 3, T).await;

    c.ctr_ok(&["containers", "restore", "--live", "--rw", "c2", "kata-rs-test/ckpt:1"]);
    assert_eq!(c.task_status("c2").as_deref(), Some("RUNNING"));
    let count2 = c.rootfs("c2").join("count");
    let first = wait_counter(&count2, 1, T).await;
    // Restored from memory: it goes on from (about) the checkpoint's value, not from 1.
    assert!(first + 5 >= at_checkpoint, "c2 started at {first}, c1 was at about {at_checkpoint} when checkpointed");
    wait_counter(&count2, first + 5, T).await;
    assert_eq!(std::fs::read_to_string(c.rootfs("c2").join("marker")).unwrap(), "kept\n", "the --rw rootfs diff survives");
    for id in ["c1", "c2"] {
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        c.wait_status(id, "STOPPED", T);
        c.ctr_ok(&["task", "rm", id]);
        c.ctr_ok(&["container", "rm", id]);
    }
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_checkpoint_of_running_and_paused_tasks_and_bad_states() {
    let c = Containerd::start();
    c.run_detached("p1", &[], COUNTER);
    wait_counter(&c.rootfs("p1").join("count"), 5, T).await;
    let image = c.ctr_ok(&["tasks", "checkpoint", "p1"]);
    assert!(image.contains("checkpoint"), "ctr names the checkpoint image: {image}");
    assert_eq!(c.task_status("p1").as_deref(), Some("RUNNING"));
    // containerd 1.6 refuses a second checkpoint whose spec blob already exists: drop the first one.
    c.ctr_ok(&["images", "rm", "--sync", image.trim()]);
    c.ctr_ok(&["tasks", "pause", "p1"]);
    c.ctr_ok(&["tasks", "checkpoint", "p1"]);
    assert_eq!(c.task_status("p1").as_deref(), Some("PAUSED"), "a paused task stays paused");
    c.ctr_ok(&["tasks", "resume", "p1"]);
    let n = read_counter(&c.rootfs("p1").join("count"));
    wait_counter(&c.rootfs("p1").join("count"), n + 3, T).await;

    // A stopped task cannot be checkpointed, and the error says why (containerd pauses first, so the
    // refusal comes from Pause; Checkpoint itself refuses the same states).
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "p1"]);
    c.wait_status("p1", "STOPPED", T);
    let o = c.ctr(&["tasks", "checkpoint", "p1"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("task p1 is Stopped"), "{e}");
    c.ctr_ok(&["task", "rm", "p1"]);
    c.ctr_ok(&["container", "rm", "p1"]);
    c.assert_clean();
}
