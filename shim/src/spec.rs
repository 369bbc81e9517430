//! Turning containerd's OCI spec (written for the host) into the spec the guest's runc runs.
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("config.json: {0}")]
    Invalid(String),
}

/// What was changed, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Adapted {
    pub spec: Vec<u8>,
    /// Destinations of host bind mounts that cannot exist in the guest and were dropped.
    pub dropped_mounts: Vec<String>,
    /// Namespaces whose host path was dropped (the container gets a new one in the guest).
    pub dropped_namespace_paths: Vec<String>,
}

/// Mount types that are created inside the guest and need no host source.
const GUEST_MOUNT_TYPES: &[&str] = &["proc", "tmpfs", "devpts", "sysfs", "mqueue", "cgroup", "cgroup2", "shm"];

/// Adapts `config.json` for the guest: hooks (host programs) and the host cgroup path go,
/// host bind mounts and namespace paths go (reported), root.path is set by the agent.
pub fn adapt_for_guest(config_json: &[u8]) -> Result<Adapted, SpecError> {
    let mut spec: Value = serde_json::from_slice(config_json).map_err(|e| SpecError::Invalid(e.to_string()))?;
    let obj = spec.as_object_mut().ok_or_else(|| SpecError::Invalid("not a JSON object".into()))?;
    let mut out = Adapted::default();
    obj.remove("hooks");
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        mounts.retain(|m| {
            let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
            let keep = GUEST_MOUNT_TYPES.contains(&typ);
            if !keep {
                out.dropped_mounts.push(m.get("destination").and_then(Value::as_str).unwrap_or("?").to_string());
            }
            keep
        });
    }
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("cgroupsPath");
        if let Some(nss) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            for ns in nss.iter_mut() {
                if let Some(o) = ns.as_object_mut() {
                    if o.remove("path").is_some() {
                        out.dropped_namespace_paths.push(o.get("type").and_then(Value::as_str).unwrap_or("?").to_string());
                    }
                }
            }
        }
    }
    out.spec = serde_json::to_vec(&spec).expect("serializable");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"terminal": false, "args": ["sh"]},
            "root": {"path": "rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": "/var/lib/x/resolv.conf", "options": ["rbind"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}
            ],
            "linux": {
                "cgroupsPath": "/default/c1",
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]
            }
        })
    }

    #[test]
    fn host_only_parts_are_removed_and_reported() {
        let a = adapt_for_guest(&serde_json::to_vec(&sample()).unwrap()).unwrap();
        let v: Value = serde_json::from_slice(&a.spec).unwrap();
        assert!(v.get("hooks").is_none());
        assert!(v["linux"].get("cgroupsPath").is_none());
        let dests: Vec<&str> = v["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
        assert_eq!(dests, ["/proc", "/dev"]);
        assert_eq!(a.dropped_mounts, ["/etc/resolv.conf"]);
        assert_eq!(a.dropped_namespace_paths, ["network"]);
        assert_eq!(v["linux"]["namespaces"][1], serde_json::json!({"type": "network"}));
        assert_eq!(v["process"]["args"][0], "sh");
    }

    #[test]
    fn terminal_is_kept() {
        let mut s = sample();
        s["process"]["terminal"] = Value::Bool(true);
        let a = adapt_for_guest(&serde_json::to_vec(&s).unwrap()).unwrap();
        let v: Value = serde_json::from_slice(&a.spec).unwrap();
        assert_eq!(v["process"]["terminal"], Value::Bool(true));
    }

    #[test]
    fn garbage_is_invalid() {
        assert!(matches!(adapt_for_guest(b"[1,2"), Err(SpecError::Invalid(_))));
        assert!(matches!(adapt_for_guest(b"[1,2]"), Err(SpecError::Invalid(_))));
    }
}
