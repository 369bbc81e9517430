//! A guest CID for kernel vhost-vsock, reserved before QEMU starts: the host opens `/dev/vhost-vsock`,
//! claims a CID on it (`VHOST_VSOCK_SET_GUEST_CID`, which fails with EADDRINUSE when another VM holds
//! it) and hands the descriptor to QEMU (`vhostfd=`). A collision costs one more ioctl, never a failed
//! QEMU start, and no other VM can take the CID between the choice and QEMU's start.
use std::os::fd::{AsRawFd, OwnedFd};

/// `_IOW(VHOST_VIRTIO, 0x60, __u64)`, from linux/vhost.h.
const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_af60;
/// CIDs 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
const FIRST_CID: u32 = 3;
const LAST_CID: u32 = 0x7fff_ffff;
/// Tries before giving up: a host with this many VMs holding random CIDs is not a host we run on.
const TRIES: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum CidError {
    #[error("cannot open /dev/vhost-vsock: {0}")]
    Open(#[source] std::io::Error),
    #[error("no free vsock guest CID after {tries} tries (last tried {last}: {source})")]
    Exhausted {
        tries: u32,
        last: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("claiming vsock guest CID {cid}: {source}")]
    Claim {
        cid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A pseudo-random CID in the valid range, different for each `attempt`.
fn candidate(seed: u64, attempt: u32) -> u32 {
    // splitmix64 of seed + attempt: spreads consecutive attempts over the range.
    let mut z = seed.wrapping_add((attempt as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    FIRST_CID + (z % (LAST_CID - FIRST_CID) as u64) as u32
}

/// Tries CIDs with `claim` until one is free: EADDRINUSE moves on, any other error stops.
fn find_free(seed: u64, mut claim: impl FnMut(u32) -> std::io::Result<()>) -> Result<u32, CidError> {
    let mut last = None;
    for attempt in 0..TRIES {
        let cid = candidate(seed, attempt);
        match claim(cid) {
            Ok(()) => return Ok(cid),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last = Some((cid, e)),
            Err(source) => return Err(CidError::Claim { cid, source }),
        }
    }
    let (last, source) = last.expect("TRIES > 0");
    Err(CidError::Exhausted { tries: TRIES, last, source })
}

/// Opens `/dev/vhost-vsock` and claims a free CID on it; QEMU gets the descriptor (`vhostfd=`).
pub fn reserve() -> Result<(OwnedFd, u32), CidError> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/vhost-vsock").map_err(CidError::Open)?;
    let fd: OwnedFd = file.into();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0) ^ ((std::process::id() as u64) << 32);
    let cid = find_free(seed, |cid| {
        let v: u64 = cid as u64;
        // SAFETY: the ioctl reads one u64 from the pointer, which is valid for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), VHOST_VSOCK_SET_GUEST_CID as _, &v as *const u64) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    })?;
    Ok((fd, cid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_valid_and_spread() {
        let v: Vec<u32> = (0..TRIES).map(|a| candidate(42, a)).collect();
        assert!(v.iter().all(|&c| (FIRST_CID..LAST_CID).contains(&c)));
        let mut d = v.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), v.len(), "attempts give different CIDs");
        assert_ne!(candidate(1, 0), candidate(2, 0));
    }

    /// A fake kernel: CIDs already held by other VMs answer EADDRINUSE.
    #[test]
    fn a_taken_cid_is_skipped_and_other_errors_stop() {
        let taken: Vec<u32> = (0..3).map(|a| candidate(7, a)).collect();
        let mut tried = Vec::new();
        let cid = find_free(7, |c| {
            tried.push(c);
            if taken.contains(&c) {
                Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE))
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(cid, candidate(7, 3));
        assert_eq!(tried.len(), 4);
        let e = find_free(7, |_| Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE))).unwrap_err();
        assert!(matches!(e, CidError::Exhausted { tries: TRIES, .. }), "{e}");
        let e = find_free(7, |_| Err(std::io::Error::from_raw_os_error(libc::EPERM))).unwrap_err();
        assert!(matches!(e, CidError::Claim { .. }), "{e}");
    }
}
