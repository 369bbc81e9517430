//! The guest's serial console, read from QEMU's console socket into a bounded ring (for error
//! messages) and a size-capped log file (the current file plus one older file): a guest that prints
//! without end costs the host a fixed amount of memory and disk.
use std::{
    collections::VecDeque,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{io::AsyncReadExt, net::UnixStream, task::JoinHandle};
use tracing::warn;

/// Bytes of the console's end kept in memory.
pub const RING_BYTES: usize = 256 * 1024;

#[derive(Default)]
struct Shared {
    ring: Mutex<VecDeque<u8>>,
    bytes_seen: AtomicU64,
    marker_seen: AtomicBool,
    closed: AtomicBool,
}

/// A reader of one guest console. Dropping it stops the reader.
pub struct Console {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    log: PathBuf,
}

/// Reads the tail of a console's ring (see [`Console::tail`]).
#[derive(Clone)]
pub struct ConsoleTail {
    shared: Arc<Shared>,
}

impl ConsoleTail {
    /// Has QEMU closed the console (it exited)?
    pub fn closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    pub fn tail(&self, max: usize) -> String {
        let ring = self.shared.ring.lock().unwrap_or_else(|e| e.into_inner());
        let skip = ring.len().saturating_sub(max);
        let bytes: Vec<u8> = ring.iter().skip(skip).copied().collect();
        drop(ring);
        let mut out = String::with_capacity(bytes.len());
        for ch in String::from_utf8_lossy(&bytes).trim().chars() {
            match ch {
                '\n' | '\t' => out.push(ch),
                '\r' => {}
                c if c.is_control() => out.extend(c.escape_default()),
                c => out.push(c),
            }
        }
        out
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The log file and its one older generation, each at most `max_file` bytes.
struct CappedLog {
    path: PathBuf,
    old: PathBuf,
    file: Option<std::fs::File>,
    written: u64,
    max_file: u64,
}

impl CappedLog {
    fn new(path: PathBuf, max_file: u64) -> CappedLog {
        let old = path.with_extension("log.1");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&old);
        let file = open_log(&path);
        CappedLog { path, old, file, written: 0, max_file }
    }

    fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.written >= self.max_file {
                // Rotate: the current file becomes the older one, which is dropped.
                let _ = std::fs::rename(&self.path, &self.old);
                self.file = open_log(&self.path);
                self.written = 0;
            }
            let n = data.len().min((self.max_file - self.written) as usize);
            if let Some(f) = self.file.as_mut() {
                if f.write_all(&data[..n]).is_err() {
                    self.file = None;
                }
            }
            self.written += n as u64;
            data = &data[n..];
        }
    }
}

fn open_log(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o640).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot write the console log");
            None
        }
    }
}

impl Console {
    /// Connects to QEMU's console socket (a `-chardev socket,server=on`) and starts reading it.
    /// `marker` is looked for in the output (see [`Console::marker_seen`]).
    pub async fn attach(socket: &Path, log: PathBuf, max_file: u64, marker: &str, limit: Duration) -> std::io::Result<Console> {
        let start = tokio::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() < limit && matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let shared = Arc::new(Shared::default());
        let me = shared.clone();
        let file = CappedLog::new(log.clone(), max_file.max(4096));
        let marker = marker.as_bytes().to_vec();
        let task = tokio::spawn(read_loop(stream, me, file, marker));
        Ok(Console { shared, task, log })
    }

    /// The last `max` bytes the guest printed (at most [`RING_BYTES`]), lossy UTF-8, trimmed, with
    /// control characters other than newline and tab escaped (the text goes into logs and errors).
    pub fn tail(&self, max: usize) -> String {
        self.tail_handle().tail(max)
    }

    /// A handle that reads the console's tail and outlives nothing: for a watcher task.
    pub fn tail_handle(&self) -> ConsoleTail {
        ConsoleTail { shared: self.shared.clone() }
    }

    /// Bytes read from the console since the VM started.
    pub fn bytes_seen(&self) -> u64 {
        self.shared.bytes_seen.load(Ordering::Relaxed)
    }

    /// Has the marker appeared in the output?
    pub fn marker_seen(&self) -> bool {
        self.shared.marker_seen.load(Ordering::Acquire)
    }

    /// Has QEMU closed the console (it exited)?
    pub fn closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// The current log file (an older one is `<log>.1`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

async fn read_loop(mut stream: UnixStream, shared: Arc<Shared>, mut file: CappedLog, marker: Vec<u8>) {
    let mut buf = vec![0u8; 64 * 1024];
    // The end of the previous chunk, so that a marker split across two reads is still found.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        shared.bytes_seen.fetch_add(n as u64, Ordering::Relaxed);
        if !marker.is_empty() && !shared.marker_seen.load(Ordering::Relaxed) {
            carry.extend_from_slice(chunk);
            if carry.windows(marker.len()).any(|w| w == marker.as_slice()) {
                shared.marker_seen.store(true, Ordering::Release);
            }
            let keep = marker.len().saturating_sub(1);
            let cut = carry.len().saturating_sub(keep);
            carry.drain(..cut);
        }
        {
            let mut ring = shared.ring.lock().unwrap_or_else(|e| e.into_inner());
            let take = chunk.len().min(RING_BYTES);
            ring.extend(&chunk[chunk.len() - take..]);
            let over = ring.len().saturating_sub(RING_BYTES);
            ring.drain(..over);
        }
        file.write(chunk);
    }
    shared.closed.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_log_keeps_two_generations() {
        let d = std::env::temp_dir().join(format!("kata-rs-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let mut l = CappedLog::new(d.join("console.log"), 1000);
        for i in 0..100u8 {
            l.write(&[i; 333]);
        }
        let cur = std::fs::metadata(d.join("console.log")).unwrap().len();
        let old = std::fs::metadata(d.join("console.log.1")).unwrap().len();
        assert!(cur <= 1000 && old == 1000, "{cur} {old}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn ring_is_bounded_and_marker_found_across_reads() {
        let d = std::env::temp_dir().join(format!("kata-rs-console-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let sock = d.join("c.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = listener.accept().await.unwrap();
            let junk = vec![b'x'; 1 << 20];
            for _ in 0..8 {
                s.write_all(&junk).await.unwrap();
            }
            s.write_all(b"READY_MA").await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(b"RKER\nend").await.unwrap();
        });
        let c = Console::attach(&sock, d.join("console.log"), 64 * 1024, "READY_MARKER", Duration::from_secs(5)).await.unwrap();
        writer.await.unwrap();
        let t0 = std::time::Instant::now();
        while !c.closed() {
            assert!(t0.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(c.marker_seen());
        assert_eq!(c.bytes_seen(), (8 << 20) + 16);
        assert!(c.tail(usize::MAX).len() <= RING_BYTES && c.tail(usize::MAX).ends_with("RKER\nend"));
        let on_disk: u64 = std::fs::read_dir(&d).unwrap().flatten().filter(|e| e.file_name() != "c.sock").map(|e| e.metadata().unwrap().len()).sum();
        assert!(on_disk <= 128 * 1024, "{on_disk}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
