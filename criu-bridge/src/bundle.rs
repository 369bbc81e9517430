//! The guest's edits of a container's OCI spec before runc reads it: the guest's rootfs, the cgroup
//! under the pod's, the namespaces joined, the CRIU configuration of a restore.
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::container::{ContainerError, PodJoin};

/// CRIU options of every restore (runc reads them from the file the `org.criu.config` annotation names).
pub const CRIU_RESTORE_CONF: &str = "/run/kata-rs/criu-restore.conf";

/// The spec as the guest runs it, and what the agent learnt from it.
pub struct Bundle {
    pub spec: Value,
    /// runc's cgroupsPath (a pod's containers under the pod's).
    pub cgroups_path: String,
    pub terminal: bool,
    /// The spec lists a network namespace.
    pub wants_netns: bool,
}

/// Parses the host's spec and makes the guest's edits that need no other container.
pub fn prepare(id: &str, spec: &[u8], rootfs: &str, for_restore: bool, pod: &PodJoin) -> Result<Bundle, ContainerError> {
    let mut spec: Value = serde_json::from_slice(spec).map_err(|e| ContainerError::Invalid(format!("OCI spec: {e}")))?;
    if !Path::new(rootfs).is_absolute() || !Path::new(rootfs).is_dir() {
        return Err(ContainerError::Invalid(format!("rootfs {rootfs} is not a directory in the guest")));
    }
    let obj = spec.as_object_mut().ok_or_else(|| ContainerError::Invalid("OCI spec is not an object".into()))?;
    // The guest's copy of the rootfs, read-only where the spec says so (CRI's readonly_rootfs).
    let readonly = obj.get("root").and_then(|r| r.get("readonly")).and_then(Value::as_bool).unwrap_or(false);
    obj.insert("root".into(), serde_json::json!({"path": rootfs, "readonly": readonly}));
    let cgroups_path = if pod.sandbox_id.is_empty() { format!("/kata-rs/{id}") } else { format!("/kata-rs/{}/{id}", pod.sandbox_id) };
    let linux = obj.entry("linux").or_insert_with(|| serde_json::json!({}));
    if let Some(l) = linux.as_object_mut() {
        l.insert("cgroupsPath".into(), Value::String(cgroups_path.clone()));
    }
    if for_restore {
        // The restored container has new addresses: its established TCP connections come back closed
        // (CRIU's tcp-close, in the file written by `write_restore_conf`), listeners listen.
        let ann = obj.entry("annotations").or_insert_with(|| serde_json::json!({}));
        if let Some(a) = ann.as_object_mut() {
            a.insert("org.criu.config".into(), Value::String(CRIU_RESTORE_CONF.into()));
        }
    }
    let terminal = spec.pointer("/process/terminal").and_then(Value::as_bool).unwrap_or(false);
    let wants_netns = spec.pointer("/linux/namespaces").and_then(Value::as_array).is_some_and(|a| a.iter().any(|n| n.get("type").and_then(Value::as_str) == Some("network")));
    Ok(Bundle { spec, cgroups_path, terminal, wants_netns })
}

/// The CRIU options runc gives every restore.
pub fn write_restore_conf() -> std::io::Result<()> {
    std::fs::write(CRIU_RESTORE_CONF, "tcp-close\n")
}

/// Points the spec's namespace of `kind` (when it lists one) at `path`. Returns whether it did.
pub fn set_ns_path(spec: &mut Value, kind: &str, path: &str) -> bool {
    let Some(nss) = spec.pointer_mut("/linux/namespaces").and_then(Value::as_array_mut) else {
        return false;
    };
    for ns in nss.iter_mut() {
        if ns.get("type").and_then(Value::as_str) == Some(kind) {
            if let Some(o) = ns.as_object_mut() {
                o.insert("path".into(), Value::String(path.into()));
                return true;
            }
        }
    }
    false
}

/// Whether the spec gives the container a PID namespace of its own (one without a path to join).
pub fn has_own_pid_ns(spec: &Value) -> bool {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|n| n.get("type").and_then(Value::as_str) == Some("pid") && n.get("path").and_then(Value::as_str).unwrap_or("").is_empty()))
}

/// The guest cgroup (v2) of runc's `cgroupsPath`.
pub fn cgroup_dir(cgroups_path: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(cgroups_path.trim_start_matches('/'))
}

/// The `oom_kill` count of the cgroup `dir` (and below it); 0 without a memory controller.
pub fn oom_kills_in(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.events")).map(|t| oom_kills(&t)).unwrap_or(0)
}

/// The `oom_kill` count of a cgroup v2 `memory.events` file.
fn oom_kills(events: &str) -> u64 {
    events.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Destinations of the spec's bind mounts: runc hands each to CRIU as an external mount.
pub fn bind_destinations(spec: &Value) -> Vec<String> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return vec![];
    };
    mounts
        .iter()
        .filter(|m| {
            m.get("type").and_then(Value::as_str) == Some("bind")
                || m.get("options").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| matches!(x.as_str(), Some("bind") | Some("rbind"))))
        })
        .filter_map(|m| m.get("destination").and_then(Value::as_str).map(|d| d.trim_end_matches('/').to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"), 1);
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"), 0);
        assert_eq!(oom_kills(""), 0);
    }

    #[test]
    fn the_spec_joins_the_named_namespace() {
        let mut s = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}]}});
        assert!(set_ns_path(&mut s, "network", "/run/netns/c1"));
        assert!(set_ns_path(&mut s, "ipc", "/proc/7/ns/ipc"));
        assert_eq!(s["linux"]["namespaces"][1]["path"], "/run/netns/c1");
        assert_eq!(s["linux"]["namespaces"][2]["path"], "/proc/7/ns/ipc");
        assert!(s["linux"]["namespaces"][0].get("path").is_none());
        let mut none = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        assert!(!set_ns_path(&mut none, "network", "/run/netns/c1"));
    }

    #[test]
    fn the_guests_edits_of_a_pod_containers_spec() {
        let dir = std::env::temp_dir();
        let pod = PodJoin { sandbox_id: "pod1".into(), namespaces: vec![] };
        let spec = br#"{"root": {"path": "/host/rootfs", "readonly": true}, "process": {"terminal": true}, "linux": {"namespaces": [{"type": "network"}]}}"#;
        let b = prepare("c1", spec, dir.to_str().unwrap(), true, &pod).unwrap();
        assert_eq!(b.spec["root"], serde_json::json!({"path": dir.to_str().unwrap(), "readonly": true}));
        assert_eq!(b.cgroups_path, "/kata-rs/pod1/c1");
        assert_eq!(b.spec["linux"]["cgroupsPath"], "/kata-rs/pod1/c1");
        assert_eq!(b.spec["annotations"]["org.criu.config"], CRIU_RESTORE_CONF);
        assert!(b.terminal && b.wants_netns);
        let alone = prepare("c2", b"{}", dir.to_str().unwrap(), false, &PodJoin::default()).unwrap();
        assert_eq!(alone.cgroups_path, "/kata-rs/c2");
        assert!(alone.spec.get("annotations").is_none() && !alone.terminal && !alone.wants_netns);
        assert!(matches!(prepare("c3", b"{}", "relative", false, &pod), Err(ContainerError::Invalid(_))));
        assert!(matches!(prepare("c3", b"[]", "/", false, &pod), Err(ContainerError::Invalid(_))));
    }
}
