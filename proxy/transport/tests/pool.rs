//! The connection pool against real loopback servers: one handshake for a cold key, a failed
//! handshake shared by its waiters, idle connections closed, keys kept apart.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use ferrule_proxy_core::body::{self, BoxBody};
use ferrule_proxy_core::metrics::Direction;
use ferrule_proxy_transport::client::{ClientConfig, ClientError, Clients, Dst, Protocol};
use ferrule_proxy_transport::metrics::PoolMetrics;
use ferrule_proxy_transport::pool::{
    HTTP1_HANDSHAKES_PER_KEY, Identity, MAX_IDLE_HTTP1_PER_KEY, PoolProtocol,
};

/// The bound of every wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

type Handler = Arc<dyn Fn(Request<Incoming>) -> Response<BoxBody> + Send + Sync>;

/// An HTTP/1 and HTTP/2 server on loopback that counts the connections it accepts and reports
/// each one that closes.
struct Server {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<()>,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, Arc::new(|_| Response::new(body::full("ok"))))
    }

    fn serve(listener: TcpListener, handler: Handler) -> Self {
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let counted = accepts.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let rsp = handler(req);
                        async move { Ok::<_, Infallible>(rsp) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                    let _ = closed_tx.send(());
                });
            }
        });
        Self {
            addr,
            accepts,
            closed,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    async fn next_close(&mut self) {
        timeout(BOUND, self.closed.recv())
            .await
            .expect("the server saw no connection close")
            .expect("the server stopped");
    }
}

fn clients(direction: Direction, idle_timeout: Duration) -> (Clients, PoolMetrics) {
    let metrics = PoolMetrics::default();
    let config = ClientConfig {
        connect_timeout: Duration::from_millis(500),
        idle_timeout,
    };
    (Clients::new(direction, config, &metrics), metrics)
}

/// Sends a GET over a connection to `dst` and reads the whole response.
async fn get(clients: &Clients, dst: impl Into<Dst>, protocol: Protocol) -> Result<Bytes, String> {
    let conn = clients
        .connect(dst, protocol)
        .await
        .map_err(|e| e.to_string())?;
    let rsp = conn
        .send(Request::get("/").body(body::empty()).unwrap())
        .await
        .map_err(|e| e.error.to_string())?;
    assert_eq!(rsp.status(), StatusCode::OK);
    let body = rsp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(body.to_bytes())
}

// On several threads, so the callers really race for the cold key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_to_a_cold_http2_endpoint_make_one_connection() {
    let server = Server::start().await;
    let (clients, metrics) = clients(Direction::Outbound, Duration::from_secs(60));
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let clients = clients.clone();
        let addr = server.addr;
        requests.spawn(async move { get(&clients, addr, Protocol::Http2).await });
    }
    let all = timeout(BOUND, requests.join_all()).await.unwrap();
    assert!(all.iter().all(|r| r.as_deref() == Ok(&b"ok"[..])));
    assert_eq!(server.accepts(), 1);
    assert_eq!(
        metrics.connects_made(Direction::Outbound, PoolProtocol::Http2, true),
        1
    );
    assert_eq!(
        metrics.open_connections(Direction::Outbound, PoolProtocol::Http2),
        1
    );
    assert_eq!(clients.pooled().len(), 1);
}

/// A listener whose accept queue is full: a connect to it gets no answer (the kernel drops
/// the SYN), so it fails by the connect timeout, after every caller has queued behind it.
async fn unanswering_listener() -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(stream) => queued.push(stream.unwrap()),
            Err(_) => return (listener, queued),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[tokio::test]
