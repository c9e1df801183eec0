//! Test harness: real etcd and real Ferrule processes on loopback, torn down on drop.
//!
//! Everything a test starts is owned by a guard ([`Etcd`], [`Process`]) that kills it when the
//! guard is dropped, also when the test panics. [`backend`] has the test backends proxies sit in
//! front of; [`netns`] a network namespace for a peer that is not loopback. Waits are
//! event-driven (a port answers, a line is printed) and always bounded.

pub mod backend;
mod client;
mod controller;
mod etcd;
pub mod netns;
mod process;
mod proxy;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub use client::{REQUEST_TIMEOUT, Reply, get, http_get, http1, http2};
pub use controller::Controller;
pub use etcd::Etcd;
pub use process::Process;
pub use proxy::{Proxy, ProxyBuilder};

/// A loopback port that was free a moment ago (bound to port 0 and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 must work")
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
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

/// Polls until `addr` accepts a TCP connection, for at most `within`.
pub fn wait_for_port(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
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
