//! Forwarding a guest process's stdio to containerd's FIFOs (or files) and back.
use std::time::Duration;

use agent_client::{agent::*, AgentClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

/// Reads of guest output block until data comes; the deadline only bounds a dead channel.
const LONG: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where containerd wants a stream: "" (nowhere), a FIFO/file path, or `file://PATH`.
pub fn target_path(uri: &str) -> Result<Option<String>, String> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(Some(p.to_string()));
    }
    if uri.starts_with("binary://") {
        return Err(format!("stdio URI {uri}: binary:// log drivers are not supported by kata-rs yet"));
    }
    if uri.contains("://") {
        return Err(format!("stdio URI {uri}: unknown scheme"));
    }
    Ok(Some(uri.to_string()))
}

/// Copies guest stdout (or stderr) to `uri` until the guest stream ends. With no target the output is
/// read and dropped, so the container never blocks on a full pipe.
pub async fn forward_output(agent: AgentClient, cid: String, exec_id: String, uri: String, stderr: bool) {
    let mut out = match target_path(&uri) {
        Ok(Some(p)) => match tokio::fs::OpenOptions::new().write(true).append(!is_fifo(&p)).create(!is_fifo(&p)).open(&p).await {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(path = %p, error = %e, "cannot open stdio target; output is dropped");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            warn!("{e}");
            None
        }
    };
    loop {
        let req = ReadStreamRequest { container_id: cid.clone(), exec_id: exec_id.clone(), max_len: 128 * 1024, ..Default::default() };
        let r = if stderr {
            agent.call("ReadStderr", LONG, |c, ctx| async move { c.read_stderr(ctx, &req).await }).await
        } else {
            agent.call("ReadStdout", LONG, |c, ctx| async move { c.read_stdout(ctx, &req).await }).await
        };
        match r {
            Ok(r) if r.eof => break,
            Ok(r) => {
                if let Some(f) = out.as_mut() {
                    if let Err(e) = f.write_all(&r.data).await {
                        debug!(error = %e, "stdio reader went away; output is dropped from now on");
                        out = None;
                    }
                }
            }
            Err(e) => {
                debug!(cid, exec_id, stderr, error = %e, "guest stream ended");
                break;
            }
        }
    }
    if let Some(mut f) = out {
        let _ = f.flush().await;
    }
}

/// Copies containerd's stdin FIFO into the guest process; closes the guest stdin at EOF.
pub async fn forward_input(agent: AgentClient, cid: String, exec_id: String, path: String) {
    let mut f = match tokio::fs::OpenOptions::new().read(true).open(&path).await {
        Ok(f) => f,
        Err(e) => {
            warn!(path, error = %e, "cannot open stdin");
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let req = WriteStreamRequest { container_id: cid.clone(), exec_id: exec_id.clone(), data: buf[..n].to_vec(), ..Default::default() };
                if agent.call_default("WriteStdin", |c, ctx| async move { c.write_stdin(ctx, &req).await }).await.is_err() {
                    return;
                }
            }
        }
    }
    close_stdin(&agent, &cid, &exec_id).await;
}

pub async fn close_stdin(agent: &AgentClient, cid: &str, exec_id: &str) {
    let req = ProcessRequest { container_id: cid.into(), exec_id: exec_id.into(), ..Default::default() };
    let _ = agent.call_default("CloseStdin", |c, ctx| async move { c.close_stdin(ctx, &req).await }).await;
}

fn is_fifo(p: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).map(|m| m.file_type().is_fifo()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(target_path("").unwrap(), None);
        assert_eq!(target_path("/run/fifo/x-stdout").unwrap().as_deref(), Some("/run/fifo/x-stdout"));
        assert_eq!(target_path("file:///var/log/x.log").unwrap().as_deref(), Some("/var/log/x.log"));
        assert!(target_path("binary:///usr/bin/logger").unwrap_err().contains("not supported"));
        assert!(target_path("fifo://x").unwrap_err().contains("unknown scheme"));
    }
}
