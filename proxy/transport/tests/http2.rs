//! Requests over pooled HTTP/2 connections against a real hyper HTTP/2 server: bodies that
//! stream both ways at once (bidirectional gRPC), trailers, flow control beyond the windows,
//! and the stream reset when the caller gives up or the request body fails.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::channel::{Channel, Sender};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;

use ferrule_proxy_core::body::{self, BoxBody, BoxError};
use ferrule_proxy_core::metrics::Direction;
use ferrule_proxy_transport::client::{ClientConfig, Clients, Protocol};
use ferrule_proxy_transport::metrics::PoolMetrics;

/// The bound of every wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

/// An HTTP/2 server that echoes each request body, trailers included, as it arrives, and
/// reports how each request body ended: `Ok(bytes)` or the error it failed with.
async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<Result<usize, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended_tx, ended) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            io.set_nodelay(true).unwrap();
            let ended_tx = ended_tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let ended_tx = ended_tx.clone();
                    async move {
                        let (tx, echo) = Channel::<Bytes, BoxError>::new(1);
                        tokio::spawn(echo_body(req.into_body(), tx, ended_tx));
                        Ok::<_, Infallible>(Response::new(body::boxed(echo)))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            });
        }
    });
    (addr, ended)
}

async fn echo_body(
    mut body: Incoming,
    mut tx: http_body_util::channel::Sender<Bytes, BoxError>,
    ended: mpsc::UnboundedSender<Result<usize, String>>,
) {
    let mut len = 0;
    let outcome = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                len += frame.data_ref().map_or(0, Bytes::len);
                // The client may be gone; the request side still reports how it ended.
                let _ = tx.send(frame).await;
            }
            Some(Err(error)) => break Err(error.to_string()),
            None => break Ok(len),
        }
    };
    let _ = ended.send(outcome);
}

fn clients() -> Clients {
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(60),
    };
    Clients::new(Direction::Outbound, config, &PoolMetrics::default())
}

async fn send(clients: &Clients, addr: SocketAddr, body: BoxBody) -> Response<BoxBody> {
    let conn = timeout(BOUND, clients.connect(addr, Protocol::Http2))
        .await
        .unwrap()
        .unwrap();
    let req = Request::post("/bench.Echo/Stream").body(body).unwrap();
    timeout(BOUND, conn.send(req))
        .await
        .unwrap()
        .map_err(|e| e.error)
        .unwrap()
}

async fn next_frame(body: &mut BoxBody) -> Option<Frame<Bytes>> {
    timeout(BOUND, body.frame())
        .await
        .expect("no frame in time")
        .map(|f| f.unwrap())
}

fn trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers
}

/// A request whose body is still streaming: "one" sent and echoed back, the body open.
struct Streaming {
    /// Keeps the pool (and the connection) alive for the test.
    _clients: Clients,
    tx: Sender<Bytes, BoxError>,
    rsp: BoxBody,
    /// The server's report of how the request ended.
    ended: mpsc::UnboundedReceiver<Result<usize, String>>,
}

async fn streaming_request() -> Streaming {
    let (addr, ended) = echo_server().await;
    let clients = clients();
    let (mut tx, req_body) = Channel::<Bytes, BoxError>::new(1);
    tx.send_data(Bytes::from_static(b"one")).await.unwrap();
    let mut rsp = send(&clients, addr, body::boxed(req_body))
        .await
        .into_body();
    let frame = next_frame(&mut rsp).await.unwrap();
    assert_eq!(frame.into_data().unwrap(), "one");
    Streaming {
        _clients: clients,
        tx,
        rsp,
        ended,
    }
}

/// Waits for the server's report on the request and asserts it did not see the body end.
async fn assert_reset(ended: &mut mpsc::UnboundedReceiver<Result<usize, String>>) {
    let outcome = timeout(BOUND, ended.recv()).await.unwrap().unwrap();
    assert!(
        outcome.is_err(),
        "the server saw the request end: {outcome:?}"
    );
}

