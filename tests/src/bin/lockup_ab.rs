//! `make lockup-ab`: the A/B experiment behind the 1-vCPU default under TCG (docs/architecture.md,
//! known limits). For each variant (vCPUs, TCG threading, extra guest kernel parameters) it starts a
//! private containerd, runs the four-containers-at-once load (create, checkpoint, restore, all four
//! at once) `KATA_RS_AB_ROUNDS` times (default 2), and counts what the guests' consoles report:
//! soft lockups, RCU stalls, and the clocksource each guest ended up with. Prints `RESULT` lines;
//! it is an experiment, not a test: it never fails on what it counts.
use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kata_rs_tests::{containerd::Containerd, load};

struct Variant {
    name: &'static str,
    vcpus: u32,
    tcg_thread: &'static str,
    kernel_params: &'static str,
}

const VARIANTS: &[Variant] = &[
    Variant { name: "1vcpu,multi", vcpus: 1, tcg_thread: "multi", kernel_params: "" },
    Variant { name: "2vcpu,multi", vcpus: 2, tcg_thread: "multi", kernel_params: "" },
    Variant { name: "2vcpu,single", vcpus: 2, tcg_thread: "single", kernel_params: "" },
    Variant { name: "2vcpu,multi,tsc=reliable", vcpus: 2, tcg_thread: "multi", kernel_params: "tsc=reliable" },
];

/// What the consoles said, from every `console.log` below the runtime root.
#[derive(Default, Debug)]
struct Seen {
    soft_lockups: Vec<String>,
    rcu_stalls: Vec<String>,
    clocksources: BTreeMap<String, u32>,
    /// Proof that the consoles were read: bytes, and guests whose agent said it was ready.
    bytes: u64,
    agents_ready: u32,
}

/// Follows every console log below `root` (new sandboxes appear as the load runs) until `stop`.
fn follow_consoles(root: PathBuf, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut offsets: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut partial: BTreeMap<PathBuf, String> = BTreeMap::new();
    loop {
        let last = stop.load(Ordering::SeqCst);
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let log = entry.path().join("console.log");
            let Ok(mut f) = std::fs::File::open(&log) else { continue };
            let off = offsets.entry(log.clone()).or_insert(0);
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < *off {
                *off = 0; // rotated
            }
            if f.seek(SeekFrom::Start(*off)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            let n = f.take(4 << 20).read_to_end(&mut buf).unwrap_or(0);
            *off += n as u64;
            let text = partial.remove(&log).unwrap_or_default() + &String::from_utf8_lossy(&buf);
            let (complete, rest) = match text.rfind('\n') {
                Some(i) => (text[..i].to_string(), text[i + 1..].to_string()),
                None => (String::new(), text),
            };
            partial.insert(log.clone(), rest);
            let mut s = seen.lock().unwrap();
            s.bytes += n as u64;
            let vm = entry.file_name().to_string_lossy().to_string();
            for line in complete.lines() {
                if line.contains(kata_rs_shim::sandbox::AGENT_READY_MARKER) {
                    s.agents_ready += 1;
                }
                if line.contains("soft lockup") {
                    s.soft_lockups.push(format!("{vm}: {}", line.trim()));
                } else if line.contains("rcu_sched self-detected stall") || line.contains("rcu: INFO: rcu_") {
                    s.rcu_stalls.push(format!("{vm}: {}", line.trim()));
                } else if let Some(i) = line.find("Switched to clocksource ") {
                    *s.clocksources.entry(line[i + 24..].trim().to_string()).or_default() += 1;
                }
            }
        }
        if last {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn run_variant(v: &Variant, rounds: usize) {
    std::env::set_var("KATA_RS_TEST_VCPUS", v.vcpus.to_string());
    std::env::set_var("KATA_RS_TEST_TCG_THREAD", v.tcg_thread);
    // The shim boots guests with `quiet loglevel=3`: soft lockups (pr_emerg) print at that level, RCU
    // stalls (pr_err) and the clocksource switch (pr_info) do not; loglevel=7 shows all three.
    std::env::set_var("KATA_RS_TEST_KERNEL_PARAMS", format!("loglevel=7 {}", v.kernel_params));
    let c = Containerd::start();
    let root = c.dir.join("kr");
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let follower = {
        let (root, stop, seen) = (root.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || follow_consoles(root, stop, seen))
    };
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut times = Vec::new();
    for r in 0..rounds {
        let tag = format!("ab{r}x");
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load::four_at_once(&c, &tag))) {
            Ok(f) => times.push(f),
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                failures.push(msg.lines().next().unwrap_or("").to_string());
                break; // the containerd may hold leftovers of the failed round: stop this variant here
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    // The shim removes a sandbox directory (and its console log) when its VM is gone; the follower has
    // read them while they existed.
    stop.store(true, Ordering::SeqCst);
    follower.join().unwrap();
    drop(c);
    let s = seen.lock().unwrap();
    let n = v.name;
    println!("RESULT lockup_ab_soft_lockups[{n}]={} count", s.soft_lockups.len());
    println!("RESULT lockup_ab_rcu_stalls[{n}]={} count", s.rcu_stalls.len());
    println!("RESULT lockup_ab_failed_rounds[{n}]={} count", failures.len());
    println!("RESULT lockup_ab_wall_s[{n}]={wall:.1} s  # {rounds} rounds of four at once");
    for f in &times {
        println!("RESULT lockup_ab_four_at_once_s[{n}]={:.1}/{:.1}/{:.1} s  # create/checkpoint/restore", f.create_s, f.checkpoint_s, f.restore_s);
    }
    println!("RESULT lockup_ab_console_bytes[{n}]={} bytes  # read from the guests' consoles", s.bytes);
    println!("RESULT lockup_ab_agents_ready[{n}]={} count  # guests whose agent reported ready on the console", s.agents_ready);
    println!("NOTE {n}: clocksources {:?}", s.clocksources);
    for l in s.soft_lockups.iter().chain(s.rcu_stalls.iter()).take(12) {
        println!("NOTE {n}: {l}");
    }
    for f in &failures {
        println!("NOTE {n}: round failed: {f}");
    }
}

fn main() {
    kata_rs_tests::init_logging();
    let rounds: usize = std::env::var("KATA_RS_AB_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let only = std::env::var("KATA_RS_AB_VARIANTS").ok();
    for v in VARIANTS {
        if only.as_deref().is_some_and(|o| !o.split(';').any(|x| x == v.name)) {
            continue;
        }
        run_variant(v, rounds);
    }
}
