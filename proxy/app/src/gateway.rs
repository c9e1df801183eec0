//! Gateway mode's assembly: `ferrule-proxy gateway --config gateway.yaml`, the mesh's edge.
//!
//! Builds the gateway's request path from [`ferrule_proxy_gateway`]'s layers in front of the
//! outbound stack a sidecar uses, and serves it with the sidecar's admin listener and
//! lifecycle.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrule_proto::ports;
use ferrule_proto::v1::ProxyInfo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use ferrule_proxy_api::control::{ControlError, Controllers};
use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_api::policy::PolicyClient;
use ferrule_proxy_core::lifecycle::{Drain, Lifecycle};
use ferrule_proxy_core::logging::LogFormat;
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::server::{self, BoxIo, Dispatcher, HttpStack};
use ferrule_proxy_gateway::config::{ConfigError, GatewayConfig};
use ferrule_proxy_gateway::stack;
use ferrule_proxy_outbound::{Outbound, OutboundConfig};
use ferrule_proxy_policy::PolicySet;
use ferrule_proxy_policy::balance::Algorithm;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_transport::client::{ClientConfig, Clients};
use ferrule_proxy_transport::metrics::PoolMetrics;

/// Flags of `ferrule-proxy gateway`, with every default.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// The gateway config file (YAML; see docs/gateway.md).
    #[arg(long, env = "FERRULE_GATEWAY_CONFIG")]
    pub config: PathBuf,

    /// Controller gRPC addresses, tried in turn.
    #[arg(long = "controller", env = "FERRULE_CONTROLLER", value_delimiter = ',')]
    pub controllers: Vec<String>,

    /// Overrides the file's `listen`.
    #[arg(long, env = "FERRULE_GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,

    #[arg(long, env = "FERRULE_PROXY_ADMIN_ADDR", default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::PROXY_ADMIN)))]
    pub admin_addr: SocketAddr,

    #[arg(long, env = "FERRULE_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// One log line per request, at info, target "access".
    #[arg(long, env = "FERRULE_PROXY_ACCESS_LOG")]
    pub access_log: bool,

    #[arg(long, env = "FERRULE_PROXY_BALANCER", default_value = "p2c-ewma")]
    pub balancer: Algorithm,

    /// How long a request waits for an available endpoint before failing with 503.
    #[arg(long, env = "FERRULE_PROXY_ENDPOINT_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub endpoint_wait: Duration,

    /// How long a target (a service this proxy calls) may go unused before its stacks,
    /// discovery watch and metric series are dropped.
    #[arg(long, env = "FERRULE_PROXY_TARGET_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub target_idle_timeout: Duration,

    #[arg(long, env = "FERRULE_PROXY_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// How long a pooled connection to an endpoint stays open unused.
    #[arg(long, env = "FERRULE_PROXY_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// How long the gateway waits for a client's first bytes to tell HTTP/1 from HTTP/2.
    #[arg(long, env = "FERRULE_PROXY_DETECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,

    /// How long shutdown waits for in-flight requests and connections.
    #[arg(long, env = "FERRULE_PROXY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Unique id of this proxy; generated when absent.
    #[arg(long, env = "FERRULE_PROXY_ID")]
    pub proxy_id: Option<String>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--controller: {0}")]
    Controllers(#[from] ControlError),
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("setting up logging: {0}")]
    Logging(String),
    #[error("installing the signal handler: {0}")]
    Signal(std::io::Error),
}

/// Where the gateway's listeners are bound (useful with port 0).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct GatewayAddrs {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// A running gateway.
pub struct Gateway {
    pub addrs: GatewayAddrs,
    pub metrics: Metrics,
    lifecycle: Lifecycle,
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    tracing::info!(listener = what, addr = %bound, "listening");
    Ok((listener, bound))
}

/// `ferrule-proxy gateway`: sets up logging, starts the gateway with discovery from the
/// controllers, and shuts it down gracefully on SIGTERM, SIGINT or `/shutdown`.
pub async fn run(args: GatewayArgs) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};

    ferrule_proxy_core::logging::init(args.log_format)
        .map_err(|e| StartError::Logging(e.to_string()))?;
    let config = GatewayConfig::load(&args.config)?;
    if !args.controllers.is_empty() {
        Controllers::parse(&args.controllers)?;
    }
    let proxy_id = proxy_id(&args);
    let discovery = Discovery::new(
        args.controllers.clone(),
        ProxyInfo {
            proxy_id: proxy_id.clone(),
            service: "gateway".into(),
            namespace: "default".into(),
            address: String::new(),
            mode: "gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    );
    let gateway = Gateway::start(&args, config, discovery).await?;
    let shutdown = gateway.shutdown_token();
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            () = shutdown.cancelled() => return,
        }
        shutdown.cancel();
    });
    gateway.wait().await;
    Ok(())
}

