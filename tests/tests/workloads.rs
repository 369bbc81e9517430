//! What real workloads need, through containerd and a real VM: volumes (the spec's host bind mounts:
//! they reach the container through the shared filesystem, read-only ones refuse writes on the host
//! side too, and a checkpoint/restore in a new VM keeps the mount and the data) and OCI hooks (run on
//! the host, in the spec's order, with QEMU's pid in their state).
use std::time::Duration;

use containerd_shim::protos::{
    api::{CreateTaskRequest, DeleteRequest, KillRequest, StartRequest, WaitRequest},
    ttrpc::context,
};
use kata_rs_tests::{containerd::*, processes_mentioning, read_counter, wait_counter, wait_file};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_shared_read_only_where_asked_and_survive_checkpoint_restore() {
    let c = Containerd::start();
    let vol = c.dir.join("vol");
    let ro = c.dir.join("ro-vol");
    let file = c.dir.join("motd");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("ro.txt"), "from the host\n").unwrap();
    std::fs::write(&file, "a single host file\n").unwrap();
    let m = |src: &std::path::Path, dst: &str, opts: &str| format!("type=bind,src={},dst={dst},options={opts}", src.display());
    let (m1, m2, m3) = (m(&vol, "/data", "rbind:rw"), m(&ro, "/ro", "rbind:ro"), m(&file, "/motd", "bind:ro"));
    let script = "cat /motd > /data/motd-seen; cat /ro/ro.txt > /data/ro-seen; \
                  if (echo x > /ro/new) 2>/data/ro-err; then echo wrote > /data/ro-result; else echo refused > /data/ro-result; fi; \
                  i=0; while :; do i=$((i+1)); echo $i > /data/count.new; busybox mv /data/count.new /data/count; sleep 0.1; done";
    c.run_detached("v1", &["--mount", &m1, "--mount", &m2, "--mount", &m3], &["sh", "-c", script]);
    let count = vol.join("count");
    wait_counter(&count, 5, T).await;

    // Writes of the container are on the host; what the host wrote is read by the container.
    assert_eq!(std::fs::read_to_string(vol.join("motd-seen")).unwrap(), "a single host file\n");
    assert_eq!(std::fs::read_to_string(vol.join("ro-seen")).unwrap(), "from the host\n");
    assert_eq!(wait_file(&vol.join("ro-result"), T, |s| !s.is_empty()).await, "refused\n", "a read-only volume refuses writes");
    let err = std::fs::read_to_string(vol.join("ro-err")).unwrap();
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!ro.join("new").exists(), "nothing was written to the read-only volume");
    std::fs::write(vol.join("from-host"), "written on the host\n").unwrap();
    assert_eq!(c.ctr_ok(&["task", "exec", "--exec-id", "r1", "v1", "cat", "/data/from-host"]), "written on the host\n");
    // The read-only bind is read-only on the host side as well: virtiofsd cannot write it whatever
    // the guest asks (the guest's own mount options are the guest's to change).
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let kr = c.dir.join("kr").display().to_string();
    let ro_binds: Vec<&str> = host_mounts.lines().filter(|l| l.contains(&kr) && l.contains("/volumes/")).collect();
    assert_eq!(ro_binds.len(), 3, "one host bind per volume in the shared directory: {ro_binds:#?}");
    assert_eq!(ro_binds.iter().filter(|l| l.split_whitespace().nth(5).is_some_and(|o| o.split(',').any(|x| x == "ro"))).count(), 2, "{ro_binds:#?}");

    // Checkpoint, remove, restore in a new VM: the counter goes on in the same volume.
    c.ctr_ok(&["containers", "checkpoint", "--task", "--image", "v1", "kata-rs-test/vol:1"]);
    c.kill_and_remove("v1");
    let at_removal = read_counter(&count);
    c.ctr_ok(&["containers", "restore", "--live", "v2", "kata-rs-test/vol:1"]);
    assert_eq!(c.task_status("v2").as_deref(), Some("RUNNING"));
    let after = wait_counter(&count, at_removal + 5, T).await;
    assert!(after < at_removal + 1000, "restored from memory, the counter went on from {at_removal}: {after}");
    let mounts = c.ctr_ok(&["task", "exec", "--exec-id", "r2", "v2", "cat", "/proc/mounts"]);
    for dst in ["/data", "/ro", "/motd"] {
        assert!(mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(dst)), "{dst} is mounted in the restored container:\n{mounts}");
    }
    assert_eq!(c.ctr_ok(&["task", "exec", "--exec-id", "r3", "v2", "cat", "/motd"]), "a single host file\n");
    let o = c.ctr(&["task", "exec", "--exec-id", "r4", "v2", "sh", "-c", "echo y > /ro/new2"]);
    assert!(!o.status.success() && !ro.join("new2").exists(), "the restored read-only volume refuses writes");
    c.kill_and_remove("v2");
    c.ctr_ok(&["images", "rm", "--sync", "kata-rs-test/vol:1"]);
    c.assert_clean();
    // Removing the containers removed nothing of the volumes.
    assert!(read_counter(&count) >= after);
    assert_eq!(std::fs::read_to_string(ro.join("ro.txt")).unwrap(), "from the host\n");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a single host file\n");
}

