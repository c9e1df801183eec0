//! The outbound side: traffic the app sends to other services.
//!
//! Levels as in linkerd: [`target`] says which logical service a connection is for (or that
//! it is not the mesh's, and passes it through as plain TCP); the
//! logical level ([`logical`]) applies the service's routes and policy and chooses a concrete
//! backend service; the concrete level ([`concrete`]) owns the service's limits and a balancer
//! fed by discovery; the endpoint level ([`endpoint`]) owns each endpoint's breaker and
//! connects to the address the balancer picked. [`http`] assembles the HTTP stack; connections that are not HTTP go
//! through [`opaque`] straight to the concrete service's balancer. One [`LogicalService`] is
//! built per service on first use, shared by every connection for it, and kept in an idle
//! cache: a target unused for `--target-idle-timeout` is dropped with everything it owns
//! (stacks, discovery watch, policy subscription, metric series). A new target subscribes to
//! its policy when it is built, and its first connection waits (at most [`POLICY_WAIT`]) for
//! the controller's snapshot that includes it.

pub mod concrete;
pub mod endpoint;
pub mod http;
pub mod logical;
pub mod opaque;
pub mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use concrete::{Concrete, ConcreteConfig, Concretes};
use endpoint::EndpointConnector;
use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_api::policy::{PolicyClient, PolicySubscription};
use ferrule_proxy_core::errors::Reason;
use ferrule_proxy_core::idle_cache::{IdleCache, sweep_interval};
use ferrule_proxy_core::metrics::{Direction, Metrics, TargetMetrics};
use ferrule_proxy_core::server::{self, BoxIo, Dispatcher, HttpStack, splice_tcp};
use ferrule_proxy_policy::balance::Algorithm;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_transport::client::{Clients, connect_tcp};
use logical::LogicalTarget;
use target::{Destination, Target};

/// How long a new target's first connection waits for its policy before it goes on with
/// the policy in force (the defaults for a service never seen).
pub const POLICY_WAIT: Duration = Duration::from_secs(1);
/// The series connections passed through (to addresses the mesh does not know) count under.
/// Not a valid service name, so it never meets a service's series.
pub const PASSTHROUGH: &str = "(passthrough)";

/// Settings of the outbound side.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Starts the client span of each attempt (off: `Tracer::default()`).
    pub tracer: ferrule_proxy_core::trace::Tracer,
    pub algorithm: Algorithm,
    pub detect_timeout: Duration,
    pub endpoint_wait: Duration,
    pub access_log: bool,
    /// Per-target state (stacks, discovery watches, metric series) unused for this long is
    /// dropped.
    pub target_idle: Duration,
}

/// A logical service: the concrete service of the same name, its HTTP stack and the series
/// its connections are counted in. Dropped (and its series with it) once idle.
pub struct LogicalService {
    concrete: Arc<Concrete>,
    http: HttpStack,
    tcp: Arc<TargetMetrics>,
    policy_metrics: PolicyMetrics,
    /// Keeps the service in the proxy's policy subscription while the target lives.
    policy: PolicySubscription,
}

impl Drop for LogicalService {
    fn drop(&mut self) {
        self.policy_metrics.forget(&self.concrete.balance.name);
    }
}

impl LogicalService {
    /// The service's HTTP stack, for listeners other than the outbound ones (the gateway).
    pub fn http(&self) -> HttpStack {
        self.http.clone()
    }

    /// Waits, at most [`POLICY_WAIT`], until the service's policy is in force.
    pub async fn policy_ready(&self) -> bool {
        self.policy.ready(POLICY_WAIT).await
    }
}

