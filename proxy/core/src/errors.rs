//! Errors the proxy itself makes, and how they answer.
//!
//! Every request the proxy cannot forward gets a response that explains itself: a
//! `ferrule-error: <reason>` header, a JSON body `{"error", "reason", "service"}` and the same
//! reason as the `reason` label of `proxy_errors_total`. Inner layers of a stack return
//! [`ProxyError`]; [`RespondLayer`] (the outermost layer below metrics) turns it into that
//! response, so no handler writes error responses by hand.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tower::{Layer, Service};

use crate::body::{self, BoxBody};
use crate::metrics::{Direction, Metrics};
pub use crate::reason::Reason;

/// Response header naming the reason of an error made by the proxy.
pub const ERROR_HEADER: &str = "ferrule-error";

/// Response header set when a failure goes back to the app because the retry budget refused
/// another attempt; its value is [`RETRY_BUDGET_EXHAUSTED`].
pub const RETRY_HEADER: &str = "ferrule-retry";
pub const RETRY_BUDGET_EXHAUSTED: &str = "budget_exhausted";

/// An error the proxy answers for: the reason, the service it concerns and a sentence for
/// humans.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason} for service {service:?}: {message}")]
pub struct ProxyError {
    pub reason: Reason,
    pub service: String,
    pub message: String,
    /// Replaces the reason's status (an injected fault answers with the configured one).
    status: Option<StatusCode>,
    /// Sent as `Retry-After` (whole seconds, rounded up) with a 429.
    retry_after: Option<Duration>,
    /// Retries were refused by the retry budget: sets [`RETRY_HEADER`].
    budget_exhausted: bool,
}

impl ProxyError {
    pub fn new(reason: Reason, service: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason,
            service: service.into(),
            message: message.into(),
            status: None,
            retry_after: None,
            budget_exhausted: false,
        }
    }

    /// Answers with `status` instead of the reason's.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Tells the client when to try again.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Marks the error as returned because the retry budget refused another attempt.
    pub fn budget_exhausted(mut self) -> Self {
        self.budget_exhausted = true;
        self
    }

    /// The status of the response.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.reason.status())
    }

    /// The response the client sees.
    pub fn to_response(&self) -> Response<BoxBody> {
        let json = serde_json::json!({
            "error": self.message,
            "reason": self.reason.as_str(),
            "service": self.service,
        });
        let mut rsp = Response::new(body::full(Bytes::from(json.to_string())));
        *rsp.status_mut() = self.status();
        let headers = rsp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.reason.as_str()));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.budget_exhausted {
            headers.insert(
                RETRY_HEADER,
                HeaderValue::from_static(RETRY_BUDGET_EXHAUSTED),
            );
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        rsp
    }

    /// The same response as raw HTTP/1.1 bytes, for connections hyper never saw (a request
    /// line that detection already refused).
    pub fn to_http1_bytes(&self) -> Vec<u8> {
        let json = serde_json::json!({
            "error": self.message,
            "reason": self.reason.as_str(),
            "service": self.service,
        })
        .to_string();
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\n{ERROR_HEADER}: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.reason.as_str(),
            json.len(),
        )
        .into_bytes()
    }
}

/// Renders [`ProxyError`]s of the inner service as responses and counts them.
#[derive(Clone)]
pub struct RespondLayer {
    metrics: Metrics,
    direction: Direction,
}

impl RespondLayer {
    pub fn new(metrics: Metrics, direction: Direction) -> Self {
        Self { metrics, direction }
    }
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Respond {
            inner,
            metrics: self.metrics.clone(),
            direction: self.direction,
        }
    }
}

#[derive(Clone)]
pub struct Respond<S> {
    inner: S,
    metrics: Metrics,
    direction: Direction,
}

impl<S> Service<Request<BoxBody>> for Respond<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            // Inner services of the proxy are always ready; an error here would be a bug in
            // how a stack is assembled, and the call below reports it per request.
            Poll::Ready(Err(_)) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        // Boxed before the async block: a projection type held across an await trips
        // rustc's Send inference (rust-lang/rust#64552).
        let fut: BoxFuture<'static, _> = Box::pin(self.inner.call(req));
        let metrics = self.metrics.clone();
        let direction = self.direction;
        Box::pin(async move {
            match fut.await {
                Ok(rsp) => Ok(rsp),
                Err(error) => {
                    tracing::debug!(%error, "proxy error");
                    metrics.proxy_error(direction, error.reason);
                    Ok(error.to_response())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_response_names_reason_and_service() {
        let err = ProxyError::new(Reason::UnknownService, "user", "no instance of user");
        let rsp = err.to_response();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[ERROR_HEADER], "unknown_service");
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["service"], "user");
        assert_eq!(v["reason"], "unknown_service");
    }

    #[test]
    fn raw_response_is_well_formed() {
        let err = ProxyError::new(Reason::BadRequest, "", "malformed request line");
        let raw = String::from_utf8(err.to_http1_bytes()).unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
