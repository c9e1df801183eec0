//! Errors the proxy itself makes, and how they answer.
//!
//! Every request the proxy cannot forward gets a response that explains itself, in the form
//! its caller can read ([`ErrorFormat`]): a `ferrule-error: <reason>` header on both, and
//! either a JSON body `{"error", "reason", "service"}` with the reason's HTTP status, or, for a
//! gRPC request, a trailers-only gRPC response (HTTP 200, `grpc-status` from the reason,
//! `grpc-message` naming the reason and what happened) — a gRPC client reads a JSON body as a
//! broken message. The same reason is the `reason` label of `proxy_errors_total`, and rides in
//! the response's extensions for the layers above. Inner layers of a stack (the sidecar's and
//! the gateway's) return [`ProxyError`]; [`RespondLayer`] (the outermost layer below metrics)
//! turns it into that response, so there is one renderer and no handler writes error
//! responses by hand.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::task::{Context, Poll};
use std::time::Duration;

use ferrule_config::GrpcCode;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use tower::{Layer, Service};

use crate::body::{self, BoxBody};
use crate::headers::{GRPC_MESSAGE, GRPC_STATUS};
use crate::metrics::{Direction, Metrics};
pub use crate::reason::Reason;
use crate::reason::grpc_code_for_http;

/// Response header naming the reason of an error made by the proxy.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("ferrule-error");

/// Response header set when a failure goes back to the app because the retry budget refused
/// another attempt; its value is [`RETRY_BUDGET_EXHAUSTED`].
pub const RETRY_HEADER: HeaderName = HeaderName::from_static("ferrule-retry");
pub const RETRY_BUDGET_EXHAUSTED: &str = "budget_exhausted";

/// How the caller reads an error the proxy makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFormat {
    /// The reason's HTTP status and a JSON body.
    Json,
    /// A trailers-only gRPC response: HTTP 200, `grpc-status` and `grpc-message`, no body.
    Grpc,
}

impl ErrorFormat {
    /// The format a request with these headers can read: gRPC when its content-type is
    /// `application/grpc` or `application/grpc+<codec>` (gRPC over HTTP/2's definition of a
    /// gRPC request), JSON otherwise. gRPC-Web (`application/grpc-web`) gets JSON.
    pub fn of(headers: &HeaderMap) -> Self {
        let grpc = headers.get(header::CONTENT_TYPE).is_some_and(|ct| {
            let ct = ct.as_bytes();
            let prefix = b"application/grpc";
            ct.len() >= prefix.len()
                && ct[..prefix.len()].eq_ignore_ascii_case(prefix)
                && matches!(ct.get(prefix.len()), None | Some(b'+' | b';'))
        });
        if grpc {
            ErrorFormat::Grpc
        } else {
            ErrorFormat::Json
        }
    }
}

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

    /// Answers with `status` instead of the reason's (and a gRPC caller with the code gRPC
    /// maps that status to).
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

    /// The HTTP status of the JSON response.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.reason.status())
    }

    /// The `grpc-status` of the gRPC response.
    pub fn grpc_code(&self) -> GrpcCode {
        self.status
            .map_or_else(|| self.reason.grpc_code(), grpc_code_for_http)
    }

    /// The response the client sees, in the format it reads. Its extensions carry the
    /// [`Reason`].
    pub fn to_response(&self, format: ErrorFormat) -> Response<BoxBody> {
        let mut rsp = match format {
            ErrorFormat::Json => {
                let mut rsp = Response::new(body::full(self.json()));
                *rsp.status_mut() = self.status();
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                rsp
            }
            ErrorFormat::Grpc => {
                let mut rsp = Response::new(body::empty());
                let headers = rsp.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert(
                    GRPC_STATUS,
                    HeaderValue::from(u16::from(self.grpc_code().number())),
                );
                let message = percent_encode(&self.grpc_message());
                headers.insert(
                    GRPC_MESSAGE,
                    HeaderValue::from_str(&message)
                        .expect("percent-encoded text is a header value"),
                );
                rsp
            }
        };
        let headers = rsp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.reason.as_str()));
        if let Some(after) = self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(after)),
            );
        }
        if self.budget_exhausted {
            headers.insert(
                RETRY_HEADER,
                HeaderValue::from_static(RETRY_BUDGET_EXHAUSTED),
            );
        }
        rsp.extensions_mut().insert(self.reason);
        rsp
    }

    /// The same JSON response as raw HTTP/1.1 bytes, for connections hyper never saw (a
    /// request line that detection already refused, so no gRPC caller).
    pub fn to_http1_bytes(&self) -> Vec<u8> {
        let json = self.json();
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

    fn json(&self) -> String {
        serde_json::json!({
            "error": self.message,
            "reason": self.reason.as_str(),
            "service": self.service,
        })
        .to_string()
    }

    /// `<reason>: <message>`, and when to try again: a gRPC client shows the message, not
    /// the headers.
    fn grpc_message(&self) -> String {
        let mut message = format!("{}: {}", self.reason, self.message);
        if let Some(after) = self.retry_after {
            let _ = write!(message, " (retry after {}s)", retry_after_secs(after));
        }
        message
    }
}

