//! File operations on directories the guest can write (the sandbox's shared directory), done so that
//! nothing the guest creates, renames or swaps can make the host read, write or delete outside them.
//!
//! A [`Dir`] is a pinned directory file descriptor. Every entry below it is reached relative to that
//! descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV |
//! RESOLVE_NO_MAGICLINKS)` and `O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`; what was opened is checked with
//! `fstat` (regular files and directories only); deletion is `unlinkat` relative to the pinned
//! descriptor, which never follows a symlink. Walks are bounded in bytes, entries and depth.
use std::{
    ffi::{CStr, CString, OsStr, OsString},
    fs::File,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag},
    sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag},
    unistd::{unlinkat, UnlinkatFlags},
};

#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing {path}: {why}")]
    Refused { path: String, why: String },
    #[error("{what} exceed the limit of {limit}")]
    Limit { what: &'static str, limit: u64 },
}

type Result<T> = std::result::Result<T, SafeFsError>;

/// Bounds of one walk.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// File contents, in bytes, counted from what was actually read.
    pub max_bytes: u64,
    /// Entries of every kind, counted over the whole walk.
    pub max_entries: u64,
    /// Directory levels below the top.
    pub max_depth: u32,
}

/// What a copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub files: u64,
    pub dirs: u64,
}

/// A directory pinned by a file descriptor. `path` is for messages only and never used to reach it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

const RESOLVE: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_XDEV | libc::RESOLVE_NO_MAGICLINKS;

fn io_err(path: &Path, e: impl Into<std::io::Error>) -> SafeFsError {
    SafeFsError::Io { path: path.display().to_string(), source: e.into() }
}

/// A readdir name as a C string; names from the kernel never hold '/' or NUL, but a name given by a
/// caller is checked the same way.
fn component(dir: &Path, name: &OsStr) -> Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.len() > 255 {
        return Err(SafeFsError::Refused { path: dir.join(name).display().to_string(), why: "not a single path component".into() });
    }
    CString::new(b).map_err(|_| SafeFsError::Refused { path: dir.join(name).display().to_string(), why: "NUL in name".into() })
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat2(dirfd: &impl AsFd, name: &CStr, flags: i32, mode: u32) -> std::result::Result<OwnedFd, Errno> {
    openat2_resolve(dirfd, name, flags, mode, RESOLVE)
}

fn openat2_resolve(dirfd: &impl AsFd, name: &CStr, flags: i32, mode: u32, resolve: u64) -> std::result::Result<OwnedFd, Errno> {
    let how = OpenHow { flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64, mode: mode as u64, resolve };
    loop {
        // SAFETY: valid dirfd, NUL-terminated name, and an open_how of the size passed.
        let r = unsafe { libc::syscall(libc::SYS_openat2, dirfd.as_fd().as_raw_fd(), name.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>()) };
        if r >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        match Errno::last() {
            Errno::EINTR | Errno::EAGAIN => continue,
            e => return Err(e),
        }
    }
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn kind_name(k: SFlag) -> &'static str {
    match k {
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFREG => "a regular file",
        _ => "an unknown kind of file",
    }
}

/// Why an open failed, in words a user can act on.
fn open_refusal(path: &Path, e: Errno) -> SafeFsError {
    match e {
        Errno::ELOOP => SafeFsError::Refused { path: path.display().to_string(), why: "it is a symlink (made by the guest?)".into() },
        Errno::EXDEV => SafeFsError::Refused { path: path.display().to_string(), why: "it leaves the directory or crosses a mount".into() },
        Errno::ENXIO | Errno::EACCES | Errno::EPERM => {
            SafeFsError::Refused { path: path.display().to_string(), why: format!("it cannot be opened as a plain file ({e})") }
        }
        e => io_err(path, e),
    }
}

