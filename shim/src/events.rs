//! The shim's events, in the order of the state changes that cause them: each is queued (without
//! waiting) by the code that commits its change, under the shim's lock, and one forwarder hands them
//! to containerd's publisher in that order. A process that exits at once thus has its TaskStart sent
//! before its TaskExit, whichever task reports the exit.
use containerd_shim::{asynchronous::publisher::RemotePublisher, protos::protobuf::MessageDyn};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

enum Item {
    Event(&'static str, Box<dyn MessageDyn>),
    /// Answered once every event queued before it has been handed to the publisher.
    Flush(oneshot::Sender<()>),
}

/// Where events are sent: containerd's publisher, or (in unit tests) a channel.
pub trait Sink: Send + Sync + 'static {
    fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) -> impl std::future::Future<Output = ()> + Send;
}

/// containerd's events service: the namespace of every event is the shim's.
pub struct Containerd {
    pub publisher: RemotePublisher,
    pub namespace: String,
}

impl Sink for Containerd {
    async fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.publish(containerd_shim::protos::ttrpc::context::Context::default(), topic, &self.namespace, event).await {
            warn!(topic, error = %e, "publishing event failed");
        }
    }
}

/// The queue of the shim's events (cheap to clone).
#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<Item>,
}

impl Events {
    /// Starts the forwarder to `sink`.
    pub fn new(sink: impl Sink) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match item {
                    Item::Event(topic, event) => sink.send(topic, event).await,
                    Item::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Events { tx }
    }

    /// Queues an event after every event queued before it; never waits.
    pub fn queue(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if self.tx.send(Item::Event(topic, event)).is_err() {
            warn!(topic, "the event forwarder has ended; event dropped");
        }
    }

    /// Returns once every event queued so far has been handed to the sink (the shim's last step
    /// before it exits), or after `limit`.
    pub async fn flush(&self, limit: std::time::Duration) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Item::Flush(done)).is_ok() && tokio::time::timeout(limit, wait).await.is_err() {
            warn!("events still queued after {limit:?}; the shim exits without them");
        }
    }
}

#[cfg(test)]
pub mod fake {
    //! A sink that records what it is sent, for unit tests (a fake of containerd's events service).
    use super::*;

    pub struct Recorder(pub mpsc::UnboundedSender<(&'static str, Box<dyn MessageDyn>)>);

    impl Sink for Recorder {
        async fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
            let _ = self.0.send((topic, event));
        }
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::events::task::{TaskExit, TaskStart};

    use super::*;

    /// A slow sink does not reorder events, and a flush waits for all of them.
    #[tokio::test]
    async fn events_reach_the_sink_in_queue_order_and_a_flush_waits_for_them() {
        struct Slow(fake::Recorder);
        impl Sink for Slow {
            async fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
                tokio::time::sleep(std::time::Duration::from_millis(if topic == "/tasks/start" { 50 } else { 1 })).await;
                self.0.send(topic, event).await
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let events = Events::new(Slow(fake::Recorder(tx)));
        events.queue("/tasks/start", Box::new(TaskStart { container_id: "c".into(), ..Default::default() }));
        events.queue("/tasks/exit", Box::new(TaskExit { container_id: "c".into(), ..Default::default() }));
        events.flush(std::time::Duration::from_secs(10)).await;
        let topics: Vec<&str> = std::iter::from_fn(|| rx.try_recv().ok()).map(|(t, _)| t).collect();
        assert_eq!(topics, ["/tasks/start", "/tasks/exit"]);
    }
}
