//! Networking through containerd and real VMs, with Debian's CNI plugins (bridge, host-local,
//! portmap, loopback): `ctr run --cni` (interfaces that appear between Create and Start are
//! hot-plugged), a createRuntime hook that attaches a network and a port mapping as nerdctl's does,
//! and a TCP server checkpointed with its connection open and restored in a new VM with a new address.
//! Each test runs in its own network, PID and mount namespaces (kata_rs_tests::netns).
use std::time::Duration;

use containerd_shim::protos::{
    api::{CreateTaskRequest, DeleteRequest, KillRequest, StartRequest, WaitRequest},
    ttrpc::context,
};
use kata_rs_tests::{containerd::*, netns::*};

const T: Duration = Duration::from_secs(120);

const WEB: &str = "mkdir -p /www && echo kata-rs-web > /www/index.html && exec httpd -f -p 80 -h /www";

#[test]
fn ctr_run_cni_serves_http_to_the_host() {
    if !isolated("ctr_run_cni_serves_http_to_the_host") {
        return;
    }
    let c = Containerd::start();
    // ctr creates the task, runs CNI on /proc/<task pid>/ns/net (QEMU's), then starts it: the veth
    // arrives after the VM booted and is hot-plugged at Start.
    c.run_detached("web", &["--cni"], &["sh", "-c", WEB]);
    let addrs = allocated_addresses();
    assert_eq!(addrs.len(), 1, "host-local gave one address: {addrs:?}");
    let ip = &addrs[0];
    let body = http_get(&format!("{ip}:80"), T);
    assert!(body.contains("kata-rs-web"), "answer from the container: {body}");
    // Inside, the interface has the veth's name and address.
    let out = c.ctr_ok(&["tasks", "exec", "--exec-id", "ipaddr", "web", "busybox", "ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(out.contains(&format!("inet {ip}/24")), "{out}");
    let route = c.ctr_ok(&["tasks", "exec", "--exec-id", "iproute", "web", "busybox", "ip", "route", "show", "default"]);
    assert!(route.contains(&format!("via {GATEWAY} dev eth0")), "{route}");
    c.kill_and_remove("web");
    c.assert_clean();
}

#[test]
fn a_create_runtime_hook_attaches_a_network_with_a_port_mapping() {
    if !isolated("a_create_runtime_hook_attaches_a_network_with_a_port_mapping") {
        return;
    }
    let c = Containerd::start();
    // As nerdctl's OCI hook does: at createRuntime, CNI ADD (bridge, then portmap with the run's
    // port mappings) for the namespace of the state's pid; at poststop, CNI DEL.
    let script = cni_script().display().to_string();
    let conf = conflist_path().display().to_string();
    let ports = r#"[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]"#;
    let env = serde_json::json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    let hooks = serde_json::json!({
        "createRuntime": [{"path": script, "args": ["cni.py", "ADD", conf, ports], "env": env, "timeout": 60}],
        "poststop": [{"path": script, "args": ["cni.py", "DEL", conf, ports], "env": env, "timeout": 60}],
    });
    let id = "hooked-web";
    let bundle = c.hooked_bundle(id, &["sh", "-c", WEB], hooks);
    let shim = c.direct_shim(id, &bundle);
    let ctx = || context::with_timeout(300_000_000_000);
    shim.create(ctx(), &CreateTaskRequest { id: id.into(), bundle: bundle.display().to_string(), ..Default::default() }).expect("create");
    shim.start(ctx(), &StartRequest { id: id.into(), ..Default::default() }).expect("start");
    let addrs = allocated_addresses();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    // The container's own address, and the host port through portmap's DNAT.
    assert!(http_get(&format!("{}:80", addrs[0]), T).contains("kata-rs-web"));
    let body = http_get(&format!("{GATEWAY}:8080"), T);
    assert!(body.contains("kata-rs-web"), "answer on the host port: {body}");
    shim.kill(ctx(), &KillRequest { id: id.into(), signal: 9, ..Default::default() }).expect("kill");
    shim.wait(ctx(), &WaitRequest { id: id.into(), ..Default::default() }).expect("wait");
    shim.delete(ctx(), &DeleteRequest { id: id.into(), ..Default::default() }).expect("delete");
    assert!(allocated_addresses().is_empty(), "the poststop hook released the address: {:?}", allocated_addresses());
    c.remove_direct_shim(&shim, id, &bundle);
    c.assert_clean();
}

#[test]
fn a_tcp_server_keeps_its_connection_across_a_checkpoint_and_answers_after_a_restore_with_a_new_address() {
    if !isolated("a_tcp_server_keeps_its_connection_across_a_checkpoint_and_answers_after_a_restore_with_a_new_address") {
        return;
    }
    let c = Containerd::start();
    // A pod-like namespace made beforehand (as CRI does), given to ctr by path.
    let netns = "/run/netns/kr-srv";
    let st = std::process::Command::new("ip").args(["netns", "add", "kr-srv"]).status().unwrap();
    assert!(st.success());
    let ip1 = cni_add(netns, "srv-1");
    let ns_arg = format!("network:{netns}");
    // An echo server that forks one `cat` per connection; its checkpoints keep open TCP connections.
    c.run_detached(
        "tcp1",
        &["--with-ns", &ns_arg, "--annotation", "io.kata-rs.checkpoint.open_tcp=true"],
        &["busybox", "nc", "-ll", "-p", "7000", "-e", "cat"],
    );
    let mut conn = connect(&format!("{ip1}:7000"), T);
    assert_eq!(echo(&mut conn, "one"), "one");
    // containerd pauses, checkpoints (leave running, the connection dumped as established) and resumes.
    c.ctr_ok(&["--timeout", "600s", "containers", "checkpoint", "--task", "--image", "tcp1", "kata-rs-test/tcp:1"]);
    assert_eq!(echo(&mut conn, "two"), "two", "the same connection is served after the checkpoint");
    drop(conn);
    c.kill_and_remove("tcp1");
    // The namespace gets a new interface with a new address (host-local hands out the next one).
    cni_del(netns, "srv-1");
    let ip2 = cni_add(netns, "srv-2");
    assert_ne!(ip1, ip2);
    c.ctr_ok(&["--timeout", "600s", "containers", "restore", "--live", "tcp2", "kata-rs-test/tcp:1"]);
    c.wait_status("tcp2", "RUNNING", T);
    let mut conn = connect(&format!("{ip2}:7000"), T);
    assert_eq!(echo(&mut conn, "three"), "three", "the restored server listens and answers on its new address");
    drop(conn);
    c.kill_and_remove("tcp2");
    cni_del(netns, "srv-2");
    c.assert_clean();
}

/// The guest's frames leave the tap only with the interface's MAC and addresses: a container with
/// CAP_NET_ADMIN that gives itself another source address or another MAC reaches nothing, and the
/// host's bridge never learns the forged MAC or address; with its own again it is served as before.
#[test]
fn forged_frames_from_the_guest_never_reach_the_bridge() {
    if !isolated("forged_frames_from_the_guest_never_reach_the_bridge") {
        return;
    }
    let c = Containerd::start();
    c.run_detached("spoof", &["--cni", "--cap-add", "CAP_NET_ADMIN", "--cap-add", "CAP_NET_RAW"], &["sh", "-c", WEB]);
    let addrs = allocated_addresses();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    let ip = addrs[0].clone();
    assert!(http_get(&format!("{ip}:80"), T).contains("kata-rs-web"));
    let n = std::sync::atomic::AtomicU32::new(0);
    let exec = |script: &str| {
        let id = format!("x{}", n.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        c.ctr(&["tasks", "exec", "--exec-id", &id, "spoof", "sh", "-c", script])
    };
    let out = exec("cat /sys/class/net/eth0/address");
    let mac = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let fdb = || String::from_utf8_lossy(&std::process::Command::new("bridge").args(["fdb", "show"]).output().unwrap().stdout).to_lowercase();
    assert!(fdb().contains(&mac), "the bridge learned the container's own MAC {mac}: {}", fdb());
    // Another source address: neither its ARP nor its IP reaches the host.
    let prefix = ip.rsplit_once('.').unwrap().0;
    let forged_ip = format!("{prefix}.250");
    let o = exec(&format!(
        "ip addr add {forged_ip}/24 dev eth0 || exit 9; arping -c 2 -w 3 -s {forged_ip} {GATEWAY}; a=$?; ping -c 2 -W 1 -I {forged_ip} {GATEWAY}; p=$?; \
         ip addr del {forged_ip}/24 dev eth0; [ $a -eq 0 ] || [ $p -eq 0 ]"
    ));
    assert_ne!(o.status.code(), Some(9), "the container could add the address: {}", String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "no answer to a forged source address: {}", String::from_utf8_lossy(&o.stdout));
    let neigh = String::from_utf8_lossy(&std::process::Command::new("ip").args(["neigh", "show", &forged_ip]).output().unwrap().stdout).into_owned();
    assert!(!neigh.contains("lladdr"), "the host never learned the forged address: {neigh}");
    // Another MAC: nothing it sends reaches the bridge.
    let forged_mac = "02:00:00:00:06:66";
    let o = exec(&format!("ip link set dev eth0 address {forged_mac} || exit 9; ping -c 2 -W 1 {GATEWAY}; r=$?; ip link set dev eth0 address {mac}; exit $r"));
    assert_ne!(o.status.code(), Some(9), "the container could set the MAC: {}", String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "no answer to a forged MAC: {}", String::from_utf8_lossy(&o.stdout));
    assert!(!fdb().contains(forged_mac), "the bridge never learned the forged MAC: {}", fdb());
    // Its own MAC and address again: served as before.
    assert!(http_get(&format!("{ip}:80"), T).contains("kata-rs-web"));
    c.kill_and_remove("spoof");
    c.assert_clean();
}
