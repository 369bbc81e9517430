//! criu-bridge: the kata-rs guest agent, PID 1 of the guest (no systemd).
//!
//! Boot: a bind mount of the initramfs root moved over `/` (so runc can pivot_root), mount the pseudo filesystems and cgroup2,
//! load modules, bring up `lo`, mount the shared directory, then serve the agent protocol on vsock.
//! With `kata_rs.probe=1` on the kernel command line it only prints a marker and powers off
//! (the host's KVM probe).
mod bundle;
mod cmd;
mod container;
mod criu;
mod error;
mod fdio;
mod init;
mod network;
mod process;
mod reaper;
mod runc;
mod service;
mod state;

use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{error, info, warn};

const PROBE_MARKER: &str = "KATA_RS_PROBE_OK";
const READY_MARKER: &str = "KATA_RS_AGENT_READY";
/// Nice value of the agent's own threads (tools and containers run at 0).
const AGENT_NICE: i32 = -10;

fn main() {
    let pid1 = std::process::id() == 1;
    // The kernel starts init without PATH; runc looks up `criu`, CRIU looks up `ip`, `tar`, `iptables-restore`.
    if pid1 || std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    }
    if let Err(e) = run(pid1) {
        init::console(&format!("criu-bridge: fatal: {e:#}"));
        if pid1 {
            init::power_off();
        }
        std::process::exit(1);
    }
}

fn run(pid1: bool) -> Result<()> {
    if pid1 {
        init::switch_root_if_needed()?;
        init::mount_basics()?;
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params = init::BootParams::parse(&cmdline);
    if params.probe {
        init::console(PROBE_MARKER);
        init::power_off();
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&params.log).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut modules_s = 0.0;
    if pid1 {
        let t = std::time::Instant::now();
        let n = init::load_modules()?;
        modules_s = t.elapsed().as_secs_f64();
        info!(modules = n, seconds = modules_s, "kernel modules loaded");
        init::setup_network()?;
        init::mount_shared(&params)?;
    }
    std::fs::create_dir_all(container::CONTAINERS_DIR)?;
    let t = std::time::Instant::now();
    match runc::seal_binary() {
        Ok(()) => info!(seconds = t.elapsed().as_secs_f64(), "runc runs from a sealed in-memory copy"),
        Err(e) => warn!(error = %e, "no sealed copy of runc: each runc init copies runc itself"),
    }
    if pid1 {
        // The agent answers the host even while CRIU or a container saturates the guest's vCPU: its
        // threads (created from here on) run at a higher priority; every tool it starts is put back to
        // the normal one (reaper::Reaper::spawn).
        // SAFETY: setpriority on the calling thread; no memory is passed.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, AGENT_NICE) };
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(params, modules_s))
}

async fn serve(params: init::BootParams, modules_s: f64) -> Result<()> {
    let reaper = reaper::Reaper::start();
    let containers = Arc::new(container::Containers::new(reaper));
    let service = Arc::new(service::AgentService::new(containers, params.test_fault.clone()));
    let flood = params.test_fault.clone().filter(|f| f.during == init::FaultDuring::VsockFlood);
    let svc = service as Arc<dyn agent_client::agent_ttrpc::Agent + Send + Sync>;
    let services = agent_client::agent_ttrpc::create_agent(svc);
    let addr = format!("vsock://-1:{}", params.port);
    let mut server = ttrpc::r#async::Server::new()
        .bind(&addr)
        .with_context(|| format!("bind {addr}"))?
        .register_service(services);
    server.start().await.context("starting the ttrpc server")?;
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let uptime = uptime.split_whitespace().next().unwrap_or("");
    info!(%addr, uptime, "agent listening");
    // Whatever the log level: the host waits for this line before it connects (see the shim's sandbox.rs).
    // The guest's own phases follow it (read by `make bench`; the host trusts nothing in them).
    init::console(&format!("{READY_MARKER} {addr} uptime={uptime} modules={modules_s:.3}"));
    if let Some(f) = flood {
        f.arm(init::FaultDuring::VsockFlood);
    }
    // Serve until the VM is torn down. SIGTERM (not sent to PID 1 by the kernel) is honoured for non-init runs.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    error!("SIGTERM: shutting down");
    server.shutdown().await.ok();
    Ok(())
}
