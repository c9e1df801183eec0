//! Discovery client (interface stub; the implementation is being written).

use std::sync::Arc;

use ferrule_proto::names::ServiceRef;
use ferrule_proto::v1::{Endpoint, ProxyInfo};
use tokio::sync::watch;

/// Endpoints of one service port, as last known.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// Store revision of the last update applied.
    pub version: i64,
    /// Endpoints whose `port_name` matches the resolved target.
    pub endpoints: Arc<[Endpoint]>,
    /// True once at least one snapshot arrived for this service.
    pub synced: bool,
}

/// Subscribes to the controller's `Discovery` stream per service on first use. Cheap to clone.
#[derive(Clone)]
pub struct Discovery {}

impl Discovery {
    /// `controllers`: gRPC addresses ("127.0.0.1:8086" or "http://..."), tried in turn.
    pub fn new(_controllers: Vec<String>, _proxy: ProxyInfo) -> Self {
        unimplemented!()
    }

    /// Fixed endpoints, no controller: for tests and for static upstreams.
    pub fn fixed(_services: Vec<(ServiceRef, Vec<Endpoint>)>) -> Self {
        unimplemented!()
    }

    /// The endpoints of `target`; subscribes on first call, shared afterwards.
    pub fn resolve(&self, _target: &ServiceRef) -> watch::Receiver<Endpoints> {
        unimplemented!()
    }

    /// True while a stream to some controller is established (for `/ready` and metrics).
    pub fn connected(&self) -> bool {
        unimplemented!()
    }
}
