//! The concrete level: one backend service, after the logical level chose it (the service the
//! app called, or a backend of a traffic split).
//!
//! A request to a concrete service goes through its local rate limit (429 with `Retry-After`),
//! its concurrency limit (503 `overloaded` when the limit and the pending queue are full), then
//! the balancer, which only picks endpoints their circuit breaker admits; the endpoint's
//! breaker is told how the request went (a 5xx or a failed connection is a failure). The
//! stateful pieces are the service's [`ServiceGuards`], carried across config versions by a
//! [`GuardsCell`]. [`Concretes`] builds one [`Concrete`] per service on first use and shares it
//! between the logical services that route to it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use http::{Request, Response};
use tokio::sync::watch;

use super::endpoint::{EndpointConnector, connect_failure};
use super::logical::Routed;
use ferrule_proxy_api::discovery::{Discovery, Endpoints};
use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_core::idle_cache::IdleCache;
use ferrule_proxy_core::metrics::Direction;
use ferrule_proxy_policy::balance::{Algorithm, BalanceError, Balancer};
use ferrule_proxy_policy::breaker::FailureAccrual;
use ferrule_proxy_policy::endpoint::EndpointTarget;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::ratelimit::RateKey;
use ferrule_proxy_policy::{GuardsCell, PolicySet, ServiceGuards};
use ferrule_proxy_transport::client::{Protocol, SendError};

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
                    "{} requests already wait for an endpoint of {}",
                    ferrule_proxy_policy::balance::MAX_WAITING,
                    self.service
                ),
            ),
        }
    }
}

/// One backend service: its balancer and its guards.
pub struct Concrete {
    pub balance: BalanceTarget,
    guards: Arc<GuardsCell>,
    /// The (config version, discovery set) the failure accrual last learnt its endpoints from.
    accrual_synced: Mutex<Option<(i64, Arc<[EndpointTarget]>)>>,
    connector: EndpointConnector,
    metrics: PolicyMetrics,
}

impl Concrete {
    /// The service's guards under `set`, their breakers knowing the current endpoints.
    pub fn guards(&self, set: &PolicySet) -> ServiceGuards {
        let guards = self.guards.get(set);
        let endpoints = self.balance.endpoints.borrow().endpoints.clone();
        let mut synced = self
            .accrual_synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = synced
            .as_ref()
            .is_some_and(|(v, eps)| *v == set.version() && Arc::ptr_eq(eps, &endpoints));
        if !current {
            guards
                .failure_accrual
                .set_endpoints(endpoints.iter().map(|ep| ep.key.to_string()));
            *synced = Some((set.version(), endpoints));
        }
        guards
    }

