//! A real etcd (Debian's etcd-server) on free loopback ports with a temporary data dir.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Process, free_addr, wait_for_port};

const INSTALL_HINT: &str = "etcd not found: the store tests need a real etcd. Install Debian's etcd-server \
     (`make deps`, or `apt-get install etcd-server`), or set FERRULE_ETCD_BIN to an etcd binary";

pub struct Etcd {
    process: Option<Process>,
    client: SocketAddr,
    peer: SocketAddr,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it serves clients.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferrule-etcd-").tempdir()?;
        let mut etcd = Self {
            process: None,
            client: free_addr(),
            peer: free_addr(),
            dir,
        };
        etcd.launch()?;
        Ok(etcd)
    }

    /// `etcd://127.0.0.1:PORT`, as the controller's `--store` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// Kills etcd (SIGKILL: an outage, not a clean stop).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts etcd again on the same ports and data dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch()
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let bin = binary()?;
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let mut cmd = Command::new(bin);
        cmd.arg("--name=ferrule-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=ferrule-test={peer}"))
            .arg("--log-level=warn")
            .env("ETCD_UNSUPPORTED_ARCH", "amd64");
        let log = self.dir.path().join("etcd.log");
        let process = Process::spawn("etcd", cmd, &log)?;
        self.process = Some(process);
        if let Err(e) = wait_for_port(self.client, Duration::from_secs(20)) {
            let log = self.process.as_ref().map(|p| p.log()).unwrap_or_default();
            bail!("{e}; etcd log:\n{log}");
        }
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRULE_ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    let p = PathBuf::from("/usr/bin/etcd");
    if p.is_file() {
        return Ok(p);
    }
    Err(anyhow::anyhow!(INSTALL_HINT)).context("locating etcd")
}
