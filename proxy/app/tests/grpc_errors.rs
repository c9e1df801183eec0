//! Errors the proxy makes, as a real gRPC (tonic) client sees them: a gRPC status in a
//! trailers-only answer (no endpoints, a per-try timeout, an injected abort, a rate limit, a
//! peer proxy's own error), with `ferrule-error` in the metadata and the reason at the start
//! of the message — while a plain HTTP caller of the same service still gets the JSON body.

mod support;

use std::pin::Pin;
use std::time::Duration;

use ferrule_proto::v1::registry_client::RegistryClient;
use ferrule_proto::v1::registry_server::{Registry, RegistryServer};
use ferrule_proto::v1::{
    AnnounceProxyRequest, DeregisterRequest, DeregisterResponse, KeepAliveRequest,
    KeepAliveResponse, RegisterRequest, RegisterResponse,
};
use ferrule_proxy::body;
use ferrule_proxy::sidecar::Proxy;
use futures::Stream;
use support::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

/// Answers `register` after `ttl_seconds` seconds, and everything else at once.
struct Slow;

#[tonic::async_trait]
impl Registry for Slow {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let ttl_seconds = req.into_inner().ttl_seconds;
        tokio::time::sleep(Duration::from_secs(u64::from(ttl_seconds))).await;
        Ok(Response::new(RegisterResponse {
            lease_id: 1,
            ttl_seconds,
            revision: 1,
        }))
    }

    type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<KeepAliveResponse, Status>> + Send>>;

    async fn keep_alive(
        &self,
        _req: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn deregister(
        &self,
        _req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn announce_proxy(
        &self,
        _req: Request<AnnounceProxyRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(RegisterResponse::default()))
    }
}

async fn grpc_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServer::new(Slow))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn registry(proxy: &Proxy) -> anyhow::Result<RegistryClient<Channel>> {
    let url = format!("http://{}", proxy.addrs.upstream("registry").unwrap());
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    Ok(RegistryClient::new(channel))
}

/// `register` with the backend answering after `delay_secs`.
async fn register(
    client: &mut RegistryClient<Channel>,
    delay_secs: u32,
) -> Result<RegisterResponse, Status> {
    let req = RegisterRequest {
        endpoint: None,
        ttl_seconds: delay_secs,
    };
    client.register(req).await.map(Response::into_inner)
}

/// The `ferrule-error` of a status, after checking the message starts with it.
fn reason_of(status: &Status) -> String {
    let reason = status
        .metadata()
        .get("ferrule-error")
        .unwrap_or_else(|| panic!("no ferrule-error in {status:?}"))
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        status.message().starts_with(&format!("{reason}: ")),
        "{status:?}"
    );
    reason
}

async fn bounded<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, f).await?
}