impl Dir {
    /// Opens a directory the host owns (a path no guest can change), refusing a symlink as its last
    /// component. Everything below it is then reached through the descriptor only.
    pub fn open_host(path: &Path) -> Result<Dir> {
        let fd = nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| {
            if e == Errno::ELOOP || e == Errno::ENOTDIR {
                SafeFsError::Refused { path: path.display().to_string(), why: "not a directory (a symlink?)".into() }
            } else {
                io_err(path, e)
            }
        })?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir { fd, path: path.to_path_buf() })
    }

    /// A second descriptor of the same directory.
    pub fn try_clone(&self) -> Result<Dir> {
        Ok(Dir { fd: self.fd.try_clone().map_err(|e| io_err(&self.path, e))?, path: self.path.clone() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The magic link of this directory's descriptor: as a mount target it is this very directory,
    /// whatever name the guest gave it since it was opened.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// An `O_PATH` descriptor of the root of the mount on child `name` (a single component, no symlink
    /// followed); refused unless it is another filesystem than this directory's, i.e. a mount the host
    /// made there. Unmounting through its magic link unmounts exactly that mount.
    pub fn open_mount_root(&self, name: &OsStr) -> Result<OwnedFd> {
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        let fd = openat2_resolve(&self.fd, &c, libc::O_PATH, 0, resolve).map_err(|e| open_refusal(&path, e))?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| io_err(&path, e))?;
        if st.st_dev == self.stat()?.st_dev {
            return Err(SafeFsError::Refused { path: path.display().to_string(), why: "it is not the mount the host made there".into() });
        }
        Ok(fd)
    }

    pub fn stat(&self) -> Result<FileStat> {
        fstat(self.fd.as_raw_fd()).map_err(|e| io_err(&self.path, e))
    }

    /// Opens subdirectory `name` (a single component) beneath this one.
    pub fn open_dir(&self, name: &OsStr) -> Result<Dir> {
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        let fd = openat2(&self.fd, &c, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK, 0).map_err(|e| match e {
            // Say what is there instead (O_NOFOLLOW with O_DIRECTORY reports a symlink as ENOTDIR).
            Errno::ENOTDIR => {
                let what = self.lstat(&c).map(|st| kind_name(kind(&st))).unwrap_or("not a directory");
                SafeFsError::Refused { path: path.display().to_string(), why: format!("it is {what}, not a directory the host made") }
            }
            e => open_refusal(&path, e),
        })?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| io_err(&path, e))?;
        if kind(&st) != SFlag::S_IFDIR {
            return Err(SafeFsError::Refused { path: path.display().to_string(), why: format!("it is {}", kind_name(kind(&st))) });
        }
        Ok(Dir { fd, path })
    }

    /// Creates subdirectory `name`; it must not exist yet (whatever is there was not made by the host).
    pub fn create_dir(&self, name: &OsStr, mode: u32) -> Result<Dir> {
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        mkdirat(Some(self.fd.as_raw_fd()), c.as_c_str(), Mode::from_bits_truncate(mode)).map_err(|e| match e {
            Errno::EEXIST => SafeFsError::Refused { path: path.display().to_string(), why: "it already exists; the host did not make it".into() },
            e => io_err(&path, e),
        })?;
        self.open_dir(name)
    }

    /// Opens subdirectory `name`, creating it first when it does not exist.
    pub fn ensure_dir(&self, name: &OsStr, mode: u32) -> Result<Dir> {
        let c = component(&self.path, name)?;
        match mkdirat(Some(self.fd.as_raw_fd()), c.as_c_str(), Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => self.open_dir(name),
            Err(e) => Err(io_err(&self.path.join(name), e)),
        }
    }

    /// Opens regular file `name` for reading; anything else (symlink, FIFO, device, socket, a file with
    /// other hard links) is refused. Opening never blocks and never follows a link.
    pub fn open_file(&self, name: &OsStr) -> Result<(File, FileStat)> {
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        let fd = openat2(&self.fd, &c, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0).map_err(|e| open_refusal(&path, e))?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| io_err(&path, e))?;
        if kind(&st) != SFlag::S_IFREG {
            return Err(SafeFsError::Refused { path: path.display().to_string(), why: format!("it is {}", kind_name(kind(&st))) });
        }
        if st.st_nlink != 1 {
            return Err(SafeFsError::Refused { path: path.display().to_string(), why: format!("it has {} hard links", st.st_nlink) });
        }
        Ok((File::from(fd), st))
    }

    /// Creates regular file `name`, which must not exist (no symlink or existing file is written through).
    pub fn create_file(&self, name: &OsStr, mode: u32) -> Result<File> {
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        let fd = openat2(&self.fd, &c, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NONBLOCK, mode).map_err(|e| match e {
            Errno::EEXIST => SafeFsError::Refused { path: path.display().to_string(), why: "it already exists".into() },
            e => open_refusal(&path, e),
        })?;
        Ok(File::from(fd))
    }

    /// The names in this directory (not `.` and `..`): all of them, failing past `max`.
    pub fn names(&self, max: u64) -> Result<Vec<OsString>> {
        self.read_names(max, true)
    }

    /// Up to `max` names; with `fail_past`, more than `max` is an error instead of a cut.
    fn read_names(&self, max: u64, fail_past: bool) -> Result<Vec<OsString>> {
        // A fresh descriptor of the same directory for reading entries ("." resolves to itself).
        let fd = openat2(&self.fd, c".", libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK, 0).map_err(|e| io_err(&self.path, e))?;
        let mut d = nix::dir::Dir::from_fd(fd_into_raw(fd)).map_err(|e| io_err(&self.path, e))?;
        let mut out = Vec::new();
        for e in d.iter() {
            let e = e.map_err(|e| io_err(&self.path, e))?;
            let n = e.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            if out.len() as u64 >= max {
                if fail_past {
                    return Err(SafeFsError::Limit { what: "directory entries", limit: max });
                }
                break;
            }
            out.push(OsStr::from_bytes(n).to_os_string());
        }
        Ok(out)
    }

    /// `lstat` of `name` relative to this directory (no link followed).
    fn lstat(&self, name: &CStr) -> std::result::Result<FileStat, Errno> {
        fstatat(Some(self.fd.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
    }

    /// Removes `name` below this directory: a directory with everything in it, anything else unlinked
    /// (a symlink is removed itself, never what it points to). Never leaves this directory's mount.
    /// Returns the number of entries removed. A missing `name` is not an error.
    pub fn remove_tree(&self, name: &OsStr) -> Result<u64> {
        self.remove_tree_depth(name, 0)
    }

    fn remove_tree_depth(&self, name: &OsStr, depth: u32) -> Result<u64> {
        const MAX_DEPTH: u32 = 128;
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        let st = match self.lstat(&c) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(0),
            Err(e) => return Err(io_err(&path, e)),
        };
        if kind(&st) != SFlag::S_IFDIR {
            return match unlinkat(Some(self.fd.as_raw_fd()), c.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(1),
                Err(e) => Err(io_err(&path, e)),
            };
        }
        if depth >= MAX_DEPTH {
            return Err(SafeFsError::Limit { what: "directory levels to remove", limit: MAX_DEPTH as u64 });
        }
        // Swapped for something else since the lstat: open_dir refuses it, and nothing is removed there.
        let sub = self.open_dir(name)?;
        let n = sub.remove_contents_depth(depth + 1)?;
        match unlinkat(Some(self.fd.as_raw_fd()), c.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(n + 1),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// Removes everything in this directory, keeping the directory itself.
    pub fn remove_contents(&self) -> Result<u64> {
        self.remove_contents_depth(0)
    }

    fn remove_contents_depth(&self, depth: u32) -> Result<u64> {
        const MAX_REMOVED: u64 = 1 << 22;
        let mut n = 0;
        // In rounds, so that a directory with very many entries is never read into memory whole.
        loop {
            let names = self.read_names(4096, false)?;
            if names.is_empty() {
                return Ok(n);
            }
            for name in &names {
                n += self.remove_tree_depth(name, depth)?;
            }
            // A guest that creates entries as fast as they are removed cannot keep the host here.
            if n > MAX_REMOVED {
                return Err(SafeFsError::Limit { what: "entries to remove", limit: MAX_REMOVED });
            }
        }
    }
}

fn fd_into_raw(fd: OwnedFd) -> std::os::fd::RawFd {
    std::os::fd::IntoRawFd::into_raw_fd(fd)
}

/// Copies everything below `src` into `dst` (which should be empty): regular files and directories
/// only, through pinned descriptors on both sides, within `limits`. On error, what was copied so far
/// stays in `dst` for the caller to remove.
pub fn copy_tree(src: &Dir, dst: &Dir, limits: Limits) -> Result<Copied> {
    let mut c = Copied::default();
    let mut entries = 0u64;
    copy_level(src, dst, &limits, &mut c, &mut entries, 0)?;
    Ok(c)
}

fn copy_level(src: &Dir, dst: &Dir, l: &Limits, c: &mut Copied, entries: &mut u64, depth: u32) -> Result<()> {
    let names = src.names(l.max_entries.saturating_sub(*entries).saturating_add(1)).map_err(|e| match e {
        SafeFsError::Limit { .. } => SafeFsError::Limit { what: "entries", limit: l.max_entries },
        e => e,
    })?;
    for name in names {
        *entries += 1;
        if *entries > l.max_entries {
            return Err(SafeFsError::Limit { what: "entries", limit: l.max_entries });
        }
        let cname = component(&src.path, &name)?;
        let from = src.path.join(&name);
        let st = src.lstat(&cname).map_err(|e| io_err(&from, e))?;
        match kind(&st) {
            SFlag::S_IFDIR => {
                if depth + 1 > l.max_depth {
                    return Err(SafeFsError::Limit { what: "directory levels", limit: l.max_depth as u64 });
                }
                let s = src.open_dir(&name)?;
                let d = dst.create_dir(&name, 0o700)?;
                c.dirs += 1;
                copy_level(&s, &d, l, c, entries, depth + 1)?;
            }
            SFlag::S_IFREG => {
                let (mut r, st) = src.open_file(&name)?;
                let left = l.max_bytes - c.bytes;
                if st.st_size as u64 > left {
                    return Err(SafeFsError::Refused {
                        path: from.display().to_string(),
                        why: format!("it is {} bytes; the images may hold at most {} bytes in all", st.st_size, l.max_bytes),
                    });
                }
                let mut w = dst.create_file(&name, 0o600)?;
                c.files += 1;
                copy_bounded(&mut r, &mut w, &from, &dst.path.join(&name), l.max_bytes, &mut c.bytes)?;
            }
            k => {
                return Err(SafeFsError::Refused {
                    path: from.display().to_string(),
                    why: format!("it is {}; only regular files and directories are copied", kind_name(k)),
                });
            }
        }
    }
    Ok(())
}

/// Copies `r` into `w` sparse-aware: only the source's data extents (`SEEK_DATA`/`SEEK_HOLE`) are
/// read and written at the same offsets, holes stay holes, and the copy gets the source's length.
/// `total` counts the data bytes that actually arrived; the copy fails past `max` of them, and as soon
/// as any data or the length lies beyond offset `max` (a file the guest extends while it is read).
fn copy_bounded(r: &mut File, w: &mut File, from: &Path, to: &Path, max: u64, total: &mut u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let beyond = || SafeFsError::Limit { what: "image bytes", limit: max };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let mut end = 0u64;
    loop {
        let data = match seek(r, pos, libc::SEEK_DATA) {
            Ok(o) => o,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(io_err(from, e)),
        };
        let hole = seek(r, data, libc::SEEK_HOLE).map_err(|e| io_err(from, e))?;
        if hole > max {
            return Err(beyond());
        }
        let mut at = data;
        while at < hole {
            let want = buf.len().min((hole - at) as usize);
            let n = match r.read_at(&mut buf[..want], at) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(from, e)),
            };
            if n == 0 {
                break; // shrunk while read
            }
            *total += n as u64;
            if *total > max {
                return Err(beyond());
            }
            w.write_all_at(&buf[..n], at).map_err(|e| io_err(to, e))?;
            at += n as u64;
            end = end.max(at);
        }
        if at < hole {
            break;
        }
        pos = hole;
    }
    // The length the source has now (a trailing hole included), within the same bound.
    let len = fstat(r.as_raw_fd()).map_err(|e| io_err(from, e))?.st_size.max(0) as u64;
    if len > max {
        return Err(beyond());
    }
    w.set_len(len.max(end)).map_err(|e| io_err(to, e))
}

