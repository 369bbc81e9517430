//! Checkpoint logic that needs no VM: option mapping, the target directory's checks, and copying
//! images out of the guest-writable staging directory without trusting it.
use std::{
    ffi::{OsStr, OsString},
    fs,
    path::Path,
};

use tracing::warn;

mod dump;
pub mod report;
mod restore;

use crate::safefs::{self, Copied, Dir, Limits, SafeFsError};

use containerd_shim::protos::{
    protobuf::{well_known_types::any::Any, Message},
    shim::oci::CheckpointOptions,
};

/// containerd's type for runc checkpoint options (with or without the type URL prefix).
pub const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Options {
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub image_path: String,
    pub work_path: String,
}

/// Why a checkpoint or restore request was refused before any work (all the caller's to fix).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CheckpointError {
    /// The request's options: an unknown type, undecodable, or an option kata-rs cannot honour.
    #[error("{0}")]
    Options(String),
    /// The container's deadline annotation.
    #[error("{0}")]
    Deadline(String),
    /// The directory for the images: relative, not a directory, not empty, not writable, not creatable.
    #[error("{0}")]
    TargetDir(String),
}

impl From<CheckpointError> for crate::error::TaskError {
    fn from(e: CheckpointError) -> Self {
        crate::error::TaskError::Invalid(e.to_string())
    }
}

impl From<CheckpointError> for containerd_shim::protos::ttrpc::Error {
    fn from(e: CheckpointError) -> Self {
        crate::error::TaskError::from(e).into()
    }
}

/// Decodes the Checkpoint request's options: absent, or runc's CheckpointOptions.
pub fn parse_options(any: Option<&Any>) -> Result<Options, CheckpointError> {
    use CheckpointError::Options as Bad;
    let Some(any) = any else {
        return Ok(Options::default());
    };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(Options::default());
    }
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    if name != RUNC_OPTIONS_TYPE {
        return Err(Bad(format!("unknown checkpoint options type {:?}: kata-rs takes {RUNC_OPTIONS_TYPE} or none", any.type_url)));
    }
    let o = CheckpointOptions::parse_from_bytes(&any.value).map_err(|e| Bad(format!("invalid {RUNC_OPTIONS_TYPE}: {e}")))?;
    if !o.cgroups_mode.is_empty() {
        return Err(Bad(format!("checkpoint option cgroups_mode={:?} is not supported by kata-rs (the guest manages cgroups)", o.cgroups_mode)));
    }
    Ok(Options {
        exit: o.exit,
        open_tcp: o.open_tcp,
        external_unix_sockets: o.external_unix_sockets,
        terminal: o.terminal,
        file_locks: o.file_locks,
        empty_namespaces: o.empty_namespaces.clone(),
        image_path: o.image_path.clone(),
        work_path: o.work_path.clone(),
    })
}

/// OCI annotation that sets the checkpoint/restore deadline of one container, in seconds (overrides
/// `runtime.checkpoint_deadline_s`; `ctr run --annotation`, or a pod annotation passed through).
pub const DEADLINE_ANNOTATION: &str = "io.kata-rs.checkpoint.deadline_s";
/// Longest deadline accepted from an annotation: one day.
const MAX_DEADLINE_S: u64 = 24 * 3600;

/// The deadline for this container: the annotation's value when set (validated), else `default_s`.
pub fn deadline_from_spec(spec: &serde_json::Value, default_s: u64) -> Result<u64, CheckpointError> {
    let Some(v) = spec.pointer("/annotations").and_then(|a| a.get(DEADLINE_ANNOTATION)) else {
        return Ok(default_s);
    };
    let s = v.as_str().unwrap_or_default();
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=MAX_DEADLINE_S).contains(&n) => Ok(n),
        _ => Err(CheckpointError::Deadline(format!("annotation {DEADLINE_ANNOTATION}={v}: must be a whole number of seconds from 1 to {MAX_DEADLINE_S}"))),
    }
}

