//! The concrete level: one backend service, after the logical level chose it (the service the
//! app called, or a backend of a traffic split).
//!
//! One stack per concrete target and config version, built by [`Concrete::call`] from one
//! layer per behaviour, in the order a request meets them:
//!
//! 1. [`rate_limit`]: the service's local `rateLimit`; `poll_ready` takes a token or fails at
//!    once with 429 `rate_limited` and `Retry-After`.
//! 2. [`concurrency`]: `maxConcurrentRequests`; `poll_ready` waits for a slot while at most
//!    `maxPending` (default [`DEFAULT_MAX_PENDING`]) requests wait, and fails at once with 503
//!    `overloaded` beyond that. The slot is held until the response head arrives.
//! 3. [`balance`]: `poll_ready` picks an endpoint from the discovery-fed balancer among those
//!    the endpoint level says can take a request, waiting (at most `--endpoint-wait`, and at
//!    most [`MAX_WAITING`] requests at a time) while there is none; the call sends the request
//!    to that endpoint's stack, and to another endpoint when nothing could be sent.
//!
//! Below it, the endpoint level ([`crate::endpoint`]): the endpoint's failure accrual, then
//! the connection.
//!
//! The logical level reaches a concrete stack through [`ConcreteRouter`], its last layer: the
//! backend is only known per request (a split chooses it), so the router takes the chosen
//! backend's stack for the request's config version ([`Concrete::call`]). An attempt the
//! stack is ready for at once is called on the stored stack; one that has to wait (for a
//! token, a slot, an endpoint) takes that instance along and waits in its `poll_ready`, under
//! the per-try and request timeouts above it, while a fresh clone is stored for the next.
//!
//! The stateful policy pieces (token bucket, concurrency limit, breakers) live in
//! [`GuardsCell`]s of the [`Concrete`], so a new config version builds a new stack around the
//! same pieces unless their settings changed. [`Concretes`] builds one [`Concrete`] per
//! service on first use, shares it between the logical services that route to it, and
//! forgets it once idle.
//!
//! [`DEFAULT_MAX_PENDING`]: ferrule_proxy_policy::breaker::DEFAULT_MAX_PENDING
//! [`MAX_WAITING`]: ferrule_proxy_policy::balance::MAX_WAITING

pub mod balance;
pub mod concurrency;
pub mod rate_limit;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use http::{Request, Response};
use tower::Layer;

use super::endpoint::{EndpointConnector, NewEndpoint};
use super::logical::Routed;
use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::ProxyError;
use ferrule_proxy_core::idle_cache::IdleCache;
use ferrule_proxy_core::shared::call_ready_boxed;
use ferrule_proxy_core::stack::BoxStack;
use ferrule_proxy_policy::balance::{Algorithm, Balancer};
use ferrule_proxy_policy::breaker::{ConcurrencyLimit, FailureAccrual};
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::ratelimit::RateLimiter;
use ferrule_proxy_policy::{GuardsCell, PolicySet};
use futures::future::BoxFuture;

pub use balance::{BalanceTarget, CONNECT_ATTEMPTS};

/// The HTTP stack of one concrete service under one config version.
pub type ConcreteStack = BoxStack<Request<BoxBody>, Response<BoxBody>, ProxyError>;

/// The future of one attempt through a concrete stack ([`Concrete::call`]).
pub type ConcreteCall = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

/// One backend service: what its stacks are built from, and the stack of the newest config
/// version a request asked for.
pub struct Concrete {
    pub balance: Arc<BalanceTarget>,
    rate_limit: GuardsCell<Option<Arc<RateLimiter>>>,
    concurrency: GuardsCell<ConcurrencyLimit>,
    /// Shared with the breaker gauges, which must not keep the service alive.
    accrual: Arc<GuardsCell<FailureAccrual>>,
    connector: EndpointConnector,
    metrics: PolicyMetrics,
    /// (config version, its stack).
    stack: Mutex<Option<(i64, ConcreteStack)>>,
}

