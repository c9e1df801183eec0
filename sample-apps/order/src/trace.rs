//! Trace context: the only thing the order service carries from a request to the calls it makes
//! for it. It copies the W3C (`traceparent`, `tracestate`) and B3 headers unchanged, so the
//! mesh's spans for the incoming request and for the outgoing calls join one trace.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderMap, HeaderName};
use tonic::metadata::MetadataMap;
use tracing::Span;

/// The headers copied from an incoming request to every outgoing call made for it.
const PROPAGATED: [HeaderName; 8] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("b3"),
    HeaderName::from_static("x-b3-traceid"),
    HeaderName::from_static("x-b3-spanid"),
    HeaderName::from_static("x-b3-parentspanid"),
    HeaderName::from_static("x-b3-sampled"),
    HeaderName::from_static("x-b3-flags"),
];

/// The trace headers of one incoming request; an axum extractor that never fails.
#[derive(Debug, Clone, Default)]
pub(crate) struct TraceContext(HeaderMap);

impl TraceContext {
    /// The trace headers among `headers` (an HTTP request's, or a gRPC call's metadata).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut propagated = HeaderMap::new();
        for name in PROPAGATED {
            for value in headers.get_all(&name) {
                propagated.append(name.clone(), value.clone());
            }
        }
        Self(propagated)
    }

    /// A gRPC request for `message` carrying these trace headers as metadata.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        tonic::Request::from_parts(
            MetadataMap::from_headers(self.0.clone()),
            tonic::Extensions::default(),
            message,
        )
    }
}

impl<S: Sync> FromRequestParts<S> for TraceContext {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self::from_headers(&parts.headers))
    }
}

/// One span per HTTP request, with the W3C and B3 trace ids when the caller sent them (a field
/// the caller did not send is left out).
pub(crate) fn request_span<B>(request: &http::Request<B>) -> Span {
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        traceparent = header(request, "traceparent"),
        b3_trace_id = header(request, "x-b3-traceid"),
    )
}

fn header<'a, B>(request: &'a http::Request<B>, name: &str) -> Option<&'a str> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_trace_headers_and_nothing_else() {
        let mut incoming = HeaderMap::new();
        incoming.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        incoming.insert("x-b3-sampled", "1".parse().unwrap());
        incoming.insert("authorization", "Bearer secret".parse().unwrap());
        incoming.insert("x-request-id", "abc".parse().unwrap());

        let request = TraceContext::from_headers(&incoming).request(());
        let metadata = request.metadata();
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            metadata.get("x-b3-sampled").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert!(metadata.get("authorization").is_none());
        assert!(metadata.get("x-request-id").is_none());
        assert_eq!(metadata.len(), 2);
    }
}
