//! The admin listener's one write, `POST /shutdown`, from a real peer that is not loopback: a
//! client inside a network namespace the test creates (and removes on drop), reaching a real
//! `ferrule-proxy` whose admin listener is bound on the host end of a veth pair. Needs root
//! and iproute2.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrule_harness::netns::NetNs;
use ferrule_harness::{Proxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.1 request, `Connection: close`, as raw bytes.
fn request(method: &str, path: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
}

/// The status code of a raw HTTP/1.1 response.
fn status_of(response: &str) -> Result<u16> {
    let line = response.lines().next().unwrap_or_default();
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))
}

/// Sends `method path` to `admin` from inside `ns` (bash's /dev/tcp: the namespace has no
/// other client to rely on); returns the status.
async fn from_namespace(ns: &NetNs, admin: SocketAddr, method: &str, path: &str) -> Result<u16> {
    const SCRIPT: &str = r#"exec 3<>"/dev/tcp/$1/$2" && printf '%s' "$3" >&3 && cat <&3"#;
    let mut cmd = ns.command("timeout");
    cmd.args(["10", "bash", "-c", SCRIPT, "client"])
        .args([admin.ip().to_string(), admin.port().to_string()])
        .arg(request(method, path));
    let out = ferrule_harness::output(cmd)
        .await
        .context("running the client in the namespace")?;
    if !out.status.success() {
        bail!(
            "client in {} failed ({}): {}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    status_of(&String::from_utf8_lossy(&out.stdout))
}

/// Sends `method path` to `admin` from a socket bound to 127.0.0.1; returns the status.
async fn from_loopback(admin: SocketAddr, method: &str, path: &str) -> Result<u16> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let mut stream = socket.connect(admin).await?;
        stream.write_all(request(method, path).as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        status_of(&String::from_utf8_lossy(&response))
    })
    .await
    .context("request from loopback timed out")?
}

#[tokio::test]
async fn shutdown_is_refused_from_a_peer_that_is_not_loopback() -> Result<()> {
    let ns = NetNs::create()?;
    let mut proxy = Proxy::builder("admin-netns")
        .admin_addr(SocketAddr::from((ns.host_addr, 0)))
        .start()
        .await?;
    let admin = proxy.admin;

    assert_eq!(
        from_namespace(&ns, admin, "POST", "/shutdown").await?,
        403,
        "peer {}",
        ns.ns_addr
    );
    assert!(proxy.process.running(), "log:\n{}", proxy.process.log());
    // Reading is anyone's: the same peer may check liveness.
    assert_eq!(from_namespace(&ns, admin, "GET", "/live").await?, 200);

    assert_eq!(from_loopback(admin, "POST", "/shutdown").await?, 200);
    eventually(Duration::from_secs(10), "the proxy to exit", || {
        let running = proxy.process.running();
        async move { (!running).then_some(()) }
    })
    .await
    .with_context(|| format!("log:\n{}", proxy.process.log()))?;
    Ok(())
}
