//! runc as the agent runs it: one argv builder with the global flags, one way to run a command and
//! read its failure from runc's JSON log.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;

use crate::{cmd, container::ContainerError, reaper::Reaper};

pub const RUNC: &str = "/usr/sbin/runc";
pub const RUNC_ROOT: &str = "/run/runc";
/// Bundles, runc logs, exec process files.
pub const CONTAINERS_DIR: &str = "/run/kata-rs/containers";

type Result<T> = std::result::Result<T, ContainerError>;

/// The bundle of container `id`.
pub fn bundle(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id)
}

/// runc's JSON log of container `id` (every runc command of the container writes it).
pub fn log_path(id: &str) -> PathBuf {
    bundle(id).join("runc.log")
}

/// Whether runc has state for container `id` (it was created or restored and not deleted).
pub fn has_state(id: &str) -> bool {
    Path::new(RUNC_ROOT).join(id).exists()
}

/// The sealed in-memory copy of runc that every runc command runs from, once [`seal_binary`] made it.
static SEALED: std::sync::OnceLock<Sealed> = std::sync::OnceLock::new();

/// The seals runc 1.1 looks for on `/proc/self/exe` (`RUNC_MEMFD_SEALS` in its `cloned_binary.c`).
const RUNC_SEALS: libc::c_int = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// How many times a copy held open for writing is replaced by a fresh one before the descriptor
/// names runc's own binary instead: each copy a container keeps pins 8.5 MiB of guest memory.
const MAX_RESEALS: u32 = 3;

/// Makes the sealed copy of runc that every later runc command runs from ([`Sealed`]).
pub fn seal_binary() -> std::io::Result<()> {
    if SEALED.get().is_none() {
        let _ = SEALED.set(Sealed::new(Path::new(RUNC))?);
    }
    Ok(())
}

/// Spawns `cmd`; a runc command whose sealed copy cannot be executed because a descriptor is open for
/// writing on it (ETXTBSY) is spawned again from a fresh copy ([`Sealed::replace`]).
pub fn spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    match (cmd.spawn(), SEALED.get()) {
        (Err(e), Some(sealed)) if e.raw_os_error() == Some(libc::ETXTBSY) && cmd.get_program() == sealed.program().as_os_str() => {
            tracing::warn!("the sealed copy of runc is held open for writing (a container reached it): replaced");
            sealed.replace()?;
            cmd.spawn()
        }
        (r, _) => r,
    }
}

/// runc 1.1 re-executes itself as `runc init` for each create and exec, and there first clones its
/// 8.5 MiB binary (a read-only bind mount of itself, else a copy into a new sealed memfd) and
/// re-executes the clone: its CVE-2019-5736 defence, so that a container cannot overwrite the runc
/// binary through `/proc/<pid>/exe`. It skips all of that when `/proc/self/exe` already is a memfd
/// with exactly [`RUNC_SEALS`]. Under TCG the clone and re-exec made a `runc exec` take 1.8–3.2 s,
/// 0.4–0.7 s without. Nobody can write a sealed memfd or undo a seal, so the defence is kept. What
/// a container can still do: keep a descriptor of the copy (taken through `/proc/<pid>/exe` while a
/// runc of its own runs from it) and reopen it for writing; every write fails, but an exec of a file
/// open for writing fails with ETXTBSY, which would stop every runc command of the VM. The copy is
/// mode 0555 (a container user without CAP_DAC_OVERRIDE cannot reopen it for writing at all), and a
/// copy found held so is replaced under the same descriptor number, up to [`MAX_RESEALS`] times;
/// then the number names runc's own binary, which clones itself again for each `runc init`.
struct Sealed {
    /// The descriptor number every runc command runs from (`/proc/self/fd/<fd>`): the child resolves
    /// the path in its own descriptor table, a copy of ours, before exec closes it (close-on-exec).
    fd: std::os::fd::RawFd,
    source: PathBuf,
    reseals: std::sync::atomic::AtomicU32,
    /// Serialises replacements.
    lock: std::sync::Mutex<()>,
}

impl Sealed {
    fn new(source: &Path) -> std::io::Result<Sealed> {
        let fd = std::os::fd::IntoRawFd::into_raw_fd(sealed_copy(source)?);
        Ok(Sealed { fd, source: source.to_path_buf(), reseals: 0.into(), lock: std::sync::Mutex::new(()) })
    }

