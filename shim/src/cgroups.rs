//! A VM's host cgroup: QEMU and its helper daemons (with their sandboxed children) are moved into the
//! cgroup the spec of the VM's first container names (`linux.cgroupsPath`: for a pod, CRI's cgroup of the
//! sandbox below the kubelet's pod cgroup; for `ctr run`, `/<namespace>/<id>`), or `/kata-rs/<id>`
//! when it names none, so that the host's accounting and limits cover the VM, as Kata's
//! `sandbox_cgroup_only` does. That cgroup gets a memory limit covering the guest's memory, the shared
//! directory's tmpfs and the daemons: a guest that fills all it can never takes more. The containers'
//! own cgroups are the guest's. Paths in cgroupfs form, or systemd's `slice:prefix:name` (placed at the
//! path systemd gives that unit), in every cgroup hierarchy mounted here (cgroup v1 controllers, v2's
//! unified one).
use std::path::{Component, Path, PathBuf};

use tracing::{info, warn};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CgroupError {
    #[error("linux.cgroupsPath {path:?}: {why}")]
    Path { path: String, why: String },
    #[error("the pod's host cgroup {dir}: {message}")]
    Io { dir: String, message: String },
}

/// Directories of one cgroup path in each hierarchy, and those this shim created (removed at the end).
#[derive(Debug, Default)]
pub struct HostCgroup {
    leaves: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

/// The relative form of a cgroup path: a cgroupfs path (absolute, plain components only, no `..`), or
/// systemd's `slice:prefix:name`, which is the scope `prefix-name.scope` in the slice's directory
/// (`a-b.slice` is `a.slice/a-b.slice`; an empty slice is `system.slice`), as runc's systemd driver
/// places it.
pub fn relative_path(path: &str) -> Result<PathBuf, CgroupError> {
    let bad = |why: &str| CgroupError::Path { path: path.to_string(), why: why.to_string() };
    if path.len() > 1024 {
        return Err(bad("longer than 1024 bytes"));
    }
    if path.contains(':') {
        let parts: Vec<&str> = path.split(':').collect();
        let [slice, prefix, name] = parts[..] else { return Err(bad("a systemd cgroup is slice:prefix:name")) };
        let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0');
        if !plain(prefix) || !plain(name) || (!slice.is_empty() && !plain(slice)) {
            return Err(bad("systemd names are plain, non-empty and without '/'"));
        }
        return Ok(expand_slice(if slice.is_empty() { "system.slice" } else { slice }).map_err(|w| bad(&w))?.join(format!("{prefix}-{name}.scope")));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(bad("not an absolute path"));
    }
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => rel.push(n),
            _ => return Err(bad("only plain components are allowed")),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(bad("the root cgroup"));
    }
    Ok(rel)
}

/// The directory of a systemd slice: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`, `-.slice` the root.
fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    let stem = slice.strip_suffix(".slice").ok_or_else(|| format!("{slice:?} is not a .slice"))?;
    if stem == "-" {
        return Ok(PathBuf::new());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(format!("{slice:?} is not a valid slice name"));
    }
    let mut dir = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        dir.push(format!("{prefix}.slice"));
    }
    Ok(dir)
}

/// Memory the host grants one VM, in bytes: its guest memory, its shared directory's tmpfs (at most
/// `shared_bytes`) and [`DAEMONS_MIB`] for QEMU itself (with TCG's translation cache) and its daemons.
pub fn vm_memory_limit(guest_mem_mib: u64, shared_bytes: u64) -> u64 {
    ((guest_mem_mib + DAEMONS_MIB) << 20) + shared_bytes
}
/// Memory of QEMU's own (device emulation, TCG's translation cache) and its daemons' (virtiofsd's
/// buffers, vhost-device-vsock's queues), MiB.
pub const DAEMONS_MIB: u64 = 1024;

/// `pids` and all their descendants (virtiofsd's sandboxed child), from /proc (host processes only).
pub fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut all: Vec<u32> = Vec::new();
    let mut todo: Vec<u32> = pids.to_vec();
    while let Some(pid) = todo.pop() {
        if all.contains(&pid) || all.len() >= 4096 {
            continue;
        }
        all.push(pid);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    all
}

