//! The benchmark's backend: as fast as hyper gets, so the numbers measure the proxy.
//!
//! Serves HTTP/1.1 and HTTP/2 on the address given as the first argument. `POST` with
//! `content-type: application/grpc` gets a unary gRPC answer (an empty message, then
//! `grpc-status: 0` trailers); anything else gets `200 ok`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use http_body_util::{Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type Body = UnsyncBoxBody<Bytes, Infallible>;

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the request to its end, as a real server would.
    let _ = req.into_body().collect().await;
    if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("valid header"));
        let frames = [
            Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])),
            Frame::trailers(trailers),
        ];
        let body = StreamBody::new(futures::stream::iter(frames.map(Ok))).boxed_unsync();
        let mut rsp = Response::new(body);
        rsp.headers_mut().insert(
            "content-type",
            "application/grpc".parse().expect("valid header"),
        );
        Ok(rsp)
    } else {
        Ok(Response::new(
            Full::new(Bytes::from_static(b"ok")).boxed_unsync(),
        ))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".to_string());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("bench backend listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                .await;
        });
    }
}
