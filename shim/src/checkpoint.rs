//! Checkpoint logic that needs no VM: option mapping, the target directory's checks, and copying
//! images out of the guest-writable staging directory without trusting it.
use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use containerd_shim::protos::{protobuf::{well_known_types::any::Any, Message}, shim::oci::CheckpointOptions};

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

/// Decodes the Checkpoint request's options: absent, or runc's CheckpointOptions.
pub fn parse_options(any: Option<&Any>) -> Result<Options, String> {
    let Some(any) = any else { return Ok(Options::default()) };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(Options::default());
    }
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    if name != RUNC_OPTIONS_TYPE {
        return Err(format!("unknown checkpoint options type {:?}: kata-rs takes {RUNC_OPTIONS_TYPE} or none", any.type_url));
    }
    let o = CheckpointOptions::parse_from_bytes(&any.value).map_err(|e| format!("invalid {RUNC_OPTIONS_TYPE}: {e}"))?;
    if !o.cgroups_mode.is_empty() {
        return Err(format!("checkpoint option cgroups_mode={:?} is not supported by kata-rs (the guest manages cgroups)", o.cgroups_mode));
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
pub fn deadline_from_spec(spec: &serde_json::Value, default_s: u64) -> Result<u64, String> {
    let Some(v) = spec.pointer("/annotations").and_then(|a| a.get(DEADLINE_ANNOTATION)) else { return Ok(default_s) };
    let s = v.as_str().unwrap_or_default();
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=MAX_DEADLINE_S).contains(&n) => Ok(n),
        _ => Err(format!("annotation {DEADLINE_ANNOTATION}={v}: must be a whole number of seconds from 1 to {MAX_DEADLINE_S}")),
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
pub fn check_target_dir(dir: &Path) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err(format!("checkpoint directory {} is not an absolute path", dir.display()));
    }
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create checkpoint directory {}: {e}", dir.display()))?;
        }
        Err(e) => return Err(format!("checkpoint directory {}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => return Err(format!("checkpoint directory {} is not a directory", dir.display())),
        Ok(_) => {}
    }
    if fs::read_dir(dir).map_err(|e| format!("checkpoint directory {}: {e}", dir.display()))?.next().is_some() {
        return Err(format!("checkpoint directory {} is not empty; nothing was written", dir.display()));
    }
    let probe = dir.join(".kata-rs-write-test");
    fs::write(&probe, b"").map_err(|e| format!("checkpoint directory {} is not writable: {e}", dir.display()))?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// Copies `src` (written by the untrusted guest) into `dst`: only regular files and directories, no
/// symlink followed or copied, nothing outside `dst`, at most `max_bytes` in all. Returns bytes copied.
pub fn copy_untrusted(src: &Path, dst: &Path, max_bytes: u64) -> Result<u64, String> {
    let mut total = 0u64;
    copy_dir(src, dst, max_bytes, &mut total, 0)?;
    Ok(total)
}

fn copy_dir(src: &Path, dst: &Path, max: u64, total: &mut u64, depth: u32) -> Result<(), String> {
    if depth > 16 {
        return Err(format!("{} is nested too deeply", src.display()));
    }
    let entries = fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
    for e in entries {
        let e = e.map_err(|e| format!("{}: {e}", src.display()))?;
        let name = e.file_name();
        let from = src.join(&name);
        let to = dst.join(&name);
        let m = fs::symlink_metadata(&from).map_err(|e| format!("{}: {e}", from.display()))?;
        if m.file_type().is_symlink() {
            return Err(format!("refusing symlink {} made by the guest", from.display()));
        } else if m.is_dir() {
            fs::create_dir(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            copy_dir(&from, &to, max, total, depth + 1)?;
        } else if m.is_file() {
            let mut r = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&from)
                .map_err(|e| format!("{}: {e}", from.display()))?;
            let mut w = fs::OpenOptions::new().write(true).create_new(true).open(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf).map_err(|e| format!("{}: {e}", from.display()))?;
                if n == 0 {
                    break;
                }
                *total += n as u64;
                if *total > max {
                    return Err(format!("checkpoint images exceed the limit of {max} bytes"));
                }
                w.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", to.display()))?;
            }
        } else {
            return Err(format!("refusing special file {} made by the guest", from.display()));
        }
    }
    Ok(())
}

/// Empties a directory (keeps the directory itself), never following symlinks.
pub fn empty_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    let _ = crate::sandbox::remove_dir_all_no_follow(&p);
                }
                _ => {
                    let _ = fs::remove_file(&p);
                }
            }
        }
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
    fn deadline_annotation() {
        use super::deadline_from_spec as d;
        let with = |v: serde_json::Value| serde_json::json!({"annotations": {super::DEADLINE_ANNOTATION: v}});
        assert_eq!(d(&serde_json::json!({}), 600), Ok(600));
        assert_eq!(d(&serde_json::json!({"annotations": {"other": "1"}}), 600), Ok(600));
        assert_eq!(d(&with("1".into()), 600), Ok(1));
        assert_eq!(d(&with(" 90 ".into()), 600), Ok(90));
        for bad in [serde_json::json!("0"), serde_json::json!("-1"), serde_json::json!("1.5"), serde_json::json!("ten"), serde_json::json!(5), serde_json::json!("86401")] {
            let e = d(&with(bad.clone()), 600).unwrap_err();
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
        assert!(parse_options(Some(&any)).unwrap_err().contains("unknown checkpoint options type"));
        let any = Any { type_url: RUNC_OPTIONS_TYPE.into(), value: vec![0xff, 0xff], ..Default::default() };
        assert!(parse_options(Some(&any)).unwrap_err().contains("invalid"));
    }

    #[test]
    fn target_dir_must_be_empty() {
        let d = tmp("target");
        check_target_dir(&d).unwrap();
        assert!(fs::read_dir(&d).unwrap().next().is_none(), "the write probe is removed");
        fs::write(d.join("x"), b"1").unwrap();
        assert!(check_target_dir(&d).unwrap_err().contains("not empty"));
        assert!(check_target_dir(Path::new("rel")).unwrap_err().contains("absolute"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn copy_refuses_symlinks_and_bounds_size() {
        let s = tmp("src");
        let d = tmp("dst");
        fs::create_dir(s.join("sub")).unwrap();
        fs::write(s.join("pages-1.img"), vec![7u8; 4096]).unwrap();
        fs::write(s.join("sub/inventory.img"), b"inv").unwrap();
        assert_eq!(copy_untrusted(&s, &d, 1 << 20).unwrap(), 4099);
        assert_eq!(fs::read(d.join("sub/inventory.img")).unwrap(), b"inv");
        empty_dir(&d);
        assert!(copy_untrusted(&s, &d, 100).unwrap_err().contains("exceed"));
        empty_dir(&d);
        std::os::unix::fs::symlink("/etc/shadow", s.join("evil")).unwrap();
        assert!(copy_untrusted(&s, &d, 1 << 20).unwrap_err().contains("symlink"));
        empty_dir(&d);
        assert!(fs::read_dir(&d).unwrap().next().is_none());
        let _ = fs::remove_dir_all(&s);
        let _ = fs::remove_dir_all(&d);
    }
}
