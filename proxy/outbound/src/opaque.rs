//! Opaque TCP to a logical service: pick an endpoint, connect (another endpoint if that
//! fails, up to [`CONNECT_ATTEMPTS`]), then copy bytes both ways with half-close passed
//! through.
//!
//! A connection uses the concrete service's [`Balancer`](ferrule_proxy_policy::balance::Balancer)
//! directly rather than its stack: the concrete and endpoint layers are services of HTTP
//! requests, and what they own has no TCP meaning here. A rate limit and a concurrency limit
//! count requests (a long-lived connection would hold a request slot for its life), and the
//! breaker classifies responses by status, which bytes do not have. What does apply is kept:
//! the balancer's pick (the connection counts as in flight for least-request and EWMA while it
//! lives), its bounded wait for endpoints, and the connect-failure takeout. An endpoint with an
//! identity gets mutual TLS, as HTTP to it does.

use tokio::io::{AsyncRead, AsyncWrite};

use super::concrete::balance::{BalanceTarget, CONNECT_ATTEMPTS};
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::server::splice_tcp;
use ferrule_proxy_transport::client::{Clients, Dst};
use ferrule_proxy_transport::pool::Identity;

/// Forwards the connection `io` to an endpoint of `target`.
pub async fn forward<I>(io: I, target: &BalanceTarget, clients: &Clients, metrics: &Metrics)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..CONNECT_ATTEMPTS {
        let pick = match target.balancer.pick(target.wait).await {
            Ok(pick) => pick,
            Err(error) => {
                let error = target.unavailable(&error);
                tracing::info!(%error, "opaque connection refused");
                metrics.proxy_error(Direction::Outbound, error.reason);
                return;
            }
        };
        let endpoint = pick.endpoint();
        let addr = endpoint.addr;
        let dst = Dst {
            addr,
            identity: endpoint.identity.clone().map(Identity::new),
            idle_timeout: None,
        };
        let connected = clients.connect_stream(&dst).await.map(|s| (addr, s));
        match connected {
            Ok((addr, upstream)) => {
                // The pick is held for the connection's life so least-request counts it.
                splice_tcp(io, upstream, addr).await;
                drop(pick);
                return;
            }
            Err(error) => {
                tracing::debug!(service = %target.name, %error, "connect failed");
                pick.record_connect_failure();
            }
        }
    }
    tracing::info!(service = %target.name, "opaque connection: no endpoint could be connected");
    metrics.proxy_error(
        Direction::Outbound,
        ferrule_proxy_core::errors::Reason::UpstreamConnectFailure,
    );
}
