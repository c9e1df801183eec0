//! Kubernetes service-account tokens as bootstrap credentials: a real controller (mesh CA,
//! real etcd) checks them with a TokenReview against a stand-in API server speaking the real
//! JSON over HTTPS ([`KubeApi`]). A valid token gets a certificate for the service account
//! the API server names; a refused one, one of another audience, or garbage gets
//! UNAUTHENTICATED with the reason; an API server that is down, hung, or refuses the
//! controller gets UNAVAILABLE within a bound; and proxy processes bootstrapping from token
//! files, as injected pods do, get certificates and talk mutual TLS.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::identity_mesh::init_ca;
use ferrule_harness::{
    ANY_PORT, Controller, Etcd, KubeApi, Proxy, binary, eventually, http1, output, refusing_addr,
};
use ferrule_proto::identity::identity_of_certificate;
use ferrule_proto::v1::{CertifyRequest, CertifyResponse, identity_client::IdentityClient};
use rcgen::{CertificateParams, KeyPair};
use tonic::Code;

const USER: &str = "spiffe://cluster.local/ns/shop/sa/user";

/// A CA controller whose service-account tokens are checked at `kube` (with `extra` flags).
async fn controller(etcd: &Etcd, ca: &Path, kube: &[String], extra: &[&str]) -> Result<Controller> {
    let mut args: Vec<&str> = vec!["--identity-dir", ca.to_str().context("utf-8 path")?];
    args.extend(kube.iter().map(String::as_str));
    args.extend(extra);
    Controller::start_with(&etcd.url(), ANY_PORT.parse()?, &args).await
}

fn csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

