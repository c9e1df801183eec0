//! Test harness: real etcd and real Ferrule processes on loopback, torn down on drop.
//!
//! Everything a test starts is owned by a guard ([`Etcd`], [`Process`]) that kills it when the
//! guard is dropped, also when the test panics. [`backend`] has the test backends proxies sit in
//! front of; [`netns`] a network namespace for a peer that is not loopback;
//! [`identity_mesh`] a controller that is the mesh CA and sidecars with identities; [`KubeApi`] a
//! stand-in Kubernetes API server answering TokenReviews. Waits are
//! event-driven (a ready line is printed, a port answers), async and always bounded.
//!
//! No port is guessed where it can be avoided: the controller and the proxy bind port 0
//! ([`ANY_PORT`]) and the harness reads the ports they got from their ready line. Only etcd and
//! the gateway, which cannot report a port-0 bind, get ports chosen for them, and
//! [`on_chosen_ports`] starts them again on new ports if one was taken meanwhile.

pub mod backend;
mod client;
mod controller;
pub mod dev_mesh;
mod etcd;
pub mod identity_mesh;
mod kube_api;
pub mod netns;
pub mod netns_cluster;
mod process;
mod proxy;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

pub use client::{REQUEST_TIMEOUT, Reply, get, http_get, http1, http2};
pub use controller::{Controller, admin_cli_args, controller_tls};
pub use etcd::Etcd;
pub use kube_api::KubeApi;
pub use process::Process;
pub use proxy::{Proxy, ProxyBuilder};

/// `127.0.0.1:0`: every listener the harness starts binds this and the process reports the
/// port it got (its ready line).
pub const ANY_PORT: &str = "127.0.0.1:0";

/// How many times a process that must be told its port before it starts (etcd, the gateway) is
/// started again on new ports after it found them taken.
const PORT_ATTEMPTS: usize = 5;

/// Runs `start` on loopback addresses chosen for it, choosing again when the start failed
/// because one was taken in the meantime ("address already in use" in the error).
///
/// Only for processes that cannot bind port 0 and report the port (etcd; the gateway, which
/// has no ready line yet): everything else binds [`ANY_PORT`].
pub async fn on_chosen_ports<const N: usize, T, F, Fut>(
    what: &str,
    mut start: F,
) -> anyhow::Result<T>
where
    F: FnMut([SocketAddr; N]) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 1;
    loop {
        let addrs = chosen_addrs::<N>()?;
        match start(addrs).await {
            Err(e) if attempt < PORT_ATTEMPTS && is_port_clash(&e) => {
                eprintln!(
                    "{what}: a port of {addrs:?} was taken (attempt {attempt}); choosing again"
                );
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// `N` distinct loopback addresses that were free a moment ago (bound to port 0 together, then
/// released): a guess that [`on_chosen_ports`] checks by starting the process.
fn chosen_addrs<const N: usize>() -> anyhow::Result<[SocketAddr; N]> {
    let held = (0..N)
        .map(|_| TcpListener::bind(ANY_PORT))
        .collect::<Result<Vec<_>, _>>()
        .context("binding 127.0.0.1:0")?;
    let addrs = held
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(addrs.try_into().expect("N addresses for N listeners"))
}

fn is_port_clash(e: &anyhow::Error) -> bool {
    format!("{e:#}")
        .to_lowercase()
        .contains("address already in use")
}

/// An address that refuses connections for as long as the returned socket lives: bound, never
/// listening, so no other process can take the port meanwhile.
pub fn refusing_addr() -> anyhow::Result<(tokio::net::TcpSocket, SocketAddr)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(ANY_PORT.parse()?)?;
    let addr = socket.local_addr()?;
    Ok((socket, addr))
}

/// Path of a workspace binary (`ferrule-controller`, `ferrule`, `ferrule-proxy`...), built by
/// `cargo build --workspace --bins` (which `make test` runs first).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("test binary has no parent dir")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the workspace binaries first (`cargo build --workspace --bins`, which `make test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// How long a CLI command a test runs may take before the test fails.
pub const COMMAND_BOUND: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion without blocking the test's runtime, killed (and an error) after
/// [`COMMAND_BOUND`].
pub async fn output(cmd: std::process::Command) -> anyhow::Result<std::process::Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    tokio::time::timeout(COMMAND_BOUND, cmd.output())
        .await
        .with_context(|| format!("{program} did not finish within {COMMAND_BOUND:?}"))?
        .with_context(|| format!("running {program}"))
}

/// Retries `check` until it returns `Some`, for at most `within`; the polling interval is
/// short because each check is a cheap local read.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
