//! The request timeout: one bound on the whole request as the app sees it, every attempt and
//! backoff included (`rules[].timeout`, else the service's `timeouts.request`). When it fires
//! the app gets 504 `timeout` and `timeouts_total{kind="request"}` counts it.

use std::sync::Arc;
use std::task::{Context, Poll};

use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_policy::metrics::PolicyMetrics;
use futures::future::BoxFuture;
use http::Response;
use tower::{Layer, Service};

use super::Routed;

#[derive(Clone)]
pub struct RequestTimeoutLayer {
    name: Arc<str>,
    metrics: PolicyMetrics,
}

impl RequestTimeoutLayer {
    pub fn new(name: Arc<str>, metrics: PolicyMetrics) -> Self {
        Self { name, metrics }
    }
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct RequestTimeout<S> {
    layer: RequestTimeoutLayer,
    inner: S,
}

impl<S> Service<Routed> for RequestTimeout<S>
where
    S: Service<
            Routed,
            Response = Response<BoxBody>,
            Error = ProxyError,
            Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>,
        >,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let limit = routed.params.request_timeout;
        let fut = self.inner.call(routed);
        // Without a limit the inner future is the answer: no second box per request.
        let Some(limit) = limit else {
            return fut;
        };
        let layer = self.layer.clone();
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(result) => result,
                Err(_) => {
                    layer.metrics.timeout(&layer.name, "request");
                    Err(ProxyError::new(
                        Reason::Timeout,
                        layer.name.to_string(),
                        format!("no response within the request timeout of {limit:?}"),
                    ))
                }
            }
        })
    }
}
