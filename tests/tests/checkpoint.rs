//! Checkpoint and restore through containerd: ctr -> kata-rs shim -> runc/CRIU inside the guest.
use std::time::Duration;

use containerd_shim::protos::{
    api::CheckpointTaskRequest,
    protobuf::{well_known_types::any::Any, Message},
    shim::oci::CheckpointOptions,
    ttrpc::context,
};
use kata_rs_tests::{containerd::*, processes_mentioning, read_counter, tar_entries, wait_counter, wait_file};

const T: Duration = Duration::from_secs(120);
const COUNTER: &[&str] = &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.1; done"];

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
        c.kill_and_remove(id);
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

/// `ctr tasks checkpoint --exit --image-path DIR`: ctr 2.x sends them as runc's options, which the shim
/// honours (images in DIR, the task stopped); ctr 1.x sends no options to a non-runc runtime, so the
/// images go to containerd's checkpoint image and the task keeps running (as nerdctl users see).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_tasks_checkpoint_exit_and_image_path() {
    let c = Containerd::start();
    c.run_detached("x1", &[], COUNTER);
    let count = c.rootfs("x1").join("count");
    wait_counter(&count, 5, T).await;
    let dir = c.dir.join("images-x1");
    let out = c.ctr_ok(&["tasks", "checkpoint", "--exit", "--image-path", dir.to_str().unwrap(), "x1"]);
    if c.ctr_major() >= 2 {
        assert!(dir.join("inventory.img").is_file(), "CRIU's images are in --image-path {}", dir.display());
        c.wait_status("x1", "STOPPED", T);
        let n = read_counter(&count);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(read_counter(&count), n, "the counter stopped with --exit");
    } else {
        assert!(!dir.join("inventory.img").exists(), "ctr 1.x sends no options: nothing in {}", dir.display());
        let _ = out; // ctr 1.x prints no image name when --image-path is given
        let images = c.ctr_ok(&["images", "ls", "-q"]);
        assert!(images.lines().any(|l| l.contains("checkpoint") && l.contains("x1")), "ctr 1.x makes a checkpoint image in containerd: {images}");
        assert_eq!(c.task_status("x1").as_deref(), Some("RUNNING"), "ctr 1.x: --exit does not reach the shim");
        let n = read_counter(&count);
        wait_counter(&count, n + 3, T).await;
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "x1"]);
        c.wait_status("x1", "STOPPED", T);
    }
    c.ctr_ok(&["task", "rm", "x1"]);
    c.ctr_ok(&["container", "rm", "x1"]);
    c.assert_clean();
}

