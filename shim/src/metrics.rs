//! `runc events --stats` JSON (from the guest) to containerd's cgroup v2 `Metrics`.
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use serde_json::Value;

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return 0,
        }
    }
    cur.as_u64().unwrap_or(0)
}

/// Converts runc's stats (`{"type":"stats","data":{...}}`) to cgroup v2 metrics.
pub fn from_runc_stats(json: &[u8]) -> Result<Metrics, String> {
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("runc stats are not JSON: {e}"))?;
    let d = v.get("data").ok_or("runc stats have no data")?;
    let mut m = Metrics::new();
    let mut pids = PidsStat::new();
    pids.current = u(d, &["pids", "current"]);
    pids.limit = u(d, &["pids", "limit"]);
    m.pids = Some(pids).into();
    let mut cpu = CPUStat::new();
    cpu.usage_usec = u(d, &["cpu", "usage", "total"]) / 1000;
    cpu.user_usec = u(d, &["cpu", "usage", "user"]) / 1000;
    cpu.system_usec = u(d, &["cpu", "usage", "kernel"]) / 1000;
    cpu.nr_periods = u(d, &["cpu", "throttling", "periods"]);
    cpu.nr_throttled = u(d, &["cpu", "throttling", "throttledPeriods"]);
    cpu.throttled_usec = u(d, &["cpu", "throttling", "throttledTime"]) / 1000;
    m.cpu = Some(cpu).into();
    let mut mem = MemoryStat::new();
    mem.usage = u(d, &["memory", "usage", "usage"]);
    mem.usage_limit = u(d, &["memory", "usage", "limit"]);
    mem.max_usage = u(d, &["memory", "usage", "max"]);
    mem.swap_usage = u(d, &["memory", "swap", "usage"]);
    mem.swap_limit = u(d, &["memory", "swap", "limit"]);
    let raw = |k: &str| u(d, &["memory", "raw", k]);
    mem.anon = raw("anon");
    mem.file = raw("file");
    mem.kernel_stack = raw("kernel_stack");
    mem.slab = raw("slab");
    mem.sock = raw("sock");
    mem.shmem = raw("shmem");
    mem.file_mapped = raw("file_mapped");
    mem.file_dirty = raw("file_dirty");
    mem.file_writeback = raw("file_writeback");
    mem.pgfault = raw("pgfault");
    mem.pgmajfault = raw("pgmajfault");
    mem.inactive_anon = raw("inactive_anon");
    mem.active_anon = raw("active_anon");
    mem.inactive_file = raw("inactive_file");
    mem.active_file = raw("active_file");
    mem.unevictable = raw("unevictable");
    m.memory = Some(mem).into();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_runc_fields() {
        let j = br#"{"type":"stats","id":"c1","data":{"cpu":{"usage":{"total":5000000,"user":3000000,"kernel":2000000},"throttling":{}},
            "memory":{"usage":{"limit":1073741824,"usage":1048576,"max":2097152},"swap":{"usage":0,"limit":0},"raw":{"anon":4096,"file":8192}},
            "pids":{"current":3,"limit":0}}}"#;
        let m = from_runc_stats(j).unwrap();
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.cpu.usage_usec, 5000);
        assert_eq!(m.cpu.user_usec, 3000);
        assert_eq!(m.cpu.system_usec, 2000);
        assert_eq!(m.memory.usage, 1048576);
        assert_eq!(m.memory.usage_limit, 1073741824);
        assert_eq!(m.memory.anon, 4096);
        assert_eq!(m.memory.file, 8192);
    }

    #[test]
    fn rejects_non_stats() {
        assert!(from_runc_stats(b"not json").is_err());
        assert!(from_runc_stats(b"{}").is_err());
    }
}
