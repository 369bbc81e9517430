//! The container's network namespace in the guest: a named one (`/run/netns/<id>`) that runc joins,
//! so that CRIU treats it as external (runc passes it as `extRootNetNS`) and a restore joins the new
//! VM's namespace, with its own interfaces and addresses. Interfaces arrive hot-plugged; the host says
//! which (by MAC) and how they are configured.
use std::{process::Command, sync::Arc, time::Duration};

use serde_json::Value;
use tracing::info;

use agent_client::agent::UpdateNetworkRequest;

use crate::{cmd, reaper::Reaper};

const IP: &str = "/bin/ip";
pub const NETNS_DIR: &str = "/run/netns";
/// How long a hot-plugged device may take to appear in the guest.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(30);
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

async fn ip(reaper: &Arc<Reaper>, args: &[&str]) -> Result<String, String> {
    let mut c = Command::new(IP);
    c.args(args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let out = cmd::run_command(reaper, c, Some(STEP_TIMEOUT)).await.map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.ok() {
        return Err(format!("ip {}: {}", args.join(" "), out.stderr.trim()));
    }
    Ok(out.stdout)
}

/// Creates the container's named network namespace with loopback up; returns its path.
pub async fn create_netns(reaper: &Arc<Reaper>, id: &str) -> Result<String, String> {
    ip(reaper, &["netns", "add", id]).await?;
    ip(reaper, &["-n", id, "link", "set", "dev", "lo", "up"]).await?;
    Ok(format!("{NETNS_DIR}/{id}"))
}

pub async fn delete_netns(reaper: &Arc<Reaper>, id: &str) {
    if std::path::Path::new(NETNS_DIR).join(id).exists() {
        if let Err(e) = ip(reaper, &["netns", "del", id]).await {
            info!(id, error = %e, "removing the container's network namespace");
        }
    }
}

/// The link with `mac` (name), in namespace `ns` or in the guest's own when `ns` is None.
async fn link_with_mac(reaper: &Arc<Reaper>, ns: Option<&str>, mac: &str) -> Result<Option<String>, String> {
    let out = match ns {
        Some(n) => ip(reaper, &["-n", n, "-j", "link", "show"]).await?,
        None => ip(reaper, &["-j", "link", "show"]).await?,
    };
    let links: Value = serde_json::from_str(&out).map_err(|e| format!("ip -j link show: {e}"))?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l.get("address").and_then(Value::as_str).is_some_and(|a| a.eq_ignore_ascii_case(mac)))
        .and_then(|l| l.get("ifname").and_then(Value::as_str).map(str::to_string)))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() < 16 && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && n != "lo"
}

fn valid_mac(m: &str) -> bool {
    let p: Vec<&str> = m.split(':').collect();
    p.len() == 6 && p.iter().all(|x| x.len() == 2 && x.chars().all(|c| c.is_ascii_hexdigit()))
}

fn valid_cidr(c: &str) -> bool {
    match c.split_once('/') {
        Some((a, l)) => a.parse::<std::net::IpAddr>().is_ok() && l.parse::<u8>().is_ok_and(|l| l <= 128),
        None => false,
    }
}

/// Checks the request before anything changes.
pub fn validate(req: &UpdateNetworkRequest) -> Result<(), String> {
    if req.interfaces.len() > 16 || req.routes.len() > 256 {
        return Err(format!("{} interfaces and {} routes: too many", req.interfaces.len(), req.routes.len()));
    }
    for i in &req.interfaces {
        if !valid_name(&i.name) || !valid_mac(&i.mac) || !(68..=65535).contains(&i.mtu) || i.addresses.len() > 64 {
            return Err(format!("interface {:?} (mac {:?}, mtu {}): invalid", i.name, i.mac, i.mtu));
        }
        if let Some(a) = i.addresses.iter().find(|a| !valid_cidr(a)) {
            return Err(format!("interface {}: address {a:?} is not a CIDR", i.name));
        }
    }
    for r in &req.routes {
        let dest_ok = r.dest == "default" || valid_cidr(&r.dest) || r.dest.parse::<std::net::IpAddr>().is_ok();
        let gw_ok = r.gateway.is_empty() || r.gateway.parse::<std::net::IpAddr>().is_ok();
        let src_ok = r.source.is_empty() || r.source.parse::<std::net::IpAddr>().is_ok();
        if !dest_ok
            || !gw_ok
            || !src_ok
            || !req.interfaces.iter().any(|i| i.name == r.device)
            || !matches!(r.scope.as_str(), "" | "link" | "global")
            || !matches!(r.family, 4 | 6)
        {
            return Err(format!("route {} via {:?} dev {}: invalid", r.dest, r.gateway, r.device));
        }
    }
    Ok(())
}

