//! The outbound HTTP stack of one logical service, built in [`stack`].
//!
//! A request goes through, in order: observe (metrics, access log) → respond (proxy errors
//! become explained responses) → the logical level ([`super::logical`]: route → request
//! timeout → retry) → the concrete backend the route chose ([`super::concrete`]: rate limit →
//! concurrency limit → balancer) → the endpoint it picked ([`super::endpoint`]: failure
//! accrual → connection).

use std::sync::Arc;

use tower::ServiceBuilder;

use super::logical::LogicalStack;
use ferrule_proxy_core::errors::RespondLayer;
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::observe::ObserveLayer;
use ferrule_proxy_core::server::HttpStack;
use ferrule_proxy_core::stack::BoxStack;

/// Builds the whole HTTP path of one outbound service named `name`.
pub fn stack(
    name: Arc<str>,
    logical: LogicalStack,
    metrics: &Metrics,
    access_log: bool,
) -> HttpStack {
    let observe = ObserveLayer::new(metrics.clone(), Direction::Outbound, name, access_log);
    BoxStack::new(
        ServiceBuilder::new()
            .layer(observe)
            .layer(RespondLayer::new(metrics.clone(), Direction::Outbound))
            .service(logical),
    )
}
