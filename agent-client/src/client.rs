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
    /// The guest answered with an error status. `code` is the status code as sent (a typed value, not
    /// read from the text); `message` is the guest's text, bounded and with control characters escaped.
    #[error("agent call {method} failed: {message} ({code:?})")]
    Rpc { method: &'static str, code: ttrpc::Code, message: String },
    #[error("agent call {method} failed: {message}")]
    Call { method: &'static str, message: String },
    #[error("agent call {method} timed out after {timeout:?}")]
    Timeout { method: &'static str, timeout: Duration },
    /// The VM stopped (QEMU exited, the guest panicked or shut down): no answer will come.
    #[error("agent call {method} cannot be answered: the VM is gone ({reason})")]
    VmGone { method: &'static str, reason: String },
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

    /// The status code the guest answered with, if it answered with an error status.
    pub fn guest_code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Host-side handle to the guest agent. Cheap to clone: clones share one connection.
///
/// A call that times out leaves an entry in the ttrpc client's table of calls in flight (the client
/// removes one only when its answer arrives, which a guest need never send). So after a timeout the next
/// call first replaces the shared connection with a new one; calls still running on the old one keep
/// it until they end, and then it is closed, with its table.
#[derive(Clone)]
pub struct AgentClient {
    inner: std::sync::Arc<std::sync::Mutex<agent_ttrpc::AgentClient>>,
    /// A call timed out on the current connection: the next call connects again first.
    stale: std::sync::Arc<std::sync::atomic::AtomicBool>,
    transport: Transport,
    /// Default deadline of one call.
    pub rpc_timeout: Duration,
    /// Set (with the reason) once the VM is gone: calls then fail at once instead of at their deadline.
    gone: Option<tokio::sync::watch::Receiver<Option<String>>>,
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
                    let client = AgentClient::over(socket, transport.clone(), rpc_timeout);
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

    fn over(socket: ttrpc::r#async::transport::Socket, transport: Transport, rpc_timeout: Duration) -> Self {
        AgentClient {
            inner: std::sync::Arc::new(std::sync::Mutex::new(agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket)))),
            stale: Default::default(),
            transport,
            rpc_timeout,
            gone: None,
        }
    }

    /// The connection a call runs on: a new one when a call timed out on the current one (if that
    /// connect fails, the current one, and the next call tries again).
    async fn connection(&self, timeout: Duration) -> agent_ttrpc::AgentClient {
        use std::sync::atomic::Ordering;
        if self.stale.swap(false, Ordering::SeqCst) {
            match self.transport.connect_once(timeout.min(Duration::from_secs(2))).await {
                Ok(socket) => {
                    debug!(transport = %self.transport, "a new agent connection after a timed-out call");
                    let fresh = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket));
                    *self.inner.lock().unwrap() = fresh.clone();
                    return fresh;
                }
                Err(e) => {
                    debug!(error = %e, "no new agent connection; the current one is used");
                    self.stale.store(true, Ordering::SeqCst);
                }
            }
        }
        self.inner.lock().unwrap().clone()
    }

    /// This client, failing every call at once (and every call in flight) when `gone` holds a reason.
    pub fn with_vm_watch(mut self, gone: tokio::sync::watch::Receiver<Option<String>>) -> Self {
        self.gone = Some(gone);
        self
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
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
        let started = std::time::Instant::now();
        if let Some(reason) = self.gone.as_ref().and_then(|g| g.borrow().clone()) {
            return Err(AgentError::VmGone { method, reason });
        }
        let conn = self.connection(timeout).await;
        let call = tokio::time::timeout(outer, f(conn, ctx));
        let result = match self.gone.clone() {
            None => call.await,
            Some(mut gone) => {
                let reason = gone.borrow_and_update().clone();
                if let Some(reason) = reason {
                    return Err(AgentError::VmGone { method, reason });
                }
                tokio::select! {
                    r = call => r,
                    _ = gone.changed() => {
                        let reason = gone.borrow().clone().unwrap_or_else(|| "the VM was stopped".into());
                        return Err(AgentError::VmGone { method, reason });
                    }
                }
            }
        };
        let failure = match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(ttrpc::Error::RpcStatus(s))) => return Err(AgentError::Rpc { method, code: s.code(), message: bounded_text(s.message()) }),
            Err(_) => {
                self.stale.store(true, std::sync::atomic::Ordering::SeqCst);
                AgentError::Timeout { method, timeout }
            }
            // The ttrpc client's own deadline (the context's) ends the call with an untyped error: one
            // that came at or after the deadline is the deadline.
            Ok(Err(_)) if started.elapsed() >= timeout => {
                self.stale.store(true, std::sync::atomic::Ordering::SeqCst);
                AgentError::Timeout { method, timeout }
            }
            Ok(Err(e)) => AgentError::Call { method, message: bounded_text(&e.to_string()) },
        };
        // A dead VM often shows first as a closed stream ("early eof"): when the VM watcher confirms it
        // shortly after, say that the VM is gone instead.
        if let Some(mut gone) = self.gone.clone() {
            let confirmed = tokio::time::timeout(VM_GONE_GRACE, async {
                loop {
                    if let Some(r) = gone.borrow_and_update().clone() {
                        return Some(r);
                    }
                    if gone.changed().await.is_err() {
                        return Some("the VM was stopped".to_string());
                    }
                }
            })
            .await;
            if let Ok(Some(reason)) = confirmed {
                return Err(AgentError::VmGone { method, reason });
            }
        }
        Err(failure)
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

