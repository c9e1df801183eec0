//! The outbound HTTP stack of one logical service, built in [`stack`].
//!
//! A request goes through, in order: observe (metrics, access log) → respond (proxy errors
//! become explained responses) → logical (route, faults, traffic split, timeouts, retries; see
//! [`super::logical`]) → concrete (rate limit, concurrency limit, balancer with circuit
//! breakers; see [`super::concrete`]) → endpoint (the connection, see [`super::endpoint`]).

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use super::logical::Logical;
use ferrule_proxy_core::errors::RespondLayer;
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::observe::ObserveLayer;
use ferrule_proxy_core::server::HttpStack;

/// Builds the whole HTTP path of one outbound service.
pub fn stack(logical: Logical, metrics: &Metrics, access_log: bool) -> HttpStack {
    let observe = ObserveLayer::new(
        metrics.clone(),
        Direction::Outbound,
        logical.name.clone(),
        access_log,
    );
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(observe)
            .layer(RespondLayer::new(metrics.clone(), Direction::Outbound))
            .service(logical),
    )
}
