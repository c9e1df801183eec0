//! The `ferrule-controller` binary: parses its configuration, opens the store, serves.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use ferrule_store::StoreUrl;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Ferrule's controller: registrations, discovery and administration over gRPC, with all
/// state in the store.
#[derive(Debug, Parser)]
#[command(name = "ferrule-controller", version, after_help = READY_HELP)]
struct Config {
    /// Where state lives: `memory` (embedded, single process) or `etcd://host:port[,host:port...]`.
    #[arg(long, env = "FERRULE_STORE", default_value = "memory")]
    store: StoreUrl,

    /// gRPC listener for proxies and the CLI (port 0: any free port, see below).
    #[arg(long, env = "FERRULE_GRPC_ADDR", default_value = "127.0.0.1:8086")]
    grpc_addr: SocketAddr,

    /// HTTP listener for /live, /ready and /metrics (port 0: any free port).
    #[arg(long, env = "FERRULE_ADMIN_ADDR", default_value = "127.0.0.1:9990")]
    admin_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "FERRULE_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,

    /// The OTLP collector to export a trace span per RPC to, e.g. http://127.0.0.1:4317.
    /// Without it tracing is off.
    #[arg(long, env = "FERRULE_CONTROLLER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// How spans reach the collector: grpc or http/protobuf.
    #[arg(long, env = "FERRULE_CONTROLLER_OTLP_PROTOCOL", default_value = "grpc")]
    otlp_protocol: ferrule_trace::Protocol,

    /// The share of new traces sampled, 0 to 1 (calls with a trace context follow it).
    #[arg(long, env = "FERRULE_CONTROLLER_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    trace_sample_ratio: f64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio from 0 to 1 (e.g. 0.01 for 1 %)"
        )),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if config.log_format == "json" {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }

    let store = ferrule_store::connect(&config.store)
        .await
        .with_context(|| format!("opening the store {}", config.store))?;
    let grpc = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", config.grpc_addr))?;
    let admin = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin_addr))?;

    announce_ready(grpc.local_addr()?, admin.local_addr()?);

    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    let export = config
        .otlp_endpoint
        .clone()
        .map(|endpoint| ferrule_trace::ExportConfig {
            endpoint,
            protocol: config.otlp_protocol,
            sample_ratio: config.trace_sample_ratio,
            queue_size: 2048,
            resource: vec![
                ("service.name".into(), "ferrule-controller".into()),
                (
                    "service.instance.id".into(),
                    grpc.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                ),
            ],
        });
    ferrule_controller::serve_traced(store, grpc, admin, shutdown, export).await?;
    tracing::info!("controller stopped");
    Ok(())
}

const READY_HELP: &str = "Once both listeners are bound it prints one line to stdout, \
`ferrule-controller ready: {\"grpc\":\"IP:PORT\",\"admin\":\"IP:PORT\"}`, with the addresses \
actually bound: start it with port 0 and read them from that line.";

/// Prints the ready line [`READY_HELP`] describes (the logs go to stderr).
fn announce_ready(grpc: SocketAddr, admin: SocketAddr) {
    let listeners = serde_json::json!({ "grpc": grpc, "admin": admin });
    println!("ferrule-controller ready: {listeners}");
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn signal_shutdown(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
