//! Host mounts of one container: containerd's rootfs mounts on `<bundle>/rootfs`, a bind mount of
//! that rootfs into the sandbox's shared directory, and one bind mount per volume (the spec's host
//! bind mounts) at `<shared>/<id>/volumes/<n>`, read-only where the spec says so. The shared
//! directory is a shared mount, so that virtiofsd (a slave copy in its own namespace) sees mounts made
//! after it started: a pod's later containers. Those are made in a directory the guest writes, so
//! every one is made through pinned descriptors on directories the host just created.
use std::{
    ffi::OsStr,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::warn;

use crate::{
    safefs::{Dir, SafeFsError},
    spec::Volume,
};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {what} on {target}: {message}")]
    Mount { what: String, target: String, message: String },
    #[error("volume {destination}: its source {source_path} {reason}")]
    VolumeSource { destination: String, source_path: String, reason: String },
    #[error("the shared directory: {0}")]
    Shared(String),
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
    /// The container's id: its directory in the shared directory.
    id: String,
    /// `O_PATH` descriptors of the roots of the mounts made in the shared directory (rootfs, volumes):
    /// a container that leaves a running VM (one of a pod's) has them unmounted through these, never by
    /// a path the guest could have changed.
    shared_mounts: Vec<OwnedFd>,
}

fn safe_err(e: SafeFsError) -> MountError {
    MountError::Shared(e.to_string())
}

/// Bind-mounts `source` on the directory `on` (through its descriptor: whatever the guest renamed
/// meanwhile, the mount lands on that directory), then pins the new mount's root by its name in `parent`.
fn bind_pinned(source: &Path, parent: &Dir, name: &str, on: &Path, flags: MsFlags) -> Result<OwnedFd, MountError> {
    let target = parent.path().join(name);
    mount(Some(source), on, None::<&str>, MsFlags::MS_BIND | flags, None::<&str>).map_err(|e| MountError::Mount {
        what: format!("bind {}", source.display()),
        target: target.display().to_string(),
        message: e.to_string(),
    })?;
    match parent.open_mount_root(OsStr::new(name)) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            // Not where it was made: the guest moved it. Undo through the descriptor it was made on.
            let _ = umount2(on, MntFlags::MNT_DETACH);
            Err(safe_err(e))
        }
    }
}

impl ContainerMounts {
    /// Mounts containerd's rootfs on `<bundle>/rootfs` and binds it (and the volumes) below the pinned
    /// shared directory at `<id>/`. `<id>` must not exist: in a running VM (a pod's next container) the
    /// guest could have placed anything there, and nothing it made is mounted on or followed.
    pub fn setup(bundle: &Path, rootfs: &[Mount], volumes: &[Volume], shared: &Dir, id: &str) -> Result<ContainerMounts, MountError> {
        let target = bundle.join("rootfs");
        std::fs::create_dir_all(&target).map_err(|source| MountError::Dir { path: target.display().to_string(), source })?;
        let mut me = ContainerMounts { bundle_rootfs: None, id: id.to_string(), shared_mounts: vec![] };
        for m in rootfs {
            containerd_shim::mount::mount_rootfs(
                (!m.type_.is_empty()).then_some(m.type_.as_str()),
                (!m.source.is_empty()).then_some(m.source.as_str()),
                &m.options,
                &target,
            )
            .map_err(|e| MountError::Mount {
                what: format!("{} {}", m.type_, m.source),
                target: target.display().to_string(),
                message: e.to_string(),
            })?;
            me.bundle_rootfs = Some(target.clone());
        }
        if let Err(e) = me.bind_shared(&target, volumes, shared) {
            me.teardown_in_running_vm(shared);
            return Err(e);
        }
        Ok(me)
    }

