//! Mutual TLS between real proxy processes, with certificates from a real controller's CA on a
//! real etcd: HTTP and opaque TCP between proxies are mutual TLS, the server app learns the
//! client's verified identity (and never a forged one), plaintext to an mTLS-only inbound
//! port is refused, and the connecting side refuses a peer whose certificate names another
//! identity than discovery announced. A client certificate of another CA, or an expired one,
//! is refused by the server.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrule_harness::backend::{HttpBackend, TcpEcho};
use ferrule_harness::identity_mesh::{IdentityMesh as Mesh, init_ca, metric};
use ferrule_harness::{ANY_PORT, Controller, Etcd, Proxy, eventually, http1};
use ferrule_proto::v1::{Endpoint, RegisterRequest, registry_client::RegistryClient};
use ferrule_proxy_transport::tls::{Credentials, MeshTls};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

#[tokio::test]
async fn http_and_tcp_between_proxies_are_mutual_tls() -> Result<()> {
    let mesh = Mesh::start().await?;
    let web = HttpBackend::start("web-1").await?;
    let tcp = TcpEcho::start().await?;
    let web_proxy = mesh
        .server("web", web.addr, &["--health-path", "/health"])
        .await?;
    let tcp_port = tcp.addr.port().to_string();
    let _raw_proxy = mesh
        .server("raw", tcp.addr, &["--opaque-ports", &tcp_port])
        .await?;
    mesh.wait_registered("web").await?;
    mesh.wait_registered("raw").await?;
    let client = mesh.client(&["web", "raw"], &[]).await?;

    // The app sees the client's verified identity; the value the client forged never arrives.
    let req = http::Request::get("http://web/who")
        .header(
            "ferrule-client-id",
            "spiffe://cluster.local/ns/default/sa/admin",
        )
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let reply = http1(client.upstreams["web"], req).await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-client-id"), Some(CLIENT_ID), "{reply:?}");

    // Opaque TCP through both proxies (the server proxy accepts nothing but mutual TLS).
    let mut conn = tokio::net::TcpStream::connect(client.upstreams["raw"]).await?;
    conn.write_all(b"ping over mtls").await?;
    conn.shutdown().await?;
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut echoed)).await??;
    assert_eq!(echoed, b"ping over mtls");

    // Plaintext straight to the mTLS-only inbound listener: closed without an answer.
    let inbound = web_proxy.inbound[""];
    let mut plain = tokio::net::TcpStream::connect(inbound).await?;
    plain
        .write_all(b"GET /who HTTP/1.1\r\nhost: web\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await?;
    assert!(
        read.is_err() || answer.is_empty(),
        "plaintext got an answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    let metrics = web_proxy.metrics().await?;
    assert!(
        metric(
            &metrics,
            "protocol_detect_total{direction=\"inbound\",result=\"tls\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "protocol_detect_total{direction=\"inbound\",result=\"plaintext_refused\"}"
        ) >= 1.0,
        "{metrics}"
    );
    let client_metrics = client.metrics().await?;
    assert!(
        metric(&client_metrics, "identity_certificates_renewed_total") >= 1.0,
        "{client_metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_peer_proving_another_identity_is_refused_by_the_connecting_proxy() -> Result<()> {
    let mesh = Mesh::start().await?;
    let web = HttpBackend::start("web-1").await?;
    let web_proxy = mesh
        .server("web", web.addr, &["--health-path", "/health"])
        .await?;
    mesh.wait_registered("web").await?;
    // Discovery says "payment" lives at web's inbound listener, with payment's identity: a
    // workload answering for another. Its certificate says web.
    // The admin may register any endpoint (a proxy only its own).
    let mut registry = RegistryClient::new(mesh.controller.channel().await?);
    let inbound = web_proxy.inbound[""];
    registry
        .register(RegisterRequest {
            endpoint: Some(Endpoint {
                service: "payment".into(),
                address: inbound.ip().to_string(),
                port: inbound.port().into(),
                identity: "spiffe://cluster.local/ns/default/sa/payment".into(),
                meshed: true,
                weight: 1,
                ..Default::default()
            }),
            ttl_seconds: 30,
        })
        .await?;
    let client = mesh.client(&["payment", "web"], &[]).await?;
    let reply = http1(
        client.upstreams["payment"],
        ferrule_harness::get("payment", "/pay"),
    )
    .await?;
    assert!(reply.status >= 500, "{reply:?}");
    let error = reply
        .header("ferrule-error")
        .unwrap_or_default()
        .to_string();
    assert!(
        ["upstream_connect_failure", "endpoints_unavailable"].contains(&error.as_str()),
        "{reply:?}"
    );
    assert_eq!(web.requests(), 0, "nothing reached the app");
    // The client proxy says why, naming both identities.
    let log = client.process.log();
    assert!(
        log.contains(&format!(
            "the peer is {WEB_ID}, discovery announced spiffe://cluster.local/ns/default/sa/payment"
        )),
        "{log}"
    );
    // The real web, whose certificate matches, works through the same client.
    let reply = http1(client.upstreams["web"], ferrule_harness::get("web", "/ok")).await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    Ok(())
}

#[tokio::test]
async fn foreign_and_expired_client_certificates_are_refused() -> Result<()> {
    let mesh = Mesh::start().await?;
    let web = HttpBackend::start("web-1").await?;
    let web_proxy = mesh
        .server("web", web.addr, &["--health-path", "/health"])
        .await?;
    mesh.wait_registered("web").await?;
    let inbound = web_proxy.inbound[""];
    let ours = load_ca(mesh.ca_dir.path())?;
    let foreign_dir = tempfile::tempdir()?;
    init_ca(foreign_dir.path()).await?;
    let foreign = load_ca(foreign_dir.path())?;
    // The test client trusts both anchors, so only the server's judgement decides.
    let anchors: Vec<CertificateDer<'static>> = ours
        .anchors()
        .iter()
        .chain(foreign.anchors())
        .cloned()
        .collect();
    let now = time::OffsetDateTime::now_utc();
    let day = Duration::from_secs(24 * 3600);

    let cases = [
        ("another CA's certificate", &foreign, now, day),
        (
            "an expired certificate",
            &ours,
            now - time::Duration::days(2),
            day,
        ),
    ];
    for (what, ca, issued_at, lifetime) in cases {
        let before = metric(
            &web_proxy.metrics().await?,
            "proxy_errors_total{direction=\"inbound\",reason=\"tls_handshake_failure\"}",
        );
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .der()
            .to_vec();
        let leaf = ca.sign(&csr, &CLIENT_ID.parse()?, lifetime, issued_at)?;
        let mut chain = vec![leaf];
        chain.extend(ca.chain().iter().cloned());
        let credentials = Credentials::new(chain, key.serialize_der(), &anchors)?;
        let (_tx, rx) = tokio::sync::watch::channel(Some(Arc::new(credentials)));
        let tls = MeshTls::new(rx);
        let tcp = tokio::net::TcpStream::connect(inbound).await?;
        let answered = async {
            let mut stream = tls.connect(tcp, &Arc::from(WEB_ID)).await?;
            stream
                .write_all(b"GET /who HTTP/1.1\r\nhost: web\r\n\r\n")
                .await?;
            let mut buf = vec![0; 1024];
            let n = stream.read(&mut buf).await?;
            anyhow::Ok(String::from_utf8_lossy(&buf[..n]).to_string())
        };
        match tokio::time::timeout(Duration::from_secs(5), answered).await? {
            Ok(text) if text.is_empty() => {}
            Ok(text) => bail!("{what}: the server answered: {text}"),
            Err(_) => {}
        }
        eventually(
            Duration::from_secs(5),
            &format!("{what} counted"),
            || async {
                let now = metric(
                    &web_proxy.metrics().await.ok()?,
                    "proxy_errors_total{direction=\"inbound\",reason=\"tls_handshake_failure\"}",
                );
                (now > before).then_some(())
            },
        )
        .await?;
    }
    assert_eq!(web.requests(), 0, "nothing reached the app");
    Ok(())
}

fn load_ca(dir: &Path) -> Result<ferrule_ca::Ca> {
    let read = |name: &str| std::fs::read(dir.join(name)).with_context(|| name.to_string());
    let key = String::from_utf8(read("issuer.key")?)?;
    Ok(ferrule_ca::Ca::from_pem(
        "cluster.local",
        &read("trust-anchors.pem")?,
        &read("issuer.pem")?,
        &key,
    )?)
}

/// The sum of the proxy's `metric` samples.
async fn proxy_metric(proxy: &Proxy, name: &str) -> Result<f64> {
    Ok(metric(&proxy.metrics().await?, name))
}

#[tokio::test]
async fn renewal_under_load_and_serving_on_while_the_ca_is_gone() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ca_dir = tempfile::tempdir()?;
    init_ca(ca_dir.path()).await?;
    // Leaves of 6 s: each proxy renews about every 4 s.
    let mut controller = Controller::start_with(
        &etcd.url(),
        ANY_PORT.parse()?,
        &[
            "--identity-dir",
            ca_dir.path().to_str().context("utf-8")?,
            "--identity-leaf-lifetime",
            "6s",
        ],
    )
    .await?;
    let mesh = Mesh {
        etcd,
        controller,
        ca_dir,
    };
    let web = HttpBackend::start("web-1").await?;
    let web_proxy = mesh
        .server("web", web.addr, &["--health-path", "/health"])
        .await?;
    mesh.wait_registered("web").await?;
    let client = mesh.client(&["web"], &[]).await?;

    // Continuous load until both proxies have renewed several times: no request may fail.
    let renewed = "identity_certificates_renewed_total";
    let mut sent = 0u32;
    let load = async {
        loop {
            let reply = http1(
                client.upstreams["web"],
                ferrule_harness::get("web", "/load"),
            )
            .await?;
            ensure_ok(&reply, sent)?;
            sent += 1;
            if proxy_metric(&client, renewed).await? >= 4.0
                && proxy_metric(&web_proxy, renewed).await? >= 4.0
            {
                return anyhow::Ok(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .context("four certificates each within 60 s")??;
    assert!(sent > 10, "only {sent} requests");

    // The CA goes away: traffic keeps flowing on the certificates the proxies hold, and the
    // failed renewals are counted and explained.
    controller = mesh.controller;
    controller.process.kill();
    let reply = http1(
        client.upstreams["web"],
        ferrule_harness::get("web", "/after"),
    )
    .await?;
    ensure_ok(&reply, sent)?;
    eventually(
        Duration::from_secs(15),
        "a counted renewal failure",
        || async {
            (proxy_metric(&client, "identity_renewal_failures_total")
                .await
                .ok()?
                >= 1.0)
                .then_some(())
        },
    )
    .await?;
    let log = client.process.log();
    assert!(
        log.contains(
            "certificate renewal failed; serving with the current certificate until it expires"
        ),
        "{log}"
    );
    Ok(())
}

fn ensure_ok(reply: &ferrule_harness::Reply, sent: u32) -> Result<()> {
    if reply.status != 200 {
        bail!("request {sent} failed: {reply:?}");
    }
    Ok(())
}