/// Moves each interface (found by MAC once hot-plugged) into namespace `ns`, names it, sets its MTU,
/// addresses and routes. Idempotent: an interface already there is only updated.
pub async fn update(reaper: &Arc<Reaper>, ns: &str, req: &UpdateNetworkRequest) -> Result<(), String> {
    validate(req)?;
    for i in &req.interfaces {
        let current = match link_with_mac(reaper, Some(ns), &i.mac).await? {
            Some(n) => n,
            None => {
                let since = std::time::Instant::now();
                let guest_name = loop {
                    if let Some(n) = link_with_mac(reaper, None, &i.mac).await? {
                        break n;
                    }
                    if since.elapsed() > APPEAR_TIMEOUT {
                        return Err(format!("no device with MAC {} appeared in the guest within {APPEAR_TIMEOUT:?} (hot-plug of {})", i.mac, i.name));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                info!(mac = %i.mac, guest_name, waited_ms = since.elapsed().as_millis() as u64, "hot-plugged device found");
                ip(reaper, &["link", "set", "dev", &guest_name, "netns", ns]).await?;
                guest_name
            }
        };
        if current != i.name {
            ip(reaper, &["-n", ns, "link", "set", "dev", &current, "down"]).await?;
            ip(reaper, &["-n", ns, "link", "set", "dev", &current, "name", &i.name]).await?;
        }
        ip(reaper, &["-n", ns, "link", "set", "dev", &i.name, "mtu", &i.mtu.to_string(), "up"]).await?;
        for a in &i.addresses {
            ip(reaper, &["-n", ns, "addr", "replace", a, "dev", &i.name]).await?;
        }
        info!(name = %i.name, mac = %i.mac, addresses = ?i.addresses, "interface configured");
    }
    // Directly connected routes first: a gateway must be reachable before a route through it.
    let mut routes: Vec<_> = req.routes.iter().collect();
    routes.sort_by_key(|r| !r.gateway.is_empty());
    for r in routes {
        let fam = if r.family == 6 { "-6" } else { "-4" };
        let mut args = vec!["-n", ns, fam, "route", "replace", r.dest.as_str()];
        if !r.gateway.is_empty() {
            args.extend(["via", r.gateway.as_str()]);
        }
        args.extend(["dev", r.device.as_str()]);
        if !r.source.is_empty() {
            args.extend(["src", r.source.as_str()]);
        }
        if !r.scope.is_empty() {
            args.extend(["scope", r.scope.as_str()]);
        }
        ip(reaper, &args).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_client::agent::{Interface, Route};

    fn req() -> UpdateNetworkRequest {
        UpdateNetworkRequest {
            container_id: "c".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:05".into(),
                mtu: 1500,
                addresses: vec!["10.88.0.5/16".into()],
                ..Default::default()
            }],
            routes: vec![Route { dest: "default".into(), gateway: "10.88.0.1".into(), device: "eth0".into(), family: 4, ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked_before_anything_changes() {
        validate(&req()).unwrap();
        let mut r = req();
        r.interfaces[0].name = "eth0; reboot".into();
        assert!(validate(&r).is_err());
        let mut r = req();
        r.interfaces[0].addresses.push("10.0.0.1".into());
        assert!(validate(&r).is_err());
        let mut r = req();
        r.routes[0].device = "eth9".into();
        assert!(validate(&r).is_err());
        let mut r = req();
        r.interfaces[0].mtu = 10;
        assert!(validate(&r).is_err());
    }
}
