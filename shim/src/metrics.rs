//! `runc events --stats` JSON (from the guest) to containerd's cgroup v2 `Metrics`, bounded by what the
//! host measures of the VM ([`bound_by_host`]): the guest chooses its numbers, the host's cgroup does not
//! lie.
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

/// Linux's PID_MAX_LIMIT: no guest has more processes than this.
pub const PIDS_MAX: u64 = 4 << 20;

/// Bounds what the guest reported by what the host measured of the whole VM (its host cgroup): a
/// container's memory and CPU time are at most the VM's, each part of its memory at most its usage,
/// user and system time at most its CPU time, throttled periods at most its periods, and process counts
/// at most Linux's limit. An honest guest's figures are below these bounds and pass unchanged. Figures
/// the host cannot measure (page fault counts) are the guest's.
pub fn bound_by_host(m: &mut Metrics, host: &crate::cgroups::HostUsage) {
    if let Some(mem) = m.memory.as_mut() {
        let ceiling = host.memory_bytes.unwrap_or(u64::MAX);
        let limit = host.memory_limit.unwrap_or(u64::MAX);
        mem.usage = mem.usage.min(ceiling);
        mem.usage_limit = mem.usage_limit.min(limit);
        mem.max_usage = mem.max_usage.min(limit);
        mem.swap_usage = mem.swap_usage.min(mem.usage);
        mem.swap_limit = mem.swap_limit.min(limit);
        let usage = mem.usage;
        for part in [
            &mut mem.anon,
            &mut mem.file,
            &mut mem.kernel_stack,
            &mut mem.slab,
            &mut mem.sock,
            &mut mem.shmem,
            &mut mem.file_mapped,
            &mut mem.file_dirty,
            &mut mem.file_writeback,
            &mut mem.inactive_anon,
            &mut mem.active_anon,
            &mut mem.inactive_file,
            &mut mem.active_file,
            &mut mem.unevictable,
        ] {
            *part = (*part).min(usage);
        }
    }
    if let Some(cpu) = m.cpu.as_mut() {
        cpu.usage_usec = cpu.usage_usec.min(host.cpu_usec.unwrap_or(u64::MAX));
        cpu.user_usec = cpu.user_usec.min(cpu.usage_usec);
        cpu.system_usec = cpu.system_usec.min(cpu.usage_usec);
        cpu.nr_throttled = cpu.nr_throttled.min(cpu.nr_periods);
    }
    if let Some(p) = m.pids.as_mut() {
        p.current = p.current.min(PIDS_MAX);
        p.limit = p.limit.min(PIDS_MAX);
    }
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

    #[test]
    fn a_lying_guests_figures_are_bounded_by_the_hosts_and_an_honest_ones_pass() {
        let host = crate::cgroups::HostUsage { memory_bytes: Some(300 << 20), memory_limit: Some(4 << 30), cpu_usec: Some(9_000_000) };
        let max = u64::MAX;
        let lie = format!(
            r#"{{"data":{{"cpu":{{"usage":{{"total":{max},"user":{max},"kernel":{max}}},"throttling":{{"periods":5,"throttledPeriods":{max},"throttledTime":1}}}},
            "memory":{{"usage":{{"limit":{max},"usage":{max},"max":{max}}},"swap":{{"usage":{max},"limit":{max}}},"raw":{{"anon":{max},"file":{max},"unevictable":{max}}}}},
            "pids":{{"current":{max},"limit":{max}}}}}}}"#
        );
        let mut m = from_runc_stats(lie.as_bytes()).unwrap();
        bound_by_host(&mut m, &host);
        assert_eq!((m.memory.usage, m.memory.usage_limit, m.memory.max_usage), (300 << 20, 4 << 30, 4 << 30));
        assert_eq!((m.memory.anon, m.memory.file, m.memory.unevictable, m.memory.swap_usage), (300 << 20, 300 << 20, 300 << 20, 300 << 20));
        assert_eq!((m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec, m.cpu.nr_throttled), (9_000_000, 9_000_000, 9_000_000, 5));
        assert_eq!((m.pids.current, m.pids.limit), (PIDS_MAX, PIDS_MAX));
        let honest = br#"{"data":{"cpu":{"usage":{"total":5000000,"user":3000000,"kernel":2000000}},"memory":{"usage":{"limit":1073741824,"usage":1048576,"max":2097152},"raw":{"anon":4096}},"pids":{"current":3}}}"#;
        let before = from_runc_stats(honest).unwrap();
        let mut after = before.clone();
        bound_by_host(&mut after, &host);
        assert_eq!(before, after);
        // Nothing measured on the host: only the guest's own consistency and the pid limit apply.
        let mut m = from_runc_stats(lie.as_bytes()).unwrap();
        bound_by_host(&mut m, &crate::cgroups::HostUsage::default());
        assert_eq!(m.memory.usage, max);
        assert_eq!(m.pids.current, PIDS_MAX);
    }
}
