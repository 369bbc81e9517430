//! `containerd-shim-kata-rs-v2 -info`: what containerd 2.x asks a runtime about itself.
//!
//! containerd runs the shim binary with `-info`, the task's runtime options (a marshalled
//! `google.protobuf.Any`, possibly empty) on stdin, and reads a marshalled `containerd.types.RuntimeInfo`
//! from stdout. Its `features` is the OCI runtime-spec "features" document (what `runc features`
//! prints), which containerd reads to decide what it may ask: whether a spec with idmapped mounts may
//! be created at all (every 2.x), and whether CRI's `recursiveReadOnly` is allowed (from 2.2.7 and 2.3
//! for non-runc runtimes; 2.1 asks runc-typed runtimes only).
//!
//! The document states what kata-rs honours, not what the guest's runc could do: the mount options
//! are the guest runc's (Debian 12's runc 1.1.5) minus those the shim refuses by name, the hooks are
//! those the shim runs on the host, idmapped mounts are refused (runc 1.1 cannot make them), and no LSM
//! profile is applied.
use containerd_shim::protos::{
    protobuf::{well_known_types::any::Any, Message, MessageField},
    types::introspection::{RuntimeInfo, RuntimeVersion},
};
use std::io::{Read, Write};

use serde_json::{json, Value};

use crate::config::{config_path_from_options, Config};

/// containerd's type URL of the OCI runtime-spec features document (marshalled as JSON).
pub const FEATURES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Mount options the shim refuses by name (`spec::volume_options`): never reported.
pub const REFUSED_MOUNT_OPTIONS: &[&str] = &["rshared", "shared", "idmap", "ridmap"];

/// The mount options of the guest's runc (runc 1.1.5's `runc features`), less [`REFUSED_MOUNT_OPTIONS`].
/// `ro` and `rro` of a volume are made by the host on the copy virtiofsd serves, and again by runc in
/// the guest; the rest are runc's, in the guest.
pub const MOUNT_OPTIONS: &[&str] = &[
    "acl",
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "iversion",
    "lazytime",
    "loud",
    "mand",
    "noacl",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "noiversion",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "nosymfollow",
    "private",
    "ratime",
    "rbind",
    "rdev",
    "rdiratime",
    "relatime",
    "remount",
    "rexec",
    "rnoatime",
    "rnodev",
    "rnodiratime",
    "rnoexec",
    "rnorelatime",
    "rnostrictatime",
    "rnosuid",
    "rnosymfollow",
    "ro",
    "rprivate",
    "rrelatime",
    "rro",
    "rrw",
    "rslave",
    "rstrictatime",
    "rsuid",
    "rsymfollow",
    "runbindable",
    "rw",
    "silent",
    "slave",
    "strictatime",
    "suid",
    "symfollow",
    "sync",
    "tmpcopyup",
    "unbindable",
];

/// The hooks the shim runs (on the host: `hooks.rs`); `createContainer` and `startContainer` would run
/// in the guest's namespaces and are not run.
pub const HOOKS: &[&str] = &["prestart", "createRuntime", "poststart", "poststop"];

/// Runtime options larger than this are not options.
const MAX_OPTIONS: u64 = 1 << 20;

/// The OCI features document of kata-rs.
pub fn features() -> Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2-dev",
        "hooks": HOOKS,
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            // The host cgroup of the VM: cgroupfs paths and systemd's `slice:prefix:name` form.
            "cgroup": { "v1": true, "v2": true, "systemd": true, "systemdUser": false },
            "seccomp": { "enabled": true },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false },
            "intelRdt": { "enabled": false },
            "mountExtensions": { "idmap": { "enabled": false } },
        },
        "annotations": { "org.kata-rs.runtime": "vm", "org.kata-rs.checkpoint.enabled": "true" },
    })
}

