//! What a checkpoint or a restore brings back from the guest, never trusted: CRIU's stats image and
//! the agent's figures (bounded), CRIU's log in bounded pieces, and the reports written beside the
//! images and the bundle.
use std::{path::Path, time::Duration};

use agent_client::{agent as ag, AgentClient};
use containerd_shim::protos::ttrpc;
use tracing::warn;

use crate::error::TaskError;

/// The last `max_bytes` of a file the guest agent may read (its log and work directories). The answer
/// is the guest's: only the bytes that arrived count (its `file_size` is not used), at most `max_bytes`.
pub(crate) async fn read_guest_file(agent: &AgentClient, guest_path: &str, max_bytes: u32) -> Result<Vec<u8>, agent_client::AgentError> {
    let r = ag::ReadFileTailRequest { path: guest_path.into(), max_bytes, ..Default::default() };
    let mut data = agent.call("ReadFileTail", Duration::from_secs(30), |c, ctx| async move { c.read_file_tail(ctx, &r).await }).await?.data;
    let extra = data.len().saturating_sub(max_bytes as usize);
    data.drain(..extra);
    Ok(data)
}

/// Size of CRIU's stats image: a few hundred bytes; more than this is refused.
pub(crate) const MAX_STATS_IMAGE: u32 = 4096;

/// Adds CRIU's own figures from its stats image (`stats-dump`/`stats-restore`, which CRIU writes to the
/// work directory in the guest) to a report; returns the image's bytes to keep beside the images.
pub(crate) async fn add_criu_stats(agent: &AgentClient, report: &mut serde_json::Map<String, serde_json::Value>, guest_path: String) -> Option<Vec<u8>> {
    // Asks for one byte more than a stats image may have, to see a larger one and refuse it.
    let decoded = match read_guest_file(agent, &guest_path, MAX_STATS_IMAGE + 1).await {
        Ok(d) if d.len() > MAX_STATS_IMAGE as usize => Err(format!("{guest_path}: more than {MAX_STATS_IMAGE} bytes, too large for a stats image")),
        Ok(d) => crate::criu_stats::decode(&guest_path, &d).map(|m| (m, d)).map_err(|e| e.to_string()),
        Err(e) => Err(format!("{guest_path}: {e}")),
    };
    match decoded {
        Ok((m, data)) => {
            for (k, v) in m {
                report.insert(format!("criu.{k}"), v.into());
            }
            Some(data)
        }
        Err(e) => {
            report.insert("criu_stats_error".into(), e.into());
            None
        }
    }
}

/// Figures the agent reported ("key=value" lines): kept under `guest.`, so they never overwrite what the
/// host measured; at most 32 of them, keys of at most 64 plain characters, finite numbers only.
pub(crate) fn add_guest_figures(report: &mut serde_json::Map<String, serde_json::Value>, text: &str) {
    let plain = |k: &str| !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    let figures = text.lines().filter_map(|l| l.split_once('=')).filter_map(|(k, v)| Some((k.trim(), v.trim().parse::<f64>().ok().filter(|x| x.is_finite())?)));
    for (k, x) in figures.filter(|(k, _)| plain(k)).take(32) {
        report.insert(format!("guest.{k}"), x.into());
    }
}

pub(crate) fn write_report(path: &Path, report: &serde_json::Map<String, serde_json::Value>) {
    let text = serde_json::to_string_pretty(report).unwrap_or_default() + "\n";
    if let Err(e) = std::fs::write(path, text) {
        warn!(path = %path.display(), error = %e, "writing the checkpoint/restore report");
    }
}

/// Most of a guest log copied next to the bundle: its last 4 MiB.
pub(crate) const GUEST_LOG_MAX: u64 = 4 << 20;

/// One piece of it per call: a ttrpc frame is at most 4 MiB, framing included.
pub(crate) const GUEST_LOG_PIECE: u32 = 1 << 20;

/// The last `total` bytes of a guest file, read in pieces of at most `piece` bytes by `read(offset, max)`
/// (`None`: the file's last `max` bytes), which answers the bytes and the file's size. The size is the
/// guest's word: it only places the pieces; what comes back is bounded by `total` and by the number of
/// calls, whatever the guest answers.
pub(crate) async fn read_tail_in_pieces<F, Fut, E>(mut read: F, total: u64, piece: u32) -> Result<Vec<u8>, E>
where
    F: FnMut(Option<u64>, u32) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<u8>, u64), E>>,
{
    let (mut last, size) = read(None, piece).await?;
    last.truncate(piece as usize);
    if size <= last.len() as u64 || last.len() < piece as usize {
        return Ok(last);
    }
    // The pieces before the last one, from where the last `total` bytes begin.
    let end = size - last.len() as u64;
    let mut at = size.saturating_sub(total);
    let mut out = Vec::new();
    for _ in 0..total.div_ceil(piece as u64) {
        if at >= end {
            break;
        }
        let want = (end - at).min(piece as u64) as u32;
        let (mut data, _) = read(Some(at), want).await?;
        data.truncate(want as usize);
        if data.is_empty() {
            break;
        }
        at += data.len() as u64;
        out.extend_from_slice(&data);
    }
    out.extend_from_slice(&last);
    let extra = out.len().saturating_sub(total as usize);
    out.drain(..extra);
    Ok(out)
}

/// A checkpoint or restore the guest did not carry out, with the full CRIU log's host path: the
/// VM-gone code when the VM died under it, else INTERNAL (CRIU's failure, in the text).
pub(crate) fn failed_in_guest(e: agent_client::AgentError, what: String, log: &str) -> ttrpc::Error {
    let text = format!("{what}: {e}\nfull CRIU log: {log}");
    match e {
        agent_client::AgentError::VmGone { .. } => TaskError::vm_gone(text),
        _ => TaskError::internal(text),
    }
}

