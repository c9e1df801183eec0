//! A real `ferrule-controller` process on loopback ports it chose itself (port 0), read back
//! from its ready line.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::{ANY_PORT, Process, binary};

pub struct Controller {
    pub process: Process,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
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
        Ok(Self {
            process,
            grpc: listeners.grpc,
            admin: listeners.admin,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}