#[tokio::test]
async fn a_bidirectional_stream_flows_both_ways_before_either_side_ends() {
    let Streaming {
        _clients,
        mut tx,
        mut rsp,
        mut ended,
    } = streaming_request().await;
    tx.send_data(Bytes::from_static(b"two")).await.unwrap();
    let frame = next_frame(&mut rsp).await.unwrap();
    assert_eq!(frame.into_data().unwrap(), "two");
    tx.send_trailers(trailers()).await.unwrap();
    drop(tx);
    let frame = next_frame(&mut rsp).await.unwrap();
    assert_eq!(frame.into_trailers().unwrap(), trailers());
    assert!(next_frame(&mut rsp).await.is_none());
    assert_eq!(ended.recv().await.unwrap(), Ok(6));
}

#[tokio::test]
async fn a_complete_body_with_trailers_is_sent_whole() {
    let (addr, mut ended) = echo_server().await;
    let clients = clients();
    let (mut tx, req_body) = Channel::<Bytes, BoxError>::new(2);
    tx.send_data(Bytes::from_static(b"\0\0\0\0\0"))
        .await
        .unwrap();
    tx.send_trailers(trailers()).await.unwrap();
    drop(tx);
    let rsp = send(&clients, addr, body::boxed(req_body)).await;
    let echoed = timeout(BOUND, rsp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed.trailers(), Some(&trailers()));
    assert_eq!(echoed.to_bytes().len(), 5);
    assert_eq!(ended.recv().await.unwrap(), Ok(5));
}

#[tokio::test]
async fn bodies_larger_than_the_windows_stream_under_flow_control() {
    let (addr, mut ended) = echo_server().await;
    let clients = clients();
    // 12 MiB: more than the stream (2 MiB) and connection (5 MiB) windows both ways, so it
    // only gets through if the response body gives the window back as it is read.
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 192;
    let (mut tx, req_body) = Channel::<Bytes, BoxError>::new(4);
    tokio::spawn(async move {
        for _ in 0..CHUNKS {
            if tx.send_data(Bytes::from(vec![7u8; CHUNK])).await.is_err() {
                return;
            }
        }
    });
    let rsp = send(&clients, addr, body::boxed(req_body)).await;
    let echoed = timeout(BOUND, rsp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed.to_bytes().len(), CHUNK * CHUNKS);
    assert_eq!(ended.recv().await.unwrap(), Ok(CHUNK * CHUNKS));
}

#[tokio::test]
async fn dropping_the_response_resets_a_streaming_request() {
    let Streaming {
        _clients,
        mut tx,
        rsp,
        mut ended,
    } = streaming_request().await;
    drop(rsp);
    assert_reset(&mut ended).await;
    // The caller's side of the body is told too.
    assert!(
        timeout(BOUND, tx.send_data(Bytes::from_static(b"two")))
            .await
            .unwrap()
            .is_err()
    );
}

#[tokio::test]
async fn a_failing_request_body_resets_the_stream() {
    let Streaming {
        _clients,
        tx,
        mut rsp,
        mut ended,
    } = streaming_request().await;
    tx.abort(io::Error::other("the client went away").into());
    assert_reset(&mut ended).await;
    let end = timeout(BOUND, rsp.frame()).await.unwrap();
    assert!(
        !matches!(end, Some(Ok(ref f)) if f.is_data()),
        "the response went on: {end:?}"
    );
}

#[tokio::test]
async fn many_unary_calls_share_one_connection() {
    let (addr, mut ended) = echo_server().await;
    let clients = clients();
    for _ in 0..50 {
        let rsp = send(&clients, addr, body::full("hello")).await;
        let echoed = timeout(BOUND, rsp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed.to_bytes(), "hello");
        assert_eq!(ended.recv().await.unwrap(), Ok(5));
    }
    assert_eq!(clients.pooled().len(), 1);
    assert_eq!(clients.pooled()[0].1, 1);
}