/// Mount points of the cgroup hierarchies of this mount namespace (whole hierarchies only), with
/// whether each is cgroup v1.
pub fn hierarchies(mountinfo: &str) -> Vec<(PathBuf, bool)> {
    let mut v = Vec::new();
    for l in mountinfo.lines() {
        let Some((pre, post)) = l.split_once(" - ") else { continue };
        let f: Vec<&str> = pre.split_whitespace().collect();
        let fstype = post.split_whitespace().next().unwrap_or("");
        if f.len() >= 5 && f[3] == "/" && (fstype == "cgroup" || fstype == "cgroup2") {
            v.push((PathBuf::from(f[4]), fstype == "cgroup"));
        }
    }
    v
}

/// A new cgroup v1 cpuset has no CPUs and memory nodes (nothing can join it): it gets its parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let Ok(own) = std::fs::read_to_string(dir.join(f)) else { continue };
        if !own.trim().is_empty() {
            continue;
        }
        let parent = dir.parent().map(|p| p.join(f)).unwrap_or_default();
        let v =
            std::fs::read_to_string(&parent).map_err(|e| CgroupError::Io { dir: dir.display().to_string(), message: format!("{}: {e}", parent.display()) })?;
        std::fs::write(dir.join(f), v.trim()).map_err(|e| CgroupError::Io { dir: dir.display().to_string(), message: format!("{f}: {e}") })?;
    }
    Ok(())
}

impl HostCgroup {
    /// Creates `path` in every hierarchy (parents included), limits its memory to `memory_limit` bytes
    /// where the memory controller is, and moves `pids` (whole processes) there. On failure the
    /// processes may stay in the part made so far (it goes when they exit and the VM's directories are
    /// removed).
    pub fn place(path: &str, pids: &[u32], memory_limit: u64) -> Result<HostCgroup, CgroupError> {
        let rel = relative_path(path)?;
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| CgroupError::Io { dir: "/proc/self/mountinfo".into(), message: e.to_string() })?;
        let mut me = HostCgroup::default();
        let r = me.place_in(&hierarchies(&mountinfo), &rel, pids, memory_limit);
        if let Err(e) = r {
            me.remove();
            return Err(e);
        }
        info!(path, hierarchies = me.leaves.len(), ?pids, memory_limit, "the VM's processes are in its host cgroup");
        Ok(me)
    }

    fn place_in(&mut self, roots: &[(PathBuf, bool)], rel: &Path, pids: &[u32], memory_limit: u64) -> Result<(), CgroupError> {
        for (root, v1) in roots {
            let mut dir = root.clone();
            for c in rel.components() {
                dir.push(c);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {
                        self.created.push(dir.clone());
                        if *v1 {
                            inherit_cpuset(&dir)?;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(CgroupError::Io { dir: dir.display().to_string(), message: e.to_string() }),
                }
            }
            // The limit first: the processes never run above it there. cgroup v1's memory controller,
            // or v2's where the parent enables it.
            for f in ["memory.limit_in_bytes", "memory.max"] {
                if dir.join(f).exists() {
                    std::fs::write(dir.join(f), memory_limit.to_string())
                        .map_err(|e| CgroupError::Io { dir: dir.display().to_string(), message: format!("{f}: {e}") })?;
                }
            }
            for pid in pids {
                std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                    .map_err(|e| CgroupError::Io { dir: dir.display().to_string(), message: format!("moving pid {pid}: {e}") })?;
            }
            self.leaves.push(dir);
        }
        Ok(())
    }

    /// Removes the directories this made, deepest first, once the VM's processes are gone (a cgroup
    /// with processes or children stays: rmdir refuses it).
    pub fn remove(&self) {
        for d in self.created.iter().rev() {
            if let Err(e) = std::fs::remove_dir(d) {
                warn!(dir = %d.display(), error = %e, "removing the VM's host cgroup");
            }
        }
    }

    /// Like [`HostCgroup::remove`], once the VM's stopped processes have left: a directory that is still
    /// busy is tried again for up to `wait` (a process's exit leaves its cgroup shortly after the
    /// process was seen to end).
    pub async fn remove_when_empty(&self, wait: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        for d in self.created.iter().rev() {
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await
                    }
                    Err(e) => {
                        warn!(dir = %d.display(), error = %e, procs = ?leftover(d), "removing the VM's host cgroup");
                        break;
                    }
                }
            }
        }
    }

    /// Writes the directories this made to `vm_dir`'s [`RECORD_FILE`] (a host-only directory).
    pub fn record(&self, vm_dir: &Path) {
        let text = serde_json::to_vec(&self.created).unwrap_or_default();
        if let Err(e) = std::fs::write(vm_dir.join(RECORD_FILE), text) {
            warn!(dir = %vm_dir.display(), error = %e, "recording the VM's host cgroup (a cleanup after a dead shim would leave it)");
        }
    }
}

