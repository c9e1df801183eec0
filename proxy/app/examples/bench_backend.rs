//! The benchmark's backend: as fast as hyper gets, so the numbers measure the proxy.
//!
//! Serves HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on the address given as the first
//! argument. A `POST` with `content-type: application/grpc` gets a gRPC answer: a path ending
//! in `/Stream` a server-streaming one (the number of messages is the second argument, 10 by
//! default), any other path a unary one (one empty message); each ends with `grpc-status: 0`
//! trailers. Anything else gets `200 ok`.
//!
//! bench/run.sh runs it as the one backend behind every path it measures (direct, the nginx,
//! HAProxy and Ferrule pairs), so every path pays for the same backend.

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

/// One gRPC message: uncompressed, empty.
const EMPTY_MESSAGE: &[u8] = &[0, 0, 0, 0, 0];

async fn handle(
    req: Request<Incoming>,
    stream_messages: usize,
) -> Result<Response<Body>, Infallible> {
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let streaming = req.uri().path().ends_with("/Stream");
    // Read the request to its end, as a real server would.
    let _ = req.into_body().collect().await;
    if !grpc {
        return Ok(Response::new(
            Full::new(Bytes::from_static(b"ok")).boxed_unsync(),
        ));
    }
    let messages = if streaming { stream_messages } else { 1 };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().expect("valid header"));
    let frames = std::iter::repeat_n((), messages)
        .map(|()| Frame::data(Bytes::from_static(EMPTY_MESSAGE)))
        .chain(std::iter::once(Frame::trailers(trailers)));
    // Each message is its own DATA frame, as a streaming server sends them.
    let body = StreamBody::new(futures::stream::iter(frames.map(Ok))).boxed_unsync();
    let mut rsp = Response::new(body);
    rsp.headers_mut().insert(
        "content-type",
        "application/grpc".parse().expect("valid header"),
    );
    Ok(rsp)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18080".to_string());
    let stream_messages = match args.next() {
        Some(n) => n.parse().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("stream message count {n:?}: {e}"),
            )
        })?,
        None => 10,
    };
    let listener = TcpListener::bind(&addr).await?;
    eprintln!(
        "bench backend listening on {} ({stream_messages} messages per streaming call)",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| handle(req, stream_messages)),
                )
                .await;
        });
    }
}
