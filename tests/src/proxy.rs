//! A real `ferrule-proxy` process with every listener on a free loopback port.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::{Process, binary, free_addr, http_get, wait_for_port};

pub struct Proxy {
    pub process: Process,
    pub admin: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Flags for a proxy; the listener flags are filled in by [`ProxyBuilder::start`].
pub struct ProxyBuilder {
    name: String,
    args: Vec<String>,
    admin: Option<SocketAddr>,
}

impl Proxy {
    pub fn builder(name: &str) -> ProxyBuilder {
        ProxyBuilder {
            name: name.to_string(),
            args: Vec::new(),
            admin: None,
        }
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.admin_get("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
        Ok(body)
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let admin = self.admin;
        crate::eventually(within, "proxy /ready", || async move {
            matches!(http_get(admin, "/ready").await, Ok((200, _))).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; proxy log:\n{}", self.process.log()))
    }
}

impl ProxyBuilder {
    /// Binds the admin listener on `addr` instead of a free loopback port.
    pub fn admin_addr(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the proxy and waits until its admin listener accepts connections.
    pub fn start(self) -> anyhow::Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("ferrule-proxy-")
            .tempdir()?;
        let admin = self.admin.unwrap_or_else(free_addr);
        let (inbound, outbound) = (free_addr(), free_addr());
        let mut cmd = Command::new(binary("ferrule-proxy")?);
        cmd.arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--inbound-addr")
            .arg(inbound.to_string())
            .arg("--outbound-addr")
            .arg(outbound.to_string())
            .args(&self.args)
            .env("RUST_LOG", "info,ferrule_proxy=debug");
        let log = dir.path().join(format!("{}.log", self.name));
        let process = Process::spawn(&self.name, cmd, &log)?;
        let proxy = Proxy {
            process,
            admin,
            inbound,
            outbound,
            _dir: dir,
        };
        if let Err(e) = wait_for_port(admin, Duration::from_secs(20)) {
            anyhow::bail!("{e}; proxy log:\n{}", proxy.process.log());
        }
        Ok(proxy)
    }
}
