//! Kubernetes pods through containerd 2.x's CRI plugin (the kubelet's API), with real VMs: one VM per
//! pod (its sandbox container boots it, the pod's containers join it), CNI from Debian's plugins, and
//! CRI's CheckpointContainer and restore from the archive into a new pod. Each test runs in its own
//! network, PID and mount namespaces (kata_rs_tests::netns), with its own containerd.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kata_rs_tests::{
    containerd::*,
    cri::{ContainerSpec, ContainerState, Cri, PodSpec},
    netns::*,
};

const T: Duration = Duration::from_secs(120);

const WEB: &str = "mkdir -p /www && echo kata-rs-pod > /www/index.html && echo web-started && exec httpd -f -p 80 -h /www";
// The count is renamed into place: a reader never sees the file between its truncation and its write.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; busybox mv /tmp/count.new /tmp/count; echo count $i; sleep 1; done";

/// QEMU processes of this containerd's kata-rs runtime root.
fn qemus(c: &Containerd) -> Vec<u32> {
    let root = format!("{}/", c.runtime_root.display());
    kata_rs_tests::processes_mentioning(&root).into_iter().filter(|(_, cmd)| cmd.contains("qemu-system")).map(|(p, _)| p).collect()
}

fn exec_ok(cri: &Cri, id: &str, cmd: &[&str]) -> String {
    let out = cri.exec_sync(id, cmd, 60).unwrap_or_else(|e| panic!("exec {cmd:?} in {id}: {e:#}"));
    assert_eq!(out.exit_code, 0, "exec {cmd:?} in {id}: stdout {:?} stderr {:?}", out.stdout, out.stderr);
    out.stdout.trim().to_string()
}

fn boot_id(cri: &Cri, id: &str) -> String {
    exec_ok(cri, id, &["cat", "/proc/sys/kernel/random/boot_id"])
}

/// A pod of kata-rs (`name`), its log directory under the containerd's directory.
fn run_pod(c: &Containerd, cri: &Cri, name: &str) -> (String, PathBuf) {
    run_pod_with(c, cri, name, |_| {})
}

fn run_pod_with(c: &Containerd, cri: &Cri, name: &str, change: impl FnOnce(&mut PodSpec)) -> (String, PathBuf) {
    let logs = c.dir.join("pod-logs").join(name);
    std::fs::create_dir_all(&logs).unwrap();
    let mut pod = PodSpec::new(name, KATA_HANDLER, &logs);
    change(&mut pod);
    let id = cri.run_pod_sandbox(&pod).unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:#}"));
    (id, logs)
}

/// The `-m` of the QEMU of pod `pod` (MiB).
fn qemu_memory_mib(c: &Containerd, pod: &str) -> u64 {
    let dir = c.runtime_root.join(pod).display().to_string();
    let (_, cmd) = kata_rs_tests::processes_mentioning(&dir).into_iter().find(|(_, cmd)| cmd.contains("qemu-system")).expect("the pod's QEMU");
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let m = args.windows(2).find(|w| w[0] == "-m").map(|w| w[1]).expect("QEMU's -m");
    m.trim_end_matches('M').parse().unwrap_or_else(|e| panic!("-m {m}: {e}"))
}

fn run_container(cri: &Cri, pod: &str, name: &str, script: &str) -> String {
    let id = cri.create_container(pod, &ContainerSpec::new(name, IMAGE, &["sh", "-c", script])).unwrap_or_else(|e| panic!("CreateContainer {name}: {e:#}"));
    cri.start_container(&id).unwrap_or_else(|e| panic!("StartContainer {name}: {e:#}"));
    id
}

