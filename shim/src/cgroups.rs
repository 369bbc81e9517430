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
