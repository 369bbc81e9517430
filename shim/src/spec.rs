//! Turning containerd's OCI spec (written for the host) into the spec the guest's runc runs.
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("config.json: {0}")]
    Invalid(String),
}

/// A host bind mount of the spec (a volume), served to the guest through the shared filesystem.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// Host path (from containerd's spec: the user's or the orchestrator's choice, not the guest's).
    pub source: String,
    /// Path in the container.
    pub destination: String,
    /// Where the guest finds it (below the shared directory); the spec's source now names this.
    pub guest_source: String,
    /// Name of its mount point in the container's shared directory (`volumes/<n>`).
    pub shared_name: String,
    /// `ro`: the top mount only (OCI's meaning, as runc does); `rro`: every submount too.
    pub readonly: ReadOnly,
    /// `rbind` (submounts come along) rather than `bind`.
    pub recursive: bool,
    /// How mounts the host makes later below the source reach the copy the guest sees.
    pub propagation: Propagation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnly {
    No,
    /// `ro`: the bind's top mount is read-only, its submounts keep their flags.
    Top,
    /// `rro`: the top mount and every submount are read-only.
    Recursive,
}

/// Propagation of a volume's copy. `rshared` (Kubernetes' Bidirectional) is refused: mounts made in a
/// VM never reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// `rprivate`, `private`, `runbindable`, `unbindable`, or nothing said: nothing the host mounts
    /// below the source later is seen.
    Private,
    /// `rslave`, `slave` (Kubernetes' HostToContainer): mounts the host makes below the source later are
    /// seen, nothing goes back.
    Slave,
}

/// The volume options that decide its host copy: read-only-ness and propagation. Other options
/// (nosuid, nodev, noexec, ...) are the guest's runc's to apply; the host copy is always nosuid,nodev.
pub(crate) fn volume_options(dest: &str, opts: &[String]) -> Result<(ReadOnly, Propagation), SpecError> {
    let has = |o: &str| opts.iter().any(|x| x == o);
    let readonly = if has("rro") {
        ReadOnly::Recursive
    } else if has("ro") {
        ReadOnly::Top
    } else {
        ReadOnly::No
    };
    let mut prop = None;
    for o in opts {
        let p = match o.as_str() {
            "rprivate" | "private" | "runbindable" | "unbindable" => Propagation::Private,
            "rslave" | "slave" => Propagation::Slave,
            "idmap" | "ridmap" => {
                return Err(SpecError::Invalid(format!(
                    "bind mount on {dest}: option {o}: idmapped mounts are not supported by kata-rs (the guest's runc 1.1 cannot make them)"
                )))
            }
            "rshared" | "shared" => {
                return Err(SpecError::Invalid(format!(
                    "bind mount on {dest}: propagation {o} (Kubernetes' Bidirectional) cannot work across a VM: mounts made in the guest never reach the host; use rslave (HostToContainer) or rprivate"
                )))
            }
            _ => continue,
        };
        if prop.is_some_and(|q| q != p) {
            return Err(SpecError::Invalid(format!("bind mount on {dest}: more than one propagation in its options {opts:?}")));
        }
        prop = Some(p);
    }
    let prop = prop.unwrap_or(Propagation::Private);
    if readonly == ReadOnly::Recursive && prop == Propagation::Slave {
        // The kernel applies no flag to mounts that arrive by propagation later: they would come writable.
        return Err(SpecError::Invalid(format!(
            "bind mount on {dest}: rro with rslave: mounts the host makes below the source later would arrive writable (Kubernetes allows recursiveReadOnly only with mountPropagation None); use rro with rprivate"
        )));
    }
    Ok((readonly, prop))
}

/// What was changed, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Adapted {
    pub spec: Vec<u8>,
    /// Host bind mounts, re-pointed at the shared directory (the host binds each there before boot).
    pub volumes: Vec<Volume>,
    /// Destinations of mounts that cannot exist in the guest and were dropped.
    pub dropped_mounts: Vec<String>,
    /// Namespaces whose host path was dropped (the container gets a new one in the guest).
    pub dropped_namespace_paths: Vec<String>,
}

/// Mount types that are created inside the guest and need no host source.
const GUEST_MOUNT_TYPES: &[&str] = &["proc", "tmpfs", "devpts", "sysfs", "mqueue", "cgroup", "cgroup2", "shm"];

