//! `make demo`: a counter container under kata-rs through containerd (`ctr`), checkpointed with CRIU
//! inside its VM and restored in a new VM, where it goes on counting from its checkpointed value.
use std::time::{Duration, Instant};

use kata_rs_tests::{containerd::*, read_counter, wait_counter};

fn say(msg: &str) {
    println!("\x1b[1m==> {msg}\x1b[0m");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    say("starting a private containerd with runtime io.containerd.kata-rs.v2");
    let c = Containerd::start();
    let counter = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.2; done"];
    say("ctr run -d --runtime io.containerd.kata-rs.v2 ... c1 (a counter, in its own QEMU VM)");
    let t = Instant::now();
    c.run_detached("c1", &[], &counter);
    println!("    running after {:.1} s", t.elapsed().as_secs_f64());
    let count1 = c.rootfs("c1").join("count");
    wait_counter(&count1, 1, Duration::from_secs(60)).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("    c1 counter: {}", read_counter(&count1));
    }
    say("ctr containers checkpoint --task --rw --image c1 demo/c1:ckpt  (CRIU runs inside the VM)");
    let t = Instant::now();
    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", "--image", "c1", "demo/c1:ckpt"]);
    let at = read_counter(&count1);
    println!("    checkpointed in {:.1} s at counter ~{at}; c1 keeps running", t.elapsed().as_secs_f64());
    say("ctr containers restore --live --rw c2 demo/c1:ckpt  (a new VM)");
    let t = Instant::now();
    c.ctr_ok(&["containers", "restore", "--live", "--rw", "c2", "demo/c1:ckpt"]);
    println!("    restored in {:.1} s", t.elapsed().as_secs_f64());
    let count2 = c.rootfs("c2").join("count");
    let first = wait_counter(&count2, 1, Duration::from_secs(60)).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("    c2 counter: {}   (c1: {})", read_counter(&count2), read_counter(&count1));
    }
    print!("{}", c.ctr_ok(&["task", "ls"]));
    for id in ["c1", "c2"] {
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        c.wait_status(id, "STOPPED", Duration::from_secs(60));
        c.ctr_ok(&["task", "rm", id]);
        c.ctr_ok(&["container", "rm", id]);
    }
    anyhow::ensure!(first + 5 >= at, "c2 started at {first}, not near the checkpoint's {at}");
    say(&format!("c2 continued from the checkpoint: ~{at} at checkpoint, {first} right after restore"));
    Ok(())
}
