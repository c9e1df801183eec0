//! A mesh with identity: a real etcd, a controller that is the mesh CA (`ferrule identity
//! init` in a temporary directory), and sidecars that get their certificates with join
//! tokens. Shared by the mTLS and authorization tests.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{ANY_PORT, Controller, Etcd, Proxy, binary, eventually, output};

pub struct IdentityMesh {
    pub etcd: Etcd,
    pub controller: Controller,
    /// The CA's files (`trust-anchors.pem`, `issuer.pem`, `issuer.key`).
    pub ca_dir: tempfile::TempDir,
}

impl IdentityMesh {
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// [`IdentityMesh::start`] with more controller flags (`--identity-leaf-lifetime 6s`).
    pub async fn start_with(controller_args: &[&str]) -> Result<Self> {
        let etcd = Etcd::start().await?;
        let ca_dir = tempfile::tempdir()?;
        init_ca(ca_dir.path()).await?;
        let mut args = vec!["--identity-dir", ca_dir.path().to_str().context("utf-8")?];
        args.extend_from_slice(controller_args);
        let controller = Controller::start_with(&etcd.url(), ANY_PORT.parse()?, &args).await?;
        Ok(Self {
            etcd,
            controller,
            ca_dir,
        })
    }

    /// Runs the `ferrule` CLI against the controller.
    pub async fn ferrule(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.controller.cli()?;
        cmd.args(args);
        output(cmd).await
    }

    /// A join token for `service` (`ferrule identity token create`).
    pub async fn token(&self, service: &str) -> Result<String> {
        let out = self
            .ferrule(&["identity", "token", "create", "--service", service])
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// A server-side sidecar with an identity, accepting only mutual TLS.
    pub async fn server(&self, service: &str, app: SocketAddr, extra: &[&str]) -> Result<Proxy> {
        let mut args = vec!["--require-mtls"];
        args.extend_from_slice(extra);
        self.server_accepting_plaintext(service, app, &args).await
    }

    /// A server-side sidecar with an identity that also serves plaintext clients (as
    /// unauthenticated).
    pub async fn server_accepting_plaintext(
        &self,
        service: &str,
        app: SocketAddr,
        extra: &[&str],
    ) -> Result<Proxy> {
        Proxy::builder(&format!("{service}-proxy"))
            .args(self.controller.proxy_args())
            .args(["--service", service, "--app-addr", &app.to_string()])
            .args(["--register-ttl", "3s", "--health-interval", "200ms"])
            .args(["--identity-token", &self.token(service).await?])
            .args(extra.iter().copied())
            .start()
            .await
    }

    /// A client-side sidecar with identity `client` and the given upstreams.
    pub async fn client(&self, upstreams: &[&str], extra: &[&str]) -> Result<Proxy> {
        self.client_as("client", upstreams, extra).await
    }

    /// A client-side sidecar (no service of its own) with the identity of service account
    /// `account` in the default namespace, and the given upstreams.
    pub async fn client_as(
        &self,
        account: &str,
        upstreams: &[&str],
        extra: &[&str],
    ) -> Result<Proxy> {
        let mut builder = Proxy::builder(&format!("{account}-proxy"))
            .args(self.controller.proxy_args())
            .args(["--endpoint-wait", "2s", "--service-account", account])
            .args(["--identity-token", &self.token(account).await?])
            .args(extra.iter().copied());
        for up in upstreams {
            builder = builder.upstream(up);
        }
        let proxy = builder.start().await?;
        proxy.wait_ready(Duration::from_secs(10)).await?;
        Ok(proxy)
    }

    /// Waits until `service` has an endpoint in the registry.
    pub async fn wait_registered(&self, service: &str) -> Result<()> {
        use ferrule_proto::v1::{ListEndpointsRequest, admin_client::AdminClient};
        eventually(
            Duration::from_secs(15),
            &format!("{service} registered"),
            || async move {
                let mut admin = AdminClient::new(self.controller.channel().await.ok()?);
                let eps = admin
                    .list_endpoints(ListEndpointsRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .endpoints;
                (!eps.is_empty()).then_some(())
            },
        )
        .await
    }
}

/// `ferrule identity init --dir DIR`: a new trust anchor and issuer.
pub async fn init_ca(dir: &Path) -> Result<()> {
    let mut cmd = std::process::Command::new(binary("ferrule")?);
    cmd.args(["identity", "init", "--dir"]).arg(dir);
    let out = output(cmd).await?;
    anyhow::ensure!(
        out.status.success(),
        "ferrule identity init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The sum of the samples in a `/metrics` text whose line starts with `prefix`.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