    /// Sends `req` through the service's limits to an endpoint its breakers admit.
    pub async fn send(
        &self,
        guards: &ServiceGuards,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, ProxyError> {
        let name = &self.balance.name;
        if let Some(limit) = &guards.rate_limit
            && let Err(limited) = limit.check(&RateKey::Global)
        {
            self.metrics.rate_limited(Direction::Outbound, name);
            return Err(ProxyError::new(
                Reason::RateLimited,
                name.to_string(),
                limited.to_string(),
            )
            .with_retry_after(limited.retry_after));
        }
        // Held until the response head arrives: the limit bounds requests waiting on the
        // service, not responses being streamed back.
        let _permit = guards.concurrency.acquire().await.map_err(|overloaded| {
            ProxyError::new(Reason::Overloaded, name.to_string(), overloaded.to_string())
        })?;
        self.forward(&guards.failure_accrual, guards.idle_timeout(), req)
            .await
    }

    async fn forward(
        &self,
        accrual: &FailureAccrual,
        idle_timeout: Duration,
        mut req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, ProxyError> {
        let target = &self.balance;
        let version = req.version();
        let mut last_error = None;
        for _ in 0..CONNECT_ATTEMPTS {
            let pick = target
                .balancer
                .pick_admitted(target.wait, &|key| accrual.is_available(key))
                .await
                .map_err(|e| target.unavailable(&e))?;
            // Another request took the half-open endpoint's probe since the pick: pick again.
            let Some(attempt) = accrual.try_acquire(pick.key()) else {
                continue;
            };
            let ep = pick.endpoint().clone();
            let protocol = Protocol::of(&req);
            let conn = match self.connector.connect(&ep, protocol, idle_timeout).await {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::debug!(service = %target.name, endpoint = %ep.addr, %error, "connect failed");
                    pick.record_connect_failure();
                    attempt.failure();
                    last_error = Some(error);
                    continue;
                }
            };
            self.connector.prepare(&ep, &mut req);
            match conn.send(req).await {
                Ok(rsp) => {
                    pick.record_success();
                    if ferrule_proxy_core::errors::is_endpoint_failure(&rsp) {
                        attempt.failure();
                    } else {
                        attempt.success();
                    }
                    return Ok(rsp);
                }
                // The connection closed before the request left (the endpoint is shutting
                // down): undo what this endpoint's connection changed and try another.
                Err(SendError {
                    error,
                    unsent: Some(unsent),
                }) => {
                    tracing::debug!(service = %target.name, endpoint = %ep.addr, %error, "request not sent");
                    pick.record_connect_failure();
                    attempt.failure();
                    req = unsent;
                    self.connector.unprepare(&mut req, version);
                    last_error = Some(error);
                }
                Err(SendError {
                    error,
                    unsent: None,
                }) => {
                    attempt.failure();
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

/// The last layer of the logical level: sends each attempt to the concrete backend the
/// route chose, through that backend's limits and balancer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConcreteRouter;

impl tower::Service<Routed> for ConcreteRouter {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = futures::future::BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        // Which backend a request goes to is known only per request: readiness (limits,
        // endpoints) is awaited inside the call, bounded by the backend's queues.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        Box::pin(async move {
            let Routed { req, params } = routed;
            let guards = params.backend.guards(&params.set);
            params.backend.send(&guards, req).await
        })
    }
}

/// Settings every concrete service shares.
#[derive(Debug, Clone, Copy)]
pub struct ConcreteConfig {
    pub algorithm: Algorithm,
    pub endpoint_wait: Duration,
}

/// The concrete services of one proxy, built on first use.
pub struct Concretes {
    config: ConcreteConfig,
    discovery: Discovery,
    connector: EndpointConnector,
    metrics: PolicyMetrics,
    services: IdleCache<ServiceRef, Concrete>,
}

impl Concretes {
    pub fn new(
        config: ConcreteConfig,
        discovery: Discovery,
        connector: EndpointConnector,
        metrics: PolicyMetrics,
        idle: Duration,
    ) -> Self {
        Self {
            config,
            discovery,
            connector,
            metrics,
            services: IdleCache::new(idle),
        }
    }

    /// Drops the concrete services nobody used for the idle time.
    pub fn evict_idle(&self) -> usize {
        self.services.evict_idle()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The concrete service `target`, subscribing to its endpoints on first use.
    pub fn get(&self, target: &ServiceRef) -> Arc<Concrete> {
        self.services
            .get_or_insert_with(target, || self.build(target))
    }

    fn build(&self, target: &ServiceRef) -> Concrete {
        let endpoints = self.discovery.resolve(target);
        let balancer = Balancer::new(endpoints.clone(), self.config.algorithm);
        let name: Arc<str> = target.to_string().into();
        self.metrics.watch_balancer(name.to_string(), &balancer);
        let guards = Arc::new(GuardsCell::new(target.name()));
        // Weak: the metrics must not keep the service (and its discovery watch) alive.
        let states = Arc::downgrade(&guards);
        self.metrics.watch_breakers(
            name.to_string(),
            Box::new(move || {
                states
                    .upgrade()
                    .map(|g| g.current().failure_accrual.states())
            }),
        );
        Concrete {
            balance: BalanceTarget {
                service: target.clone(),
                name,
                endpoints,
                balancer,
                wait: self.config.endpoint_wait,
            },
            guards,
            accrual_synced: Mutex::default(),
            connector: self.connector.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl Drop for Concrete {
    fn drop(&mut self) {
        self.metrics.forget(&self.balance.name);
    }
}