/// OCI annotation: checkpoints of this container keep its established TCP connections (CRIU's
/// tcp-established), as runc's `open_tcp` option does. For clients that send no options to non-runc
/// runtimes (containerd 1.x's ctr, nerdctl): "true" or "false".
pub const OPEN_TCP_ANNOTATION: &str = "io.kata-rs.checkpoint.open_tcp";

pub fn open_tcp_from_spec(spec: &serde_json::Value) -> Result<bool, CheckpointError> {
    match spec.pointer("/annotations").and_then(|a| a.get(OPEN_TCP_ANNOTATION)) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            _ => Err(CheckpointError::Options(format!("annotation {OPEN_TCP_ANNOTATION}={v}: must be \"true\" or \"false\""))),
        },
    }
}

/// Time kept back from a request's own deadline so the shim can still clean up and answer.
pub const REQUEST_MARGIN_S: u64 = 2;

/// The deadline of one checkpoint/restore: the request's own deadline (the caller's context deadline,
/// which containerd passes on as the ttrpc timeout) less a margin when it has one, else the
/// container's (annotation or configuration). Returns seconds (at least 1) and where they came from.
pub fn effective_deadline(container_s: u64, request: Option<std::time::Duration>) -> (u64, &'static str) {
    match request {
        Some(d) => (d.as_secs().saturating_sub(REQUEST_MARGIN_S).max(1), "the request's deadline"),
        None => (container_s, "the container's configuration"),
    }
}

/// The directory containerd wants the images in must be an empty, writable directory.
pub fn check_target_dir(dir: &Path) -> Result<(), CheckpointError> {
    let bad = |m: String| CheckpointError::TargetDir(m);
    if !dir.is_absolute() {
        return Err(bad(format!("checkpoint directory {} is not an absolute path", dir.display())));
    }
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create checkpoint directory {}: {e}", dir.display())))?;
        }
        Err(e) => return Err(bad(format!("checkpoint directory {}: {e}", dir.display()))),
        Ok(m) if !m.is_dir() => return Err(bad(format!("checkpoint directory {} is not a directory", dir.display()))),
        Ok(_) => {}
    }
    if fs::read_dir(dir).map_err(|e| bad(format!("checkpoint directory {}: {e}", dir.display())))?.next().is_some() {
        return Err(bad(format!("checkpoint directory {} is not empty; nothing was written", dir.display())));
    }
    let probe = dir.join(".kata-rs-write-test");
    fs::write(&probe, b"").map_err(|e| bad(format!("checkpoint directory {} is not writable: {e}", dir.display())))?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// Where checkpoint images are staged in the sandbox's shared directory: `.checkpoints/<n>` for a dump
/// (CRIU in the guest writes there), `.restore-images` for a restore (the host writes there).
pub const CHECKPOINT_DIR: &str = ".checkpoints";
pub const RESTORE_DIR: &str = ".restore-images";

/// The restore staging directory of container `cid` (a pod's containers may restore at once).
pub fn restore_dir(cid: &str) -> String {
    format!("{RESTORE_DIR}-{cid}")
}

/// Bounds of a set of CRIU images moved through the shared directory: bytes as given, a flat
/// directory (one level of tolerance) of at most 20000 entries.
pub fn image_limits(max_bytes: u64) -> Limits {
    Limits { max_bytes, max_entries: 20_000, max_depth: 1 }
}

/// A staging directory made by the host in the guest-writable shared directory, pinned by descriptor.
pub struct Staging {
    parent: Dir,
    name: OsString,
    pub dir: Dir,
}

impl Staging {
    /// Creates `.checkpoints/<n>` below the pinned shared directory. A symlink or anything else the guest
    /// placed on the way is refused, never followed.
    pub fn for_checkpoint(shared: &Dir, n: u32) -> Result<Staging, SafeFsError> {
        let parent = shared.ensure_dir(OsStr::new(CHECKPOINT_DIR), 0o755)?;
        let name = OsString::from(n.to_string());
        // A leftover of this name (the host removes its own) was made by the guest: drop it first.
        parent.remove_tree(&name)?;
        let dir = parent.create_dir(&name, 0o777)?;
        Ok(Staging { parent, name, dir })
    }

