//! Request spans carrying the caller's trace context, so this service's log lines can be matched
//! with the spans the mesh records for the same request.

use tracing::Span;

/// One span per HTTP or gRPC request, with the W3C and B3 trace ids when the caller sent them
/// (a field the caller did not send is left out).
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
