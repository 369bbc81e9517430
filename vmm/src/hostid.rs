//! A host identity of its own for each VM: vhost-device-vsock runs (from its start) as a uid and gid
//! that no other VM and no host user has, so a guest that takes it over holds no capability, owns no
//! host file, and cannot signal or trace another VM's processes. (QEMU is still root: docs/security.md.)
//!
//! Ids come from a configured range (`hypervisor.host_id_base`, `host_id_count`). A claim is a file
//! `<runtime root>/.host-ids/<uid>` naming the VM directory, made under a lock on that directory; the
//! claim goes with the VM ([`Claim`]'s drop, or [`release`] by a later cleanup), and a claim whose VM
//! directory is gone is stale and taken again.
use std::{
    io::{Read, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Beside the sandbox directories: a name no container id can take (containerd ids start with a
/// letter or digit).
pub const CLAIMS_DIR: &str = ".host-ids";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostId {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    #[error("host ids of VMs in {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no free host id for a VM: all {count} of {base}..{end} are claimed in {dir} (raise hypervisor.host_id_count)")]
    Exhausted { base: u32, end: u64, count: u32, dir: String },
}

/// A claimed id; dropping it gives the id back.
#[derive(Debug)]
pub struct Claim {
    pub id: HostId,
    file: PathBuf,
    owner: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        release_file(&self.file, &self.owner);
    }
}

fn claims_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.parent().unwrap_or(Path::new("/")).join(CLAIMS_DIR)
}

/// What a claim file says: the VM directory that holds it (bounded read: the file is ours, but a
/// claim is never trusted to be small).
fn owner_of(file: &Path) -> Option<String> {
    let mut s = String::new();
    std::fs::File::open(file).ok()?.take(4096).read_to_string(&mut s).ok()?;
    Some(s)
}

fn release_file(file: &Path, owner: &str) {
    if owner_of(file).as_deref() == Some(owner) {
        let _ = std::fs::remove_file(file);
    }
}

/// Gives back the id `id` of the VM in `vm_dir` if that VM still holds it (cleanup after a dead owner).
pub fn release(vm_dir: &Path, id: HostId) {
    release_file(&claims_dir(vm_dir).join(id.uid.to_string()), &vm_dir.display().to_string());
}

/// FNV-1a of the VM directory: where the search for a free id starts, so that VMs spread over the
/// range instead of all probing from its start.
fn start_slot(vm_dir: &str, count: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm_dir.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h % count as u64) as u32
}

/// Claims a free id in `base..base + count` for the VM whose directory is `vm_dir` (its parent is the
/// runtime root). A claim this directory already holds is kept.
pub fn claim(vm_dir: &Path, base: u32, count: u32) -> Result<Claim, HostIdError> {
    let dir = claims_dir(vm_dir);
    let io = |source| HostIdError::Io { dir: dir.display().to_string(), source };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let lock = std::fs::File::open(&dir).map_err(io)?;
    // SAFETY: flock on a descriptor we own; the lock goes with the descriptor at the end of this call.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let owner = vm_dir.display().to_string();
    let start = start_slot(&owner, count);
    for i in 0..count {
        let uid = base + (start + i) % count;
        let file = dir.join(uid.to_string());
        let free = match owner_of(&file) {
            None => !file.exists(),
            // Ours already (a VM started again in the same directory), or stale: its VM directory is gone.
            Some(o) => o == owner || !Path::new(&o).is_dir(),
        };
        if !free {
            continue;
        }
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&file).map_err(io)?;
        f.write_all(owner.as_bytes()).map_err(io)?;
        return Ok(Claim { id: HostId { uid, gid: uid }, file, owner });
    }
    Err(HostIdError::Exhausted { base, end: base as u64 + count as u64, count, dir: dir.display().to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_get_distinct_ids_stale_claims_are_taken_again_and_dropping_gives_the_id_back() {
        let root = std::env::temp_dir().join(format!("kata-rs-hostid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, b, c) = (root.join("a"), root.join("b"), root.join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir_all(d).unwrap();
        }
        // A range of two: two VMs take both, a third finds none.
        let ca = claim(&a, 1_000_000, 2).unwrap();
        let cb = claim(&b, 1_000_000, 2).unwrap();
        assert_ne!(ca.id, cb.id);
        assert!((1_000_000..1_000_002).contains(&ca.id.uid) && ca.id.gid == ca.id.uid);
        let e = claim(&c, 1_000_000, 2).unwrap_err();
        assert!(e.to_string().contains("host_id_count"), "{e}");
        // The same directory keeps its id.
        let again = claim(&a, 1_000_000, 2).unwrap();
        assert_eq!(again.id, ca.id);
        std::mem::forget(again);
        // b's directory is removed (its VM is gone without a release): its id is taken again.
        let b_uid = cb.id.uid;
        std::mem::forget(cb);
        std::fs::remove_dir_all(&b).unwrap();
        let cc = claim(&c, 1_000_000, 2).unwrap();
        assert_eq!(cc.id.uid, b_uid);
        // Dropping gives the id back; a release by another directory does not take it.
        release(&a, cc.id);
        assert!(root.join(CLAIMS_DIR).join(b_uid.to_string()).exists(), "c's claim stays when a releases it");
        drop(cc);
        assert!(!root.join(CLAIMS_DIR).join(b_uid.to_string()).exists());
        release(&a, ca.id);
        assert!(!root.join(CLAIMS_DIR).join(ca.id.uid.to_string()).exists());
        std::mem::forget(ca);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
