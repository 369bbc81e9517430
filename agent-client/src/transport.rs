//! Connecting to the guest agent: AF_VSOCK or hybrid vsock (unix socket + `CONNECT <port>\n`).
use std::{fmt, path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

/// How the host reaches the agent's vsock port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Kernel AF_VSOCK to a guest CID (host has `/dev/vhost-vsock`).
    Vsock { cid: u32, port: u32 },
    /// A unix socket served by vhost-device-vsock (or Firecracker/cloud-hypervisor style hybrid vsock).
    Hybrid { uds: PathBuf, port: u32 },
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Transport::Hybrid { uds, port } => write!(f, "hvsock://{}:{port}", uds.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connecting to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
}

/// The longest reply line accepted from the hybrid vsock server ("OK <port>\n").
const MAX_HANDSHAKE_LINE: usize = 64;

impl Transport {
    /// Opens one connection to the agent port. No retries here: see [`crate::AgentClient::connect`].
    pub async fn connect_once(&self, handshake_timeout: Duration) -> Result<ttrpc::r#async::transport::Socket, TransportError> {
        match self {
            Transport::Vsock { cid, port } => {
                let addr = tokio_vsock_addr(*cid, *port);
                let stream = tokio_vsock::VsockStream::connect(addr)
                    .await
                    .map_err(|source| TransportError::Io { addr: self.to_string(), source })?;
                Ok(stream.into())
            }
            Transport::Hybrid { uds, port } => {
                let mut stream = UnixStream::connect(uds)
                    .await
                    .map_err(|source| TransportError::Io { addr: self.to_string(), source })?;
                let handshake = async {
                    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                    // Read byte by byte: anything after the newline belongs to ttrpc.
                    let mut line = Vec::with_capacity(16);
                    loop {
                        let mut b = [0u8; 1];
                        if stream.read(&mut b).await? == 0 {
                            return Ok::<_, std::io::Error>(None);
                        }
                        if b[0] == b'\n' || line.len() >= MAX_HANDSHAKE_LINE {
                            break;
                        }
                        line.push(b[0]);
                    }
                    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
                };
                let reply = tokio::time::timeout(handshake_timeout, handshake)
                    .await
                    .map_err(|_| TransportError::Handshake {
                        addr: self.to_string(),
                        reason: format!("no reply within {handshake_timeout:?}"),
                    })?
                    .map_err(|source| TransportError::Io { addr: self.to_string(), source })?;
                match reply {
                    Some(l) if l.starts_with("OK ") => Ok(stream.into()),
                    Some(l) => Err(TransportError::Handshake { addr: self.to_string(), reason: format!("unexpected reply {l:?}") }),
                    None => Err(TransportError::Handshake {
                        addr: self.to_string(),
                        reason: "connection closed (nothing listens on the guest port yet)".into(),
                    }),
                }
            }
        }
    }
}

fn tokio_vsock_addr(cid: u32, port: u32) -> tokio_vsock::VsockAddr {
    tokio_vsock::VsockAddr::new(cid, port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake hybrid-vsock server (a unix listener that answers the CONNECT line), to test the handshake
    /// logic. Its task checks the request line: each test awaits it, so that a failed check fails the test.
    async fn fake_server(reply: &'static [u8]) -> (tempfile_dir::Dir, PathBuf, tokio::task::JoinHandle<()>) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("hv.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 32];
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"CONNECT 1024\n");
            s.write_all(reply).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        (dir, path, server)
    }

    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "agent-client-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn hybrid_handshake_accepts_ok() {
        let (_d, path, server) = fake_server(b"OK 1073741824\n").await;
        let t = Transport::Hybrid { uds: path, port: 1024 };
        assert!(t.connect_once(Duration::from_secs(2)).await.is_ok());
        server.await.expect("the server saw the CONNECT line");
    }

    #[tokio::test]
    async fn hybrid_handshake_rejects_other_reply() {
        let (_d, path, server) = fake_server(b"NO\n").await;
        let t = Transport::Hybrid { uds: path, port: 1024 };
        let err = t.connect_once(Duration::from_secs(2)).await.err().expect("must fail");
        assert!(err.to_string().contains("unexpected reply \"NO\""), "{err}");
        server.await.expect("the server saw the CONNECT line");
    }

    #[tokio::test]
    async fn hybrid_handshake_reports_closed_connection() {
        let (_d, path, server) = fake_server(b"").await;
        let t = Transport::Hybrid { uds: path, port: 1024 };
        // The fake server closes after its (empty) reply once its sleep ends.
        let err = t.connect_once(Duration::from_secs(5)).await.err().expect("must fail");
        assert!(err.to_string().contains("connection closed"), "{err}");
        server.await.expect("the server saw the CONNECT line");
    }

    #[test]
    fn display_names_the_address() {
        assert_eq!(Transport::Vsock { cid: 3, port: 1024 }.to_string(), "vsock://3:1024");
        assert_eq!(
            Transport::Hybrid { uds: "/run/x/vsock.sock".into(), port: 1024 }.to_string(),
            "hvsock:///run/x/vsock.sock:1024"
        );
    }
}
