//! The mesh CA in a real controller over a real etcd: `ferrule identity init` makes the files,
//! `ferrule identity token create` a join token, and a CSR sent with it comes back signed for
//! the identity the token proves, never another; renewals need the current certificate and the
//! same key; bad input of every kind is refused with a clear status and leaves the controller
//! serving; changed files are reloaded, broken ones are not and say so. `ferrule identity
//! status` lists each proxy's certificate and follows its renewals.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::identity_mesh::{IdentityMesh, init_ca};
use ferrule_harness::{ANY_PORT, Controller, Etcd, binary, eventually, output};
use ferrule_proto::identity::identity_of_certificate;
use ferrule_proto::v1::{
    CertifyRequest, CertifyResponse, IdentityStatusRequest, WatchTrustBundleRequest,
    identity_client::IdentityClient,
};
use futures::StreamExt;
use rcgen::{CertificateParams, KeyPair};
use tonic::Code;
use tonic::transport::Channel;

fn cli(controller: &Controller) -> Result<std::process::Command> {
    controller.cli()
}

async fn run(cmd: std::process::Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = output(cmd).await?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

async fn ca_controller(etcd: &Etcd, dir: &Path) -> Result<Controller> {
    Controller::start_with(
        &etcd.url(),
        ANY_PORT.parse()?,
        &[
            "--identity-dir",
            dir.to_str().context("utf-8 path")?,
            "--identity-check-interval",
            "100ms",
        ],
    )
    .await
}

async fn token(controller: &Controller, service: &str, ttl: &str) -> Result<String> {
    let mut cmd = cli(controller)?;
    cmd.args([
        "identity",
        "token",
        "create",
        "--service",
        service,
        "-n",
        "shop",
        "--ttl",
        ttl,
    ]);
    Ok(run(cmd).await?.trim().to_string())
}

fn csr(key: &KeyPair, names: &[&str]) -> Vec<u8> {
    CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

async fn client(controller: &Controller) -> Result<IdentityClient<Channel>> {
    Ok(IdentityClient::new(controller.channel().await?))
}

async fn certify(
    controller: &Controller,
    req: CertifyRequest,
) -> Result<CertifyResponse, tonic::Status> {
    let mut client = client(controller)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    client.certify(req).await.map(|r| r.into_inner())
}

const USER: &str = "spiffe://cluster.local/ns/shop/sa/user";

#[tokio::test]
async fn join_token_csr_and_renewal() -> Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    init_ca(dir.path()).await?;
    let controller = ca_controller(&etcd, dir.path()).await?;
    let token = token(&controller, "user", "1h").await?;
    assert!(token.starts_with("ferrule-join-"), "{token}");

    // The CSR asks for payment's DNS name; the certificate carries user's identity only.
    let key = KeyPair::generate()?;
    let rsp = certify(
        &controller,
        CertifyRequest {
            token: token.clone(),
            csr_der: csr(&key, &["payment.shop.svc"]),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(rsp.identity, USER);
    assert_eq!(
        identity_of_certificate(&rsp.leaf_certificate_der)
            .unwrap()
            .to_string(),
        USER
    );
    assert_eq!(rsp.trust_anchors_der.len(), 1);
    assert_eq!(rsp.intermediate_certificates_der.len(), 1);
    let lifetime = rsp.valid_until - unix_now();
    assert!(
        (23 * 3600..=24 * 3600 + 60).contains(&lifetime),
        "{lifetime}"
    );

    // Renewal: the current certificate and a CSR of the same key, no token.
    let renewed = certify(
        &controller,
        CertifyRequest {
            csr_der: csr(&key, &[]),
            current_certificate_der: rsp.leaf_certificate_der.clone(),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(renewed.identity, USER);
    // A copied certificate with another key proves nothing.
    let thief = KeyPair::generate()?;
    let err = certify(
        &controller,
        CertifyRequest {
            csr_der: csr(&thief, &[]),
            current_certificate_der: rsp.leaf_certificate_der.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("another key"), "{err}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_are_refused_and_the_ca_keeps_serving() -> Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    init_ca(dir.path()).await?;
    let controller = ca_controller(&etcd, dir.path()).await?;
    let token = token(&controller, "user", "1h").await?;
    let key = KeyPair::generate()?;
    let good_csr = csr(&key, &[]);

    let cases: Vec<(&str, CertifyRequest, Code, &str)> = vec![
        (
            "no credential",
            CertifyRequest {
                csr_der: good_csr.clone(),
                ..Default::default()
            },
            Code::Unauthenticated,
            "no credential",
        ),
        (
            "forged join token",
            CertifyRequest {
                token: format!("ferrule-join-{}", "ab".repeat(32)),
                csr_der: good_csr.clone(),
                ..Default::default()
            },
            Code::Unauthenticated,
            "unknown or expired",
        ),
        (
            "not a join token",
            CertifyRequest {
                token: "eyJhbGciOiJSUzI1NiJ9.e30.sig".into(),
                csr_der: good_csr.clone(),
                ..Default::default()
            },
            Code::Unauthenticated,
            "not a join token",
        ),
        (
            "asks for another identity",
            CertifyRequest {
                identity: "spiffe://cluster.local/ns/shop/sa/payment".into(),
                token: token.clone(),
                csr_der: good_csr.clone(),
                ..Default::default()
            },
            Code::PermissionDenied,
            "proves spiffe://cluster.local/ns/shop/sa/user",
        ),
        (
            "malformed CSR",
            CertifyRequest {
                token: token.clone(),
                csr_der: b"\x30\x03\x02\x01\x00".to_vec(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "malformed CSR",
        ),
        (
            "garbage as the current certificate",
            CertifyRequest {
                csr_der: good_csr.clone(),
                current_certificate_der: vec![0x30, 0x82, 0xff],
                ..Default::default()
            },
            Code::Unauthenticated,
            "renewal refused",
        ),
    ];
    for (what, req, code, message) in cases {
        let err = certify(&controller, req).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(err.message().contains(message), "{what}: {err}");
    }
    // Oversized: refused by the server before it is read as a CSR.
    let err = certify(
        &controller,
        CertifyRequest {
            token: token.clone(),
            csr_der: vec![0; 1 << 20],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "oversized: {err}"
    );
    // Still serving, and it counted what it refused.
    let rsp = certify(
        &controller,
        CertifyRequest {
            token,
            csr_der: good_csr,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(rsp.identity, USER);
    let metrics = admin_get(&controller, "/metrics").await?;
    assert!(
        metrics
            .contains("ferrule_controller_identity_requests_refused_total{reason=\"bad_token\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferrule_controller_identity_issuer_expiry_seconds"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn an_expired_join_token_is_refused() -> Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    init_ca(dir.path()).await?;
    let controller = ca_controller(&etcd, dir.path()).await?;
    let token = token(&controller, "user", "1s").await?;
    let key = KeyPair::generate()?;
    // Expiry is the passing of time itself: ask until the token stops working.
    let err = eventually(Duration::from_secs(10), "the 1 s token to expire", || {
        let req = CertifyRequest {
            token: token.clone(),
            csr_der: csr(&key, &[]),
            ..Default::default()
        };
        let controller = &controller;
        async move { certify(controller, req).await.err() }
    })
    .await?;
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    Ok(())
}

#[tokio::test]
async fn changed_files_are_reloaded_and_broken_ones_are_not() -> Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    init_ca(dir.path()).await?;
    let controller = ca_controller(&etcd, dir.path()).await?;
    let mut identity = client(&controller).await?;
    let before = identity
        .status(IdentityStatusRequest {})
        .await?
        .into_inner();
    assert!(before.enabled);
    let mut bundles = identity
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await?
        .into_inner();
    let first = next_bundle(&mut bundles).await?;
    assert_eq!(first.trust_anchors_der.len(), 1);

    // Issuer rotation: a new issuer from the same anchor, copied over the old one's files.
    let next = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new(binary("ferrule")?);
    cmd.args(["identity", "issuer", "--anchor-dir"])
        .arg(dir.path())
        .arg("--out-dir")
        .arg(next.path());
    run(cmd).await?;
    // Key first, then certificate: a reload in between sees a mismatch, refuses it, and picks
    // the pair up on the next check.
    std::fs::copy(
        next.path().join("issuer.key"),
        dir.path().join("issuer.key"),
    )?;
    std::fs::copy(
        next.path().join("issuer.pem"),
        dir.path().join("issuer.pem"),
    )?;
    let old_issuer = before.issuer.clone().context("issuer")?.fingerprint;
    eventually(
        Duration::from_secs(5),
        "the new issuer to be loaded",
        || async {
            let status = client(&controller)
                .await
                .ok()?
                .status(IdentityStatusRequest {})
                .await
                .ok()?;
            let status = status.into_inner();
            (status.issuer?.fingerprint != old_issuer && status.problem.is_empty()).then_some(())
        },
    )
    .await?;

    // A second anchor in the bundle reaches watchers without a restart.
    let other = tempfile::tempdir()?;
    init_ca(other.path()).await?;
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(dir.path().join("trust-anchors.pem"))?,
        std::fs::read_to_string(other.path().join("trust-anchors.pem"))?
    );
    std::fs::write(dir.path().join("trust-anchors.pem"), bundle)?;
    let second = next_bundle(&mut bundles).await?;
    assert_eq!(second.trust_anchors_der.len(), 2);

    // A broken issuer file: refused, counted, shown; the CA in use keeps signing.
    std::fs::write(dir.path().join("issuer.pem"), "not a certificate")?;
    let problem = eventually(
        Duration::from_secs(5),
        "the broken file to be reported",
        || async {
            let status = client(&controller)
                .await
                .ok()?
                .status(IdentityStatusRequest {})
                .await
                .ok()?;
            let problem = status.into_inner().problem;
            (!problem.is_empty()).then_some(problem)
        },
    )
    .await?;
    assert!(problem.contains("issuer certificate"), "{problem}");
    let metrics = admin_get(&controller, "/metrics").await?;
    assert!(
        !metrics.contains("ferrule_controller_identity_reload_failures_total 0"),
        "{metrics}"
    );
    let token = token(&controller, "user", "1h").await?;
    let rsp = certify(
        &controller,
        CertifyRequest {
            token,
            csr_der: csr(&KeyPair::generate()?, &[]),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(rsp.identity, USER);
    Ok(())
}

#[tokio::test]
async fn without_a_ca_nothing_is_signed_and_bad_files_stop_the_start() -> Result<()> {
    let etcd = Etcd::start().await?;
    let plain = Controller::start(&etcd.url()).await?;
    let err = certify(
        &plain,
        CertifyRequest {
            token: "ferrule-join-x".into(),
            csr_der: csr(&KeyPair::generate()?, &[]),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("--identity-dir"), "{err}");

    let empty = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new(binary("ferrule-controller")?);
    cmd.args([
        "--store",
        "memory",
        "--grpc-addr",
        ANY_PORT,
        "--admin-addr",
        ANY_PORT,
    ])
    .arg("--identity-dir")
    .arg(empty.path());
    let out = output(cmd).await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("trust-anchors.pem"), "{stderr}");
    Ok(())
}

async fn next_bundle(
    stream: &mut tonic::Streaming<ferrule_proto::v1::TrustBundle>,
) -> Result<ferrule_proto::v1::TrustBundle> {
    match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Ok(bundle))) => Ok(bundle),
        Ok(Some(Err(status))) => bail!("bundle stream failed: {status}"),
        Ok(None) => bail!("bundle stream ended"),
        Err(_) => bail!("no trust bundle within 5 s"),
    }
}

async fn admin_get(controller: &Controller, path: &str) -> Result<String> {
    let (_, body) = ferrule_harness::http_get(controller.admin, path).await?;
    Ok(body)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `ferrule identity status -o json` against `mesh`'s controller.
async fn status_json(mesh: &IdentityMesh) -> Result<serde_json::Value> {
    let out = mesh.ferrule(&["identity", "status", "-o", "json"]).await?;
    anyhow::ensure!(
        out.status.success(),
        "identity status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Each of `services`' certificate expiry as `identity status` lists it, once every one of
/// them shows its own identity, an expiry in the future, the current anchor and no problem
/// but "expires soon": the CA backdates `not_before` by a minute for clock skew, so a 6 s
/// leaf has less than 10 % of its nominal lifetime left from the start.
fn healthy_expiries(
    status: &serde_json::Value,
    services: &[&str],
) -> Option<BTreeMap<String, SystemTime>> {
    let anchor = status["trust_anchors"][0]["fingerprint"].as_str()?;
    let proxies = status["proxies"].as_array()?;
    let mut expiries = BTreeMap::new();
    for service in services {
        let proxy = proxies.iter().find(|p| p["service"] == *service)?;
        let identity = format!("spiffe://cluster.local/ns/default/sa/{service}");
        let not_after = humantime::parse_rfc3339(proxy["not_after"].as_str()?).ok()?;
        let healthy = proxy["identity"] == identity.as_str()
            && proxy["anchor_fingerprint"] == anchor
            && (proxy["problem"].is_null() || proxy["problem"] == "expires_soon")
            && not_after > SystemTime::now();
        if !healthy {
            return None;
        }
        expiries.insert(service.to_string(), not_after);
    }
    Some(expiries)
}

#[tokio::test]
async fn identity_status_shows_each_proxy_s_certificate_and_follows_renewals() -> Result<()> {
    // Leaves of 6 s: each proxy renews about every 4 s.
    let mesh = IdentityMesh::start_with(&["--identity-leaf-lifetime", "6s"]).await?;
    let web = HttpBackend::start("web-1").await?;
    let api = HttpBackend::start("api-1").await?;
    let _web_proxy = mesh
        .server("web", web.addr, &["--health-path", "/health"])
        .await?;
    let _api_proxy = mesh
        .server("api", api.addr, &["--health-path", "/health"])
        .await?;
    let services = ["api", "web"];

    // The last answer, to show when a wait fails.
    let last = std::sync::Mutex::new(serde_json::Value::Null);
    let seen = |status: serde_json::Value| {
        let expiries = healthy_expiries(&status, &services);
        *last.lock().unwrap() = status;
        expiries
    };
    let first = eventually(
        Duration::from_secs(20),
        "both proxies' certificates in identity status",
        || async { seen(status_json(&mesh).await.ok()?) },
    )
    .await
    .with_context(|| format!("last status: {:#}", last.lock().unwrap()))?;
    let status = status_json(&mesh).await?;
    assert_eq!(
        status["proxies"].as_array().map(Vec::len),
        Some(2),
        "{status:#}"
    );
    assert_eq!(
        status["trust_anchors"][0]["fingerprint"], status["issuer_anchor"],
        "{status:#}"
    );

    // Each renewal is announced again: the expiry shown moves forward.
    eventually(
        Duration::from_secs(20),
        "renewed certificates in identity status",
        || async {
            let now = seen(status_json(&mesh).await.ok()?)?;
            services.iter().all(|s| now[*s] > first[*s]).then_some(())
        },
    )
    .await
    .with_context(|| format!("first {first:?}, last status: {:#}", last.lock().unwrap()))?;

    // The dashboard's overview carries the same, judged against the same bundle.
    let overview: serde_json::Value =
        serde_json::from_str(&admin_get(&mesh.controller, "/api/v1/overview").await?)?;
    let anchor = &status["trust_anchors"][0]["fingerprint"];
    for service in services {
        let proxy = overview["proxies"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["service"] == service))
            .with_context(|| format!("{service} in the overview: {overview:#}"))?;
        let cert = &proxy["certificate"];
        assert_eq!(
            cert["identity"],
            format!("spiffe://cluster.local/ns/default/sa/{service}").as_str(),
            "{overview:#}"
        );
        assert_eq!(&cert["anchor_fingerprint"], anchor, "{overview:#}");
        assert!(
            cert["not_after"].as_i64() > Some(unix_now()),
            "{overview:#}"
        );
    }
    Ok(())
}
