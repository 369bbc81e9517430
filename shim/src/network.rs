//! The container's network, Kata's way: every interface in QEMU's network namespace (a CNI veth,
//! made by CRI, a client such as `ctr run --cni`, or a createRuntime hook) gets a tap that QEMU opens,
//! joined to it by tc mirred redirects both ways, and a virtio-net device with the same MAC that is
//! hot-plugged into the VM. The agent gives the guest interface the host's name, MTU, addresses and
//! routes inside the container's network namespace.
//!
//! What is read here is the host's namespace (iproute2's JSON, bounded), never anything the guest says.
use std::{
    os::fd::{AsRawFd, BorrowedFd},
    process::Stdio,
    time::Duration,
};

use serde_json::Value;
use tracing::{debug, info};

use agent_client::agent as ag;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("`{command}` in QEMU's network namespace failed: {detail}")]
    Command { command: String, detail: String },
    #[error("reading the network namespace: {0}")]
    Parse(String),
    #[error("the network namespace has {found} interfaces, more than the VM's {ports} network ports (hypervisor.network_ports)")]
    TooMany { found: usize, ports: u32 },
    #[error("hot-plugging {iface} into the VM: {detail}")]
    Hotplug { iface: String, detail: String },
}

/// Suffix of the taps kata-rs makes (`tap<N>_kr`); such links are never mirrored themselves.
const TAP_SUFFIX: &str = "_kr";
/// Bytes of output read from one iproute2 command.
const MAX_OUTPUT: usize = 1 << 20;
/// Interfaces and routes taken from one namespace, at most.
const MAX_ROUTES: usize = 256;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dest: String,
    pub gateway: String,
    pub device: String,
    pub source: String,
    pub scope: String,
    pub family: u32,
}

/// An interface already mirrored into the VM.
#[derive(Debug, Clone)]
struct Attached {
    name: String,
    mac: String,
    port: u32,
    /// The addresses the guest's frames are filtered by (an address CNI adds later renews the filters).
    addresses: Vec<String>,
}

/// Interfaces of one VM: what is attached, so that a second look only adds what is new.
#[derive(Debug, Default)]
pub struct Network {
    attached: Vec<Attached>,
}

/// Runs a program (iproute2) inside the namespace `netns`; output bounded.
async fn run_in(netns: BorrowedFd<'_>, program: &str, args: &[&str]) -> Result<String, NetworkError> {
    let command = format!("{program} {}", args.join(" "));
    let fd = netns.as_raw_fd();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // SAFETY: setns(2) is async-signal-safe; `fd` outlives the spawn (borrowed from the VM).
    unsafe {
        cmd.pre_exec(move || if libc::setns(fd, libc::CLONE_NEWNET) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
    }
    let child = cmd.spawn().map_err(|e| NetworkError::Command { command: command.clone(), detail: e.to_string() })?;
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| NetworkError::Command { command: command.clone(), detail: format!("no answer in {COMMAND_TIMEOUT:?}") })?
        .map_err(|e| NetworkError::Command { command: command.clone(), detail: e.to_string() })?;
    let bounded = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(MAX_OUTPUT)]).into_owned();
    if !out.status.success() {
        return Err(NetworkError::Command { command, detail: format!("{}: {}", out.status, bounded(&out.stderr).trim()) });
    }
    debug!(command, "ok");
    Ok(bounded(&out.stdout))
}

