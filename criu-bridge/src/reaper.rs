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

/// Every change of the bookkeeping, and every `waitpid`, happens under one lock: a pid that has a
/// waiter has not been reaped, so it cannot have been reused, and a child registered at spawn cannot
/// be reaped before its waiter exists.
#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

/// The exit of one process, registered with the reaper.
pub struct Exit {
    pub pid: i32,
    rx: Result<oneshot::Receiver<i32>, i32>,
}

impl Exit {
    /// Waits for the process to exit; returns its status code.
    pub async fn wait(self) -> i32 {
        match self.rx {
            Err(code) => code,
            // The sender is only dropped with the reaper itself, which lives as long as the agent.
            Ok(rx) => rx.await.unwrap_or(255),
        }
    }
}

/// A signal was not sent: the process already exited (and its pid may be another process's now).
#[derive(Debug, thiserror::Error)]
#[error("process {pid} has already exited")]
pub struct NotRunning {
    pub pid: i32,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap_all(&self) {
        self.reap(Pid::from_raw(-1))
    }

    /// Reaps `which` (-1: any child) until none is left to reap.
    fn reap(&self, which: Pid) {
        let mut g = self.lock();
        loop {
            match waitpid(which, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(ws) => {
                    if let Some((pid, code)) = status_code(ws) {
                        deliver(&mut g, pid, code, Instant::now());
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

    /// Records the exit of `pid` (for unit tests of the bookkeeping).
    #[cfg(test)]
    pub fn deliver(&self, pid: i32, code: i32) {
        deliver(&mut self.lock(), pid, code, Instant::now());
    }

    /// Spawns `cmd` with its exit registered before it can be reaped.
    pub fn spawn(&self, cmd: &mut std::process::Command) -> std::io::Result<(std::process::Child, Exit)> {
        use std::os::unix::process::CommandExt;
        // SAFETY: setpriority is async-signal-safe; it only resets the child's nice value to the normal 0
        // (the agent itself runs at a higher priority).
        unsafe {
            cmd.pre_exec(|| {
                libc::setpriority(libc::PRIO_PROCESS, 0, 0);
                Ok(())
            });
        }
        let mut g = self.lock();
        let child = crate::runc::spawn(cmd)?;
        let pid = child.id() as i32;
        // A status kept for this pid belongs to an earlier process: this child cannot have been reaped
        // yet (reaping takes the lock held here).
        g.unclaimed.remove(&pid);
        let (tx, rx) = oneshot::channel();
        g.waiters.entry(pid).or_default().push(tx);
        Ok((child, Exit { pid, rx: Ok(rx) }))
    }

    /// Registers interest in a process this agent did not fork but inherits (a container's init or an
    /// exec'd process, reparented to PID 1), which started after `since`. A status reaped before its
    /// pid was known is found here; one reaped before `since` belonged to an earlier process.
    pub fn watch(&self, pid: i32, since: Instant) -> Exit {
        let mut g = self.lock();
        if let Some((code, at)) = g.unclaimed.remove(&pid) {
            if at >= since && at.elapsed() < KEEP_UNCLAIMED {
                return Exit { pid, rx: Err(code) };
            }
        }
        let (tx, rx) = oneshot::channel();
        g.waiters.entry(pid).or_default().push(tx);
        Exit { pid, rx: Ok(rx) }
    }

    /// Sends `sig` to `pid` only while it has a waiter, i.e. it has not been reaped: a reaped pid may
    /// already name another process.
    pub fn signal(&self, pid: i32, sig: nix::sys::signal::Signal) -> Result<(), NotRunning> {
        let g = self.lock();
        if !g.waiters.contains_key(&pid) {
            return Err(NotRunning { pid });
        }
        // ESRCH cannot happen for an unreaped pid; other errors are not ours to report.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
        Ok(())
    }
}

fn deliver(g: &mut Inner, pid: i32, code: i32, at: Instant) {
    if let Some(ws) = g.waiters.remove(&pid) {
        debug!(pid, code, "reaped");
        for w in ws {
            let _ = w.send(code);
        }
        return;
    }
    debug!(pid, code, "reaped (unclaimed yet)");
    g.unclaimed.insert(pid, (code, at));
    g.order.push_back(pid);
    while g.order.len() > MAX_UNCLAIMED {
        if let Some(old) = g.order.pop_front() {
            g.unclaimed.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_before_watch_is_kept() {
        let r = Reaper::default();
        let since = Instant::now();
        r.deliver(42, 3);
        assert_eq!(r.watch(42, since).wait().await, 3);
    }

    #[tokio::test]
    async fn watcher_gets_later_status() {
        let r = Arc::new(Reaper::default());
        let e = r.watch(7, Instant::now());
        r.deliver(7, 137);
        assert_eq!(e.wait().await, 137);
    }

    #[tokio::test]
    async fn a_status_older_than_the_process_is_not_its_exit() {
        let r = Arc::new(Reaper::default());
        r.deliver(9, 1);
        std::thread::sleep(Duration::from_millis(5));
        let e = r.watch(9, Instant::now());
        let h = tokio::spawn(e.wait());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!h.is_finished(), "a stale status must not satisfy a new watcher");
        r.deliver(9, 0);
        assert_eq!(h.await.unwrap(), 0);
    }

    // These tests reap only their own children (never waitpid(-1), which would take other tests' children).
    #[tokio::test]
    async fn a_child_that_exits_at_once_is_never_lost() {
        let r = Arc::new(Reaper::default());
        for _ in 0..50 {
            let (_child, exit) = r.spawn(std::process::Command::new("/bin/sh").args(["-c", "exit 5"])).unwrap();
            // Reap as PID 1 would, possibly before the caller looks at the exit.
            let t0 = Instant::now();
            let pid = exit.pid;
            loop {
                r.reap(Pid::from_raw(pid));
                if !r.lock().waiters.contains_key(&pid) || t0.elapsed() > Duration::from_secs(10) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(tokio::time::timeout(Duration::from_secs(10), exit.wait()).await.unwrap(), 5);
        }
    }

    #[tokio::test]
    async fn no_signal_after_reaping() {
        let r = Arc::new(Reaper::default());
        let (_child, exit) = r.spawn(&mut std::process::Command::new("/bin/true")).unwrap();
        let pid = exit.pid;
        while r.lock().waiters.contains_key(&pid) {
            r.reap(Pid::from_raw(pid));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(exit.wait().await, 0);
        assert!(r.signal(pid, nix::sys::signal::Signal::SIGKILL).is_err(), "a reaped pid is never signalled");
        let (_child, exit) = r.spawn(std::process::Command::new("/bin/sleep").arg("30")).unwrap();
        r.signal(exit.pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let pid = exit.pid;
        while r.lock().waiters.contains_key(&pid) {
            r.reap(Pid::from_raw(pid));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(exit.wait().await, 128 + 9);
    }
}
