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
    let read = |max_len: u32| {
        let req = ReadStreamRequest { container_id: cid.clone(), exec_id: exec_id.clone(), max_len, ..Default::default() };
        let agent = agent.clone();
        async move {
            let r = if stderr {
                agent.call("ReadStderr", LONG, |c, ctx| async move { c.read_stderr(ctx, &req).await }).await
            } else {
                agent.call("ReadStdout", LONG, |c, ctx| async move { c.read_stdout(ctx, &req).await }).await
            };
            r.map(|r| (r.data, r.eof))
        }
    };
    if let Err(e) = pump(read, &mut out).await {
        debug!(cid, exec_id, stderr, error = %e, "guest stream ended");
    }
    if let Some(mut f) = out {
        let _ = f.flush().await;
    }
}

/// Most bytes asked for in one read of guest output.
const READ_MAX: u32 = 128 * 1024;
/// Waits after an empty answer that is not the end (an honest agent's read blocks until data comes):
/// doubling from the first to the last, reset by data.
const IDLE_FIRST: Duration = Duration::from_millis(10);
const IDLE_MAX: Duration = Duration::from_secs(1);

/// The output loop: `read(max)` is one guest read (data, eof). The guest's answers are bounded: at most
/// `READ_MAX` bytes of each are used, and empty answers that are not the end are spaced out, so a guest
/// answering at once with nothing costs the host no busy loop. Returns at EOF or a failed read; a sink
/// that fails is dropped and the rest is read and discarded.
async fn pump<F, Fut, E, W>(mut read: F, out: &mut Option<W>) -> Result<(), E>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<u8>, bool), E>>,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut idle = IDLE_FIRST;
    loop {
        let (mut data, eof) = read(READ_MAX).await?;
        data.truncate(READ_MAX as usize);
        if !data.is_empty() {
            idle = IDLE_FIRST;
            if let Some(f) = out.as_mut() {
                if let Err(e) = f.write_all(&data).await {
                    debug!(error = %e, "stdio reader went away; output is dropped from now on");
                    *out = None;
                }
            }
        }
        if eof {
            return Ok(());
        }
        if data.is_empty() {
            tokio::time::sleep(idle).await;
            idle = (idle * 2).min(IDLE_MAX);
        }
    }
}

/// Copies containerd's stdin into the guest process, then closes the guest's stdin.
///
/// A FIFO is held open by the shim too (a writer of its own, as containerd's runc shim does), so a
/// client that closes its end (an attach that ends) does not close the container's stdin: that happens
/// when containerd asks (`close`, from CloseIO) and everything written before has been forwarded, i.e.
/// at the EOF that follows the release of the shim's writer. A regular file is copied to its end.
pub async fn forward_input(agent: AgentClient, cid: String, exec_id: String, path: String, close: tokio::sync::oneshot::Receiver<()>) {
    let send = |data: Vec<u8>| {
        let req = WriteStreamRequest { container_id: cid.clone(), exec_id: exec_id.clone(), data, ..Default::default() };
        let agent = agent.clone();
        async move { agent.call_default("WriteStdin", |c, ctx| async move { c.write_stdin(ctx, &req).await }).await.is_ok() }
    };
    let mut buf = vec![0u8; 64 * 1024];
    if is_fifo(&path) {
        use tokio::net::unix::pipe;
        // Non-blocking opens: the reader first (it never waits for a writer), then the shim's writer.
        let (mut rx, hold) = match pipe::OpenOptions::new().open_receiver(&path) {
            Ok(rx) => match pipe::OpenOptions::new().open_sender(&path) {
                Ok(tx) => (rx, tx),
                Err(e) => return warn!(path, error = %e, "cannot hold stdin open"),
            },
            Err(e) => return warn!(path, error = %e, "cannot open stdin"),
        };
        let mut hold = Some(hold);
        let mut close = Some(close);
        loop {
            tokio::select! {
                r = rx.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => if !send(buf[..n].to_vec()).await { return },
                },
                // Closed (or the process is gone): release the shim's writer; the EOF comes once the
                // client's writers are closed and what they wrote is read.
                _ = async { close.as_mut().unwrap().await }, if close.is_some() => {
                    close = None;
                    hold = None;
                }
            }
        }
        drop(hold);
    } else {
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => return warn!(path, error = %e, "cannot open stdin"),
        };
        loop {
            match f.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => if !send(buf[..n].to_vec()).await { return },
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

    /// A fake guest stream: answers `script` in order, then `rest` for ever.
    async fn run(script: Vec<(Vec<u8>, bool)>, rest: (Vec<u8>, bool), for_at_most: Duration) -> (Vec<u8>, usize, bool) {
        let calls = std::cell::Cell::new(0usize);
        let script = std::cell::RefCell::new(script.into_iter());
        let read = |max: u32| {
            calls.set(calls.get() + 1);
            assert_eq!(max, READ_MAX);
            let next = script.borrow_mut().next().unwrap_or_else(|| rest.clone());
            async move { Ok::<_, ()>(next) }
        };
        let mut out: Option<Vec<u8>> = Some(Vec::new());
        let ended = tokio::time::timeout(for_at_most, pump(read, &mut out)).await.is_ok();
        (out.unwrap(), calls.get(), ended)
    }

    #[tokio::test]
    async fn output_is_forwarded_until_eof_and_bounded_per_answer() {
        let (out, calls, ended) = run(vec![(b"a".to_vec(), false), (b"b".to_vec(), true)], (vec![], true), Duration::from_secs(5)).await;
        assert_eq!((out.as_slice(), calls, ended), (&b"ab"[..], 2, true));
        // An answer longer than asked for: only what was asked for is used.
        let big = vec![b'x'; READ_MAX as usize + 4096];
        let (out, _, ended) = run(vec![(big, false)], (vec![], true), Duration::from_secs(5)).await;
        assert_eq!((out.len(), ended), (READ_MAX as usize, true));
    }

    #[tokio::test]
    async fn a_guest_answering_nothing_at_once_costs_no_busy_loop() {
        // Empty answers that are not the end, for ever: in 400 ms, the waits (10, 20, 40, 80, 160 ms...)
        // allow about six reads; a busy loop would make hundreds of thousands.
        let (out, calls, ended) = run(vec![], (vec![], false), Duration::from_millis(400)).await;
        assert!(out.is_empty() && !ended);
        assert!(calls <= 7, "{calls} reads in 400 ms");
        // Data resets the wait: output still flows at once after idle answers.
        let mut script = vec![(vec![], false); 3];
        script.push((b"late".to_vec(), true));
        let (out, calls, ended) = run(script, (vec![], true), Duration::from_secs(5)).await;
        assert_eq!((out.as_slice(), calls, ended), (&b"late"[..], 4, true));
    }

    #[test]
    fn uris() {
        assert_eq!(target_path("").unwrap(), None);
        assert_eq!(target_path("/run/fifo/x-stdout").unwrap().as_deref(), Some("/run/fifo/x-stdout"));
        assert_eq!(target_path("file:///var/log/x.log").unwrap().as_deref(), Some("/var/log/x.log"));
        assert!(target_path("binary:///usr/bin/logger").unwrap_err().contains("not supported"));
        assert!(target_path("fifo://x").unwrap_err().contains("unknown scheme"));
    }
}
