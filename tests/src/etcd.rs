//! A real etcd (Debian's etcd-server) on loopback ports with a temporary data dir.
//!
//! etcd cannot report the port it got for port 0, so the harness chooses its two ports, and
//! starts it again on new ones when it finds one taken ([`crate::on_chosen_ports`]). It counts
//! as started once it logged that it serves clients on its client address: a port that merely
//! answers might be another test's etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::{Process, on_chosen_ports};

const INSTALL_HINT: &str = "etcd not found: the store tests need a real etcd. Install Debian's etcd-server \
     (`make deps`, or `apt-get install etcd-server`), or set FERRULE_ETCD_BIN to an etcd binary";

pub struct Etcd {
    process: Option<Process>,
    client: SocketAddr,
    peer: SocketAddr,
    dir: tempfile::TempDir,
    /// Starts so far; each writes its own log.
    launches: u32,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it serves clients.
    pub async fn start() -> anyhow::Result<Self> {
        on_chosen_ports("etcd", |[client, peer]| async move {
            let dir = tempfile::Builder::new().prefix("ferrule-etcd-").tempdir()?;
            let mut etcd = Self {
                process: None,
                client,
                peer,
                dir,
                launches: 0,
            };
            etcd.launch().await?;
            Ok(etcd)
        })
        .await
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
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
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
            // Info, for the line that says it serves clients.
            .arg("--logger=zap")
            .arg("--log-level=info")
            .env("ETCD_UNSUPPORTED_ARCH", "amd64");
        self.launches += 1;
        let log = self.dir.path().join(format!("etcd-{}.log", self.launches));
        let process = self.process.insert(Process::spawn("etcd", cmd, &log)?);
        // Printed once the client listener is bound (the log is this run's alone).
        process
            .wait_for_line("serving client traffic", Duration::from_secs(20))
            .await?;
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