/// The network namespace a spec asks for, which is where QEMU runs: none listed = the host's (as
/// runc would do), listed without a path = a new one, with a path = that one (CRI's pod namespace,
/// a client's `/var/run/netns/...`).
pub fn network_namespace(spec: &Value) -> vmm::Netns {
    let nss = spec.pointer("/linux/namespaces").and_then(Value::as_array);
    match nss.and_then(|a| a.iter().find(|n| n.get("type").and_then(Value::as_str) == Some("network"))) {
        None => vmm::Netns::Inherit,
        Some(n) => match n.get("path").and_then(Value::as_str).filter(|p| !p.is_empty()) {
            Some(p) => vmm::Netns::Path(p.into()),
            None => vmm::Netns::New,
        },
    }
}

/// containerd's CRI plugin marks a pod's containers: the type (`sandbox` for the pod's pause
/// container, `container` for the others) and the pod's sandbox id.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod's resources as containerd's CRI gives them to the sandbox (bytes; microseconds).
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Where a container runs: in a VM of its own, as a pod's sandbox (it boots the pod's VM), or as one
/// of a pod's other containers (in the VM its sandbox booted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    Own,
    Sandbox(String),
    Container(String),
}

impl PodRole {
    /// The id this shim and its VM are grouped by: the pod's sandbox id, else the container's own.
    pub fn group<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            PodRole::Own => id,
            PodRole::Sandbox(s) | PodRole::Container(s) => s,
        }
    }
}

fn annotation<'a>(spec: &'a Value, key: &str) -> Option<&'a str> {
    spec.pointer("/annotations").and_then(|a| a.get(key)).and_then(Value::as_str)
}

/// A sandbox id as containerd makes them (and as a file name and socket key can hold).
fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) && !id.starts_with('.')
}

/// Whether a host mount sits below `source` (the host's /proc/self/mountinfo; the source is the
/// host's, from containerd's spec, its symlinks followed as runc does).
fn host_has_submounts(source: &str) -> bool {
    let Ok(real) = std::fs::canonicalize(source) else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    mount_points_below(&info, &real.to_string_lossy())
}

/// Whether `mountinfo` lists a mount point strictly below `dir` (mount points octal-escaped).
fn mount_points_below(mountinfo: &str, dir: &str) -> bool {
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).any(|p| unescape_mountinfo(p).starts_with(&prefix))
}