fn proxy_id(args: &GatewayArgs) -> String {
    args.proxy_id.clone().unwrap_or_else(|| {
        format!(
            "gateway-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        )
    })
}

impl Gateway {
    /// Binds the listeners and starts serving `config`. The binary passes discovery from the
    /// controllers; tests may pass [`Discovery::fixed`].
    pub async fn start(
        args: &GatewayArgs,
        config: GatewayConfig,
        discovery: Discovery,
    ) -> Result<Gateway, StartError> {
        let proxy_id = proxy_id(args);
        let shutdown = CancellationToken::new();
        let serving = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Metrics::new();
        let policy_metrics = PolicyMetrics::register(&metrics);
        ferrule_proxy_api::metrics::register(&metrics, discovery.clone(), None);

        let listen_addr = args.listen.unwrap_or(config.listen);
        let (admin_listener, admin) = bind("admin", args.admin_addr).await?;
        let (listener, listen) = bind("gateway", listen_addr).await?;
        let addrs = GatewayAddrs { listen, admin };

        let outbound = Outbound::new(
            OutboundConfig {
                algorithm: args.balancer,
                detect_timeout: args.detect_timeout,
                endpoint_wait: args.endpoint_wait,
                target_idle: args.target_idle_timeout,
                // The gateway's own access log names the route's service and the client's
                // path; a second line per request from the outbound stack adds nothing.
                access_log: false,
            },
            discovery.clone(),
            // The gateway does not follow the Config stream yet: its services get the
            // default policy.
            PolicyClient::fixed(PolicySet::default()),
            Clients::new(
                Direction::Outbound,
                ClientConfig {
                    connect_timeout: args.connect_timeout,
                    idle_timeout: args.idle_timeout,
                },
                &PoolMetrics::register(&metrics),
            ),
            &proxy_id,
            metrics.clone(),
            policy_metrics,
            serving.clone(),
            tracker.clone(),
        );
        let forward = |service: &_| outbound.logical(service).http();
        let env = |name: &str| std::env::var(name).ok();
        let router = stack::build(
            &config,
            &stack::StackParts {
                metrics: &metrics,
                access_log: args.access_log,
                forward: &forward,
                env: &env,
            },
        )?;
        let stack: HttpStack = tower::util::BoxCloneSyncService::new(router);

        tokio::spawn(serve(
            listener,
            stack,
            metrics.clone(),
            args.detect_timeout,
            serving.clone(),
            tracker.clone(),
        ));

        let config_json = serde_json::json!({
            "proxy_id": proxy_id,
            "mode": "gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "config_file": args.config,
            "controllers": args.controllers,
            "gateway": config,
            "listeners": addrs,
        });
        let admin_state = Arc::new(AdminState {
            metrics: metrics.clone(),
            discovery,
            needs_discovery: !args.controllers.is_empty(),
            registration: None,
            config: config_json,
            policies: None,
            shutdown: shutdown.clone(),
        });
        let lifecycle = Lifecycle::start(
            shutdown,
            admin::spawn(admin_listener, admin_state),
            Drain {
                serving,
                tracker,
                grace: args.shutdown_grace,
            },
            async {},
        );
        tracing::info!(%proxy_id, listen = %addrs.listen, "gateway started");
        Ok(Gateway {
            addrs,
            metrics,
            lifecycle,
        })
    }

    /// Cancelling this token starts the graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.lifecycle.shutdown_token()
    }

    /// Waits until shutdown has finished (after it was started).
    pub async fn wait(self) {
        self.lifecycle.wait().await;
    }

    /// Starts the graceful shutdown and waits for it.
    pub async fn shutdown(self) {
        self.lifecycle.shutdown().await;
    }
}

/// Serves the edge listener until shutdown: HTTP/1 or HTTP/2 (prior knowledge) per
/// connection; anything else is not for a gateway and is closed.
async fn serve(
    listener: TcpListener,
    stack: HttpStack,
    metrics: Metrics,
    detect_timeout: Duration,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let series = metrics.target(Direction::Gateway, "gateway".into());
    let dispatcher = Arc::new(Dispatcher {
        direction: Direction::Gateway,
        metrics,
        detect_timeout,
        shutdown: shutdown.clone(),
    });
    server::accept_loop(listener, shutdown, tracker, move |stream, peer| {
        let dispatcher = dispatcher.clone();
        let stack = stack.clone();
        let series = series.clone();
        Box::pin(async move {
            dispatcher
                .dispatch(stream, peer, &series, false, stack, None::<NoOpaque>)
                .await;
        })
    })
    .await;
}

/// The gateway has no opaque path: what is not HTTP is closed.
type NoOpaque = fn(BoxIo) -> std::future::Ready<()>;
