//! Shared helpers for the integration tests, the benchmark and the demo: a configuration pointing at
//! this checkout's guest image, a busybox rootfs in the sandbox's shared directory, OCI specs, stdio.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_client::{agent::*, AgentClient, AgentError};
use kata_rs_shim::{Config, Sandbox};

pub mod containerd;
pub mod cri;
pub mod load;
pub mod netns;
pub mod virtiofsd;

/// The guest image directory: `$KATA_RS_GUEST_DIR`, else `build/guest/bookworm` of this checkout.
pub fn guest_dir() -> PathBuf {
    let d = std::env::var_os("KATA_RS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest/bookworm"));
    assert!(
        d.join("vmlinux").is_file() && d.join("initramfs.cpio").is_file(),
        "no guest image in {}: run 'make guest-image' (or 'make test', which builds it)",
        d.display()
    );
    d
}

/// The cgroup v1 memory-controller directory of a process (this machine kind mounts cgroup v1 there).
pub fn memory_cgroup(pid: u32) -> PathBuf {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = s.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string())).unwrap_or_else(|| panic!("no memory cgroup for {pid}: {s}"));
    Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'))
}

/// A configuration for tests: this checkout's guest image, a private runtime root.
pub fn test_config() -> Config {
    let g = guest_dir();
    let mut c = Config::default();
    c.hypervisor.kernel = g.join("vmlinux");
    c.hypervisor.initrd = g.join("initramfs.cpio");
    c.hypervisor.memory_mib = 1024;
    // One vCPU: under TCG on this 2-core machine kind it was faster than two for create, checkpoint
    // and restore (`make lockup-ab`; earlier soft lockups with two are not reproduced: docs/architecture.md).
    c.hypervisor.vcpus = 1;
    // Experiments only (`make lockup-ab`): other vCPU counts, TCG threading and guest kernel parameters.
    if let Some(n) = std::env::var("KATA_RS_TEST_VCPUS").ok().and_then(|v| v.parse().ok()) {
        c.hypervisor.vcpus = n;
    }
    if let Ok(t) = std::env::var("KATA_RS_TEST_TCG_THREAD") {
        c.hypervisor.tcg_thread = t;
    }
    if let Ok(p) = std::env::var("KATA_RS_TEST_KERNEL_PARAMS") {
        c.hypervisor.kernel_params = p;
    }
    c.runtime.root = PathBuf::from("/run/kata-rs-test");
    if let Ok(level) = std::env::var("KATA_RS_AGENT_LOG") {
        c.agent.log_level = level;
    }
    c
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(std::env::var("KATA_RS_LOG").unwrap_or_else(|_| "warn".into())).unwrap())
        .with_test_writer()
        .try_init();
}

/// A sandbox id unique to this process and call (in a test isolated by [`netns::isolated`], whose pid
/// is 1 in its PID namespace, unique to that run).
pub fn unique_id(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = netns::run_tag().unwrap_or_else(|| std::process::id().to_string());
    format!("{prefix}-{run}-{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
}

pub async fn boot(prefix: &str) -> Sandbox {
    boot_with(test_config(), prefix).await
}

pub async fn boot_with(config: Config, prefix: &str) -> Sandbox {
    init_logging();
    let id = unique_id(prefix);
    match Sandbox::start(&config, &id).await {
        Ok(s) => s,
        Err(e) => panic!("sandbox {id} did not start: {e}"),
    }
}

/// Copies the busybox test rootfs into the sandbox's shared directory for container `cid`.
/// Returns (host path, guest path) of the rootfs.
pub fn prepare_rootfs(sb: &Sandbox, cid: &str) -> (PathBuf, String) {
    let host = sb.shared_dir.join(cid).join("rootfs");
    std::fs::create_dir_all(host.parent().unwrap()).unwrap();
    let st = std::process::Command::new("cp").arg("-a").arg(guest_dir().join("test-rootfs")).arg(&host).status().unwrap();
    assert!(st.success(), "copying the test rootfs");
    (host, format!("/run/kata-rs/shared/{cid}/rootfs"))
}

/// A minimal OCI runtime spec (like `runc spec`, without a terminal) running `args`.
pub fn oci_spec(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "ctr",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    }))
    .unwrap()
}

/// An OCI process object for exec.
pub fn oci_process(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin:/usr/bin"],
        "cwd": "/"
    }))
    .unwrap()
}