fn seek(f: &File, off: u64, whence: libc::c_int) -> std::result::Result<u64, Errno> {
    let off = i64::try_from(off).map_err(|_| Errno::EOVERFLOW)?;
    // SAFETY: lseek on a descriptor this function borrows; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kata-rs-safefs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const L: Limits = Limits { max_bytes: 1 << 20, max_entries: 100, max_depth: 4 };

    #[test]
    fn copies_files_and_dirs() {
        let s = tmp("copy-src");
        let d = tmp("copy-dst");
        std::fs::create_dir(s.join("sub")).unwrap();
        std::fs::write(s.join("pages-1.img"), vec![7u8; 4096]).unwrap();
        std::fs::write(s.join("sub/inventory.img"), b"inv").unwrap();
        let c = copy_tree(&Dir::open_host(&s).unwrap(), &Dir::open_host(&d).unwrap(), L).unwrap();
        assert_eq!(c, Copied { bytes: 4099, files: 2, dirs: 1 });
        assert_eq!(std::fs::read(d.join("sub/inventory.img")).unwrap(), b"inv");
        let _ = std::fs::remove_dir_all(&s);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn sparse_files_stay_sparse_and_data_past_the_limit_is_refused() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let s = tmp("sparse-src");
        let d = tmp("sparse-dst");
        // 8 MiB long, 8 KiB of data in two extents, a trailing hole.
        let f = File::create(s.join("pages-1.img")).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 5 << 20).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let big = Limits { max_bytes: 16 << 20, ..L };
        let c = copy_tree(&Dir::open_host(&s).unwrap(), &Dir::open_host(&d).unwrap(), big).unwrap();
        assert!(c.bytes <= 1 << 20, "only data extents count, {} bytes did", c.bytes);
        let m = std::fs::metadata(d.join("pages-1.img")).unwrap();
        assert_eq!(m.len(), 8 << 20);
        assert!(m.blocks() * 512 <= 1 << 20, "the copy allocated {} bytes", m.blocks() * 512);
        assert_eq!(std::fs::read(d.join("pages-1.img")).unwrap(), std::fs::read(s.join("pages-1.img")).unwrap());
        // A file longer than the limit is refused, however little data it holds.
        let s2 = tmp("sparse-far");
        let f = File::create(s2.join("pages-1.img")).unwrap();
        f.write_all_at(&[3u8; 16], (16 << 20) + 1).unwrap();
        drop(f);
        let e = copy_err(&s2, big);
        assert!(e.contains("16777216"), "{e}");
        for p in [&s, &d, &s2] {
            let _ = std::fs::remove_dir_all(p);
        }
    }

    fn copy_err(s: &Path, limits: Limits) -> String {
        let d = tmp(&format!("dst-{}", s.file_name().unwrap().to_string_lossy()));
        let e = copy_tree(&Dir::open_host(s).unwrap(), &Dir::open_host(&d).unwrap(), limits).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&d);
        e
    }

    #[test]
    fn refuses_links_and_special_files() {
        let canary = tmp("canary");
        std::fs::write(canary.join("secret"), b"secret").unwrap();
        let s = tmp("links");
        symlink(canary.join("secret"), s.join("evil")).unwrap();
        assert!(copy_err(&s, L).contains("symlink"), "{}", copy_err(&s, L));
        std::fs::remove_file(s.join("evil")).unwrap();
        symlink(&canary, s.join("evildir")).unwrap();
        assert!(copy_err(&s, L).contains("symlink"));
        std::fs::remove_file(s.join("evildir")).unwrap();
        std::fs::hard_link(canary.join("secret"), s.join("hard")).unwrap();
        assert!(copy_err(&s, L).contains("hard links"));
        std::fs::remove_file(s.join("hard")).unwrap();
        nix::unistd::mkfifo(&s.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        assert!(copy_err(&s, L).contains("FIFO"));
        std::fs::remove_file(s.join("fifo")).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(s.join("sock")).unwrap();
        assert!(copy_err(&s, L).contains("socket"));
        std::fs::remove_file(s.join("sock")).unwrap();
        nix::sys::stat::mknod(&s.join("zero"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(1, 5)).unwrap();
        assert!(copy_err(&s, L).contains("character device"));
        std::fs::remove_file(s.join("zero")).unwrap();
        assert_eq!(std::fs::read(canary.join("secret")).unwrap(), b"secret");
        let _ = std::fs::remove_dir_all(&s);
        let _ = std::fs::remove_dir_all(&canary);
    }

    #[test]
    fn bounds_bytes_entries_and_depth() {
        let s = tmp("sparse");
        let f = File::create(s.join("sparse")).unwrap();
        f.set_len(10 << 30).unwrap();
        let e = copy_err(&s, L);
        assert!(e.contains("10737418240 bytes"), "{e}");
        let s2 = tmp("many");
        for i in 0..200 {
            std::fs::write(s2.join(format!("f{i}")), b"").unwrap();
        }
        assert!(copy_err(&s2, L).contains("entries exceed the limit of 100"));
        let s3 = tmp("deep");
        let mut p = s3.clone();
        for _ in 0..100 {
            p = p.join("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        assert!(copy_err(&s3, L).contains("directory levels exceed"));
        for d in [s, s2, s3] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn remove_tree_never_follows_a_symlink() {
        let canary = tmp("rm-canary");
        std::fs::write(canary.join("keep"), b"keep").unwrap();
        let top = tmp("rm-top");
        std::fs::create_dir_all(top.join("stage/sub")).unwrap();
        std::fs::write(top.join("stage/sub/x"), b"x").unwrap();
        symlink(&canary, top.join("stage/link")).unwrap();
        let dir = Dir::open_host(&top).unwrap();
        // The whole directory swapped for a symlink: only the link is removed.
        std::fs::rename(top.join("stage"), top.join("moved")).unwrap();
        symlink(&canary, top.join("stage")).unwrap();
        assert_eq!(dir.remove_tree(OsStr::new("stage")).unwrap(), 1);
        assert!(dir.open_dir(OsStr::new("moved")).is_ok());
        assert!(dir.remove_tree(OsStr::new("moved")).unwrap() >= 3);
        assert_eq!(std::fs::read(canary.join("keep")).unwrap(), b"keep");
        assert!(std::fs::read_dir(&top).unwrap().next().is_none());
        // A symlink is never opened as a directory.
        symlink(&canary, top.join("l")).unwrap();
        assert!(dir.open_dir(OsStr::new("l")).unwrap_err().to_string().contains("symlink"));
        assert!(dir.create_dir(OsStr::new("l"), 0o700).unwrap_err().to_string().contains("already exists"));
        assert!(dir.create_file(OsStr::new("l"), 0o600).unwrap_err().to_string().contains("already exists"));
        assert!(dir.open_dir(OsStr::new("..")).is_err());
        let _ = std::fs::remove_dir_all(&top);
        let _ = std::fs::remove_dir_all(&canary);
    }

    #[test]
    fn removes_a_huge_directory_in_rounds() {
        let top = tmp("rm-huge");
        std::fs::create_dir(top.join("h")).unwrap();
        for i in 0..10_000 {
            std::fs::write(top.join(format!("h/f{i}")), b"").unwrap();
        }
        assert_eq!(Dir::open_host(&top).unwrap().remove_tree(OsStr::new("h")).unwrap(), 10_001);
        let _ = std::fs::remove_dir_all(&top);
    }
}
