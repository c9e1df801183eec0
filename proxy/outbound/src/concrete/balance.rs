//! The balancer service, the innermost service of the concrete level: which endpoint of the
//! service takes the request.
//!
//! It owns the service's [`BalanceTarget`]: the discovery watch of its endpoints and the
//! [`Balancer`] (peak-EWMA, least-request or round robin over the requests in flight, and the
//! connect-failure backoff that takes an endpoint out). Its readiness is "an endpoint is
//! picked": `poll_ready` picks among the endpoints the endpoint level says can take a request
//! (their breaker admits them, see [`NewEndpoint::available`]) and, while there is none,
//! waits for discovery or for a taken-out endpoint to come back, at most the target's `wait`
//! (`--endpoint-wait`) and with at most [`MAX_WAITING`] requests waiting; then it fails with
//! the reason (`unknown_service`, `no_endpoints`, `endpoints_unavailable`, `breaker_open`,
//! `overloaded`). The pick is held by the call and counted as in flight until the response
//! head arrives.
//!
//! The call sends the request to the picked endpoint's stack (failure accrual → connection,
//! built by [`NewEndpoint`]). When nothing was sent (connecting failed, or the connection
//! closed before the request left), the endpoint is taken out and another one is picked, up
//! to [`CONNECT_ATTEMPTS`] endpoints; a connection that broke after the request left is the
//! logical level's to retry (`upstream_failure`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use crate::endpoint::{EndpointError, NewEndpoint, connect_failure};
use ferrule_proxy_api::discovery::Endpoints;
use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_policy::balance::{BalanceError, Balancer, MAX_WAITING, Pick};

/// Endpoints tried for one request when connecting fails or the connection closes before the
/// request leaves (nothing was sent, so trying another is always safe).
pub const CONNECT_ATTEMPTS: usize = 3;

/// What the balancer of one service balances over.
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
            BalanceError::Ejected => ProxyError::new(
                Reason::BreakerOpen,
                name,
                format!(
                    "every available endpoint of {} is ejected by its circuit breaker",
                    self.service
                ),
            ),
            BalanceError::TooManyWaiting => ProxyError::new(
                Reason::Overloaded,
                name,
                format!(
                    "{MAX_WAITING} requests already wait for an endpoint of {}",
                    self.service
                ),
            ),
        }
    }

    /// [`BalanceTarget::pick`] when it needs no wait.
    fn pick_now(&self, endpoints: &NewEndpoint) -> Option<Pick> {
        endpoints.track(&self.endpoints.borrow().endpoints);
        self.balancer.pick_now(&|key| endpoints.available(key))
    }

    /// Picks an endpoint that `endpoints` says can take a request, waiting as described in
    /// the module doc.
    async fn pick(&self, endpoints: &NewEndpoint) -> Result<Pick, BalanceError> {
        endpoints.track(&self.endpoints.borrow().endpoints);
        self.balancer
            .pick_admitted(self.wait, &|key| endpoints.available(key))
            .await
    }
}

type Picking = Pin<Box<dyn Future<Output = Result<Pick, BalanceError>> + Send + Sync>>;

enum State {
    Idle,
    Picking(Picking),
    Picked(Pick),
}

/// The balancer of one service under one config version. Each clone picks for itself.
pub struct Balance {
    target: Arc<BalanceTarget>,
    endpoints: NewEndpoint,
    state: State,
}

impl Balance {
    pub fn new(target: Arc<BalanceTarget>, endpoints: NewEndpoint) -> Self {
        Self {
            target,
            endpoints,
            state: State::Idle,
        }
    }
}

impl Clone for Balance {
    fn clone(&self) -> Self {
        Self::new(self.target.clone(), self.endpoints.clone())
    }
}