/// The hostile guest's side of volumes: virtiofsd, which writes for the guest from a mount namespace of
/// its own, gets copies born with their final flags: `ro` read-only at the top only (OCI's meaning), `rro`
/// read-only throughout, every copy nosuid,nodev, and a mount the host makes below a source later reaches
/// it only where the spec asks for `rslave`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_copies_in_virtiofsds_namespace_have_their_final_flags() {
    use kata_rs_tests::virtiofsd::{assert_volume, Expect, Source, Virtiofsd};
    let c = Containerd::start();
    let cases = [("ro", "rbind:ro:rprivate", Expect::ReadOnlyTop), ("rro", "rbind:rro", Expect::ReadOnlyAll), ("priv", "rbind:rw:rprivate", Expect::Private), ("slave", "rbind:rw:rslave", Expect::Slave)];
    let sources: Vec<Source> = cases.iter().map(|(n, _, _)| Source::new(c.dir.join(format!("src-{n}")))).collect();
    let mounts: Vec<String> = cases.iter().zip(&sources).map(|((n, o, _), s)| format!("type=bind,src={},dst=/{n},options={o}", s.dir.display())).collect();
    let mut extra = vec![];
    for m in &mounts {
        extra.extend(["--mount", m.as_str()]);
    }
    c.run_detached("fl1", &extra, &["sh", "-c", "echo up > /priv/up; exec sleep 100000"]);
    wait_file(&sources[2].dir.join("up"), T, |s| s == "up\n").await;
    std::fs::remove_file(sources[2].dir.join("up")).unwrap();
    for s in &sources {
        s.mount_late();
    }
    let v = Virtiofsd::of(&c.runtime_root.join("fl1"));
    for ((_, _, expect), src) in cases.iter().zip(&sources) {
        assert_volume(&v, "fl1", src, *expect);
    }
    // What the guest sees agrees: its runc applies the same options.
    let o = c.ctr(&["task", "exec", "--exec-id", "w1", "fl1", "sh", "-c", "touch /rro/sub/x"]);
    assert!(!o.status.success(), "rro: the submount is read-only in the container too");
    c.ctr_ok(&["task", "exec", "--exec-id", "w2", "fl1", "sh", "-c", "test -e /slave/late/here && ! test -e /priv/late/here"]);
    c.kill_and_remove("fl1");
    for (s, (n, _, _)) in sources.iter().zip(&cases) {
        s.assert_intact(n);
    }
    drop(sources); // the test's own mounts
    c.assert_clean();
}

/// Propagation the VM cannot give is refused by name, before any VM boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidirectional_volume_is_refused_by_name() {
    let c = Containerd::start();
    let src = c.dir.join("bidi");
    std::fs::create_dir_all(&src).unwrap();
    let m = format!("type=bind,src={},dst=/bidi,options=rbind:rshared", src.display());
    let o = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--mount", &m, IMAGE, "bd1", "true"]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success() && e.contains("rshared") && e.contains("/bidi"), "{e}");
    let _ = c.ctr(&["containers", "rm", "bd1"]);
    c.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_whose_source_is_missing_or_a_socket_is_a_clear_error() {
    let c = Containerd::start();
    let missing = c.dir.join("no-such-dir");
    let o = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--mount", &format!("type=bind,src={},dst=/data,options=rbind", missing.display()), IMAGE, "m1", "true"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("volume /data") && e.contains("no-such-dir"), "{e}");
    let sock_path = c.dir.join("s.sock");
    let _sock = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    let o = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--mount", &format!("type=bind,src={},dst=/s.sock,options=bind", sock_path.display()), IMAGE, "m2", "true"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("neither a directory nor a regular file"), "{e}");
    for id in ["m1", "m2"] {
        let _ = c.ctr(&["container", "rm", id]);
    }
    c.assert_clean();
}

const HOOK: &str = r#"#!/bin/sh
set -e
cat > "$REC/$1.json"
pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$REC/$1.json")
started=no; [ -e "$2/started" ] && started=yes
exe=none; [ -n "$pid" ] && exe=$(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-60)
echo "$1 started=$started env=${KATA_RS_HOOK_ENV:-unset} exe=$exe" >> "$REC/order"
"#;

