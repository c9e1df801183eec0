//! A real `ferrule-proxy` process whose listeners bind port 0; the ports they got are read
//! back from its ready line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::{ANY_PORT, Process, binary, http_get};

pub struct Proxy {
    pub process: Process,
    pub admin: SocketAddr,
    /// App port name ("" for `--app-addr`) → inbound listener.
    pub inbound: BTreeMap<String, SocketAddr>,
    /// Upstream service (`name[:port]`) → local listener.
    pub upstreams: BTreeMap<String, SocketAddr>,
    /// The transparent-mode outbound listener (`--transparent`).
    pub outbound: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

/// The JSON of `ferrule-proxy ready: ...` (the `listeners` of its `/config`).
#[derive(Deserialize)]
struct Listeners {
    admin: SocketAddr,
    inbound: Vec<(String, SocketAddr)>,
    upstreams: Vec<(String, SocketAddr)>,
    #[serde(default)]
    outbound: Option<SocketAddr>,
}

/// Flags for a proxy; the admin and inbound listener flags are added by
/// [`ProxyBuilder::start`].
pub struct ProxyBuilder {
    name: String,
    args: Vec<String>,
    admin: Option<SocketAddr>,
    /// Runs the proxy through this command (e.g. into a network namespace, as another user).
    wrapper: Vec<String>,
}

impl Proxy {
    pub fn builder(name: &str) -> ProxyBuilder {
        ProxyBuilder {
            name: name.to_string(),
            args: Vec::new(),
            admin: None,
            wrapper: Vec::new(),
        }
    }

    /// The local listener for `service`, added with [`ProxyBuilder::upstream`] or
    /// `--upstream`.
    pub fn upstream(&self, service: &str) -> anyhow::Result<SocketAddr> {
        self.upstreams
            .get(service)
            .copied()
            .with_context(|| format!("the proxy has no upstream listener for {service}"))
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
    /// Binds the admin listener on `addr` instead of a port 0 on loopback.
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

    /// A local listener for `service` on a port of the proxy's choosing
    /// ([`Proxy::upstream`] tells which).
    /// Starts the proxy as the last arguments of `command` (`ip netns exec NS setpriv ...
    /// --`), with `binary` in place of the built one (a copy another user may run).
    pub fn wrapped<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        command: I,
        binary: &std::path::Path,
    ) -> Self {
        self.wrapper = command.into_iter().map(Into::into).collect();
        self.wrapper.push(binary.display().to_string());
        self
    }

    pub fn upstream(self, service: &str) -> Self {
        self.arg("--upstream").arg(format!("{service}={ANY_PORT}"))
    }

    /// Starts the proxy and waits until every listener is bound.
    pub async fn start(self) -> anyhow::Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("ferrule-proxy-")
            .tempdir()?;
        let admin = self
            .admin
            .map_or_else(|| ANY_PORT.to_string(), |a| a.to_string());
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
            None => Command::new(binary("ferrule-proxy")?),
        };
        // The outbound listener is not bound in explicit mode; port 0 keeps it from ever
        // asking for a fixed one.
        cmd.args(["--admin-addr", &admin, "--inbound-addr", ANY_PORT])
            .args(["--outbound-addr", ANY_PORT])
            .args(&self.args)
            .env("RUST_LOG", "info,ferrule_proxy=debug");
        let log = dir.path().join(format!("{}.log", self.name));
        let mut process = Process::spawn(&self.name, cmd, &log)?;
        let listeners: Listeners = process
            .ready("ferrule-proxy", Duration::from_secs(20))
            .await?;
        Ok(Proxy {
            process,
            admin: listeners.admin,
            inbound: listeners.inbound.into_iter().collect(),
            upstreams: listeners.upstreams.into_iter().collect(),
            outbound: listeners.outbound,
            _dir: dir,
        })
    }
}
