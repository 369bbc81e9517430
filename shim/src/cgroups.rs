//! A pod's host cgroup: QEMU and its helper daemons are moved into the cgroup the pod's sandbox spec
//! names (`linux.cgroupsPath`: CRI's pod cgroup below the kubelet's cgroup parent), so that the host's
//! accounting and limits of the pod cover its VM, as Kata's `sandbox_cgroup_only` does. The containers'
//! own cgroups are the guest's. cgroupfs-style paths only, in every cgroup hierarchy mounted here
//! (cgroup v1 controllers, v2's unified one).
use std::path::{Component, Path, PathBuf};

use tracing::{info, warn};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CgroupError {
    #[error("linux.cgroupsPath {path:?}: {why}")]
    Path { path: String, why: String },
    #[error("linux.cgroupsPath {path:?} is a systemd cgroup (slice:prefix:name): kata-rs places a pod's VM with cgroupfs paths only")]
    Systemd { path: String },
    #[error("the pod's host cgroup {dir}: {message}")]
    Io { dir: String, message: String },
}

/// Directories of one cgroup path in each hierarchy, and those this shim created (removed at the end).
#[derive(Debug, Default)]
pub struct HostCgroup {
    leaves: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

/// The relative form of a cgroupfs path: absolute, plain components only (no `..`, no systemd
/// `slice:prefix:name` form, which needs systemd).
pub fn relative_path(path: &str) -> Result<PathBuf, CgroupError> {
    let bad = |why: &str| CgroupError::Path { path: path.to_string(), why: why.to_string() };
    if path.contains(':') {
        return Err(CgroupError::Systemd { path: path.to_string() });
    }
    let p = Path::new(path);
    if !p.is_absolute() || path.len() > 1024 {
        return Err(bad("not an absolute path of at most 1024 bytes"));
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
    /// Creates `path` in every hierarchy (parents included) and moves `pids` (whole processes) there.
    /// On failure the processes may stay in the part made so far (it goes when they exit and the VM's
    /// directories are removed).
    pub fn place(path: &str, pids: &[u32]) -> Result<HostCgroup, CgroupError> {
        let rel = relative_path(path)?;
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| CgroupError::Io { dir: "/proc/self/mountinfo".into(), message: e.to_string() })?;
        let mut me = HostCgroup::default();
        let r = me.place_in(&hierarchies(&mountinfo), &rel, pids);
        if let Err(e) = r {
            me.remove();
            return Err(e);
        }
        info!(path, hierarchies = me.leaves.len(), ?pids, "the VM's processes are in the pod's host cgroup");
        Ok(me)
    }

    fn place_in(&mut self, roots: &[(PathBuf, bool)], rel: &Path, pids: &[u32]) -> Result<(), CgroupError> {
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
                warn!(dir = %d.display(), error = %e, "removing the pod's host cgroup");
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
        for bad in ["kubepods/x", "/", "/a/../b"] {
            assert!(matches!(relative_path(bad), Err(CgroupError::Path { .. })), "{bad}");
        }
        assert!(matches!(relative_path("system.slice:cri-containerd:abc"), Err(CgroupError::Systemd { .. })));
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
