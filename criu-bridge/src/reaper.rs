//! Child reaping for PID 1.
//!
//! As PID 1 the agent inherits every orphan (container inits after `runc create` exits, `runc exec -d`
//! processes). One task reaps all of them with `waitpid(-1)` on SIGCHLD and hands each exit status to
//! whoever waits for that pid. A status that nobody waits for yet is kept for a while, so a process
//! that exits before its pid is known (e.g. a short `runc exec -d`) is not lost.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How long an unclaimed exit status is kept.
const KEEP_UNCLAIMED: Duration = Duration::from_secs(120);
const MAX_UNCLAIMED: usize = 4096;

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, Vec<oneshot::Sender<i32>>>,
    unclaimed: HashMap<i32, (i32, Instant)>,
    order: VecDeque<i32>,
}

#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

/// Exit status in shell convention: the exit code, or 128 + the signal number.
pub fn status_code(ws: WaitStatus) -> Option<(i32, i32)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

impl Reaper {
    /// Starts the reaping task. Must run inside a tokio runtime.
    pub fn start() -> Arc<Reaper> {
        let r = Arc::new(Reaper::default());
        let me = r.clone();
        tokio::spawn(async move {
            let mut sig = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(error = %e, "no SIGCHLD stream; polling");
                    None
                }
            };
            loop {
                me.reap_all();
                match sig.as_mut() {
                    // A periodic sweep as well: signals coalesce.
                    Some(s) => {
                        let _ = tokio::time::timeout(Duration::from_secs(1), s.recv()).await;
                    }
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        r
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(ws) => {
                    if let Some((pid, code)) = status_code(ws) {
                        self.deliver(pid, code);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "waitpid");
                    return;
                }
            }
        }
    }

    /// Records the exit of `pid` (public for unit tests of the bookkeeping).
    pub fn deliver(&self, pid: i32, code: i32) {
        let mut g = self.inner.lock().unwrap();
        if let Some(ws) = g.waiters.remove(&pid) {
            debug!(pid, code, "reaped");
            for w in ws {
                let _ = w.send(code);
            }
            return;
        }
        debug!(pid, code, "reaped (unclaimed yet)");
        g.unclaimed.insert(pid, (code, Instant::now()));
        g.order.push_back(pid);
        while g.order.len() > MAX_UNCLAIMED {
            if let Some(old) = g.order.pop_front() {
                g.unclaimed.remove(&old);
            }
        }
    }

    /// Forgets a stale unclaimed status for a pid that was just reused by a new child.
    pub fn forget(&self, pid: i32) {
        self.inner.lock().unwrap().unclaimed.remove(&pid);
    }

    /// Waits for `pid` to exit and returns its status code.
    pub async fn wait(&self, pid: i32) -> i32 {
        let rx = {
            let mut g = self.inner.lock().unwrap();
            if let Some((code, at)) = g.unclaimed.remove(&pid) {
                if at.elapsed() < KEEP_UNCLAIMED {
                    return code;
                }
            }
            let (tx, rx) = oneshot::channel();
            g.waiters.entry(pid).or_default().push(tx);
            rx
        };
        // The sender is only dropped with the reaper itself, which lives as long as the agent.
        rx.await.unwrap_or(255)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_before_wait_is_kept() {
        let r = Reaper::default();
        r.deliver(42, 3);
        assert_eq!(r.wait(42).await, 3);
    }

    #[tokio::test]
    async fn waiter_gets_later_status() {
        let r = Arc::new(Reaper::default());
        let r2 = r.clone();
        let h = tokio::spawn(async move { r2.wait(7).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.deliver(7, 137);
        assert_eq!(h.await.unwrap(), 137);
    }

    #[tokio::test]
    async fn forget_drops_stale_status() {
        let r = Arc::new(Reaper::default());
        r.deliver(9, 1);
        r.forget(9);
        let r2 = r.clone();
        let h = tokio::spawn(async move { r2.wait(9).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!h.is_finished(), "a forgotten status must not satisfy a new waiter");
        r.deliver(9, 0);
        assert_eq!(h.await.unwrap(), 0);
    }
}