/// The first processes still in cgroup directory `d` (for the log of a removal that failed).
fn leftover(d: &Path) -> String {
    let mut s = String::new();
    let _ = std::fs::File::open(d.join("cgroup.procs")).and_then(|f| std::io::Read::read_to_string(&mut std::io::Read::take(f, 256), &mut s));
    s.split_whitespace().collect::<Vec<_>>().join(",")
}

/// The file in a VM's directory naming the cgroup directories made for it, so that the cleanup after
/// a dead shim removes them too.
pub const RECORD_FILE: &str = "host-cgroup.json";

/// Removes the cgroup directories recorded in `vm_dir` (the cleanup after a dead shim), deepest first,
/// each once the VM's killed processes have left it (waiting up to `wait` in all). Only directories
/// below a cgroup hierarchy of this mount namespace, by plain components, are touched.
pub fn remove_recorded(vm_dir: &Path, wait: std::time::Duration) {
    let Ok(text) = std::fs::read(vm_dir.join(RECORD_FILE)) else { return };
    let Ok(dirs) = serde_json::from_slice::<Vec<PathBuf>>(&text) else { return };
    let roots = std::fs::read_to_string("/proc/self/mountinfo").map(|m| hierarchies(&m)).unwrap_or_default();
    let deadline = std::time::Instant::now() + wait;
    for d in dirs.iter().rev() {
        let below_root = roots.iter().any(|(r, _)| d.strip_prefix(r).is_ok_and(|rel| rel.components().count() > 0 && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))));
        if !below_root {
            warn!(dir = %d.display(), "a recorded host cgroup that is not below a cgroup hierarchy is left alone");
            continue;
        }
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // Busy: the killed processes are still leaving it.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
                Err(e) => {
                    warn!(dir = %d.display(), error = %e, "removing a dead shim's VM cgroup");
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(vm_dir.join(RECORD_FILE));
}

/// What the host itself measures of a VM's cgroup: the ceiling of every figure its guest reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostMeter {
    /// The hierarchy directory with the memory controller, and whether it is cgroup v1's.
    memory: Option<(PathBuf, bool)>,
    /// The hierarchy directory with CPU accounting, and whether it is cgroup v1's (cpuacct).
    cpu: Option<(PathBuf, bool)>,
}

/// One reading of a [`HostMeter`] (`None`: not measured here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// Bytes charged to the VM's cgroup now (QEMU's guest memory and its own, the daemons').
    pub memory_bytes: Option<u64>,
    /// The cgroup's memory limit (what the shim set).
    pub memory_limit: Option<u64>,
    /// CPU time of every process of the VM, in microseconds.
    pub cpu_usec: Option<u64>,
}

fn read_u64(p: &Path) -> Option<u64> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(std::fs::File::open(p).ok()?, 4096), &mut s).ok()?;
    s.trim().parse().ok()
}

impl HostMeter {
    /// Reads the VM's cgroup now (cgroup v1: memory.usage_in_bytes, memory.limit_in_bytes,
    /// cpuacct.usage; v2: memory.current, memory.max, cpu.stat's usage_usec).
    pub fn read(&self) -> HostUsage {
        let mut u = HostUsage::default();
        if let Some((d, v1)) = &self.memory {
            let (cur, max) = if *v1 { ("memory.usage_in_bytes", "memory.limit_in_bytes") } else { ("memory.current", "memory.max") };
            u.memory_bytes = read_u64(&d.join(cur));
            u.memory_limit = read_u64(&d.join(max));
        }
        if let Some((d, v1)) = &self.cpu {
            u.cpu_usec = if *v1 {
                read_u64(&d.join("cpuacct.usage")).map(|ns| ns / 1000)
            } else {
                let mut s = String::new();
                std::fs::File::open(d.join("cpu.stat")).ok().and_then(|f| std::io::Read::read_to_string(&mut std::io::Read::take(f, 4096), &mut s).ok());
                s.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse().ok())
            };
        }
        u
    }
}

