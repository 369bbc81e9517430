//! A typed async client of the guest agent with bounded connect and per-call timeouts.
use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tracing::{debug, trace};

use crate::{
    agent::CheckRequest,
    agent_ttrpc,
    transport::{Transport, TransportError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent at {addr} did not answer within {waited:?}; last error: {last}")]
    ConnectTimeout { addr: String, waited: Duration, last: String },
    #[error("agent call {method} failed: {message}")]
    Rpc { method: &'static str, message: String },
    #[error("agent call {method} timed out after {timeout:?}")]
    Timeout { method: &'static str, timeout: Duration },
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl AgentError {
    /// The message the guest sent for a failed call (without the "agent call X failed" prefix).
    pub fn guest_message(&self) -> Option<&str> {
        match self {
            AgentError::Rpc { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// Host-side handle to the guest agent. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
    transport: Transport,
    /// Default deadline of one call.
    pub rpc_timeout: Duration,
}

impl AgentClient {
    /// Connects, retrying every 50 ms until the agent answers a Check call or `total` has passed.
    pub async fn connect(transport: Transport, total: Duration, rpc_timeout: Duration) -> Result<Self, AgentError> {
        let start = Instant::now();
        let mut last = String::from("no attempt made");
        let mut attempts = 0u32;
        while start.elapsed() < total {
            attempts += 1;
            let left = total.saturating_sub(start.elapsed());
            match transport.connect_once(left.min(Duration::from_secs(2))).await {
                Ok(socket) => {
                    let client = AgentClient {
                        inner: agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket)),
                        transport: transport.clone(),
                        rpc_timeout,
                    };
                    // Once connected, the first answer may take a while on a slow (TCG) guest: give it
                    // its own bound rather than what is left of this round.
                    let probe = left.max(Duration::from_secs(10));
                    match client.call("Check", probe, |c, ctx| async move { c.check(ctx, &CheckRequest::new()).await }).await {
                        Ok(_) => {
                            debug!(%transport, attempts, elapsed = ?start.elapsed(), "agent connected");
                            return Ok(client);
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => {
                    trace!(error = %e, "agent not reachable yet");
                    last = e.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(AgentError::ConnectTimeout { addr: transport.to_string(), waited: start.elapsed(), last })
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The generated client, for calls that need no wrapper.
    pub fn raw(&self) -> &agent_ttrpc::AgentClient {
        &self.inner
    }

    /// Runs one call with a deadline; maps ttrpc errors to [`AgentError`] naming the method.
    ///
    /// The deadline is enforced on the host side and also sent to the guest in the ttrpc context.
    pub async fn call<T, F, Fut>(&self, method: &'static str, timeout: Duration, f: F) -> Result<T, AgentError>
    where
        F: FnOnce(agent_ttrpc::AgentClient, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let ctx = ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64);
        // A little slack so the guest's own timeout error (with its message) wins the race.
        let outer = timeout + Duration::from_secs(2);
        match tokio::time::timeout(outer, f(self.inner.clone(), ctx)).await {
            Err(_) => Err(AgentError::Timeout { method, timeout }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(AgentError::Rpc { method, message: rpc_message(e) }),
        }
    }

    /// [`Self::call`] with the default deadline.
    pub async fn call_default<T, F, Fut>(&self, method: &'static str, f: F) -> Result<T, AgentError>
    where
        F: FnOnce(agent_ttrpc::AgentClient, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        self.call(method, self.rpc_timeout, f).await
    }
}

fn rpc_message(e: ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = format!("{:?}", s.code());
            format!("{} ({code})", s.message())
        }
        other => other.to_string(),
    }
}
