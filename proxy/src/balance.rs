//! Load balancer (interface stub; the implementation is being written).

use std::str::FromStr;
use std::time::Duration;

use ferrule_proto::v1::Endpoint;
use tokio::sync::watch;

use crate::discovery::Endpoints;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency (default).
    #[default]
    PeakEwma,
    RoundRobin,
    LeastRequest,
}

impl FromStr for Algorithm {
    type Err = String;
    /// "p2c-ewma" | "round-robin" | "least-request"
    fn from_str(_s: &str) -> Result<Self, Self::Err> {
        unimplemented!()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    /// Discovery knows no endpoint for the service (after waiting).
    #[error("no endpoints")]
    NoEndpoints,
    /// Endpoints exist but all are taken out after connect failures (after waiting).
    #[error("all endpoints unavailable")]
    Unavailable,
}

/// Picks endpoints for one service port. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Balancer {}

impl Balancer {
    pub fn new(_endpoints: watch::Receiver<Endpoints>, _algorithm: Algorithm) -> Self {
        unimplemented!()
    }

    /// Waits up to `wait` for an available endpoint and picks one.
    pub async fn pick(&self, _wait: Duration) -> Result<Pick, BalanceError> {
        unimplemented!()
    }

    /// (total endpoints known, endpoints currently available) for gauges.
    pub fn counts(&self) -> (usize, usize) {
        unimplemented!()
    }
}

/// One chosen endpoint for one request. Dropping it without recording counts it as cancelled
/// (in-flight released, no latency sample).
pub struct Pick {}

impl Pick {
    pub fn endpoint(&self) -> &Endpoint {
        unimplemented!()
    }

    /// The response head arrived: feeds the latency estimate.
    pub fn record_success(self) {
        unimplemented!()
    }

    /// Connecting failed: takes the endpoint out until it recovers.
    pub fn record_connect_failure(self) {
        unimplemented!()
    }
}

/// Silences "unused" until the implementation lands.
#[doc(hidden)]
pub fn _duration(_: Duration) {}