/// `Retry-After` seconds: rounded up, at least 1 (0 would invite an immediate retry that
/// fails again).
fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX` of their UTF-8.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Whether a response from an endpoint (an app, or the proxy in front of it) means the
/// endpoint failed: a 5xx, or an error a peer proxy made whose status is a 5xx — a gRPC caller
/// gets those as HTTP 200 with a `grpc-status`, and failure accrual must count them the same.
pub fn is_endpoint_failure<B>(rsp: &Response<B>) -> bool {
    rsp.status().is_server_error()
        || rsp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Reason::from_name)
            .is_some_and(|r| r.status().is_server_error())
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
    // The inner future is already boxed (the logical stack, the app forwarder, the gateway's
    // routes): awaited as it is, no second box around it per request.
    S: Service<
            Request<BoxBody>,
            Response = Response<BoxBody>,
            Error = ProxyError,
            Future = BoxFuture<'static, Result<Response<BoxBody>, ProxyError>>,
        >,
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
        let format = ErrorFormat::of(req.headers());
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        let direction = self.direction;
        Box::pin(async move {
            match fut.await {
                Ok(rsp) => Ok(rsp),
                Err(error) => {
                    tracing::debug!(%error, "proxy error");
                    metrics.proxy_error(direction, error.reason);
                    Ok(error.to_response(format))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    fn grpc_request() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        headers
    }

    #[tokio::test]
    async fn error_response_names_reason_and_service() {
        let err = ProxyError::new(Reason::UnknownService, "user", "no instance of user");
        let rsp = err.to_response(ErrorFormat::Json);
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[ERROR_HEADER], "unknown_service");
        assert_eq!(
            rsp.extensions().get::<Reason>(),
            Some(&Reason::UnknownService)
        );
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["service"], "user");
        assert_eq!(v["reason"], "unknown_service");
    }

    #[test]
    fn grpc_requests_are_recognised_by_content_type() {
        assert_eq!(ErrorFormat::of(&grpc_request()), ErrorFormat::Grpc);
        for (ct, format) in [
            ("application/grpc", ErrorFormat::Grpc),
            ("Application/gRPC;charset=utf-8", ErrorFormat::Grpc),
            ("application/grpc-web", ErrorFormat::Json),
            ("application/grpcx", ErrorFormat::Json),
            ("application/json", ErrorFormat::Json),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(ErrorFormat::of(&headers), format, "{ct}");
        }
        assert_eq!(ErrorFormat::of(&HeaderMap::new()), ErrorFormat::Json);
    }

    #[tokio::test]
    async fn grpc_callers_get_a_trailers_only_status() {
        let err = ProxyError::new(Reason::RateLimited, "user", "100% of the bucket used\n")
            .with_retry_after(Duration::from_millis(1500));
        let rsp = err.to_response(ErrorFormat::of(&grpc_request()));
        assert_eq!(rsp.status(), StatusCode::OK);
        let h = rsp.headers();
        assert_eq!(h[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(
            h["grpc-message"],
            "rate_limited: 100%25 of the bucket used%0A (retry after 2s)"
        );
        assert_eq!(h[ERROR_HEADER], "rate_limited");
        assert_eq!(h[header::RETRY_AFTER], "2");
        assert_eq!(rsp.extensions().get::<Reason>(), Some(&Reason::RateLimited));
        assert!(rsp.body().is_end_stream());
    }

    #[test]
    fn an_injected_fault_maps_its_status() {
        let fault =
            |status| ProxyError::new(Reason::FaultInjected, "user", "injected").with_status(status);
        assert_eq!(
            fault(StatusCode::SERVICE_UNAVAILABLE).grpc_code(),
            GrpcCode::Unavailable
        );
        assert_eq!(
            fault(StatusCode::INTERNAL_SERVER_ERROR).grpc_code(),
            GrpcCode::Unknown
        );
        assert_eq!(
            ProxyError::new(Reason::Timeout, "user", "late").grpc_code(),
            GrpcCode::DeadlineExceeded
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn a_peer_proxys_grpc_error_is_an_endpoint_failure() {
        let peer = |reason: Reason| {
            ProxyError::new(reason, "user", "from the peer").to_response(ErrorFormat::Grpc)
        };
        assert!(is_endpoint_failure(&peer(Reason::UpstreamConnectFailure)));
        assert!(!is_endpoint_failure(&peer(Reason::RateLimited)));
        assert!(!is_endpoint_failure(&Response::new(())));
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