/// nerdctl (≥ 2.2) `checkpoint create` and `start --checkpoint`, call for call through containerd's API
/// (nerdctl cannot be installed here): containerd's Go client pauses the task, checkpoints it with no
/// options (nerdctl sends none to a non-runc runtime) and resumes it; after the task is gone, a new
/// task of the same container is created from the checkpoint's descriptor and started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nerdctl_checkpoint_create_and_start_checkpoint_call_sequence() {
    use containerd_client::{
        services::v1::{
            snapshots::{snapshots_client::SnapshotsClient, MountsRequest},
            tasks_client::TasksClient,
            CheckpointTaskRequest, CreateRequest, CreateTaskRequest, DeleteRequest, DeleteTaskRequest, PauseTaskRequest, ResumeTaskRequest, StartRequest,
            leases_client::LeasesClient,
        },
        tonic::Request,
        with_namespace,
    };
    const NS: &str = "default";
    const LEASE: &str = "kata-rs-test-nerdctl";
    let c = Containerd::start();
    c.run_detached("n1", &[], COUNTER);
    let count = c.rootfs("n1").join("count");
    wait_counter(&count, 20, T).await;
    let channel = containerd_client::connect(&c.address).await.expect("connecting to containerd's gRPC socket");
    let mut tasks = TasksClient::new(channel.clone());
    let mut leases = LeasesClient::new(channel.clone());
    // The Go client holds a lease while it checkpoints, so the images are not collected meanwhile.
    leases.create(with_namespace!(CreateRequest { id: LEASE.into(), ..Default::default() }, NS)).await.expect("lease");
    let leased = |req: CheckpointTaskRequest| {
        let mut r = with_namespace!(req, NS);
        r.metadata_mut().insert("containerd-lease", LEASE.parse().unwrap());
        r
    };
    let id = || "n1".to_string();

    // nerdctl checkpoint create n1 ck1
    tasks.pause(with_namespace!(PauseTaskRequest { container_id: id() }, NS)).await.expect("Pause");
    let checkpointed = tasks.checkpoint(leased(CheckpointTaskRequest { container_id: id(), ..Default::default() })).await;
    tasks.resume(with_namespace!(ResumeTaskRequest { container_id: id() }, NS)).await.expect("Resume");
    let descriptors = checkpointed.expect("Checkpoint with no options").into_inner().descriptors;
    let image = descriptors
        .iter()
        .find(|d| d.media_type.contains("criu.checkpoint"))
        .cloned()
        .unwrap_or_else(|| panic!("no CRIU checkpoint among {descriptors:?}"));
    let at_checkpoint = read_counter(&count);
    // No options reached the shim: the container keeps running (what nerdctl users get).
    assert_eq!(c.task_status("n1").as_deref(), Some("RUNNING"));
    wait_counter(&count, at_checkpoint + 10, T).await;

    // nerdctl stop n1; nerdctl start --checkpoint ck1 n1
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "n1"]);
    c.wait_status("n1", "STOPPED", T);
    tasks.delete(with_namespace!(DeleteTaskRequest { container_id: id() }, NS)).await.expect("Delete");
    let mounts = SnapshotsClient::new(channel.clone())
        .mounts(with_namespace!(MountsRequest { snapshotter: "overlayfs".into(), key: id() }, NS))
        .await
        .expect("the container's rootfs mounts")
        .into_inner()
        .mounts;
    let created = tasks
        .create(with_namespace!(CreateTaskRequest { container_id: id(), rootfs: mounts, checkpoint: Some(image), ..Default::default() }, NS))
        .await;
    created.expect("Create from the checkpoint descriptor");
    let before_start = read_counter(&count);
    tasks.start(with_namespace!(StartRequest { container_id: id(), ..Default::default() }, NS)).await.expect("Start");
    assert_eq!(c.task_status("n1").as_deref(), Some("RUNNING"));
    // Restored, not started afresh: the counter goes on from about the checkpoint's value.
    let deadline = std::time::Instant::now() + T;
    while read_counter(&count) == before_start {
        assert!(std::time::Instant::now() < deadline, "the restored counter never wrote");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = read_counter(&count);
    assert!(first + 5 >= at_checkpoint && first < before_start, "restored at {first}: checkpointed at about {at_checkpoint}, killed at {before_start}");
    leases.delete(with_namespace!(DeleteRequest { id: LEASE.into(), sync: true }, NS)).await.expect("lease delete");
    c.kill_and_remove("n1");
    c.assert_clean();
}

const MEMHOG: &[&str] = &["/bin/memhog", "256"];
/// A 256 MiB fill and sum under TCG takes a while; restores of 256 MiB too.
const SLOW: Duration = Duration::from_secs(300);

fn sum_of(line: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix("sum=")).unwrap_or_default().to_string()
}

