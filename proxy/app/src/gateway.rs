//! Gateway mode's assembly: `ferrule-proxy gateway --config gateway.yaml`, the mesh's edge.
//!
//! Builds the gateway's request path from [`ferrule_proxy_gateway`]'s layers in front of the
//! outbound stack a sidecar uses, and serves it with the sidecar's admin listener and
//! lifecycle. Like a sidecar, the gateway follows the controllers' Config stream (as a proxy
//! of mode "gateway" whose service is its `--name`): the `ServicePolicy` and `HTTPRoute` of
//! every service its routes call apply to its requests in the outbound stack, and its own
//! `Gateway` resource, when there is one, overrides its file. A new `Gateway` version is
//! checked (keys read) before it is acked, then built into a new router that replaces the old
//! one for new requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrule_proto::names::validate_service;
use ferrule_proto::v1::ProxyInfo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::CommonArgs;
use ferrule_proxy_api::control::ControlError;
use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_api::policy::{Check, PolicyClient};
use ferrule_proxy_core::lifecycle::{Drain, Lifecycle};
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::server::{self, BoxIo, Dispatcher, HttpStack};
use ferrule_proxy_gateway::config::{ConfigError, GatewayConfig};
use ferrule_proxy_gateway::stack::{self, Router};
use ferrule_proxy_outbound::{Outbound, OutboundConfig};
use ferrule_proxy_policy::PolicySet;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_transport::client::{ClientConfig, Clients};
use ferrule_proxy_transport::metrics::PoolMetrics;