fn unescape_mountinfo(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A pod's sandbox spec without a network, IPC or PID namespace of its own is a pod that asks for the
/// host's (CRI's NODE mode: `hostNetwork`, `hostIPC`, `hostPID`). A VM cannot share them with the
/// host: refused here, at RunPodSandbox, by name (as Kata does), rather than given the VM's own.
fn refuse_host_namespaces(spec: &Value) -> Result<(), SpecError> {
    let has = |t: &str| {
        spec.pointer("/linux/namespaces").and_then(Value::as_array).is_some_and(|a| a.iter().any(|n| n.get("type").and_then(Value::as_str) == Some(t)))
    };
    let wanted: Vec<&str> = [("network", "hostNetwork"), ("ipc", "hostIPC"), ("pid", "hostPID")].iter().filter(|(t, _)| !has(t)).map(|(_, k)| *k).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    Err(SpecError::Invalid(format!(
        "the pod asks for the host's namespaces ({}): a VM cannot share the host's network, IPC or PID namespace; run such pods with a runc RuntimeClass (docs/kubernetes.md)",
        wanted.join(", ")
    )))
}

/// The container's role from CRI's annotations; a sandbox's own id must be its sandbox id.
pub fn pod_role(spec: &Value, id: &str) -> Result<PodRole, SpecError> {
    let typ = annotation(spec, CRI_CONTAINER_TYPE);
    let sid = annotation(spec, CRI_SANDBOX_ID);
    let sid_ok = |s: Option<&str>| -> Result<String, SpecError> {
        let s = s.ok_or_else(|| SpecError::Invalid(format!("annotation {CRI_CONTAINER_TYPE} without {CRI_SANDBOX_ID}")))?;
        if !valid_sandbox_id(s) {
            return Err(SpecError::Invalid(format!("annotation {CRI_SANDBOX_ID}: {s:?} is not a sandbox id")));
        }
        Ok(s.to_string())
    };
    match typ {
        None => Ok(PodRole::Own),
        Some("sandbox") => {
            let s = sid_ok(sid)?;
            if s != id {
                return Err(SpecError::Invalid(format!("a pod's sandbox container {id} names another sandbox, {s}")));
            }
            refuse_host_namespaces(spec)?;
            Ok(PodRole::Sandbox(s))
        }
        Some("container") => {
            let s = sid_ok(sid)?;
            if s == id {
                return Err(SpecError::Invalid(format!("container {id} names itself as its pod's sandbox")));
            }
            Ok(PodRole::Container(s))
        }
        Some(other) => Err(SpecError::Invalid(format!("annotation {CRI_CONTAINER_TYPE}: {other:?} is neither sandbox nor container"))),
    }
}

/// A pod's VM size, Kata's static sizing: the configured base plus the pod's limits, which CRI gives
/// the sandbox container (memory rounded up to MiB; vCPUs = quota / period rounded up). A pod without
/// limits gets the base. Returns (memory MiB, vCPUs), bounded by `max_memory_mib` and `max_vcpus`.
pub fn pod_size(spec: &Value, base_mib: u32, base_vcpus: u32, max_memory_mib: u32, max_vcpus: u32) -> Result<(u32, u32), SpecError> {
    let num = |k: &str| -> Result<Option<i64>, SpecError> {
        match annotation(spec, k) {
            None | Some("") => Ok(None),
            Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| SpecError::Invalid(format!("annotation {k}: {v:?} is not a number"))),
        }
    };
    let mem = num(CRI_SANDBOX_MEMORY)?.filter(|m| *m > 0).map(|m| ((m as u64).div_ceil(1 << 20)).min(u32::MAX as u64) as u32).unwrap_or(0);
    let cpus = match (num(CRI_SANDBOX_CPU_QUOTA)?, num(CRI_SANDBOX_CPU_PERIOD)?) {
        (Some(q), Some(p)) if q > 0 && p > 0 => ((q as u64).div_ceil(p as u64)).min(u32::MAX as u64) as u32,
        _ => 0,
    };
    Ok((base_mib.saturating_add(mem).min(max_memory_mib.max(base_mib)), base_vcpus.saturating_add(cpus).min(max_vcpus.max(base_vcpus))))
}

/// Bind mounts per container: more is a mistake, not a workload.
pub const MAX_VOLUMES: usize = 256;

fn is_bind(m: &Value) -> bool {
    let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
    let opts = m.get("options").and_then(Value::as_array);
    let has = |o: &str| opts.is_some_and(|a| a.iter().any(|x| x.as_str() == Some(o)));
    typ == "bind" || ((typ.is_empty() || typ == "none") && (has("bind") || has("rbind")))
}