async fn a_failed_handshake_fails_every_waiter_and_the_next_request_retries() {
    let (listener, queued) = unanswering_listener().await;
    let addr = listener.local_addr().unwrap();
    let (clients, metrics) = clients(Direction::Outbound, Duration::from_secs(60));

    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let clients = clients.clone();
        requests.spawn(async move { clients.connect(addr, Protocol::Http2).await.err() });
    }
    let errors = timeout(BOUND, requests.join_all()).await.unwrap();
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, Some(ClientError::ConnectTimeout { .. }))),
        "{errors:?}"
    );
    let failed = |m: &PoolMetrics| m.connects_made(Direction::Outbound, PoolProtocol::Http2, false);
    assert_eq!(failed(&metrics), 1, "one handshake for every waiter");
    assert!(clients.pooled().is_empty(), "{:?}", clients.pooled());

    // The endpoint answers now (its queue drained); the next request tries again rather than
    // reusing the failure.
    for _ in &queued {
        timeout(BOUND, listener.accept()).await.unwrap().unwrap();
    }
    let server = Server::serve(listener, Arc::new(|_| Response::new(body::full("ok"))));
    let body = timeout(BOUND, get(&clients, addr, Protocol::Http2))
        .await
        .unwrap();
    assert_eq!(body.as_deref(), Ok(&b"ok"[..]));
    assert_eq!(failed(&metrics), 1);
    assert_eq!(server.accepts(), 1);
}

#[tokio::test]
async fn an_http1_burst_opens_at_most_a_connection_per_request_and_then_reuses_them() {
    let server = Server::start().await;
    let (clients, _) = clients(Direction::Inbound, Duration::from_secs(60));
    let burst = || {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let clients = clients.clone();
            let addr = server.addr;
            requests.spawn(async move { get(&clients, addr, Protocol::Http1).await });
        }
        requests.join_all()
    };
    let all = timeout(BOUND, burst()).await.unwrap();
    assert!(all.iter().all(|r| r.as_deref() == Ok(&b"ok"[..])));
    let opened = server.accepts();
    assert!((1..=20).contains(&opened), "{opened} connections");
    for _ in 0..20 {
        timeout(BOUND, get(&clients, server.addr, Protocol::Http1))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        server.accepts(),
        opened,
        "sequential requests reuse the idle ones"
    );
}

/// The server side of a pair at saturation: more requests at once than the old idle cap (32),
/// each answered, then the next burst. Connections still streaming their response when they
/// were given back counted against that cap, so every one beyond it was closed and the next
/// burst reconnected (a fifth of the requests in the bench made a new connection). Now the
/// second burst reuses every connection of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_above_the_old_idle_cap_keeps_its_connections_for_the_next() {
    const CALLERS: usize = 64;
    const { assert!(CALLERS <= MAX_IDLE_HTTP1_PER_KEY) };
    let server = Server::start().await;
    let (clients, _) = clients(Direction::Inbound, Duration::from_secs(60));
    let burst = || {
        // Every caller holds its response until all have one: CALLERS connections at once.
        let all_answered = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..CALLERS {
            let clients = clients.clone();
            let addr = server.addr;
            let all_answered = all_answered.clone();
            callers.spawn(async move {
                let conn = clients.connect(addr, Protocol::Http1).await.unwrap();
                let rsp = conn
                    .send(Request::get("/").body(body::empty()).unwrap())
                    .await
                    .unwrap();
                all_answered.wait().await;
                rsp.into_body().collect().await.unwrap().to_bytes()
            });
        }
        callers.join_all()
    };
    let first = timeout(BOUND, burst()).await.unwrap();
    assert!(first.iter().all(|b| b == "ok"));
    assert_eq!(
        server.accepts(),
        CALLERS,
        "one connection per request at once"
    );
    let second = timeout(BOUND, burst()).await.unwrap();
    assert!(second.iter().all(|b| b == "ok"));
    assert_eq!(
        server.accepts(),
        CALLERS,
        "the second burst reuses them all"
    );
}

#[tokio::test]
async fn failed_http1_handshakes_are_bounded_per_key_and_shared_by_waiters() {
    let (listener, _queued) = unanswering_listener().await;
    let addr = listener.local_addr().unwrap();
    let (clients, metrics) = clients(Direction::Inbound, Duration::from_secs(60));
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let clients = clients.clone();
        requests.spawn(async move { clients.connect(addr, Protocol::Http1).await.is_err() });
    }
    let failed = timeout(BOUND, requests.join_all()).await.unwrap();
    assert!(failed.iter().all(|f| *f));
    assert_eq!(
        metrics.connects_made(Direction::Inbound, PoolProtocol::Http1, false),
        HTTP1_HANDSHAKES_PER_KEY as u64
    );
    assert!(clients.pooled().is_empty());
}

