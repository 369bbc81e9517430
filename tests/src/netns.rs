//! Network tests run in namespaces of their own: the test re-runs itself under `unshare` (new network,
//! PID and mount namespaces), where containerd, the CNI plugins, iptables and every client run, so no
//! address, bridge, rule or packet reaches the host's network, and everything it started dies with it.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

const INSIDE: &str = "KATA_RS_NETNS_TEST";
/// The CNI network of the tests (a bridge with host-local addresses, and portmap).
pub const NETWORK: &str = "kata-rs-test";
pub const SUBNET_PREFIX: &str = "10.77.0.";
pub const GATEWAY: &str = "10.77.0.1";
pub const CNI_BIN: &str = "/usr/lib/cni";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Inside an isolated run: a tag unique to it (the outer process and its count of runs).
pub fn run_tag() -> Option<String> {
    std::env::var(INSIDE).ok()
}

/// Runs the test `name` (this binary, exact name) again in new network, PID and mount namespaces and
/// returns false once it passed there (a failure there fails the caller); returns true when the caller
/// is that isolated run, with loopback up, CNI's configuration and state directories private, and
/// ctr's CNI paths (/etc/cni/net.d, /opt/cni/bin) pointing at the test network and Debian's plugins.
pub fn isolated(name: &str) -> bool {
    if inside() {
        setup_inside();
        return true;
    }
    let st = run_isolated(&[name, "--exact", "--nocapture", "--test-threads", "1"]);
    assert!(st.success(), "{name} (in its own network, PID and mount namespaces) failed: {st}");
    false
}

/// Is this process the isolated run?
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Runs this executable again with `args` in new network, PID and mount namespaces (for a binary such
/// as the bench; it calls [`setup_inside`] there).
pub fn run_isolated(args: &[&str]) -> std::process::ExitStatus {
    assert!(Path::new(CNI_BIN).join("bridge").exists(), "CNI plugins missing in {CNI_BIN}: run 'make setup' (containernetworking-plugins)");
    // Mount points for the private bind mounts (empty directories; CRI uses them too).
    for d in ["/etc/cni/net.d", "/opt/cni/bin"] {
        std::fs::create_dir_all(d).unwrap();
    }
    Command::new("unshare")
        .args(["--net", "--pid", "--mount", "--fork", "--mount-proc", "--propagation", "private"])
        .arg(std::env::current_exe().unwrap())
        .args(args)
        .env(INSIDE, format!("n{}x{}", std::process::id(), RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)))
        .status()
        .expect("running unshare")
}

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-ec", cmd]).status().unwrap();
    assert!(st.success(), "{cmd}");
}

/// CNI's state and the test network's configuration live on a tmpfs of this mount namespace only.
const PRIVATE: &str = "/var/lib/cni";

/// Inside: loopback up, CNI state and configuration private, ctr's CNI paths set (see [`isolated`]).
pub fn setup_inside() {
    sh(&format!(
        "ip link set lo up
         mkdir -p {PRIVATE} /run/netns
         mount -t tmpfs kr-cni {PRIVATE}
         mount -t tmpfs kr-netns /run/netns
         mkdir -p {PRIVATE}/net.d
         mount --bind {PRIVATE}/net.d /etc/cni/net.d
         mount --bind {CNI_BIN} /opt/cni/bin"
    ));
    std::fs::write(conflist_path(), conflist()).unwrap();
}

/// The test network's conflist (where ctr --cni looks).
pub fn conflist_path() -> PathBuf {
    PathBuf::from("/etc/cni/net.d/10-kata-rs-test.conflist")
}

fn conflist() -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": "krtest0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("{SUBNET_PREFIX}0/24"), "gateway": GATEWAY}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
    .to_string()
}

/// tests/images/cni.py: the CNI plugins of the test network run like nerdctl's hook or CRI runs them.
pub fn cni_script() -> PathBuf {
    workspace().join("tests/images/cni.py")
}

/// CNI ADD of the test network into `netns` for `container_id`; returns the address given.
pub fn cni_add(netns: &str, container_id: &str) -> String {
    let o = Command::new(cni_script()).args(["ADD", conflist_path().to_str().unwrap(), "[]", netns, container_id]).output().unwrap();
    assert!(o.status.success(), "CNI ADD: {}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    r["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
}

pub fn cni_del(netns: &str, container_id: &str) {
    let o = Command::new(cni_script()).args(["DEL", conflist_path().to_str().unwrap(), "[]", netns, container_id]).output().unwrap();
    assert!(o.status.success(), "CNI DEL: {}", String::from_utf8_lossy(&o.stderr));
}

/// Addresses host-local gave out on the test network (its state files are named by address).
pub fn allocated_addresses() -> Vec<String> {
    std::fs::read_dir(Path::new("/var/lib/cni/networks").join(NETWORK))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(SUBNET_PREFIX)).collect())
        .unwrap_or_default()
}

/// `GET /` from `addr`, retried until it answers or `limit` passes; returns the response.
pub fn http_get(addr: &str, limit: Duration) -> String {
    let start = Instant::now();
    let sa: SocketAddr = addr.parse().unwrap();
    let mut last = String::new();
    while start.elapsed() < limit {
        match TcpStream::connect_timeout(&sa, Duration::from_secs(3)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n");
                let mut body = String::new();
                match s.read_to_string(&mut body) {
                    Ok(_) if !body.is_empty() => return body,
                    Ok(_) => last = "empty answer".into(),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("no HTTP answer from {addr} within {limit:?}: {last}");
}

/// A TCP connection to `addr`, retried until it is accepted or `limit` passes.
pub fn connect(addr: &str, limit: Duration) -> TcpStream {
    let start = Instant::now();
    let sa: SocketAddr = addr.parse().unwrap();
    loop {
        match TcpStream::connect_timeout(&sa, Duration::from_secs(3)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return s;
            }
            Err(e) if start.elapsed() < limit => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("cannot connect to {addr} within {limit:?}: {e}"),
        }
    }
}

/// Writes `line` and reads the echo of it (one line).
pub fn echo(s: &mut TcpStream, line: &str) -> String {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => got.push(b[0]),
            Err(e) => panic!("reading the echo of {line:?}: {e} (got {:?})", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).trim_end().to_string()
}