fn parse_array(what: &str, text: &str) -> Result<Vec<Value>, NetworkError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(a)) => Ok(a),
        Ok(_) => Err(NetworkError::Parse(format!("{what}: not a JSON array"))),
        Err(e) => Err(NetworkError::Parse(format!("{what}: {e}"))),
    }
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// The interfaces to mirror, from `ip -j -d addr show`: Ethernet links that are not taps (ours or
/// anyone's), with their global addresses.
pub fn parse_interfaces(text: &str) -> Result<Vec<Interface>, NetworkError> {
    let mut out = Vec::new();
    for l in parse_array("ip addr", text)? {
        let name = str_of(&l, "ifname");
        let kind = l.pointer("/linkinfo/info_kind").and_then(Value::as_str).unwrap_or("");
        if str_of(&l, "link_type") != "ether" || kind == "tun" || name.ends_with(TAP_SUFFIX) || name.is_empty() {
            continue;
        }
        let mac = str_of(&l, "address").to_ascii_lowercase();
        if !valid_mac(&mac) {
            return Err(NetworkError::Parse(format!("{name}: MAC {mac:?}")));
        }
        let mtu = l.get("mtu").and_then(Value::as_u64).unwrap_or(1500) as u32;
        let mut addresses = Vec::new();
        for a in l.get("addr_info").and_then(Value::as_array).into_iter().flatten() {
            if str_of(a, "scope") != "global" {
                continue; // link-local: the guest makes its own
            }
            let (local, len) = (str_of(a, "local"), a.get("prefixlen").and_then(Value::as_u64).unwrap_or(0));
            if local.parse::<std::net::IpAddr>().is_ok() {
                addresses.push(format!("{local}/{len}"));
            }
        }
        out.push(Interface { name: name.to_string(), mac, mtu, addresses });
    }
    Ok(out)
}

