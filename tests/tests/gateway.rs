//! Gateway mode end to end: a real controller (memory store), a backend behind a real
//! sidecar, and a real `ferrule-proxy gateway` process in front. Checks routing and prefix
//! rewriting, JWT (missing, tampered, expired, valid with the subject reaching the backend),
//! the rate limit's 429, the size limit's 413, CORS preflights, 404 and graceful shutdown.
//! Its files also read as `Gateway` specs with `ferrule-config`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use ferrule_harness::{
    ANY_PORT, Controller, Process, Proxy, Reply, binary, eventually, http_get, http1,
    on_chosen_ports,
};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const SECRET: &str = "gateway-test-secret";

/// An app that answers with what it received: method, path (with query), `x-user-id` and
/// the body's length, as JSON.
async fn start_app() -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let (parts, body) = req.into_parts();
                    let len = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(0);
                    let seen = json!({
                        "method": parts.method.as_str(),
                        "path": parts.uri.path_and_query().map_or("", |p| p.as_str()),
                        "user": parts.headers.get("x-user-id").and_then(|v| v.to_str().ok()),
                        "users": parts.headers.get_all("x-user-id").iter().count(),
                        "body_len": len,
                    });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen.to_string()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

const CONFIG: &str = r#"
maxRequestBytes: 1024
cors:
  allowOrigins: ["*"]
  allowMethods: [GET, POST, PUT, DELETE, OPTIONS]
  allowHeaders: [authorization, content-type]
  maxAge: 10m
jwt:
  subjectHeader: x-user-id
  providers:
    - name: shop
      issuer: ferrule-shop
      hs256SecretEnv: GATEWAY_TEST_JWT_SECRET
rateLimits:
  api: {requestsPerSecond: 10, burst: 10, key: client-ip}
routes:
  - name: login
    pathPrefix: /login
    service: user:http
    public: true
  - name: users
    pathPrefix: /api/users
    rewritePrefix: /users
    service: user:http
  - name: limited
    pathPrefix: /api/limited
    rewritePrefix: /
    service: user:http
    public: true
    rateLimit: api
"#;

