//! Host mounts of one container: containerd's rootfs mounts on `<bundle>/rootfs`, a bind mount of
//! that rootfs into the sandbox's shared directory, and one bind mount per volume (the spec's host
//! bind mounts) at `<shared>/<id>/volumes/<n>`, read-only where the spec says so. All are made before
//! virtiofsd starts (so it sees them) and before the guest runs (so nothing on these paths is the
//! guest's).
use std::{
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::warn;

use crate::spec::Volume;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {what} on {target}: {message}")]
    Mount { what: String, target: String, message: String },
    #[error("volume {destination}: its source {source_path} {reason}")]
    VolumeSource { destination: String, source_path: String, reason: String },
    #[error("creating {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct ContainerMounts {
    /// `<bundle>/rootfs` when this shim mounted it.
    bundle_rootfs: Option<PathBuf>,
    /// The bind mount in the shared directory.
    shared_rootfs: PathBuf,
}

/// The shared-directory path of container `id`'s rootfs.
pub fn shared_rootfs(shared_dir: &Path, id: &str) -> PathBuf {
    shared_dir.join(id).join("rootfs")
}

impl ContainerMounts {
    pub fn setup(bundle: &Path, rootfs: &[Mount], volumes: &[Volume], shared_dir: &Path, id: &str) -> Result<ContainerMounts, MountError> {
        let target = bundle.join("rootfs");
        std::fs::create_dir_all(&target).map_err(|source| MountError::Dir { path: target.display().to_string(), source })?;
        let mut me = ContainerMounts { bundle_rootfs: None, shared_rootfs: shared_rootfs(shared_dir, id) };
        for m in rootfs {
            containerd_shim::mount::mount_rootfs(
                (!m.type_.is_empty()).then_some(m.type_.as_str()),
                (!m.source.is_empty()).then_some(m.source.as_str()),
                &m.options,
                &target,
            )
            .map_err(|e| MountError::Mount { what: format!("{} {}", m.type_, m.source), target: target.display().to_string(), message: e.to_string() })?;
            me.bundle_rootfs = Some(target.clone());
        }
        std::fs::create_dir_all(&me.shared_rootfs).map_err(|source| MountError::Dir { path: me.shared_rootfs.display().to_string(), source })?;
        if let Err(e) = mount(Some(&target), &me.shared_rootfs, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>) {
            me.teardown();
            return Err(MountError::Mount { what: format!("bind {}", target.display()), target: me.shared_rootfs.display().to_string(), message: e.to_string() });
        }
        if let Err(e) = bind_volumes(volumes, &shared_dir.join(id).join("volumes")) {
            me.teardown();
            return Err(e);
        }
        Ok(me)
    }

    /// Unmounts the bundle's rootfs (lazily, so a busy mount never blocks cleanup). Idempotent.
    ///
    /// The bind mount in the shared directory is not unmounted by path: the guest can rename or swap
    /// the directories above it, and `umount` would follow them. It goes away with the shared
    /// directory's tmpfs ([`crate::sandbox::remove_sandbox_dir`]), which is unmounted with everything below it.
    pub fn teardown(&self) {
        if let Some(b) = &self.bundle_rootfs {
            unmount_if_mounted(b);
        }
    }
}

/// Binds each volume's host source on `dir/<n>` (a directory or an empty file, like the source).
/// Read-only volumes are remounted read-only on the host as well, so virtiofsd cannot write them
/// whatever the guest asks. Nothing is unmounted here on failure: the caller drops the whole
/// shared tmpfs, which takes these mounts with it.
fn bind_volumes(volumes: &[Volume], dir: &Path) -> Result<(), MountError> {
    if volumes.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|source| MountError::Dir { path: dir.display().to_string(), source })?;
    for v in volumes {
        let bad = |reason: String| MountError::VolumeSource { destination: v.destination.clone(), source_path: v.source.clone(), reason };
        // The source is the host's (from containerd's spec); following its symlinks is what runc does too.
        let meta = std::fs::metadata(&v.source).map_err(|e| bad(format!("cannot be used: {e}")))?;
        let target = dir.join(&v.shared_name);
        let made = if meta.is_dir() {
            std::fs::create_dir(&target)
        } else if meta.is_file() {
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&target).map(drop)
        } else {
            return Err(bad("is neither a directory nor a regular file: sockets and devices cannot be shared with a VM".into()));
        };
        made.map_err(|source| MountError::Dir { path: target.display().to_string(), source })?;
        let mut flags = MsFlags::MS_BIND;
        if v.recursive {
            flags |= MsFlags::MS_REC;
        }
        let what = || format!("bind {}", v.source);
        mount(Some(v.source.as_str()), &target, None::<&str>, flags, None::<&str>)
            .map_err(|e| MountError::Mount { what: what(), target: target.display().to_string(), message: e.to_string() })?;
        if v.readonly {
            let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            mount(None::<&str>, &target, None::<&str>, ro, None::<&str>)
                .map_err(|e| MountError::Mount { what: format!("{} read-only", what()), target: target.display().to_string(), message: e.to_string() })?;
        }
    }
    Ok(())
}

/// Unmounts `p` (all stacked mounts) if something is mounted there.
pub fn unmount_if_mounted(p: &Path) {
    for _ in 0..8 {
        match umount2(p, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(e) => {
                warn!(path = %p.display(), error = %e, "unmount failed");
                return;
            }
        }
    }
}