impl Service<Request<BoxBody>> for Balance {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        loop {
            match &mut self.state {
                State::Picked(_) => return Poll::Ready(Ok(())),
                State::Idle => {
                    // Only a pick that has to wait boxes a future.
                    if let Some(pick) = self.target.pick_now(&self.endpoints) {
                        self.state = State::Picked(pick);
                        continue;
                    }
                    let (target, endpoints) = (self.target.clone(), self.endpoints.clone());
                    self.state =
                        State::Picking(Box::pin(async move { target.pick(&endpoints).await }));
                }
                State::Picking(picking) => match ready!(picking.as_mut().poll(cx)) {
                    Ok(pick) => self.state = State::Picked(pick),
                    Err(error) => {
                        self.state = State::Idle;
                        return Poll::Ready(Err(self.target.unavailable(&error)));
                    }
                },
            }
        }
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let State::Picked(pick) = std::mem::replace(&mut self.state, State::Idle) else {
            panic!("Balance::call without poll_ready reporting ready first");
        };
        Box::pin(forward(
            self.target.clone(),
            self.endpoints.clone(),
            pick,
            req,
        ))
    }
}

/// Sends `req` to the endpoint `first`, then to others while nothing could be sent.
async fn forward(
    target: Arc<BalanceTarget>,
    endpoints: NewEndpoint,
    first: Pick,
    mut req: Request<BoxBody>,
) -> Result<Response<BoxBody>, ProxyError> {
    let mut next = Some(first);
    let mut last_error = None;
    for _ in 0..CONNECT_ATTEMPTS {
        let pick = match next.take() {
            Some(pick) => pick,
            None => target
                .pick(&endpoints)
                .await
                .map_err(|e| target.unavailable(&e))?,
        };
        let mut endpoint = endpoints.new_service(pick.endpoint());
        let result = match endpoint.ready().await {
            Ok(endpoint) => endpoint.call(req).await,
            // Another request took the half-open endpoint's probe since the pick: pick again.
            Err(EndpointError::Ejected) => continue,
            Err(error) => Err(error),
        };
        match result {
            Ok(rsp) => {
                pick.record_success();
                return Ok(rsp);
            }
            Err(EndpointError::Unsent { error, req: unsent }) => {
                tracing::debug!(service = %target.name, endpoint = %pick.endpoint().addr, %error, "request not sent");
                pick.record_connect_failure();
                req = *unsent;
                last_error = Some(error);
            }
            Err(EndpointError::Broken(error)) => {
                return Err(ProxyError::new(
                    Reason::UpstreamFailure,
                    target.name.to_string(),
                    error.to_string(),
                ));
            }
            // Only readiness reports an ejection; were a call to, it is the breaker's answer.
            Err(EndpointError::Ejected) => {
                return Err(target.unavailable(&BalanceError::Ejected));
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

#[cfg(test)]
mod tests {
    use ferrule_config::{CircuitBreaker, ServicePolicySpec};
    use ferrule_proto::v1::Endpoint;
    use ferrule_proxy_core::metrics::Direction;
    use ferrule_proxy_policy::balance::Algorithm;
    use ferrule_proxy_policy::breaker::FailureAccrual;
    use ferrule_proxy_policy::endpoint::EndpointTarget;
    use ferrule_proxy_transport::client::{ClientConfig, Clients};
    use ferrule_proxy_transport::metrics::PoolMetrics;
    use tokio::time::Instant;

    use super::*;
    use crate::endpoint::EndpointConnector;

    fn endpoints(ports: &[u32]) -> Endpoints {
        let eps: Vec<Endpoint> = ports
            .iter()
            .map(|&port| Endpoint {
                service: "user".into(),
                address: "127.0.0.1".into(),
                port,
                ..Default::default()
            })
            .collect();
        Endpoints {
            version: 1,
            endpoints: EndpointTarget::resolve_all(&eps),
            synced: true,
        }
    }

    fn accrual(consecutive_failures: u32) -> FailureAccrual {
        let policy = ServicePolicySpec {
            circuit_breaker: Some(CircuitBreaker {
                consecutive_failures: Some(consecutive_failures),
                max_ejection_percent: Some(100),
                ..Default::default()
            }),
            ..Default::default()
        }
        .effective();
        FailureAccrual::new(&policy.circuit_breaker)
    }

    /// A balancer over `initial`, waiting at most `wait`.
    fn balance(
        initial: Endpoints,
        wait: Duration,
        accrual: FailureAccrual,
    ) -> (watch::Sender<Endpoints>, Balance) {
        let (tx, rx) = watch::channel(initial);
        let target = Arc::new(BalanceTarget {
            service: ServiceRef::parse("user").unwrap(),
            name: "user".into(),
            balancer: Balancer::new(rx.clone(), Algorithm::RoundRobin),
            endpoints: rx,
            wait,
        });
        let clients = Clients::new(
            Direction::Outbound,
            ClientConfig {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
            },
            &PoolMetrics::default(),
        );
        let endpoints = NewEndpoint::new(
            accrual,
            EndpointConnector::new(clients),
            Duration::from_secs(1),
        );
        (tx, Balance::new(target, endpoints))
    }

    fn key(port: u32) -> Arc<str> {
        endpoints(&[port]).endpoints[0].key.clone()
    }

    fn picked_port(balance: &Balance) -> Option<u32> {
        match &balance.state {
            State::Picked(pick) => Some(pick.endpoint().port()),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_waits_for_discovery_then_holds_the_pick() {
        let unsynced = Endpoints::default();
        let (tx, mut balance) = balance(unsynced, Duration::from_secs(5), accrual(5));
        let waiting = tokio::spawn(async move {
            let ready = balance.ready().await.map(|_| ()).map_err(|e| e.reason);
            (ready, balance)
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "ready with no endpoint");
        tx.send_replace(endpoints(&[9]));
        let (ready, balance) = waiting.await.unwrap();
        ready.unwrap();
        assert_eq!(picked_port(&balance), Some(9));
        // A clone picks for itself.
        assert_eq!(picked_port(&balance.clone()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_fails_with_the_reason_after_the_bounded_wait() {
        let (_tx, mut unknown) =
            balance(Endpoints::default(), Duration::from_millis(300), accrual(5));
        let start = Instant::now();
        let error = unknown.ready().await.err().unwrap();
        assert_eq!(error.reason, Reason::NoEndpoints);
        assert_eq!(Instant::now() - start, Duration::from_millis(300));

        // Discovery answered, with no instance: the service is unknown.
        let (_tx, mut none) = balance(endpoints(&[]), Duration::from_millis(300), accrual(5));
        assert_eq!(
            none.ready().await.err().unwrap().reason,
            Reason::UnknownService
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_are_not_picked_and_all_ejected_fails_at_once() {
        let breakers = accrual(1);
        let (_tx, mut balance) =
            balance(endpoints(&[1, 2]), Duration::from_secs(5), breakers.clone());
        balance.ready().await.unwrap();
        let first = picked_port(&balance).unwrap();
        breakers.try_acquire(&key(first)).unwrap().failure();
        for _ in 0..4 {
            let mut next = balance.clone();
            next.ready().await.unwrap();
            assert_ne!(
                picked_port(&next),
                Some(first),
                "an ejected endpoint was picked"
            );
        }
        let other = if first == 1 { 2 } else { 1 };
        breakers.try_acquire(&key(other)).unwrap().failure();
        let start = Instant::now();
        let mut next = balance.clone();
        assert_eq!(
            next.ready().await.err().unwrap().reason,
            Reason::BreakerOpen
        );
        assert_eq!(Instant::now(), start, "waited for an ejected endpoint");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_endpoints_is_bounded() {
        let (_tx, balance) = balance(Endpoints::default(), Duration::from_secs(5), accrual(5));
        let waiters: Vec<_> = (0..MAX_WAITING)
            .map(|_| {
                let mut waiter = balance.clone();
                tokio::spawn(async move { waiter.ready().await.map(|_| ()).map_err(|e| e.reason) })
            })
            .collect();
        // Let every waiter register.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut one_more = balance.clone();
        let start = Instant::now();
        let error = one_more.ready().await.err().unwrap();
        assert_eq!(error.reason, Reason::Overloaded);
        assert!(
            error.message.contains("requests already wait"),
            "{}",
            error.message
        );
        assert_eq!(Instant::now(), start, "waited past MAX_WAITING");
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), Err(Reason::NoEndpoints));
        }
    }
}