fn json_file(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_hooks_run_on_the_host_in_order_with_qemus_pid() {
    let c = Containerd::start();
    let rec = c.dir.join("hook-records");
    std::fs::create_dir_all(&rec).unwrap();
    // Each hook saves its state, notes its point in `order`, whether the container had started (it
    // writes /started in its rootfs) and what runs under the state's pid.
    let hook = c.dir.join("hook.sh");
    std::fs::write(&hook, HOOK).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let id = "h1";
    let rootfs_probe = c.dir.join("bundles").join(id).join("rootfs");
    let h = |point: &str| serde_json::json!([{"path": hook, "args": ["hook.sh", point, rootfs_probe], "env": ["KATA_RS_HOOK_ENV=given", format!("REC={}", rec.display()), "PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "timeout": 60}]);
    let bundle = c.hooked_bundle(
        id,
        &["sh", "-c", "touch /started; sleep 1000"],
        serde_json::json!({"createRuntime": h("createRuntime"), "prestart": h("prestart"), "poststart": h("poststart"), "poststop": h("poststop")}),
    );
    // The spec names an existing network namespace (as CRI does): QEMU runs in it.
    let mut holder = std::process::Command::new("unshare").args(["--net", "sleep", "600"]).spawn().unwrap();
    let holder_ns = format!("/proc/{}/ns/net", holder.id());
    let ns = |p: &str| std::fs::read_link(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let deadline = std::time::Instant::now() + T;
    while ns(&holder_ns) == ns("/proc/self/ns/net") {
        assert!(std::time::Instant::now() < deadline, "unshare --net did not make a namespace");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut spec = json_file(&bundle.join("config.json"));
    spec["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "network", "path": holder_ns}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let shim = c.direct_shim(id, &bundle);
    let ctx = || context::with_timeout(300_000_000_000);
    let created = shim.create(ctx(), &CreateTaskRequest { id: id.into(), bundle: bundle.display().to_string(), ..Default::default() }).expect("create");
    let qemu = created.pid;
    assert!(std::fs::read_to_string(format!("/proc/{qemu}/cmdline")).unwrap().contains("qemu-system"), "the task pid is QEMU's");
    assert_eq!(ns(&format!("/proc/{qemu}/ns/net")), ns(&holder_ns), "QEMU runs in the spec's network namespace");
    shim.start(ctx(), &StartRequest { id: id.into(), ..Default::default() }).expect("start");
    wait_file(&rec.join("order"), T, |s| s.contains("poststart")).await;
    wait_file(&bundle.join("rootfs/started"), T, |_| true).await;
    shim.kill(ctx(), &KillRequest { id: id.into(), signal: 9, ..Default::default() }).expect("kill");
    shim.wait(ctx(), &WaitRequest { id: id.into(), ..Default::default() }).expect("wait");
    shim.delete(ctx(), &DeleteRequest { id: id.into(), ..Default::default() }).expect("delete");
    let order = std::fs::read_to_string(rec.join("order")).unwrap();
    let lines: Vec<&str> = order.lines().collect();
    assert_eq!(lines.len(), 4, "{order}");
    assert!(lines[0].starts_with("createRuntime started=no env=given exe=") && lines[0].contains("qemu-system"), "{order}");
    assert!(lines[1].starts_with("prestart started=no env=given exe=") && lines[1].contains("qemu-system"), "{order}");
    assert!(lines[2].starts_with("poststart ") && lines[2].contains("qemu-system"), "{order}");
    assert!(lines[3].starts_with("poststop ") && lines[3].ends_with("exe=none"), "poststop's state has no pid: {order}");
    for (point, status) in [("createRuntime", "creating"), ("prestart", "creating"), ("poststart", "running"), ("poststop", "stopped")] {
        let s = json_file(&rec.join(format!("{point}.json")));
        assert_eq!(s["id"], id);
        assert_eq!(s["status"], status, "{point}: {s}");
        assert_eq!(s["bundle"], bundle.display().to_string());
        assert_eq!(s["annotations"]["io.kata-rs.test"], "hooks");
        if status != "stopped" {
            assert_eq!(s["pid"], qemu, "{point}: {s}");
        }
    }
    c.remove_direct_shim(&shim, id, &bundle);
    let sandbox_dir = c.dir.join("kr").join(id).display().to_string();
    assert!(processes_mentioning(&sandbox_dir).is_empty(), "{:?}", processes_mentioning(&sandbox_dir));

    let _ = holder.kill();
    let _ = holder.wait();

    // A failing prestart hook fails the create with its output, and leaves no VM. This spec asks for
    // a new network namespace (no path): the hook, which prints the namespace of its state's pid,
    // shows QEMU in one of its own, so hooks that set up networks there never touch the host's.
    let id = "h2";
    let script = "p=$(/bin/sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p'); /bin/readlink /proc/$p/ns/net >&2; echo no network for you >&2; exit 7";
    let failing = serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", script]}]);
    let bundle = c.hooked_bundle(id, &["true"], serde_json::json!({"prestart": failing}));
    let shim = c.direct_shim(id, &bundle);
    let e = shim.create(ctx(), &CreateTaskRequest { id: id.into(), bundle: bundle.display().to_string(), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("prestart hook /bin/sh") && e.contains("exit status: 7") && e.contains("no network for you"), "{e}");
    let host_ns = ns("/proc/self/ns/net").display().to_string();
    assert!(e.contains("net:[") && !e.contains(&host_ns), "QEMU's namespace ({e}) is not the host's ({host_ns})");
    c.remove_direct_shim(&shim, id, &bundle);
    let sandbox_dir = c.dir.join("kr").join(id).display().to_string();
    assert!(processes_mentioning(&sandbox_dir).is_empty(), "no VM is left after a failed hook: {:?}", processes_mentioning(&sandbox_dir));
    c.assert_clean();
}
