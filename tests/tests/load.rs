//! Load: four containers created, checkpointed and restored at once; 1,000 execs in one container
//! (`KATA_RS_LOAD_EXECS` sets another number); 20 checkpoints of one container and 10
//! checkpoint/restore cycles with the shim's RSS and descriptors, containerd's descriptors, host
//! mounts and processes measured at the start and the end: flat.
use std::time::Duration;

use kata_rs_tests::{
    containerd::Containerd,
    load::{self, Snapshot},
};

fn assert_flat(what: &str, before: Snapshot, after: Snapshot) {
    eprintln!("{what}: before {before:?}\n{what}: after  {after:?}");
    assert!(after.shim_fds <= before.shim_fds, "{what}: the shim's descriptors grew from {} to {}", before.shim_fds, after.shim_fds);
    assert!(after.containerd_fds <= before.containerd_fds + 4, "{what}: containerd's descriptors grew from {} to {}", before.containerd_fds, after.containerd_fds);
    assert_eq!(after.mounts, before.mounts, "{what}: host mounts");
    assert_eq!(after.processes, before.processes, "{what}: processes of this containerd's sandboxes");
    // Memory: the allocator keeps some; a leak of one image copy buffer or a log per checkpoint would
    // pass 8 MiB over 20 checkpoints.
    assert!(after.shim_rss_kib < before.shim_rss_kib + 8192, "{what}: the shim's RSS grew from {} to {} KiB", before.shim_rss_kib, after.shim_rss_kib);
}

#[test]
fn four_containers_at_once() {
    let c = Containerd::start();
    let f = load::four_at_once(&c, "q");
    eprintln!("four at once: {f:?}");
    c.assert_clean();
}

/// Execs one after another in one container: 1,000 (`KATA_RS_LOAD_EXECS=<n>` for another number).
/// Under TCG here one took 2.5 s on average (10 execs, 1.8–3.2 s) while every `runc init` cloned runc,
/// 0.7 s on the same day since runc runs from one sealed copy (criu-bridge `runc::Sealed`). Measured after the
/// first fifth of them, so that allocator and connection warm-up are not counted. A thousand also
/// shows that the guest forgets each deleted exec: before the shim sent RemoveProcess, the agent kept
/// a descriptor per exec and the 999th failed with EMFILE.
#[test]
fn many_execs_leak_nothing() {
    let n: usize = std::env::var("KATA_RS_LOAD_EXECS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000).max(10);
    let warm = n / 5;
    let c = Containerd::start();
    c.run_detached("e1", &[], &["sleep", "100000"]);
    let out = c.dir.join("execs.out");
    let (before, after, per_exec) = load::many_execs(&c, "e1", n, warm, &out);
    eprintln!("{n} execs: {per_exec:.3} s per exec");
    assert_flat(&format!("{} execs after {warm}", n - warm), before, after);
    // Every exec's output arrived, whole and once.
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), n, "{} lines", lines.len());
    let mut seen: Vec<usize> = lines.iter().map(|l| l.strip_prefix("exec ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{l:?}"))).collect();
    seen.sort_unstable();
    assert!(seen.iter().copied().eq(0..n), "each exec's line once");
    c.kill_and_remove("e1");
    c.assert_clean();
}

#[test]
fn many_checkpoints_and_cycles_leak_nothing() {
    let c = Containerd::start();
    c.run_detached("l1", &[], load::COUNTER);
    load::wait_count(&c, "l1", 1, Duration::from_secs(300));
    let (before, after, times) = load::repeated_checkpoints(&c, "l1", 20);
    eprintln!("20 checkpoints: {:.1} s in all", times.iter().sum::<f64>());
    assert_flat("20 checkpoints", before, after);
    // The bundle keeps the CRIU logs and reports of the last checkpoints only, the newest among them.
    let names: Vec<String> = std::fs::read_dir(c.bundle("l1")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let logs: Vec<&String> = names.iter().filter(|n| n.starts_with("criu-dump-") && n.ends_with(".log")).collect();
    let kept = kata_rs_shim::checkpoint::report::KEPT_DUMP_FILES as usize;
    assert_eq!(logs.len(), kept, "{names:?}");
    assert_eq!(names.iter().filter(|n| n.starts_with("criu-dump-") && n.ends_with(".stats.json")).count(), kept, "{names:?}");
    assert!(logs.iter().any(|n| *n == "criu-dump-20.log") && !logs.iter().any(|n| *n == "criu-dump-12.log"), "{names:?}");
    let (first, last, times) = load::cycles(&c, "l1", 10);
    eprintln!("10 cycles: {times:.1?} s");
    assert_flat("10 checkpoint/restore cycles (each with a new shim)", first, last);
    c.kill_and_remove("l1");
    c.assert_clean();
}
