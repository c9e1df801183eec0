//! Why the proxy answered a request itself: one [`Reason`] drives the `ferrule-error` header,
//! the JSON body's `reason`, the HTTP status, the gRPC status a gRPC caller gets instead and
//! the `reason` label of `proxy_errors_total`, so an error cannot be shown one way and counted
//! another.

use std::fmt;

use ferrule_config::GrpcCode;
use http::StatusCode;
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Why the proxy answered a request itself. The string form is the header value and the
/// metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No instance of the service is registered.
    UnknownService,
    /// Discovery has not answered for the service, or it has no endpoints left.
    NoEndpoints,
    /// Endpoints exist but every one failed to connect recently.
    EndpointsUnavailable,
    /// Connecting to the chosen endpoint (or the local app) failed.
    UpstreamConnectFailure,
    /// The connection to the endpoint broke before a response head arrived.
    UpstreamFailure,
    /// The request is not valid HTTP or cannot be forwarded as it is.
    BadRequest,
    /// The gateway wanted a valid JWT and got none.
    Unauthenticated,
    /// A rate limit's bucket is empty.
    RateLimited,
    /// The gateway has no route for the path.
    NoRoute,
    /// The request body is larger than the gateway allows.
    PayloadTooLarge,
    /// The request timeout, or the last attempt's per-try timeout, ran out.
    Timeout,
    /// The service's concurrency limit and pending queue are full.
    Overloaded,
    /// Every endpoint of the service is ejected by its circuit breaker.
    BreakerOpen,
    /// A route's fault injection answered instead of the service.
    FaultInjected,
    /// A mutual TLS handshake with a peer proxy failed (inbound: the client's certificate was
    /// refused; counted, the connection closed).
    TlsHandshake,
    /// An `AuthorizationPolicy` (or the namespace's default) refuses the client.
    Forbidden,
}

impl Reason {
    const ALL: [Reason; 16] = [
        Reason::UnknownService,
        Reason::NoEndpoints,
        Reason::EndpointsUnavailable,
        Reason::UpstreamConnectFailure,
        Reason::UpstreamFailure,
        Reason::BadRequest,
        Reason::Unauthenticated,
        Reason::RateLimited,
        Reason::NoRoute,
        Reason::PayloadTooLarge,
        Reason::Timeout,
        Reason::Overloaded,
        Reason::BreakerOpen,
        Reason::FaultInjected,
        Reason::TlsHandshake,
        Reason::Forbidden,
    ];

    /// The reason named `s` (a `ferrule-error` value, as a peer proxy sent it).
    pub fn from_name(s: &str) -> Option<Reason> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownService => "unknown_service",
            Reason::NoEndpoints => "no_endpoints",
            Reason::EndpointsUnavailable => "endpoints_unavailable",
            Reason::UpstreamConnectFailure => "upstream_connect_failure",
            Reason::UpstreamFailure => "upstream_failure",
            Reason::BadRequest => "bad_request",
            Reason::Unauthenticated => "unauthenticated",
            Reason::RateLimited => "rate_limited",
            Reason::NoRoute => "no_route",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::Timeout => "timeout",
            Reason::Overloaded => "overloaded",
            Reason::BreakerOpen => "breaker_open",
            Reason::FaultInjected => "fault_injected",
            Reason::TlsHandshake => "tls_handshake_failure",
            Reason::Forbidden => "forbidden",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::UnknownService | Reason::NoEndpoints | Reason::EndpointsUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::UpstreamConnectFailure | Reason::UpstreamFailure | Reason::TlsHandshake => {
                StatusCode::BAD_GATEWAY
            }
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::Unauthenticated => StatusCode::UNAUTHORIZED,
            Reason::Forbidden => StatusCode::FORBIDDEN,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::Overloaded | Reason::BreakerOpen => StatusCode::SERVICE_UNAVAILABLE,
            // The fault's own status replaces this one (see `ProxyError::with_status`).
            Reason::FaultInjected => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `grpc-status` a gRPC caller gets instead of [`Reason::status`]. The codes say what
    /// a gRPC client should do next: UNAVAILABLE is the one clients and retry policies treat
    /// as "try again", so every "the service could not be reached right now" reason maps to
    /// it; the rest follow the meaning of the code (see docs/proxy.md).
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Reason::UnknownService
            | Reason::NoEndpoints
            | Reason::EndpointsUnavailable
            | Reason::UpstreamConnectFailure
            | Reason::UpstreamFailure
            | Reason::TlsHandshake
            | Reason::Overloaded
            | Reason::BreakerOpen => GrpcCode::Unavailable,
            // The request could not be carried as it is: a transport-level fault, not an
            // argument the service's own validation refused (INVALID_ARGUMENT is the
            // service's to give), and what gRPC maps an intermediary's 400 to.
            Reason::BadRequest => GrpcCode::Internal,
            Reason::Unauthenticated => GrpcCode::Unauthenticated,
            Reason::Forbidden => GrpcCode::PermissionDenied,
            Reason::RateLimited | Reason::PayloadTooLarge => GrpcCode::ResourceExhausted,
            // For gRPC the path is the method: no route means the method is not served here.
            Reason::NoRoute => GrpcCode::Unimplemented,
            Reason::Timeout => GrpcCode::DeadlineExceeded,
            // The fault's own status replaces this one (see `ProxyError::grpc_code`).
            Reason::FaultInjected => grpc_code_for_http(self.status()),
        }
    }
}

/// The gRPC code a client derives from an HTTP status that came without a `grpc-status`
/// (grpc/grpc `doc/http-grpc-status-mapping.md`). An injected abort fault answers a gRPC
/// caller with this code for the fault's status, so it looks exactly like the broken
/// intermediary it simulates: 503 and 429 are UNAVAILABLE, 500 is UNKNOWN.
pub fn grpc_code_for_http(status: StatusCode) -> GrpcCode {
    match status.as_u16() {
        400 => GrpcCode::Internal,
        401 => GrpcCode::Unauthenticated,
        403 => GrpcCode::PermissionDenied,
        404 => GrpcCode::Unimplemented,
        429 | 502 | 503 | 504 => GrpcCode::Unavailable,
        _ => GrpcCode::Unknown,
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_name(reason.as_str()), Some(reason));
        }
        assert_eq!(Reason::from_name("nonsense"), None);
    }

    #[test]
    fn grpc_codes() {
        assert_eq!(Reason::NoEndpoints.grpc_code(), GrpcCode::Unavailable);
        assert_eq!(Reason::Timeout.grpc_code(), GrpcCode::DeadlineExceeded);
        assert_eq!(Reason::RateLimited.grpc_code(), GrpcCode::ResourceExhausted);
        assert_eq!(Reason::FaultInjected.grpc_code(), GrpcCode::Unknown);
        assert_eq!(
            grpc_code_for_http(StatusCode::SERVICE_UNAVAILABLE),
            GrpcCode::Unavailable
        );
        assert_eq!(
            grpc_code_for_http(StatusCode::TOO_MANY_REQUESTS),
            GrpcCode::Unavailable
        );
        assert_eq!(
            grpc_code_for_http(StatusCode::FORBIDDEN),
            GrpcCode::PermissionDenied
        );
        assert_eq!(
            grpc_code_for_http(StatusCode::IM_A_TEAPOT),
            GrpcCode::Unknown
        );
    }
}