/// Routes through the given interfaces, from `ip -j route show`; those the kernel makes from an
/// address (protocol kernel) and IPv6 link-local/multicast ones are left to the guest's kernel.
pub fn parse_routes(text: &str, family: u32, ifaces: &[Interface]) -> Result<Vec<Route>, NetworkError> {
    let mut out = Vec::new();
    for r in parse_array("ip route", text)? {
        let dev = str_of(&r, "dev");
        let dest = str_of(&r, "dst");
        if str_of(&r, "protocol") == "kernel" || !ifaces.iter().any(|i| i.name == dev) || dest.is_empty() {
            continue;
        }
        if family == 6 && (dest.starts_with("fe80:") || dest.starts_with("ff00:")) {
            continue;
        }
        out.push(Route {
            dest: dest.to_string(),
            gateway: str_of(&r, "gateway").to_string(),
            device: dev.to_string(),
            source: str_of(&r, "prefsrc").to_string(),
            scope: match str_of(&r, "scope") {
                "link" => "link".into(),
                _ => String::new(),
            },
            family,
        });
    }
    Ok(out)
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The tap for network port `port`.
pub fn tap_name(port: u32) -> String {
    format!("tap{port}{TAP_SUFFIX}")
}

impl Network {
    /// Looks at QEMU's namespace; mirrors every interface not attached yet (hot-plug, tap, redirects).
    /// Returns what the agent must configure (every interface, with all routes), or `None` when the
    /// namespace has no interface.
    pub async fn sync(&mut self, vm: &vmm::Vm, container_id: &str) -> Result<Option<ag::UpdateNetworkRequest>, NetworkError> {
        let Some(ns) = vm.netns() else { return Ok(None) };
        let ifaces = parse_interfaces(&run_in(ns, "ip", &["-j", "-d", "addr", "show"]).await?)?;
        if ifaces.is_empty() {
            return Ok(None);
        }
        if ifaces.len() > vm.network_ports() as usize {
            return Err(NetworkError::TooMany { found: ifaces.len(), ports: vm.network_ports() });
        }
        let mut routes = parse_routes(&run_in(ns, "ip", &["-j", "route", "show"]).await?, 4, &ifaces)?;
        routes.extend(parse_routes(&run_in(ns, "ip", &["-j", "-6", "route", "show"]).await?, 6, &ifaces)?);
        routes.truncate(MAX_ROUTES);
        for i in &ifaces {
            if let Some(a) = self.attached.iter_mut().find(|a| a.name == i.name && a.mac == i.mac) {
                if a.addresses != i.addresses {
                    connect(ns, i, &tap_name(a.port)).await?;
                    info!(iface = %i.name, addresses = ?i.addresses, "the guest's frames are filtered by the interface's new addresses");
                    a.addresses = i.addresses.clone();
                }
                continue;
            }
            let port = (0..vm.network_ports()).find(|p| !self.attached.iter().any(|a| a.port == *p)).ok_or(NetworkError::TooMany {
                found: self.attached.len() + 1,
                ports: vm.network_ports(),
            })?;
            let tap = tap_name(port);
            vm.hotplug_nic(port, &tap, &i.mac).await.map_err(|e| NetworkError::Hotplug { iface: i.name.clone(), detail: e.to_string() })?;
            connect(ns, i, &tap).await?;
            info!(iface = %i.name, mac = %i.mac, tap, port, addresses = ?i.addresses, "interface mirrored into the VM");
            self.attached.push(Attached { name: i.name.clone(), mac: i.mac.clone(), port, addresses: i.addresses.clone() });
        }
        Ok(Some(ag::UpdateNetworkRequest {
            container_id: container_id.to_string(),
            interfaces: ifaces
                .iter()
                .map(|i| ag::Interface { name: i.name.clone(), mac: i.mac.clone(), mtu: i.mtu, addresses: i.addresses.clone(), ..Default::default() })
                .collect(),
            routes: routes
                .iter()
                .map(|r| ag::Route {
                    dest: r.dest.clone(),
                    gateway: r.gateway.clone(),
                    device: r.device.clone(),
                    source: r.source.clone(),
                    scope: r.scope.clone(),
                    family: r.family,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }))
    }
}

/// Joins `iface` and `tap`: each one's ingress is redirected to the other's egress (tc mirred), so
/// every frame crosses unchanged and the host's stack never sees the container's traffic. Frames from
/// the guest (the tap's ingress) cross only when they carry the interface's own MAC and addresses
/// ([`guest_filters`]); the rest go to a link that is down ([`SINK`]), which drops them.
async fn connect(ns: BorrowedFd<'_>, iface: &Interface, tap: &str) -> Result<(), NetworkError> {
    let mtu = iface.mtu.to_string();
    run_in(ns, "ip", &["link", "set", "dev", tap, "mtu", &mtu, "up"]).await?;
    // The sink: a veth pair left down (this host's kernel has neither tc's drop action nor a dummy link).
    if run_in(ns, "ip", &["link", "show", "dev", SINK]).await.is_err() {
        run_in(ns, "ip", &["link", "add", SINK, "type", "veth", "peer", "name", SINK_PEER]).await?;
    }
    for (from, filters) in [(iface.name.as_str(), vec![match_all(tap)]), (tap, guest_filters(iface))] {
        // A qdisc left by an earlier VM in this namespace (a restore into it) is replaced.
        let _ = run_in(ns, "tc", &["qdisc", "del", "dev", from, "ingress"]).await;
        run_in(ns, "tc", &["qdisc", "add", "dev", from, "ingress"]).await?;
        for f in filters {
            let mut args = vec!["filter".to_string(), "add".into(), "dev".into(), from.to_string(), "parent".into(), "ffff:".into()];
            args.extend(f);
            run_in(ns, "tc", &args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        }
    }
    Ok(())
}

/// The down link frames are dropped into; its name ends like a tap's, so it is never mirrored itself.
const SINK: &str = "sink_kr";
const SINK_PEER: &str = "sinkp_kr";

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Every frame from `from` goes to `to` (host to guest).
fn match_all(to: &str) -> Vec<String> {
    words(&format!("prio 100 protocol all u32 match u8 0 0 action mirred egress redirect dev {to}"))
}

/// The tap's ingress filters (frames the guest sends), in priority order: DHCP server replies (IPv4 UDP
/// from port 67, DHCPv6 from 547), router advertisements and redirects go to the sink; IPv4 (no IP
/// options, or IGMP with Router Alert) and ARP pass only from the interface's MAC and with one of its
/// IPv4 addresses as the sender (ARP probes with 0.0.0.0 too); IPv6 passes only from its MAC, as TCP,
/// UDP, ICMPv6 or a fragment, without other extension headers (so MLD, which needs hop-by-hop, does not
/// pass; the guest makes its own link-local addresses, so IPv6 sources are bound to the MAC, not to an
/// address); everything else goes to the sink. The u32 offsets are those of the network header (a u32
/// match must be 4-byte aligned, a u16 one 2-byte aligned); the Ethernet source MAC is 8 bytes before it.
pub fn guest_filters(iface: &Interface) -> Vec<Vec<String>> {
    let m: Vec<u8> = iface.mac.split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
    let (mac_hi, mac_lo) = (u32::from_be_bytes([m[0], m[1], m[2], m[3]]), u16::from_be_bytes([m[4], m[5]]));
    let src_mac = format!("match u32 0x{mac_hi:08x} 0xffffffff at -8 match u16 0x{mac_lo:04x} 0xffff at -4");
    let pass = format!("action mirred egress redirect dev {}", iface.name);
    let sink = format!("action mirred egress redirect dev {SINK}");
    let mut f = vec![
        // The sink first: while the rules are added nothing passes unfiltered.
        words(&format!("prio 100 protocol all u32 match u8 0 0 {sink}")),
        words(&format!("prio 1 protocol ip u32 match u8 17 0xff at 9 match u16 67 0xffff at 20 {sink}")),
        words(&format!("prio 2 protocol ipv6 u32 match u8 58 0xff at 6 match u8 134 0xff at 40 {sink}")),
        words(&format!("prio 3 protocol ipv6 u32 match u8 58 0xff at 6 match u8 137 0xff at 40 {sink}")),
        words(&format!("prio 4 protocol ipv6 u32 match u8 17 0xff at 6 match u16 547 0xffff at 40 {sink}")),
    ];
    let v4: Vec<std::net::Ipv4Addr> = iface.addresses.iter().filter_map(|a| a.split('/').next()?.parse().ok()).collect();
    for (i, a) in v4.iter().enumerate().take(32) {
        let o = a.octets();
        let (hi, lo) = (u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]));
        f.push(words(&format!("prio {} protocol ip u32 match u8 0x45 0xff at 0 match ip src {a}/32 {src_mac} {pass}", 10 + i)));
        // IGMP membership reports carry the Router Alert option (IHL 6).
        f.push(words(&format!("prio {} protocol ip u32 match u8 0x46 0xff at 0 match u8 2 0xff at 9 match ip src {a}/32 {src_mac} {pass}", 10 + i)));
        // ARP over Ethernet/IPv4: sender MAC at 8, sender address at 14.
        f.push(words(&format!(
            "prio {} protocol arp u32 match u32 0x00010800 0xffffffff at 0 match u32 0x{mac_hi:08x} 0xffffffff at 8 match u16 0x{mac_lo:04x} 0xffff at 12 match u16 0x{hi:04x} 0xffff at 14 match u16 0x{lo:04x} 0xffff at 16 {src_mac} {pass}",
            50 + i
        )));
    }
    // ARP probes (sender address 0.0.0.0) from the interface's MAC: they update no neighbour table.
    f.push(words(&format!(
        "prio 89 protocol arp u32 match u32 0x00010800 0xffffffff at 0 match u32 0x{mac_hi:08x} 0xffffffff at 8 match u16 0x{mac_lo:04x} 0xffff at 12 match u16 0 0xffff at 14 match u16 0 0xffff at 16 {src_mac} {pass}"
    )));
    // TCP, UDP, ICMPv6, and fragments (a fragmented router advertisement is refused by the receiver).
    for (i, nh) in [6u8, 17, 58, 44].iter().enumerate() {
        f.push(words(&format!("prio {} protocol ipv6 u32 match u8 {nh} 0xff at 6 {src_mac} {pass}", 90 + i)));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = r#"[{"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,"addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
      {"ifname":"eth0","link_type":"ether","address":"0A:58:0A:58:00:05","mtu":1450,"linkinfo":{"info_kind":"veth"},
       "addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"},{"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},{"family":"inet6","local":"fd00::5","prefixlen":64,"scope":"global"}]},
      {"ifname":"tap0_kr","link_type":"ether","address":"0a:58:0a:58:00:05","mtu":1450,"linkinfo":{"info_kind":"tun"},"addr_info":[]},
      {"ifname":"othertap","link_type":"ether","address":"0a:58:0a:58:00:06","mtu":1500,"linkinfo":{"info_kind":"tun"},"addr_info":[]}]"#;

    #[test]
    fn interfaces_are_ethernet_links_that_are_not_taps_with_global_addresses() {
        let i = parse_interfaces(ADDR).unwrap();
        assert_eq!(i, vec![Interface { name: "eth0".into(), mac: "0a:58:0a:58:00:05".into(), mtu: 1450, addresses: vec!["10.88.0.5/16".into(), "fd00::5/64".into()] }]);
        assert!(parse_interfaces("{}").is_err());
        assert!(parse_interfaces(r#"[{"ifname":"e","link_type":"ether","address":"zz"}]"#).is_err());
    }

    #[test]
    fn routes_skip_kernel_made_and_foreign_ones() {
        let i = parse_interfaces(ADDR).unwrap();
        let v4 = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0","flags":[]},{"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5"},
                    {"dst":"10.99.0.0/16","dev":"eth0","scope":"link"},{"dst":"default","gateway":"1.1.1.1","dev":"other"}]"#;
        let r = parse_routes(v4, 4, &i).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].dest.as_str(), r[0].gateway.as_str(), r[0].device.as_str()), ("default", "10.88.0.1", "eth0"));
        assert_eq!((r[1].dest.as_str(), r[1].scope.as_str()), ("10.99.0.0/16", "link"));
        let v6 = r#"[{"dst":"fe80::/64","dev":"eth0"},{"dst":"default","gateway":"fd00::1","dev":"eth0"}]"#;
        let r = parse_routes(v6, 6, &i).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].family, 6);
    }

    #[test]
    fn the_guests_frames_pass_only_with_the_interfaces_mac_and_addresses() {
        let i = Interface { name: "eth0".into(), mac: "0a:58:0a:58:00:05".into(), mtu: 1450, addresses: vec!["10.88.0.5/16".into(), "fd00::5/64".into()] };
        let f: Vec<String> = guest_filters(&i).iter().map(|w| w.join(" ")).collect();
        let to_iface: Vec<&String> = f.iter().filter(|l| l.ends_with("redirect dev eth0")).collect();
        assert!(to_iface.iter().all(|l| l.contains("match u32 0x0a580a58 0xffffffff at -8 match u16 0x0005 0xffff at -4")), "{to_iface:#?}");
        assert!(to_iface.iter().any(|l| l.contains("protocol ip ") && l.contains("match ip src 10.88.0.5/32") && l.contains("match u8 0x45 0xff at 0")), "{f:#?}");
        assert!(to_iface.iter().any(|l| l.contains("protocol arp") && l.contains("match u16 0x0a58 0xffff at 14 match u16 0x0005 0xffff at 16")), "{f:#?}");
        assert_eq!(to_iface.len(), 3 + 1 + 4, "one IPv4 address (IP, IGMP, ARP), ARP probes, four IPv6 next headers: {f:#?}");
        // Router advertisements, redirects and DHCP server replies are sunk before anything passes; the
        // last rule sinks the rest.
        let prio = |l: &str| l.split_whitespace().nth(1).unwrap().parse::<u32>().unwrap();
        for needle in ["match u8 134 0xff at 40", "match u8 137 0xff at 40", "match u16 67 0xffff at 20", "match u16 547 0xffff at 40"] {
            let l = f.iter().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {f:#?}"));
            assert!(l.ends_with(&format!("dev {SINK}")) && to_iface.iter().all(|p| prio(p) > prio(l)), "{l}");
        }
        assert_eq!(f[0], format!("prio 100 protocol all u32 match u8 0 0 action mirred egress redirect dev {SINK}"), "the sink is added first");
        assert!(f.iter().all(|l| prio(l) <= 100), "the sink is the last priority: {f:#?}");
        // tc refuses unaligned matches ("Illegal match"): every `at` is aligned to its width.
        for l in &f {
            let w: Vec<&str> = l.split_whitespace().collect();
            for (i, x) in w.iter().enumerate() {
                if *x == "at" {
                    let at: i64 = w[i + 1].parse().unwrap();
                    let width = match w[i - 3] {
                        "u32" => 4,
                        "u16" => 2,
                        _ => 1,
                    };
                    assert_eq!(at.rem_euclid(width), 0, "unaligned match in {l}");
                }
            }
        }
        assert!(SINK.ends_with(TAP_SUFFIX) && SINK_PEER.ends_with(TAP_SUFFIX), "the sink is never mirrored");
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_are_recognised() {
        assert!(tap_name(15).len() < 16);
        assert!(tap_name(3).ends_with(TAP_SUFFIX));
    }
}