impl Concrete {
    /// Sends `req`, which started under `set`, through the service's stack for that config
    /// version. A request of an older version than the newest one seen (a retry that
    /// outlived a config change) gets the newest stack: the pieces it holds are its own
    /// either way. The stored stack is called itself when it is ready at once (an endpoint
    /// picked, no limit to wait for), without a clone (see [`ferrule_proxy_core::shared`]);
    /// a request that has to wait takes that instance along and waits in its own future.
    pub fn call(&self, set: &PolicySet, req: Request<BoxBody>) -> ConcreteCall {
        let mut cached = self.stack.lock().unwrap_or_else(PoisonError::into_inner);
        call_ready_boxed(self.current(&mut cached, set), req)
    }

    fn current<'a>(
        &self,
        cached: &'a mut Option<(i64, ConcreteStack)>,
        set: &PolicySet,
    ) -> &'a mut ConcreteStack {
        if cached
            .as_ref()
            .is_none_or(|(version, _)| *version < set.version())
        {
            *cached = Some((set.version(), self.build(set)));
        }
        &mut cached.as_mut().expect("just filled").1
    }

    /// rate limit → concurrency limit → balancer → (per endpoint) failure accrual →
    /// connection.
    fn build(&self, set: &PolicySet) -> ConcreteStack {
        let name = &self.balance.name;
        let policy = set.policy(&self.balance.service.name());
        let endpoints = NewEndpoint::new(
            self.accrual.get(set),
            self.connector.clone(),
            policy.idle_timeout,
        );
        // A limit that is not set is no layer at all: nothing to check, no future to box.
        let rate_limit = self.rate_limit.get(set).map(|limiter| {
            rate_limit::RateLimitLayer::new(name.clone(), Some(limiter), self.metrics.clone())
        });
        let concurrency = Some(self.concurrency.get(set))
            .filter(ConcurrencyLimit::is_limited)
            .map(|limit| concurrency::ConcurrencyLimitLayer::new(name.clone(), limit));
        // Built inside out, each limit only when it is set: every layer's future is boxed
        // already, so the stack passes it through.
        let mut stack = BoxStack::new(balance::Balance::new(self.balance.clone(), endpoints));
        if let Some(concurrency) = concurrency {
            stack = BoxStack::new(concurrency.layer(stack));
        }
        if let Some(rate_limit) = rate_limit {
            stack = BoxStack::new(rate_limit.layer(stack));
        }
        stack
    }
}

/// The last layer of the logical level: sends each attempt to the concrete backend the
/// route chose, through that backend's stack.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConcreteRouter;

impl tower::Service<Routed> for ConcreteRouter {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = ConcreteCall;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        // Which backend a request goes to is known only per request: the backend stack's
        // readiness (a token, a slot, an endpoint) is awaited in the call, per attempt.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let Routed { req, params } = routed;
        params.backend.call(&params.set, req)
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
        let service = target.name();
        let accrual = Arc::new(GuardsCell::<FailureAccrual>::new(service.clone()));
        // Weak: the metrics must not keep the service (and its discovery watch) alive.
        let states = Arc::downgrade(&accrual);
        self.metrics.watch_breakers(
            name.to_string(),
            Box::new(move || states.upgrade().map(|a| a.current().states())),
        );
        Concrete {
            balance: Arc::new(BalanceTarget {
                service: target.clone(),
                name,
                endpoints,
                balancer,
                wait: self.config.endpoint_wait,
            }),
            rate_limit: GuardsCell::new(service.clone()),
            concurrency: GuardsCell::new(service),
            accrual,
            connector: self.connector.clone(),
            metrics: self.metrics.clone(),
            stack: Mutex::default(),
        }
    }
}

impl Drop for Concrete {
    fn drop(&mut self) {
        self.metrics.forget(&self.balance.name);
    }
}
