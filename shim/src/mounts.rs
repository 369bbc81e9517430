//! Host mounts of one container: containerd's rootfs mounts on `<bundle>/rootfs`, a copy of that
//! rootfs in the sandbox's shared directory, and one copy per volume (the spec's host bind mounts) at
//! `<shared>/<id>/volumes/<n>`. Each copy is a detached mount tree (`open_tree(OPEN_TREE_CLONE)`) whose
//! flags are set before it is attached (`mount_setattr`, then `move_mount`): nosuid and nodev, read-only
//! on the top mount (`ro`) or throughout (`rro`), private or a slave of its source. The shared directory
//! is a shared mount, so virtiofsd (a slave copy in its own mount namespace) receives mounts made after
//! it started, a pod's later containers, and every copy it receives is born with those flags: a remount
//! would change only the host namespace's copy. Mounts in a running VM's shared directory (a directory
//! the guest writes) are made through pinned descriptors on directories the host just created.
use std::{
    ffi::OsStr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{umount2, MntFlags};
use tracing::warn;

use crate::{
    safefs::{Dir, SafeFsError},
    spec::{Propagation, ReadOnly, Volume},
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

/// How the host copy of a tree is made: every copy of it, in every mount namespace (virtiofsd's
/// included), is born with these flags, because they are set on the detached tree before it is attached.
#[derive(Debug, Clone, Copy)]
struct TreeAttrs {
    /// Submounts come along (`rbind`).
    recursive: bool,
    readonly: ReadOnly,
    propagation: Propagation,
}

// Not all of these are in libc for every target; the values are the kernel's (include/uapi/linux/mount.h).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const AT_RECURSIVE: libc::c_uint = 0x8000;

fn errno_of(r: libc::c_long) -> Result<libc::c_long, nix::errno::Errno> {
    if r < 0 {
        Err(nix::errno::Errno::last())
    } else {
        Ok(r)
    }
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH [| AT_RECURSIVE], {set, propagation})`.
fn mount_setattr(fd: BorrowedFd<'_>, recursive: bool, set: u64, propagation: u64) -> Result<(), nix::errno::Errno> {
    let attr = libc::mount_attr { attr_set: set, attr_clr: 0, propagation, userns_fd: 0 };
    let flags = libc::AT_EMPTY_PATH as libc::c_uint | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: a valid descriptor, an empty NUL-terminated path, and a mount_attr of the size passed.
    errno_of(unsafe {
        libc::syscall(libc::SYS_mount_setattr, fd.as_raw_fd(), c"".as_ptr(), flags, &attr as *const libc::mount_attr, std::mem::size_of::<libc::mount_attr>())
    })
    .map(|_| ())
}

/// A detached copy of the host tree at `source` (`open_tree(OPEN_TREE_CLONE)`), its flags and
/// propagation set while nothing else can see it: nosuid and nodev throughout, read-only on the top
/// mount (`ro`) or throughout (`rro`), private (the host source's later mounts are not seen) or a slave of
/// the source (they are seen, nothing goes back).
fn detached_tree(source: &Path, attrs: TreeAttrs) -> Result<OwnedFd, nix::errno::Errno> {
    let path = std::ffi::CString::new(source.as_os_str().as_encoded_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | if attrs.recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: a NUL-terminated path; the kernel returns a new descriptor that nothing else owns.
    let fd = errno_of(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })?;
    // SAFETY: see above.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let propagation = match attrs.propagation {
        Propagation::Private => libc::MS_PRIVATE,
        Propagation::Slave => libc::MS_SLAVE,
    };
    let mut all = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if attrs.readonly == ReadOnly::Recursive {
        all |= libc::MOUNT_ATTR_RDONLY;
    }
    mount_setattr(tree.as_fd(), true, all, propagation)?;
    if attrs.readonly == ReadOnly::Top {
        mount_setattr(tree.as_fd(), false, libc::MOUNT_ATTR_RDONLY, 0)?;
    }
    Ok(tree)
}

/// Copies the host tree at `source` onto `on` (a directory or file the host just made, by its
/// descriptor: whatever the guest renamed meanwhile, the mount lands on that one) as a detached tree
/// with its final flags ([`detached_tree`]), then attaches it. Returns the mount's root, pinned.
fn mount_tree(source: &Path, on: BorrowedFd<'_>, target: &Path, attrs: TreeAttrs) -> Result<OwnedFd, MountError> {
    let fail = |step: &str, e: nix::errno::Errno| MountError::Mount {
        what: format!("{step} {} ({attrs:?})", source.display()),
        target: target.display().to_string(),
        message: e.to_string(),
    };
    let tree = detached_tree(source, attrs).map_err(|e| fail("copying", e))?;
    let flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: two valid descriptors and empty NUL-terminated paths.
    errno_of(unsafe { libc::syscall(libc::SYS_move_mount, tree.as_raw_fd(), c"".as_ptr(), on.as_raw_fd(), c"".as_ptr(), flags) })
        .map_err(|e| fail("attaching", e))?;
    Ok(tree)
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
        let attrs = TreeAttrs { recursive: true, readonly: ReadOnly::No, propagation: Propagation::Private };
        self.shared_mounts.push(mount_tree(rootfs, rdir.as_fd(), &cdir.path().join("rootfs"), attrs)?);
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

    /// Moves the mounts out (for their teardown without the shim's lock); this one is left empty.
    pub fn take(&mut self) -> ContainerMounts {
        ContainerMounts { bundle_rootfs: self.bundle_rootfs.take(), id: self.id.clone(), shared_mounts: std::mem::take(&mut self.shared_mounts) }
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

/// Mounts a volume's host source on `<vdir>/<n>` (a directory or an empty file, like the source) as a
/// detached tree born with its final flags ([`mount_tree`]): virtiofsd's copy, made by propagation,
/// has them too, so the guest cannot write a read-only volume whatever it asks. On failure the caller
/// unmounts what was made.
fn bind_volume(v: &Volume, vdir: &Dir) -> Result<OwnedFd, MountError> {
    let bad = |reason: String| MountError::VolumeSource { destination: v.destination.clone(), source_path: v.source.clone(), reason };
    // The source is the host's (from containerd's spec); following its symlinks is what runc does too.
    let meta = std::fs::metadata(&v.source).map_err(|e| bad(format!("cannot be used: {e}")))?;
    let name = OsStr::new(&v.shared_name);
    let target = vdir.path().join(name);
    let attrs = TreeAttrs { recursive: v.recursive, readonly: v.readonly, propagation: v.propagation };
    // The directory or empty file made for it stays open (pinned) until the mount is made on it.
    if meta.is_dir() {
        let d = vdir.create_dir(name, 0o755).map_err(safe_err)?;
        mount_tree(Path::new(&v.source), d.as_fd(), &target, attrs)
    } else if meta.is_file() {
        let f = vdir.create_file(name, 0o600).map_err(safe_err)?;
        mount_tree(Path::new(&v.source), f.as_fd(), &target, attrs)
    } else {
        Err(bad("is neither a directory nor a regular file: sockets and devices cannot be shared with a VM".into()))
    }
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