/// Asks memhog to sum its memory again; returns its "/verify" line once a fresh one is there.
async fn verify_memory(c: &Containerd, id: &str) -> String {
    let verify = c.rootfs(id).join("verify");
    let _ = std::fs::remove_file(&verify);
    c.ctr_ok(&["task", "kill", "-s", "SIGUSR1", id]);
    wait_file(&verify, SLOW, |s| s.ends_with('\n')).await
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_256_mib_survives_a_deadline_a_checkpoint_and_a_restore() {
    let c = Containerd::start();
    // A 1 s deadline for this container (annotation); a request's own deadline overrides it below.
    c.run_detached("m1", &["--annotation", "io.kata-rs.checkpoint.deadline_s=1"], MEMHOG);
    let fill = wait_file(&c.rootfs("m1").join("fill"), SLOW, |s| s.ends_with('\n')).await;
    let filled = sum_of(&fill);
    assert_eq!(filled.len(), 16, "{fill}");
    wait_counter(&c.rootfs("m1").join("count"), 3, T).await;

    // 1. The deadline: CRIU cannot dump 256 MiB in 1 s; the checkpoint fails soon with the deadline
    //    error and CRIU's log, and the container is left running with its memory intact.
    let started = std::time::Instant::now();
    let o = c.ctr(&["tasks", "checkpoint", "m1"]);
    let took = started.elapsed();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "a 1 s deadline on 256 MiB must fail");
    assert!(e.contains("checkpoint deadline of 1 s exceeded"), "{e}");
    assert!(took < Duration::from_secs(60), "the deadline error came after {took:?}, not within seconds: {e}");
    let log = e.split("full CRIU log: ").nth(1).map(|l| l.split_whitespace().next().unwrap_or("").trim_end_matches(['"', ':']).to_string()).unwrap_or_default();
    assert!(std::path::Path::new(&log).is_file(), "the error names the host copy of CRIU's log: {log:?} in {e}");
    assert_eq!(c.task_status("m1").as_deref(), Some("RUNNING"), "containerd resumed it; CRIU let go of it: {e}");
    let n = read_counter(&c.rootfs("m1").join("count"));
    wait_counter(&c.rootfs("m1").join("count"), n + 3, T).await;
    let v = verify_memory(&c, "m1").await;
    assert!(v.contains(&format!("sum={filled} expected={filled} ok")), "memory after the killed dump: {v}");

    // 2. Still checkpointable: with its own deadline (ctr --timeout) the request overrides the 1 s.
    c.ctr_ok(&["--timeout", "900s", "containers", "checkpoint", "--task", "--rw", "--image", "m1", "kata-rs-test/mem:1"]);
    assert_eq!(c.task_status("m1").as_deref(), Some("RUNNING"));
    let stats = json(&c.bundle("m1").join("criu-dump-2.stats.json"));
    eprintln!("checkpoint report: {stats}");
    assert!(stats["image_bytes"].as_u64().unwrap() > 256 << 20, "{stats}");
    assert!(stats["criu.dump.pages_written"].as_u64().unwrap() >= 65536, "CRIU wrote the 256 MiB: {stats}");
    assert!(stats["guest.runc_checkpoint_s"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(stats["criu.dump.memdump_time_us"].as_u64().is_some(), "{stats}");

    // 3. Restored in a new VM, the memory sums to what was filled before the checkpoint.
    c.ctr_ok(&["--timeout", "900s", "containers", "restore", "--live", "--rw", "m2", "kata-rs-test/mem:1"]);
    assert_eq!(c.task_status("m2").as_deref(), Some("RUNNING"));
    let v = verify_memory(&c, "m2").await;
    assert!(v.contains(&format!("sum={filled} expected={filled} ok")), "memory after restore: {v} (filled {filled})");
    let restore = json(&c.bundle("m2").join("criu-restore.stats.json"));
    eprintln!("restore report: {restore}");
    assert!(restore["restore_s"].as_f64().unwrap() > 0.0, "{restore}");
    for id in ["m1", "m2"] {
        c.kill_and_remove(id);
    }
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_options_sent_to_the_shim_exit_and_bad_input() {
    let c = Containerd::start();
    c.run_detached("x1", &[], COUNTER);
    wait_counter(&c.rootfs("x1").join("count"), 5, T).await;
    // ctr sends CheckpointOptions to runc runtimes only: send them to the shim as containerd would.
    let shim = c.shim_client("x1");
    let ckpt = |dir: &std::path::Path, type_url: &str, opts: &CheckpointOptions| {
        let req = CheckpointTaskRequest {
            id: "x1".into(),
            path: dir.display().to_string(),
            options: Some(Any { type_url: type_url.into(), value: opts.write_to_bytes().unwrap(), ..Default::default() }).into(),
            ..Default::default()
        };
        shim.checkpoint(context::with_timeout(0), &req)
    };
    let exit = CheckpointOptions { exit: true, ..Default::default() };
    // An unknown options type and a non-empty directory are refused; nothing is written or lost.
    let d1 = c.dir.join("ck-unknown");
    std::fs::create_dir_all(&d1).unwrap();
    let e = ckpt(&d1, "example.com/Bogus", &exit).unwrap_err().to_string();
    assert!(e.contains("unknown checkpoint options type"), "{e}");
    assert_eq!(std::fs::read_dir(&d1).unwrap().count(), 0);
    let d2 = c.dir.join("ck-full");
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::write(d2.join("keep"), "mine").unwrap();
    let e = ckpt(&d2, "containerd.runc.v1.CheckpointOptions", &exit).unwrap_err().to_string();
    assert!(e.contains("is not empty"), "{e}");
    assert_eq!(std::fs::read_to_string(d2.join("keep")).unwrap(), "mine");
    assert_eq!(c.task_status("x1").as_deref(), Some("RUNNING"));

    // exit=true: a good dump, then the task stops and containerd hears of it.
    let d3 = c.dir.join("ck-exit");
    ckpt(&d3, "type.googleapis.com/containerd.runc.v1.CheckpointOptions", &exit).expect("checkpoint with exit");
    assert!(d3.join("inventory.img").is_file(), "images written");
    assert!(d3.join("kata-rs-checkpoint-stats.json").is_file(), "the shim's report is beside the images");
    c.wait_status("x1", "STOPPED", T);
    c.ctr_ok(&["task", "rm", "x1"]);
    c.ctr_ok(&["container", "rm", "x1"]);
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_a_corrupted_image_fails_with_criu_errors_and_leaves_no_vm() {
    let c = Containerd::start();
    c.run_detached("k1", &[], COUNTER);
    wait_counter(&c.rootfs("k1").join("count"), 5, T).await;
    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", "--image", "k1", "kata-rs-test/bad:1"]);
    // Corrupt the task's core image inside the checkpoint blob in containerd's content store.
    let mut corrupted = 0;
    for blob in c.content_blobs() {
        let mut data = std::fs::read(&blob).unwrap();
        let Some((name, off, size)) = tar_entries(&data).into_iter().find(|(n, _, _)| n.trim_start_matches("./") == "core-1.img") else { continue };
        assert!(size > 16, "{name}: {size} bytes");
        data[off..off + size].iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(&blob, &data).unwrap();
        corrupted += 1;
    }
    assert_eq!(corrupted, 1, "exactly one checkpoint blob holds core-1.img");

    let o = c.ctr(&["containers", "restore", "--live", "--rw", "k2", "kata-rs-test/bad:1"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "restore from a corrupted image must fail");
    eprintln!("ctr printed: {e}");
    assert!(e.contains("CRIU errors:") && e.contains("Error ("), "CRIU's error lines are in what ctr prints: {e}");
    let log = e.split("full CRIU log: ").nth(1).map(|l| l.split_whitespace().next().unwrap_or("").trim_end_matches(['"', ':']).to_string()).unwrap_or_default();
    assert!(std::path::Path::new(&log).is_file(), "the error names the host copy of restore.log: {log:?} in {e}");
    // No VM is left for k2; the task (if containerd kept it) is stopped and can be removed.
    let k2_dir = c.dir.join("kr/k2").display().to_string();
    let start = std::time::Instant::now();
    while !processes_mentioning(&k2_dir).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "VM of k2 still running: {:?}", processes_mentioning(&k2_dir));
        std::thread::sleep(Duration::from_millis(250));
    }
    if let Some(s) = c.task_status("k2") {
        assert_eq!(s, "STOPPED");
        c.ctr_ok(&["task", "rm", "k2"]);
    }
    c.ctr_ok(&["container", "rm", "k2"]);
    assert_eq!(c.task_status("k1").as_deref(), Some("RUNNING"), "the source container is untouched");
    c.kill_and_remove("k1");
    c.assert_clean();
}
