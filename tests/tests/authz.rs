//! `AuthorizationPolicy` end to end, with real proxies, real mutual TLS from a real
//! controller's CA and policies applied with `ferrule apply`: an allowed client gets through on
//! HTTP, gRPC and opaque TCP while another identity gets 403 `forbidden`, PERMISSION_DENIED
//! and a closed connection; audit mode lets it through and counts `would_deny`; a namespace's
//! `authenticated-only` default refuses a plaintext client; every change takes effect live,
//! without a restart. Bad policies are refused naming the field, with nothing stored.

use std::time::Duration;

use anyhow::{Context, Result};
use ferrule_harness::backend::echo::EchoMessage;
use ferrule_harness::backend::echo::echo_client::EchoClient;
use ferrule_harness::backend::{GrpcBackend, HttpBackend, TcpEcho};
use ferrule_harness::identity_mesh::{IdentityMesh, metric};
use ferrule_harness::{Proxy, Reply, eventually, get, http1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WAIT: Duration = Duration::from_secs(15);

/// A policy allowing only the `client` identity to call `service`, with `extra` spec lines.
fn only_client(service: &str, extra: &str) -> String {
    format!(
        "apiVersion: ferrule.io/v1
kind: AuthorizationPolicy
metadata:
  name: {service}-callers
spec:
  service: {service}
{extra}  from:
    identities: [\"{CLIENT_ID}\"]
"
    )
}

async fn apply(mesh: &IdentityMesh, dir: &tempfile::TempDir, yaml: &str) -> Result<()> {
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, yaml)?;
    let out = mesh
        .ferrule(&["apply", "-f", path.to_str().context("utf-8")?])
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// GET `path` on `service` through `proxy`.
async fn call(proxy: &Proxy, service: &str, path: &str) -> Result<Reply> {
    http1(proxy.upstream(service)?, get(service, path)).await
}

/// Waits until a GET through `proxy` answers `status` (a policy change has arrived).
async fn wait_status(proxy: &Proxy, service: &str, path: &str, status: u16) -> Result<Reply> {
    eventually(
        WAIT,
        &format!("{service}{path} answering {status}"),
        || async {
            call(proxy, service, path)
                .await
                .ok()
                .filter(|r| r.status == status)
        },
    )
    .await
}

async fn unary(proxy: &Proxy, text: &str) -> Result<Result<EchoMessage, tonic::Status>> {
    let mut echo = EchoClient::connect(format!("http://{}", proxy.upstream("echo")?)).await?;
    Ok(echo
        .unary(EchoMessage {
            text: text.into(),
            server: String::new(),
        })
        .await
        .map(tonic::Response::into_inner))
}

/// Sends `text` over opaque TCP through `proxy` to `raw`; what comes back before the close.
async fn tcp_echo(proxy: &Proxy, text: &[u8]) -> Result<Vec<u8>> {
    let mut conn = tokio::net::TcpStream::connect(proxy.upstream("raw")?).await?;
    // The peer may close before all is written: only what comes back matters.
    let _ = conn.write_all(text).await;
    let _ = conn.shutdown().await;
    let mut echoed = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut echoed)).await? {
        Ok(_) => Ok(echoed),
        // Reset by the peer: nothing came back.
        Err(_) => Ok(Vec::new()),
    }
}

fn decisions(metrics: &str, service: &str, decision: &str, reason: &str, mode: &str) -> f64 {
    metric(
        metrics,
        &format!(
            "authz_decisions_total{{target_service=\"{service}\",decision=\"{decision}\",reason=\"{reason}\",mode=\"{mode}\"}}"
        ),
    )
}