async fn certify(
    controller: &Controller,
    token: &str,
    identity: &str,
) -> Result<CertifyResponse, tonic::Status> {
    let mut client = IdentityClient::new(
        controller
            .anonymous_channel()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?,
    );
    client
        .certify(CertifyRequest {
            token: token.to_string(),
            identity: identity.to_string(),
            csr_der: csr(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_valid_token_gets_its_service_account_s_identity() -> Result<()> {
    let etcd = Etcd::start().await?;
    let kube = KubeApi::start().await?;
    let ca = tempfile::tempdir()?;
    init_ca(ca.path()).await?;
    let controller = controller(&etcd, ca.path(), &kube.controller_args(), &[]).await?;

    let token = kube.issue("shop", "user", &["ferrule"]);
    let rsp = certify(&controller, &token, "").await?;
    assert_eq!(rsp.identity, USER);
    assert_eq!(
        identity_of_certificate(&rsp.leaf_certificate_der)
            .map_err(anyhow::Error::msg)?
            .to_string(),
        USER
    );
    // What reached the API server: a v1 TokenReview of that token for audience `ferrule`,
    // authenticated as the controller (the stand-in answers 401 otherwise).
    let reviews = kube.reviews();
    assert_eq!(reviews.len(), 1, "{reviews:?}");
    assert_eq!(reviews[0]["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(reviews[0]["kind"], "TokenReview");
    assert_eq!(reviews[0]["spec"]["token"], token.as_str());
    assert_eq!(
        reviews[0]["spec"]["audiences"],
        serde_json::json!(["ferrule"])
    );

    // Asking for the identity the token proves is fine; for another, refused.
    certify(&controller, &token, USER).await?;
    let err = certify(
        &controller,
        &token,
        "spiffe://cluster.local/ns/shop/sa/payment",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains(USER), "{err}");

    // Join tokens still work beside service-account tokens.
    let mut cmd = controller.cli()?;
    cmd.args([
        "identity",
        "token",
        "create",
        "--service",
        "payment",
        "-n",
        "shop",
    ]);
    let out = output(cmd).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let join = String::from_utf8(out.stdout)?.trim().to_string();
    let rsp = certify(&controller, &join, "").await?;
    assert_eq!(rsp.identity, "spiffe://cluster.local/ns/shop/sa/payment");
    assert_eq!(
        kube.reviews().len(),
        3,
        "a join token is never sent for review"
    );
    Ok(())
}

#[tokio::test]
async fn refused_tokens_are_unauthenticated_with_the_reason() -> Result<()> {
    let etcd = Etcd::start().await?;
    let kube = KubeApi::start().await?;
    let ca = tempfile::tempdir()?;
    init_ca(ca.path()).await?;
    let controller = controller(&etcd, ca.path(), &kube.controller_args(), &[]).await?;

    let unknown = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJmb3JnZWQifQ.Zm9yZ2Vk".to_string();
    let other_audience = kube.issue("shop", "user", &["vault"]);
    let revoked = kube.issue("shop", "user", &["ferrule"]);
    kube.revoke(&revoked);
    let cases = [
        ("unknown token", unknown, "invalid bearer token"),
        (
            "another audience",
            other_audience,
            "token audiences [\"vault\"]",
        ),
        ("revoked token", revoked, "invalid bearer token"),
    ];
    for (what, token, reason) in &cases {
        let err = certify(&controller, token, "").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err}");
        assert!(err.message().contains(reason), "{what}: {err}");
    }
    let sent = kube.reviews().len();
    assert_eq!(sent, cases.len());

    // Garbage is refused without a review, and never harms the controller.
    let huge = format!("{}.b.c", "a".repeat(20 * 1024));
    let garbage = [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "ferrule-joi-typo",
        "\u{0}\u{1}\u{7f}",
        "🦀.🦀.🦀",
        "a.b.c\n",
        huge.as_str(),
    ];
    for token in garbage {
        let err = certify(&controller, token, "").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err}");
    }
    assert_eq!(kube.reviews().len(), sent, "garbage was sent for review");

    // Still serving.
    let token = kube.issue("shop", "user", &["ferrule"]);
    assert_eq!(certify(&controller, &token, "").await?.identity, USER);
    let (_, metrics) = ferrule_harness::http_get(controller.admin, "/metrics").await?;
    assert!(
        metrics.contains(&format!(
            "ferrule_controller_identity_requests_refused_total{{reason=\"bad_token\"}} {}",
            cases.len() + garbage.len()
        )),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn an_api_server_down_hung_or_refusing_the_controller_is_unavailable() -> Result<()> {
    let etcd = Etcd::start().await?;
    let kube = KubeApi::start().await?;
    let ca = tempfile::tempdir()?;
    init_ca(ca.path()).await?;
    let token = kube.issue("shop", "user", &["ferrule"]);

    // Down: nothing listens at the address.
    let (_held, refusing) = refusing_addr()?;
    let mut down = kube.controller_args();
    down[1] = format!("https://{refusing}");
    let c = controller(&etcd, ca.path(), &down, &[]).await?;
    let err = certify(&c, &token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("connecting"), "{err}");
    drop(c);

    // The controller's own token is refused (401): its fault, not the proxy's.
    let wrong = tempfile::NamedTempFile::new()?;
    std::fs::write(wrong.path(), "eyJ.wrong.token")?;
    let mut args = kube.controller_args();
    args[3] = wrong.path().display().to_string();
    let c = controller(&etcd, ca.path(), &args, &[]).await?;
    let err = certify(&c, &token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("tokenreviews"), "{err}");
    drop(c);

    // Hung: answered UNAVAILABLE once the bound passes, not never.
    let c = controller(
        &etcd,
        ca.path(),
        &kube.controller_args(),
        &["--kubernetes-api-timeout", "1s"],
    )
    .await?;
    kube.stall();
    let started = Instant::now();
    let err = certify(&c, &token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("did not answer"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn bad_kubernetes_flags_stop_the_start() -> Result<()> {
    let ca = tempfile::tempdir()?;
    init_ca(ca.path()).await?;
    let start = |args: Vec<String>| async move {
        let mut cmd = std::process::Command::new(binary("ferrule-controller")?);
        cmd.args([
            "--store",
            "memory",
            "--grpc-addr",
            ANY_PORT,
            "--admin-addr",
            ANY_PORT,
        ])
        .args(args);
        let out = output(cmd).await?;
        anyhow::ensure!(!out.status.success(), "the controller started");
        anyhow::Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let stderr = start(vec![
        "--kubernetes-api".into(),
        "https://127.0.0.1:1".into(),
    ])
    .await?;
    assert!(stderr.contains("needs --identity-dir"), "{stderr}");
    let dir = ca.path().display().to_string();
    let stderr = start(vec![
        "--identity-dir".into(),
        dir.clone(),
        "--kubernetes-api".into(),
        "https://127.0.0.1:1".into(),
        "--kubernetes-ca-file".into(),
        "/nonexistent/ca.crt".into(),
    ])
    .await?;
    assert!(
        stderr.contains("--kubernetes-ca-file /nonexistent/ca.crt"),
        "{stderr}"
    );
    let stderr = start(vec![
        "--identity-dir".into(),
        dir,
        "--kubernetes-api".into(),
        "http://127.0.0.1:1".into(),
    ])
    .await?;
    assert!(stderr.contains("must be an https:// URL"), "{stderr}");
    Ok(())
}

/// Proxy processes bootstrapping from token files, as injected pods do (the injector mounts
/// the projected token and sets FERRULE_IDENTITY_TOKEN_FILE): certificates for their service
/// accounts, and mutual TLS between them.
#[tokio::test]
async fn proxies_bootstrap_from_service_account_token_files() -> Result<()> {
    let etcd = Etcd::start().await?;
    let kube = KubeApi::start().await?;
    let ca = tempfile::tempdir()?;
    init_ca(ca.path()).await?;
    let controller = controller(&etcd, ca.path(), &kube.controller_args(), &[]).await?;
    let tokens = tempfile::tempdir()?;
    let token_file = |sa: &str| -> Result<String> {
        let path = tokens.path().join(sa);
        std::fs::write(
            &path,
            format!("{}\n", kube.issue("default", sa, &["ferrule"])),
        )?;
        Ok(path.display().to_string())
    };

    let web = HttpBackend::start("web-1").await?;
    let server = Proxy::builder("web-proxy")
        .args(controller.proxy_args())
        .args(["--service", "web", "--app-addr", &web.addr.to_string()])
        .args(["--service-account", "web-sa", "--require-mtls"])
        .args(["--identity-token-file", &token_file("web-sa")?])
        .args(["--register-ttl", "3s", "--health-interval", "200ms"])
        .start()
        .await?;
    server.wait_ready(Duration::from_secs(15)).await?;
    let client = Proxy::builder("client-proxy")
        .args(controller.proxy_args())
        .args(["--endpoint-wait", "5s", "--service-account", "client"])
        .args(["--identity-token-file", &token_file("client")?])
        .upstream("web")
        .start()
        .await?;
    client.wait_ready(Duration::from_secs(15)).await?;
    assert_eq!(kube.reviews().len(), 2, "one review per proxy");

    // The server accepts only mutual TLS, the client accepts the server only as the identity
    // it registered (web-sa), and the app sees the client's verified identity.
    let web_up = client.upstream("web")?;
    let reply = eventually(
        Duration::from_secs(15),
        "a request through both proxies",
        || async {
            http1(web_up, ferrule_harness::get("web", "/who"))
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await?;
    assert_eq!(
        reply.header("x-client-id"),
        Some("spiffe://cluster.local/ns/default/sa/client"),
        "{reply:?}"
    );
    let metrics = client.metrics().await?;
    assert!(
        metrics.contains("identity_certificates_renewed_total 1"),
        "{metrics}"
    );
    Ok(())
}