/// How long a failed call waits for the VM watcher to say whether the VM is gone.
const VM_GONE_GRACE: Duration = Duration::from_secs(2);

/// Longest message from the guest kept in an error (the rest is cut, and the cut is said).
pub const MAX_GUEST_MESSAGE: usize = 16 * 1024;

/// Text from the guest made safe to log and show: at most [`MAX_GUEST_MESSAGE`] bytes, and control
/// characters other than newline and tab escaped (no terminal escapes, no fake log lines).
pub fn bounded_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_GUEST_MESSAGE) + 32);
    for (i, ch) in s.char_indices() {
        if i >= MAX_GUEST_MESSAGE {
            out.push_str(&format!("... ({} more bytes cut)", s.len() - i));
            break;
        }
        match ch {
            '\n' | '\t' => out.push(ch),
            c if c.is_control() => out.push_str(&c.escape_default().to_string()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake guest that accepts hybrid-vsock connections and reads requests without ever answering;
    /// it reports each connection's end (the host closed it).
    async fn silent_guest(path: std::path::PathBuf) -> (tokio::sync::mpsc::UnboundedReceiver<usize>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let closed = closed_tx.clone();
                tokio::spawn(async move {
                    let mut line = [0u8; 13];
                    s.read_exact(&mut line).await.unwrap();
                    assert_eq!(&line, b"CONNECT 1024\n");
                    s.write_all(b"OK 1\n").await.unwrap();
                    let mut buf = vec![0u8; 4096];
                    while s.read(&mut buf).await.map(|r| r > 0).unwrap_or(false) {}
                    let _ = closed.send(n);
                });
            }
        });
        (closed_rx, accepted)
    }

    #[tokio::test]
    async fn after_a_timed_out_call_the_next_runs_on_a_new_connection_and_the_old_one_is_closed() {
        let dir = std::env::temp_dir().join(format!("agent-client-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hv.sock");
        let (mut closed, accepted) = silent_guest(path.clone()).await;
        let transport = Transport::Hybrid { uds: path, port: 1024 };
        let socket = transport.connect_once(Duration::from_secs(2)).await.unwrap();
        let client = AgentClient::over(socket, transport, Duration::from_millis(100));
        let check = |c: agent_ttrpc::AgentClient, ctx| async move { c.check(ctx, &CheckRequest::new()).await };
        let e = client.call("Check", Duration::from_millis(100), check).await.unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The next call connects again, and the connection holding the stale call is closed.
        let clone = client.clone();
        let e = clone.call("Check", Duration::from_millis(100), check).await.unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        let first = tokio::time::timeout(Duration::from_secs(5), closed.recv()).await.expect("the first connection is closed").unwrap();
        assert_eq!(first, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_text_is_bounded_and_escaped() {
        assert_eq!(bounded_text("a\nb\tc"), "a\nb\tc");
        assert_eq!(bounded_text("\x1b[31mred\r"), "\\u{1b}[31mred\\r");
        let long = "x".repeat(MAX_GUEST_MESSAGE * 4);
        let b = bounded_text(&long);
        assert!(b.len() < MAX_GUEST_MESSAGE + 64 && b.ends_with("(49152 more bytes cut)"), "{}", &b[b.len() - 40..]);
    }
}
