//! A hostile guest: while a real VM runs under a real containerd, the test writes into the sandbox's
//! shared directory from the host side exactly what a compromised guest could write there through
//! virtio-fs (symlinks, hard links, FIFOs, devices, sockets, odd names, a sparse 10 GiB file, masses of
//! files, deep trees), and races the shim by swapping its staging directories for symlinks to a host
//! directory of canary files. Each case: nothing outside the sandbox and the checkpoint directory is
//! read, written or deleted, the error says what was refused, and the shim keeps serving.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use containerd_shim::protos::{api::CheckpointTaskRequest, ttrpc::context};
use kata_rs_tests::{boot_with, containerd::*, oci_spec, test_config, wait_counter};

const T: Duration = Duration::from_secs(120);
const COUNTER: &[&str] = &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.1; done"];

/// Host files the guest must never reach: their names, sizes, contents and times are checked after
/// every case, and no checkpoint image may hold their content.
struct Canary {
    dir: PathBuf,
    token: String,
    snapshot: Vec<(PathBuf, Vec<u8>, i64, i64)>,
}

impl Canary {
    fn new() -> Canary {
        let dir = PathBuf::from(format!("/run/kata-rs-canary-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let token = format!("KATA-RS-CANARY-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos() ^ 0x5eed_cafe);
        for (name, n) in [("secret", 1), ("sub/secret2", 50), ("big", 40_000)] {
            std::fs::write(dir.join(name), token.repeat(n)).unwrap();
        }
        let mut c = Canary { dir, token, snapshot: vec![] };
        c.snapshot = c.take();
        c
    }

    fn take(&self) -> Vec<(PathBuf, Vec<u8>, i64, i64)> {
        let mut v = vec![];
        for p in ["secret", "sub/secret2", "big", "sub", "."] {
            let path = self.dir.join(p);
            let m = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("canary {} is gone: {e}", path.display()));
            let data = if m.is_file() { std::fs::read(&path).unwrap() } else { std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name().into_encoded_bytes()).collect::<Vec<_>>().concat() };
            v.push((path, data, m.mtime(), m.mtime_nsec()));
        }
        v
    }

    fn assert_intact(&self, case: &str) {
        let now = self.take();
        for (a, b) in self.snapshot.iter().zip(now.iter()) {
            assert!(a == b, "{case}: canary {} changed", a.0.display());
        }
    }

    /// Panics if any file below `dir` holds the canary's content.
    fn assert_absent_below(&self, dir: &Path, case: &str) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                self.assert_absent_below(&e.path(), case);
            } else if m.is_file() {
                let data = std::fs::read(e.path()).unwrap();
                assert!(!contains(&data, self.token.as_bytes()), "{case}: {} holds canary content", e.path().display());
            }
        }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The shim's Checkpoint (no options, as nerdctl and containerd 1.x send it) into `dir`.
fn checkpoint(c: &Containerd, id: &str, dir: &Path) -> Result<(), String> {
    let shim = c.shim_client(id);
    let req = CheckpointTaskRequest { id: id.into(), path: dir.display().to_string(), ..Default::default() };
    shim.checkpoint(context::with_timeout(0), &req).map(|_| ()).map_err(|e| e.to_string())
}

/// Runs `attack` on every new staging directory below `.checkpoints` as soon as it appears, until
/// stopped. Returns how many directories were attacked.
fn inject_into_staging(shared: PathBuf, attack: impl Fn(&Path) + Send + 'static) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        while !s.load(Ordering::Relaxed) {
            if let Ok(entries) = std::fs::read_dir(shared.join(".checkpoints")) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && seen.insert(e.file_name()) {
                        attack(&e.path());
                        n += 1;
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        n
    });
    (stop, h)
}

/// Swaps every staging directory (and `.checkpoints` itself) for a symlink to `target` and back,
/// in a loop, until stopped: before, during and after the dump. Returns the number of swaps.
fn race_swaps(shared: PathBuf, target: PathBuf) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let swaps = Arc::new(AtomicU64::new(0));
    let h = std::thread::spawn(move || {
        let ck = shared.join(".checkpoints");
        let aside = shared.join(".aside");
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            i += 1;
            if i % 2 == 0 {
                // The whole parent.
                if std::fs::rename(&ck, &aside).is_ok() {
                    let _ = std::os::unix::fs::symlink(&target, &ck);
                    swaps.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(300));
                    let _ = std::fs::remove_file(&ck);
                    let _ = std::fs::rename(&aside, &ck);
                }
            } else if let Ok(entries) = std::fs::read_dir(&ck) {
                // Each staging directory below it.
                for e in entries.flatten() {
                    let p = e.path();
                    let moved = shared.join(format!(".moved-{}", e.file_name().to_string_lossy()));
                    if std::fs::symlink_metadata(&p).map(|m| m.is_dir()).unwrap_or(false) && std::fs::rename(&p, &moved).is_ok() {
                        let _ = std::os::unix::fs::symlink(&target, &p);
                        swaps.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(300));
                        let _ = std::fs::remove_file(&p);
                        let _ = std::fs::rename(&moved, &p);
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        swaps.load(Ordering::Relaxed)
    });
    (stop, h)
}

