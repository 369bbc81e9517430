//! The kata-rs host/guest protocol and the host-side client of the guest agent (criu-bridge).
//!
//! The protocol lives in `protos/agent.proto` and is generated at build time. Two transports reach
//! the agent: AF_VSOCK (a host with `/dev/vhost-vsock`) and hybrid vsock (a unix socket served by
//! `vhost-device-vsock`, where the host asks for a guest port with `CONNECT <port>\n`).

pub mod client;
pub mod transport;

/// Generated protobuf messages.
#[allow(clippy::all, unused, non_camel_case_types, non_snake_case, non_upper_case_globals)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/protocol/agent.rs"));
}

/// Generated ttrpc client and server traits.
#[allow(clippy::all, unused, non_camel_case_types, non_snake_case, non_upper_case_globals)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/protocol/agent_ttrpc.rs"));
}

pub use client::{AgentClient, AgentError};
pub use transport::{Transport, TransportError};

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// The guest's deadline for one `runc create`/`runc exec` (CreateContainer, ExecProcess): a hung runc
/// is reported as such. The host's RPC timeout must leave room for it and the answer
/// ([`MIN_RPC_TIMEOUT`]).
pub const RUNC_SPAWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(45);
/// The shortest RPC timeout the host may use (`agent.rpc_timeout_s`): the guest's spawn deadline plus
/// 10 s for the answer under a loaded TCG guest.
pub const MIN_RPC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(55);
/// After a checkpoint's deadline, how long the agent waits for CRIU to let the container go before it
/// answers; the host waits [`DEADLINE_SLACK`] past the deadline for that answer.
pub const CRIU_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// What the host adds to a checkpoint's or restore's deadline for the agent's answer (its cleanup
/// within [`CRIU_RELEASE_WAIT`], CRIU's log, the reply).
pub const DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_secs(30);
/// After CRIU let go, the bound of the `runc pause`/`resume` that puts the container back before the
/// answer.
pub const CRIU_PUT_BACK: std::time::Duration = std::time::Duration::from_secs(5);
const _: () = assert!(CRIU_RELEASE_WAIT.as_secs() + CRIU_PUT_BACK.as_secs() + 5 <= DEADLINE_SLACK.as_secs());
const _: () = assert!(RUNC_SPAWN_DEADLINE.as_secs() + 10 <= MIN_RPC_TIMEOUT.as_secs());

/// The longest the agent takes to answer WaitOom (a long poll); the host's deadline for the call is
/// this plus [`OOM_WAIT_SLACK`].
pub const OOM_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(20);
/// What the host adds to [`OOM_WAIT_MAX`] for its WaitOom deadline (a loaded TCG guest answers late).
pub const OOM_WAIT_SLACK: std::time::Duration = std::time::Duration::from_secs(15);

/// Re-exported so that the guest agent serves exactly the ttrpc this client speaks.
pub use ttrpc;
