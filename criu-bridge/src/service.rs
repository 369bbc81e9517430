//! The ttrpc service: protocol requests mapped onto [`Containers`] and guest tools.
use std::{path::Path, sync::Arc, time::Duration};
use tracing::info;

use agent_client::{agent::*, agent_ttrpc};
use async_trait::async_trait;
use tokio::sync::OnceCell;
use ttrpc::{r#async::TtrpcContext, Code};

use crate::{
    cmd,
    container::{ContainerError, Containers},
};

pub struct AgentService {
    pub containers: Arc<Containers>,
    versions: OnceCell<(String, String)>,
    test_fault: Option<crate::init::TestFault>,
}

/// Directories whose files ReadFileTail may return.
const READABLE_ROOTS: &[&str] = &["/run/kata-rs", "/tmp/kata-rs"];
const MAX_TAIL: u32 = 4 << 20;

fn status(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::NotFound(_) | ContainerError::ProcessNotFound { .. } | ContainerError::Finished(_) => Code::NOT_FOUND,
        ContainerError::Exists(_) => Code::ALREADY_EXISTS,
        ContainerError::Invalid(_) => Code::INVALID_ARGUMENT,
        ContainerError::Precondition(_) => Code::FAILED_PRECONDITION,
        ContainerError::Runc { .. } | ContainerError::TimedOut { .. } | ContainerError::Io(..) => Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

fn internal(msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, msg.into()))
}

impl AgentService {
    pub fn new(containers: Arc<Containers>, test_fault: Option<crate::init::TestFault>) -> Self {
        if let Some(f) = &test_fault {
            tracing::warn!(?f, "a test fault is armed (kata_rs.test_fault on the kernel command line)");
        }
        AgentService { containers, versions: OnceCell::new(), test_fault }
    }