/// Builds something in `<shared>/.prep-<name>` (where the guest would), to be renamed into a staging
/// directory in one step when it appears.
fn prepared(shared: &Path, name: &str) -> PathBuf {
    let p = shared.join(format!(".prep-{name}"));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_shared_directory_cannot_reach_host_files() {
    let canary = Canary::new();
    let c = Containerd::start();
    c.run_detached("h1", &[], COUNTER);
    wait_counter(&c.rootfs("h1").join("count"), 5, T).await;
    let shared = c.dir.join("kr/h1/shared");
    assert!(std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&format!("{} ", shared.display())), "the shared directory is its own mount");
    let targets = c.dir.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let made_targets = std::cell::Cell::new(0u32);
    let target = || {
        made_targets.set(made_targets.get() + 1);
        targets.join(format!("t{}", made_targets.get()))
    };

    // 1. `.checkpoints` is a symlink to a host directory before the checkpoint starts.
    std::os::unix::fs::symlink(&canary.dir, shared.join(".checkpoints")).unwrap();
    let t = target();
    let e = checkpoint(&c, "h1", &t).unwrap_err();
    assert!(e.contains(".checkpoints") && e.contains("symlink"), "{e}");
    canary.assert_intact("symlinked .checkpoints");
    assert_eq!(std::fs::read_dir(&t).unwrap().count(), 0, "nothing written on a refusal");
    std::fs::remove_file(shared.join(".checkpoints")).unwrap();

    // 2. The staging names the shim will use are symlinks placed in advance: removed as links (never
    //    what they point to) and made anew; the checkpoint works.
    std::fs::create_dir_all(shared.join(".checkpoints")).unwrap();
    for i in 1..=40 {
        std::os::unix::fs::symlink(&canary.dir, shared.join(format!(".checkpoints/{i}"))).unwrap();
    }
    let t = target();
    checkpoint(&c, "h1", &t).expect("checkpoint with pre-placed symlinks");
    assert!(t.join("inventory.img").is_file());
    canary.assert_intact("pre-placed staging symlinks");
    canary.assert_absent_below(&t, "pre-placed staging symlinks");
    let _ = std::fs::remove_dir_all(shared.join(".checkpoints"));

    // 3. What a guest can put into the staging directory while CRIU writes there.
    let can = canary.dir.clone();
    type Attack = Box<dyn Fn(&Path) + Send>;
    let deep = prepared(&shared, "deep");
    let mut p = deep.clone();
    for _ in 0..100 {
        p = p.join("d");
    }
    std::fs::create_dir_all(&p).unwrap();
    let sparse = prepared(&shared, "sparse");
    std::fs::File::create(sparse.join("pages-99.img")).unwrap().set_len(10 << 30).unwrap();
    let many = prepared(&shared, "many");
    let mut made = 0u64;
    let full = loop {
        match std::fs::File::create(many.join(format!("f{made}"))) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 1_000_000, "a million files fit: the shared directory's inodes are not bounded");
    };
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "creating files stopped by the inode bound: {full}");
    eprintln!("the guest could create {made} files before the shared directory was full");
    // Room again for CRIU's images and the other cases; far more files than a copy may take remain.
    for i in 0..2000 {
        std::fs::remove_file(many.join(format!("f{}", made - 1 - i))).unwrap();
    }
    let cases: Vec<(&str, Attack, Option<&str>)> = vec![
        ("symlink to a host file", Box::new({ let can = can.clone(); move |d: &Path| { let _ = std::os::unix::fs::symlink(can.join("secret"), d.join("pages-9.img")); } }), Some("symlink")),
        ("symlink to a host directory", Box::new({ let can = can.clone(); move |d: &Path| { let _ = std::os::unix::fs::symlink(&can, d.join("sub")); } }), Some("symlink")),
        ("hard link inside the share", Box::new(move |d: &Path| {
            std::fs::write(d.join("a.img"), b"a").unwrap();
            let _ = std::fs::hard_link(d.join("a.img"), d.join("b.img"));
        }), Some("hard links")),
        ("FIFO", Box::new(|d: &Path| { let _ = nix::unistd::mkfifo(&d.join("fifo.img"), nix::sys::stat::Mode::from_bits_truncate(0o600)); }), Some("FIFO")),
        ("device node", Box::new(|d: &Path| {
            let _ = nix::sys::stat::mknod(&d.join("zero.img"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o666), nix::sys::stat::makedev(1, 5));
        }), Some("character device")),
        ("socket", Box::new(|d: &Path| { std::mem::forget(std::os::unix::net::UnixListener::bind(d.join("sock.img"))); }), Some("socket")),
        ("sparse 10 GiB file", Box::new({ let s = sparse.clone(); move |d: &Path| { let _ = std::fs::rename(s.join("pages-99.img"), d.join("pages-99.img")); } }), Some("10737418240 bytes")),
        ("files until the share is full", Box::new({ let m = many.clone(); move |d: &Path| { let _ = std::fs::rename(&m, d.join("many")); } }), Some("entries exceed the limit")),
        ("100-deep tree", Box::new({ let dp = deep.clone(); move |d: &Path| { let _ = std::fs::rename(&dp, d.join("deep")); } }), Some("directory levels exceed")),
        ("dot-dot-looking names", Box::new(|d: &Path| {
            for name in ["...", "..\u{2215}secret", "..\n", " ..", "..%2f..%2fsecret"] {
                std::fs::write(d.join(name), b"odd").unwrap();
            }
        }), None),
    ];
    for (case, attack, want) in cases {
        let (stop, h) = inject_into_staging(shared.clone(), attack);
        let t = target();
        let r = checkpoint(&c, "h1", &t);
        stop.store(true, Ordering::Relaxed);
        let attacked = h.join().unwrap();
        assert!(attacked >= 1, "{case}: the staging directory was never seen");
        match (want, r) {
            (Some(w), Err(e)) => {
                assert!(e.contains(w), "{case}: error does not say {w:?}: {e}");
                assert!(e.contains("CRIU log"), "{case}: the error names the CRIU log: {e}");
                assert_eq!(std::fs::read_dir(&t).unwrap().count(), 0, "{case}: a refused checkpoint leaves no partial image");
            }
            (Some(w), Ok(())) => panic!("{case}: the checkpoint succeeded; expected a refusal saying {w:?}"),
            (None, r) => {
                r.unwrap_or_else(|e| panic!("{case}: {e}"));
                let names: Vec<_> = std::fs::read_dir(&t).unwrap().map(|e| e.unwrap().file_name()).collect();
                assert!(names.iter().any(|n| n == "..\u{2215}secret") && names.iter().any(|n| n == "..\n"), "{case}: odd names copied as plain names: {names:?}");
                assert_eq!(std::fs::read_dir(&targets).unwrap().count() as u32, made_targets.get(), "{case}: nothing written beside the target");
            }
        }
        canary.assert_intact(case);
        canary.assert_absent_below(&t, case);
        eprintln!("hostile case {case:?}: ok");
    }
    assert!(!targets.join("secret").exists() && !c.dir.join("secret").exists());

    // 4. Staging directories swapped for symlinks to the canary, in a loop, through whole checkpoints.
    for round in 0..4 {
        let (stop, h) = race_swaps(shared.clone(), canary.dir.clone());
        let t = target();
        let r = checkpoint(&c, "h1", &t);
        stop.store(true, Ordering::Relaxed);
        let swaps = h.join().unwrap();
        eprintln!("race round {round}: {swaps} swaps, checkpoint: {r:?}");
        assert!(swaps > 0, "the race never swapped anything");
        if let Err(e) = &r {
            // The guest may also move the staging directory away between the host's mkdir and its open.
            assert!(e.contains("refusing") || e.contains("symlink") || e.contains("staging directory") || e.contains("CRIU"), "round {round}: unclear error: {e}");
            assert_eq!(std::fs::read_dir(&t).unwrap().count(), 0, "round {round}: partial image left");
        }
        canary.assert_intact(&format!("race round {round}"));
        canary.assert_absent_below(&t, &format!("race round {round}"));
    }

    // 5. Through containerd into its content store, with the race running: no canary content there.
    let (stop, h) = race_swaps(shared.clone(), canary.dir.clone());
    let o = c.ctr(&["containers", "checkpoint", "--task", "--image", "h1", "kata-rs-test/hostile:1"]);
    stop.store(true, Ordering::Relaxed);
    eprintln!("ctr checkpoint with the race: {} swaps, {:?}", h.join().unwrap(), String::from_utf8_lossy(&o.stderr));
    canary.assert_intact("ctr checkpoint under the race");
    for blob in c.content_blobs() {
        let data = std::fs::read(&blob).unwrap();
        assert!(!contains(&data, canary.token.as_bytes()), "content blob {} holds canary content", blob.display());
    }

    // 6. The shim still serves: a clean checkpoint into the content store, then a restore into a new VM
    //    whose guest has made `.restore-images` a symlink to the canary before the host stages images.
    let _ = std::fs::remove_dir_all(shared.join(".checkpoints"));
    for e in std::fs::read_dir(&shared).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(".moved-") || e.file_name() == ".aside" {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    // containerd 1.6 leaves the spec out of a second checkpoint image whose spec blob already exists
    // (restore then fails with "media type not found"): drop the first image and its blobs.
    if o.status.success() {
        c.ctr_ok(&["images", "rm", "--sync", "kata-rs-test/hostile:1"]);
    }
    c.ctr_ok(&["containers", "checkpoint", "--task", "--image", "h1", "kata-rs-test/clean:1"]);
    let shared2 = c.dir.join("kr/h2/shared");
    let can = canary.dir.clone();
    let guest = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().contains(&format!("{} ", shared2.display()));
            if mounted && std::os::unix::fs::symlink(&can, shared2.join(".restore-images-h2")).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    });
    let o = c.ctr(&["containers", "restore", "--live", "h2", "kata-rs-test/clean:1"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(guest.join().unwrap(), "the test could not act as the guest of h2 (ctr: {e})");
    assert!(!o.status.success(), "restore through a guest-made symlink must fail");
    assert!(e.contains(".restore-images-h2") && e.contains("already exists"), "{e}");
    canary.assert_intact("symlinked .restore-images");
    if c.task_status("h2").is_some() {
        c.ctr(&["task", "rm", "-f", "h2"]);
    }
    c.ctr_ok(&["container", "rm", "h2"]);
    assert_eq!(c.task_status("h1").as_deref(), Some("RUNNING"));
    let n = kata_rs_tests::read_counter(&c.rootfs("h1").join("count"));
    wait_counter(&c.rootfs("h1").join("count"), n + 3, T).await;
    c.kill_and_remove("h1");
    c.assert_clean();
    canary.assert_intact("end");
}

/// The task pid containerd sees is QEMU's, never a number the guest chose; ps shows QEMU and virtiofsd
/// in their sandboxes. QEMU and every daemon (virtiofsd's sandboxed child too) run in one host cgroup,
/// the spec's, whose memory limit covers guest memory, the shared tmpfs and the daemons, and the
/// memory the guest touches is charged there; it goes with the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_pid_is_qemu_and_helpers_run_sandboxed() {
    let c = Containerd::start();
    // memhog: 128 MiB of guest memory touched after boot, then a counter in /count.
    c.run_detached("p1", &[], &["/bin/memhog", "128"]);
    wait_counter(&c.rootfs("p1").join("count"), 2, T).await;
    let ls = c.ctr_ok(&["task", "ls"]);
    let pid: u32 = ls.lines().find(|l| l.starts_with("p1 ")).and_then(|l| l.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{ls}"));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.to_string_lossy().contains("qemu-system"), "task pid {pid} is {}", exe.display());
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).unwrap().replace('\0', " ");
    assert!(cmdline.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"), "{cmdline}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(field(&status, "Seccomp"), "2", "QEMU runs with a seccomp filter: {status}");
    // Root, with CAP_NET_ADMIN (taps) as its only capability, bounding set included: no exec or file
    // capability can give it another.
    for set in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(u64::from_str_radix(&field(&status, set), 16).unwrap(), 1 << 12, "QEMU's {set}: {status}");
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(u64::from_str_radix(&field(&status, set), 16).unwrap(), 0, "QEMU's {set}: {status}");
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    // An exec's pid is QEMU's too.
    c.ctr_ok(&["task", "exec", "-d", "--exec-id", "e1", "p1", "sleep", "30"]);
    let ps = c.ctr_ok(&["task", "ps", "p1"]);
    assert!(ps.lines().skip(1).all(|l| l.split_whitespace().next() == Some(&pid.to_string())), "ps lists only QEMU's pid: {ps}");
    let vfs: Vec<_> = kata_rs_tests::processes_mentioning(&c.dir.join("kr/p1").display().to_string()).into_iter().filter(|(_, cmd)| cmd.contains("virtiofsd")).collect();
    assert!(!vfs.is_empty(), "no virtiofsd for p1");
    for (vpid, cmd) in &vfs {
        assert!(!cmd.contains("sandbox=none"), "{cmd}");
        assert!(cmd.contains("sandbox=namespace"), "{cmd}");
        // In its own mount namespace (the namespace sandbox), not the host's.
        let theirs = std::fs::read_link(format!("/proc/{vpid}/ns/mnt")).ok();
        let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
        if theirs.is_some() {
            assert_ne!(theirs, ours, "virtiofsd {vpid} shares the host's mount namespace");
        }
    }
    // Host accounting.
    let cg = kata_rs_tests::memory_cgroup(pid);
    assert_eq!(cg.strip_prefix("/sys/fs/cgroup/memory"), Ok(Path::new(&format!("{}/p1", c.namespace))), "QEMU's memory cgroup is the spec's");
    let daemons: Vec<_> = kata_rs_tests::processes_mentioning(&c.dir.join("kr/p1").display().to_string()).into_iter().filter(|(p, _)| *p != pid).collect();
    assert!(daemons.iter().filter(|(_, cmd)| cmd.contains("virtiofsd")).count() >= 2, "virtiofsd and its sandboxed child: {daemons:?}");
    assert!(daemons.iter().any(|(_, cmd)| cmd.contains("vhost-device-vsock")), "{daemons:?}");
    // vhost-device-vsock runs as the VM's user too; the socket the host dials for the agent is in a
    // directory that user cannot change.
    let (vpid, _) = daemons.iter().find(|(_, cmd)| cmd.contains("vhost-device-vsock")).unwrap();
    let vpid = *vpid;
    let uid = own_user(&std::fs::read_to_string(format!("/proc/{vpid}/status")).unwrap(), "vhost-device-vsock");
    let socks = std::fs::metadata(c.dir.join("kr/p1/vs")).unwrap();
    assert_eq!((socks.uid(), socks.mode() & 0o7777), (0, 0o755), "the socket directory is root's again");
    assert_eq!(std::fs::metadata(c.dir.join("kr/p1/vs/agent.sock")).unwrap().uid(), uid);
    // virtiofsd (root, in its namespace sandbox) serves the guest without mknod and setfcap.
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let served: Vec<_> = daemons.iter().filter(|(p, cmd)| cmd.contains("virtiofsd") && std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap() != ours).collect();
    assert!(!served.is_empty(), "virtiofsd's sandboxed process: {daemons:?}");
    for (p, _) in served {
        let caps = u64::from_str_radix(&field(&std::fs::read_to_string(format!("/proc/{p}/status")).unwrap(), "CapEff"), 16).unwrap();
        assert_eq!(caps & (1 << 27 | 1 << 31), 0, "virtiofsd {p} keeps CAP_MKNOD or CAP_SETFCAP: {caps:x}");
    }
    // A second VM's vhost-device-vsock gets another uid; acting as the first one (its uid, no
    // capability), a process can neither signal the second nor write a root-owned host file.
    c.run_detached("p2", &[], &["sleep", "100000"]);
    let (pid2, _) = kata_rs_tests::processes_mentioning(&c.dir.join("kr/p2").display().to_string()).into_iter().find(|(_, cmd)| cmd.contains("vhost-device-vsock")).unwrap();
    let uid2 = own_user(&std::fs::read_to_string(format!("/proc/{pid2}/status")).unwrap(), "the second vhost-device-vsock");
    assert_ne!(uid, uid2, "two VMs, one uid");
    let canary = c.dir.join("root-canary");
    std::fs::write(&canary, "root's\n").unwrap();
    let as_qemu = |script: &str| {
        std::process::Command::new("setpriv")
            .args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups", "--inh-caps=-all", "sh", "-c", script])
            .output()
            .unwrap()
    };
    let o = as_qemu(&format!("kill -0 {pid2}"));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).to_lowercase().contains("not permitted"), "{o:?}");
    let o = as_qemu(&format!("kill -0 {vpid}"));
    assert!(o.status.success(), "the check itself works: the first daemon is its own uid's: {o:?}");
    let o = as_qemu(&format!("echo mine >> {}", canary.display()));
    assert!(!o.status.success(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "root's\n");
    c.kill_and_remove("p2");
    for (dpid, cmd) in &daemons {
        assert_eq!(kata_rs_tests::memory_cgroup(*dpid), cg, "{dpid} {cmd} is in the VM's host cgroup");
    }
    let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap().trim().parse::<u64>().unwrap();
    let mem = test_config().hypervisor.memory_mib as u64;
    assert_eq!(read("memory.limit_in_bytes"), kata_rs_shim::cgroups::vm_memory_limit(mem, kata_rs_shim::sandbox::shared_dir_bytes(mem)));
    let usage = read("memory.usage_in_bytes");
    assert!(usage >= 128 << 20, "the guest's memhog pages are charged to the VM's cgroup: {usage} bytes");
    c.kill_and_remove("p1");
    c.assert_clean();
    assert!(!cg.exists(), "{} is removed with the VM; its processes: {:?}", cg.display(), std::fs::read_to_string(cg.join("cgroup.procs")).map(|p| p.lines().map(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ")).collect::<Vec<_>>()));
}

/// A guest that answers every stats request with the largest numbers (test fault `absurd-stats`): what
/// containerd reports is bounded by the host's own measure of the VM, its host cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_lies_about_its_stats_gets_figures_bounded_by_the_hosts() {
    let c = Containerd::start_with("kernel_params = \"kata_rs.test_fault=absurd-stats:0\"");
    c.run_detached("s1", &[], &["sleep", "100000"]);
    let ls = c.ctr_ok(&["task", "ls"]);
    let pid: u32 = ls.lines().find(|l| l.starts_with("s1 ")).and_then(|l| l.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{ls}"));
    let m = c.ctr_ok(&["task", "metrics", "s1"]);
    let get = |k: &str| -> u64 {
        m.lines().find(|l| l.split_whitespace().next() == Some(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {k}: {m}"))
    };
    // Read after the shim read them: the high-water mark and the CPU time only grow.
    let mem = kata_rs_tests::memory_cgroup(pid);
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap().trim().parse::<u64>().unwrap();
    let cpu = cgroup_dir(pid, "cpuacct");
    let (host_max, host_limit, host_cpu_usec) = (read(&mem, "memory.max_usage_in_bytes"), read(&mem, "memory.limit_in_bytes"), read(&cpu, "cpuacct.usage") / 1000);
    assert!(get("memory.usage") > 0 && get("memory.usage") <= host_max, "the VM's memory, at most: {host_max}\n{m}");
    assert_eq!(get("memory.usage_limit"), host_limit, "{m}");
    assert!(get("memory.swap_usage") <= get("memory.usage"), "{m}");
    assert!(get("cpu.usage_usec") > 0 && get("cpu.usage_usec") <= host_cpu_usec, "the VM's CPU time, at most: {host_cpu_usec}\n{m}");
    assert!(get("cpu.user_usec") <= get("cpu.usage_usec") && get("cpu.system_usec") <= get("cpu.usage_usec"), "{m}");
    assert_eq!(get("pids.current"), kata_rs_shim::metrics::PIDS_MAX, "{m}");
    c.kill_and_remove("s1");
    c.assert_clean();
}

/// The cgroup v1 directory of a process in the hierarchy with `controller`.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (names, rel) = s
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, rel) = (parts.next()?, parts.next()?, parts.next()?);
            names.split(',').any(|n| n == controller).then(|| (names.to_string(), rel.to_string()))
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup for {pid}: {s}"));
    // Mounted at the hierarchy's names (`cpu,cpuacct`) or, where each controller has its own, its name.
    let root = [names.as_str(), controller].iter().map(|n| Path::new("/sys/fs/cgroup").join(n)).find(|p| p.is_dir()).unwrap();
    root.join(rel.trim_start_matches('/'))
}

/// A field of /proc/<pid>/status.
fn field(status: &str, name: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(|v| v.trim().to_string()).unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// The process runs as a uid of its own VM's (the configured range, the same for every id, gid the
/// same number), with no capability, no supplementary group and no_new_privs; returns that uid.
fn own_user(status: &str, what: &str) -> u32 {
    let ids: Vec<u32> = field(status, "Uid").split_whitespace().map(|v| v.parse().unwrap()).collect();
    let uid = ids[0];
    let base = test_config().hypervisor.host_id_base;
    assert!(uid >= base && uid - base < test_config().hypervisor.host_id_count, "{what} runs as uid {uid}: {status}");
    assert_eq!(ids, [uid; 4], "{what}: real, effective, saved and filesystem uid");
    assert_eq!(field(status, "Gid").split_whitespace().map(|v| v.parse().unwrap()).collect::<Vec<u32>>(), [uid; 4], "{what}: gids");
    assert_eq!(field(status, "Groups"), "", "{what}: no supplementary group");
    for cap in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(u64::from_str_radix(&field(status, cap), 16).unwrap(), 0, "{what}: {cap}");
    }
    assert_eq!(field(status, "NoNewPrivs"), "1", "{what}");
    uid
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap()
}

/// A guest that prints without end on its console: the host keeps a bounded ring and two capped files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_costs_the_host_bounded_memory_and_disk() {
    let mut cfg = test_config();
    cfg.hypervisor.console_log_max_kib = 64;
    let sb = boot_with(cfg, "flood").await;
    let (_, guest_rootfs) = kata_rs_tests::prepare_rootfs(&sb, "f1");
    // A container given the guest's serial port prints binary junk (with escapes) to it, forever.
    let mut spec: serde_json::Value = serde_json::from_slice(&oci_spec(&["sh", "-c", "while :; do cat /bin/busybox > /dev/ttyS0; done"])).unwrap();
    spec["linux"]["devices"] = serde_json::json!([{"path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64, "fileMode": 438, "uid": 0, "gid": 0}]);
    spec["linux"]["resources"] = serde_json::json!({"devices": [{"allow": true, "type": "c", "major": 4, "minor": 64, "access": "rwm"}]});
    let req = agent_client::agent::CreateContainerRequest { container_id: "f1".into(), oci_spec: serde_json::to_vec(&spec).unwrap(), rootfs: guest_rootfs, ..Default::default() };
    sb.agent.call_default("CreateContainer", |c, ctx| async move { c.create_container(ctx, &req).await }).await.unwrap();
    let rss0 = rss_kib();
    let seen0 = sb.vm.console_bytes_seen();
    let req = agent_client::agent::ContainerRequest { container_id: "f1".into(), ..Default::default() };
    sb.agent.call_default("StartContainer", |c, ctx| async move { c.start_container(ctx, &req).await }).await.unwrap();
    let start = Instant::now();
    let want = 8u64 << 20;
    while sb.vm.console_bytes_seen() - seen0 < want && start.elapsed() < Duration::from_secs(240) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seen = sb.vm.console_bytes_seen() - seen0;
    let secs = start.elapsed().as_secs_f64();
    eprintln!("console flood: {seen} bytes in {secs:.1} s");
    assert!(seen >= want, "the guest printed only {seen} bytes in {secs:.0} s");
    let mut on_disk = 0;
    for e in std::fs::read_dir(&sb.dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("console") && name != "console.sock" {
            let len = e.metadata().unwrap().len();
            assert!(len <= 64 * 1024, "{name} is {len} bytes");
            on_disk += len;
        }
    }
    assert!(on_disk <= 128 * 1024, "console files hold {on_disk} bytes");
    let grew = rss_kib().saturating_sub(rss0);
    assert!(grew < 32 * 1024, "the host side grew by {grew} KiB while {seen} bytes were printed");
    let tail = sb.vm.console_tail(usize::MAX);
    assert!(tail.len() <= 4 * vmm::console::RING_BYTES && !tail.contains('\u{1b}'), "the tail is bounded and escaped");
    // The agent still answers.
    sb.agent.call_default("Check", |c, ctx| async move { c.check(ctx, &agent_client::agent::CheckRequest::new()).await }).await.unwrap();
    kata_rs_tests::stop_and_assert_clean(sb).await;
}

/// A guest that fills its shared directory (a container whose rootfs is in it writes zeros until it
/// cannot): the write ends with ENOSPC at the tmpfs's size, the pages are charged to the VM's host
/// cgroup, whose limit covers them (no OOM there: QEMU and its daemons live on), and the agent answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_filling_its_shared_directory_is_bounded_by_its_host_cgroup() {
    let mut cfg = test_config();
    // A small guest: its shared directory is 2 × memory + 1 GiB, all of which the guest fills.
    cfg.hypervisor.memory_mib = 256;
    let mem = cfg.hypervisor.memory_mib as u64;
    let shared_bytes = kata_rs_shim::sandbox::shared_dir_bytes(mem);
    let limit = kata_rs_shim::cgroups::vm_memory_limit(mem, shared_bytes);
    kata_rs_tests::init_logging();
    let id = kata_rs_tests::unique_id("fill");
    let mut p = kata_rs_shim::Sandbox::prepare(&cfg, &id).unwrap();
    p.cgroup = Some((format!("/kata-rs-test-fill/{id}"), limit));
    let sb = kata_rs_shim::Sandbox::boot(&cfg, p).await.unwrap_or_else(|e| panic!("sandbox {id}: {e}"));
    let qemu = sb.vm.pids()[0];
    let cg = kata_rs_tests::memory_cgroup(qemu);
    let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap().trim().parse::<u64>().unwrap();
    assert_eq!(read("memory.limit_in_bytes"), limit);
    let st = nix::sys::statvfs::statvfs(&sb.shared_dir).unwrap();
    assert_eq!(st.blocks() as u64 * st.fragment_size() as u64, shared_bytes, "the shared tmpfs's size");
    let (host_rootfs, guest_rootfs) = kata_rs_tests::prepare_rootfs(&sb, "f1");
    // The retry: virtiofsd closes the deleted file (and the tmpfs frees it) only at the guest's
    // asynchronous FUSE release, after `rm` returned.
    let script = "dd if=/dev/zero of=/fill bs=1M 2>/dev/null; rc=$?; s=$(ls -l /fill | awk '{print $5}'); rm -f /fill; until echo \"$rc $s\" > /rc; do sleep 1; done; sleep 100000";
    let req = agent_client::agent::CreateContainerRequest { container_id: "f1".into(), oci_spec: oci_spec(&["sh", "-c", script]), rootfs: guest_rootfs, ..Default::default() };
    sb.agent.call_default("CreateContainer", |c, ctx| async move { c.create_container(ctx, &req).await }).await.unwrap();
    let req = agent_client::agent::ContainerRequest { container_id: "f1".into(), ..Default::default() };
    let start = Instant::now();
    sb.agent.call_default("StartContainer", |c, ctx| async move { c.start_container(ctx, &req).await }).await.unwrap();
    let rc = kata_rs_tests::wait_file(&host_rootfs.join("rc"), Duration::from_secs(300), |s| s.ends_with('\n')).await;
    eprintln!("the guest filled its shared directory in {:.1} s: dd status and bytes: {}", start.elapsed().as_secs_f64(), rc.trim());
    let (code, bytes) = rc.trim().split_once(' ').unwrap_or_else(|| panic!("{rc:?}"));
    assert_ne!(code, "0", "dd ends with an error (ENOSPC)");
    let bytes: u64 = bytes.parse().unwrap();
    assert!(bytes <= shared_bytes && bytes >= shared_bytes - (64 << 20), "{bytes} bytes written of a {shared_bytes}-byte directory");
    let peak = read("memory.max_usage_in_bytes");
    eprintln!("host cgroup: peak {peak} bytes of a {limit}-byte limit, failcnt {}", read("memory.failcnt"));
    assert!(peak >= bytes, "the guest's tmpfs pages are charged to its host cgroup: peak {peak} < {bytes}");
    let oom = std::fs::read_to_string(cg.join("memory.oom_control")).unwrap();
    assert!(oom.lines().any(|l| l == "oom_kill 0"), "nothing in the VM's cgroup was OOM-killed: {oom}");
    assert!(sb.vm.pids().iter().all(|p| Path::new(&format!("/proc/{p}")).exists()), "QEMU and its daemons live on");
    sb.agent.call_default("Check", |c, ctx| async move { c.check(ctx, &agent_client::agent::CheckRequest::new()).await }).await.unwrap();
    kata_rs_tests::stop_and_assert_clean(sb).await;
    assert!(!cg.exists(), "{} is removed with the VM", cg.display());
}

/// A status field in KiB (`RssAnon:`, `VmRSS:`) of process `pid`.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{field} of {pid}"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// A guest flooding the host's vsock: connects to CID 2 on port after port, 256 in flight, without end
/// (the agent's `vsock-flood` test fault, what any guest process could do). vhost-device-vsock's own
/// memory and descriptors stay flat, the host side's too, the agent channel keeps answering, and the VM
/// stops clean. `attempts` counts the guest's connect calls: a probe that read SO_ERROR before each close
/// saw none of them answered (neither refused nor reset) by vhost-device-vsock 0.3.0, so what reached
/// the daemon is not measured here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vsock_flood_from_the_guest_costs_the_host_bounded_memory_and_descriptors() {
    let mut cfg = test_config();
    cfg.hypervisor.kernel_params = format!("{} kata_rs.test_fault=vsock-flood:0", cfg.hypervisor.kernel_params).trim().to_string();
    let sb = boot_with(cfg, "vflood").await;
    let vpid = *sb
        .vm
        .pids()
        .iter()
        .find(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("vhost-device-vsock")))
        .expect("vhost-device-vsock runs");
    let attempts = |sb: &kata_rs_shim::Sandbox| -> u64 {
        let tail = sb.vm.console_tail(usize::MAX);
        tail.rsplit("KATA_RS_VSOCK_FLOOD attempts=").next().filter(|_| tail.contains("KATA_RS_VSOCK_FLOOD")).and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let check = |sb: &kata_rs_shim::Sandbox| {
        let agent = sb.agent.clone();
        async move { agent.call_default("Check", |c, ctx| async move { c.check(ctx, &agent_client::agent::CheckRequest::new()).await }).await }
    };
    let start = Instant::now();
    while attempts(&sb) < 2_000 {
        assert!(start.elapsed() < Duration::from_secs(120), "the flood did not start: {}", sb.vm.console_tail(2000));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (a0, anon0, fds0, me0, myfds0) = (attempts(&sb), status_kib(vpid, "RssAnon:"), open_fds(vpid), rss_kib(), open_fds(std::process::id()));
    // 50,000 connections more (about 200 times those in flight), and ten Checks answered meanwhile.
    let mut answered = 0;
    while attempts(&sb) < a0 + 50_000 || answered < 10 {
        assert!(start.elapsed() < Duration::from_secs(400), "the flood went from {a0} to {} attempts", attempts(&sb));
        check(&sb).await.unwrap_or_else(|e| panic!("the agent channel stops answering under the flood: {e}"));
        answered += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (a1, anon1, fds1, me1, myfds1) = (attempts(&sb), status_kib(vpid, "RssAnon:"), open_fds(vpid), rss_kib(), open_fds(std::process::id()));
    eprintln!(
        "vsock flood: {} connects in {:.0} s; vhost-device-vsock anonymous RSS {anon0} -> {anon1} KiB, fds {fds0} -> {fds1}; host side RSS {me0} -> {me1} KiB, fds {myfds0} -> {myfds1}",
        a1 - a0,
        start.elapsed().as_secs_f64()
    );
    assert!(anon1 <= anon0 + 16 * 1024, "vhost-device-vsock grew from {anon0} to {anon1} KiB under the flood");
    assert!(fds1 <= fds0 + 16, "vhost-device-vsock's descriptors went from {fds0} to {fds1}");
    assert!(me1 <= me0 + 32 * 1024 && myfds1 <= myfds0 + 16, "the host side grew: RSS {me0} -> {me1} KiB, fds {myfds0} -> {myfds1}");
    kata_rs_tests::stop_and_assert_clean(sb).await;
}