impl HostCgroup {
    /// The meter of this cgroup: the leaves that hold the memory and CPU accounting files.
    pub fn meter(&self) -> HostMeter {
        // cgroup v1's file in any hierarchy first: v1's cpu controller has a cpu.stat too, without
        // usage_usec; only a v2 (unified) leaf is read for v2's file.
        let find = |v1_file: &str, v2_file: &str| {
            let v2_leaf = |d: &&PathBuf| d.join("cgroup.controllers").exists() && d.join(v2_file).exists();
            (self.leaves.iter().find(|d| d.join(v1_file).exists()).map(|d| (d.clone(), true)))
                .or_else(|| self.leaves.iter().find(v2_leaf).map(|d| (d.clone(), false)))
        };
        HostMeter { memory: find("memory.usage_in_bytes", "memory.current"), cpu: find("cpuacct.usage", "cpu.stat") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_absolute_cgroupfs_paths() {
        assert_eq!(relative_path("/kubepods/besteffort/pod1/abc").unwrap(), PathBuf::from("kubepods/besteffort/pod1/abc"));
        for bad in ["kubepods/x", "/", "/a/../b", "a.slice:p", "a.slice:p:n:x", "a.slice:p:../n", "a.slice::n", "a:p:n", "-a.slice:p:n", "a--b.slice:p:n"] {
            assert!(matches!(relative_path(bad), Err(CgroupError::Path { .. })), "{bad}");
        }
        assert_eq!(relative_path("system.slice:cri-containerd:abc").unwrap(), PathBuf::from("system.slice/cri-containerd-abc.scope"));
        assert_eq!(relative_path(":cri-containerd:abc").unwrap(), PathBuf::from("system.slice/cri-containerd-abc.scope"));
        assert_eq!(
            relative_path("kubepods-besteffort-pod12.slice:cri-containerd:abc").unwrap(),
            PathBuf::from("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope")
        );
        assert_eq!(relative_path("-.slice:p:n").unwrap(), PathBuf::from("p-n.scope"));
    }

    #[test]
    fn a_meter_reads_cgroup_v1_and_v2_files() {
        let d = std::env::temp_dir().join(format!("kata-rs-meter-{}", std::process::id()));
        let (v1, v2) = (d.join("v1"), d.join("v2"));
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "1048576\n").unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "4194304\n").unwrap();
        std::fs::write(v1.join("cpuacct.usage"), "2500000\n").unwrap();
        std::fs::write(v2.join("memory.current"), "8192\n").unwrap();
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        std::fs::write(v2.join("cpu.stat"), "usage_usec 777\nuser_usec 700\n").unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory\n").unwrap();
        // A v1 cpu hierarchy (its cpu.stat has no usage_usec) before the cpuacct one: cpuacct is read.
        let cpu_v1 = d.join("cpu");
        std::fs::create_dir_all(&cpu_v1).unwrap();
        std::fs::write(cpu_v1.join("cpu.stat"), "nr_periods 0\n").unwrap();
        let cg = HostCgroup { leaves: vec![cpu_v1.clone(), v1.clone()], created: vec![] };
        assert_eq!(cg.meter().read(), HostUsage { memory_bytes: Some(1 << 20), memory_limit: Some(4 << 20), cpu_usec: Some(2500) });
        let cg = HostCgroup { leaves: vec![v2.clone()], created: vec![] };
        assert_eq!(cg.meter().read(), HostUsage { memory_bytes: Some(8192), memory_limit: None, cpu_usec: Some(777) });
        assert_eq!(HostMeter::default().read(), HostUsage::default());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_memory_limit_covers_guest_memory_tmpfs_and_daemons() {
        assert_eq!(vm_memory_limit(512, 2048 << 20), (512 + 2048 + DAEMONS_MIB) << 20);
    }

    #[test]
    fn descendants_of_this_process_include_a_child() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let me = std::process::id();
        let all = with_descendants(&[me]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(all[0], me);
        assert!(all.contains(&child.id()), "{all:?}");
    }

    #[test]
    fn whole_cgroup_hierarchies_from_mountinfo() {
        let mi = "35 25 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                  36 25 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                  37 25 0:32 /sub /mnt/cg rw - cgroup cgroup rw,cpu\n\
                  38 25 0:33 / /proc rw - proc proc rw\n";
        assert_eq!(hierarchies(mi), [(PathBuf::from("/sys/fs/cgroup/memory"), true), (PathBuf::from("/sys/fs/cgroup/unified"), false)]);
    }
}
