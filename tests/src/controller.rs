//! A real `ferrule-controller` process on loopback ports it chose itself (port 0), read back
//! from its ready line.
//!
//! A controller started with `--identity-dir` protects its API: the harness then reaches it
//! over TLS with the admin credentials `ferrule identity init` wrote into that dir
//! ([`Controller::channel`], [`Controller::cli`]) and tells proxies the trust anchors
//! ([`Controller::proxy_args`]), so a test says once which controller it wants.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferrule_channel::{ControllerTls, StaticCert};
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

use crate::{ANY_PORT, Process, binary};

pub struct Controller {
    pub process: Process,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The mesh CA's files (`--identity-dir`), with the admin's credentials.
    pub identity_dir: Option<PathBuf>,
    trust_domain: String,
    _dir: tempfile::TempDir,
}

/// The files of `ferrule identity init` the harness uses.
pub const TRUST_ANCHORS: &str = "trust-anchors.pem";
pub const ADMIN_CERT: &str = "admin.pem";
pub const ADMIN_KEY: &str = "admin.key";

/// TLS to a controller whose CA files are in `dir`, as the admin (or, with `admin` false, as
/// nobody: the bootstrap calls).
pub fn controller_tls(
    dir: &Path,
    trust_domain: &str,
    admin: bool,
) -> anyhow::Result<ControllerTls> {
    let anchors = ferrule_channel::read_certificates(&dir.join(TRUST_ANCHORS))?;
    let cert = match admin {
        true => Some(ferrule_channel::read_certified_key(
            &dir.join(ADMIN_CERT),
            &dir.join(ADMIN_KEY),
        )?),
        false => None,
    };
    Ok(ControllerTls::new(
        anchors,
        ferrule_proto::identity::controller_identity(trust_domain)?,
        Arc::new(StaticCert(cert)),
    )?)
}

/// The CLI flags that give `ferrule` the admin credentials in `dir`.
pub fn admin_cli_args(dir: &Path) -> Vec<String> {
    [
        ("--ca-file", TRUST_ANCHORS),
        ("--cert", ADMIN_CERT),
        ("--key", ADMIN_KEY),
    ]
    .into_iter()
    .flat_map(|(flag, file)| [flag.to_string(), dir.join(file).display().to_string()])
    .collect()
}

/// The JSON of `ferrule-controller ready: ...`.
#[derive(Deserialize)]
struct Listeners {
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl Controller {
    /// Starts a controller on `store` (`memory` or `etcd://...`) and waits until its listeners
    /// are bound.
    pub async fn start(store: &str) -> anyhow::Result<Self> {
        Self::start_on(store, ANY_PORT.parse()?).await
    }

    /// [`Controller::start`] with its gRPC listener on `grpc` (an address of a network
    /// namespace the test made, so proxies inside it can reach the controller).
    pub async fn start_on(store: &str, grpc: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(store, grpc, &[]).await
    }

    /// [`Controller::start_on`] with more flags (`--identity-dir`, say).
    pub async fn start_with(store: &str, grpc: SocketAddr, args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferrule-controller-")
            .tempdir()?;
        let mut cmd = Command::new(binary("ferrule-controller")?);
        cmd.args(["--store", store])
            .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", ANY_PORT])
            .args(args)
            .env("RUST_LOG", "info,ferrule_controller=debug");
        let mut process = Process::spawn(
            "ferrule-controller",
            cmd,
            &dir.path().join("controller.log"),
        )?;
        let listeners: Listeners = process
            .ready("ferrule-controller", Duration::from_secs(20))
            .await?;
        let flag = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .map(|v| v.to_string())
        };
        Ok(Self {
            process,
            grpc: listeners.grpc,
            admin: listeners.admin,
            identity_dir: flag("--identity-dir").map(PathBuf::from),
            trust_domain: flag("--trust-domain")
                .unwrap_or_else(|| ferrule_proto::identity::DEFAULT_TRUST_DOMAIN.to_string()),
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT`, for tonic clients of a controller without a CA (use
    /// [`Controller::channel`] for any controller).
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A channel to the controller as the admin: over TLS with the admin certificate when the
    /// controller is a CA, plaintext otherwise.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        self.connect(true).await
    }

    /// A channel without any credential (TLS when the controller is a CA): what a proxy has
    /// before its first certificate.
    pub async fn anonymous_channel(&self) -> anyhow::Result<Channel> {
        self.connect(false).await
    }

    async fn connect(&self, admin: bool) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(self.url())?.connect_timeout(Duration::from_secs(5));
        let channel = match &self.identity_dir {
            Some(dir) => {
                controller_tls(dir, &self.trust_domain, admin)?
                    .connect(endpoint)
                    .await
            }
            None => endpoint.connect().await,
        };
        channel.with_context(|| format!("connecting to the controller at {}", self.grpc))
    }

    /// `ferrule --controller ADDR` with the admin credentials when the controller is a CA.
    pub fn cli(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(binary("ferrule")?);
        cmd.args(["--controller", &self.grpc.to_string()]);
        if let Some(dir) = &self.identity_dir {
            cmd.args(admin_cli_args(dir));
        }
        Ok(cmd)
    }

    /// The flags that point a proxy at this controller: `--controller`, and with a CA the
    /// trust anchors its API certificate chains to.
    pub fn proxy_args(&self) -> Vec<String> {
        let mut args = vec!["--controller".to_string(), self.grpc.to_string()];
        if let Some(dir) = &self.identity_dir {
            args.push("--identity-trust-anchors".into());
            args.push(dir.join(TRUST_ANCHORS).display().to_string());
            if self.trust_domain != ferrule_proto::identity::DEFAULT_TRUST_DOMAIN {
                args.push("--trust-domain".into());
                args.push(self.trust_domain.clone());
            }
        }
        args
    }
}
