//! Traffic through an outbound → inbound proxy pair on loopback, with real sockets:
//! HTTP/1.1, HTTP/2, gRPC-style trailers and streaming, WebSocket upgrade, CONNECT, opaque TCP with
//! half-close, and the proxy's own error responses.

mod support;

use std::time::Duration;

use bytes::Bytes;
use ferrule_proxy::body;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn bounded<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .map_err(|_| anyhow::anyhow!("test did not finish within {TEST_TIMEOUT:?}"))?
}

#[tokio::test]
async fn http1_through_pair_is_carried_meshed_and_restored() -> anyhow::Result<()> {
    bounded(async {
        let app = http_backend().await;
        let server = server_proxy("user", app, &[]).await;
        let client =
            client_proxy(vec![("user", vec![meshed_endpoint("user", &server)])], &[]).await;
        let upstream = client.addrs.upstream("user").unwrap();

        let req = Request::post("/echo")
            .header("host", "user")
            .body(body::full("hello"))?;
        let (parts, bytes) = http1(upstream, req).await?;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(bytes, "hello");
        // The pair carried it over HTTP/2 but the app saw HTTP/1.1 and no mesh headers.
        assert_eq!(parts.headers["x-seen-version"], "HTTP/1.1");
        assert_eq!(parts.headers["x-seen-meshed"], "false");

        // A large body streams through both proxies intact.
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let req = Request::post("/big")
            .header("host", "user")
            .body(body::full(big.clone()))?;
        let (parts, bytes) = http1(upstream, req).await?;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(bytes.len(), big.len());
        assert!(bytes == big, "large body corrupted");

        client.shutdown().await;
        server.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn http2_trailers_and_bidi_streaming_through_pair() -> anyhow::Result<()> {
    bounded(async {
        let app = http_backend().await;
        let server = server_proxy("user", app, &[]).await;
        let client =
            client_proxy(vec![("user", vec![meshed_endpoint("user", &server)])], &[]).await;
        let mut h2 = h2_client(client.addrs.upstream("user").unwrap()).await?;

        // gRPC-style response: data frames then trailers.
        let req = Request::post("http://user/trailers")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body::empty())?;
        let rsp = h2.send_request(req).await?;
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["x-seen-version"], "HTTP/2.0");
        let collected = rsp.into_body().collect().await?;
        let trailers = collected.trailers().cloned().expect("trailers arrive");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "fine");
        assert_eq!(collected.to_bytes(), "one,two,three");

        // Bidi streaming: each message comes back before the next is sent, so nothing is
        // buffered until the end of the request.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, body::BoxError>>(1);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let req = Request::post("http://user/echo")
            .header("content-type", "application/grpc")
            .body(body::boxed(StreamBody::new(stream)))?;
        let rsp = h2.send_request(req).await?;
        let mut rsp_body = rsp.into_body();
        for i in 0..5 {
            let msg = format!("message-{i}");
            tx.send(Ok(Frame::data(Bytes::from(msg.clone())))).await?;
            let mut got = Vec::new();
            while got.len() < msg.len() {
                let frame = rsp_body.frame().await.expect("echo frame")?;
                got.extend_from_slice(&frame.into_data().expect("data frame"));
            }
            assert_eq!(got, msg.as_bytes());
        }
        drop(tx);
        assert!(rsp_body.frame().await.is_none_or(|f| f.is_ok()));

        client.shutdown().await;
        server.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn plain_endpoint_gets_the_clients_version() -> anyhow::Result<()> {
    bounded(async {
        let app = http_backend().await;
        let client = client_proxy(vec![("web", vec![plain_endpoint("web", app)])], &[]).await;
        let upstream = client.addrs.upstream("web").unwrap();
        let req = Request::get("/x")
            .header("host", "web")
            .body(body::empty())?;
        let (parts, _) = http1(upstream, req).await?;
        assert_eq!(parts.headers["x-seen-version"], "HTTP/1.1");
        assert_eq!(parts.headers["x-seen-path"], "/x");

        let mut h2 = h2_client(upstream).await?;
        let rsp = h2
            .send_request(Request::get("http://web/y").body(body::empty())?)
            .await?;
        assert_eq!(rsp.headers()["x-seen-version"], "HTTP/2.0");
        assert_eq!(rsp.version(), Version::HTTP_2);
        client.shutdown().await;
        Ok(())
    })
    .await
}

/// Sends `head`, checks the response status line starts with `expect`, then checks bytes
/// echo through the switched connection.
async fn switch_and_echo(
    addr: std::net::SocketAddr,
    head: &[u8],
    expect: &str,
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(head).await?;
    let mut rsp_head = Vec::new();
    while !rsp_head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        rsp_head.push(byte[0]);
    }
    let rsp_head = String::from_utf8(rsp_head)?;
    assert!(rsp_head.starts_with(expect), "{rsp_head}");
    for msg in [&b"ping"[..], b"a longer message"] {
        stream.write_all(msg).await?;
        let mut echo = vec![0u8; msg.len()];
        stream.read_exact(&mut echo).await?;
        assert_eq!(echo, msg);
    }
    Ok(())
}

#[tokio::test]
async fn websocket_upgrade_and_connect_through_pair() -> anyhow::Result<()> {
    bounded(async {
        let app = http_backend().await;
        let server = server_proxy("chat", app, &[]).await;
        let client =
            client_proxy(vec![("chat", vec![meshed_endpoint("chat", &server)])], &[]).await;
        let upstream = client.addrs.upstream("chat").unwrap();
        switch_and_echo(
            upstream,
            b"GET /ws HTTP/1.1\r\nhost: chat\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
            "HTTP/1.1 101",
        )
        .await?;
        switch_and_echo(
            upstream,
            b"CONNECT chat:443 HTTP/1.1\r\nhost: chat:443\r\n\r\n",
            "HTTP/1.1 200",
        )
        .await?;
        client.shutdown().await;
        server.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn opaque_tcp_with_half_close_through_pair() -> anyhow::Result<()> {
    bounded(async {
        let app = tcp_backend().await;
        let server = server_proxy("db", app, &["--detect-timeout=200ms"]).await;
        let client = client_proxy(vec![("db", vec![meshed_endpoint("db", &server)])], &[]).await;
        let mut stream = TcpStream::connect(client.addrs.upstream("db").unwrap()).await?;
        // Not HTTP: the first byte decides at once.
        let payload = b"\x00\x01binary payload";
        stream.write_all(payload).await?;
        stream.shutdown().await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        assert_eq!(answer, format!("got {} bytes", payload.len()));

        let (_, metrics) = admin_get(&client, "/metrics").await?;
        assert!(
            metrics.contains(r#"protocol_detect_total{direction="outbound",result="opaque"} 1"#),
            "{metrics}"
        );
        client.shutdown().await;
        server.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn opaque_port_skips_detection_for_server_first_protocols() -> anyhow::Result<()> {
    bounded(async {
        // A server that speaks first: the client waits for its greeting before sending.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let app = listener.local_addr()?;
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"220 hello\r\n").await;
            }
        });
        let opaque = format!("--opaque-ports={}", app.port());
        // A detection timeout far beyond the test bound: only skipping detection passes.
        let server = server_proxy("mail", app, &[&opaque, "--detect-timeout=1h"]).await;
        let upstream_port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let upstream = format!("--upstream=mail=127.0.0.1:{upstream_port}");
        let client_opaque = format!("--opaque-ports={upstream_port}");
        let client = ferrule_proxy::sidecar::Proxy::start(
            config(&[&upstream, &client_opaque, "--detect-timeout=1h"]),
            ferrule_proxy::discovery::Discovery::fixed(vec![(
                ferrule_proto::names::ServiceRef::parse("mail")?,
                vec![meshed_endpoint("mail", &server)],
            )]),
        )
        .await?;
        let mut stream = TcpStream::connect(client.addrs.upstream("mail").unwrap()).await?;
        let mut greeting = [0u8; 11];
        stream.read_exact(&mut greeting).await?;
        assert_eq!(&greeting, b"220 hello\r\n");
        drop(stream);
        client.shutdown().await;
        server.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn malformed_requests_get_400() -> anyhow::Result<()> {
    bounded(async {
        let app = http_backend().await;
        let client = client_proxy(vec![("web", vec![plain_endpoint("web", app)])], &[]).await;
        let upstream = client.addrs.upstream("web").unwrap();

        let answer = raw_exchange(upstream, b"GET /a b HTTP/1.1\r\nhost: web\r\n\r\n").await?;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("ferrule-error: bad_request"), "{answer}");

        // A valid request line with a broken header is refused by the HTTP parser.
        let answer = raw_exchange(upstream, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").await?;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        client.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unknown_service_gets_503_naming_it() -> anyhow::Result<()> {
    bounded(async {
        let client = client_proxy(vec![("ghost", vec![])], &[]).await;
        let req = Request::get("/")
            .header("host", "ghost")
            .body(body::empty())?;
        let (parts, bytes) = http1(client.addrs.upstream("ghost").unwrap(), req).await?;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(parts.headers["ferrule-error"], "unknown_service");
        let json: serde_json::Value = serde_json::from_slice(&bytes)?;
        assert_eq!(json["service"], "ghost");
        assert_eq!(json["reason"], "unknown_service");
        assert!(json["error"].as_str().unwrap().contains("ghost"));
        client.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unreachable_endpoint_gets_502_and_a_live_one_takes_over() -> anyhow::Result<()> {
    bounded(async {
        let dead = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        let client = client_proxy(vec![("gone", vec![plain_endpoint("gone", dead)])], &[]).await;
        let req = Request::get("/")
            .header("host", "gone")
            .body(body::empty())?;
        let (parts, bytes) = http1(client.addrs.upstream("gone").unwrap(), req).await?;
        assert!(
            parts.status == StatusCode::BAD_GATEWAY
                || parts.status == StatusCode::SERVICE_UNAVAILABLE,
            "{parts:?}"
        );
        assert!(parts.headers.contains_key("ferrule-error"));
        let json: serde_json::Value = serde_json::from_slice(&bytes)?;
        assert_eq!(json["service"], "gone");
        client.shutdown().await;

        // With one dead and one live endpoint, every request succeeds.
        let app = http_backend().await;
        let client = client_proxy(
            vec![(
                "mixed",
                vec![plain_endpoint("mixed", dead), plain_endpoint("mixed", app)],
            )],
            &[],
        )
        .await;
        for _ in 0..10 {
            let req = Request::get("/")
                .header("host", "mixed")
                .body(body::empty())?;
            let (parts, _) = http1(client.addrs.upstream("mixed").unwrap(), req).await?;
            assert_eq!(parts.status, StatusCode::OK);
        }
        client.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn shutdown_drains_and_stops() -> anyhow::Result<()> {
    bounded(async {
        let app = http_backend().await;
        let client = client_proxy(vec![("web", vec![plain_endpoint("web", app)])], &[]).await;
        let upstream = client.addrs.upstream("web").unwrap();
        let (status, _) = admin_get(&client, "/live").await?;
        assert_eq!(status, StatusCode::OK);
        let req = Request::post("/shutdown")
            .header("host", "admin")
            .body(body::empty())?;
        let (parts, _) = http1(client.addrs.admin, req).await?;
        assert_eq!(parts.status, StatusCode::OK);
        tokio::time::timeout(Duration::from_secs(10), client.wait())
            .await
            .map_err(|_| anyhow::anyhow!("proxy did not stop"))?;
        assert!(
            TcpStream::connect(upstream).await.is_err(),
            "listener still open"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() -> anyhow::Result<()> {
    bounded(async {
        let app = http_backend().await;
        let client = client_proxy(vec![("web", vec![plain_endpoint("web", app)])], &[]).await;
        let upstream = client.addrs.upstream("web").unwrap();
        let stream = TcpStream::connect(upstream).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, body::BoxError>>(1);
        let req = Request::post("/echo")
            .header("host", "web")
            .body(body::boxed(StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))?;
        tx.send(Ok(Frame::data(Bytes::from_static(b"first,"))))
            .await?;
        let rsp = sender.send_request(req).await?;
        let mut rsp_body = rsp.into_body();
        let first = rsp_body.frame().await.expect("first echo")?;
        assert_eq!(first.into_data().unwrap(), "first,");

        // The request is in flight: shut down, then finish it.
        let shutdown = client.shutdown_token();
        let stopped = tokio::spawn(client.wait());
        shutdown.cancel();
        tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await?;
        drop(tx);
        let rest = rsp_body.collect().await?.to_bytes();
        assert_eq!(rest, "second");
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .map_err(|_| anyhow::anyhow!("proxy did not stop after draining"))??;
        Ok(())
    })
    .await
}
