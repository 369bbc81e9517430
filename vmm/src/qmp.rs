//! QMP client on top of the `qapi` crate (async, tokio): negotiation, commands, events.
use std::{path::Path, time::Duration};

use futures::StreamExt;
use qapi::{futures::QapiService, qmp};
use tokio::{io::WriteHalf, net::UnixStream, sync::broadcast};
use tracing::{debug, trace};

type Service = QapiService<qapi::futures::QmpStreamTokio<WriteHalf<UnixStream>>>;

/// QMP events kata-rs cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    Stop,
    Resume,
    Shutdown { guest: bool, reason: String },
    GuestPanicked,
    /// Any other event, by name.
    Other(String),
    /// The QMP connection closed (QEMU exited).
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} failed: {message}")]
    Command { command: &'static str, message: String },
    #[error("QMP command {command} timed out after {timeout:?}")]
    Timeout { command: &'static str, timeout: Duration },
}

/// A negotiated QMP connection. Events are read by a background task and broadcast.
pub struct Qmp {
    service: Service,
    events: broadcast::Sender<VmEvent>,
    reader: tokio::task::JoinHandle<()>,
    timeout: Duration,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to a QMP unix socket and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let err = |source| QmpError::Connect { path: path.display().to_string(), source };
        // QEMU creates the socket file before it listens: "connection refused" is retried until `timeout`.
        let deadline = tokio::time::Instant::now() + timeout;
        let negotiation = loop {
            match tokio::time::timeout_at(deadline, qapi::futures::QmpStreamTokio::open_uds(path)).await {
                Err(_) => return Err(err(std::io::ErrorKind::TimedOut.into())),
                Ok(Ok(n)) => break n,
                Ok(Err(e)) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => return Err(err(e)),
            }
        };
        let stream = tokio::time::timeout(timeout, negotiation.negotiate())
            .await
            .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(err)?;
        let (service, mut events_stream) = stream.into_parts();
        let (tx, _) = broadcast::channel(64);
        let sender = tx.clone();
        let reader = tokio::spawn(async move {
            while let Some(ev) = events_stream.next().await {
                match ev {
                    Ok(ev) => {
                        let mapped = map_event(&ev);
                        trace!(?mapped, "QMP event");
                        let _ = sender.send(mapped);
                    }
                    Err(e) => {
                        debug!(error = %e, "QMP stream error");
                        break;
                    }
                }
            }
            let _ = sender.send(VmEvent::Closed);
        });
        Ok(Qmp { service, events: tx, reader, timeout })
    }

    /// Subscribes to events arriving from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    async fn run<C: qapi::qmp::QmpCommand>(&self, name: &'static str, cmd: C) -> Result<C::Ok, QmpError> {
        match tokio::time::timeout(self.timeout, self.service.execute(cmd)).await {
            Err(_) => Err(QmpError::Timeout { command: name, timeout: self.timeout }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(QmpError::Command { command: name, message: e.to_string() }),
        }
    }

    /// `query-status`: (running, status name such as "running", "paused", "shutdown").
    pub async fn query_status(&self) -> Result<(bool, String), QmpError> {
        let s = self.run("query-status", qmp::query_status {}).await?;
        let name = serde_json::to_value(s.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        Ok((s.running, name))
    }

    pub async fn stop(&self) -> Result<(), QmpError> {
        self.run("stop", qmp::stop {}).await.map(|_| ())
    }

    pub async fn cont(&self) -> Result<(), QmpError> {
        self.run("cont", qmp::cont {}).await.map(|_| ())
    }

    pub async fn quit(&self) -> Result<(), QmpError> {
        self.run("quit", qmp::quit {}).await.map(|_| ())
    }

    /// `netdev_add` of a tap backend: QEMU opens (creating if needed) the tap `ifname` in its own
    /// network namespace; no scripts, no vhost-net.
    pub async fn netdev_add_tap(&self, id: &str, ifname: &str) -> Result<(), QmpError> {
        let tap = qmp::NetdevTapOptions {
            ifname: Some(ifname.to_string()),
            script: Some("no".into()),
            downscript: Some("no".into()),
            vhost: Some(false),
            ..Default::default()
        };
        self.run("netdev_add", qmp::netdev_add(qmp::Netdev::tap { id: id.to_string(), tap })).await.map(|_| ())
    }

    pub async fn netdev_del(&self, id: &str) -> Result<(), QmpError> {
        self.run("netdev_del", qmp::netdev_del { id: id.to_string() }).await.map(|_| ())
    }

    /// `device_add` of `driver` with `id` on `bus` and driver properties `props`.
    pub async fn device_add(&self, driver: &str, id: &str, bus: &str, props: serde_json::Map<String, serde_json::Value>) -> Result<(), QmpError> {
        let cmd = qmp::device_add { driver: driver.to_string(), id: Some(id.to_string()), bus: Some(bus.to_string()), arguments: props };
        self.run("device_add", cmd).await.map(|_| ())
    }

    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.run("system_powerdown", qmp::system_powerdown {}).await.map(|_| ())
    }
}

fn map_event(ev: &qmp::Event) -> VmEvent {
    match ev {
        qmp::Event::STOP { .. } => VmEvent::Stop,
        qmp::Event::RESUME { .. } => VmEvent::Resume,
        qmp::Event::SHUTDOWN { data, .. } => VmEvent::Shutdown {
            guest: data.guest,
            reason: serde_json::to_value(data.reason).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        },
        qmp::Event::GUEST_PANICKED { .. } => VmEvent::GuestPanicked,
        other => VmEvent::Other(
            serde_json::to_value(other)
                .ok()
                .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| "unknown".into()),
        ),
    }
}
