//! The task service's errors: one typed enum, mapped to ttrpc status codes in one place (never by
//! reading message text). Each constructor returns the ttrpc error the service answers with.
use agent_client::AgentError;
use containerd_shim::protos::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such task, process or container in this shim.
    #[error("{0}")]
    NotFound(String),
    /// The task or process exists already.
    #[error("{0}")]
    Exists(String),
    /// The request does not fit the task's state (e.g. delete of a running task, a checkpoint during one).
    #[error("{0}")]
    Precondition(String),
    /// The request itself is wrong (bundle, options, checkpoint directory, configuration).
    #[error("{0}")]
    Invalid(String),
    /// The task's VM is gone (QEMU exited, the guest panicked, shut down or reset, or the host ended
    /// it): whatever the path that learnt it, containerd gets one code, FAILED_PRECONDITION, as for a
    /// process that is no longer running. The text says why the VM went.
    #[error("{0}")]
    VmGone(String),
    /// A guest agent call failed; the guest's status code is a typed value.
    #[error(transparent)]
    Agent(AgentError),
    /// Anything else that failed on the host (VM start, mounts, copies, CRIU's failures).
    #[error("{0}")]
    Internal(String),
}

impl TaskError {
    /// The status code containerd gets. A guest's code is passed on only when it tells containerd
    /// something; any other guest failure is INTERNAL.
    pub fn code(&self) -> Code {
        match self {
            TaskError::NotFound(_) => Code::NOT_FOUND,
            TaskError::Exists(_) => Code::ALREADY_EXISTS,
            TaskError::Precondition(_) => Code::FAILED_PRECONDITION,
            TaskError::Invalid(_) => Code::INVALID_ARGUMENT,
            TaskError::VmGone(_) | TaskError::Agent(AgentError::VmGone { .. }) => Code::FAILED_PRECONDITION,
            TaskError::Agent(e) => match e.guest_code() {
                Some(c @ (Code::NOT_FOUND | Code::INVALID_ARGUMENT | Code::ALREADY_EXISTS | Code::FAILED_PRECONDITION)) => c,
                _ => Code::INTERNAL,
            },
            TaskError::Internal(_) => Code::INTERNAL,
        }
    }

    pub fn not_found(m: impl Into<String>) -> ttrpc::Error {
        TaskError::NotFound(m.into()).into()
    }
    pub fn exists(m: impl Into<String>) -> ttrpc::Error {
        TaskError::Exists(m.into()).into()
    }
    pub fn precondition(m: impl Into<String>) -> ttrpc::Error {
        TaskError::Precondition(m.into()).into()
    }
    pub fn invalid(m: impl Into<String>) -> ttrpc::Error {
        TaskError::Invalid(m.into()).into()
    }
    pub fn vm_gone(m: impl Into<String>) -> ttrpc::Error {
        TaskError::VmGone(m.into()).into()
    }
    pub fn internal(m: impl Into<String>) -> ttrpc::Error {
        TaskError::Internal(m.into()).into()
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: ttrpc::Error) -> Code {
        match e {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn each_kind_has_its_code() {
        assert_eq!(code_of(TaskError::not_found("x")), Code::NOT_FOUND);
        assert_eq!(code_of(TaskError::exists("x")), Code::ALREADY_EXISTS);
        assert_eq!(code_of(TaskError::precondition("x")), Code::FAILED_PRECONDITION);
        assert_eq!(code_of(TaskError::invalid("x")), Code::INVALID_ARGUMENT);
        assert_eq!(code_of(TaskError::vm_gone("x")), Code::FAILED_PRECONDITION);
        assert_eq!(code_of(TaskError::internal("x")), Code::INTERNAL);
    }

    #[test]
    fn guest_codes_pass_only_when_meaningful_and_text_is_never_read() {
        let rpc = |code: Code, msg: &str| TaskError::Agent(AgentError::Rpc { method: "M", code, message: msg.into() });
        assert_eq!(rpc(Code::NOT_FOUND, "").code(), Code::NOT_FOUND);
        assert_eq!(rpc(Code::FAILED_PRECONDITION, "").code(), Code::FAILED_PRECONDITION);
        // A guest claiming UNAUTHENTICATED or writing "NOT_FOUND" into its text changes nothing.
        assert_eq!(rpc(Code::UNAUTHENTICATED, "").code(), Code::INTERNAL);
        assert_eq!(rpc(Code::INTERNAL, "code: NOT_FOUND").code(), Code::INTERNAL);
    }

    #[test]
    fn a_gone_vm_has_one_code_whichever_path_learnt_it() {
        let from_agent = TaskError::Agent(AgentError::VmGone { method: "ExecProcess", reason: "QEMU exited".into() });
        assert_eq!(from_agent.code(), Code::FAILED_PRECONDITION);
        assert_eq!(TaskError::VmGone("the VM is gone".into()).code(), Code::FAILED_PRECONDITION);
        // A guest that times out is not a gone VM.
        assert_eq!(TaskError::Agent(AgentError::Timeout { method: "M", timeout: std::time::Duration::from_secs(1) }).code(), Code::INTERNAL);
    }
}