fn wait_log(path: &Path, needle: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(start.elapsed() < limit, "{needle:?} not in the CRI log {} after {limit:?}: {text:?}", path.display());
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn remove_pod(cri: &Cri, pod: &str) {
    cri.stop_pod_sandbox(pod).unwrap_or_else(|e| panic!("StopPodSandbox: {e:#}"));
    cri.remove_pod_sandbox(pod).unwrap_or_else(|e| panic!("RemovePodSandbox: {e:#}"));
}

/// The CNI network namespaces containerd made for pods (in this test's private /run/netns).
fn pod_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("cni-")).collect())
        .unwrap_or_default()
}

#[test]
fn a_two_container_pod_runs_in_one_vm() {
    if !isolated("a_two_container_pod_runs_in_one_vm") {
        return;
    }
    let c = Containerd::start_cri();
    let cri = c.cri();
    // The pod's cgroup parent, as the kubelet gives it (cgroupfs): the VM is placed below it on the host.
    let parent = format!("/kata-rs-test-{}", std::process::id());
    let (pod, logs) = run_pod_with(&c, &cri, "web", |p| p.cgroup_parent = Some(parent.clone()));
    let vms = qemus(&c);
    assert_eq!(vms.len(), 1, "the pod's sandbox booted one VM");
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", vms[0])).unwrap();
    let pod_cgroup = format!("{parent}/{pod}");
    assert!(cgroups.lines().any(|l| l.contains(":memory:") && l.ends_with(&pod_cgroup)), "QEMU in the pod's host cgroup {pod_cgroup}: {cgroups}");
    let web = run_container(&cri, &pod, "web", WEB);
    let client = run_container(&cri, &pod, "client", "echo client-started; exec sleep 100000");
    assert_eq!(qemus(&c).len(), 1, "the pod's containers joined its VM: still one QEMU");
    // Both in the same guest kernel, which is not the host's.
    let (b1, b2) = (boot_id(&cri, &web), boot_id(&cri, &client));
    assert_eq!(b1, b2, "both containers see one guest boot id");
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(b1, host_boot.trim(), "the pod runs in a VM, not on the host kernel");
    // The second container reaches the first over localhost (one network namespace), but has its own
    // processes and root filesystem.
    let page = exec_ok(&cri, &client, &["busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:80/"]);
    assert_eq!(page, "kata-rs-pod");
    let ps = exec_ok(&cri, &client, &["busybox", "ps", "-o", "comm"]);
    assert!(!ps.contains("httpd"), "the client has a PID namespace of its own: {ps}");
    let ls = cri.exec_sync(&client, &["ls", "/www"], 30).unwrap();
    assert_ne!(ls.exit_code, 0, "the client has a rootfs of its own");
    // ExecSync's exit code and stderr come back.
    let failed = cri.exec_sync(&web, &["sh", "-c", "echo oops >&2; exit 3"], 30).unwrap();
    assert_eq!((failed.exit_code, failed.stderr.trim()), (3, "oops"));
    // Logs through CRI's log path.
    let web_log = cri.container_status(&web).unwrap().log_path;
    assert!(Path::new(&web_log).starts_with(&logs), "{web_log}");
    let text = wait_log(Path::new(&web_log), "web-started", T);
    assert!(text.lines().any(|l| l.contains(" stdout F web-started")), "CRI log format: {text:?}");
    // The same calls by hand: the kata-rs-cri CLI.
    let cli = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kata-rs-cri")).arg("--address").arg(&c.address).args(args).output().unwrap();
        assert!(o.status.success(), "kata-rs-cri {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let ps = cli(&["ps", &pod]);
    assert!(ps.contains(&web) && ps.contains(&client), "kata-rs-cri ps: {ps}");
    assert_eq!(cli(&["exec", &client, "--", "echo", "via-cli"]).trim(), "via-cli");
    assert!(cli(&["logs", &web]).contains("web-started"));
    // The pod's address (CNI, in the namespace QEMU runs in) answers from the host.
    let info = cri.pod_status(&pod).unwrap();
    assert!(info.ip.starts_with("10.77.0."), "pod IP {info:?}");
    assert!(http_get(&format!("{}:80", info.ip), T).contains("kata-rs-pod"));
    assert_eq!(pod_netns().len(), 1);
    // Removing the pod leaves no process, mount, netns or directory.
    remove_pod(&cri, &pod);
    assert!(qemus(&c).is_empty(), "the pod's VM stopped");
    let memcg = Path::new("/sys/fs/cgroup/memory").join(parent.trim_start_matches('/'));
    assert!(!memcg.exists(), "the pod's host cgroup (and the parent the shim made) went: {}", memcg.display());
    assert!(pod_netns().is_empty(), "the pod's netns went: {:?}", pod_netns());
    c.assert_clean();
}

#[test]
fn two_pods_run_in_two_vms_isolated_from_each_other() {
    if !isolated("two_pods_run_in_two_vms_isolated_from_each_other") {
        return;
    }
    let c = Containerd::start_cri();
    let cri = c.cri();
    let (p1, _) = run_pod(&c, &cri, "one");
    // The second pod has a memory limit: its VM is the configured size plus the limit.
    let (p2, _) = run_pod_with(&c, &cri, "two", |p| p.memory_limit_bytes = Some(256 << 20));
    let base = kata_rs_tests::test_config().hypervisor.memory_mib as u64;
    assert_eq!((qemu_memory_mib(&c, &p1), qemu_memory_mib(&c, &p2)), (base, base + 256), "pod VM sizes: the base, and the base plus the pod's limit");
    let a = run_container(&cri, &p1, "a", "exec sleep 4141");
    let b = run_container(&cri, &p2, "b", "exec sleep 4242");
    assert_eq!(qemus(&c).len(), 2, "one VM per pod");
    assert_ne!(boot_id(&cri, &a), boot_id(&cri, &b), "two guest kernels");
    // Each pod's processes are out of the other's sight, even with every process of its VM listed
    // (a privileged look from the guest's own root namespace is not available to a container; the
    // container's view must not show the other pod).
    let seen_from_a = exec_ok(&cri, &a, &["busybox", "ps", "-o", "args"]);
    assert!(seen_from_a.contains("4141") && !seen_from_a.contains("4242"), "{seen_from_a}");
    let seen_from_b = exec_ok(&cri, &b, &["busybox", "ps", "-o", "args"]);
    assert!(seen_from_b.contains("4242") && !seen_from_b.contains("4141"), "{seen_from_b}");
    // Removing one pod leaves the other running.
    remove_pod(&cri, &p1);
    assert_eq!(qemus(&c).len(), 1);
    assert_eq!(exec_ok(&cri, &b, &["echo", "still-here"]), "still-here");
    remove_pod(&cri, &p2);
    c.assert_clean();
}

fn read_count(cri: &Cri, id: &str) -> u64 {
    exec_ok(cri, id, &["cat", "/tmp/count"]).parse().unwrap_or_else(|e| panic!("counter of {id}: {e}"))
}

fn wait_count(cri: &Cri, id: &str, min: u64) -> u64 {
    let start = Instant::now();
    loop {
        let n = read_count(cri, id);
        if n >= min {
            return n;
        }
        assert!(start.elapsed() < T, "counter of {id} stuck at {n}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn ctr_checkpoints_a_pod_container_and_restores_it_into_the_running_pod() {
    if !isolated("ctr_checkpoints_a_pod_container_and_restores_it_into_the_running_pod") {
        return;
    }
    let c = Containerd::start_cri();
    let cri = c.cri();
    let (pod, _) = run_pod(&c, &cri, "ctrcr");
    let id = run_container(&cri, &pod, "counter", COUNTER);
    let boot = boot_id(&cri, &id);
    let before = wait_count(&cri, &id, 3);
    // The task API (ctr), not CRI: a checkpoint image of the container and its task.
    c.ctr_ok(&["--timeout", "600s", "containers", "checkpoint", "--task", "--image", &id, "kata-rs-test/pod-counter:1"]);
    cri.stop_container(&id, 10).unwrap();
    cri.remove_container(&id).unwrap();
    assert_eq!(qemus(&c).len(), 1, "the pod's VM runs on for its sandbox");
    // As a hostile guest: the pod's VM is running and writes its shared directory. It puts a symlink
    // to a host directory where the next container's mounts go: the host refuses, mounts nothing.
    let canary = c.dir.join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::write(canary.join("secret"), "secret").unwrap();
    let planted = c.runtime_root.join(&pod).join("shared").join(&id);
    std::os::unix::fs::symlink(&canary, &planted).unwrap();
    let o = c.ctr(&["--timeout", "600s", "containers", "restore", "--live", &id, "kata-rs-test/pod-counter:1"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && e.contains("already exists"), "a guest-made {} must be refused: {e}", planted.display());
    let names: Vec<_> = std::fs::read_dir(&canary).unwrap().flatten().map(|d| d.file_name()).collect();
    assert_eq!(names, ["secret"], "nothing made in the canary");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&canary.display().to_string()), "nothing mounted on the canary");
    // (The failed create removed the guest's link itself, never what it points to.)
    let _ = std::fs::remove_file(&planted);
    let _ = c.ctr(&["containers", "rm", &id]);
    assert_eq!(qemus(&c).len(), 1, "the pod's VM runs on after the refused container");
    // Restored under its old id: its spec names the pod, so its task joins the pod's shim and VM.
    c.ctr_ok(&["--timeout", "600s", "containers", "restore", "--live", &id, "kata-rs-test/pod-counter:1"]);
    assert_eq!(qemus(&c).len(), 1, "restored into the pod's VM, not a new one");
    let n = std::cell::Cell::new(0);
    let exec = |args: &[&str]| {
        n.set(n.get() + 1);
        c.ctr_ok(&[&["tasks", "exec", "--exec-id", &format!("x{}", n.get()), &id][..], args].concat())
    };
    assert_eq!(exec(&["cat", "/proc/sys/kernel/random/boot_id"]).trim(), boot);
    std::thread::sleep(Duration::from_secs(2));
    let after: u64 = exec(&["cat", "/tmp/count"]).trim().parse().unwrap();
    assert!(after > before, "the counter went on from {before} (now {after}), not from zero");
    c.kill_and_remove(&id);
    remove_pod(&cri, &pod);
    c.assert_clean();
}

/// tests/images/registry.py serving the test image on localhost (CRI's restore pulls the checkpointed
/// container's image by its reference); killed on drop.
struct Registry {
    child: std::process::Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port_file = dir.join("registry.port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/registry.py");
        let child = std::process::Command::new("python3")
            .arg(script)
            .arg(busybox_image())
            .arg("kata-busybox:latest")
            .arg("--port-file")
            .arg(&port_file)
            .spawn()
            .expect("python3 registry.py");
        let start = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|s| s.trim().parse().ok()) {
                break p;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "registry.py did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        Registry { child, port }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cri_checkpoint_and_restore_into_a_new_pod_continues_the_counter() {
    if !isolated("cri_checkpoint_and_restore_into_a_new_pod_continues_the_counter") {
        return;
    }
    let c = Containerd::start_cri();
    let cri = c.cri();
    let reg = Registry::start(&c.dir);
    let image = format!("localhost:{}/kata-busybox:latest", reg.port);
    // Pulled (so that it has a digest reference, which CRI's restore pulls again) over plain HTTP.
    c.ctr_ok(&["images", "pull", "--plain-http", &image]);
    // CRI's PullImage would also make the digest reference (the image_ref CRI records); so does this.
    let listed = c.ctr_ok(&["images", "ls"]);
    let digest = listed
        .lines()
        .find(|l| l.starts_with(&image))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("{image} not listed: {listed}"))
        .to_string();
    let by_digest = format!("localhost:{}/kata-busybox@{digest}", reg.port);
    c.ctr_ok(&["images", "tag", &image, &by_digest]);
    let (pod1, _) = run_pod(&c, &cri, "origin");
    let id = cri.create_container(&pod1, &ContainerSpec::new("counter", &image, &["sh", "-c", COUNTER])).unwrap();
    cri.start_container(&id).unwrap();
    let boot1 = boot_id(&cri, &id);
    wait_count(&cri, &id, 5);
    // CheckpointContainer: containerd pauses the task, the shim checkpoints it (leaving it running)
    // into containerd's directory, containerd writes the kubelet's archive.
    let archive = c.dir.join("counter-checkpoint.tar");
    let dumped_at_least = read_count(&cri, &id);
    cri.checkpoint_container(&id, &archive, 600).unwrap_or_else(|e| panic!("CheckpointContainer: {e:#}"));
    let entries = std::process::Command::new("tar").arg("-tf").arg(&archive).output().unwrap();
    let entries = String::from_utf8_lossy(&entries.stdout).into_owned();
    for want in ["spec.dump", "config.dump", "checkpoint/inventory.img", "rootfs-diff.tar"] {
        assert!(entries.lines().any(|l| l.trim_start_matches("./") == want), "{want} not in the archive: {entries}");
    }
    assert_eq!(cri.container_status(&id).unwrap().state, ContainerState::ContainerRunning, "the checkpointed container runs on");
    remove_pod(&cri, &pod1);
    // Restored into a new pod (a new VM): CreateContainer from the archive, the restore at Start.
    let (pod2, _) = run_pod(&c, &cri, "restored");
    let restored =
        cri.restore_container(&pod2, &archive, &ContainerSpec::new("counter", &image, &[])).unwrap_or_else(|e| panic!("restore CreateContainer: {e:#}"));
    cri.start_container(&restored).unwrap_or_else(|e| panic!("restore StartContainer: {e:#}"));
    assert_ne!(boot_id(&cri, &restored), boot1, "restored in another VM");
    std::thread::sleep(Duration::from_secs(3));
    let n = read_count(&cri, &restored);
    assert!(n > dumped_at_least, "the counter went on from its dumped value (at least {dumped_at_least}), now {n}: not restarted from zero");
    remove_pod(&cri, &pod2);
    c.assert_clean();
}

/// Stops pod `pod` and says how long StopPodSandbox took; it must return within 30 s whatever the
/// pod's processes do.
fn stop_pod_within(cri: &Cri, pod: &str, case: &str) -> Duration {
    let start = Instant::now();
    cri.stop_pod_sandbox(pod).unwrap_or_else(|e| panic!("{case}: StopPodSandbox: {e:#}"));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "{case}: StopPodSandbox took {took:?}");
    cri.remove_pod_sandbox(pod).unwrap_or_else(|e| panic!("{case}: RemovePodSandbox: {e:#}"));
    took
}

