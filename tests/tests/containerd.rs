//! End-to-end tests: real containerd + ctr + kata-rs shim + QEMU guest + runc.
use std::time::Duration;

use kata_rs_tests::{containerd::*, wait_counter};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_detached_exec_ps_metrics_pause_resume_kill_rm() {
    let c = Containerd::start();
    let log = c.dir.join("k1.log");
    let log_uri = format!("file://{}", log.display());
    c.run_detached(
        "k1",
        &["--log-uri", &log_uri],
        // A background sleep that lives as long as the task: the metrics then count two processes
        // whenever they are read (the loop's own `sleep 0.1` exists only between its iterations: a
        // reading between two of them saw one, once in CI).
        &["sh", "-c", "echo hello-from-kata-rs; sleep 100000 & i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; sleep 0.1; done"],
    );
    assert_eq!(c.task_status("k1").as_deref(), Some("RUNNING"));
    let count = c.rootfs("k1").join("count");
    wait_counter(&count, 3, T).await;
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello-from-kata-rs\n", "run -d output (log URI)");

    // exec: output and exit code come back (the count is renamed into place, never seen half-written).
    let n: u64 = c.ctr_ok(&["task", "exec", "--exec-id", "e1", "k1", "cat", "/count"]).trim().parse().unwrap();
    assert!(n >= 3);
    let o = c.ctr(&["task", "exec", "--exec-id", "e2", "k1", "sh", "-c", "echo to-err >&2; exit 6"]);
    assert_eq!(o.status.code(), Some(6));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "to-err\n");

    // ps and metrics.
    // ps lists the host pid of the task (QEMU's, as Kata does), never pids the guest chose; the guest's
    // process count is in the metrics.
    let ps = c.ctr_ok(&["task", "ps", "k1"]);
    let ls = c.ctr_ok(&["task", "ls"]);
    let task_pid = ls.lines().find(|l| l.starts_with("k1 ")).and_then(|l| l.split_whitespace().nth(1)).unwrap().to_string();
    let listed: Vec<&str> = ps.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(listed, [task_pid.as_str()], "{ps}");
    let m = c.ctr_ok(&["task", "metrics", "k1"]);
    let mem: u64 = m.lines().find(|l| l.starts_with("memory.usage ")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap();
    assert!(mem > 0, "{m}");
    let procs: u64 = m.lines().find(|l| l.starts_with("pids.current")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap();
    assert!(procs >= 2, "init and its background sleep: {m}");

    // pause: the counter stops; resume: it continues.
    c.ctr_ok(&["task", "pause", "k1"]);
    assert_eq!(c.task_status("k1").as_deref(), Some("PAUSED"));
    // Its content, not a number: frozen between `echo`'s truncation and its write, the file stays
    // empty for the whole pause.
    let frozen = std::fs::read_to_string(&count).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(std::fs::read_to_string(&count).unwrap(), frozen, "counter advanced while paused");
    let frozen: u64 = frozen.trim().parse().unwrap_or(0);
    c.ctr_ok(&["task", "resume", "k1"]);
    assert_eq!(c.task_status("k1").as_deref(), Some("RUNNING"));
    wait_counter(&count, frozen + 5, T).await;

    // kill -a with SIGKILL (sh as PID 1 ignores SIGTERM, as under runc), then remove.
    c.ctr_ok(&["task", "kill", "-a", "-s", "SIGKILL", "k1"]);
    c.wait_status("k1", "STOPPED", T);
    c.ctr_ok(&["task", "rm", "k1"]);
    c.ctr_ok(&["container", "rm", "k1"]);
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rm_in_the_foreground_propagates_output_and_exit_code() {
    let c = Containerd::start();
    let fifo = c.dir.join("fifo").display().to_string();
    let o = c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--fifo-dir", &fifo, IMAGE, "k2", "sh", "-c", "seq 1 2000; echo oops >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    let expected: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&o.stdout), expected, "all stdout arrives before the exit");
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"));
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_delivers_the_signal_and_stdin_reaches_the_container() {
    let c = Containerd::start();
    let fifo = c.dir.join("fifo").display().to_string();
    // stdin: `ctr run` without -d forwards its stdin, then closes it (CloseIO right after its last
    // write): everything written reaches the container before its stdin ends, 1 MiB after the line too.
    let mut child = std::process::Command::new(c.ctr_path())
        .args(["--address", &c.address, "run", "--rm", "--runtime", RUNTIME, "--fifo-dir", &fifo, IMAGE, "k3", "sh", "-c", "read line; echo got:$line; wc -c; exit 0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut input = b"ping\n".to_vec();
    input.extend(std::iter::repeat(b'x').take(1 << 20));
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().map(str::trim).collect::<Vec<_>>(), ["got:ping", "1048576"], "{out}");
    assert!(o.status.success());

    c.run_detached("k4", &[], &["sh", "-c", "trap 'echo term > /got-term; exit 7' TERM; echo ready > /trap-set; while :; do sleep 0.1; done"]);
    // The trap is installed once /trap-set is written.
    kata_rs_tests::wait_file(&c.rootfs("k4").join("trap-set"), T, |s| s == "ready\n").await;
    c.ctr_ok(&["task", "kill", "k4"]);
    c.wait_status("k4", "STOPPED", T);
    assert_eq!(std::fs::read_to_string(c.rootfs("k4").join("got-term")).unwrap(), "term\n");
    let rm = c.ctr(&["task", "rm", "k4"]);
    assert!(String::from_utf8_lossy(&rm.stderr).contains("exit code 7"), "{}", String::from_utf8_lossy(&rm.stderr));
    c.ctr_ok(&["container", "rm", "k4"]);
    c.assert_clean();
}

/// SIGKILLs the shim serving `id`; containerd notices, runs `containerd-shim-kata-rs-v2 delete`, and
/// drops the task.
async fn kill_shim_and_wait_for_cleanup(c: &Containerd, id: &str) {
    // The VM's host cgroup (QEMU's, the task pid) goes too.
    let ls = c.ctr_ok(&["task", "ls"]);
    let qemu: u32 = ls.lines().find(|l| l.starts_with(&format!("{id} "))).and_then(|l| l.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{ls}"));
    let cgroup = kata_rs_tests::memory_cgroup(qemu);
    assert!(cgroup.join("memory.limit_in_bytes").exists() && cgroup != std::path::Path::new("/sys/fs/cgroup/memory"), "{}", cgroup.display());
    let shims = kata_rs_tests::processes_mentioning(&format!("-id {id} "));
    assert_eq!(shims.len(), 1, "{shims:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shims[0].0 as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let start = std::time::Instant::now();
    while c.task_status(id).is_some() {
        assert!(start.elapsed() < T, "task {id} still listed after its shim was killed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // containerd may list the task as gone before its run of the shim's `delete` has ended.
    while cgroup.exists() && start.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!cgroup.exists(), "the VM's host cgroup {} is left after its dead shim's cleanup", cgroup.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_killed_with_sigkill_is_cleaned_up_by_containerd() {
    let c = Containerd::start();
    c.run_detached("k5", &[], &["sleep", "1000"]);
    assert_eq!(kata_rs_tests::processes_mentioning(&format!("-address {}", c.address)).len(), 1, "one shim");
    kill_shim_and_wait_for_cleanup(&c, "k5").await;
    c.assert_clean();
    c.ctr_ok(&["container", "rm", "k5"]);

    // A configuration named by a runtime option (another runtime root): the cleanup after the dead shim
    // uses it too, and leaves nothing in that root.
    let opt = c.dir.join("opt.toml");
    let root = format!("root = \"{}\"", c.dir.join("kr").display());
    let text = std::fs::read_to_string(c.dir.join("kata.toml")).unwrap();
    assert!(text.contains(&root), "{text}");
    std::fs::write(&opt, text.replace(&root, &format!("root = \"{}\"", c.dir.join("kr-opt").display()))).unwrap();
    let fifo = c.dir.join("fifo").display().to_string();
    c.ctr_ok(&["run", "-d", "--runtime", RUNTIME, "--runtime-config-path", opt.to_str().unwrap(), "--fifo-dir", &fifo, IMAGE, "k8", "sleep", "1000"]);
    let sandbox = c.dir.join("kr-opt/k8");
    assert!(sandbox.is_dir(), "the option's runtime root is used");
    kill_shim_and_wait_for_cleanup(&c, "k8").await;
    // containerd may drop the task from its list before its run of the shim's `delete` has ended (seen
    // once in a full run: the directory went 20 ms later): wait for the cleanup, bounded.
    let start = std::time::Instant::now();
    while (sandbox.exists() || !kata_rs_tests::processes_mentioning(&sandbox.display().to_string()).is_empty()) && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = kata_rs_tests::processes_mentioning(&sandbox.display().to_string());
    assert!(left.is_empty() && !sandbox.exists(), "left behind in the option's root: {left:?}, dir exists: {}", sandbox.exists());
    c.ctr_ok(&["container", "rm", "k8"]);
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_a_clear_error_at_create() {
    let c = Containerd::start();
    std::fs::write(c.dir.join("kata.toml"), "[hypervisor]\nmemory_mb = 512\n").unwrap();
    let fifo = c.dir.join("fifo").display().to_string();
    let o = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--fifo-dir", &fifo, IMAGE, "k6", "true"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("kata.toml") && err.contains("memory_mb"), "{err}");
    let _ = c.ctr(&["container", "rm", "k6"]);
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_containers_and_exec_get_a_sized_tty() {
    let c = Containerd::start();
    let fifo = c.dir.join("fifo").display().to_string();
    // `script` gives ctr the terminal `ctr run -t` wants; stty sets the size kata-rs must pass on.
    let run = format!(
        "stty cols 91 rows 33; {} --address {} run -t --rm --runtime {RUNTIME} --fifo-dir {fifo} {IMAGE} t1 sh -c 'tty; stty size; exit 5'",
        c.ctr_path().display(),
        c.address
    );
    let o = std::process::Command::new("script").args(["-qec", &run, "/dev/null"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(5), "{out}");
    assert!(out.contains("/dev/pts/0"), "{out}");
    assert!(out.contains("33 91"), "{out}");

    c.run_detached("t2", &[], &["sleep", "1000"]);
    // An exec id as long as containerd allows (76; CRI's are 64 hex characters): the guest's console
    // socket path must not be built from it.
    let long_id = format!("x{}", "0123456789abcdef".repeat(5))[..76].to_string();
    let exec = format!("stty cols 77 rows 22; {} --address {} task exec -t --exec-id {long_id} t2 sh -c 'tty; stty size'", c.ctr_path().display(), c.address);
    let o = std::process::Command::new("script").args(["-qec", &exec, "/dev/null"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("/dev/pts/") && out.contains("22 77"), "{out}");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "t2"]);
    c.wait_status("t2", "STOPPED", T);
    c.ctr_ok(&["task", "rm", "t2"]);
    c.ctr_ok(&["container", "rm", "t2"]);
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_option_names_the_configuration_file() {
    let c = Containerd::start();
    // The option wins over $KATA_RS_CONFIG (which is valid here): a broken file named by it must be read.
    let other = c.dir.join("other.toml");
    std::fs::write(&other, "[agent]\nconnect_timeout_s = 0\n").unwrap();
    let fifo = c.dir.join("fifo").display().to_string();
    let o = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--runtime-config-path", other.to_str().unwrap(), "--fifo-dir", &fifo, IMAGE, "k7", "true"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("other.toml") && err.contains("agent.connect_timeout_s"), "{err}");
    let _ = c.ctr(&["container", "rm", "k7"]);
    c.assert_clean();
}

/// Decodes a `RuntimeInfo` and checks what it says kata-rs honours.
fn assert_kata_rs_runtime_info(bytes: &[u8]) {
    use containerd_shim::protos::{protobuf::Message, types::introspection::RuntimeInfo};
    let info = RuntimeInfo::parse_from_bytes(bytes).expect("a RuntimeInfo");
    assert_eq!(info.name, "io.containerd.kata-rs.v2");
    let f = info.features.as_ref().expect("features");
    assert_eq!(f.type_url, "types.containerd.io/opencontainers/runtime-spec/1/features/Features");
    let doc: serde_json::Value = serde_json::from_slice(&f.value).expect("the features document is JSON");
    let opts: Vec<&str> = doc["mountOptions"].as_array().expect("mountOptions").iter().filter_map(|v| v.as_str()).collect();
    assert!(opts.contains(&"rro") && opts.contains(&"ro") && opts.contains(&"rprivate") && opts.contains(&"rslave"), "{opts:?}");
    assert!(!opts.contains(&"rshared") && !opts.contains(&"idmap"), "refused options reported: {opts:?}");
    assert_eq!(doc["linux"]["mountExtensions"]["idmap"]["enabled"], false, "{doc}");
}

/// containerd 2.x asks a runtime what it honours (`<shim> -info`, through its introspection service)
/// before it creates a spec with idmapped mounts, and CRI (2.2.7 and later for non-runc runtimes)
/// before it allows `recursiveReadOnly`. kata-rs answers with its own OCI features: `rro` yes, idmapped
/// mounts no. A spec with an idmapped mount is refused before any VM boots: by containerd from those
/// features (2.x), by the shim, by name (1.x, which does not ask).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_info_states_what_kata_rs_honours_and_idmapped_mounts_are_refused() {
    use containerd_client::{
        services::v1::{containers_client::ContainersClient, introspection_client::IntrospectionClient, GetContainerRequest, PluginInfoRequest, UpdateContainerRequest},
        tonic::Request,
        types::RuntimeRequest,
        with_namespace,
    };
    use prost::Message as _;
    const NS: &str = "default";
    let c = Containerd::start();
    // The binary as containerd runs it: no options on stdin.
    let shim = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/containerd-shim-kata-rs-v2");
    let o = std::process::Command::new(&shim).arg("-info").stdin(std::process::Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_kata_rs_runtime_info(&o.stdout);
    let major = c.ctr_major();
    let channel = containerd_client::connect(&c.address).await.expect("connecting to containerd's gRPC socket");
    if major >= 2 {
        // containerd's own path to it: PluginInfo of the runtime plugin, for runtime io.containerd.kata-rs.v2.
        let req = RuntimeRequest { runtime_path: RUNTIME.into(), options: None };
        let options = prost_types::Any { type_url: "containerd.types.RuntimeRequest".into(), value: req.encode_to_vec() };
        let resp = IntrospectionClient::new(channel.clone())
            .plugin_info(PluginInfoRequest { r#type: "io.containerd.runtime.v2".into(), id: "task".into(), options: Some(options) })
            .await
            .expect("PluginInfo of io.containerd.runtime.v2/task for kata-rs")
            .into_inner();
        assert_kata_rs_runtime_info(&resp.extra.expect("PluginInfo's extra").value);
    }

    // A container whose spec has an idmapped bind mount (ctr cannot make one: the spec is updated).
    c.ctr_ok(&["container", "create", "--runtime", RUNTIME, IMAGE, "im1", "true"]);
    let mut containers = ContainersClient::new(channel);
    let mut ct = containers.get(with_namespace!(GetContainerRequest { id: "im1".into() }, NS)).await.expect("Get").into_inner().container.expect("container");
    let spec = ct.spec.as_mut().expect("spec");
    let mut doc: serde_json::Value = serde_json::from_slice(&spec.value).unwrap();
    let src = c.dir.join("idmapped");
    std::fs::create_dir_all(&src).unwrap();
    let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    doc["mounts"].as_array_mut().unwrap().push(serde_json::json!({
        "destination": "/idm", "type": "bind", "source": src, "options": ["rbind"], "uidMappings": map, "gidMappings": map,
    }));
    spec.value = serde_json::to_vec(&doc).unwrap();
    containers
        .update(with_namespace!(UpdateContainerRequest { container: Some(ct), update_mask: Some(prost_types::FieldMask { paths: vec!["spec".into()] }) }, NS))
        .await
        .expect("Update of the spec");
    let fifo = c.dir.join("fifo").display().to_string();
    let o = c.ctr(&["task", "start", "-d", "--fifo-dir", &fifo, "im1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an idmapped mount was accepted");
    if major >= 2 {
        assert!(err.contains("idmap") && err.contains("mountExtensions"), "containerd 2.x refuses from kata-rs's features: {err}");
        // containerd started the shim before its check and leaves it running; no Create reached it, so
        // it exits by itself, and no VM was booted.
        let shims = || c.leftovers().into_iter().filter(|l| l.starts_with("shim ") && l.contains("-id im1 ")).count();
        assert_eq!(shims(), 1, "containerd 2.x no longer leaves the refused task's shim: {:?}", c.leftovers());
        let start = std::time::Instant::now();
        while shims() > 0 {
            assert!(start.elapsed() < Duration::from_secs(60), "the unused shim did not exit: {:?}", c.leftovers());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    } else {
        assert!(err.contains("/idm") && err.contains("uidMappings") && err.contains("not supported by kata-rs"), "the shim refuses by name: {err}");
    }
    assert!(c.task_status("im1").is_none(), "a task was left: {:?}", c.task_status("im1"));
    c.ctr_ok(&["container", "rm", "im1"]);
    c.assert_clean();
}
