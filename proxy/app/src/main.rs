//! `ferrule-proxy`: parses the configuration, sets up logging, starts the proxy and shuts it
//! down gracefully on SIGTERM, SIGINT or the admin `/shutdown` endpoint.

use anyhow::Context as _;
use clap::Parser;
use ferrule_proxy::config::{Config, Mode};
use ferrule_proxy::control::Controllers;
use ferrule_proxy::discovery::Discovery;
use ferrule_proxy::sidecar::Proxy;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
    if let Some(Mode::Gateway(args)) = config.mode.take() {
        return ferrule_proxy::gateway::run(args).await.context("gateway");
    }
    let proxy_id = config.proxy_id();
    ferrule_proxy::logging::init(config.common.log_format)
        .map_err(|e| anyhow::anyhow!("setting up logging: {e}"))?;
    if !config.common.controllers.is_empty() {
        Controllers::parse(&config.common.controllers).context("--controller")?;
    }
    let discovery = if config.static_endpoints.is_empty() {
        Discovery::new(
            config.common.controllers.clone(),
            config.proxy_info(&proxy_id),
        )
    } else {
        Discovery::fixed(config.static_discovery())
    };
    let proxy = Proxy::start(config, discovery)
        .await
        .context("starting the proxy")?;
    let shutdown = proxy.shutdown_token();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            () = shutdown.cancelled() => return,
        }
        shutdown.cancel();
    });
    proxy.wait().await;
    Ok(())
}
