//! The `ferrule-controller` binary: parses its configuration, opens the store, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ferrule_inject::{InjectConfig, SidecarMode};
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

    /// HTTP listener for /live, /ready, /metrics and the web dashboard at / (port 0: any free
    /// port).
    #[arg(long, env = "FERRULE_ADMIN_ADDR", default_value = "127.0.0.1:9990")]
    admin_addr: SocketAddr,

    /// The mesh CA's files: `trust-anchors.pem` (the trust bundle, one or more anchors),
    /// `issuer.pem` and `issuer.key`, as `ferrule identity init` writes them (in Kubernetes,
    /// a mounted Secret). Without it the controller is no CA and proxies run without mTLS.
    #[arg(long, env = "FERRULE_IDENTITY_DIR")]
    identity_dir: Option<std::path::PathBuf>,

    /// The mesh's trust domain: the `<trust-domain>` of every `spiffe://` identity.
    #[arg(long, env = "FERRULE_TRUST_DOMAIN", default_value = ferrule_proto::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,

    /// Lifetime of the workload certificates the CA signs (never past the issuer's).
    #[arg(long, env = "FERRULE_IDENTITY_LEAF_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    identity_leaf_lifetime: std::time::Duration,

    /// How often the CA's files are re-read and the issuer's expiry checked.
    #[arg(long, env = "FERRULE_IDENTITY_CHECK_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    identity_check_interval: std::time::Duration,

    /// With a CA: `required` (every gRPC call needs the credential its RPC asks for: a
    /// proxy's certificate, or the admin certificate or token; docs/identity.md) or `off`
    /// (TLS and plaintext served, no caller checked: a step while callers get their
    /// credentials; the default for now). Without --identity-dir the API is plaintext and
    /// open whatever this says. E.g. --api-auth required
    #[arg(
        long,
        env = "FERRULE_API_AUTH",
        default_value = "required",
        value_name = "required|off"
    )]
    api_auth: ferrule_controller::auth::ApiAuth,

    /// A DNS name or IP address the API's certificate carries beside the controller's SPIFFE
    /// id (repeatable; e.g. --api-san ferrule-controller.ferrule-system.svc). Default: the
    /// --grpc-addr address, localhost and 127.0.0.1.
    #[arg(
        long = "api-san",
        env = "FERRULE_API_SANS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    api_sans: Vec<String>,

    /// File holding the admin token, re-read every --identity-check-interval. Default:
    /// `admin-token` in --identity-dir when it is there (`ferrule identity init` writes it).
    #[arg(long, env = "FERRULE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

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

    /// The trace API (HTTP/JSON, `GET /traces`) the dashboard lists recent traces from, e.g.
    /// the one `ferrule dev up`'s own OTLP receiver serves (dev up passes it). Without it the
    /// dashboard shows no traces.
    #[arg(long, env = "FERRULE_TRACES_API", value_name = "ADDR")]
    traces_api: Option<SocketAddr>,

    #[command(flatten)]
    webhook: WebhookArgs,
    #[command(flatten)]
    kubernetes: ferrule_controller::tokenreview::TokenReviewArgs,
}

/// The injection webhook's flags (off unless `--webhook-addr` is given).
#[derive(Debug, clap::Args)]
struct WebhookArgs {
    /// HTTPS listener of the injection webhook (`POST /inject`, AdmissionReview v1); off
    /// when absent. Needs --webhook-cert and --webhook-key.
    #[arg(long, env = "FERRULE_WEBHOOK_ADDR", requires_all = ["webhook_cert", "webhook_key"])]
    webhook_addr: Option<SocketAddr>,

    /// PEM certificate chain the webhook serves (its CA is the webhook configuration's caBundle).
    #[arg(long, env = "FERRULE_WEBHOOK_CERT", value_name = "PEM")]
    webhook_cert: Option<PathBuf>,

    /// PEM private key of --webhook-cert.
    #[arg(long, env = "FERRULE_WEBHOOK_KEY", value_name = "PEM")]
    webhook_key: Option<PathBuf>,

    /// Image injected pods run the proxy (and its init step) from.
    #[arg(long, env = "FERRULE_PROXY_IMAGE", default_value_t = InjectConfig::default().proxy_image)]
    proxy_image: String,

    /// The controller address injected proxies dial (a Service name in the cluster).
    #[arg(long, env = "FERRULE_PROXY_CONTROLLER", default_value_t = InjectConfig::default().controller)]
    proxy_controller: String,