/// The most checkpoints whose CRIU log and report stay in the bundle (each log up to
/// `GUEST_LOG_MAX`): a container checkpointed without end fills no disk.
pub const KEPT_DUMP_FILES: u32 = 8;

/// Removes the log and report of checkpoint `n - KEPT_DUMP_FILES` from the bundle (a host directory),
/// once checkpoint `n` has its own: the last `KEPT_DUMP_FILES` stay.
pub(crate) fn rotate_dump_files(bundle: &Path, n: u32) {
    if let Some(old) = n.checked_sub(KEPT_DUMP_FILES) {
        for name in [format!("criu-dump-{old}.log"), format!("criu-dump-{old}.stats.json")] {
            let _ = std::fs::remove_file(bundle.join(name));
        }
    }
}

/// Copies a guest log (CRIU's dump.log/restore.log) next to the bundle; returns its host path or why not.
pub(crate) async fn fetch_guest_log(agent: &AgentClient, guest_path: &str, bundle: &Path, name: &str) -> String {
    let read = |offset: Option<u64>, max_bytes: u32| {
        let r = ag::ReadFileTailRequest { path: guest_path.into(), max_bytes, at_offset: offset.is_some(), offset: offset.unwrap_or(0), ..Default::default() };
        async move {
            let a = agent.call("ReadFileTail", Duration::from_secs(30), |c, ctx| async move { c.read_file_tail(ctx, &r).await }).await?;
            Ok::<_, agent_client::AgentError>((a.data, a.file_size))
        }
    };
    match read_tail_in_pieces(read, GUEST_LOG_MAX, GUEST_LOG_PIECE).await {
        Ok(data) => {
            let host = bundle.join(format!("criu-{name}"));
            match std::fs::write(&host, &data) {
                Ok(()) => host.display().to_string(),
                Err(e) => format!("(cannot write {}: {e}; guest path {guest_path})", host.display()),
            }
        }
        // The reason the VM is gone is in the error already.
        Err(agent_client::AgentError::VmGone { .. }) => {
            format!("(not available: it stayed in the VM, which is gone; guest path {guest_path})")
        }
        Err(e) => format!("(not available: {e}; guest path {guest_path})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_figures_never_overwrite_host_fields_and_are_bounded() {
        let mut r = serde_json::Map::new();
        r.insert("checkpoint_s".into(), 2.5.into());
        r.insert("image_bytes".into(), 100u64.into());
        let mut lies = String::from("checkpoint_s=0\nimage_bytes=99999999999999\nrunc_checkpoint_s=1.25\nx=NaN\ny=inf\n\u{1b}[2J=1\n");
        lies.push_str(&format!("{}=1\n", "k".repeat(65)));
        for i in 0..1000 {
            lies.push_str(&format!("n{i}=1\n"));
        }
        add_guest_figures(&mut r, &lies);
        assert_eq!(r["checkpoint_s"], 2.5);
        assert_eq!(r["image_bytes"], 100);
        assert_eq!(r["guest.checkpoint_s"], 0.0);
        assert_eq!(r["guest.runc_checkpoint_s"], 1.25);
        assert!(!r.contains_key("guest.x") && !r.contains_key("guest.y"), "non-finite numbers dropped");
        assert!(r.keys().all(|k| !k.contains('\u{1b}') && k.len() <= 70));
        assert_eq!(r.keys().filter(|k| k.starts_with("guest.")).count(), 32);
    }

    /// A fake guest file behind `read_tail_in_pieces`: honest, or a liar about sizes and lengths.
    async fn pieces(file: &[u8], claimed: Option<u64>, pad: usize, total: u64, piece: u32) -> (Vec<u8>, usize) {
        let calls = std::cell::Cell::new(0);
        let read = |offset: Option<u64>, max: u32| {
            calls.set(calls.get() + 1);
            let size = file.len() as u64;
            let start = offset.map_or(size.saturating_sub(max as u64), |o| o.min(size)) as usize;
            let mut data = file[start..(start + max as usize).min(file.len())].to_vec();
            data.extend(std::iter::repeat_n(b'!', pad));
            async move { Ok::<_, ()>((data, claimed.unwrap_or(size))) }
        };
        let out = read_tail_in_pieces(read, total, piece).await.unwrap();
        (out, calls.get())
    }

    #[tokio::test]
    async fn a_large_guest_log_comes_in_pieces_bounded_whatever_the_guest_says() {
        let file: Vec<u8> = (0..(5u32 << 20) + 3).map(|i| (i % 251) as u8).collect();
        // Honest: the last 4 MiB, in 1 MiB pieces (the tail first, then the three before it).
        let (out, calls) = pieces(&file, None, 0, 4 << 20, 1 << 20).await;
        assert_eq!(out, file[file.len() - (4 << 20)..]);
        assert_eq!(calls, 4);
        // A small file: one call.
        let (out, calls) = pieces(b"short log", None, 0, 4 << 20, 1 << 20).await;
        assert_eq!((out.as_slice(), calls), (&b"short log"[..], 1));
        // A guest claiming 1 TiB and padding every answer: still at most `total` bytes, and at most
        // total/piece + 1 calls.
        let (out, calls) = pieces(&file, Some(1 << 40), 4096, 4 << 20, 1 << 20).await;
        assert!(out.len() <= 4 << 20, "{}", out.len());
        assert!(calls <= 5, "{calls}");
    }
}