    /// Creates `.restore-images-<cid>` below the pinned shared directory (refused if the guest made one).
    pub fn for_restore(shared: &Dir, cid: &str) -> Result<Staging, SafeFsError> {
        let name = OsString::from(restore_dir(cid));
        let dir = shared.create_dir(&name, 0o755)?;
        let parent = shared.try_clone()?;
        Ok(Staging { parent, name, dir })
    }

    /// Removes the staged images: first through the pinned descriptor (wherever the guest moved the
    /// directory), then the name in its parent (a symlink put there is removed itself, not followed).
    pub fn remove(&self) {
        if let Err(e) = self.dir.remove_contents() {
            warn!(dir = %self.dir.path().display(), error = %e, "emptying the staging directory");
        }
        if let Err(e) = self.parent.remove_tree(&self.name) {
            warn!(dir = %self.dir.path().display(), error = %e, "removing the staging directory");
        }
    }
}

/// Copies the images of `from` into the host directory `target` (containerd's), within `limits`;
/// on failure `target` is emptied again. Returns what was copied.
pub fn copy_images(from: &Dir, target: &Path, limits: Limits) -> Result<Copied, SafeFsError> {
    let to = Dir::open_host(target)?;
    let r = safefs::copy_tree(from, &to, limits);
    if r.is_err() {
        empty_host_dir(&to);
    }
    r
}