/// A pod's later container (made in the running VM) gets volume copies born with their final flags in
/// virtiofsd's namespace, as an own VM's do (the workloads suite); a pod whose containers share its PID
/// namespace, with a container whose background processes outlive its shell, stops within the bound and
/// leaves nothing; so does the same pod with a PID namespace per container.
#[test]
fn a_pod_containers_volumes_are_born_read_only_and_a_pod_with_background_processes_stops() {
    if !isolated("a_pod_containers_volumes_are_born_read_only_and_a_pod_with_background_processes_stops") {
        return;
    }
    use kata_rs_tests::{
        cri::HostMount,
        virtiofsd::{assert_volume, Expect, Source, Virtiofsd},
    };
    let c = Containerd::start_cri();
    let cri = c.cri();
    let script = "(while true; do echo bg > /dev/null; sleep 1; done) & (sleep 100000 &) ; echo started; httpd -f -p 8080";
    for share in [true, false] {
        let case = if share { "PID namespace POD" } else { "PID namespace CONTAINER" };
        let (pod, _) = run_pod_with(&c, &cri, if share { "shared-pid" } else { "own-pid" }, |p| p.share_process_namespace = share);
        let cases = [("ro", true, "", Expect::ReadOnlyTop), ("priv", false, "", Expect::Private), ("slave", false, "host_to_container", Expect::Slave)];
        let sources: Vec<Source> = cases.iter().map(|(n, ..)| Source::new(c.dir.join(format!("{pod}-{n}")))).collect();
        let mut spec = ContainerSpec::new("bg", IMAGE, &["sh", "-c", script]);
        spec.mounts = cases
            .iter()
            .zip(&sources)
            .map(|((n, ro, prop, _), s)| HostMount {
                host_path: s.dir.display().to_string(),
                container_path: format!("/{n}"),
                readonly: *ro,
                propagation: prop.to_string(),
                ..Default::default()
            })
            .collect();
        let id = cri.create_container(&pod, &spec).unwrap_or_else(|e| panic!("{case}: CreateContainer: {e:#}"));
        cri.start_container(&id).unwrap_or_else(|e| panic!("{case}: StartContainer: {e:#}"));
        cri.wait_container_state(&id, ContainerState::ContainerRunning, T).unwrap();
        for s in &sources {
            s.mount_late();
        }
        let v = Virtiofsd::of(&c.runtime_root.join(&pod));
        for ((_, _, _, expect), src) in cases.iter().zip(&sources) {
            assert_volume(&v, &id, src, *expect);
        }
        let bg = exec_ok(&cri, &id, &["sh", "-c", "ps -o args | grep -c '^sleep 100000' || true"]);
        assert!(bg.parse::<u32>().unwrap_or(0) >= 1, "{case}: the background process runs: {bg}");
        let took = stop_pod_within(&cri, &pod, case);
        eprintln!("{case}: StopPodSandbox returned after {took:?}");
        assert!(qemus(&c).is_empty(), "{case}: the pod's VM stopped");
        assert!(pod_netns().is_empty(), "{case}: the pod's netns went: {:?}", pod_netns());
        for (s, (n, ..)) in sources.iter().zip(&cases) {
            s.assert_intact(n);
        }
        drop(sources); // the test's own mounts
        c.assert_clean();
    }
}