#[tokio::test]
async fn policies_allow_deny_and_audit_http_grpc_and_tcp_live() -> Result<()> {
    let mesh = IdentityMesh::start().await?;
    let dir = tempfile::tempdir()?;
    let web = HttpBackend::start("web-1").await?;
    let echo = GrpcBackend::start("echo-1").await?;
    let tcp = TcpEcho::start().await?;
    let web_proxy = mesh
        .server_accepting_plaintext("web", web.addr, &["--health-path", "/health"])
        .await?;
    let _echo_proxy = mesh.server("echo", echo.addr, &[]).await?;
    let tcp_port = tcp.addr.port().to_string();
    let raw_proxy = mesh
        .server("raw", tcp.addr, &["--opaque-ports", &tcp_port])
        .await?;
    for service in ["web", "echo", "raw"] {
        mesh.wait_registered(service).await?;
    }
    let upstreams = ["web", "echo", "raw"];
    let client = mesh.client(&upstreams, &[]).await?;
    let intruder = mesh.client_as("intruder", &upstreams, &[]).await?;

    // No policy: everyone is allowed, as before policies existed.
    assert_eq!(call(&intruder, "web", "/hello").await?.status, 200);
    assert_eq!(unary(&intruder, "hi").await??.text, "hi");
    assert_eq!(tcp_echo(&intruder, b"before").await?, b"before");

    // Only `client` may call each of them, applied while everything runs.
    let policies = ["web", "echo", "raw"]
        .map(|s| only_client(s, ""))
        .join("---\n");
    apply(&mesh, &dir, &policies).await?;
    let refused = wait_status(&intruder, "web", "/hello", 403).await?;

    // HTTP: 403 that explains itself, and the app never saw the request.
    assert_eq!(
        refused.header("ferrule-error"),
        Some("forbidden"),
        "{refused:?}"
    );
    let body: serde_json::Value = serde_json::from_str(&refused.body)?;
    assert_eq!(body["reason"], "forbidden", "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("identity_not_allowed")
            && error.contains("AuthorizationPolicy/default/web-callers")
            && error.contains("GET /hello"),
        "{body}"
    );
    let seen = web.requests();
    assert_eq!(call(&intruder, "web", "/again").await?.status, 403);
    assert_eq!(web.requests(), seen, "a refused request reached the app");
    let allowed = call(&client, "web", "/hello").await?;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(allowed.header("x-client-id"), Some(CLIENT_ID));

    // gRPC: PERMISSION_DENIED for the intruder, the call for the client.
    let status = eventually(WAIT, "echo refusing the intruder", || async {
        unary(&intruder, "hi").await.ok()?.err()
    })
    .await?;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("forbidden"), "{status:?}");
    assert_eq!(unary(&client, "hi").await??.text, "hi");

    // Opaque TCP: the intruder's connection is closed with nothing echoed; the client's works.
    eventually(WAIT, "raw closing the intruder's connection", || async {
        tcp_echo(&intruder, b"let me in")
            .await
            .ok()
            .filter(Vec::is_empty)
    })
    .await?;
    assert_eq!(tcp_echo(&client, b"ping").await?, b"ping");

    let web_metrics = web_proxy.metrics().await?;
    assert!(
        decisions(
            &web_metrics,
            "web",
            "deny",
            "identity_not_allowed",
            "enforce"
        ) >= 2.0,
        "{web_metrics}"
    );
    assert!(
        metric(
            &web_metrics,
            "proxy_errors_total{direction=\"inbound\",reason=\"forbidden\"}"
        ) >= 2.0,
        "{web_metrics}"
    );
    let raw_metrics = raw_proxy.metrics().await?;
    assert!(
        decisions(
            &raw_metrics,
            "raw",
            "deny",
            "identity_not_allowed",
            "enforce"
        ) >= 1.0,
        "{raw_metrics}"
    );

    // Audit mode: the intruder gets through again, and each would-be refusal is counted and
    // logged.
    apply(&mesh, &dir, &only_client("web", "  mode: audit\n")).await?;
    wait_status(&intruder, "web", "/audited", 200).await?;
    let before = decisions(
        &web_proxy.metrics().await?,
        "web",
        "would_deny",
        "identity_not_allowed",
        "audit",
    );
    assert!(before >= 1.0);
    assert_eq!(call(&intruder, "web", "/audited").await?.status, 200);
    let after = decisions(
        &web_proxy.metrics().await?,
        "web",
        "would_deny",
        "identity_not_allowed",
        "audit",
    );
    assert_eq!(after, before + 1.0);
    let log = web_proxy.process.log();
    assert!(
        log.contains("would_deny") && log.contains("spiffe://cluster.local/ns/default/sa/intruder"),
        "{log}"
    );

    // web's policy narrowed to /admin and the namespace made authenticated-only: a plaintext
    // client is refused as unauthenticated, any meshed one gets the rest, only `client`
    // gets /admin.
    let narrowed = only_client("web", "  to:\n    paths: [/admin]\n");
    let default = "apiVersion: ferrule.io/v1
