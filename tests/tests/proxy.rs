//! The sidecar proxy end to end: real controller on a real etcd, real proxy processes, real
//! backends on loopback. A client proxy (explicit mode: one local listener per upstream) sends
//! to server proxies that registered their apps; everything the "done when" lists.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ferrule_harness::backend::echo::echo_client::EchoClient;
use ferrule_harness::backend::echo::{EchoMessage, EchoRequestCount};
use ferrule_harness::backend::{GrpcBackend, HttpBackend, TcpEcho};
use ferrule_harness::{Controller, Etcd, Proxy, eventually, get, http1, http2, on_chosen_ports};
use futures::StreamExt;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server-side sidecar registering `app` as `service`.
async fn server_proxy(
    controller: &Controller,
    service: &str,
    app: SocketAddr,
    extra: &[&str],
) -> Result<Proxy> {
    Proxy::builder(&format!("{service}-proxy"))
        .args([
            "--controller",
            &controller.grpc.to_string(),
            "--service",
            service,
        ])
        .args(["--app-addr", &app.to_string()])
        .args(["--register-ttl", "3s", "--health-interval", "200ms"])
        .args(extra.iter().copied())
        .start()
        .await
}

/// A client-side sidecar with one local listener per upstream; returns it and the listeners.
async fn client_proxy(
    controller: &Controller,
    upstreams: &[&str],
    extra: &[&str],
) -> Result<(Proxy, BTreeMap<String, SocketAddr>)> {
    let mut builder = Proxy::builder("client-proxy")
        .args(["--controller", &controller.grpc.to_string()])
        .args(["--endpoint-wait", "1s"])
        .args(extra.iter().copied());
    for up in upstreams {
        builder = builder.upstream(up);
    }
    let proxy = builder.start().await?;
    let listeners = proxy.upstreams.clone();
    Ok((proxy, listeners))
}