    fn bind_shared(&mut self, rootfs: &Path, volumes: &[Volume], shared: &Dir) -> Result<(), MountError> {
        let cdir = shared.create_dir(OsStr::new(&self.id), 0o755).map_err(safe_err)?;
        let rdir = cdir.create_dir(OsStr::new("rootfs"), 0o755).map_err(safe_err)?;
        self.shared_mounts.push(bind_pinned(rootfs, &cdir, "rootfs", &rdir.fd_path(), MsFlags::MS_REC)?);
        if volumes.is_empty() {
            return Ok(());
        }
        let vdir = cdir.create_dir(OsStr::new("volumes"), 0o755).map_err(safe_err)?;
        for v in volumes {
            let fd = bind_volume(v, &vdir)?;
            self.shared_mounts.push(fd);
        }
        Ok(())
    }

    /// Unmounts the bundle's rootfs (lazily, so a busy mount never blocks cleanup). Idempotent.
    ///
    /// The mounts in the shared directory stay: they go with the shared directory's tmpfs
    /// ([`crate::sandbox::remove_sandbox_dir`]), unmounted with everything below it when the VM stops.
    pub fn teardown(&self) {
        if let Some(b) = &self.bundle_rootfs {
            unmount_if_mounted(b);
        }
    }

    /// The teardown of a container whose VM runs on (one of a pod's): its mounts in the shared
    /// directory are unmounted through their pinned roots, then `<id>/` is removed through the pinned
    /// shared directory (no symlink followed, no mount crossed), then the bundle's rootfs is unmounted.
    pub fn teardown_in_running_vm(&mut self, shared: &Dir) {
        for fd in self.shared_mounts.drain(..).rev() {
            let p = format!("/proc/self/fd/{}", fd.as_raw_fd());
            if let Err(e) = umount2(p.as_str(), MntFlags::MNT_DETACH) {
                warn!(id = %self.id, error = %e, "unmounting a mount in the shared directory");
            }
        }
        if let Err(e) = shared.remove_tree(OsStr::new(&self.id)) {
            warn!(id = %self.id, error = %e, "removing the container's shared directory");
        }
        self.teardown();
    }
}

/// Binds a volume's host source on `<vdir>/<n>` (a directory or an empty file, like the source).
/// Read-only volumes are remounted read-only on the host as well, so virtiofsd cannot write them
/// whatever the guest asks. On failure the caller unmounts what was made.
fn bind_volume(v: &Volume, vdir: &Dir) -> Result<OwnedFd, MountError> {
    let bad = |reason: String| MountError::VolumeSource { destination: v.destination.clone(), source_path: v.source.clone(), reason };
    // The source is the host's (from containerd's spec); following its symlinks is what runc does too.
    let meta = std::fs::metadata(&v.source).map_err(|e| bad(format!("cannot be used: {e}")))?;
    let name = OsStr::new(&v.shared_name);
    // The directory or empty file made for it stays open (pinned) until the mount is made on it.
    let (mut keep_dir, mut keep_file) = (None, None);
    let on = if meta.is_dir() {
        let d = vdir.create_dir(name, 0o755).map_err(safe_err)?;
        keep_dir.insert(d).fd_path()
    } else if meta.is_file() {
        let f = vdir.create_file(name, 0o600).map_err(safe_err)?;
        PathBuf::from(format!("/proc/self/fd/{}", keep_file.insert(f).as_raw_fd()))
    } else {
        return Err(bad("is neither a directory nor a regular file: sockets and devices cannot be shared with a VM".into()));
    };
    let flags = if v.recursive { MsFlags::MS_REC } else { MsFlags::empty() };
    let root = bind_pinned(Path::new(&v.source), vdir, &v.shared_name, &on, flags)?;
    drop((keep_dir, keep_file));
    if v.readonly {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let p = format!("/proc/self/fd/{}", root.as_raw_fd());
        if let Err(e) = mount(None::<&str>, p.as_str(), None::<&str>, ro, None::<&str>) {
            let _ = umount2(p.as_str(), MntFlags::MNT_DETACH);
            return Err(MountError::Mount {
                what: format!("bind {} read-only", v.source),
                target: vdir.path().join(name).display().to_string(),
                message: e.to_string(),
            });
        }
    }
    Ok(root)
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