/// Empties a host directory (keeps the directory itself) through its descriptor, following no link.
pub fn empty_host_dir(d: &Dir) {
    if let Err(e) = d.remove_contents() {
        warn!(dir = %d.path().display(), error = %e, "emptying the directory");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_deadline_wins_with_a_margin() {
        use super::effective_deadline as e;
        use std::time::Duration as D;
        assert_eq!(e(600, None).0, 600);
        assert_eq!(e(1, Some(D::from_secs(300))).0, 298);
        assert_eq!(e(600, Some(D::from_millis(3900))).0, 1);
        assert_eq!(e(600, Some(D::from_millis(500))).0, 1, "never 0 (0 would mean no deadline in the guest)");
    }

    #[test]
    fn open_tcp_annotation() {
        let with = |v: &str| serde_json::json!({"annotations": {super::OPEN_TCP_ANNOTATION: v}});
        assert_eq!(super::open_tcp_from_spec(&serde_json::json!({})), Ok(false));
        assert_eq!(super::open_tcp_from_spec(&with("true")), Ok(true));
        assert_eq!(super::open_tcp_from_spec(&with("false")), Ok(false));
        assert!(super::open_tcp_from_spec(&with("yes")).unwrap_err().to_string().contains("open_tcp"));
    }

    #[test]
    fn deadline_annotation() {
        use super::deadline_from_spec as d;
        let with = |v: serde_json::Value| serde_json::json!({"annotations": {super::DEADLINE_ANNOTATION: v}});
        assert_eq!(d(&serde_json::json!({}), 600), Ok(600));
        assert_eq!(d(&serde_json::json!({"annotations": {"other": "1"}}), 600), Ok(600));
        assert_eq!(d(&with("1".into()), 600), Ok(1));
        assert_eq!(d(&with(" 90 ".into()), 600), Ok(90));
        for bad in [
            serde_json::json!("0"),
            serde_json::json!("-1"),
            serde_json::json!("1.5"),
            serde_json::json!("ten"),
            serde_json::json!(5),
            serde_json::json!("86401"),
        ] {
            let e = d(&with(bad.clone()), 600).unwrap_err().to_string();
            assert!(e.contains(super::DEADLINE_ANNOTATION) && e.contains("seconds"), "{bad}: {e}");
        }
    }

    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kata-rs-ckpt-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn options_absent_runc_and_unknown() {
        assert_eq!(parse_options(None).unwrap(), Options::default());
        let mut o = CheckpointOptions::new();
        o.exit = true;
        o.open_tcp = true;
        o.empty_namespaces = vec!["network".into()];
        o.image_path = "/x/img".into();
        let any = Any { type_url: RUNC_OPTIONS_TYPE.into(), value: o.write_to_bytes().unwrap(), ..Default::default() };
        let p = parse_options(Some(&any)).unwrap();
        assert!(p.exit && p.open_tcp && !p.file_locks);
        assert_eq!(p.empty_namespaces, ["network"]);
        assert_eq!(p.image_path, "/x/img");
        let any = Any { type_url: "types.example/other.Options".into(), value: vec![1], ..Default::default() };
        assert!(parse_options(Some(&any)).unwrap_err().to_string().contains("unknown checkpoint options type"));
        let any = Any { type_url: RUNC_OPTIONS_TYPE.into(), value: vec![0xff, 0xff], ..Default::default() };
        assert!(parse_options(Some(&any)).unwrap_err().to_string().contains("invalid"));
    }

    #[test]
    fn target_dir_must_be_empty() {
        let d = tmp("target");
        check_target_dir(&d).unwrap();
        assert!(fs::read_dir(&d).unwrap().next().is_none(), "the write probe is removed");
        fs::write(d.join("x"), b"1").unwrap();
        assert!(check_target_dir(&d).unwrap_err().to_string().contains("not empty"));
        assert!(check_target_dir(Path::new("rel")).unwrap_err().to_string().contains("absolute"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn staging_refuses_what_the_guest_placed() {
        let shared = tmp("shared");
        let canary = tmp("canary");
        fs::write(canary.join("secret"), b"secret").unwrap();
        let d = Dir::open_host(&shared).unwrap();
        // .checkpoints swapped for a symlink to a host directory: refused, nothing made there.
        std::os::unix::fs::symlink(&canary, shared.join(CHECKPOINT_DIR)).unwrap();
        assert!(Staging::for_checkpoint(&d, 1).err().unwrap().to_string().contains("symlink"));
        fs::remove_file(shared.join(CHECKPOINT_DIR)).unwrap();
        // A leftover <n> (a symlink to the canary) is removed as a link, then made anew.
        fs::create_dir(shared.join(CHECKPOINT_DIR)).unwrap();
        std::os::unix::fs::symlink(&canary, shared.join(CHECKPOINT_DIR).join("2")).unwrap();
        let s = Staging::for_checkpoint(&d, 2).unwrap();
        fs::write(shared.join(".checkpoints/2/pages-1.img"), b"img").unwrap();
        // The staging directory moved away and a symlink put in its place: removal empties the pinned
        // directory and removes the symlink, never the canary.
        fs::rename(shared.join(".checkpoints/2"), shared.join("moved")).unwrap();
        std::os::unix::fs::symlink(&canary, shared.join(".checkpoints/2")).unwrap();
        s.remove();
        assert!(!shared.join(".checkpoints/2").exists() && fs::symlink_metadata(shared.join(".checkpoints/2")).is_err());
        assert!(fs::read_dir(shared.join("moved")).unwrap().next().is_none());
        assert_eq!(fs::read(canary.join("secret")).unwrap(), b"secret");
        // .restore-images made by the guest is refused.
        std::os::unix::fs::symlink(&canary, shared.join(restore_dir("c1"))).unwrap();
        assert!(Staging::for_restore(&d, "c1").err().unwrap().to_string().contains("already exists"));
        let _ = fs::remove_dir_all(&shared);
        let _ = fs::remove_dir_all(&canary);
    }

    #[test]
    fn copy_images_empties_the_target_on_failure() {
        let s = tmp("img-src");
        let t = tmp("img-dst");
        fs::write(s.join("a.img"), vec![1u8; 100]).unwrap();
        fs::write(s.join("b.img"), vec![1u8; 100]).unwrap();
        let src = Dir::open_host(&s).unwrap();
        assert_eq!(copy_images(&src, &t, image_limits(1000)).unwrap().bytes, 200);
        empty_host_dir(&Dir::open_host(&t).unwrap());
        assert!(copy_images(&src, &t, image_limits(150)).unwrap_err().to_string().contains("150"));
        assert!(fs::read_dir(&t).unwrap().next().is_none(), "a failed copy leaves nothing");
        let _ = fs::remove_dir_all(&s);
        let _ = fs::remove_dir_all(&t);
    }
}
