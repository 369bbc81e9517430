//! containerd-shim-kata-rs-v2: the binary containerd runs for runtime `io.containerd.kata-rs.v2`.
//!
//! `check` and `--version` are ours, `-info` is containerd 2.x's question about the runtime (`info.rs`); everything else is the containerd shim protocol
//! (`start`, `delete`, and serving the task API), run by the `containerd-shim` crate.
use std::{fs::OpenOptions, os::unix::fs::OpenOptionsExt, process::ExitCode, sync::Mutex};

use anyhow::Context;
use kata_rs_shim::{check, shimcmd, Config};

fn usage() -> &'static str {
    "usage: containerd-shim-kata-rs-v2 [--version | -info | check [--config FILE] | <containerd shim flags> [start|delete]]"
}

fn filter(default: &str) -> tracing_subscriber::EnvFilter {
    let level = std::env::var("KATA_RS_LOG").ok().unwrap_or_else(|| default.to_string());
    tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "info".into())
}

fn log_to_stderr(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(default))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// containerd reads the shim's log from the FIFO `log` in the bundle (the shim's working directory).
fn log_to_containerd(default: &str) {
    let fifo = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open("log");
    match fifo {
        Ok(f) => {
            // Back to blocking writes: dropping log lines is worse than a slow reader.
            unsafe {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
            let _ = tracing_subscriber::fmt().with_env_filter(filter(default)).with_writer(Mutex::new(f)).with_ansi(false).try_init();
        }
        Err(_) => log_to_stderr(default),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--version") | Some("-v") | Some("-version") => {
            println!("containerd-shim-kata-rs-v2 {} (containerd task API v2)", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some("check") => {
            return match cmd_check(&args[2..]) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("containerd-shim-kata-rs-v2 check: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        // containerd 2.x: the runtime's RuntimeInfo (its OCI features) for the options on stdin.
        Some("-info") | Some("--info") => {
            return match kata_rs_shim::info::run(std::io::stdin().lock(), std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("containerd-shim-kata-rs-v2 -info: {e}");
                    ExitCode::from(1)
                }
            };
        }
        None => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
        _ => {}
    }
    let level = Config::discover(None).map(|c| c.runtime.log_level).unwrap_or_else(|_| "info".into());
    let debug = args.iter().any(|a| a == "-debug");
    let level = if debug { "debug".to_string() } else { level };
    match args.last().map(String::as_str) {
        Some("start") | Some("delete") => log_to_stderr(&level),
        _ => log_to_containerd(&level),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-kata-rs-v2: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<shimcmd::KataShim>(shimcmd::RUNTIME_ID, Some(shimcmd::shim_config())));
    // Blocking opens of stdio FIFOs that nobody will ever open must not keep the shim alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::SUCCESS
}

fn cmd_check(args: &[String]) -> anyhow::Result<bool> {
    let mut explicit = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => explicit = Some(std::path::PathBuf::from(it.next().context("--config needs a file")?)),
            other => anyhow::bail!("unknown argument {other:?}; {}", usage()),
        }
    }
    let config = Config::discover(explicit.as_deref())?;
    log_to_stderr("warn");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let items = rt.block_on(check::run(&config, |i| println!("{i}")));
    Ok(items.iter().all(|i| i.ok))
}