struct Gateway {
    process: Process,
    listen: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Starts `ferrule-proxy gateway` with [`CONFIG`] and waits until it is ready.
///
/// The gateway does not report the ports it bound (it has no ready line yet), so they are
/// chosen up front, and chosen again if one was taken meanwhile.
async fn start_gateway(controller: &Controller) -> Result<Gateway> {
    on_chosen_ports("gateway", |[listen, admin]| async move {
        start_gateway_on(controller, listen, admin).await
    })
    .await
}

async fn start_gateway_on(
    controller: &Controller,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<Gateway> {
    let dir = tempfile::Builder::new()
        .prefix("ferrule-gateway-")
        .tempdir()?;
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, CONFIG)?;
    // Unique, so the admin port is known to be this gateway's and not another test's proxy.
    let proxy_id = format!("gateway-test-{}-{}", std::process::id(), admin.port());
    let mut cmd = Command::new(binary("ferrule-proxy")?);
    cmd.arg("gateway")
        .arg("--config")
        .arg(&config)
        .args(["--controller", &controller.grpc.to_string()])
        .args(["--listen", &listen.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--proxy-id", &proxy_id])
        .args([
            "--endpoint-wait",
            "2s",
            "--shutdown-grace",
            "5s",
            "--access-log",
        ])
        .env("GATEWAY_TEST_JWT_SECRET", SECRET)
        .env("RUST_LOG", "info,ferrule_proxy=debug");
    let process = Process::spawn("gateway", cmd, &dir.path().join("gateway.log"))?;
    let mut gateway = Gateway {
        process,
        listen,
        admin,
        _dir: dir,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if !gateway.process.running() {
            anyhow::bail!("the gateway exited; log:\n{}", gateway.process.log());
        }
        let ours = match http_get(admin, "/config").await {
            Ok((200, body)) => serde_json::from_str::<Value>(&body)
                .is_ok_and(|config| config["proxy_id"] == proxy_id.as_str()),
            _ => false,
        };
        if ours && matches!(http_get(admin, "/ready").await, Ok((200, _))) {
            return Ok(gateway);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the gateway was not ready within 20s; log:\n{}",
                gateway.process.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn token(claims: Value, secret: &str) -> Result<String> {
    Ok(encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// A request to the gateway with optional `Authorization` and extra headers.
async fn send(
    gw: &Gateway,
    method: &str,
    path: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "shop.example");
    if let Some(t) = auth {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    http1(gw.listen, req.body(Full::new(body))?).await
}

async fn get(gw: &Gateway, path: &str, auth: Option<&str>) -> Result<Reply> {
    send(gw, "GET", path, auth, &[], Bytes::new()).await
}

fn json_body(reply: &Reply) -> Result<Value> {
    serde_json::from_str(&reply.body).with_context(|| format!("not JSON: {reply:?}"))
}

#[tokio::test]
async fn gateway_routes_authenticates_and_limits() -> Result<()> {
    let controller = Controller::start("memory").await?;
    let (app, _app_task) = start_app().await?;
    let sidecar = Proxy::builder("user-proxy")
        .args([
            "--controller",
            &controller.grpc.to_string(),
            "--service",
            "user",
        ])
        .args(["--app-port", &format!("http={app}")])
        .args(["--register-ttl", "3s", "--health-interval", "200ms"])
        .start()
        .await?;
    sidecar.wait_ready(Duration::from_secs(20)).await?;
    let mut gw = start_gateway(&controller).await?;

    // A public route, forwarded as is once the sidecar's registration reached discovery.
    let login = eventually(
        Duration::from_secs(10),
        "the login route to answer 200",
        || async {
            get(&gw, "/login?next=%2F", None)
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await?;
    let seen = json_body(&login)?;
    assert_eq!(seen["path"], "/login?next=%2F");
    assert_eq!(seen["users"], 0, "no subject on a public route");

    // No route.
    let reply = get(&gw, "/nothing/here", None).await?;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(json_body(&reply)?["error"], "no route for /nothing/here");
    assert_eq!(reply.header("ferrule-error"), Some("no_route"));

    // JWT: missing, tampered, expired, wrong issuer, then valid.
    let reply = get(&gw, "/api/users/123", None).await?;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(json_body(&reply)?["error"], "missing authorization header");
    assert_eq!(reply.header("ferrule-error"), Some("unauthenticated"));

    let claims = |sub: &str, exp: i64, iss: &str| json!({"sub": sub, "exp": exp, "iss": iss});
    let valid = token(claims("123", now() + 300, "ferrule-shop"), SECRET)?;
    let forged = token(claims("admin", now() + 300, "ferrule-shop"), "guess")?;
    let mut tampered: Vec<&str> = valid.split('.').collect();
    tampered[1] = forged.split('.').nth(1).context("JWT payload")?;
    let tampered = tampered.join(".");
    for (bad, why) in [
        (tampered.as_str(), "invalid token: bad signature"),
        (
            &token(claims("123", now() - 600, "ferrule-shop"), SECRET)?,
            "invalid token: token expired",
        ),
        (
            &token(claims("123", now() + 300, "elsewhere"), SECRET)?,
            "invalid token: wrong issuer",
        ),
    ] {
        let reply = get(&gw, "/api/users/123", Some(bad)).await?;
        assert_eq!(reply.status, 401, "{why}: {reply:?}");
        assert_eq!(json_body(&reply)?["error"], why);
    }

    let reply = send(
        &gw,
        "GET",
        "/api/users/123",
        Some(&valid),
        &[("x-user-id", "admin")],
        Bytes::new(),
    )
    .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = json_body(&reply)?;
    assert_eq!(seen["path"], "/users/123", "prefix rewritten");
    assert_eq!(
        seen["user"], "123",
        "the verified subject, not the client's value"
    );
    assert_eq!(seen["users"], 1);

    // CORS preflight: answered by the gateway, no token needed.
    let reply = send(
        &gw,
        "OPTIONS",
        "/api/users/123",
        None,
        &[
            ("origin", "https://shop.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "authorization"),
        ],
        Bytes::new(),
    )
    .await?;
    assert!(reply.status == 200 || reply.status == 204, "{reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    assert_eq!(reply.header("access-control-max-age"), Some("600"));
    // And the CORS header is on the gateway's own errors too.
    let reply = send(
        &gw,
        "GET",
        "/api/users/1",
        None,
        &[("origin", "https://shop.example")],
        Bytes::new(),
    )
    .await?;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));

    // Size limit.
    let reply = send(
        &gw,
        "POST",
        "/login",
        None,
        &[],
        Bytes::from(vec![b'x'; 1025]),
    )
    .await?;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(json_body(&reply)?["error"], "Payload Too Large");
    let reply = send(
        &gw,
        "POST",
        "/login",
        None,
        &[],
        Bytes::from(vec![b'x'; 1024]),
    )
    .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(json_body(&reply)?["body_len"], 1024);

    // Rate limit: 10/s with a burst of 10; 11 requests sent at once, one is refused.
    let replies = futures::future::join_all((0..11).map(|i| {
        let gw = &gw;
        async move { get(gw, &format!("/api/limited/{i}"), None).await }
    }))
    .await;
    let replies = replies.into_iter().collect::<Result<Vec<_>>>()?;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!((ok, limited.len()), (10, 1), "{replies:?}");
    assert_eq!(limited[0].header("retry-after"), Some("1"));
    assert_eq!(json_body(limited[0])?["error"], "Too Many Requests");
    assert_eq!(limited[0].header("ferrule-error"), Some("rate_limited"));
    let seen = json_body(replies.iter().find(|r| r.status == 200).context("a 200")?)?;
    assert!(
        seen["path"]
            .as_str()
            .is_some_and(|p| !p.starts_with("/api")),
        "{seen}"
    );

    // Metrics: the gateway's own answers and the forwarded requests.
    let (status, metrics) = http_get(gw.admin, "/metrics").await?;
    assert_eq!(status, 200);
    for needle in [
        r#"request_total{direction="gateway",target_service="user:http",status_code="401""#,
        r#"request_total{direction="gateway",target_service="",status_code="404""#,
        r#"proxy_errors_total{direction="gateway",reason="rate_limited"} 1"#,
        r#"request_total{direction="outbound",target_service="user:http",status_code="200""#,
    ] {
        assert!(metrics.contains(needle), "{needle} not in:\n{metrics}");
    }
    let (status, config) = http_get(gw.admin, "/config").await?;
    assert_eq!(status, 200);
    let config: Value = serde_json::from_str(&config)?;
    assert_eq!(config["mode"], "gateway");
    assert_eq!(config["listeners"]["listen"], gw.listen.to_string());

    // Graceful shutdown on SIGTERM.
    let status = gw.process.terminate(Duration::from_secs(10)).await?;
    assert!(status.success(), "{status}; log:\n{}", gw.process.log());
    Ok(())
}

/// A file whose route names a rate limit that does not exist.
const BAD_CONFIG: &str = "routes:\n  - name: users\n    pathPrefix: /api/users\n    service: user:http\n    rateLimit: missing\n    public: true\n";

#[tokio::test]
async fn a_bad_config_is_refused_naming_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, BAD_CONFIG)?;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(binary("ferrule-proxy")?)
            .arg("gateway")
            .arg("--config")
            .arg(&config)
            .args(["--admin-addr", ANY_PORT])
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("routes[0].rateLimit") && stderr.contains("missing"),
        "{stderr}"
    );
    Ok(())
}

/// The files here are `Gateway` specs as `ferrule-config` reads them (the model a `Gateway`
/// resource shares with the file): [`CONFIG`] is valid, and [`BAD_CONFIG`] is refused on the
/// field the gateway names.
#[test]
fn the_files_are_gateway_specs() {
    let spec = ferrule_config::GatewaySpec::parse_file(CONFIG).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.routes.len(), 3);
    assert_eq!(spec.max_request_bytes(), 1024);
    let errors = ferrule_config::GatewaySpec::parse_file(BAD_CONFIG).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "routes[0].rateLimit: no rate limit named \"missing\" in rateLimits"
    );
}
