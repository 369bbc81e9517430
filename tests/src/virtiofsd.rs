//! The hostile guest's view of a sandbox's shared directory, from where virtiofsd serves it: virtiofsd
//! runs in a mount namespace of its own (a slave copy of the host's, pivoted into the shared directory),
//! and whatever it can write there the guest can make it write. Tests read virtiofsd's mountinfo and
//! write from inside its mount namespace (as `nsenter -t <virtiofsd pid> -m` would; the namespace has no
//! shell, so the write is made by a forked child of the test after setns).
use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// One line of a mountinfo file.
#[derive(Debug, Clone)]
pub struct MountLine {
    /// The device (field 3, `major:minor`).
    pub dev: String,
    pub mount_point: String,
    /// The per-mount options (field 6): ro/rw, nosuid, nodev, ...
    pub options: Vec<String>,
    /// The optional fields: `shared:N`, `master:N`, ...
    pub optional: Vec<String>,
    pub raw: String,
}

impl MountLine {
    pub fn has(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }

    fn tag(&self, prefix: &str) -> Option<String> {
        self.optional.iter().find_map(|o| o.strip_prefix(prefix)).map(str::to_string)
    }

    /// The peer group this mount is shared in (`shared:N`).
    pub fn peer_group(&self) -> Option<String> {
        self.tag("shared:")
    }

    /// The peer group this mount receives from (`master:N`).
    pub fn master(&self) -> Option<String> {
        self.tag("master:")
    }
}

/// The mounts of process `pid`'s mount namespace.
pub fn mountinfo(pid: u32) -> Vec<MountLine> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_else(|e| panic!("/proc/{pid}/mountinfo: {e}"));
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountLine {
                dev: f.get(2)?.to_string(),
                mount_point: f.get(4)?.replace("\\040", " "),
                options: f.get(5)?.split(',').map(str::to_string).collect(),
                optional: f[6..sep].iter().map(|s| s.to_string()).collect(),
                raw: l.to_string(),
            })
        })
        .collect()
}

/// The virtiofsd serving a sandbox's shared directory.
pub struct Virtiofsd {
    /// The process in virtiofsd's own mount namespace (the C virtiofsd's sandboxed child).
    pub pid: u32,
}

fn mnt_ns(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

impl Virtiofsd {
    /// The virtiofsd of the sandbox directory `sandbox_dir` (its shared directory is `<dir>/shared`): the
    /// one of its processes that serves the guest, in a mount namespace that is not this test's (the C
    /// virtiofsd's sandboxed child, whose parent only waits for it).
    pub fn of(sandbox_dir: &Path) -> Virtiofsd {
        let shared = format!("{}/shared", sandbox_dir.display());
        let ours = mnt_ns("self");
        let all: Vec<u32> = crate::processes_mentioning(&shared)
            .into_iter()
            .filter(|(_, cmd)| cmd.split_whitespace().next().is_some_and(|a| a.ends_with("virtiofsd")))
            .map(|(p, _)| p)
            .collect();
        let ppid = |pid: u32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok()).unwrap_or(0)
        };
        let found: Vec<u32> = all
            .iter()
            .copied()
            .filter(|p| !all.contains(&ppid(*p)) || all.len() == 1)
            .map(|p| all.iter().copied().find(|c| ppid(*c) == p).unwrap_or(p))
            .filter(|p| mnt_ns(&p.to_string()).is_some_and(|ns| Some(ns) != ours))
            .collect();
        assert_eq!(found.len(), 1, "one virtiofsd of {shared} serving the guest from a mount namespace of its own: {found:?} of {all:?}");
        Virtiofsd { pid: found[0] }
    }

    /// The mounts virtiofsd sees, by mount point (in its namespace, `/` is the shared directory).
    pub fn mounts(&self) -> BTreeMap<String, MountLine> {
        mountinfo(self.pid).into_iter().map(|m| (m.mount_point.clone(), m)).collect()
    }

    /// Appends to (or creates) `path` from inside virtiofsd's mount namespace, as virtiofsd does for the
    /// guest: Ok, or the errno's text.
    pub fn write(&self, path: &str) -> Result<(), String> {
        let ns = std::fs::File::open(format!("/proc/{}/ns/mnt", self.pid)).map_err(|e| format!("virtiofsd's mount namespace: {e}"))?;
        let cpath = std::ffi::CString::new(path).unwrap();
        // SAFETY: the child only makes raw system calls, then _exit()s.
        match unsafe { libc::fork() } {
            -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
            0 => unsafe {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                    libc::_exit(200);
                }
                let fd = libc::open(cpath.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_NOFOLLOW, 0o644);
                if fd < 0 {
                    libc::_exit(*libc::__errno_location() & 0x7f);
                }
                if libc::write(fd, b"hostile\n".as_ptr().cast(), 8) != 8 {
                    libc::_exit(*libc::__errno_location() & 0x7f);
                }
                libc::_exit(0)
            },
            child => {
                let mut status = 0;
                // SAFETY: waiting for the child forked above.
                unsafe { libc::waitpid(child, &mut status, 0) };
                match libc::WEXITSTATUS(status) {
                    0 => Ok(()),
                    200 => Err("setns into virtiofsd's mount namespace failed".into()),
                    e => Err(std::io::Error::from_raw_os_error(e).to_string()),
                }
            }
        }
    }
}

/// How a test expects one volume's copy to look from virtiofsd's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `ro`: the top read-only, its submount `sub` writable (OCI's meaning).
    ReadOnlyTop,
    /// `rro`: the top and `sub` read-only.
    ReadOnlyAll,
    /// Writable, private: a mount the host makes later below the source (`late`) is never seen.
    Private,
    /// Writable, a slave: the host's later mount `late` is seen.
    Slave,
}