#[tokio::test]
async fn no_endpoints_is_unavailable_for_grpc_and_json_for_http() -> anyhow::Result<()> {
    bounded(async {
        let proxy = client_proxy(vec![("registry", vec![])], &[]).await;
        let status = register(&mut registry(&proxy).await?, 0)
            .await
            .expect_err("no endpoint to call");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason_of(&status), "unknown_service");
        assert!(status.message().contains("registry"), "{status:?}");

        // A plain HTTP caller of the same service gets the JSON answer, as before.
        let req = http::Request::get("/")
            .header("host", "registry")
            .body(body::empty())?;
        let (parts, bytes) = http1(proxy.addrs.upstream("registry").unwrap(), req).await?;
        assert_eq!(parts.status, http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(parts.headers["ferrule-error"], "unknown_service");
        assert_eq!(parts.headers["content-type"], "application/json");
        assert!(!parts.headers.contains_key("grpc-status"));
        let json: serde_json::Value = serde_json::from_slice(&bytes)?;
        assert_eq!(json["reason"], "unknown_service");
        assert_eq!(json["service"], "registry");
        assert!(json["error"].as_str().unwrap().contains("registry"), "{json}");

        // Both counted as the same proxy error; the gRPC one as a failed 200.
        let (_, metrics) = admin_get(&proxy, "/metrics").await?;
        for series in [
            r#"proxy_errors_total{direction="outbound",reason="unknown_service"} 2"#,
            r#"request_total{direction="outbound",target_service="registry",status_code="200",classification="failure"} 1"#,
            r#"request_total{direction="outbound",target_service="registry",status_code="503",classification="failure"} 1"#,
        ] {
            assert!(metrics.contains(series), "{series} in\n{metrics}");
        }
        proxy.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_per_try_timeout_is_deadline_exceeded() -> anyhow::Result<()> {
    bounded(async {
        let app = grpc_backend().await;
        let policy = resource(
            "ServicePolicy",
            "registry",
            serde_json::json!({"service": "registry",
                               "timeouts": {"perTry": "200ms"},
                               "retries": {"maxAttempts": 2,
                                           "backoff": {"base": "1ms", "max": "2ms"}}}),
        );
        let eps = vec![plain_endpoint("registry", app)];
        let proxy = policy_proxy(vec![("registry", eps)], vec![policy], &[]).await;
        let mut client = registry(&proxy).await?;
        assert_eq!(register(&mut client, 0).await?.lease_id, 1);
        let started = tokio::time::Instant::now();
        let status = register(&mut client, 5).await.expect_err("too slow");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert_eq!(reason_of(&status), "timeout");
        assert!(status.message().contains("per-try timeout"), "{status:?}");
        proxy.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_abort_fault_answers_the_code_of_its_status() -> anyhow::Result<()> {
    bounded(async {
        let app = grpc_backend().await;
        let abort = |method: &str, status: u16| {
            serde_json::json!({
                "matches": [{"path": {"type": "Exact", "value": format!("/ferrule.v1.Registry/{method}")}}],
                "fault": {"abort": {"status": status, "percent": 100}},
            })
        };
        let route = resource(
            "HTTPRoute",
            "registry",
            serde_json::json!({"service": "registry", "rules": [
                abort("Deregister", 503),
                abort("AnnounceProxy", 500),
            ]}),
        );
        let eps = vec![plain_endpoint("registry", app)];
        let proxy = policy_proxy(vec![("registry", eps)], vec![route], &[]).await;
        let mut client = registry(&proxy).await?;
        assert_eq!(register(&mut client, 0).await?.lease_id, 1);

        // gRPC's mapping of an intermediary's HTTP status: 503 is UNAVAILABLE...
        let status = client
            .deregister(DeregisterRequest::default())
            .await
            .expect_err("aborted");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason_of(&status), "fault_injected");
        // ...and 500 is UNKNOWN.
        let status = client
            .announce_proxy(AnnounceProxyRequest::default())
            .await
            .expect_err("aborted");
        assert_eq!(status.code(), Code::Unknown, "{status:?}");
        assert_eq!(reason_of(&status), "fault_injected");
        proxy.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_rate_limit_is_resource_exhausted() -> anyhow::Result<()> {
    bounded(async {
        let app = grpc_backend().await;
        let policy = resource(
            "ServicePolicy",
            "registry",
            serde_json::json!({"service": "registry",
                               "rateLimit": {"requestsPerSecond": 1, "burst": 1}}),
        );
        let eps = vec![plain_endpoint("registry", app)];
        let proxy = policy_proxy(vec![("registry", eps)], vec![policy], &[]).await;
        let mut client = registry(&proxy).await?;
        assert_eq!(register(&mut client, 0).await?.lease_id, 1);
        let status = register(&mut client, 0).await.expect_err("limited");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason_of(&status), "rate_limited");
        assert!(status.message().ends_with("(retry after 1s)"), "{status:?}");
        assert_eq!(status.metadata().get("retry-after").unwrap(), "1");
        proxy.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_peer_proxys_error_is_a_status_and_an_endpoint_failure() -> anyhow::Result<()> {
    bounded(async {
        // The server proxy's app is not listening: its inbound side answers the error.
        let gone = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
        let server = server_proxy("registry", gone, &[]).await;
        let breaker = resource(
            "ServicePolicy",
            "registry",
            serde_json::json!({"service": "registry",
                               "retries": {"maxAttempts": 1},
                               "circuitBreaker": {"consecutiveFailures": 2,
                                                  "maxEjectionPercent": 100}}),
        );
        let eps = vec![meshed_endpoint("registry", &server)];
        let client = policy_proxy(vec![("registry", eps)], vec![breaker], &[]).await;
        let mut registry = registry(&client).await?;
        let status = register(&mut registry, 0).await.expect_err("no app");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason_of(&status), "upstream_connect_failure");

        // Each such answer (HTTP 200 to a gRPC caller) is a failure of the endpoint: the
        // second in a row ejects it, and the client proxy answers for itself.
        let status = register(&mut registry, 0).await.expect_err("no app");
        assert_eq!(reason_of(&status), "upstream_connect_failure");
        let status = register(&mut registry, 0).await.expect_err("ejected");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason_of(&status), "breaker_open");
        client.shutdown().await;
        server.shutdown().await;
        Ok(())
    })
    .await
}
