//! Retries: the attempts of one request, each under the per-try timeout.
//!
//! An attempt is tried again when its outcome is retryable — a status or trailers-only
//! `grpc-status` in `retryOn`, a per-try timeout, a connect failure (`retryOn.connectErrors`,
//! any method: nothing was sent), or a connection that broke after the request was written
//! but before any response byte — provided the method is idempotent (or `nonIdempotent` is
//! set), `maxAttempts` is not reached, the body can be replayed (at most
//! [`MAX_REPLAY_BYTES`], read to its end) and the retry budget has room. A retry waits the
//! jittered backoff first. A failure the budget refused a retry for goes back with
//! `ferrule-retry: budget_exhausted`.
//!
//! With tracing on, every attempt is a client span under the app's trace context (read once
//! from the request), and the attempt carries that span's context to the endpoint: a retry
//! is a second client span of the same parent, with `http.request.resend_count` and
//! `ferrule.retry` set, the endpoint that answered, the breaker's decision and the
//! `ferrule-error` reason of a failed attempt.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, RETRY_BUDGET_EXHAUSTED, RETRY_HEADER, Reason};
use ferrule_proxy_core::headers;
use ferrule_proxy_core::trace::{self, Extracted, PeerEndpoint, SpanKind, Tracer};
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_policy::replay::{MAX_REPLAY_BYTES, replayable};
use ferrule_proxy_policy::retry::RetryReason;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use tower::{Layer, Service, ServiceExt};

use super::{RouteParams, Routed};

#[derive(Clone)]
pub struct RetryLayer {
    name: Arc<str>,
    metrics: PolicyMetrics,
    tracer: Tracer,
}

impl RetryLayer {
    pub fn new(name: Arc<str>, metrics: PolicyMetrics, tracer: Tracer) -> Self {
        Self {
            name,
            metrics,
            tracer,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    layer: RetryLayer,
    inner: S,
}

impl<S> Service<Routed> for Retry<S>
where
    S: Service<Routed, Response = Response<BoxBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        Box::pin(self.layer.clone().attempts(inner, routed))
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

impl RetryLayer {
    /// The first attempt and every retry the policy and the budget allow.
    async fn attempts<S>(self, inner: S, routed: Routed) -> Result<Response<BoxBody>, ProxyError>
    where
        S: Service<Routed, Response = Response<BoxBody>, Error = ProxyError> + Clone,
    {
        let Routed { req, params } = routed;
        params.budget.deposit();
        let parent = match self.tracer.is_enabled() {
            true => trace::extract(&self.tracer, &req),
            false => Extracted::default(),
        };
        if params.retry.max_attempts() <= 1 || headers::is_upgrade(&req) {
            let outcome = self.attempt(inner, req, &params, &parent, 1).await;
            return self.finish(outcome, false);
        }
        let (parts, body) = req.into_parts();
        let (body, replay) = replayable(body, MAX_REPLAY_BYTES);
        let template = Template {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        };
        let method_ok = params.retry.allows_method(&template.method);
        let mut req = Request::from_parts(parts, body);
        let mut attempt = 1;
        loop {
            let outcome = self
                .attempt(inner.clone(), req, &params, &parent, attempt)
                .await;
            let reason = match &outcome {
                Ok(rsp) if method_ok => params.retry.classify(rsp.status(), rsp.headers()),
                Err(Failure::Error(e))
                    if params.retry.retries_connect_errors() && is_connect_error(e) =>
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
            if attempt >= params.retry.max_attempts() {
                return self.finish(outcome, false);
            }
            let Some(body) = replay.body() else {
                return self.finish(outcome, false);
            };
            if !params.budget.try_withdraw() {
                tracing::debug!(service = %self.name, %reason, "retry budget exhausted");
                self.metrics.retry_budget_exhausted(&self.name);
                return self.finish(outcome, true);
            }
            tracing::debug!(service = %self.name, %reason, attempt, "retrying");
            self.metrics.retry(&self.name, reason);
            let backoff = params.retry.backoff(attempt, &mut rand::rng());
            drop(outcome);
            tokio::time::sleep(backoff).await;
            attempt += 1;
            req = template.request(body);
        }
    }

    /// One attempt (`number` counts from 1), traced as a client span when tracing is on.
    async fn attempt<S>(
        &self,
        inner: S,
        mut req: Request<BoxBody>,
        params: &RouteParams,
        parent: &Extracted,
        number: u32,
    ) -> Outcome
    where
        S: Service<Routed, Response = Response<BoxBody>, Error = ProxyError>,
    {
        if !self.tracer.is_enabled() {
            return self.send(inner, req, params).await;
        }
        let route = params.route.as_deref();
        let mut span = self.tracer.start(
            trace::span_name(&req, route),
            SpanKind::Client,
            parent.parent.as_ref(),
        );
        if span.is_recording() {
            trace::request_attributes(&mut span, &req);
            span.set("server.address", params.backend.balance.name.to_string());
            span.set("ferrule.service", self.name.to_string());
            if let Some(route) = route {
                span.set("ferrule.route", route);
            }
            span.set("ferrule.retry", number - 1);
            if number > 1 {
                span.set("http.request.resend_count", number - 1);
            }
        }
        trace::inject(&mut req, &span, parent);
        let outcome = self.send(inner, req, params).await;
        if span.is_recording() {
            match &outcome {
                Ok(rsp) => {
                    trace::response_attributes(&mut span, rsp, SpanKind::Client);
                    if let Some(PeerEndpoint(addr)) = rsp.extensions().get::<PeerEndpoint>() {
                        span.set("ferrule.endpoint", addr.to_string());
                        span.set("network.peer.address", addr.ip().to_string());
                        span.set("network.peer.port", addr.port());
                        span.set("ferrule.breaker", "admitted");
                    }
                }
                Err(Failure::Error(error)) => {
                    span.set("ferrule.error", error.reason.as_str());
                    if error.reason == Reason::BreakerOpen {
                        span.set("ferrule.breaker", "open");
                    }
                    span.set_error(error.reason.as_str());
                }
                Err(Failure::PerTryTimeout(_)) => {
                    span.set("ferrule.error", Reason::Timeout.as_str());
                    span.set_error("per-try timeout");
                }
            }
        }
        outcome
    }

    /// Sends one attempt, under the per-try timeout.
    async fn send<S>(&self, inner: S, req: Request<BoxBody>, params: &RouteParams) -> Outcome
    where
        S: Service<Routed, Response = Response<BoxBody>, Error = ProxyError>,
    {
        let send = inner.oneshot(Routed {
            req,
            params: params.clone(),
        });
        match params.per_try_timeout {
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