/// Flags of `ferrule-proxy gateway`, with every default. The flags every mode has are
/// [`CommonArgs`], shared with the sidecar.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// The gateway's file (a `Gateway` spec in YAML; see docs/gateway.md). It runs until the
    /// controller streams a `Gateway` resource named `--name`, which then overrides it; it
    /// runs again if that resource is deleted.
    #[arg(long, env = "FERRULE_GATEWAY_CONFIG")]
    pub config: PathBuf,

    /// The gateway's name: the `Gateway` resource it follows (in --namespace) and the
    /// service it shows as in `ferrule status`.
    #[arg(long, env = "FERRULE_GATEWAY_NAME", default_value = "gateway", value_parser = parse_name)]
    pub name: String,

    /// The namespace the gateway runs in: that of its `Gateway` resource and the `<ns>` of its
    /// identity spiffe://<trust-domain>/ns/<ns>/sa/<sa>. In Kubernetes its pod's namespace
    /// (injection sets FERRULE_PROXY_NAMESPACE), e.g. --namespace shop.
    #[arg(long, env = "FERRULE_PROXY_NAMESPACE", default_value = ferrule_config::DEFAULT_NAMESPACE, value_parser = parse_namespace)]
    pub namespace: String,

    /// Overrides the file's `listen`.
    #[arg(long, env = "FERRULE_GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,

    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_name(s: &str) -> Result<String, String> {
    validate_service(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn parse_namespace(s: &str) -> Result<String, String> {
    ferrule_proto::names::validate_namespace(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--controller: {0}")]
    Controllers(#[from] ControlError),
    #[error(transparent)]
    Identity(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tracing(#[from] ferrule_trace::export::ExportError),
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

/// `ferrule-proxy gateway`: sets up logging, starts the gateway with discovery and config
/// from the controllers, and shuts it down gracefully on SIGTERM, SIGINT or `/shutdown`.
pub async fn run(mut args: GatewayArgs) -> Result<(), StartError> {
    ferrule_proxy_core::logging::init(args.common.log_format)
        .map_err(|e| StartError::Logging(e.to_string()))?;
    let config = GatewayConfig::load(&args.config)?;
    if !args.common.controllers.is_empty() {
        args.common.parse_controllers()?;
    }
    let proxy_id = args.common.resolve_proxy_id(&args.name);
    let discovery = Discovery::with_controllers(
        args.common.controllers("discovery"),
        args.proxy_info(&proxy_id),
    );
    let gateway = Gateway::start(args, config, discovery).await?;
    crate::announce_ready(&gateway.addrs);
    crate::shutdown_on_signals(gateway.shutdown_token()).map_err(StartError::Signal)?;
    gateway.wait().await;
    Ok(())
}

impl GatewayArgs {
    /// Who this gateway is, as told to the controller: its name as the service in its
    /// namespace, mode "gateway".
    pub fn proxy_info(&self, proxy_id: &str) -> ProxyInfo {
        ProxyInfo {
            proxy_id: proxy_id.to_string(),
            service: self.name.clone(),
            namespace: self.namespace.clone(),
            address: String::new(),
            mode: "gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            admin_address: String::new(),
            certificate: None,
        }
    }
}

/// Looks up environment variables for `hs256SecretEnv`.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The config the gateway should run as of `set`: its `Gateway` resource, else the file.
fn wanted(set: &PolicySet, name: &str, file: &GatewayConfig) -> GatewayConfig {
    match set.gateway(name) {
        Some(spec) => GatewayConfig::from_resource(spec.clone(), name, set.version()),
        None => file.clone(),
    }
}

impl Gateway {
    /// Binds the listeners and starts serving `file`, or the `Gateway` resource named
    /// `args.name` once the controllers stream one. The binary passes discovery from the
    /// controllers; tests may pass [`Discovery::fixed`].
    pub async fn start(
        mut args: GatewayArgs,
        file: GatewayConfig,
        discovery: Discovery,
    ) -> Result<Gateway, StartError> {
        let proxy_id = args.common.resolve_proxy_id(&args.name);
        let shutdown = CancellationToken::new();
        let serving = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Metrics::new();
        let policy_metrics = PolicyMetrics::register(&metrics);
        // Bound first so the controller learns where it answers (`/metrics`, for `ferrule
        // stat` and the dashboard) with the record its config stream makes.
        let (admin_listener, admin) = bind("admin", args.common.admin_addr).await?;
        let mut proxy_info = args.proxy_info(&proxy_id);
        if !admin.ip().is_unspecified() {
            proxy_info.admin_address = admin.to_string();
        }
        // Announced with its certificate once it has an identity (below).
        let announced = proxy_info.clone();
        let policies = match args.common.controllers("config") {
            Some(controllers) => {
                // A Gateway resource is acked only if the gateway can build a router from it
                // (its key files read, its secrets set).
                let name = args.name.clone();
                let check: Check = Arc::new(move |set: &PolicySet| match set.gateway(&name) {
                    Some(spec) => {
                        let config =
                            GatewayConfig::from_resource(spec.clone(), &name, set.version());
                        stack::prepare(config, &env, None)
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                    None => Ok(()),
                });
                // The services its routes call subscribe as the router builds their stacks.
                PolicyClient::spawn_checked(controllers, proxy_info, check, shutdown.child_token())
            }
            None => PolicyClient::fixed(PolicySet::default()),
        };
        ferrule_proxy_api::metrics::register(&metrics, discovery.clone(), Some(policies.clone()));
        let tracer =
            crate::trace::tracer(&args.common, &args.name, "gateway", &proxy_id, &metrics)?;
        // The gateway's identity (its name stands in for the service account unless
        // --service-account says otherwise): it speaks mutual TLS to the sidecars behind it.
        let tls = crate::identity::start(
            &args.common,
            &args.name,
            &args.namespace,
            &metrics,
            &shutdown,
        )?
        .map(|(tls, _)| tls);
        let announcement = match (&tls, args.common.controllers("registration")) {
            (Some(tls), Some(controllers)) => Some(crate::identity::announce(
                announced,
                tls,
                Some(controllers),
                &shutdown,
            )),
            _ => None,
        };

        let listen_addr = args.listen.unwrap_or(file.listen());
        let (listener, listen) = bind("gateway", listen_addr).await?;
        let addrs = GatewayAddrs { listen, admin };

        let outbound = Outbound::new(
            OutboundConfig {
                tracer: tracer.clone(),
                algorithm: args.common.balancer,
                detect_timeout: args.common.detect_timeout,
                endpoint_wait: args.common.endpoint_wait,
                target_idle: args.common.target_idle_timeout,
                // The gateway's own access log names the route's service and the client's
                // path; a second line per request from the outbound stack adds nothing.
                access_log: false,
            },
            discovery.clone(),
            // The services the routes call get their ServicePolicy and HTTPRoute from here,
            // as a sidecar's upstreams do.
            policies.clone(),
            Clients::new(
                Direction::Outbound,
                ClientConfig {
                    connect_timeout: args.common.connect_timeout,
                    idle_timeout: args.common.idle_timeout,
                },
                &PoolMetrics::register(&metrics),
            )
            .with_tls(tls.clone()),
            metrics.clone(),
            policy_metrics,
            serving.clone(),
            tracker.clone(),
        );
        let builder = RouterBuilder {
            metrics: metrics.clone(),
            access_log: args.common.access_log,
            outbound,
            tracer: tracer.clone(),
        };
        let first = wanted(&policies.current(), &args.name, &file);
        let router = builder.build(first, None)?;
        let (routers, router_rx) = watch::channel(router);
        tokio::spawn(follow(
            builder,
            policies.watch(),
            routers,
            args.name.clone(),
            file,
            serving.clone(),
        ));
        let stack: HttpStack =
            ferrule_proxy_core::stack::BoxStack::new(stack::LiveRouter(router_rx.clone()));

        tokio::spawn(serve(
            listener,
            stack,
            metrics.clone(),
            args.common.detect_timeout,
            serving.clone(),
            tracker.clone(),
        ));

        let config_json = serde_json::json!({
            "proxy_id": proxy_id,
            "mode": "gateway",
            "name": args.name,
            "version": env!("CARGO_PKG_VERSION"),
            "config_file": args.config,
            "common": args.common,
            "listeners": addrs,
        });
        let admin_state = Arc::new(AdminState {
            identity: tls,
            metrics: metrics.clone(),
            discovery,
            needs_discovery: !args.common.controllers.is_empty(),
            registration: None,
            config: config_json,
            policies: Some(policies),
            gateway: Some(router_rx),
            tracer,
            shutdown: shutdown.clone(),
        });
        let lifecycle = Lifecycle::start(
            shutdown,
            admin::spawn(admin_listener, admin_state),
            Drain {
                serving,
                tracker,
                grace: args.common.shutdown_grace,
            },
            async move {
                if let Some(announcement) = &announcement {
                    announcement.deregister().await;
                }
            },
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

/// Builds routers in front of the outbound stack.
struct RouterBuilder {
    metrics: Metrics,
    access_log: bool,
    outbound: Arc<Outbound>,
    tracer: ferrule_proxy_core::trace::Tracer,
}

impl RouterBuilder {
    fn build(
        &self,
        config: GatewayConfig,
        previous: Option<&Router>,
    ) -> Result<Router, ConfigError> {
        let prepared = stack::prepare(config, &env, previous)?;
        let forward = |service: &_| self.outbound.logical(service).http();
        Ok(stack::build(
            prepared,
            &stack::StackParts {
                metrics: &self.metrics,
                access_log: self.access_log,
                forward: &forward,
                tracer: &self.tracer,
            },
        ))
    }
}

/// Follows the config: when the `Gateway` resource (or, without one, the file) differs from
/// what the router in force was built from, builds a new router and swaps it in. Requests
/// already routed finish on the old one. A config that cannot be built (a key file gone since
/// the check) leaves the router in force.
async fn follow(
    builder: RouterBuilder,
    mut policies: watch::Receiver<Arc<PolicySet>>,
    routers: watch::Sender<Router>,
    name: String,
    file: GatewayConfig,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = policies.changed() => if changed.is_err() { return },
        }
        let set = policies.borrow_and_update().clone();
        let wanted = wanted(&set, &name, &file);
        let current = routers.borrow().clone();
        if current.config().same_as(&wanted) {
            continue;
        }
        let origin = wanted.origin().to_string();
        match builder.build(wanted, Some(&current)) {
            Ok(router) => {
                tracing::info!(%origin, "gateway config applied");
                routers.send_replace(router);
            }
            Err(error) => {
                tracing::warn!(%error, "gateway config not applied; keeping the one in force");
            }
        }
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