    fn program(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd))
    }

    /// A fresh sealed copy (after [`MAX_RESEALS`] of them, the binary itself) takes the descriptor
    /// number; the old copy lives on only in whoever holds it.
    fn replace(&self) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.reseals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let new: std::os::fd::OwnedFd = match (n < MAX_RESEALS).then(|| sealed_copy(&self.source)) {
            Some(Ok(fd)) => fd,
            _ => fs::File::open(&self.source)?.into(),
        };
        // SAFETY: dup3 onto our own descriptor number, which this struct owns for the process's
        // lifetime; `new` is closed after it.
        if unsafe { libc::dup3(std::os::fd::AsRawFd::as_raw_fd(&new), self.fd, libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A memfd holding the bytes of `path`, mode 0555, sealed with [`RUNC_SEALS`] (checked).
fn sealed_copy(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::{io::Write, os::fd::FromRawFd, os::unix::fs::PermissionsExt};
    let data = fs::read(path)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
    let raw = unsafe { libc::memfd_create(c"runc".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a new descriptor that nothing else owns.
    let mut file = unsafe { fs::File::from_raw_fd(raw) };
    file.write_all(&data)?;
    file.set_permissions(fs::Permissions::from_mode(0o555))?;
    // SAFETY: fcntl on the descriptor owned by `file`; plain integer arguments.
    if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_ADD_SEALS, RUNC_SEALS) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let seals = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GET_SEALS) };
    if seals != RUNC_SEALS {
        return Err(std::io::Error::other(format!("the runc memfd has seals {seals:#x}, not {RUNC_SEALS:#x}")));
    }
    Ok(file.into())
}

/// The program runc commands run: the sealed copy when there is one, else the binary itself.
fn program() -> std::ffi::OsString {
    match SEALED.get() {
        Some(s) => s.program().into(),
        None => RUNC.into(),
    }
}

/// `runc --root … --log … --log-format json <args>`: the one place runc's global flags are written.
pub fn command<S: AsRef<std::ffi::OsStr>>(id: &str, args: impl IntoIterator<Item = S>) -> Command {
    let mut c = Command::new(program());
    std::os::unix::process::CommandExt::arg0(&mut c, "runc");
    c.arg("--root").arg(RUNC_ROOT).arg("--log").arg(log_path(id)).args(["--log-format", "json"]).args(args);
    c
}

/// The last error messages runc wrote to its JSON log (at most three).
pub fn log_error(id: &str) -> String {
    log_error_in(&fs::read_to_string(log_path(id)).unwrap_or_default())
}

fn log_error_in(text: &str) -> String {
    let mut msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| matches!(v.get("level").and_then(Value::as_str), Some("error") | Some("fatal")))
        .filter_map(|v| v.get("msg").and_then(Value::as_str).map(str::to_string))
        .collect();
    msgs.dedup();
    let tail: Vec<String> = msgs.into_iter().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
    tail.join("; ")
}

/// A runc failure; runc's own message often repeats "<what> failed: ", which is dropped.
pub fn failure(what: impl Into<String>, detail: &str) -> ContainerError {
    let what = what.into();
    let prefix = format!("{what} failed: ");
    let detail = detail.strip_prefix(&prefix).unwrap_or(detail).to_string();
    ContainerError::Runc { what, detail }
}

/// The outcome of a finished runc command as an error: a typed timeout when the deadline killed
/// it, else runc's logged message (its stderr when the log says nothing).
pub fn check(id: &str, what: &str, out: cmd::Output) -> Result<cmd::Output> {
    if out.ok() {
        return Ok(out);
    }
    let mut detail = log_error(id);
    if detail.is_empty() {
        detail = out.stderr.trim().to_string();
    }
    if out.timed_out {
        return Err(ContainerError::TimedOut { what: what.to_string(), detail });
    }
    Err(failure(what, &detail))
}

/// Runs `runc <args>` for container `id` with captured output.
pub async fn run(reaper: &Arc<Reaper>, id: &str, args: &[&str], deadline: Option<Duration>) -> Result<cmd::Output> {
    let mut c = command(id, args);
    c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let out = cmd::run_command(reaper, c, deadline).await.map_err(|e| ContainerError::Io("running runc".into(), e))?;
    check(id, &format!("runc {}", args.first().unwrap_or(&"")), out)
}