#[tokio::test]
async fn an_idle_http2_connection_closes_and_leaves_the_pool() {
    let mut server = Server::start().await;
    let (clients, _) = clients(Direction::Outbound, Duration::from_millis(200));
    timeout(BOUND, get(&clients, server.addr, Protocol::Http2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(clients.pooled().len(), 1);
    server.next_close().await;
    assert!(clients.pooled().is_empty(), "{:?}", clients.pooled());

    // The next request makes a new connection.
    timeout(BOUND, get(&clients, server.addr, Protocol::Http2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.accepts(), 2);
}

#[tokio::test]
async fn an_idle_http1_connection_closes_and_leaves_the_pool() {
    let mut server = Server::start().await;
    let (clients, _) = clients(Direction::Inbound, Duration::from_millis(200));
    for _ in 0..3 {
        timeout(BOUND, get(&clients, server.addr, Protocol::Http1))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(server.accepts(), 1, "kept alive and reused");
    server.next_close().await;
    assert!(clients.pooled().is_empty(), "{:?}", clients.pooled());
}

#[tokio::test]
async fn a_connection_streaming_a_response_is_not_idle() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (body_tx, mut body_rx) = mpsc::unbounded_channel();
    let mut server = Server::serve(
        listener,
        Arc::new(move |_| {
            let (tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
            body_tx.send(tx).unwrap();
            Response::new(body::boxed(body))
        }),
    );
    let idle = Duration::from_millis(100);
    let (clients, _) = clients(Direction::Outbound, idle);
    let conn = timeout(BOUND, clients.connect(server.addr, Protocol::Http2))
        .await
        .unwrap()
        .unwrap();
    let rsp = timeout(
        BOUND,
        conn.send(Request::get("/").body(body::empty()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let mut sender = timeout(BOUND, body_rx.recv()).await.unwrap().unwrap();

    // Several idle timeouts pass while the body is open: the connection stays. (A sleep,
    // because what is checked is that nothing happens.)
    tokio::time::sleep(idle * 4).await;
    assert!(server.closed.try_recv().is_err(), "closed mid-response");
    assert_eq!(clients.pooled().len(), 1);

    sender.send_data(Bytes::from_static(b"done")).await.unwrap();
    drop(sender);
    let body = timeout(BOUND, rsp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body.to_bytes(), "done");
    server.next_close().await;
    assert!(clients.pooled().is_empty());
}

#[tokio::test]
async fn keys_with_another_identity_protocol_or_side_never_share_a_connection() {
    let server = Server::start().await;
    let (peers, _) = clients(Direction::Outbound, Duration::from_secs(60));
    let (apps, _) = clients(Direction::Inbound, Duration::from_secs(60));
    let dst = |identity: Option<&str>| Dst {
        addr: server.addr,
        identity: identity.map(Identity::new),
        idle_timeout: None,
    };
    let keys = [
        (
            &peers,
            dst(Some("spiffe://cluster.local/ns/shop/sa/user")),
            Protocol::Http2,
        ),
        (
            &peers,
            dst(Some("spiffe://cluster.local/ns/shop/sa/order")),
            Protocol::Http2,
        ),
        (&peers, dst(None), Protocol::Http2),
        (&peers, dst(None), Protocol::Http1),
        (&apps, dst(None), Protocol::Http2),
    ];
    // Twice: the second round reuses the first round's connections.
    for _ in 0..2 {
        for (clients, dst, protocol) in &keys {
            timeout(BOUND, get(clients, dst.clone(), *protocol))
                .await
                .unwrap()
                .unwrap();
        }
    }
    assert_eq!(server.accepts(), keys.len());
    assert_eq!(peers.pooled().len(), 4);
    assert_eq!(apps.pooled().len(), 1);
}

#[tokio::test]
async fn a_connection_the_peer_closes_leaves_the_pool_without_a_new_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::serve(
        listener,
        Arc::new(|_| {
            Response::builder()
                .header(http::header::CONNECTION, "close")
                .body(body::full("bye"))
                .unwrap()
        }),
    );
    let (clients, _) = clients(Direction::Inbound, Duration::from_secs(60));
    timeout(BOUND, get(&clients, server.addr, Protocol::Http1))
        .await
        .unwrap()
        .unwrap();
    // Nothing to await in the pool itself: poll it, within the bound.
    timeout(BOUND, async {
        while !clients.pooled().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the closed connection stayed in the pool");
}