    /// How injected proxies run unless a pod's ferrule.io/sidecar says otherwise: `native`
    /// (Kubernetes 1.29+) or `classic`.
    #[arg(long, env = "FERRULE_SIDECAR", default_value = "native", value_parser = ["native", "classic"])]
    sidecar: String,
}

impl WebhookArgs {
    /// `token_audience`: the audience of the service-account token injected proxies get,
    /// when this controller checks such tokens (otherwise they get none and no identity).
    fn config(&self, token_audience: Option<String>, trust_domain: &str) -> InjectConfig {
        InjectConfig {
            proxy_image: self.proxy_image.clone(),
            controller: self.proxy_controller.clone(),
            mode: if self.sidecar == "classic" {
                SidecarMode::Classic
            } else {
                SidecarMode::Native
            },
            token_audience,
            trust_domain: trust_domain.to_string(),
            ..InjectConfig::default()
        }
    }
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

    let identity = config.identity_dir.as_deref().map(|dir| {
        let mut files = ferrule_controller::identity::CaFiles::in_dir(dir, &config.trust_domain);
        files.leaf_lifetime = config.identity_leaf_lifetime;
        files.check_interval = config.identity_check_interval;
        files.token_review = config.kubernetes.config();
        files
    });
    if identity.is_none() && config.kubernetes.kubernetes_api.is_some() {
        anyhow::bail!(
            "--kubernetes-api checks tokens for the mesh CA: it needs --identity-dir as well"
        );
    }
    if let Some(files) = &identity {
        files
            .check()
            .context("loading the mesh CA (--identity-dir)")?;
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

    let webhook = match (
        &config.webhook.webhook_addr,
        &config.webhook.webhook_cert,
        &config.webhook.webhook_key,
    ) {
        (Some(addr), Some(cert), Some(key)) => {
            let tls = ferrule_controller::webhook::tls_config(cert, key)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the webhook listener on {addr}"))?;
            Some((listener, tls))
        }
        _ => None,
    };

    announce_ready(
        grpc.local_addr()?,
        admin.local_addr()?,
        webhook.as_ref().map(|(l, _)| l.local_addr()).transpose()?,
    );

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
    let webhook_task = match webhook {
        Some((listener, tls)) => {
            let audience = identity
                .as_ref()
                .and_then(|files| files.token_review.as_ref())
                .map(|review| review.audience.clone());
            // Injected proxies verify the controller with the CA's bundle, read as it is when
            // each pod is created.
            let anchors = identity.as_ref().map(|files| files.trust_anchors.clone());
            let inject = config.webhook.config(audience, &config.trust_domain);
            let injectors = ferrule_controller::webhook::Injectors::new(inject, anchors)?;
            Some(tokio::spawn(ferrule_controller::webhook::serve(
                listener,
                tls,
                Arc::new(injectors),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let auth = ferrule_controller::auth::AuthOptions {
        mode: config.api_auth,
        names: config.api_sans.clone(),
        admin_token_file: config.admin_token_file.clone().or_else(|| {
            config
                .identity_dir
                .as_ref()
                .map(|dir| dir.join(ferrule_controller::auth::ADMIN_TOKEN_FILE))
        }),
    };
    let options = ferrule_controller::Options {
        identity,
        trace: export,
        auth,
        traces_api: config.traces_api,
    };
    ferrule_controller::serve_with(store, grpc, admin, options, shutdown)
        .await
        .context("the controller stopped with an error")?;
    if let Some(task) = webhook_task {
        task.await.context("the webhook task panicked")??;
    }
    tracing::info!("controller stopped");
    Ok(())
}

const READY_HELP: &str = "Once its listeners are bound it prints one line to stdout, \
`ferrule-controller ready: {\"grpc\":\"IP:PORT\",\"admin\":\"IP:PORT\"}` (and \
`\"webhook\":\"IP:PORT\"` with --webhook-addr), with the addresses actually bound: start it \
with port 0 and read them from that line.";

/// Prints the ready line [`READY_HELP`] describes (the logs go to stderr).
fn announce_ready(grpc: SocketAddr, admin: SocketAddr, webhook: Option<SocketAddr>) {
    let mut listeners = serde_json::json!({ "grpc": grpc, "admin": admin });
    if let Some(webhook) = webhook {
        listeners["webhook"] = serde_json::json!(webhook);
    }
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
