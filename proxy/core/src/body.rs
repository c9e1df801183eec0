//! The one body type every stack speaks.
//!
//! Requests and responses are forwarded as streams: hyper's `Incoming` bodies are boxed, never
//! collected, so large bodies stream through and trailers (gRPC status) pass along.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body of any origin.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body whose errors convert to [`BoxError`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A request body as hyper's server received it. A body already at its end (a GET, a
/// `content-length: 0`) becomes [`empty`], which boxes a zero-sized body and allocates
/// nothing; only a body with something left to read is boxed around hyper's.
pub fn incoming(body: hyper::body::Incoming) -> BoxBody {
    use http_body::Body as _;
    if body.is_end_stream() {
        empty()
    } else {
        boxed(body)
    }
}

pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}
