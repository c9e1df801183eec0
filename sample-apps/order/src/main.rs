//! `shop-order`: runs the sample shop's order service until SIGTERM or Ctrl-C. Settings come from
//! flags or `ORDER_*` environment variables (see `--help`).

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = shop_order::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    shop_order::run(config, shutdown)
        .await
        .context("shop-order")
}
