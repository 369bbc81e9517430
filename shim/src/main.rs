//! containerd-shim-kata-rs-v2: the binary containerd runs for runtime `io.containerd.kata-rs.v2`.
use std::process::ExitCode;

use anyhow::Context;
use kata_rs_shim::{check, Config};

fn usage() -> &'static str {
    "usage: containerd-shim-kata-rs-v2 [--version | check [--config FILE]]"
}

fn init_logging(level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--version") | Some("-v") => {
            println!("containerd-shim-kata-rs-v2 {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("check") => match cmd_check(&args[2..]) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("containerd-shim-kata-rs-v2 check: {e:#}");
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("{}", usage());
            ExitCode::from(2)
        }
    }
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
    init_logging(&std::env::var("KATA_RS_LOG").unwrap_or_else(|_| "warn".into()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let items = rt.block_on(check::run(&config, |i| println!("{i}")));
    Ok(items.iter().all(|i| i.ok))
}
