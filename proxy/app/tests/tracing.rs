//! Tracing through real proxies, in-process, exporting over real OTLP/gRPC to the in-memory
//! receiver of `ferrule-trace`: the client span of every attempt (a retry is a second one),
//! the server span of the peer proxy as their child, W3C and B3 callers keeping their trace,
//! a malformed `traceparent` starting a new trace (counted, request fine), and the live
//! sampling ratio on the admin listener.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrule_proxy::body::{self, BoxBody};
use ferrule_proxy::sidecar::Proxy;
use ferrule_trace::receiver::{Receiver, StoredSpan};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A backend answering 503 to its first `fail` requests, then 200; it records the
/// `traceparent` of every request.
#[derive(Clone)]
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Backend {
    async fn start(fail: usize) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let mut seen = seen.lock().unwrap();
                            seen.push(
                                req.headers()
                                    .get("traceparent")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string(),
                            );
                            let mut rsp = Response::new(body::full("ok"));
                            if seen.len() <= fail {
                                *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<Response<BoxBody>, Infallible>(rsp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn receiver() -> Receiver {
    Receiver::start(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        100,
    )
    .await
    .unwrap()
}

/// Waits until the receiver holds `n` spans of `trace`.
async fn spans(receiver: &Receiver, trace: &str, n: usize) -> Vec<StoredSpan> {
    let wait = async {
        loop {
            if let Some(spans) = receiver.store.trace(trace)
                && spans.len() >= n
            {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match tokio::time::timeout(TEST_TIMEOUT, wait).await {
        Ok(spans) => spans,
        Err(_) => panic!(
            "no {n} spans of trace {trace}; kept: {:#?}",
            receiver.store.list()
        ),
    }
}

async fn get(proxy: &Proxy, service: &str, headers: &[(&str, &str)]) -> StatusCode {
    let addr = proxy.addrs.upstream(service).expect("upstream listener");
    let mut req = Request::get("/items").header("host", service);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (parts, _) = http1(addr, req.body(body::empty()).unwrap()).await.unwrap();
    parts.status
}

fn otlp_flag(receiver: &Receiver) -> String {
    format!("--otlp-endpoint=http://{}", receiver.otlp)
}

#[tokio::test]
async fn a_retry_is_a_second_client_span_of_the_same_parent() {
    let receiver = receiver().await;
    let backend = Backend::start(1).await;
    let policy = resource(
        "ServicePolicy",
        "user",
        serde_json::json!({
            "service": "user",
            "retries": {
                "maxAttempts": 3,
                "retryOn": {"statusCodes": [503]},
                "backoff": {"base": "1ms", "max": "2ms"},
            },
            "circuitBreaker": {"consecutiveFailures": 0},
        }),
    );
    let proxy = policy_proxy(
        vec![("user", vec![plain_endpoint("user", backend.addr)])],
        vec![policy],
        &[&otlp_flag(&receiver)],
    )
    .await;
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let status = get(&proxy, "user", &[("traceparent", &traceparent)]).await;
    assert_eq!(status, StatusCode::OK, "the retry hid the 503");

    let spans = spans(&receiver, TRACE, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let (first, second) = (&spans[0], &spans[1]);
    for span in [first, second] {
        assert_eq!(span.kind, "client");
        assert_eq!(span.parent_span_id.as_deref(), Some(CALLER_SPAN));
        assert_eq!(span.attributes["ferrule.service"], "user");
        assert_eq!(span.attributes["http.request.method"], "GET");
        assert_eq!(
            span.attributes["ferrule.endpoint"],
            backend.addr.to_string()
        );
        assert_eq!(span.attributes["ferrule.breaker"], "admitted");
    }
    assert_eq!(first.attributes["ferrule.retry"], 0);
    assert_eq!(first.attributes["http.response.status_code"], 503);
    assert_eq!(first.status, "error");
    assert_eq!(second.attributes["ferrule.retry"], 1);
    assert_eq!(second.attributes["http.request.resend_count"], 1);
    assert_eq!(second.attributes["http.response.status_code"], 200);
    assert_eq!(second.status, "unset");
    // Each attempt carried its own span to the endpoint.
    let seen = backend.seen();
    assert_eq!(
        seen,
        vec![
            format!("00-{TRACE}-{}-01", first.span_id),
            format!("00-{TRACE}-{}-01", second.span_id),
        ]
    );
}

/// A client proxy and a server proxy in front of a backend, both exporting to `receiver`.
async fn pair(receiver: &Receiver) -> (Proxy, Proxy, Backend) {
    let backend = Backend::start(0).await;
    let server = server_proxy("user", backend.addr, &[&otlp_flag(receiver)]).await;
    let client = client_proxy(
        vec![("user", vec![meshed_endpoint("user", &server)])],
        &[&otlp_flag(receiver)],
    )
    .await;
    (client, server, backend)
}

/// The client span and the server span under it, checked, for a caller whose span is
/// `caller` in `trace`.
async fn hop(receiver: &Receiver, trace: &str, caller: &str) -> (StoredSpan, StoredSpan) {
    let spans = spans(receiver, trace, 2).await;
    let client = spans
        .iter()
        .find(|s| s.kind == "client")
        .expect("client span");
    let server = spans
        .iter()
        .find(|s| s.kind == "server")
        .expect("server span");
    assert_eq!(client.parent_span_id.as_deref(), Some(caller), "{spans:#?}");
    assert_eq!(
        server.parent_span_id.as_deref(),
        Some(client.span_id.as_str()),
        "{spans:#?}"
    );
    assert_eq!(server.attributes["ferrule.direction"], "inbound");
    assert_eq!(server.attributes["http.response.status_code"], 200);
    (client.clone(), server.clone())
}

#[tokio::test]
async fn w3c_and_b3_callers_keep_their_trace_across_a_hop() {
    let receiver = receiver().await;
    let (client, _server, backend) = pair(&receiver).await;

    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let status = get(&client, "user", &[("traceparent", &traceparent)]).await;
    assert_eq!(status, StatusCode::OK);
    let (_, server_span) = hop(&receiver, TRACE, CALLER_SPAN).await;
    // The app sees the server span as its parent.
    assert_eq!(
        backend.seen()[0],
        format!("00-{TRACE}-{}-01", server_span.span_id)
    );

    // B3, multi header, 64-bit trace id.
    let b3_trace = "a3ce929d0e0e4736";
    let status = get(
        &client,
        "user",
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", "1111111111111111"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    hop(
        &receiver,
        &format!("0000000000000000{b3_trace}"),
        "1111111111111111",
    )
    .await;

    // B3, single header.
    let b3_single = "80f198ee56343ba864fe8b2a57d3eff7";
    let status = get(
        &client,
        "user",
        &[("b3", &format!("{b3_single}-2222222222222222-1"))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    hop(&receiver, b3_single, "2222222222222222").await;
}

#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace_and_is_counted() {
    let receiver = receiver().await;
    let (client, _server, backend) = pair(&receiver).await;
    let status = get(&client, "user", &[("traceparent", "00-not-a-trace-01")]).await;
    assert_eq!(status, StatusCode::OK, "the request is never failed for it");
    let seen = backend.seen();
    let parent = ferrule_trace::context::parse_traceparent(&seen[0]).expect("a new, valid one");
    let trace = parent.trace_id.to_string();
    let spans = spans(&receiver, &trace, 2).await;
    let client_span = spans.iter().find(|s| s.kind == "client").unwrap();
    assert_eq!(client_span.parent_span_id, None, "a new trace starts here");
    let (_, metrics) = admin_get(&client, "/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"trace_context_malformed_total{header="traceparent"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_sampling_ratio_changes_live() {
    let receiver = receiver().await;
    let backend = Backend::start(0).await;
    let client = client_proxy(
        vec![("user", vec![plain_endpoint("user", backend.addr)])],
        &[&otlp_flag(&receiver), "--trace-sample-ratio=0"],
    )
    .await;
    assert_eq!(get(&client, "user", &[]).await, StatusCode::OK);
    // Unsampled: the next hop is told so.
    let unsampled = ferrule_trace::context::parse_traceparent(&backend.seen()[0]).unwrap();
    assert!(!unsampled.sampled);

    let admin = client.addrs.admin;
    let req = Request::post("/tracing?sample_ratio=1")
        .header("host", "admin")
        .body(body::empty())
        .unwrap();
    let (parts, body) = http1(admin, req).await.unwrap();
    assert_eq!(parts.status, StatusCode::OK, "{body:?}");
    let req = Request::post("/tracing?sample_ratio=2")
        .header("host", "admin")
        .body(body::empty())
        .unwrap();
    let (parts, _) = http1(admin, req).await.unwrap();
    assert_eq!(parts.status, StatusCode::BAD_REQUEST);

    assert_eq!(get(&client, "user", &[]).await, StatusCode::OK);
    let sampled = ferrule_trace::context::parse_traceparent(&backend.seen()[1]).unwrap();
    assert!(sampled.sampled);
    spans(&receiver, &sampled.trace_id.to_string(), 1).await;
    let (_, tracing) = admin_get(&client, "/tracing").await.unwrap();
    assert!(tracing.contains(r#""sample_ratio":1.0"#), "{tracing}");
}
