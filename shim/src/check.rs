//! `containerd-shim-kata-rs-v2 check`: is this host ready to run kata-rs, and does CRIU work in the guest?
use std::{fmt, path::Path, time::Duration};

use agent_client::agent::{CheckRequest, CriuCheckRequest};
use vmm::{accel, config::resolve_program, SharedFs, VsockSetting};

use crate::{config::Config, sandbox::Sandbox};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.name, if self.ok { "ok" } else { "FAIL" }, self.detail)
    }
}

fn item(name: &'static str, ok: bool, detail: impl Into<String>) -> Item {
    Item { name, ok, detail: detail.into() }
}

fn file_item(name: &'static str, p: &Path) -> Item {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => item(name, true, format!("{} ({} bytes)", p.display(), m.len())),
        Ok(_) => item(name, false, format!("{} is not a file", p.display())),
        Err(e) => item(name, false, format!("{}: {e}; build it with 'make guest-image' or set the path in configuration.toml", p.display())),
    }
}

/// Runs every check, printing each line as it is decided. Returns all items.
pub async fn run(config: &Config, mut out: impl FnMut(&Item)) -> Vec<Item> {
    let mut items = Vec::new();
    let mut push = |i: Item, items: &mut Vec<Item>| {
        out(&i);
        items.push(i);
    };
    let h = &config.hypervisor;
    let source = config.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in defaults".into());
    push(item("config", true, source), &mut items);

    let qemu = resolve_program(&h.qemu_path);
    let qemu_item = match &qemu {
        None => item("qemu", false, format!("{} not found; install qemu-system-x86 or set hypervisor.qemu_path", h.qemu_path.display())),
        Some(p) => match std::process::Command::new(p).arg("--version").output() {
            Ok(o) if o.status.success() => {
                let v = String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string();
                item("qemu", true, format!("{} {v}", p.display()))
            }
            Ok(o) => item("qemu", false, format!("{} --version failed: {}", p.display(), String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => item("qemu", false, format!("{}: {e}", p.display())),
        },
    };
    push(qemu_item, &mut items);
    push(file_item("kernel", &h.kernel), &mut items);
    push(file_item("initrd", &h.initrd), &mut items);

    let have_vhost = Path::new("/dev/vhost-vsock").exists();
    let vsock = match (h.vsock, have_vhost) {
        (VsockSetting::Vhost, false) => item("vsock", false, "hypervisor.vsock = \"vhost\" but /dev/vhost-vsock is missing (modprobe vhost_vsock)"),
        (VsockSetting::Vhost, true) | (VsockSetting::Auto, true) => item("vsock", true, "vhost-vsock (/dev/vhost-vsock)"),
        (_, _) => match resolve_program(&h.vhost_device_vsock_path) {
            Some(p) => item("vsock", true, format!("hybrid vsock via {}", p.display())),
            None => item(
                "vsock",
                false,
                format!("no /dev/vhost-vsock and {} not found; run 'make setup' (cargo install vhost-device-vsock)", h.vhost_device_vsock_path.display()),
            ),
        },
    };
    push(vsock, &mut items);
    let fs = match h.shared_fs {
        SharedFs::Virtio9p => item("shared-fs", true, "virtio-9p (served by QEMU)"),
        SharedFs::VirtioFs => match resolve_program(&h.virtiofsd_path) {
            Some(p) => item("shared-fs", true, format!("virtio-fs via {}", p.display())),
            None => item("shared-fs", false, format!("{} not found; install it or set hypervisor.shared_fs = \"virtio-9p\"", h.virtiofsd_path.display())),
        },
    };
    push(fs, &mut items);

    if let Some(q) = &qemu {
        let c = accel::choose(h, q, &accel::default_cache_dir(&config.runtime.root)).await;
        let warning = if c.accel == vmm::Accel::Tcg { format!(" (warning: {})", accel::TCG_WARNING) } else { String::new() };
        push(item("accel", true, format!("{}: {}{warning}", c.accel, c.reason)), &mut items);
    }
    if items.iter().any(|i| !i.ok) {
        push(item("boot", false, "skipped: fix the failures above first"), &mut items);
        return items;
    }

    let id = format!("check-{}", std::process::id());
    let sandbox = match Sandbox::start(config, &id).await {
        Ok(s) => s,
        Err(e) => {
            push(item("boot", false, e.to_string()), &mut items);
            return items;
        }
    };
    push(item("boot", true, format!("guest agent answered {:.1} s after QEMU started", sandbox.boot_time.as_secs_f64())), &mut items);
    let timeout = Duration::from_secs(120);
    match sandbox.agent.call("Check", timeout, |c, ctx| async move { c.check(ctx, &CheckRequest { tool_versions: true, ..Default::default() }).await }).await {
        Ok(r) => push(
            item("agent", true, format!("criu-bridge {} on kernel {}; {}; criu {}", r.agent_version, r.kernel_release, r.runc_version, r.criu_version)),
            &mut items,
        ),
        Err(e) => push(item("agent", false, e.to_string()), &mut items),
    }
    match sandbox.agent.call("CriuCheck", timeout, |c, ctx| async move { c.criu_check(ctx, &CriuCheckRequest::new()).await }).await {
        Ok(r) if r.exit_code == 0 => {
            // CRIU prints its verdict ("Looks good.") on stdout; probe noise goes to stderr.
            let verdict = r.output.lines().find(|l| l.contains("Looks good")).unwrap_or("exit status 0").trim().to_string();
            push(item("criu", true, format!("criu check: {verdict}")), &mut items)
        }
        Ok(r) => {
            let errors: Vec<&str> = r.output.lines().filter(|l| l.contains("Error") || l.contains("rror:")).collect();
            push(item("criu", false, format!("criu check exited {}: {}", r.exit_code, errors.join(" | "))), &mut items)
        }
        Err(e) => push(item("criu", false, e.to_string()), &mut items),
    }
    sandbox.stop(None).await;
    items
}
