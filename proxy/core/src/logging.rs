//! Logging setup: `tracing` events filtered by `RUST_LOG` (default `info`), written as plain
//! text or JSON lines to stderr. Access-log lines (one per request, when enabled) use the
//! target `access`, so `RUST_LOG=warn,access=info` keeps only them.

use clap::ValueEnum;
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// How log lines are written: `--log-format plain|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Installs the global subscriber; fails if one is already installed.
pub fn init(format: LogFormat) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
}