/// A volume source for these checks: a tmpfs of its own (a shared mount, as under /var/lib/kubelet),
/// with a canary file and a submount `sub` holding another.
pub struct Source {
    pub dir: PathBuf,
}

impl Source {
    pub fn new(dir: PathBuf) -> Source {
        std::fs::create_dir_all(&dir).unwrap();
        let sh = |c: &str| {
            let o = std::process::Command::new("sh").arg("-c").arg(c).output().unwrap();
            assert!(o.status.success(), "{c}: {}", String::from_utf8_lossy(&o.stderr));
        };
        let d = dir.display();
        sh(&format!("mount -t tmpfs -o size=1m kata-rs-vol {d} && mount --make-shared {d} && echo canary > {d}/canary && mkdir {d}/sub && mkdir {d}/late"));
        sh(&format!("mount -t tmpfs -o size=1m kata-rs-sub {d}/sub && echo sub-canary > {d}/sub/canary"));
        Source { dir }
    }

    /// Mounts a tmpfs on `late` (after the container started), holding a file `here`.
    pub fn mount_late(&self) {
        let p = self.dir.join("late");
        nix::mount::mount(Some("kata-rs-late"), &p, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m")).unwrap();
        std::fs::write(p.join("here"), "late\n").unwrap();
    }

    /// The device of the source's tmpfs, as mountinfo writes it.
    fn dev(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let d = std::fs::metadata(&self.dir).unwrap().dev();
        format!("{}:{}", libc::major(d), libc::minor(d))
    }

    /// The canaries are as made and no other file appeared, at the top or in `sub`.
    pub fn assert_intact(&self, case: &str) {
        for (d, want) in [(self.dir.clone(), "canary\n"), (self.dir.join("sub"), "sub-canary\n")] {
            assert_eq!(std::fs::read_to_string(d.join("canary")).unwrap(), want, "{case}: {}", d.display());
            let names: Vec<String> = std::fs::read_dir(&d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            let extra: Vec<&String> = names.iter().filter(|n| !["canary", "sub", "late"].contains(&n.as_str())).collect();
            assert!(extra.is_empty(), "{case}: files appeared in {}: {extra:?}", d.display());
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-R").arg("-l").arg(&self.dir).status();
    }
}

/// Checks the volume of container `id` whose source is `src` from virtiofsd's side against `expect`:
/// mount flags in its namespace (nosuid,nodev always; read-only as asked), writes made from its
/// namespace, what arrives by propagation after `src.mount_late()`, and the host source's canaries.
/// Call after `mount_late`.
pub fn assert_volume(v: &Virtiofsd, id: &str, src: &Source, expect: Expect) {
    let case = format!("the volume of {id} from {} ({expect:?})", src.dir.display());
    let mounts = v.mounts();
    let prefix = format!("/{id}/volumes/");
    let dev = src.dev();
    let tops: Vec<&MountLine> = mounts.values().filter(|l| l.dev == dev && l.mount_point.strip_prefix(&prefix).is_some_and(|n| !n.contains('/'))).collect();
    assert_eq!(tops.len(), 1, "{case}: one copy of the source ({dev}) below {prefix} in virtiofsd's namespace: {:#?}", mounts.values().map(|l| &l.raw).collect::<Vec<_>>());
    let m = tops[0];
    let top = m.mount_point.clone();
    let below: Vec<&MountLine> = mounts.iter().filter(|(p, _)| p.starts_with(&format!("{top}/"))).map(|(_, l)| l).collect();
    for l in below.iter().copied().chain([m]) {
        if l.mount_point.ends_with("/late") {
            continue; // the host's own mount, as the host made it (only a slave receives it)
        }
        assert!(l.has("nosuid") && l.has("nodev"), "{case}: every copy is nosuid,nodev: {}", l.raw);
    }
    let sub = mounts.get(&format!("{top}/sub")).unwrap_or_else(|| panic!("{case}: the submount came along: {below:#?}"));
    let late = mounts.get(&format!("{top}/late"));
    match expect {
        Expect::ReadOnlyTop => {
            assert!(m.has("ro") && sub.has("rw"), "{case}: top ro, submount rw:\n{}\n{}", m.raw, sub.raw);
            let e = v.write(&format!("{top}/written-by-test")).expect_err("a write to the ro top from virtiofsd's namespace");
            assert!(e.contains("Read-only"), "{case}: {e}");
            v.write(&format!("{top}/sub/written-by-test")).unwrap_or_else(|e| panic!("{case}: ro is the top only, the submount stays writable: {e}"));
            std::fs::remove_file(src.dir.join("sub/written-by-test")).unwrap();
        }
        Expect::ReadOnlyAll => {
            assert!(m.has("ro") && sub.has("ro"), "{case}: top and submount ro:\n{}\n{}", m.raw, sub.raw);
            for p in [format!("{top}/written-by-test"), format!("{top}/sub/written-by-test"), format!("{top}/canary")] {
                let e = v.write(&p).expect_err("a write to an rro volume from virtiofsd's namespace");
                assert!(e.contains("Read-only"), "{case}: {p}: {e}");
            }
        }
        Expect::Private | Expect::Slave => {
            assert!(m.has("rw"), "{case}: {}", m.raw);
            v.write(&format!("{top}/written-by-test")).unwrap_or_else(|e| panic!("{case}: a writable volume: {e}"));
            std::fs::remove_file(src.dir.join("written-by-test")).unwrap();
        }
    }
    if expect == Expect::Slave {
        assert!(late.is_some(), "{case}: a slave volume receives the host's later mount: {below:#?}");
    } else {
        assert!(late.is_none(), "{case}: the host's later mount below the source never reaches virtiofsd: {late:?}");
    }
    src.assert_intact(&case);
}