/// Adapts `config.json` for the guest: hooks (host programs, run by the shim) and the host cgroup
/// path go, namespace paths go (reported), root.path is set by the agent. Host bind mounts become
/// volumes: their source is re-pointed at `<guest_container_dir>/volumes/<n>`, where the host binds
/// the real source before the VM boots.
pub fn adapt_for_guest(config_json: &[u8], guest_container_dir: &str) -> Result<Adapted, SpecError> {
    let mut spec: Value = serde_json::from_slice(config_json).map_err(|e| SpecError::Invalid(e.to_string()))?;
    let obj = spec.as_object_mut().ok_or_else(|| SpecError::Invalid("not a JSON object".into()))?;
    let mut out = Adapted::default();
    obj.remove("hooks");
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        let mut err = None;
        mounts.retain_mut(|m| {
            let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or("?").to_string();
            if m.get("uidMappings").is_some() || m.get("gidMappings").is_some() {
                // runc 1.1 in the guest would ignore them: the files would keep the host's owners.
                err.get_or_insert(SpecError::Invalid(format!(
                    "mount on {dest}: uidMappings/gidMappings (an idmapped mount) are not supported by kata-rs (the guest's runc 1.1 cannot make them)"
                )));
                return false;
            }
            if GUEST_MOUNT_TYPES.contains(&typ) {
                return true;
            }
            if !is_bind(m) {
                out.dropped_mounts.push(dest);
                return false;
            }
            let Some(source) = m.get("source").and_then(Value::as_str).filter(|s| s.starts_with('/')).map(str::to_string) else {
                err.get_or_insert(SpecError::Invalid(format!("bind mount on {dest}: its source must be an absolute host path")));
                return false;
            };
            let source = source.as_str();
            if out.volumes.len() == MAX_VOLUMES {
                err.get_or_insert(SpecError::Invalid(format!("more than {MAX_VOLUMES} bind mounts")));
                return false;
            }
            let opts: Vec<String> =
                m.get("options").and_then(Value::as_array).map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
            let (readonly, propagation) = match volume_options(&dest, &opts) {
                Ok(v) => v,
                Err(e) => {
                    err.get_or_insert(e);
                    return false;
                }
            };
            let recursive = opts.iter().any(|o| o == "rbind");
            if readonly == ReadOnly::Top && recursive && host_has_submounts(source) {
                // OCI's `ro` is the top mount only: the host copy virtiofsd serves is read-only at its
                // top and writable in its submounts. In the guest the whole tree is one virtio-fs
                // mount, so a guest `ro` would make the submounts read-only too; there the guest mount
                // stays read-write and the host refuses writes to the top (EROFS).
                if let Some(a) = m.get_mut("options").and_then(Value::as_array_mut) {
                    a.retain(|o| o.as_str() != Some("ro"));
                }
            }
            let shared_name = out.volumes.len().to_string();
            let guest_source = format!("{guest_container_dir}/volumes/{shared_name}");
            out.volumes.push(Volume {
                source: source.to_string(),
                destination: dest,
                guest_source: guest_source.clone(),
                shared_name,
                readonly,
                recursive,
                propagation,
            });
            m["source"] = Value::String(guest_source);
            true
        });
        if let Some(e) = err {
            return Err(e);
        }
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

    fn annotated(pairs: &[(&str, &str)]) -> Value {
        let a: serde_json::Map<String, Value> = pairs.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
        serde_json::json!({ "annotations": a })
    }

    #[test]
    fn mount_points_below_a_directory_are_found_escaped_or_not() {
        let info = "22 1 0:21 / / rw - ext4 /dev/vda rw\n30 22 0:40 / /data/vol rw - tmpfs t rw\n31 30 0:41 / /data/vol/my\\040sub rw - tmpfs t rw\n";
        assert!(mount_points_below(info, "/data"));
        assert!(mount_points_below(info, "/data/vol"));
        assert!(mount_points_below(info, "/data/vol/"));
        assert!(!mount_points_below(info, "/data/vol/my sub"), "its own mount point is not below it");
        assert!(!mount_points_below(info, "/data/vo"), "a name prefix is not a directory prefix");
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
    }

    #[test]
    fn a_sandbox_asking_for_host_namespaces_is_refused_by_name() {
        let mut sb = annotated(&[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "p1")]);
        sb["linux"] = serde_json::json!({"namespaces": [{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]});
        let e = pod_role(&sb, "p1").unwrap_err().to_string();
        assert!(e.contains("hostNetwork, hostPID") && !e.contains("hostIPC") && e.contains("runc RuntimeClass"), "{e}");
        // A pod's other containers and a VM's own container are not sandboxes: not refused here.
        let c = annotated(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "p1")]);
        assert_eq!(pod_role(&c, "c1").unwrap(), PodRole::Container("p1".into()));
    }

    #[test]
    fn cri_annotations_give_the_pod_role() {
        assert_eq!(pod_role(&serde_json::json!({}), "c1").unwrap(), PodRole::Own);
        let mut sb = annotated(&[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "p1")]);
        sb["linux"] = serde_json::json!({"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]});
        assert_eq!(pod_role(&sb, "p1").unwrap(), PodRole::Sandbox("p1".into()));
        assert!(pod_role(&sb, "other").is_err(), "a sandbox names itself");
        let c = annotated(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "p1")]);
        assert_eq!(pod_role(&c, "c1").unwrap(), PodRole::Container("p1".into()));
        assert_eq!(pod_role(&c, "c1").unwrap().group("c1"), "p1");
        assert!(pod_role(&c, "p1").is_err());
        assert!(pod_role(&annotated(&[(CRI_CONTAINER_TYPE, "container")]), "c1").is_err());
        assert!(pod_role(&annotated(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "../x")]), "c1").is_err());
        assert!(pod_role(&annotated(&[(CRI_CONTAINER_TYPE, "podsandbox"), (CRI_SANDBOX_ID, "p1")]), "p1").is_err());
    }

    #[test]
    fn pod_size_is_base_plus_limits_bounded() {
        assert_eq!(pod_size(&serde_json::json!({}), 2048, 1, 65536, 16).unwrap(), (2048, 1));
        let s = annotated(&[(CRI_SANDBOX_MEMORY, "268435457"), (CRI_SANDBOX_CPU_QUOTA, "150000"), (CRI_SANDBOX_CPU_PERIOD, "100000")]);
        assert_eq!(pod_size(&s, 2048, 1, 65536, 16).unwrap(), (2048 + 257, 3));
        let huge = annotated(&[(CRI_SANDBOX_MEMORY, "9223372036854775807"), (CRI_SANDBOX_CPU_QUOTA, "-1"), (CRI_SANDBOX_CPU_PERIOD, "100000")]);
        assert_eq!(pod_size(&huge, 2048, 1, 65536, 16).unwrap(), (65536, 1));
        assert!(pod_size(&annotated(&[(CRI_SANDBOX_MEMORY, "lots")]), 2048, 1, 65536, 16).is_err());
    }

    fn sample() -> Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"terminal": false, "args": ["sh"]},
            "root": {"path": "rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": "/var/lib/x/resolv.conf", "options": ["rbind"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/mnt/nfs", "type": "nfs", "source": "server:/export"},
                {"destination": "/data", "source": "/srv/data", "options": ["rbind", "ro", "nosuid"]}
            ],
            "linux": {
                "cgroupsPath": "/default/c1",
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]
            }
        })
    }

    const DIR: &str = "/run/kata-rs/shared/c1";

    #[test]
    fn host_only_parts_are_removed_and_reported() {
        let a = adapt_for_guest(&serde_json::to_vec(&sample()).unwrap(), DIR).unwrap();
        let v: Value = serde_json::from_slice(&a.spec).unwrap();
        assert!(v.get("hooks").is_none());
        assert!(v["linux"].get("cgroupsPath").is_none());
        let dests: Vec<&str> = v["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
        assert_eq!(dests, ["/proc", "/etc/resolv.conf", "/dev", "/data"]);
        assert_eq!(a.dropped_mounts, ["/mnt/nfs"]);
        assert_eq!(a.dropped_namespace_paths, ["network"]);
        assert_eq!(v["linux"]["namespaces"][1], serde_json::json!({"type": "network"}));
        assert_eq!(v["process"]["args"][0], "sh");
    }

    #[test]
    fn bind_mounts_become_volumes_in_the_shared_directory() {
        let a = adapt_for_guest(&serde_json::to_vec(&sample()).unwrap(), DIR).unwrap();
        let v: Value = serde_json::from_slice(&a.spec).unwrap();
        assert_eq!(
            a.volumes,
            [
                Volume {
                    source: "/var/lib/x/resolv.conf".into(),
                    destination: "/etc/resolv.conf".into(),
                    guest_source: format!("{DIR}/volumes/0"),
                    shared_name: "0".into(),
                    readonly: ReadOnly::No,
                    recursive: true,
                    propagation: Propagation::Private,
                },
                Volume {
                    source: "/srv/data".into(),
                    destination: "/data".into(),
                    guest_source: format!("{DIR}/volumes/1"),
                    shared_name: "1".into(),
                    readonly: ReadOnly::Top,
                    recursive: true,
                    propagation: Propagation::Private,
                },
            ]
        );
        assert_eq!(v["mounts"][1]["source"], format!("{DIR}/volumes/0"));
        assert_eq!(v["mounts"][3]["source"], format!("{DIR}/volumes/1"));
        assert_eq!(v["mounts"][3]["options"], serde_json::json!(["rbind", "ro", "nosuid"]), "runc in the guest applies the options");
    }

    #[test]
    fn volume_options_decide_read_only_and_propagation_or_are_refused_by_name() {
        let o = |v: &[&str]| volume_options("/d", &v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&["rbind"]).unwrap(), (ReadOnly::No, Propagation::Private));
        assert_eq!(o(&["rbind", "ro", "rprivate"]).unwrap(), (ReadOnly::Top, Propagation::Private));
        assert_eq!(o(&["rbind", "rro"]).unwrap(), (ReadOnly::Recursive, Propagation::Private));
        assert_eq!(o(&["rbind", "ro", "rro"]).unwrap(), (ReadOnly::Recursive, Propagation::Private));
        assert_eq!(o(&["rbind", "ro", "rslave"]).unwrap(), (ReadOnly::Top, Propagation::Slave));
        let e = o(&["rbind", "rro", "rslave"]).unwrap_err().to_string();
        assert!(e.contains("rro with rslave"), "{e}");
        assert_eq!(o(&["bind", "slave"]).unwrap(), (ReadOnly::No, Propagation::Slave));
        let e = o(&["rbind", "idmap"]).unwrap_err().to_string();
        assert!(e.contains("idmap") && e.contains("/d"), "{e}");
        let e = o(&["rbind", "rshared"]).unwrap_err().to_string();
        assert!(e.contains("rshared") && e.contains("/d") && e.contains("rslave"), "{e}");
        let e = o(&["rbind", "rslave", "rprivate"]).unwrap_err().to_string();
        assert!(e.contains("more than one propagation"), "{e}");
        let mut s = sample();
        s["mounts"][4]["options"] = serde_json::json!(["rbind", "shared"]);
        let e = adapt_for_guest(&serde_json::to_vec(&s).unwrap(), DIR).unwrap_err();
        assert!(e.to_string().contains("/data") && e.to_string().contains("shared"), "{e}");
        // An idmapped mount, of a volume or of a mount made in the guest, is refused by name.
        for n in [4, 2] {
            let mut s = sample();
            s["mounts"][n]["uidMappings"] = serde_json::json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
            let e = adapt_for_guest(&serde_json::to_vec(&s).unwrap(), DIR).unwrap_err().to_string();
            assert!(e.contains("uidMappings") && e.contains(s["mounts"][n]["destination"].as_str().unwrap()), "{e}");
        }
    }

    #[test]
    fn a_bind_mount_needs_an_absolute_source_and_their_number_is_bounded() {
        let mut s = sample();
        s["mounts"][1]["source"] = Value::String("relative/x".into());
        let e = adapt_for_guest(&serde_json::to_vec(&s).unwrap(), DIR).unwrap_err();
        assert!(e.to_string().contains("/etc/resolv.conf"), "{e}");
        let mut s = sample();
        let many: Vec<Value> = (0..=MAX_VOLUMES).map(|i| serde_json::json!({"destination": format!("/v{i}"), "type": "bind", "source": "/srv"})).collect();
        s["mounts"] = Value::Array(many);
        let e = adapt_for_guest(&serde_json::to_vec(&s).unwrap(), DIR).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn the_network_namespace_qemu_runs_in() {
        let with = |nss: Value| serde_json::json!({"linux": {"namespaces": nss}});
        assert_eq!(network_namespace(&with(serde_json::json!([{"type": "pid"}]))), vmm::Netns::Inherit);
        assert_eq!(network_namespace(&serde_json::json!({})), vmm::Netns::Inherit);
        assert_eq!(network_namespace(&with(serde_json::json!([{"type": "network"}]))), vmm::Netns::New);
        assert_eq!(network_namespace(&with(serde_json::json!([{"type": "network", "path": ""}]))), vmm::Netns::New);
        assert_eq!(
            network_namespace(&with(serde_json::json!([{"type": "network", "path": "/var/run/netns/cni-1"}]))),
            vmm::Netns::Path("/var/run/netns/cni-1".into())
        );
    }

    #[test]
    fn terminal_is_kept() {
        let mut s = sample();
        s["process"]["terminal"] = Value::Bool(true);
        let a = adapt_for_guest(&serde_json::to_vec(&s).unwrap(), DIR).unwrap();
        let v: Value = serde_json::from_slice(&a.spec).unwrap();
        assert_eq!(v["process"]["terminal"], Value::Bool(true));
    }

    #[test]
    fn garbage_is_invalid() {
        assert!(matches!(adapt_for_guest(b"[1,2", DIR), Err(SpecError::Invalid(_))));
        assert!(matches!(adapt_for_guest(b"[1,2]", DIR), Err(SpecError::Invalid(_))));
    }
}
