//! The logical level: the service the app called, with its `HTTPRoute` and `ServicePolicy`.
//!
//! Per request, [`Logical`] takes the policy set in force when the request arrived (a new
//! config version applies to requests that start after it; those in flight finish under the
//! one they started with), finds the route rule, rewrites request headers, injects the rule's
//! fault (delay, or an answer of its own), chooses the concrete backend of a traffic split,
//! then runs the attempts under the request timeout: each attempt under the per-try timeout,
//! retried when the policy classifies its outcome as retryable, the method allows it, the body
//! can be replayed and the service's retry budget has room, after a jittered backoff. A failure
//! the budget refused a retry for goes back with `ferrule-retry: budget_exhausted`. Response
//! headers are rewritten last.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use tokio::sync::watch;
use tower::Service;

use super::concrete::{Concrete, Concretes};
use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, RETRY_BUDGET_EXHAUSTED, RETRY_HEADER, Reason};
use ferrule_proxy_core::headers;
use ferrule_proxy_policy::PolicySet;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::replay::{MAX_REPLAY_BYTES, replayable};
use ferrule_proxy_policy::retry::{RetryBudget, RetryPolicy, RetryReason};

/// The logical service's last layer: routes, faults, split, timeouts and retries.
#[derive(Clone)]
pub struct Logical {
    pub service: ServiceRef,
    pub name: Arc<str>,
    pub policies: watch::Receiver<Arc<PolicySet>>,
    /// The concrete service of the same name: where requests go without a split.
    pub parent: Arc<Concrete>,
    pub concretes: Arc<Concretes>,
    pub metrics: PolicyMetrics,
}

impl Service<Request<BoxBody>> for Logical {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        Box::pin(self.clone().route(req))
    }
}

/// How one attempt ended, when it did not end in a response.
enum Failure {
    Error(ProxyError),
    PerTryTimeout(Duration),
}

type Outcome = Result<Response<BoxBody>, Failure>;

/// What a retry needs to rebuild the request: everything but the body and the extensions
/// (which only the first attempt uses: upgrades are never retried).
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Template {
    fn request(&self, body: BoxBody) -> Request<BoxBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// The settings one request runs under.
struct Attempts<'a> {
    concrete: &'a Concrete,
    set: &'a PolicySet,
    retry: RetryPolicy,
    per_try: Option<Duration>,
    budget: Arc<RetryBudget>,
}