/// Waits until `service` has `n` registered endpoints.
async fn wait_endpoints(controller: &Controller, service: &str, n: usize) -> Result<()> {
    use ferrule_proto::v1::{ListEndpointsRequest, admin_client::AdminClient};
    let url = controller.url();
    eventually(
        Duration::from_secs(10),
        &format!("{n} endpoints of {service}"),
        || {
            let url = url.clone();
            async move {
                let mut admin = AdminClient::connect(url).await.ok()?;
                let resp = admin
                    .list_endpoints(ListEndpointsRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()?;
                (resp.into_inner().endpoints.len() == n).then_some(())
            }
        },
    )
    .await
}

#[tokio::test]
async fn protocols_through_a_proxy_pair() -> Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    let web = HttpBackend::start("web-1").await?;
    let grpc = GrpcBackend::start("echo-1").await?;
    let tcp = TcpEcho::start().await?;
    let _web_proxy =
        server_proxy(&controller, "web", web.addr, &["--health-path", "/health"]).await?;
    let _grpc_proxy = server_proxy(&controller, "echo", grpc.addr, &[]).await?;
    let tcp_port = tcp.addr.port().to_string();
    let _tcp_proxy =
        server_proxy(&controller, "raw", tcp.addr, &["--opaque-ports", &tcp_port]).await?;
    for svc in ["web", "echo", "raw"] {
        wait_endpoints(&controller, svc, 1).await?;
    }
    // `--opaque-ports` names the raw listener's port, so that one is chosen up front.
    let (client, up) = on_chosen_ports("client-proxy", |[raw_local]| {
        let controller = &controller;
        async move {
            let opaque = [
                "--upstream",
                &format!("raw={raw_local}"),
                "--opaque-ports",
                &raw_local.port().to_string(),
            ];
            client_proxy(controller, &["web", "echo"], &opaque).await
        }
    })
    .await?;
    let raw_local = up["raw"];
    client.wait_ready(Duration::from_secs(10)).await?;

    // HTTP/1.1 in, carried as h2 between the proxies, HTTP/1.1 again to the app.
    let reply = http1(up["web"], get("web", "/hello")).await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "web-1 GET /hello");
    assert_eq!(
        reply.header("x-backend-version"),
        Some("HTTP/1.1"),
        "the app sees HTTP/1.1"
    );

    // HTTP/2 (prior knowledge) in.
    let reply = http2(up["web"], get("web", "/h2")).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, "web-1 GET /h2"));

    // A large body streams through both proxies and back.
    let big = vec![b'x'; 8 * 1024 * 1024];
    let req = http::Request::post("http://web/upload")
        .header("host", "web")
        .body(Full::new(Bytes::from(big.clone())))?;
    let reply = http1(up["web"], req).await?;
    assert_eq!((reply.status, reply.body.len()), (200, big.len()));

    // gRPC: unary, server, client and bidi streaming.
    let mut echo = EchoClient::connect(format!("http://{}", up["echo"])).await?;
    let unary = echo
        .unary(EchoMessage {
            text: "hi".into(),
            server: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(
        (unary.text.as_str(), unary.server.as_str()),
        ("hi", "echo-1")
    );
    let status = echo
        .unary(EchoMessage {
            text: "fail".into(),
            server: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "grpc-status trailers pass through"
    );
    let texts: Vec<String> = echo
        .server_stream(EchoRequestCount {
            text: "s".into(),
            count: 5,
        })
        .await?
        .into_inner()
        .map(|m| m.map(|m| m.text))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    assert_eq!(texts, ["s 0", "s 1", "s 2", "s 3", "s 4"]);
    let joined = echo
        .client_stream(futures::stream::iter(["a", "b", "c"].map(|t| {
            EchoMessage {
                text: t.into(),
                server: String::new(),
            }
        })))
        .await?
        .into_inner();
    assert_eq!(joined.text, "a,b,c");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    for t in ["one", "two"] {
        tx.send(EchoMessage {
            text: t.into(),
            server: String::new(),
        })
        .await?;
        let m = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await?
            .context("bidi ended")??;
        assert_eq!(m.text, t, "each message echoed as it arrives");
    }
    drop(tx);

    // Upgrade (WebSocket-style): 101, then raw bytes both ways.
    let mut s = tokio::net::TcpStream::connect(up["web"]).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await?;
    let head = read_until(&mut s, b"\r\n\r\n").await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"ping");

    // Opaque TCP with half-close: the echo answers, then closes after our FIN.
    let mut s = tokio::net::TcpStream::connect(raw_local).await?;
    s.write_all(b"raw bytes").await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    assert_eq!(out, b"raw bytes");
    Ok(())
}

async fn read_until(s: &mut tokio::net::TcpStream, end: &[u8]) -> Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(end) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await??;
        if n == 0 {
            bail!("closed after {:?}", String::from_utf8_lossy(&buf));
        }
        buf.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Three backends all receive traffic; a slow one receives less under P2C over peak-EWMA; a
/// killed backend's proxy gets no new requests within a second, and a gracefully shut down one
/// costs the client no failed request.
#[tokio::test]
async fn balancing_and_endpoint_churn() -> Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    let backends = [
        HttpBackend::start("b1").await?,
        HttpBackend::start("b2").await?,
        HttpBackend::start("b3").await?,
    ];
    let mut proxies = Vec::new();
    for b in &backends {
        proxies
            .push(server_proxy(&controller, "web", b.addr, &["--health-path", "/health"]).await?);
    }
    wait_endpoints(&controller, "web", 3).await?;
    let (client, up) = client_proxy(&controller, &["web"], &[]).await?;
    client.wait_ready(Duration::from_secs(10)).await?;
    let web = up["web"];

    backends[2].set_delay(Duration::from_millis(50));
    let total = 300;
    let mut tasks = Vec::new();
    // Four concurrent clients so the balancer has choices to make.
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / 4 {
                let r = http1(web, get("web", "/")).await?;
                anyhow::ensure!(r.status == 200, "{r:?}");
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let counts: Vec<u64> = backends.iter().map(HttpBackend::requests).collect();
    assert!(
        counts.iter().all(|&c| c > 0),
        "every backend gets traffic: {counts:?}"
    );
    assert!(
        counts[2] < counts[0] && counts[2] < counts[1],
        "the slow backend gets less: {counts:?}"
    );
    backends[2].set_delay(Duration::ZERO);

    // Graceful shutdown of b1's proxy while a client keeps sending: no failure.
    let stop = tokio::spawn(async move {
        let mut failures = 0;
        for _ in 0..200 {
            match http1(web, get("web", "/")).await {
                Ok(r) if r.status == 200 => {}
                _ => failures += 1,
            }
        }
        failures
    });
    let mut first = proxies.remove(0);
    first.process.terminate(Duration::from_secs(15)).await?;
    assert_eq!(
        stop.await?,
        0,
        "no failed idempotent request during a graceful shutdown"
    );
    let before = backends[0].requests();
    for _ in 0..30 {
        assert_eq!(http1(web, get("web", "/")).await?.status, 200);
    }
    assert_eq!(
        backends[0].requests(),
        before,
        "the stopped endpoint gets no new requests"
    );

    // A killed proxy (no deregistration): within a second the client stops sending to it.
    let mut second = proxies.remove(0);
    second.process.kill();
    let killed = std::time::Instant::now();
    let mut failed = 0;
    loop {
        if http1(web, get("web", "/"))
            .await
            .map(|r| r.status)
            .unwrap_or(0)
            != 200
        {
            failed += 1;
        }
        if killed.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    let before = backends[1].requests();
    for _ in 0..30 {
        assert_eq!(http1(web, get("web", "/")).await?.status, 200);
    }
    assert_eq!(
        backends[1].requests(),
        before,
        "the killed endpoint gets no new requests after 1s"
    );
    assert!(
        failed <= 2,
        "a connect failure takes the endpoint out at once ({failed} failed)"
    );
    Ok(())
}

/// With the controller gone, traffic keeps flowing on the last known endpoints.
#[tokio::test]
async fn controller_outage_keeps_traffic_flowing() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut controller = Controller::start(&etcd.url()).await?;
    let web = HttpBackend::start("w").await?;
    let _server = server_proxy(&controller, "web", web.addr, &["--health-path", "/health"]).await?;
    wait_endpoints(&controller, "web", 1).await?;
    let (client, up) = client_proxy(&controller, &["web"], &[]).await?;
    client.wait_ready(Duration::from_secs(10)).await?;
    assert_eq!(http1(up["web"], get("web", "/")).await?.status, 200);

    controller.process.kill();
    for _ in 0..50 {
        let r = http1(up["web"], get("web", "/")).await?;
        assert_eq!(r.status, 200, "{r:?}");
    }
    Ok(())
}

/// The proxy's own errors explain themselves; /metrics parses and counts what was sent.
#[tokio::test]
async fn errors_and_metrics() -> Result<()> {
    let controller = Controller::start("memory").await?;
    let web = HttpBackend::start("w").await?;
    let _server = server_proxy(&controller, "web", web.addr, &["--health-path", "/health"]).await?;
    wait_endpoints(&controller, "web", 1).await?;
    let (client, up) = client_proxy(&controller, &["web", "ghost"], &[]).await?;

    // Unknown service: 503 naming it.
    let reply = http1(up["ghost"], get("ghost", "/")).await?;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.header("ferrule-error").is_some(), "{reply:?}");
    assert!(reply.body.contains("ghost"), "{}", reply.body);

    // Malformed HTTP: 400 from the proxy.
    let mut s = tokio::net::TcpStream::connect(up["web"]).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n")
        .await?;
    let head = read_until(&mut s, b"\r\n").await?;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    let sent = 25;
    for _ in 0..sent {
        assert_eq!(http1(up["web"], get("web", "/")).await?.status, 200);
    }
    let text = client.metrics().await?;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape =
        prometheus_parse::Scrape::parse(lines).context("metrics parse as Prometheus text")?;
    let ok: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric.ends_with("request_total") || s.metric.ends_with("request"))
        .filter(|s| {
            s.labels.get("direction") == Some("outbound")
                && s.labels.get("status_code") == Some("200")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(
        ok as u64, sent,
        "outbound 200s counted exactly; metrics:\n{text}"
    );
    Ok(())
}
