//! Host mounts of one container: containerd's rootfs mounts on `<bundle>/rootfs`, and a bind mount of
//! that rootfs into the sandbox's shared directory (made before virtiofsd starts, so it sees it).
use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {what} on {target}: {message}")]
    Mount { what: String, target: String, message: String },
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
    pub fn setup(bundle: &Path, rootfs: &[Mount], shared_dir: &Path, id: &str) -> Result<ContainerMounts, MountError> {
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
