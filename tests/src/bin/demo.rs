//! `make demo` (VM level): a counter container in VM 1 is checkpointed with CRIU inside the guest,
//! and restored in a freshly booted VM 2, where it continues counting from its dumped value.
use std::time::{Duration, Instant};

use agent_client::agent::*;
use kata_rs_tests::*;

const T: Duration = Duration::from_secs(120);

fn say(msg: &str) {
    println!("\x1b[1m==> {msg}\x1b[0m");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    say("booting VM 1 (QEMU + criu-bridge as guest PID 1)");
    let vm1 = boot("demo1").await;
    println!("    agent ready after {:.1} s ({})", vm1.boot_time.as_secs_f64(), vm1.vm.accel);
    // The counter lives in the shell's memory; /count only shows it to the host.
    let host1 = run_container(&vm1, "counter", &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.2; done"]).await;
    let count1 = host1.join("count");
    say("container 'counter' runs in VM 1 with runc");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("    VM 1 counter: {}", read_counter(&count1));
    }
    say("checkpoint with CRIU inside VM 1 (leave running)");
    let t = Instant::now();
    let req = CheckpointContainerRequest {
        container_id: "counter".into(),
        image_path: "/run/kata-rs/shared/counter/images".into(),
        work_path: "/run/kata-rs/work/counter-dump".into(),
        leave_running: true,
        deadline_s: 600,
        ..Default::default()
    };
    vm1.agent.call("CheckpointContainer", T, |c, ctx| async move { c.checkpoint_container(ctx, &req).await }).await?;
    let at_dump = read_counter(&count1);
    let images = vm1.shared_dir.join("counter/images");
    let size: u64 = std::fs::read_dir(&images)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    println!("    dumped in {:.2} s: {} bytes of images in {}", t.elapsed().as_secs_f64(), size, images.display());
    println!("    VM 1 counter at checkpoint: ~{at_dump}");

    say("booting VM 2 and moving rootfs + images into its shared directory");
    let vm2 = boot("demo2").await;
    let dst = vm2.shared_dir.join("counter");
    std::fs::create_dir_all(&dst)?;
    for what in ["rootfs", "images"] {
        let st = std::process::Command::new("cp").arg("-a").arg(vm1.shared_dir.join("counter").join(what)).arg(&dst).status()?;
        anyhow::ensure!(st.success(), "copying {what}");
    }
    let req = CreateContainerRequest {
        container_id: "counter".into(),
        oci_spec: oci_spec(&["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.2; done"]),
        rootfs: "/run/kata-rs/shared/counter/rootfs".into(),
        for_restore: true,
        ..Default::default()
    };
    vm2.agent.call("CreateContainer", T, |c, ctx| async move { c.create_container(ctx, &req).await }).await?;
    say("restore with CRIU inside VM 2");
    let t = Instant::now();
    let req = RestoreContainerRequest {
        container_id: "counter".into(),
        image_path: "/run/kata-rs/shared/counter/images".into(),
        work_path: "/run/kata-rs/work/counter-restore".into(),
        deadline_s: 600,
        ..Default::default()
    };
    let pid = vm2.agent.call("RestoreContainer", T, |c, ctx| async move { c.restore_container(ctx, &req).await }).await?.pid;
    println!("    restored in {:.2} s, init pid {pid} in VM 2", t.elapsed().as_secs_f64());
    let count2 = dst.join("rootfs/count");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("    VM 2 counter: {}   (VM 1 still counting: {})", read_counter(&count2), read_counter(&count1));
    }
    let c2 = read_counter(&count2);
    vm1.stop().await;
    vm2.stop().await;
    anyhow::ensure!(c2 > at_dump.saturating_sub(2), "VM 2's counter ({c2}) did not continue from the checkpoint (~{at_dump})");
    say(&format!("the counter continued in a new VM: {at_dump} at checkpoint -> {c2} now"));
    Ok(())
}
