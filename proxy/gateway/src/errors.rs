//! Errors the gateway itself answers with, and the layer that renders them.
//!
//! They look like every other error a Ferrule proxy makes ([`ferrule_proxy_core::errors::ProxyError`]):
//! a `ferrule-error: <reason>` header, a JSON body whose `error` says what happened, and the
//! same reason counted in `proxy_errors_total{direction="gateway"}`. A 429 also carries
//! `Retry-After` in whole seconds, rounded up.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, header};
use tower::{Layer, Service};

use ferrule_proxy_core::body::{BoxBody, BoxError};
use ferrule_proxy_core::errors::{ErrorFormat, ProxyError, Reason};
use ferrule_proxy_core::metrics::{Direction, Metrics};

/// A request the gateway refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No or blank `Authorization` on a non-public route.
    #[error("missing authorization header")]
    MissingAuthorization,
    /// The token did not verify; the text says why.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("Too Many Requests")]
    RateLimited { retry_after: Duration },
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("Payload Too Large")]
    PayloadTooLarge,
    /// The rewritten path is not a valid URI.
    #[error("cannot rewrite the path: {0}")]
    BadRewrite(String),
}

impl GatewayError {
    pub fn reason(&self) -> Reason {
        match self {
            GatewayError::MissingAuthorization | GatewayError::InvalidToken(_) => {
                Reason::Unauthenticated
            }
            GatewayError::RateLimited { .. } => Reason::RateLimited,
            GatewayError::NoRoute(_) => Reason::NoRoute,
            GatewayError::PayloadTooLarge => Reason::PayloadTooLarge,
            GatewayError::BadRewrite(_) => Reason::BadRequest,
        }
    }

    /// The response the client sees; `service` is the route's service ("" without a route).
    pub fn to_response(&self, service: &str) -> Response<BoxBody> {
        let mut rsp = ProxyError::new(self.reason(), service, self.to_string())
            .to_response(ErrorFormat::Json);
        if let GatewayError::RateLimited { retry_after } = self {
            rsp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(*retry_after)),
            );
        }
        rsp
    }
}

/// `Retry-After` seconds: rounded up, at least 1 (0 would invite an immediate retry that
/// fails again).
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Renders [`GatewayError`]s of the inner service as responses and counts them.
#[derive(Clone)]
pub struct RespondLayer {
    metrics: Metrics,
    service: String,
}

impl RespondLayer {
    pub fn new(metrics: Metrics, service: impl Into<String>) -> Self {
        Self {
            metrics,
            service: service.into(),
        }
    }
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Respond {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Respond<S> {
    inner: S,
    layer: RespondLayer,
}

impl<S> Service<Request<BoxBody>> for Respond<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every service below is always ready; an error here would be reported per request.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let fut: BoxFuture<'static, _> = Box::pin(self.inner.call(req));
        let layer = self.layer.clone();
        Box::pin(async move {
            let error = match fut.await {
                Ok(rsp) => return Ok(rsp),
                Err(error) => error,
            };
            let rsp = match error.downcast::<GatewayError>() {
                Ok(error) => {
                    tracing::debug!(%error, service = %layer.service, "gateway refused a request");
                    layer
                        .metrics
                        .proxy_error(Direction::Gateway, error.reason());
                    error.to_response(&layer.service)
                }
                // Nothing below makes other errors (the forwarding stack renders its own);
                // should one appear, it still gets an explained answer.
                Err(error) => {
                    tracing::warn!(%error, service = %layer.service, "unexpected gateway error");
                    layer
                        .metrics
                        .proxy_error(Direction::Gateway, Reason::UpstreamFailure);
                    ProxyError::new(Reason::UpstreamFailure, &layer.service, error.to_string())
                        .to_response(ErrorFormat::Json)
                }
            };
            Ok(rsp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_proxy_core::errors::ERROR_HEADER;
    use http_body_util::BodyExt;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[tokio::test]
    async fn responses_explain_themselves() {
        let cases = [
            (
                GatewayError::MissingAuthorization,
                401,
                "missing authorization header",
            ),
            (
                GatewayError::InvalidToken("token expired".into()),
                401,
                "invalid token: token expired",
            ),
            (
                GatewayError::RateLimited {
                    retry_after: Duration::from_millis(300),
                },
                429,
                "Too Many Requests",
            ),
            (GatewayError::NoRoute("/x".into()), 404, "no route for /x"),
            (GatewayError::PayloadTooLarge, 413, "Payload Too Large"),
        ];
        for (error, status, message) in cases {
            let rsp = error.to_response("user:http");
            assert_eq!(rsp.status().as_u16(), status, "{error}");
            assert_eq!(rsp.headers()[ERROR_HEADER], error.reason().as_str());
            if status == 429 {
                assert_eq!(rsp.headers()[header::RETRY_AFTER], "1");
            }
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], message);
            assert_eq!(v["service"], "user:http");
        }
    }
}
