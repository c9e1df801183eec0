//! Transparent mode with real iptables, in a network namespace the test creates and removes:
//! an app inside it dials addresses, not the proxy; a NAT rule redirects its TCP to the
//! sidecar's outbound listener (everything but the proxy's own UID, which runs as `nobody`),
//! and the sidecar sends each connection where its original destination says: an address the
//! mesh knows is its service's HTTP stack, any other address is passed through as plain TCP.
//! With a controller, an address no watch of the proxy knows is looked up there
//! (`Discovery/Lookup`). Needs root, iproute2, iptables and util-linux's setpriv.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::netns::{self, NetNs};
use ferrule_harness::{Controller, Proxy, binary};
use ferrule_proto::v1::registry_client::RegistryClient;
use ferrule_proto::v1::{Endpoint, RegisterRequest};

/// The UID the proxy runs as; the redirect skips its traffic, as the init rules will.
const PROXY_UID: &str = "65534";

/// `program args` inside `ns`: (success, stdout, stderr).
async fn in_namespace(ns: &NetNs, program: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let ran = netns::run_in(ns.name(), program, args).await?;
    Ok((ran.ok, ran.stdout, ran.stderr))
}

/// `curl` from inside the namespace: the response head and body.
async fn curl(ns: &NetNs, url: &str) -> Result<String> {
    netns::curl_in(ns.name(), &[url]).await
}

/// One series' value in the Prometheus text, 0 when absent.
fn series(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Starts a transparent sidecar inside `ns` as [`PROXY_UID`] with `args`, and redirects the
/// namespace's TCP (except the proxy's own and loopback's) to its outbound listener, as the
/// init container's rules will. Returns the proxy, its outbound listener, and the directory
/// holding its binary (kept for the proxy's life).
async fn transparent_sidecar(
    ns: &NetNs,
    args: Vec<String>,
) -> Result<(Proxy, SocketAddr, tempfile::TempDir)> {
    let bin_dir = tempfile::Builder::new()
        .prefix("ferrule-transparent-")
        .tempdir()?;
    let proxy_bin = netns::runnable_copy(bin_dir.path(), &binary("ferrule-proxy")?)?;
    let wrapper = [
        "ip",
        "netns",
        "exec",
        ns.name(),
        "setpriv",
        &format!("--reuid={PROXY_UID}"),
        &format!("--regid={PROXY_UID}"),
        "--clear-groups",
        "--",
    ];
    let proxy = Proxy::builder("transparent")
        .wrapped(wrapper, &proxy_bin)
        .admin_addr(SocketAddr::from((ns.ns_addr, 0)))
        .arg("--transparent")
        .args(args)
        .start()
        .await?;
    let outbound = proxy
        .outbound
        .context("the proxy reported no transparent outbound listener")?;

    // The app's TCP, except the proxy's own and loopback's, goes to the outbound listener.
    let port = outbound.port().to_string();
    let (ok, _, err) = in_namespace(
        ns,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-d",
            "127.0.0.0/8",
            "-m",
            "owner",
            "!",
            "--uid-owner",
            PROXY_UID,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ],
    )
    .await?;
    if !ok {
        bail!("adding the redirect rule failed (needs iptables and root): {err}");
    }
    Ok((proxy, outbound, bin_dir))
}

#[tokio::test]
async fn redirected_connections_reach_their_service_or_pass_through() -> Result<()> {
    let ns = NetNs::create()?;
    // Backends on the host end of the namespace's veth: reachable only from the namespace.
    let user = HttpBackend::start_on("user", SocketAddr::from((ns.host_addr, 0))).await?;
    let outside = HttpBackend::start_on("outside", SocketAddr::from((ns.host_addr, 0))).await?;
    let (proxy, outbound, _bin) =
        transparent_sidecar(&ns, vec![format!("--static-endpoint=user={}", user.addr)]).await?;

    // An address the mesh knows: through the user service's outbound HTTP stack.
    let reply = curl(&ns, &format!("http://{}/hello", user.addr)).await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("x-backend: user"), "{reply}");
    assert_eq!(user.requests(), 1);
    let metrics = proxy.metrics().await?;
    assert_eq!(
        series(
            &metrics,
            r#"request_total{direction="outbound",target_service="user",status_code="200""#
        ),
        1.0,
        "{metrics}"
    );

    // An address it does not know: copied as plain TCP to where it was going.
    let reply = curl(&ns, &format!("http://{}/hello", outside.addr)).await?;
    assert!(reply.contains("x-backend: outside"), "{reply}");
    assert_eq!(outside.requests(), 1);
    let metrics = proxy.metrics().await?;
    assert!(
        series(
            &metrics,
            r#"tcp_read_bytes_total{direction="outbound",target_service="(passthrough)"}"#
        ) > 0.0,
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"request_total{direction="outbound",target_service="(passthrough)""#),
        "passed-through traffic is not parsed as HTTP:\n{metrics}"
    );

    // A connection made to the outbound listener itself has no original destination: it is
    // closed, never forwarded to itself.
    let (ok, out, _) = in_namespace(
        &ns,
        "curl",
        &["-sS", "--max-time", "5", &format!("http://{outbound}/")],
    )
    .await?;
    assert!(
        !ok,
        "a direct connection to the outbound listener was answered: {out}"
    );
    assert_eq!(user.requests() + outside.requests(), 2);
    Ok(())
}

/// An address none of the proxy's watches knows is looked up on the controller: a registered
/// endpoint's address leads to its service (then discovered and balanced like any other);
/// what nobody registered passes through.
#[tokio::test]
async fn the_controller_maps_an_unwatched_address_to_its_service() -> Result<()> {
    let ns = NetNs::create()?;
    let payment = HttpBackend::start_on("payment", SocketAddr::from((ns.host_addr, 0))).await?;
    let outside = HttpBackend::start_on("outside", SocketAddr::from((ns.host_addr, 0))).await?;
    let controller = Controller::start_on("memory", SocketAddr::from((ns.host_addr, 0))).await?;
    let mut registry = RegistryClient::connect(controller.url()).await?;
    registry
        .register(RegisterRequest {
            endpoint: Some(Endpoint {
                service: "payment".into(),
                address: payment.addr.ip().to_string(),
                port: payment.addr.port().into(),
                weight: 1,
                ..Default::default()
            }),
            ttl_seconds: 60,
        })
        .await?;
    let (proxy, _, _bin) =
        transparent_sidecar(&ns, vec![format!("--controller={}", controller.url())]).await?;

    let reply = curl(&ns, &format!("http://{}/pay", payment.addr)).await?;
    assert!(reply.contains("x-backend: payment"), "{reply}");
    let reply = curl(&ns, &format!("http://{}/", outside.addr)).await?;
    assert!(reply.contains("x-backend: outside"), "{reply}");
    let metrics = proxy.metrics().await?;
    assert_eq!(
        series(
            &metrics,
            r#"request_total{direction="outbound",target_service="payment",status_code="200""#
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        series(
            &metrics,
            r#"tcp_read_bytes_total{direction="outbound",target_service="(passthrough)"}"#
        ) > 0.0,
        "{metrics}"
    );
    assert_eq!((payment.requests(), outside.requests()), (1, 1));
    Ok(())
}
