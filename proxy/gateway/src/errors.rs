//! Why the gateway refuses a request, as a [`ProxyError`] for core's renderer.
//!
//! The gateway's steps fail with a [`GatewayError`]; [`to_proxy_error`] turns it into the
//! [`ProxyError`] every Ferrule proxy answers with, and core's `RespondLayer` renders it like
//! any other: a `ferrule-error: <reason>` header and a JSON body whose `error` says what
//! happened (or a gRPC status for a gRPC caller), counted in
//! `proxy_errors_total{direction="gateway"}`. A 429 also carries `Retry-After` in whole
//! seconds, rounded up.

use std::time::Duration;

use ferrule_proxy_core::body::BoxError;
use ferrule_proxy_core::errors::{ProxyError, Reason};

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
    /// A request that is not gRPC on a route marked `grpc: true`.
    #[error(
        "route {route:?} takes gRPC only (HTTP/2 with content-type application/grpc), got {content_type}"
    )]
    NotGrpc { route: String, content_type: String },
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
            GatewayError::BadRewrite(_) | GatewayError::NotGrpc { .. } => Reason::BadRequest,
        }
    }

    /// The error to answer with; `service` is the route's service ("" without a route).
    pub fn into_proxy_error(self, service: &str) -> ProxyError {
        let error = ProxyError::new(self.reason(), service, self.to_string());
        match self {
            GatewayError::RateLimited { retry_after } => error.with_retry_after(retry_after),
            _ => error,
        }
    }
}

/// The error to answer with for what a route's steps failed with (`tower::filter` boxes the
/// [`GatewayError`]s).
pub fn to_proxy_error(service: &str, error: BoxError) -> ProxyError {
    match error.downcast::<GatewayError>() {
        Ok(error) => error.into_proxy_error(service),
        // Nothing below makes other errors (the forwarding stack renders its own); should one
        // appear, it still gets an explained answer.
        Err(error) => {
            tracing::warn!(%error, service, "unexpected gateway error");
            ProxyError::new(Reason::UpstreamFailure, service, error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_proxy_core::errors::{ERROR_HEADER, ErrorFormat};
    use http::header;
    use http_body_util::BodyExt;

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
            (
                GatewayError::NotGrpc {
                    route: "orders-grpc".into(),
                    content_type: "no content-type".into(),
                },
                400,
                "route \"orders-grpc\" takes gRPC only (HTTP/2 with content-type application/grpc), got no content-type",
            ),
        ];
        for (error, status, message) in cases {
            let reason = error.reason();
            let rsp =
                to_proxy_error("user:http", error.clone().into()).to_response(ErrorFormat::Json);
            assert_eq!(rsp.status().as_u16(), status, "{error}");
            assert_eq!(rsp.headers()[ERROR_HEADER], reason.as_str());
            if status == 429 {
                assert_eq!(rsp.headers()[header::RETRY_AFTER], "1");
            }
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], message);
            assert_eq!(v["service"], "user:http");
        }
    }

    /// Every refusal a gRPC caller can meet is a trailers-only gRPC response with the code
    /// gRPC clients act on.
    #[tokio::test]
    async fn grpc_callers_get_the_reasons_code() {
        let cases = [
            (GatewayError::MissingAuthorization, "16"),
            (GatewayError::InvalidToken("token expired".into()), "16"),
            (
                GatewayError::RateLimited {
                    retry_after: Duration::from_secs(2),
                },
                "8",
            ),
            (GatewayError::NoRoute("/pkg.Svc/Get".into()), "12"),
            (GatewayError::PayloadTooLarge, "8"),
            (GatewayError::BadRewrite("bad".into()), "13"),
        ];
        for (error, code) in cases {
            let rsp = error
                .clone()
                .into_proxy_error("")
                .to_response(ErrorFormat::Grpc);
            assert_eq!(rsp.status().as_u16(), 200, "{error}");
            assert_eq!(rsp.headers()["grpc-status"], code, "{error}");
            assert_eq!(rsp.headers()[ERROR_HEADER], error.reason().as_str());
            assert_eq!(rsp.headers()[header::CONTENT_TYPE], "application/grpc");
            let message = rsp.headers()["grpc-message"].to_str().unwrap().to_string();
            assert!(message.contains(error.reason().as_str()), "{message}");
            // Trailers-only: the status is in the headers and nothing follows.
            let body = rsp.into_body().collect().await.unwrap();
            assert!(body.trailers().is_none(), "{error}");
            assert!(body.to_bytes().is_empty(), "{error}");
        }
    }
}