    async fn versions(&self) -> &(String, String) {
        self.versions
            .get_or_init(|| async {
                let r = &self.containers.reaper;
                let first_line = |o: std::io::Result<cmd::Output>| {
                    o.map(|o| o.stdout.lines().next().unwrap_or("").trim().to_string()).unwrap_or_else(|e| format!("unavailable: {e}"))
                };
                let runc = first_line(cmd::run(r, crate::container::RUNC, &["--version".into()], Some(Duration::from_secs(10))).await);
                let criu = first_line(cmd::run(r, crate::criu::CRIU, &["--version".into()], Some(Duration::from_secs(10))).await);
                (runc, criu)
            })
            .await
    }
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime").ok().and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok())).unwrap_or(0.0)
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        // The readiness probe answers at once; the versions are learnt only when asked for.
        let (runc, criu) = match (req.tool_versions, self.versions.get()) {
            (_, Some(v)) => v.clone(),
            (true, None) => self.versions().await.clone(),
            (false, None) => Default::default(),
        };
        let mut r = CheckResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").into();
        r.kernel_release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
        r.uptime_s = uptime();
        r.runc_version = runc;
        r.criu_version = criu;
        Ok(r)
    }

    async fn create_container(&self, _ctx: &TtrpcContext, req: CreateContainerRequest) -> ttrpc::Result<StartResponse> {
        info!(id = %req.container_id, for_restore = req.for_restore, "CreateContainer received");
        let pid = self
            .containers
            .create(
                &req.container_id,
                &req.oci_spec,
                &req.rootfs,
                req.external_mounts.clone(),
                req.for_restore,
                &crate::container::PodJoin { sandbox_id: req.sandbox_id.clone(), namespaces: req.sandbox_namespaces.clone() },
            )
            .await
            .map_err(status)?;
        Ok(StartResponse { pid, ..Default::default() })
    }

    async fn update_network(&self, _ctx: &TtrpcContext, req: UpdateNetworkRequest) -> ttrpc::Result<Empty> {
        info!(id = %req.container_id, interfaces = req.interfaces.len(), routes = req.routes.len(), "UpdateNetwork received");
        self.containers.update_network(&req).await.map_err(status)?;
        Ok(Empty::default())
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StartResponse> {
        let pid = self.containers.start(&req.container_id).await.map_err(status)?;
        Ok(StartResponse { pid, ..Default::default() })
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<StartResponse> {
        let pid = self.containers.exec(&req.container_id, &req.exec_id, &req.process).await.map_err(status)?;
        Ok(StartResponse { pid, ..Default::default() })
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        if self.test_fault.as_ref().is_some_and(|f| f.during == crate::init::FaultDuring::IgnoreSignals) {
            tracing::warn!(id = req.container_id, signal = req.signal, "kata_rs.test_fault: the signal is answered and ignored");
            return Ok(Empty::new());
        }
        self.containers.signal(&req.container_id, &req.exec_id, req.signal, req.all).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        let p = self.containers.process(&req.container_id, &req.exec_id).map_err(status)?;
        let cgroup = if req.exec_id.is_empty() { self.containers.cgroup(&req.container_id) } else { None };
        let e = p.wait().await;
        let since = e.at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let oom_kills = cgroup.map(|d| crate::bundle::oom_kills_in(&d)).unwrap_or(0);
        Ok(WaitProcessResponse {
            exit_status: e.code,
            exited_at_s: since.as_secs() as i64,
            exited_at_ns: since.subsec_nanos(),
            oom_killed: oom_kills > 0,
            oom_kills,
            ..Default::default()
        })
    }

    async fn wait_oom(&self, _ctx: &TtrpcContext, req: WaitOomRequest) -> ttrpc::Result<WaitOomResponse> {
        let init = self.containers.process(&req.container_id, "").map_err(status)?;
        let cgroup = self.containers.cgroup(&req.container_id).ok_or_else(|| status(crate::error::ContainerError::NotFound(req.container_id.clone())))?;
        let until = tokio::time::Instant::now() + agent_client::OOM_WAIT_MAX;
        loop {
            let oom_kills = crate::bundle::oom_kills_in(&cgroup);
            let ended = init.exited().is_some();
            if oom_kills > req.seen || ended || tokio::time::Instant::now() >= until {
                return Ok(WaitOomResponse { oom_kills, ended, ..Default::default() });
            }
            // memory.events is polled (4 reads a second per watched container); the init's exit ends the wait at once.
            tokio::select! {
                _ = init.wait() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            }
        }
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, true).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, false).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn list_processes(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self.containers.pids(&req.container_id).await.map_err(status)?;
        Ok(ListProcessesResponse { pids, ..Default::default() })
    }

    async fn stats_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        let mut runc_stats = self.containers.stats(&req.container_id).await.map_err(status)?;
        if self.test_fault.as_ref().is_some_and(|f| f.during == crate::init::FaultDuring::AbsurdStats) {
            tracing::warn!(id = req.container_id, "kata_rs.test_fault: the stats are answered with the largest numbers");
            runc_stats = absurd(&runc_stats);
        }
        Ok(StatsContainerResponse { runc_stats, ..Default::default() })
    }

    async fn update_container(&self, _ctx: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.update(&req.container_id, &req.resources).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.remove(&req.container_id).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn read_stdout(&self, _ctx: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream(req, false).await
    }

    async fn read_stderr(&self, _ctx: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        self.read_stream(req, true).await
    }

    async fn write_stdin(&self, _ctx: &TtrpcContext, req: WriteStreamRequest) -> ttrpc::Result<WriteStreamResponse> {
        let p = self.containers.process(&req.container_id, &req.exec_id).map_err(status)?;
        let len = p.write_stdin(&req.data).await.map_err(status)? as u32;
        Ok(WriteStreamResponse { len, ..Default::default() })
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        let p = self.containers.process(&req.container_id, &req.exec_id).map_err(status)?;
        p.close_stdin().await;
        Ok(Empty::new())
    }

    async fn remove_process(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers.remove_exec(&req.container_id, &req.exec_id).map_err(status)?;
        Ok(Empty::new())
    }

    async fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let p = self.containers.process(&req.container_id, &req.exec_id).map_err(status)?;
        p.resize(req.rows.min(u16::MAX as u32) as u16, req.cols.min(u16::MAX as u32) as u16).map_err(status)?;
        Ok(Empty::new())
    }

    async fn checkpoint_container(&self, _ctx: &TtrpcContext, req: CheckpointContainerRequest) -> ttrpc::Result<CheckpointContainerResponse> {
        if let Some(f) = &self.test_fault {
            f.arm(crate::init::FaultDuring::Checkpoint);
        }
        let stats = self.containers.checkpoint(&req).await.map_err(status)?;
        Ok(CheckpointContainerResponse { stats, ..Default::default() })
    }

    async fn restore_container(&self, _ctx: &TtrpcContext, req: RestoreContainerRequest) -> ttrpc::Result<StartResponse> {
        if let Some(f) = &self.test_fault {
            f.arm(crate::init::FaultDuring::Restore);
        }
        let pid = self.containers.restore(&req).await.map_err(status)?;
        Ok(StartResponse { pid, ..Default::default() })
    }

    async fn criu_check(&self, _ctx: &TtrpcContext, req: CriuCheckRequest) -> ttrpc::Result<CriuCheckResponse> {
        let r = &self.containers.reaper;
        let mut args = vec!["check".to_string()];
        args.extend(req.args.iter().cloned());
        let out = cmd::run(r, crate::criu::CRIU, &args, Some(Duration::from_secs(120))).await.map_err(|e| internal(format!("running criu: {e}")))?;
        let (_, criu_version) = self.versions().await.clone();
        Ok(CriuCheckResponse {
            exit_code: if out.timed_out { -1 } else { out.code },
            output: format!("{}{}", out.stdout, out.stderr),
            criu_version,
            ..Default::default()
        })
    }

    async fn read_file_tail(&self, _ctx: &TtrpcContext, req: ReadFileTailRequest) -> ttrpc::Result<ReadFileTailResponse> {
        let at = req.at_offset.then_some(req.offset);
        let (data, file_size) =
            read_tail(Path::new(&req.path), at, req.max_bytes.min(MAX_TAIL)).map_err(|e| ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, e)))?;
        Ok(ReadFileTailResponse { data, file_size, ..Default::default() })
    }
}

