//! The request size limit: 413 for a body larger than `maxRequestBytes`.
//!
//! A `Content-Length` over the limit is refused before anything is forwarded. Other bodies
//! (chunked HTTP/1, HTTP/2 without a length) stream through a counting wrapper that fails the
//! body once it passes the limit; that breaks the upstream request, and the layer answers 413
//! instead of whatever the broken request produced. Bodies are never buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::errors::GatewayError;
use ferrule_proxy_core::body::{self, BoxBody, BoxError};

#[derive(Clone, Debug)]
pub struct SizeLimitLayer {
    max: u64,
}

impl SizeLimitLayer {
    pub fn new(max: u64) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for SizeLimitLayer {
    type Service = SizeLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SizeLimit {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SizeLimit<S> {
    inner: S,
    max: u64,
}

impl<S> Service<Request<BoxBody>> for SizeLimit<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max) {
            return Box::pin(async { Err(GatewayError::PayloadTooLarge.into()) });
        }
        let exceeded = Arc::new(AtomicBool::new(false));
        let req = req.map(|b| {
            body::boxed(Limited {
                inner: b,
                remaining: self.max,
                exceeded: exceeded.clone(),
            })
        });
        let fut: BoxFuture<'static, _> = Box::pin(self.inner.call(req));
        Box::pin(async move {
            let result = fut.await;
            if exceeded.load(Ordering::Acquire) {
                return Err(GatewayError::PayloadTooLarge.into());
            }
            result
        })
    }
}

/// A body that fails once more than `remaining` bytes went through, and says so in
/// `exceeded`.
struct Limited {
    inner: BoxBody,
    remaining: u64,
    exceeded: Arc<AtomicBool>,
}

/// The error a [`Limited`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the gateway allows")]
struct TooLarge;

impl Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.remaining {
                    this.exceeded.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(TooLarge.into())));
                }
                this.remaining -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;
    use http_body_util::{BodyExt, StreamBody};
    use tower::ServiceExt;

    /// Reads the whole request body, like an upstream would; fails when the body fails.
    async fn upstream(req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        let bytes = req.into_body().collect().await?.to_bytes();
        Ok(Response::new(body::full(bytes.len().to_string())))
    }

    fn chunked(chunks: usize, size: usize) -> BoxBody {
        let frames =
            (0..chunks).map(move |_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; size]))));
        body::boxed(StreamBody::new(stream::iter(frames)))
    }

    async fn send(req: Request<BoxBody>) -> Result<String, GatewayError> {
        let svc = SizeLimitLayer::new(100).layer(tower::service_fn(upstream));
        match svc.oneshot(req).await {
            Ok(rsp) => Ok(String::from_utf8(
                rsp.into_body().collect().await.unwrap().to_bytes().to_vec(),
            )
            .unwrap()),
            Err(e) => Err(*e.downcast::<GatewayError>().unwrap()),
        }
    }

    #[tokio::test]
    async fn content_length_over_the_limit_is_refused_up_front() {
        let req = Request::post("/")
            .header(header::CONTENT_LENGTH, "101")
            .body(body::full(vec![b'x'; 101]))
            .unwrap();
        assert_eq!(send(req).await, Err(GatewayError::PayloadTooLarge));
    }

    #[tokio::test]
    async fn streamed_bodies_are_capped() {
        let ok = Request::post("/").body(chunked(10, 10)).unwrap();
        assert_eq!(send(ok).await, Ok("100".into()));
        let big = Request::post("/").body(chunked(11, 10)).unwrap();
        assert_eq!(send(big).await, Err(GatewayError::PayloadTooLarge));
    }
}