/// A pod whose guest answers every signal with OK and signals nothing (a test fault of the agent):
/// StopPodSandbox still returns within the bound (the host takes the container out of the VM, then ends
/// the VM), the containers are reported exited with 137, and RemovePodSandbox leaves no process, mount,
/// netns or directory.
#[test]
fn a_pod_whose_guest_ignores_signals_still_stops() {
    if !isolated("a_pod_whose_guest_ignores_signals_still_stops") {
        return;
    }
    let c = Containerd::start_cri_with("kernel_params = \"kata_rs.test_fault=ignore-signals:0\"");
    let cri = c.cri();
    let (pod, _) = run_pod(&c, &cri, "deaf");
    let id = run_container(&cri, &pod, "deaf", WEB);
    cri.wait_container_state(&id, ContainerState::ContainerRunning, T).unwrap();
    assert_eq!(pod_netns().len(), 1);
    let took = stop_pod_within(&cri, &pod, "a guest that ignores signals");
    eprintln!("StopPodSandbox of a pod whose guest ignores signals returned after {took:?}");
    assert!(qemus(&c).is_empty(), "the pod's VM was ended by the host");
    assert!(pod_netns().is_empty(), "the pod's netns went: {:?}", pod_netns());
    c.assert_clean();
}

/// What Kubernetes users get under runc, under runc and kata-rs in one containerd (issue 19):
/// StopContainer of a container that exits on its own (before, during and after its exit: a finished
/// process's kill is NotFound, which containerd takes as stopped), a read-only root filesystem, an
/// OOM kill (exit 137, reason OOMKilled), a privileged container (a bridge may be made), a read-only
/// hostPath whose submount stays writable and can be unmounted after the pod, and a
/// pod asking for the host's network, IPC or PID namespace (runs under runc; refused by name at
/// RunPodSandbox under kata-rs, where a VM cannot share them).
#[test]
fn kubernetes_cases_behave_as_under_runc() {
    if !isolated("kubernetes_cases_behave_as_under_runc") {
        return;
    }
    let c = Containerd::start_cri();
    let cri = c.cri();
    for handler in [RUNC_HANDLER, KATA_HANDLER] {
        let logs = c.dir.join("pod-logs").join(handler);
        std::fs::create_dir_all(&logs).unwrap();
        let mut p = PodSpec::new(&format!("cases-{handler}"), handler, &logs);
        p.privileged = true;
        let pod = cri.run_pod_sandbox(&p).unwrap_or_else(|e| panic!("{handler}: RunPodSandbox: {e:#}"));
        for (n, delay) in ["0", "0.5", "1"].iter().enumerate() {
            let done = run_container(&cri, &pod, &format!("done{n}"), &format!("sleep {delay}; exit 3"));
            if n == 2 {
                cri.wait_container_state(&done, ContainerState::ContainerExited, T).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
            } else {
                std::thread::sleep(Duration::from_millis(500));
            }
            cri.stop_container(&done, 10).unwrap_or_else(|e| panic!("{handler}: StopContainer of a container exiting after {delay} s: {e:#}"));
            let info = cri.wait_container_state(&done, ContainerState::ContainerExited, T).unwrap();
            assert!(info.exit_code == 3 || info.exit_code == 137, "{handler}: {info:?}");
            cri.remove_container(&done).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        }
        let mut spec = ContainerSpec::new("ro", IMAGE, &["sleep", "100000"]);
        spec.readonly_rootfs = true;
        let ro = cri.create_container(&pod, &spec).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        cri.start_container(&ro).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        let w = cri.exec_sync(&ro, &["busybox", "touch", "/written"], 60).unwrap();
        assert!(w.exit_code != 0 && w.stderr.contains("Read-only file system"), "{handler}: a write to a read-only rootfs: {w:?}");
        // A container over its memory limit: OOM-killed, exit 137, reason OOMKilled (containerd's CRI
        // takes it from the TaskOOM event).
        let mut spec = ContainerSpec::new("oom", IMAGE, &["/bin/memhog", "96"]);
        spec.memory_limit_bytes = Some(32 << 20);
        let oom = cri.create_container(&pod, &spec).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        cri.start_container(&oom).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        let info = cri.wait_container_state(&oom, ContainerState::ContainerExited, T).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        assert_eq!((info.exit_code, info.reason.as_str()), (137, "OOMKilled"), "{handler}: {info:?}");
        // A child over the limit while the init lives: runc's shim publishes TaskOOM from the cgroup at
        // once, and CRI shows the running container's reason OOMKilled.
        let mut spec = ContainerSpec::new("oomchild", IMAGE, &["sh", "-c", "/bin/memhog 96; echo $? > /child-status; exec sleep 100000"]);
        spec.memory_limit_bytes = Some(32 << 20);
        let child = cri.create_container(&pod, &spec).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        cri.start_container(&child).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        let start = std::time::Instant::now();
        loop {
            let info = cri.container_status(&child).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
            assert_eq!(info.state, ContainerState::ContainerRunning, "{handler}: the init lives on: {info:?}");
            if info.reason == "OOMKilled" {
                break;
            }
            assert!(start.elapsed() < T, "{handler}: no OOMKilled reason for the running container whose child was OOM-killed: {info:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
        let start = std::time::Instant::now();
        let status = loop {
            let s = cri.exec_sync(&child, &["cat", "/child-status"], 60).unwrap();
            if s.exit_code == 0 || start.elapsed() > Duration::from_secs(20) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(status.stdout.trim(), "137", "{handler}: the child was SIGKILLed by the OOM killer: {status:?}");
        cri.stop_container(&child, 0).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        cri.remove_container(&child).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        // A privileged container may make a bridge (the guest has the module); others may not.
        let mut spec = ContainerSpec::new("priv", IMAGE, &["sleep", "100000"]);
        spec.privileged = true;
        let privileged = cri.create_container(&pod, &spec).unwrap_or_else(|e| panic!("{handler}: a privileged container: {e:#}"));
        cri.start_container(&privileged).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        let b = cri.exec_sync(&privileged, &["busybox", "brctl", "addbr", "kbr0"], 60).unwrap();
        assert_eq!(b.exit_code, 0, "{handler}: brctl addbr in a privileged container: {b:?}");
        let rw = run_container(&cri, &pod, "rw", "exec sleep 100000");
        let b = cri.exec_sync(&rw, &["busybox", "brctl", "addbr", "kbr1"], 60).unwrap();
        assert!(b.exit_code != 0 && b.stderr.contains("not permitted"), "{handler}: brctl addbr without privileges: {b:?}");
        assert_eq!(cri.exec_sync(&rw, &["busybox", "touch", "/written"], 60).unwrap().exit_code, 0, "{handler}: the default rootfs is writable");
        // A read-only hostPath (not recursive) with a submount: its top refuses writes, the submount
        // takes them (OCI's `ro`, as runc does it); once the pod is gone the host can unmount it.
        let src = kata_rs_tests::virtiofsd::Source::new(c.dir.join(format!("vol-{handler}")));
        let mut spec = ContainerSpec::new("vol", IMAGE, &["sleep", "100000"]);
        spec.mounts = vec![kata_rs_tests::cri::HostMount { host_path: src.dir.display().to_string(), container_path: "/vol".into(), readonly: true, ..Default::default() }];
        let vol = cri.create_container(&pod, &spec).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        cri.start_container(&vol).unwrap_or_else(|e| panic!("{handler}: {e:#}"));
        let top = cri.exec_sync(&vol, &["busybox", "touch", "/vol/written"], 60).unwrap();
        assert!(top.exit_code != 0 && top.stderr.contains("Read-only file system"), "{handler}: a write to a read-only volume's top: {top:?}");
        let sub = cri.exec_sync(&vol, &["busybox", "touch", "/vol/sub/written"], 60).unwrap();
        assert_eq!(sub.exit_code, 0, "{handler}: the submount of a (non-recursive) read-only volume is writable: {sub:?}");
        assert!(src.dir.join("sub/written").is_file(), "{handler}: the write reached the host's submount");
        std::fs::remove_file(src.dir.join("sub/written")).unwrap();
        remove_pod(&cri, &pod);
        src.assert_intact(handler);
        let o = std::process::Command::new("umount").arg(src.dir.join("sub")).output().unwrap();
        assert!(o.status.success(), "{handler}: the host unmounts the volume's submount once the pod is gone: {}", String::from_utf8_lossy(&o.stderr));
        drop(src);
        for (what, set) in [("hostNetwork", 0), ("hostIPC", 1), ("hostPID", 2)] {
            let mut p = PodSpec::new(&format!("host-{handler}-{set}"), handler, &logs);
            match set {
                0 => p.host_network = true,
                1 => p.host_ipc = true,
                _ => p.host_pid = true,
            }
            let r = cri.run_pod_sandbox(&p);
            if handler == RUNC_HANDLER {
                let id = r.unwrap_or_else(|e| panic!("runc: a {what} pod: {e:#}"));
                remove_pod(&cri, &id);
            } else {
                let e = format!("{:#}", r.expect_err("a VM cannot share the host's namespaces"));
                assert!(e.contains(what) && e.contains("runc RuntimeClass"), "kata-rs: a {what} pod: {e}");
            }
        }
    }
    assert!(qemus(&c).is_empty(), "no VM left");
    c.assert_clean();
}
