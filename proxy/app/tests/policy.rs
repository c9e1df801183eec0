//! Policies applied on the outbound path, in-process: a client proxy with fixed discovery and a
//! fixed policy set, in front of backends on 127.0.0.1 that fail or stall on command. Covers
//! retries and their budget, non-idempotent methods, failure accrual (ejection, a single probe,
//! recovery), per-try and request timeouts, traffic split, fault injection, rate and
//! concurrency limits, the admin `/config` and `/metrics` views, and a new config version
//! from a real (in-process) `Config` server applying without touching requests in flight.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use ferrule_config::Resource;
use ferrule_proto::names::{ServiceRef, endpoint_key};
use ferrule_proxy::api::policy::PolicyClient;
use ferrule_proxy::body::{self, BoxBody};
use ferrule_proxy::discovery::Discovery;
use ferrule_proxy::sidecar::Proxy;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// A backend that names itself in `x-backend`, counts requests, fails the first
/// `fail_first` of every ten with 503 and waits `delay_ms` before answering.
#[derive(Clone)]
struct Backend {
    addr: SocketAddr,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    requests: AtomicU64,
    fail_first: AtomicU32,
    delay_ms: AtomicU64,
}

impl Backend {
    async fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(name, &state, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, state }
    }

    fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Fails `n` of every 10 requests (0 = none, 10 = all).
    fn fail(&self, n: u32) {
        self.state.fail_first.store(n, Ordering::SeqCst);
    }

    fn delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    fn endpoint(&self, service: &str) -> ferrule_proto::v1::Endpoint {
        plain_endpoint(service, self.addr)
    }
}

async fn handle(name: &str, state: &State, _req: Request<Incoming>) -> Response<BoxBody> {
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut rsp = Response::new(body::full(name.to_string()));
    if (n % 10) < u64::from(state.fail_first.load(Ordering::SeqCst)) {
        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    rsp.headers_mut().insert("x-backend", name.parse().unwrap());
    rsp
}

/// A client proxy for `services` under the policy `resources`.
async fn proxy(
    services: Vec<(&str, Vec<ferrule_proto::v1::Endpoint>)>,
    resources: Vec<Resource>,
) -> Proxy {
    policy_proxy(services, resources, &["--balancer=round-robin"]).await
}

/// Reuses one HTTP/1 connection to the proxy's upstream listener.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<BoxBody>,
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
}

impl Client {
    async fn connect(proxy: &Proxy, service: &str) -> Client {
        let addr = proxy.addrs.upstream(service).expect("upstream listener");
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    async fn send(&mut self, method: &str, path: &str) -> Reply {
        use http_body_util::BodyExt;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "svc")
            .body(body::full("payload"))
            .unwrap();
        self.sender.ready().await.unwrap();
        let rsp = self.sender.send_request(req).await.unwrap();
        let (parts, body) = rsp.into_parts();
        body.collect().await.unwrap();
        Reply {
            status: parts.status,
            headers: parts.headers,
        }
    }

