//! The agent's errors about containers; `service.rs` maps each kind to its ttrpc code.

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("process {exec_id} of container {id} not found")]
    ProcessNotFound { id: String, exec_id: String },
    #[error("container {0} already exists")]
    Exists(String),
    /// The request itself is wrong (an id, a spec, a signal, a path).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request does not fit the container's state (or the VM's: CRIU cannot run here).
    #[error("{0}")]
    Precondition(String),
    /// A signal for a process that has exited: containerd's NotFound, as runc's shim answers.
    #[error("process {0} already finished")]
    Finished(String),
    #[error("{what} failed: {detail}")]
    Runc { what: String, detail: String },
    /// A runc (or CRIU) command killed at its deadline: typed, never read from a message.
    #[error("{what} failed: timed out; {detail}")]
    TimedOut { what: String, detail: String },
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// `map_err` for an I/O error while doing `what`.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |e| ContainerError::Io(what, e)
}
