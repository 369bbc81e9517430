//! kata-rs shim library: configuration, sandbox (VM + agent) lifecycle, host checks.
//! The binary `containerd-shim-kata-rs-v2` is a thin edge over this.

pub mod cgroups;
pub mod check;
pub mod checkpoint;
pub mod config;
mod create;
pub mod criu_stats;
pub mod error;
pub mod events;
mod exit;
pub mod hooks;
pub mod info;
mod lifecycle;
pub mod metrics;
pub mod mounts;
pub mod network;
mod process;
mod queries;
mod runtime;
pub mod safefs;
pub mod sandbox;
pub mod shimcmd;
pub mod spec;
pub mod stdio;
pub mod task;

pub use config::{Config, ConfigError};
pub use sandbox::{Sandbox, SandboxError};