    async fn get(&mut self) -> Reply {
        self.send("GET", "/").await
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test did not finish within its bound");
}

fn retry_policy(service: &str, extra: serde_json::Value) -> Resource {
    let mut spec = serde_json::json!({
        "service": service,
        "retries": {
            "maxAttempts": 3,
            "retryOn": {"statusCodes": [503]},
            "backoff": {"base": "1ms", "max": "2ms"},
        },
        "circuitBreaker": {"consecutiveFailures": 0},
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    resource("ServicePolicy", service, spec)
}

#[tokio::test]
async fn retries_hide_a_failing_endpoint_within_the_budget() {
    bounded(async {
        let backends = [
            Backend::start("a").await,
            Backend::start("b").await,
            Backend::start("c").await,
        ];
        backends[0].fail(3);
        let eps = backends.iter().map(|b| b.endpoint("user")).collect();
        let proxy = proxy(
            vec![("user", eps)],
            vec![retry_policy("user", serde_json::json!({}))],
        )
        .await;
        let mut client = Client::connect(&proxy, "user").await;
        let n: u32 = 600;
        let mut ok = 0;
        for _ in 0..n {
            ok += u32::from(client.get().await.status == StatusCode::OK);
        }
        assert_eq!(ok, n, "every request succeeds with retries");
        let load: u64 = backends.iter().map(Backend::requests).sum();
        assert!(load > u64::from(n), "some requests were retried");
        assert!(load as f64 <= 1.2 * f64::from(n), "backend load {load}");
        let (_, metrics) = admin_get(&proxy, "/metrics").await.unwrap();
        assert!(
            metrics.contains(r#"retries_total{target_service="user",reason="status 503"}"#),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn the_budget_caps_retries_when_everything_fails() {
    bounded(async {
        let backends = [Backend::start("a").await, Backend::start("b").await];
        for b in &backends {
            b.fail(3);
        }
        let eps = backends.iter().map(|b| b.endpoint("user")).collect();
        let budget = serde_json::json!({"retries": {
            "maxAttempts": 3,
            "retryOn": {"statusCodes": [503]},
            "backoff": {"base": "1ms", "max": "2ms"},
            "budget": {"ratio": 0.1, "minPerSecond": 1, "window": "10s"},
        }});
        let proxy = proxy(vec![("user", eps)], vec![retry_policy("user", budget)]).await;
        let mut client = Client::connect(&proxy, "user").await;
        let n: u32 = 500;
        let mut exhausted = 0;
        for _ in 0..n {
            let reply = client.get().await;
            exhausted += u32::from(reply.headers.get("ferrule-retry").is_some());
        }
        let load: u64 = backends.iter().map(Backend::requests).sum();
        let retries = load - u64::from(n);
        // ratio × requests + minPerSecond × window, over one window.
        assert!(retries <= 50 + 10, "{retries} retries for {n} requests");
        assert!(exhausted > 0, "refused retries are marked");
        let (_, metrics) = admin_get(&proxy, "/metrics").await.unwrap();
        assert!(
            metrics.contains(r#"retry_budget_exhausted_total{target_service="user"}"#),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn posts_are_retried_only_when_the_route_says_so() {
    bounded(async {
        let backend = Backend::start("a").await;
        backend.fail(10);
        let route = resource(
            "HTTPRoute",
            "user",
            serde_json::json!({"service": "user", "rules": [
                {"matches": [{"path": {"value": "/orders"}}],
                 "retries": {"nonIdempotent": true}},
            ]}),
        );
        let proxy = proxy(
            vec![("user", vec![backend.endpoint("user")])],
            vec![retry_policy("user", serde_json::json!({})), route],
        )
        .await;
        let mut client = Client::connect(&proxy, "user").await;
        let reply = client.send("POST", "/cart").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(backend.requests(), 1, "a POST is sent once");
        let reply = client.send("POST", "/orders").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            backend.requests(),
            4,
            "the route retries its POSTs, body replayed"
        );
    })
    .await;
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_probed_once_and_restored() {
    bounded(async {
        let good = Backend::start("good").await;
        let bad = Backend::start("bad").await;
        bad.fail(10);
        let breaker = resource(
            "ServicePolicy",
            "user",
            serde_json::json!({"service": "user",
                "retries": {"maxAttempts": 1},
                "circuitBreaker": {"consecutiveFailures": 3, "baseEjectionTime": "1s",
                                   "maxEjectionPercent": 50}}),
        );
        let proxy = proxy(
            vec![("user", vec![good.endpoint("user"), bad.endpoint("user")])],
            vec![breaker],
        )
        .await;
        let mut client = Client::connect(&proxy, "user").await;
        for _ in 0..20 {
            client.get().await;
        }
        assert_eq!(bad.requests(), 3, "ejected after 3 consecutive failures");
        let (_, metrics) = admin_get(&proxy, "/metrics").await.unwrap();
        let open = format!(
            r#"breaker_state{{target_service="user",endpoint="{}",state="open"}} 1"#,
            endpoint_key(&bad.endpoint("user"))
        );
        assert!(metrics.contains(&open), "{metrics}");

        // After the ejection time: one probe, which fails and ejects it again (for 2 s, which
        // the 20 requests below stay well inside even on a loaded machine).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for _ in 0..20 {
            client.get().await;
        }
        assert_eq!(bad.requests(), 4, "a single probe after the ejection time");

        // The next probe (after the doubled ejection) succeeds: back in service.
        bad.fail(0);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        for _ in 0..20 {
            assert_eq!(client.get().await.status, StatusCode::OK);
        }
        assert!(
            bad.requests() >= 4 + 5,
            "back in rotation: {}",
            bad.requests()
        );
    })
    .await;
}

#[tokio::test]
async fn a_per_try_timeout_cuts_a_slow_attempt_and_the_retry_succeeds() {
    bounded(async {
        let slow = Backend::start("slow").await;
        let fast = Backend::start("fast").await;
        slow.delay(Duration::from_secs(5));
        let eps = vec![slow.endpoint("user"), fast.endpoint("user")];
        let timeouts = serde_json::json!({"timeouts": {"request": "3s", "perTry": "200ms"}});
        let proxy = proxy(vec![("user", eps)], vec![retry_policy("user", timeouts)]).await;
        let mut client = Client::connect(&proxy, "user").await;
        for _ in 0..4 {
            let started = tokio::time::Instant::now();
            let reply = client.get().await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.headers["x-backend"], "fast");
            assert!(started.elapsed() < Duration::from_secs(2));
        }
        assert!(slow.requests() >= 1, "the slow endpoint was tried");
        let (_, metrics) = admin_get(&proxy, "/metrics").await.unwrap();
        assert!(
            metrics.contains(r#"timeouts_total{target_service="user",kind="per_try"}"#),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn the_request_timeout_answers_504() {
    bounded(async {
        let slow = Backend::start("slow").await;
        slow.delay(Duration::from_secs(5));
        let timeouts = serde_json::json!({"timeouts": {"request": "200ms"}});
        let proxy = proxy(
            vec![("user", vec![slow.endpoint("user")])],
            vec![retry_policy("user", timeouts)],
        )
        .await;
        let reply = Client::connect(&proxy, "user").await.get().await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(reply.headers["ferrule-error"], "timeout");
    })
    .await;
}

#[tokio::test]
async fn a_split_sends_each_backend_its_share_and_faults_show_up() {
    bounded(async {
        let v1 = Backend::start("v1").await;
        let v2 = Backend::start("v2").await;
        let route = resource(
            "HTTPRoute",
            "user",
            serde_json::json!({"service": "user", "rules": [
                {"matches": [{"path": {"value": "/chaos"}}],
                 "fault": {"abort": {"status": 500, "percent": 50}},
                 "responseHeaders": {"set": {"x-route": "chaos"}}},
                {"backends": [{"service": "user", "weight": 90},
                              {"service": "user-v2", "weight": 10}]},
            ]}),
        );
        let proxy = proxy(
            vec![
                ("user", vec![v1.endpoint("user")]),
                ("user-v2", vec![v2.endpoint("user-v2")]),
            ],
            vec![route],
        )
        .await;
        let mut client = Client::connect(&proxy, "user").await;
        let mut seen: HashMap<String, u32> = HashMap::new();
        for _ in 0..2000 {
            let reply = client.get().await;
            let backend = reply.headers["x-backend"].to_str().unwrap().to_string();
            *seen.entry(backend).or_default() += 1;
        }
        let share = f64::from(seen["v1"]) / 2000.0;
        assert!((0.87..=0.93).contains(&share), "{seen:?}");

        let mut aborted = 0;
        for _ in 0..1000 {
            let reply = client.send("GET", "/chaos").await;
            if reply.status == StatusCode::INTERNAL_SERVER_ERROR {
                assert_eq!(reply.headers["ferrule-error"], "fault_injected");
                aborted += 1;
            } else {
                assert_eq!(reply.headers["x-route"], "chaos");
            }
        }
        assert!((450..=550).contains(&aborted), "{aborted} of 1000 aborted");
        let (_, metrics) = admin_get(&proxy, "/metrics").await.unwrap();
        assert!(
            metrics.contains(&format!(
                r#"faults_total{{target_service="user",kind="abort"}} {aborted}"#
            )),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn limits_answer_429_and_503() {
    bounded(async {
        let backend = Backend::start("a").await;
        let slow = Backend::start("slow").await;
        slow.delay(Duration::from_millis(500));
        let limited = resource(
            "ServicePolicy",
            "user",
            serde_json::json!({"service": "user",
                               "rateLimit": {"requestsPerSecond": 1, "burst": 2}}),
        );
        let bounded_concurrency = resource(
            "ServicePolicy",
            "order",
            serde_json::json!({"service": "order",
                               "circuitBreaker": {"maxConcurrentRequests": 1, "maxPending": 0}}),
        );
        let proxy = proxy(
            vec![
                ("user", vec![backend.endpoint("user")]),
                ("order", vec![slow.endpoint("order")]),
            ],
            vec![limited, bounded_concurrency],
        )
        .await;
        let mut client = Client::connect(&proxy, "user").await;
        assert_eq!(client.get().await.status, StatusCode::OK);
        assert_eq!(client.get().await.status, StatusCode::OK);
        let reply = client.get().await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(reply.headers["ferrule-error"], "rate_limited");
        assert_eq!(reply.headers["retry-after"], "1");

        let mut first = Client::connect(&proxy, "order").await;
        let mut second = Client::connect(&proxy, "order").await;
        let (a, b) = tokio::join!(first.get(), async {
            // Once the first request reached the backend it holds the only slot for 500 ms.
            while slow.requests() == 0 {
                tokio::task::yield_now().await;
            }
            second.get().await
        });
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(b.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(b.headers["ferrule-error"], "overloaded");

        let (_, config) = admin_get(&proxy, "/config").await.unwrap();
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        assert_eq!(config["policy"]["version"], 42);
        let (_, metrics) = admin_get(&proxy, "/metrics").await.unwrap();
        assert!(metrics.contains("config_version 42"), "{metrics}");
    })
    .await;
}

/// A `Config` server that sends each proxy the snapshots the test pushes.
struct ConfigServer {
    snapshots: tokio::sync::watch::Receiver<Option<ferrule_proto::v1::ConfigSnapshot>>,
}

#[tonic::async_trait]
impl ferrule_proto::v1::config_server::Config for ConfigServer {
    type WatchStream = std::pin::Pin<
        Box<
            dyn futures::Stream<Item = Result<ferrule_proto::v1::ConfigSnapshot, tonic::Status>>
                + Send,
        >,
    >;

    async fn watch(
        &self,
        _request: tonic::Request<tonic::Streaming<ferrule_proto::v1::ConfigRequest>>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.snapshots.clone())
            .filter_map(|s| async move { s.map(Ok) });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

fn snapshot(version: i64, request_timeout: &str) -> ferrule_proto::v1::ConfigSnapshot {
    ferrule_proto::v1::ConfigSnapshot {
        version,
        resources: vec![ferrule_proto::v1::Resource {
            kind: "ServicePolicy".into(),
            namespace: "default".into(),
            name: "user".into(),
            spec_json: serde_json::json!({"service": "user",
                                          "timeouts": {"request": request_timeout}})
            .to_string(),
            revision: version,
        }],
        // The proxy subscribes to `user` (generation 1) as it pins its configured upstream.
        subscription: 1,
    }
}

async fn wait_config_version(proxy: &Proxy, version: i64) {
    loop {
        let (_, body) = admin_get(proxy, "/config").await.unwrap();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        if doc["policy"]["version"] == version {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_new_version_applies_to_new_requests_only() {
    bounded(async {
        let (push, snapshots) = tokio::sync::watch::channel(Some(snapshot(1, "5s")));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let controller = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ferrule_proto::v1::config_server::ConfigServer::new(
                    ConfigServer { snapshots },
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let slow = Backend::start("slow").await;
        slow.delay(Duration::from_millis(600));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let policies = PolicyClient::spawn(
            ferrule_proxy::control::Controllers::parse(&[controller]).unwrap(),
            ferrule_proto::v1::ProxyInfo {
                proxy_id: "client-1".into(),
                ..Default::default()
            },
            shutdown.clone(),
        );
        let args = ["--upstream=user=127.0.0.1:0", "--endpoint-wait=300ms"];
        let fixed = vec![(
            ServiceRef::parse("user").unwrap(),
            vec![slow.endpoint("user")],
        )];
        let proxy =
            Proxy::start_with_policies(config(&args), Discovery::fixed(fixed), Some(policies))
                .await
                .unwrap();
        wait_config_version(&proxy, 1).await;

        // A request under version 1 (5 s timeout) is in flight when version 2 (100 ms) lands.
        let mut old = Client::connect(&proxy, "user").await;
        let in_flight = tokio::spawn(async move { old.get().await.status });
        while slow.requests() == 0 {
            tokio::task::yield_now().await;
        }
        push.send_replace(Some(snapshot(2, "100ms")));
        wait_config_version(&proxy, 2).await;
        let reply = Client::connect(&proxy, "user").await.get().await;
        assert_eq!(
            reply.status,
            StatusCode::GATEWAY_TIMEOUT,
            "new requests get version 2"
        );
        assert_eq!(
            in_flight.await.unwrap(),
            StatusCode::OK,
            "the request in flight keeps version 1"
        );
        shutdown.cancel();
    })
    .await;
}
