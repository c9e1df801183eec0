//! The logical level: the service the app called, with its `HTTPRoute` and `ServicePolicy`.
//!
//! One stack per logical service, built by [`stack`] from one layer per behaviour, in the
//! order a request meets them:
//!
//! 1. [`route`]: takes the policy set in force when the request arrived (a new config version
//!    applies to requests that start after it; those in flight finish under the one they
//!    started with), finds the route rule, rewrites request headers, injects the rule's
//!    fault, chooses the concrete backend of a traffic split, and hands the layers below a
//!    [`Routed`] request: the request and the [`RouteParams`] it runs under (typed, so no
//!    layer can meet a request that was not routed); rewrites response headers last.
//! 2. [`timeout`]: the request timeout, over every attempt and backoff.
//! 3. [`retry`]: the attempts, each under the per-try timeout, retried when the policy
//!    classifies the outcome as retryable, the method allows it, the body can be replayed and
//!    the service's retry budget has room. Each attempt is a client span of the request's
//!    trace when tracing is on, so a retry shows as a second client span.
//! 4. [`ConcreteRouter`](crate::concrete::ConcreteRouter): sends each attempt to the concrete
//!    backend the route chose, through that backend's stack ([`crate::concrete`]).
//!
//! The retry budget belongs to the logical service (kept in its own [`GuardsCell`]): it is
//! spent by retries of requests to the service the app called, whichever backend a split
//! chose. The logical level holds no other policy piece: limits belong to the concrete level,
//! breakers to the endpoint level.

pub mod retry;
pub mod route;
pub mod timeout;

use std::sync::Arc;
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::ProxyError;
use ferrule_proxy_core::stack::BoxStack;
use ferrule_proxy_core::trace::Tracer;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::retry::{RetryBudget, RetryPolicy};
use ferrule_proxy_policy::{GuardsCell, PolicySet};
use http::{Request, Response};
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::concrete::{Concrete, ConcreteRouter, Concretes};

/// The logical level of one service: everything below observe/respond.
pub type LogicalStack = BoxStack<Request<BoxBody>, Response<BoxBody>, ProxyError>;

/// What a logical stack is built for.
#[derive(Clone)]
pub struct LogicalTarget {
    pub service: ServiceRef,
    /// `service[:port]`, the label of its metrics and errors.
    pub name: Arc<str>,
}

/// The settings one request runs under, chosen by [`route`] for the layers below it.
#[derive(Clone)]
pub struct RouteParams {
    /// The policy set the request started under.
    pub set: Arc<PolicySet>,
    pub retry: Arc<RetryPolicy>,
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub budget: Arc<RetryBudget>,
    /// The backend of the traffic split (the called service itself without one).
    pub backend: Arc<Concrete>,
    /// The matched route rule's label, for trace spans (`None`: no rule matched).
    pub route: Option<Arc<str>>,
}

/// Builds the logical stack of `target`: route → request timeout → retry → concrete.
pub fn stack(
    target: LogicalTarget,
    policies: watch::Receiver<Arc<PolicySet>>,
    parent: Arc<Concrete>,
    concretes: Arc<Concretes>,
    metrics: PolicyMetrics,
    tracer: Tracer,
) -> LogicalStack {
    let budget = Arc::new(GuardsCell::new(target.service.name()));
    BoxStack::new(
        ServiceBuilder::new()
            .layer(route::RouteLayer::new(
                target.clone(),
                policies,
                budget,
                parent,
                concretes,
                metrics.clone(),
            ))
            .layer(timeout::RequestTimeoutLayer::new(
                target.name.clone(),
                metrics.clone(),
            ))
            .layer(retry::RetryLayer::new(target.name.clone(), metrics, tracer))
            .service(ConcreteRouter),
    )
}

/// A request with the settings [`route`] chose for it: what the layers below it take.
pub struct Routed {
    pub req: Request<BoxBody>,
    pub params: RouteParams,
}
