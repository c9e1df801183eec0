//! A real `ferrule-controller` process on free loopback ports.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::{Process, binary, free_addr, wait_for_port};

pub struct Controller {
    pub process: Process,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Controller {
    /// Starts a controller on `store` (`memory` or `etcd://...`) and waits until its gRPC port
    /// accepts connections.
    pub fn start(store: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferrule-controller-")
            .tempdir()?;
        let grpc = free_addr();
        let admin = free_addr();
        let mut cmd = Command::new(binary("ferrule-controller")?);
        cmd.arg("--store")
            .arg(store)
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .env("RUST_LOG", "info,ferrule_controller=debug");
        let process = Process::spawn(
            "ferrule-controller",
            cmd,
            &dir.path().join("controller.log"),
        )?;
        let controller = Self {
            process,
            grpc,
            admin,
            _dir: dir,
        };
        if let Err(e) = wait_for_port(grpc, Duration::from_secs(20)) {
            anyhow::bail!("{e}; controller log:\n{}", controller.process.log());
        }
        Ok(controller)
    }

    /// `http://127.0.0.1:PORT`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}