impl AgentService {
    async fn read_stream(&self, req: ReadStreamRequest, stderr: bool) -> ttrpc::Result<ReadStreamResponse> {
        let p = self.containers.process(&req.container_id, &req.exec_id).map_err(status)?;
        let data = p.read(stderr, req.max_len.max(1) as usize).await.map_err(status)?;
        let eof = data.is_empty();
        Ok(ReadStreamResponse { data, eof, ..Default::default() })
    }
}

/// The last `max` bytes of a file under one of [`READABLE_ROOTS`], or at most `max` from `offset`.
pub fn read_tail(path: &Path, offset: Option<u64>, max: u32) -> Result<(Vec<u8>, u64), String> {
    use std::io::{Read, Seek, SeekFrom};
    let canon = path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))?;
    if !READABLE_ROOTS.iter().any(|r| canon.starts_with(r)) {
        return Err(format!("{} is outside the agent's readable directories {READABLE_ROOTS:?}", path.display()));
    }
    let mut f = std::fs::File::open(&canon).map_err(|e| format!("{}: {e}", canon.display()))?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let start = offset.map_or(size.saturating_sub(max as u64), |o| o.min(size));
    f.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity((size - start).min(max as u64) as usize);
    f.take(max as u64).read_to_end(&mut data).map_err(|e| e.to_string())?;
    Ok((data, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_or_a_piece_at_an_offset() {
        let dir = Path::new("/tmp/kata-rs").join(format!("read-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("log");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_tail(&f, None, 4).unwrap(), (b"6789".to_vec(), 10));
        assert_eq!(read_tail(&f, Some(2), 3).unwrap(), (b"234".to_vec(), 10));
        assert_eq!(read_tail(&f, Some(8), 5).unwrap(), (b"89".to_vec(), 10));
        assert_eq!(read_tail(&f, Some(50), 5).unwrap(), (Vec::new(), 10));
        assert!(read_tail(Path::new("/etc/hostname"), None, 4).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// runc's stats JSON with every number replaced by u64::MAX (test fault `absurd-stats`).
fn absurd(json: &[u8]) -> Vec<u8> {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Number(n) => *n = u64::MAX.into(),
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            serde_json::Value::Object(o) => o.values_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(json) else { return json.to_vec() };
    walk(&mut v);
    serde_json::to_vec(&v).unwrap_or_else(|_| json.to_vec())
}
