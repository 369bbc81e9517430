//! kata-rs virtual machine manager: runs one QEMU guest per sandbox.
//!
//! - [`config`]: the hypervisor settings (from `configuration.toml`).
//! - [`cmdline`]: the QEMU command line, built from settings alone (pure, unit tested).
//! - [`accel`]: KVM when it really runs a guest, else TCG.
//! - [`qmp`]: the QMP client (the `qapi` crate, async).
//! - [`daemon`]: helper daemons (virtiofsd, vhost-device-vsock) and process reaping.
//! - [`hostid`]: the uid and gid of each VM's vhost-device-vsock.
//! - [`vm`]: the lifecycle: start, control, teardown.
//! - [`watch`]: noticing a VM's end (QMP events, QEMU or a helper daemon exiting).

pub mod accel;
pub mod cmdline;
pub mod config;
pub mod console;
pub mod daemon;
pub mod hostid;
pub mod qmp;
pub mod vm;
pub mod vsockcid;
pub mod watch;

pub use accel::Accel;
pub use config::{AccelSetting, SharedFs, VmConfig, VsockSetting};
pub use vm::{AgentChannel, Netns, Vm, VmError, VmSpec};
