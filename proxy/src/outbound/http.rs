//! The outbound HTTP stack of one logical service, built in [`stack`].
//!
//! A request goes through, in order: observe (metrics, access log) → respond (proxy errors
//! become explained responses) → balance (pick an endpoint; another one if connecting fails)
//! → endpoint (the connection, see [`super::endpoint`]). Routes (`HTTPRoute`), retries and
//! timeouts will be layers between respond and balance.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::watch;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use super::endpoint::{EndpointConnector, connect_failure};
use crate::balance::{BalanceError, Balancer};
use crate::body::BoxBody;
use crate::client::{Protocol, SendError};
use crate::discovery::Endpoints;
use crate::errors::{ProxyError, Reason, RespondLayer};
use crate::metrics::{Direction, Metrics};
use crate::observe::ObserveLayer;
use crate::server::HttpStack;

/// Endpoints tried for one request when connecting fails or the connection closes before the
/// request leaves (nothing was sent, so trying another is always safe).
pub const CONNECT_ATTEMPTS: usize = 3;

/// What the balance level needs to know about its service.
#[derive(Clone)]
pub struct BalanceTarget {
    pub service: ServiceRef,
    pub name: Arc<str>,
    pub endpoints: watch::Receiver<Endpoints>,
    pub balancer: Balancer,
    /// How long a request waits for an endpoint to become available.
    pub wait: Duration,
}

impl BalanceTarget {
    /// The error for a request no endpoint could take.
    pub fn unavailable(&self, error: &BalanceError) -> ProxyError {
        let name = self.name.to_string();
        match error {
            BalanceError::NoEndpoints => {
                let known = self.endpoints.borrow();
                if known.synced && known.endpoints.is_empty() {
                    ProxyError::new(
                        Reason::UnknownService,
                        name,
                        format!("no instance of service {} is registered", self.service),
                    )
                } else {
                    ProxyError::new(
                        Reason::NoEndpoints,
                        name,
                        format!(
                            "discovery gave no endpoint of {} within {:?}",
                            self.service, self.wait
                        ),
                    )
                }
            }
            BalanceError::Unavailable => ProxyError::new(
                Reason::EndpointsUnavailable,
                name,
                format!(
                    "every endpoint of {} failed to connect recently",
                    self.service
                ),
            ),
        }
    }
}

/// Builds the whole HTTP path of one outbound service.
pub fn stack(
    target: BalanceTarget,
    connector: EndpointConnector,
    metrics: &Metrics,
    access_log: bool,
) -> HttpStack {
    let observe = ObserveLayer::new(
        metrics.clone(),
        Direction::Outbound,
        target.name.clone(),
        access_log,
    );
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(observe)
            .layer(RespondLayer::new(metrics.clone(), Direction::Outbound))
            .service(Balance { target, connector }),
    )
}

/// Picks an endpoint per request and forwards the request to it.
#[derive(Clone)]
struct Balance {
    target: BalanceTarget,
    connector: EndpointConnector,
}

impl Service<Request<BoxBody>> for Balance {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // Waiting for endpoints happens per request, bounded by `wait`, inside `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        Box::pin(self.clone().forward(req))
    }
}

impl Balance {
    async fn forward(self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, ProxyError> {
        let target = &self.target;
        let version = req.version();
        let mut last_error = None;
        for _ in 0..CONNECT_ATTEMPTS {
            let pick = target
                .balancer
                .pick(target.wait)
                .await
                .map_err(|e| target.unavailable(&e))?;
            let ep = pick.endpoint().clone();
            let protocol = Protocol::of(&req);
            let conn = match self.connector.connect(&ep, protocol).await {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::debug!(service = %target.name, endpoint = %ep.address, port = ep.port, %error, "connect failed");
                    pick.record_connect_failure();
                    last_error = Some(error);
                    continue;
                }
            };
            self.connector.prepare(&ep, &mut req);
            match conn.send(req).await {
                Ok(rsp) => {
                    pick.record_success();
                    return Ok(rsp);
                }
                // The connection closed before the request left (the endpoint is shutting
                // down): undo what this endpoint's connection changed and try another.
                Err(SendError {
                    error,
                    unsent: Some(unsent),
                }) => {
                    tracing::debug!(service = %target.name, endpoint = %ep.address, port = ep.port, %error, "request not sent");
                    pick.record_connect_failure();
                    req = unsent;
                    self.connector.unprepare(&mut req, version);
                    last_error = Some(error);
                }
                Err(SendError {
                    error,
                    unsent: None,
                }) => {
                    return Err(ProxyError::new(
                        Reason::UpstreamFailure,
                        target.name.to_string(),
                        error.to_string(),
                    ));
                }
            }
        }
        Err(match last_error {
            Some(error) => connect_failure(&target.name, &error),
            None => ProxyError::new(
                Reason::UpstreamConnectFailure,
                target.name.to_string(),
                "no endpoint was tried",
            ),
        })
    }
}