impl Logical {
    async fn route(self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, ProxyError> {
        let set = self.policies.borrow().clone();
        let service = self.service.service.as_str();
        let rule = set.routes(service).and_then(|r| r.find(&req));
        let policy = set.policy(service);
        let (retry, request_timeout, per_try) = match rule {
            Some(rule) => (
                rule.retry().clone(),
                rule.request_timeout(),
                rule.per_try_timeout(),
            ),
            None => (
                RetryPolicy::new(&policy.retries),
                policy.request_timeout,
                policy.per_try_timeout,
            ),
        };
        if let Some(rule) = rule {
            rule.request_headers().apply(req.headers_mut());
            if let Some(fault) = rule.fault() {
                let decision = fault.decide(&mut rand::rng());
                if let Some(delay) = decision.delay {
                    self.metrics.fault(&self.name, "delay");
                    tokio::time::sleep(delay).await;
                }
                if let Some(status) = decision.abort {
                    self.metrics.fault(&self.name, "abort");
                    return Err(ProxyError::new(
                        Reason::FaultInjected,
                        self.name.to_string(),
                        format!("route {} injected a {status} fault", rule.label()),
                    )
                    .with_status(status));
                }
            }
        }
        let backend = rule.and_then(|r| r.pick_backend(&mut rand::rng()));
        let concrete = match backend {
            Some(backend) => {
                let target = ServiceRef {
                    service: backend.service.clone(),
                    port_name: backend
                        .port
                        .clone()
                        .unwrap_or_else(|| self.service.port_name.clone()),
                };
                if target == self.service {
                    self.parent.clone()
                } else {
                    self.concretes.get(&target)
                }
            }
            None => self.parent.clone(),
        };
        let attempts = Attempts {
            concrete: &concrete,
            set: &set,
            retry,
            per_try,
            budget: self.parent.guards(&set).retry_budget,
        };
        let result = match request_timeout {
            Some(limit) => match tokio::time::timeout(limit, self.attempts(&attempts, req)).await {
                Ok(result) => result,
                Err(_) => {
                    self.metrics.timeout(&self.name, "request");
                    Err(ProxyError::new(
                        Reason::Timeout,
                        self.name.to_string(),
                        format!("no response within the request timeout of {limit:?}"),
                    ))
                }
            },
            None => self.attempts(&attempts, req).await,
        };
        let mut rsp = result?;
        if let Some(rule) = rule {
            rule.response_headers().apply(rsp.headers_mut());
        }
        Ok(rsp)
    }

    /// The first attempt and every retry the policy and the budget allow.
    async fn attempts(
        &self,
        run: &Attempts<'_>,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, ProxyError> {
        run.budget.deposit();
        if run.retry.max_attempts() <= 1 || headers::is_upgrade(&req) {
            return self.finish(self.attempt(run, req).await, false);
        }
        let (parts, body) = req.into_parts();
        let (body, replay) = replayable(body, MAX_REPLAY_BYTES);
        let template = Template {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        };
        let method_ok = run.retry.allows_method(&template.method);
        let mut req = Request::from_parts(parts, body);
        let mut attempt = 1;
        loop {
            let outcome = self.attempt(run, req).await;
            let reason = match &outcome {
                Ok(rsp) if method_ok => run.retry.classify(rsp.status(), rsp.headers()),
                Err(Failure::Error(e))
                    if run.retry.retries_connect_errors() && is_connect_error(e) =>
                {
                    Some(RetryReason::ConnectError)
                }
                Err(Failure::Error(e)) if method_ok && e.reason == Reason::UpstreamFailure => {
                    Some(RetryReason::ConnectionBroken)
                }
                Err(Failure::PerTryTimeout(_)) if method_ok => Some(RetryReason::PerTryTimeout),
                _ => None,
            };
            let Some(reason) = reason else {
                return self.finish(outcome, false);
            };
            if attempt >= run.retry.max_attempts() {
                return self.finish(outcome, false);
            }
            let Some(body) = replay.body() else {
                return self.finish(outcome, false);
            };
            if !run.budget.try_withdraw() {
                tracing::debug!(service = %self.name, %reason, "retry budget exhausted");
                self.metrics.retry_budget_exhausted(&self.name);
                return self.finish(outcome, true);
            }
            tracing::debug!(service = %self.name, %reason, attempt, "retrying");
            self.metrics.retry(&self.name, reason);
            let backoff = run.retry.backoff(attempt, &mut rand::rng());
            drop(outcome);
            tokio::time::sleep(backoff).await;
            attempt += 1;
            req = template.request(body);
        }
    }

    /// One attempt, under the per-try timeout.
    async fn attempt(&self, run: &Attempts<'_>, req: Request<BoxBody>) -> Outcome {
        let guards = run.concrete.guards(run.set);
        let send = run.concrete.send(&guards, req);
        match run.per_try {
            Some(limit) => match tokio::time::timeout(limit, send).await {
                Ok(result) => result.map_err(Failure::Error),
                Err(_) => {
                    self.metrics.timeout(&self.name, "per_try");
                    Err(Failure::PerTryTimeout(limit))
                }
            },
            None => send.await.map_err(Failure::Error),
        }
    }

    /// The attempt's outcome as the app sees it.
    fn finish(
        &self,
        outcome: Outcome,
        budget_exhausted: bool,
    ) -> Result<Response<BoxBody>, ProxyError> {
        match outcome {
            Ok(mut rsp) => {
                if budget_exhausted {
                    rsp.headers_mut().insert(
                        RETRY_HEADER,
                        HeaderValue::from_static(RETRY_BUDGET_EXHAUSTED),
                    );
                }
                Ok(rsp)
            }
            Err(failure) => {
                let error = match failure {
                    Failure::Error(error) => error,
                    Failure::PerTryTimeout(limit) => ProxyError::new(
                        Reason::Timeout,
                        self.name.to_string(),
                        format!("no response within the per-try timeout of {limit:?}"),
                    ),
                };
                Err(if budget_exhausted {
                    error.budget_exhausted()
                } else {
                    error
                })
            }
        }
    }
}

/// Errors that mean nothing reached an endpoint.
fn is_connect_error(error: &ProxyError) -> bool {
    matches!(
        error.reason,
        Reason::UpstreamConnectFailure | Reason::EndpointsUnavailable
    )
}
