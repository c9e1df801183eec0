//! The controller's API, protected (issue #10, item 4), against a real controller that is the
//! mesh CA: its gRPC port speaks TLS with a certificate of its own; a caller without a
//! credential is UNAUTHENTICATED, a proxy may register only its own endpoints and leases
//! (PERMISSION_DENIED naming both otherwise), a certificate of another CA is refused by the TLS
//! handshake, the admin certificate and the admin token may do everything, a wrong token is
//! UNAUTHENTICATED; and the controller keeps serving after each refusal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrule_channel::{ControllerTls, StaticCert};
use ferrule_harness::identity_mesh::init_ca;
use ferrule_harness::{ANY_PORT, Controller, binary, output};
use ferrule_proto::v1::{
    CertifyRequest, CreateJoinTokenRequest, DeregisterRequest, Endpoint, ListEndpointsRequest,
    ListServicesRequest, RegisterRequest, WatchRequest, WatchTrustBundleRequest,
    admin_client::AdminClient, discovery_client::DiscoveryClient, identity_client::IdentityClient,
    registry_client::RegistryClient,
};
use rustls_pki_types::CertificateDer;
use tonic::Code;
use tonic::transport::{Channel, Endpoint as Target};

/// A controller that is a CA, with its API protected.
async fn protected(dir: &Path) -> Result<Controller> {
    init_ca(dir).await?;
    Controller::start_with(
        "memory",
        ANY_PORT.parse()?,
        &[
            "--identity-dir",
            dir.to_str().context("utf-8 path")?,
            "--api-auth",
            "required",
        ],
    )
    .await
}

fn target(controller: &Controller) -> Result<Target> {
    Ok(Target::from_shared(controller.url())?.connect_timeout(Duration::from_secs(5)))
}

/// TLS with the controller's anchors and `cert` presented.
async fn channel_as(
    controller: &Controller,
    cert: Option<Arc<rustls::sign::CertifiedKey>>,
) -> Result<Channel> {
    let dir = controller
        .identity_dir
        .as_ref()
        .context("a CA controller")?;
    let anchors = ferrule_channel::read_certificates(&dir.join("trust-anchors.pem"))?;
    let tls = ControllerTls::new(
        anchors,
        ferrule_proto::identity::controller_identity("cluster.local")?,
        Arc::new(StaticCert(cert)),
    )?;
    Ok(tls.connect(target(controller)?).await?)
}