#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("reading the runtime options on stdin: {0}")]
    Read(#[from] std::io::Error),
    #[error("the runtime options on stdin are over {MAX_OPTIONS} bytes")]
    TooLarge,
    #[error("the runtime options on stdin are not a google.protobuf.Any: {0}")]
    NotAny(String),
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The marshalled `RuntimeInfo` for runtime options `options` (a marshalled Any; empty for none).
/// Options kata-rs would refuse at Create are refused here, and a configuration file they name must load.
pub fn runtime_info(options: &[u8]) -> Result<Vec<u8>, InfoError> {
    let any = if options.is_empty() { None } else { Some(Any::parse_from_bytes(options).map_err(|e| InfoError::NotAny(e.to_string()))?) };
    if let Some(a) = &any {
        if let Some(path) = config_path_from_options(&a.type_url, &a.value).map_err(InfoError::Options)? {
            Config::load(&path)?;
        }
    }
    let mut info = RuntimeInfo::new();
    info.name = crate::shimcmd::RUNTIME_ID.to_string();
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_string();
    info.version = MessageField::some(version);
    info.options = any.into();
    let mut doc = Any::new();
    doc.type_url = FEATURES_TYPE_URL.to_string();
    doc.value = serde_json::to_vec(&features()).expect("serializable");
    info.features = MessageField::some(doc);
    Ok(info.write_to_bytes().expect("a RuntimeInfo serializes"))
}

/// `-info`: options from `input` (bounded), the answer to `output`.
pub fn run(input: impl Read, mut output: impl Write) -> Result<(), InfoError> {
    let mut options = Vec::new();
    input.take(MAX_OPTIONS + 1).read_to_end(&mut options)?;
    if options.len() as u64 > MAX_OPTIONS {
        return Err(InfoError::TooLarge);
    }
    output.write_all(&runtime_info(&options)?)?;
    output.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RUNTIME_OPTIONS_TYPE;

    #[test]
    fn reported_mount_options_are_the_ones_volumes_take() {
        for o in MOUNT_OPTIONS {
            assert!(!REFUSED_MOUNT_OPTIONS.contains(o), "{o} is refused and reported");
            let opts = vec!["rbind".to_string(), o.to_string()];
            assert!(crate::spec::volume_options("/d", &opts).is_ok(), "{o} is reported but a volume with it is refused");
        }
        for o in REFUSED_MOUNT_OPTIONS {
            let opts = vec!["rbind".to_string(), o.to_string()];
            let e = crate::spec::volume_options("/d", &opts).expect_err(o).to_string();
            assert!(e.contains(o), "refusal of {o} does not name it: {e}");
        }
        let set: std::collections::BTreeSet<_> = MOUNT_OPTIONS.iter().collect();
        assert_eq!(set.len(), MOUNT_OPTIONS.len(), "a mount option is listed twice");
    }

    fn decode(bytes: &[u8]) -> (RuntimeInfo, Value) {
        let info = RuntimeInfo::parse_from_bytes(bytes).unwrap();
        let f = info.features.as_ref().unwrap();
        assert_eq!(f.type_url, FEATURES_TYPE_URL);
        let doc = serde_json::from_slice(&f.value).unwrap();
        (info, doc)
    }

    #[test]
    fn runtime_info_names_the_runtime_and_what_it_honours() {
        let (info, doc) = decode(&runtime_info(&[]).unwrap());
        assert_eq!(info.name, "io.containerd.kata-rs.v2");
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert!(info.options.is_none());
        let opts: Vec<&str> = doc["mountOptions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(opts.contains(&"rro") && opts.contains(&"ro") && opts.contains(&"rslave"));
        assert!(!opts.contains(&"rshared"));
        assert_eq!(doc["linux"]["mountExtensions"]["idmap"]["enabled"], false);
        assert_eq!(doc["hooks"], json!(["prestart", "createRuntime", "poststart", "poststop"]));
    }

    fn options_any(type_url: &str, config_path: &str) -> Vec<u8> {
        let mut value = vec![0x12, config_path.len() as u8];
        value.extend_from_slice(config_path.as_bytes());
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a.write_to_bytes().unwrap()
    }

    #[test]
    fn options_are_echoed_checked_and_their_config_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "").unwrap();
        let bytes = options_any(RUNTIME_OPTIONS_TYPE, good.to_str().unwrap());
        let (info, _) = decode(&runtime_info(&bytes).unwrap());
        assert_eq!(info.options.type_url, RUNTIME_OPTIONS_TYPE);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[runtime]\nno_such_key = 1\n").unwrap();
        let e = runtime_info(&options_any(RUNTIME_OPTIONS_TYPE, bad.to_str().unwrap())).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
        let e = runtime_info(&options_any("containerd.runc.v1.Options", "/x")).unwrap_err().to_string();
        assert!(e.contains("not understood"), "{e}");
        assert!(matches!(runtime_info(b"\xff\xff\xff"), Err(InfoError::NotAny(_))));
        let mut huge = std::io::repeat(0).take(MAX_OPTIONS + 10);
        assert!(matches!(run(&mut huge, Vec::new()), Err(InfoError::TooLarge)));
    }
}
