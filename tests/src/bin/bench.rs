//! `make bench`: prints `RESULT name=value unit` lines. Never fails on a time.
use std::time::{Duration, Instant};

use agent_client::agent::CheckRequest;
use kata_rs_tests::*;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn result(name: &str, value: f64, unit: &str, note: &str) {
    if note.is_empty() {
        println!("RESULT {name}={value:.3} {unit}");
    } else {
        println!("RESULT {name}={value:.3} {unit}  # {note}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let boots: usize = std::env::var("KATA_RS_BENCH_BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let me = std::process::id();
    let rss_before = rss_kib(me);
    let mut times = Vec::new();
    let mut last = None;
    for i in 0..boots {
        let t = Instant::now();
        let sb = boot("bench").await;
        times.push(t.elapsed().as_secs_f64());
        eprintln!("boot {}: {:.2} s (QEMU launch to agent answer {:.2} s, accel {})", i + 1, times[i], sb.boot_time.as_secs_f64(), sb.vm.accel);
        if i + 1 < boots {
            sb.stop().await;
        } else {
            last = Some(sb);
        }
    }
    let sb = last.expect("at least one boot");
    result("vm_boot_to_agent_ready_s", median(times.clone()), "s", &format!("median of {boots}, accel {}, includes VM start and agent connect", sb.vm.accel));

    // Agent round trips: Check (answered from the agent's cache, so it measures the channel).
    let n = 500;
    let mut rtt = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        sb.agent.call("Check", Duration::from_secs(10), |c, ctx| async move { c.check(ctx, &CheckRequest::new()).await }).await.unwrap();
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
    }
    result("agent_rpc_roundtrip_us", median(rtt.clone()), "us", &format!("median of {n} Check calls over hybrid vsock"));
    rtt.sort_by(|a, b| a.partial_cmp(b).unwrap());
    result("agent_rpc_roundtrip_p99_us", rtt[n * 99 / 100], "us", "");

    let rss_with = rss_kib(me);
    result("vm_owner_rss_before_vm_kib", rss_before as f64, "KiB", "baseline: this process before any VM");
    result("vm_owner_rss_kib", rss_with as f64, "KiB", "the same process owning one running VM and its agent connection");
    let pids = sb.vm.pids();
    // Vm::pids(): QEMU first, then the helper daemons. Shared (memfd) guest pages count in each RSS.
    result("qemu_rss_kib", rss_kib(pids[0]) as f64, "KiB", &format!("QEMU with a {} MiB guest (guest pages touched so far included)", test_config().hypervisor.memory_mib));
    let helpers: u64 = pids[1..].iter().map(|&p| rss_kib(p)).sum();
    result("vm_helper_daemons_rss_kib", helpers as f64, "KiB", "vhost-device-vsock + virtiofsd (they map guest memory: shared pages included)");
    sb.stop().await;

    containerd_figures();
}

/// `ctr run --rm` until the container's output arrives, for kata-rs and runc in the same containerd.
fn containerd_figures() {
    use kata_rs_tests::containerd::{Containerd, IMAGE, RUNTIME};
    use std::io::Read;
    let c = Containerd::start();
    let fifo = c.dir.join("fifo").display().to_string();
    let reps = 3;
    for (name, runtime) in [("kata_rs", RUNTIME), ("runc_v2", "io.containerd.runc.v2")] {
        let mut times = Vec::new();
        for i in 0..reps {
            let id = format!("b-{name}-{i}");
            let t = Instant::now();
            let mut child = std::process::Command::new(c.ctr_path())
                .args(["--address", &c.address, "run", "--rm", "--runtime", runtime, "--fifo-dir", &fifo, IMAGE, &id, "echo", "bench-output"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = child.stdout.take().unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            let mut at = None;
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if at.is_none() && String::from_utf8_lossy(&seen).contains("bench-output") {
                    at = Some(t.elapsed().as_secs_f64());
                }
            }
            let st = child.wait_with_output().unwrap();
            match at {
                Some(s) => times.push(s),
                None => eprintln!("{name}: no output (exit {}): {}", st.status, String::from_utf8_lossy(&st.stderr)),
            }
        }
        if times.is_empty() {
            println!("# ctr_run_to_output_s[{name}] skipped: the runtime produced no output here");
        } else {
            let n = times.len();
            result(&format!("ctr_run_to_output_s[{name}]"), median(times), "s", &format!("median of {n}, ctr run --rm ... echo"));
        }
    }
    // The shim's own memory while it owns one running VM.
    c.run_detached("b-rss", &[], &["sleep", "1000"]);
    let shims = processes_mentioning(&format!("-address {}", c.address));
    if let Some((pid, _)) = shims.first() {
        result("shim_rss_kib", rss_kib(*pid) as f64, "KiB", "containerd-shim-kata-rs-v2 serving one running container (VM processes not included)");
    }
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "b-rss"]);
    c.wait_status("b-rss", "STOPPED", Duration::from_secs(60));
    c.ctr_ok(&["task", "rm", "b-rss"]);
    c.ctr_ok(&["container", "rm", "b-rss"]);
}