/// A proxy's certificate for `service` (namespace default): a join token from the admin, a
/// CSR of a fresh key, the bootstrap Certify without any client certificate.
async fn proxy_cert(
    controller: &Controller,
    service: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let token = IdentityClient::new(controller.channel().await?)
        .create_join_token(CreateJoinTokenRequest {
            service: service.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec();
    let rsp = IdentityClient::new(controller.anonymous_channel().await?)
        .certify(CertifyRequest {
            token,
            csr_der: csr,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut chain = vec![CertificateDer::from(rsp.leaf_certificate_der)];
    chain.extend(
        rsp.intermediate_certificates_der
            .into_iter()
            .map(CertificateDer::from),
    );
    Ok(ferrule_channel::certified_key(chain, key.serialize_der())?)
}

fn endpoint(service: &str, port: u32) -> Endpoint {
    Endpoint {
        service: service.into(),
        address: "127.0.0.1".into(),
        port,
        ..Default::default()
    }
}

fn register(ep: Endpoint) -> RegisterRequest {
    RegisterRequest {
        endpoint: Some(ep),
        ttl_seconds: 30,
    }
}

/// The controller still answers its admin: nothing a refused caller sent harmed it.
async fn unharmed(controller: &Controller) -> Result<()> {
    AdminClient::new(controller.channel().await?)
        .list_services(ListServicesRequest {})
        .await
        .context("the controller stopped answering its admin")?;
    Ok(())
}

fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    what: &str,
) -> Result<tonic::Status> {
    match result {
        Err(status) if status.code() == code => Ok(status),
        other => bail!("{what}: expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn without_a_credential_only_the_bootstrap_is_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = protected(dir.path()).await?;

    let anonymous = controller.anonymous_channel().await?;
    let status = expect_code(
        AdminClient::new(anonymous.clone())
            .list_services(ListServicesRequest {})
            .await,
        Code::Unauthenticated,
        "Admin/ListServices without a credential",
    )?;
    assert!(status.message().contains("admin"), "{}", status.message());
    expect_code(
        RegistryClient::new(anonymous.clone())
            .register(register(endpoint("user", 9000)))
            .await,
        Code::Unauthenticated,
        "Registry/Register without a credential",
    )?;
    expect_code(
        DiscoveryClient::new(anonymous.clone())
            .watch(WatchRequest {
                service: "user".into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "Discovery/Watch without a credential",
    )?;
    expect_code(
        IdentityClient::new(anonymous.clone())
            .create_join_token(CreateJoinTokenRequest {
                service: "user".into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "Identity/CreateJoinToken without a credential",
    )?;
    // The bootstrap: the trust bundle, and Certify (which checks its own credential).
    let mut bundle = IdentityClient::new(anonymous.clone())
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), bundle.message())
        .await??
        .context("a trust bundle")?;
    assert_eq!(first.trust_anchors_der.len(), 1);
    let status = expect_code(
        IdentityClient::new(anonymous)
            .certify(CertifyRequest {
                token: "ferrule-join-nonsense".into(),
                csr_der: vec![1, 2, 3],
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "Certify with a made-up token",
    )?;
    assert!(
        status.message().contains("join token"),
        "{}",
        status.message()
    );

    // Plaintext is answered, with what to do, and allowed nothing.
    let plain = target(&controller)?.connect().await?;
    let status = expect_code(
        IdentityClient::new(plain)
            .certify(CertifyRequest::default())
            .await,
        Code::Unauthenticated,
        "Certify over plaintext",
    )?;
    assert!(
        status.message().contains("needs TLS"),
        "{}",
        status.message()
    );

    unharmed(&controller).await
}

#[tokio::test]
async fn a_proxy_registers_its_own_endpoints_and_leases_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = protected(dir.path()).await?;
    let user = channel_as(&controller, Some(proxy_cert(&controller, "user").await?)).await?;
    let mut registry = RegistryClient::new(user.clone());

    // Its own service: registered, announcing its own identity.
    let own = registry
        .register(register(Endpoint {
            identity: "spiffe://cluster.local/ns/default/sa/user".into(),
            meshed: true,
            ..endpoint("user", 9000)
        }))
        .await?
        .into_inner();
    // Another service, or another identity for its own: refused, naming both.
    let status = expect_code(
        registry.register(register(endpoint("payment", 9001))).await,
        Code::PermissionDenied,
        "user registering payment",
    )?;
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/default/sa/user")
            && status.message().contains("payment"),
        "{}",
        status.message()
    );
    expect_code(
        registry
            .register(register(Endpoint {
                identity: "spiffe://cluster.local/ns/default/sa/payment".into(),
                ..endpoint("user", 9002)
            }))
            .await,
        Code::PermissionDenied,
        "user announcing payment's identity",
    )?;
    // Admin calls are not a proxy's.
    let status = expect_code(
        AdminClient::new(user.clone())
            .list_services(ListServicesRequest {})
            .await,
        Code::PermissionDenied,
        "a proxy calling Admin/ListServices",
    )?;
    assert!(status.message().contains("sa/user"), "{}", status.message());
    // Discovery is.
    DiscoveryClient::new(user.clone())
        .watch(WatchRequest {
            service: "user".into(),
            ..Default::default()
        })
        .await?;

    // A lease the admin holds (payment's registration) is not the proxy's to revoke.
    let payment = RegistryClient::new(controller.channel().await?)
        .register(register(endpoint("payment", 9003)))
        .await?
        .into_inner();
    expect_code(
        registry
            .deregister(DeregisterRequest {
                lease_id: payment.lease_id,
            })
            .await,
        Code::NotFound,
        "user revoking payment's lease",
    )?;
    let mut admin = AdminClient::new(controller.channel().await?);
    let listed = |service: &'static str| {
        let mut admin = admin.clone();
        async move {
            anyhow::Ok(
                admin
                    .list_endpoints(ListEndpointsRequest {
                        service: service.into(),
                    })
                    .await?
                    .into_inner()
                    .endpoints
                    .len(),
            )
        }
    };
    assert_eq!(
        listed("payment").await?,
        1,
        "payment's registration survived"
    );
    // Its own lease it may revoke.
    registry
        .deregister(DeregisterRequest {
            lease_id: own.lease_id,
        })
        .await?;
    assert_eq!(listed("user").await?, 0);
    admin.list_services(ListServicesRequest {}).await?;
    unharmed(&controller).await
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_by_the_handshake() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = protected(dir.path()).await?;
    let other = tempfile::tempdir()?;
    init_ca(other.path()).await?;
    // The other mesh's admin certificate, presented to this controller.
    let foreign = ferrule_channel::read_certified_key(
        &other.path().join("admin.pem"),
        &other.path().join("admin.key"),
    )?;
    let refused = async {
        let channel = channel_as(&controller, Some(foreign)).await?;
        AdminClient::new(channel)
            .list_services(ListServicesRequest {})
            .await?;
        anyhow::Ok(())
    }
    .await;
    let error = format!(
        "{:#}",
        refused.expect_err("another CA's certificate was accepted")
    );
    assert!(
        !error.contains("Unauthenticated") && !error.contains("PermissionDenied"),
        "refused by the TLS layer, not by an RPC: {error}"
    );
    // A client trusting the other mesh's anchors does not take this controller for its own.
    let anchors = ferrule_channel::read_certificates(&other.path().join("trust-anchors.pem"))?;
    let tls = ControllerTls::new(
        anchors,
        ferrule_proto::identity::controller_identity("cluster.local")?,
        Arc::new(StaticCert(None)),
    )?;
    assert!(tls.connect(target(&controller)?).await.is_err());
    unharmed(&controller).await
}

const POLICY: &str = "\
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: web
spec:
  service: web
  timeouts:
    request: 2s
";

async fn cli(
    controller: &Controller,
    auth: &[String],
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = std::process::Command::new(binary("ferrule")?);
    cmd.args(["--controller", &controller.grpc.to_string()])
        .args(auth)
        .args(args);
    output(cmd).await
}

#[tokio::test]
async fn the_admin_certificate_and_the_admin_token_may_apply_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = protected(dir.path()).await?;
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, POLICY)?;
    let file = file.to_str().context("utf-8")?;
    let anchors = dir.path().join("trust-anchors.pem").display().to_string();

    let with_cert = ferrule_harness::admin_cli_args(dir.path());
    let out = cli(&controller, &with_cert, &["apply", "-f", file]).await?;
    anyhow::ensure!(
        out.status.success(),
        "apply with the admin certificate: {out:?}"
    );

    let token = std::fs::read_to_string(dir.path().join("admin-token"))?;
    let with_token = vec![
        "--ca-file".to_string(),
        anchors.clone(),
        "--token".to_string(),
        token.trim().to_string(),
    ];
    let out = cli(&controller, &with_token, &["get", "config", "-o", "json"]).await?;
    anyhow::ensure!(
        out.status.success(),
        "get config with the admin token: {out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("web"));

    let wrong = vec![
        "--ca-file".to_string(),
        anchors.clone(),
        "--token".to_string(),
        format!("{}0", token.trim()),
    ];
    let out = cli(&controller, &wrong, &["apply", "-f", file]).await?;
    assert!(!out.status.success(), "a wrong token was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin token is not this controller's")
            && stderr.contains("valid authentication credentials"),
        "{stderr}"
    );
    // Without credentials (and no dev mesh to find them in), the CLI says what it needs.
    let out = cli(&controller, &[], &["get", "services"]).await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ca-file"), "{stderr}");
    unharmed(&controller).await
}

#[tokio::test]
async fn the_control_plane_identities_are_never_issued_to_workloads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = protected(dir.path()).await?;
    let status = expect_code(
        IdentityClient::new(controller.channel().await?)
            .create_join_token(CreateJoinTokenRequest {
                service: "ferrule-admin".into(),
                namespace: "ferrule-system".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "a join token for the admin's identity",
    )?;
    assert!(
        status.message().contains("control plane"),
        "{}",
        status.message()
    );
    unharmed(&controller).await
}

#[tokio::test]
async fn api_auth_off_serves_tls_and_checks_nobody() -> Result<()> {
    let dir = tempfile::tempdir()?;
    init_ca(dir.path()).await?;
    let controller = Controller::start_with(
        "memory",
        ANY_PORT.parse()?,
        &[
            "--identity-dir",
            dir.path().to_str().context("utf-8")?,
            "--api-auth",
            "off",
        ],
    )
    .await?;
    AdminClient::new(controller.anonymous_channel().await?)
        .list_services(ListServicesRequest {})
        .await?;
    AdminClient::new(target(&controller)?.connect().await?)
        .list_services(ListServicesRequest {})
        .await?;
    Ok(())
}
