//! Live request metadata for `ferrule tap`: the observe layer publishes one [`TapEvent`] per
//! response, and the admin listener's `/tap` streams them to whoever listens.
//!
//! Never bodies, and never headers beyond method, path and authority. Publishing costs one
//! atomic load while nobody taps: the event is only built when a subscriber exists. Each
//! subscriber reads from a bounded ring ([`CAPACITY`] events): one that falls behind loses the
//! oldest events (and is told how many), so a slow tap never slows traffic or grows memory.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it loses the oldest.
pub const CAPACITY: usize = 1024;

/// The metadata of one request and its response.
#[derive(Debug, Clone, Serialize)]
pub struct TapEvent {
    /// Milliseconds since the Unix epoch, when the response head was seen.
    pub ts_ms: u64,
    /// `inbound`, `outbound` or `gateway`.
    pub direction: &'static str,
    /// The service the request went to (outbound, gateway) or the app port (inbound).
    pub target_service: String,
    pub request_id: String,
    pub client: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    /// Time to the response head.
    pub latency_ms: f64,
    /// The `ferrule-error` reason when the proxy (this one or a peer) made the response.
    pub error: String,
}

/// Where the observe layers publish and `/tap` subscribes. Cheap to clone.
#[derive(Clone)]
pub struct Tap {
    tx: broadcast::Sender<Arc<TapEvent>>,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Tap {
    /// Whether anybody listens; callers skip building an event when not.
    pub fn active(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publishes the event `make` builds, if anybody listens. Never blocks.
    pub fn publish(&self, make: impl FnOnce() -> TapEvent) {
        if self.active() {
            // An error only means the last subscriber left meanwhile.
            let _ = self.tx.send(Arc::new(make()));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TapEvent>> {
        self.tx.subscribe()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str) -> TapEvent {
        TapEvent {
            ts_ms: now_ms(),
            direction: "inbound",
            target_service: "user".into(),
            request_id: "1".into(),
            client: "127.0.0.1:1".into(),
            method: "GET".into(),
            authority: String::new(),
            path: path.into(),
            status: 200,
            latency_ms: 1.0,
            error: String::new(),
        }
    }

    #[tokio::test]
    async fn nothing_is_built_without_a_subscriber_and_a_slow_one_loses_the_oldest() {
        let tap = Tap::default();
        let mut built = false;
        tap.publish(|| {
            built = true;
            event("/a")
        });
        assert!(!built, "an event was built with nobody tapping");

        let mut rx = tap.subscribe();
        for i in 0..CAPACITY + 10 {
            tap.publish(|| event(&format!("/{i}")));
        }
        // The publisher never waited; the subscriber is told what it lost, then reads on.
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        assert_eq!(rx.recv().await.unwrap().path, "/10");
    }
}