/// The pid runc wrote to a `--pid-file`.
pub fn read_pid(p: &Path) -> Result<u32> {
    let s = fs::read_to_string(p).map_err(|e| ContainerError::Io(format!("reading {}", p.display()), e))?;
    s.trim().parse().map_err(|_| ContainerError::Runc { what: "runc".into(), detail: format!("bad pid file {}: {s:?}", p.display()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_flags_come_first_and_the_log_is_the_containers() {
        let c = command("c1", ["exec", "-d"]);
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(c.get_program(), RUNC, "runc itself until seal_binary made the sealed copy");
        assert_eq!(args, ["--root", RUNC_ROOT, "--log", "/run/kata-rs/containers/c1/runc.log", "--log-format", "json", "exec", "-d"]);
    }

    fn inode(p: impl AsRef<Path>) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    /// The sealed copy runs, and nobody can change it: not through its descriptor, not by reopening it
    /// through /proc for writing (what CVE-2019-5736's container did to runc), not by undoing a seal.
    #[test]
    fn the_sealed_copy_runs_and_refuses_every_write() {
        use std::{io::Write, os::fd::AsRawFd};
        let fd = sealed_copy(Path::new("/bin/sleep")).unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        assert!(Command::new(&path).arg("0").status().unwrap().success(), "the sealed copy runs");
        // SAFETY: fcntl on a descriptor we own.
        assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) }, RUNC_SEALS);
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions()) & 0o7777, 0o555);
        let mut reopened = fs::OpenOptions::new().write(true).open(&path).unwrap();
        let e = reopened.write_all(b"\x7fELF").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        let mut own = fs::File::from(fd.try_clone().unwrap());
        assert_eq!(own.write_all(b"x").unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(own.set_len(0).is_err(), "shrinking is sealed");
        assert!(own.set_len(1 << 30).is_err(), "growing is sealed");
        // SAFETY: as above.
        assert!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, 0) } < 0, "no seal can be changed");
        drop((reopened, own));
        // While a process runs from the copy, its /proc/<pid>/exe is the copy and cannot be opened
        // for writing.
        let mut running = Command::new(&path).arg("30").spawn().unwrap();
        let exe = format!("/proc/{}/exe", running.id());
        let same = inode(&exe) == inode(&path);
        let busy = fs::OpenOptions::new().write(true).open(&exe);
        running.kill().unwrap();
        running.wait().unwrap();
        assert!(same, "the running process's exe is the sealed copy");
        assert_eq!(busy.unwrap_err().raw_os_error(), Some(libc::ETXTBSY));
        assert!(Command::new(&path).arg("0").status().unwrap().success(), "and it still runs");
    }

    /// A container that kept a descriptor of the copy and reopened it for writing (root, or any user
    /// with CAP_DAC_OVERRIDE) blocks its execs (ETXTBSY): the copy is replaced under the same number,
    /// a bounded number of times, then the number names the binary itself; every command still runs.
    #[test]
    fn a_copy_held_open_for_writing_is_replaced_and_replacements_are_bounded() {
        let sealed = Sealed::new(Path::new("/bin/sleep")).unwrap();
        let prog = sealed.program();
        let mut copies = vec![inode(&prog)];
        let mut held = Vec::new();
        for round in 0..=MAX_RESEALS {
            // The attacker's descriptor, reopened for writing through /proc (the kernel checks the
            // mode: the test runs as root, as a container's root with CAP_DAC_OVERRIDE would).
            held.push(fs::OpenOptions::new().write(true).open(&prog).unwrap_or_else(|e| panic!("round {round}: {e}")));
            let mut cmd = Command::new(&prog);
            cmd.arg("0");
            let first = cmd.spawn().map(|mut c| c.wait());
            if round <= MAX_RESEALS {
                assert_eq!(first.unwrap_err().raw_os_error(), Some(libc::ETXTBSY), "round {round}: the held copy cannot be executed");
            }
            let mut cmd = Command::new(&prog);
            cmd.arg("0");
            let st = match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    sealed.replace().unwrap();
                    cmd.spawn().unwrap().wait().unwrap()
                }
                other => other.unwrap().wait().unwrap(),
            };
            assert!(st.success(), "round {round}: the command runs after the replacement");
            copies.push(inode(&prog));
            if round == MAX_RESEALS {
                assert_eq!(inode(&prog), inode("/bin/sleep"), "after {MAX_RESEALS} copies the binary itself");
                break;
            }
            assert_ne!(copies[copies.len() - 1], copies[copies.len() - 2], "round {round}: a fresh copy");
        }
    }

    #[test]
    fn the_logs_last_errors_are_the_detail_and_a_timeout_is_typed() {
        let log = "{\"level\":\"info\",\"msg\":\"x\"}\nnot json\n{\"level\":\"error\",\"msg\":\"a\"}\n{\"level\":\"error\",\"msg\":\"a\"}\n{\"level\":\"fatal\",\"msg\":\"b\"}\n";
        assert_eq!(log_error_in(log), "a; b");
        match failure("runc start", "runc start failed: no such container") {
            ContainerError::Runc { what, detail } => assert_eq!((what.as_str(), detail.as_str()), ("runc start", "no such container")),
            other => panic!("{other:?}"),
        }
        let timed = check("no-such-container-here", "runc checkpoint", cmd::Output { code: -9, stdout: String::new(), stderr: "killed".into(), timed_out: true });
        assert!(matches!(timed, Err(ContainerError::TimedOut { ref what, .. }) if what == "runc checkpoint"), "{timed:?}");
        // A failure whose text says "timed out" is not a timeout.
        let text = check("no-such-container-here", "runc checkpoint", cmd::Output { code: 1, stdout: String::new(), stderr: "criu: timed out".into(), timed_out: false });
        assert!(matches!(text, Err(ContainerError::Runc { .. })), "{text:?}");
    }
}
