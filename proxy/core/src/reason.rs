//! Why the proxy answered a request itself: one [`Reason`] drives the `ferrule-error` header,
//! the JSON body's `reason`, the status code and the `reason` label of `proxy_errors_total`, so
//! an error cannot be shown one way and counted another.

use std::fmt;

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
}

impl Reason {
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
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::UnknownService | Reason::NoEndpoints | Reason::EndpointsUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::UpstreamConnectFailure | Reason::UpstreamFailure => StatusCode::BAD_GATEWAY,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::Unauthenticated => StatusCode::UNAUTHORIZED,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::Overloaded | Reason::BreakerOpen => StatusCode::SERVICE_UNAVAILABLE,
            // The fault's own status replaces this one (see `ProxyError::with_status`).
            Reason::FaultInjected => StatusCode::INTERNAL_SERVER_ERROR,
        }
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