pub struct Outbound {
    config: OutboundConfig,
    clients: Clients,
    concretes: Arc<Concretes>,
    policies: PolicyClient,
    metrics: Metrics,
    policy_metrics: PolicyMetrics,
    dispatcher: Dispatcher,
    logical: IdleCache<ServiceRef, LogicalService>,
    discovery: Discovery,
    passthrough: Arc<TargetMetrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Outbound {
    #[allow(clippy::too_many_arguments)] // The parts a proxy mode assembles; none has a default.
    pub fn new(
        config: OutboundConfig,
        discovery: Discovery,
        policies: PolicyClient,
        clients: Clients,
        metrics: Metrics,
        policy_metrics: PolicyMetrics,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        let concretes = Concretes::new(
            ConcreteConfig {
                algorithm: config.algorithm,
                endpoint_wait: config.endpoint_wait,
            },
            discovery.clone(),
            EndpointConnector::new(clients.clone()).report_peer(config.tracer.is_enabled()),
            policy_metrics.clone(),
            config.target_idle,
        );
        let dispatcher = Dispatcher {
            direction: Direction::Outbound,
            metrics: metrics.clone(),
            detect_timeout: config.detect_timeout,
            shutdown: shutdown.clone(),
        };
        let passthrough = metrics.target(Direction::Outbound, PASSTHROUGH.into());
        let outbound = Arc::new(Self {
            dispatcher,
            clients,
            concretes: Arc::new(concretes),
            policies,
            metrics,
            policy_metrics,
            logical: IdleCache::new(config.target_idle),
            discovery,
            passthrough,
            config,
            shutdown,
            tracker,
        });
        tokio::spawn(reaper(Arc::downgrade(&outbound)));
        outbound
    }

    /// Drops the per-target state nobody used for the idle time, outermost level first so
    /// the levels below see their last holder go: logical stacks, then concrete services,
    /// then the discovery watches no balancer reads any more.
    pub fn evict_idle(&self) -> usize {
        let logical = self.logical.evict_idle();
        let concrete = self.concretes.evict_idle();
        let watches = self.discovery.release_unused();
        if logical + concrete + watches > 0 {
            tracing::debug!(logical, concrete, watches, "idle targets forgotten");
        }
        logical + concrete
    }

    /// How many logical and concrete services are cached (for tests and `/config`).
    pub fn cached_targets(&self) -> (usize, usize) {
        (self.logical.len(), self.concretes.len())
    }

    /// The logical service `target`, built (and subscribed to its endpoints) on first use.
    pub fn logical(&self, target: &ServiceRef) -> Arc<LogicalService> {
        self.logical.get_or_insert_with(target, || {
            let concrete = self.concretes.get(target);
            let name = concrete.balance.name.clone();
            let logical = logical::stack(
                LogicalTarget {
                    service: target.clone(),
                    name: name.clone(),
                },
                self.policies.watch(),
                concrete.clone(),
                self.concretes.clone(),
                self.policy_metrics.clone(),
                self.config.tracer.clone(),
            );
            let http = http::stack(name.clone(), logical, &self.metrics, self.config.access_log);
            LogicalService {
                concrete,
                http,
                tcp: self.metrics.target(Direction::Outbound, name),
                policy_metrics: self.policy_metrics.clone(),
                policy: self.policies.subscribe(&target.name()),
            }
        })
    }

    /// Serves `listener` until shutdown; `target` says where each connection goes.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, target: Arc<dyn Target>) {
        let this = self.clone();
        server::accept_loop(
            listener,
            self.shutdown.clone(),
            self.tracker.clone(),
            move |stream, peer| Box::pin(this.clone().handle(stream, peer, target.clone())),
        )
        .await;
    }

    async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, target: Arc<dyn Target>) {
        let (service, opaque_port) = match target.target(&stream).await {
            Ok(Destination::Service { service, opaque }) => (service, opaque),
            Ok(Destination::Passthrough(addr)) => {
                self.pass_through(stream, peer, addr).await;
                return;
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "outbound connection dropped");
                return;
            }
        };
        let logical = self.logical(&service);
        if !logical.policy_ready().await {
            tracing::debug!(%service, "no policy snapshot for a new target in time; using the policy in force");
        }
        let series = logical.tcp.clone();
        let clients = self.clients.clone();
        let http = logical.http.clone();
        let metrics = self.metrics.clone();
        let opaque = |io: BoxIo| async move {
            opaque::forward(io, &logical.concrete.balance, &clients, &metrics).await;
        };
        self.dispatcher
            .dispatch(stream, peer, &series, opaque_port, http, Some(opaque))
            .await;
    }
}

impl Outbound {
    /// Copies a connection the mesh does not know to where it was going, bytes only.
    async fn pass_through(&self, stream: TcpStream, peer: SocketAddr, addr: SocketAddr) {
        tracing::debug!(%peer, %addr, "passing a connection through");
        let io = self.passthrough.count_io(stream);
        match connect_tcp(addr, self.clients.connect_timeout()).await {
            Ok(upstream) => splice_tcp(io, upstream, addr).await,
            Err(error) => {
                tracing::info!(%peer, %addr, %error, "passthrough connection failed");
                self.metrics
                    .proxy_error(Direction::Outbound, Reason::UpstreamConnectFailure);
            }
        }
    }
}

/// Evicts idle targets until the outbound side is dropped.
async fn reaper(outbound: std::sync::Weak<Outbound>) {
    let Some(idle) = outbound.upgrade().map(|o| o.config.target_idle) else {
        return;
    };
    let mut tick = tokio::time::interval(sweep_interval(idle));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(outbound) = outbound.upgrade() else {
            return;
        };
        if outbound.shutdown.is_cancelled() {
            return;
        }
        outbound.evict_idle();
    }
}