/// Creates and starts container `cid` running `args` in `sb`. Returns the host rootfs path.
pub async fn run_container(sb: &Sandbox, cid: &str, args: &[&str]) -> PathBuf {
    let (host, guest) = prepare_rootfs(sb, cid);
    let req = CreateContainerRequest { container_id: cid.into(), oci_spec: oci_spec(args), rootfs: guest, ..Default::default() };
    sb.agent.call_default("CreateContainer", |c, ctx| async move { c.create_container(ctx, &req).await }).await.unwrap();
    let req = ContainerRequest { container_id: cid.into(), ..Default::default() };
    sb.agent.call_default("StartContainer", |c, ctx| async move { c.start_container(ctx, &req).await }).await.unwrap();
    host
}

/// Reads stdout (or stderr) of a process to its end.
pub async fn read_to_end(agent: &AgentClient, cid: &str, exec_id: &str, stderr: bool, limit: Duration) -> Result<Vec<u8>, AgentError> {
    let start = Instant::now();
    let mut out = Vec::new();
    loop {
        let left = limit.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
        let req = ReadStreamRequest { container_id: cid.into(), exec_id: exec_id.into(), max_len: 256 * 1024, ..Default::default() };
        let r = if stderr {
            agent.call("ReadStderr", left, |c, ctx| async move { c.read_stderr(ctx, &req).await }).await?
        } else {
            agent.call("ReadStdout", left, |c, ctx| async move { c.read_stdout(ctx, &req).await }).await?
        };
        if r.eof {
            return Ok(out);
        }
        out.extend_from_slice(&r.data);
    }
}

pub async fn wait_process(agent: &AgentClient, cid: &str, exec_id: &str, limit: Duration) -> i32 {
    let req = ProcessRequest { container_id: cid.into(), exec_id: exec_id.into(), ..Default::default() };
    agent.call("WaitProcess", limit, |c, ctx| async move { c.wait_process(ctx, &req).await }).await.unwrap().exit_status
}

/// Reads an integer counter file, retrying while it does not exist yet. Counters are written to a new file
/// and renamed into place: a rewrite in place (truncate, then write) that a kill, a freeze or a dump cuts
/// between the two leaves the file empty for good (CI saw it: workloads, after a kill).
pub fn read_counter(path: &Path) -> u64 {
    for _ in 0..50 {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(n) = s.trim().parse() {
                return n;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no counter value in {}", path.display())
}

/// Waits until `path` holds a counter value of at least `min`.
pub async fn wait_counter(path: &Path, min: u64, limit: Duration) -> u64 {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(n) = s.trim().parse::<u64>() {
                if n >= min {
                    return n;
                }
            }
        }
        assert!(start.elapsed() < limit, "counter in {} did not reach {min} within {limit:?}", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `path` exists with content that satisfies `ok`; returns the content.
pub async fn wait_file(path: &Path, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if ok(&s) {
                return s;
            }
        }
        assert!(start.elapsed() < limit, "{} did not appear (or not as expected) within {limit:?}", path.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tar entries (name, offset of the data, size) of an uncompressed tar file, PAX headers skipped.
pub fn tar_entries(data: &[u8]) -> Vec<(String, usize, usize)> {
    let mut out = vec![];
    let mut off = 0;
    while off + 512 <= data.len() {
        let h = &data[off..off + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let name = String::from_utf8_lossy(&h[..100]).trim_end_matches('\0').to_string();
        let size_field = String::from_utf8_lossy(&h[124..136]).trim_matches(|c: char| c == '\0' || c == ' ').to_string();
        let Ok(size) = usize::from_str_radix(&size_field, 8) else { break };
        if !matches!(h[156], b'x' | b'g') {
            out.push((name, off + 512, size));
        }
        off += 512 + size.div_ceil(512) * 512;
    }
    out
}

/// Panics if any of `pids` still exists (as a live process, not even a zombie).
pub fn assert_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &pid in pids {
        while Path::new(&format!("/proc/{pid}")).exists() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(Instant::now() < deadline, "process {pid} still exists after teardown: {stat}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Processes whose command line mentions `needle` (e.g. a sandbox directory).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push((pid, cmd));
        }
    }
    found
}

/// Stops the sandbox and asserts that no QEMU, virtiofsd or vhost-device-vsock of it remains.
pub async fn stop_and_assert_clean(sb: Sandbox) {
    let pids = sb.vm.pids();
    assert!(pids.len() >= 2, "expected QEMU and at least one helper daemon, got {pids:?}");
    let dir = sb.dir.display().to_string();
    sb.stop(None).await;
    assert_gone(&pids);
    let left = processes_mentioning(&dir);
    assert!(left.is_empty(), "processes of {dir} left behind: {left:?}");
    assert!(!Path::new(&dir).exists(), "sandbox directory {dir} left behind");
}