kind: AuthorizationPolicy
metadata:
  name: default
spec:
  default: authenticated-only
";
    apply(&mesh, &dir, &format!("{narrowed}---\n{default}")).await?;
    let plaintext = web_proxy.inbound[""];
    let refused = eventually(WAIT, "plaintext refused", || async {
        http1(plaintext, get("web", "/hello"))
            .await
            .ok()
            .filter(|r| r.status == 403)
    })
    .await?;
    assert_eq!(refused.header("ferrule-error"), Some("forbidden"));
    assert!(refused.body.contains("unauthenticated"), "{refused:?}");
    assert_eq!(call(&intruder, "web", "/hello").await?.status, 200);
    assert_eq!(call(&intruder, "web", "/admin/users").await?.status, 403);
    assert_eq!(call(&client, "web", "/admin/users").await?.status, 200);
    assert!(
        decisions(
            &web_proxy.metrics().await?,
            "web",
            "deny",
            "unauthenticated",
            "enforce"
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn bad_policies_are_refused_naming_the_field_and_nothing_is_stored() -> Result<()> {
    let mesh = IdentityMesh::start().await?;
    let dir = tempfile::tempdir()?;
    apply(&mesh, &dir, &only_client("web", "")).await?;
    let stored = || async {
        let out = mesh.ferrule(&["get", "config", "-o", "json"]).await?;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        anyhow::Ok(doc)
    };
    let good = stored().await?;
    assert_eq!(
        good["resources"][0]["kind"], "AuthorizationPolicy",
        "{good}"
    );

    let cases = [
        (
            only_client("web", "  form: {}\n"),
            "spec.form: unknown field `form`",
        ),
        (
            only_client("web", "").replace(CLIENT_ID, "spiffe://cluster.local/ns/*/sa/x"),
            "spec.from.identities[0]",
        ),
        (
            only_client("web", "").replace(CLIENT_ID, "order"),
            "is not an identity pattern",
        ),
        (
            only_client("web", "  default: deny\n"),
            "spec.default: only a namespace's default policy",
        ),
        (
            only_client("web", "  to:\n    paths: [admin]\n"),
            "spec.to.paths[0]: path prefix \"admin\" must start with '/'",
        ),
    ];
    for (yaml, expected) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, &yaml)?;
        let out = mesh
            .ferrule(&["apply", "-f", path.to_str().context("utf-8")?])
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml} was accepted");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert_eq!(stored().await?, good, "something was stored for {yaml}");
    }

    // The Admin API itself (what the CLI calls) refuses the same, naming the resource.
    let mut admin =
        ferrule_proto::v1::admin_client::AdminClient::new(mesh.controller.channel().await?);
    let refused = admin
        .apply_config(ferrule_proto::v1::ApplyConfigRequest {
            resources: vec![ferrule_proto::v1::Resource {
                kind: "AuthorizationPolicy".into(),
                namespace: "default".into(),
                name: "web-callers".into(),
                spec_json: r#"{"service":"web","from":{"identities":["spiffe://td/ns/a/sa/*"]}}"#
                    .into(),
                revision: 0,
            }],
            dry_run: false,
        })
        .await
        .expect_err("a bad identity pattern was accepted");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("AuthorizationPolicy/default/web-callers")
            && refused.message().contains("spec.from.identities[0]"),
        "{refused:?}"
    );
    assert_eq!(stored().await?, good);

    // `ferrule get config` lists the kind, by any of its names.
    for kind in ["authorizationpolicies", "authz"] {
        let out = mesh.ferrule(&["get", "config", kind]).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains("AuthorizationPolicy")
                && text.contains("web-callers"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
