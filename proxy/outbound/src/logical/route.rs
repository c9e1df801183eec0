//! The route layer: which rule of the service's `HTTPRoute` a request matches, and what the
//! rule does to it before it goes on (header rewrites, a fault, the backend of a traffic
//! split) and to its response (header rewrites). Requests no rule matches run under the
//! service's own `ServicePolicy`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::retry::RetryBudget;
use ferrule_proxy_policy::route::HeaderRewrite;
use ferrule_proxy_policy::{GuardsCell, PolicySet};
use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};

use super::{LogicalTarget, RouteParams, Routed};
use crate::concrete::{Concrete, Concretes};

/// Shared by the stacks built on it; routing reads it in `call`, so no request holds a clone.
#[derive(Clone)]
pub struct RouteLayer(Arc<Shared>);

struct Shared {
    target: LogicalTarget,
    /// The target's qualified service name, what policies are keyed on.
    service: String,
    policies: watch::Receiver<Arc<PolicySet>>,
    /// The logical service's retry budget.
    budget: Arc<GuardsCell<Arc<RetryBudget>>>,
    /// The concrete service of the same name: where requests go without a split.
    parent: Arc<Concrete>,
    concretes: Arc<Concretes>,
    metrics: PolicyMetrics,
}

impl RouteLayer {
    pub fn new(
        target: LogicalTarget,
        policies: watch::Receiver<Arc<PolicySet>>,
        budget: Arc<GuardsCell<Arc<RetryBudget>>>,
        parent: Arc<Concrete>,
        concretes: Arc<Concretes>,
        metrics: PolicyMetrics,
    ) -> Self {
        Self(Arc::new(Shared {
            service: target.service.name(),
            target,
            policies,
            budget,
            parent,
            concretes,
            metrics,
        }))
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Route<S> {
        Route {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Route<S> {
    layer: RouteLayer,
    inner: S,
}

impl<S> Service<Request<BoxBody>> for Route<S>
where
    S: Service<
            Routed,
            Response = Response<BoxBody>,
            Error = ProxyError,
            Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    /// Routing is decided here, before any await: a request whose rule injects no delay and
    /// rewrites no response header is the inner service's future itself, with no future and
    /// no box of this layer's own.
    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let (params, delay, response_headers) = match self.layer.decide(&mut req) {
            Decision::Abort { delay: None, error } => {
                return Box::pin(std::future::ready(Err(error)));
            }
            Decision::Abort {
                delay: Some(delay),
                error,
            } => {
                return Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    Err(error)
                });
            }
            Decision::Forward {
                params,
                delay: None,
                response_headers: None,
            } => return self.inner.call(Routed { req, params }),
            Decision::Forward {
                params,
                delay,
                response_headers,
            } => (params, delay, response_headers),
        };
        // The inner service was made ready for this call: take it, leave a fresh clone.
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let mut rsp = inner.oneshot(Routed { req, params }).await?;
            if let Some(rewrite) = response_headers {
                rewrite.apply(rsp.headers_mut());
            }
            Ok(rsp)
        })
    }
}

/// What the matched rule (or the service's policy) decided for one request. A delay is
/// waited before anything else.
enum Decision {
    /// An injected fault answers: no backend is picked.
    Abort {
        delay: Option<Duration>,
        error: ProxyError,
    },
    Forward {
        params: RouteParams,
        delay: Option<Duration>,
        response_headers: Option<HeaderRewrite>,
    },
}

impl RouteLayer {
    /// Matches `req` against the service's rules and applies the rule's request header
    /// rewrites; the rest of the rule's work is in the returned decision.
    fn decide(&self, req: &mut Request<BoxBody>) -> Decision {
        let this = &*self.0;
        let set = this.policies.borrow().clone();
        let name = &this.target.name;
        let service = &this.service;
        let rule = set.routes(service).and_then(|r| r.find(req));
        let policy = set.policy(service);
        let (retry, request_timeout, per_try_timeout) = match rule {
            Some(rule) => (
                rule.retry().clone(),
                rule.request_timeout(),
                rule.per_try_timeout(),
            ),
            None => (
                set.retry(service),
                policy.request_timeout,
                policy.per_try_timeout,
            ),
        };
        let mut delay = None;
        if let Some(rule) = rule {
            rule.request_headers().apply(req.headers_mut());
            if let Some(fault) = rule.fault() {
                let decision = fault.decide(&mut rand::rng());
                if let Some(d) = decision.delay {
                    this.metrics.fault(name, "delay");
                    delay = Some(d);
                }
                if let Some(status) = decision.abort {
                    this.metrics.fault(name, "abort");
                    let error = ProxyError::new(
                        Reason::FaultInjected,
                        name.to_string(),
                        format!("route {} injected a {status} fault", rule.label()),
                    )
                    .with_status(status);
                    return Decision::Abort { delay, error };
                }
            }
        }
        let backend = match rule.and_then(|r| r.pick_backend(&mut rand::rng())) {
            Some(backend) => {
                // The compiled route names its backends by qualified name.
                let mut target = ServiceRef::parse(&backend.service)
                    .unwrap_or_else(|_| this.target.service.clone());
                target.port_name = backend
                    .port
                    .clone()
                    .unwrap_or_else(|| this.target.service.port_name.clone());
                if target == this.target.service {
                    this.parent.clone()
                } else {
                    this.concretes.get(&target)
                }
            }
            None => this.parent.clone(),
        };
        let response_headers = rule
            .map(|r| r.response_headers())
            .filter(|rewrite| !rewrite.is_empty())
            .cloned();
        let params = RouteParams {
            budget: this.budget.get(&set),
            set: set.clone(),
            retry,
            request_timeout,
            per_try_timeout,
            backend,
            route: rule.map(|r| Arc::from(r.label())),
        };
        Decision::Forward {
            params,
            delay,
            response_headers,
        }
    }
}
