//! The outbound side: traffic the app sends to other services.
//!
//! Levels as in linkerd: [`target`] says which logical service a connection is for; the
//! logical level ([`logical`]) applies the service's routes and policy and chooses a concrete
//! backend service; the concrete level ([`concrete`]) owns a balancer fed by discovery and the
//! service's limits and breakers; the endpoint level ([`endpoint`]) connects to the address the
//! balancer picked. [`http`] assembles the HTTP stack; connections that are not HTTP go
//! through [`opaque`] straight to the concrete service's balancer. One [`LogicalService`] is
//! built per service on first use, shared by every connection for it, and kept in an idle
//! cache: a target unused for `--target-idle-timeout` is dropped with everything it owns
//! (stacks, discovery watch, metric series).

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
use ferrule_proxy_api::policy::PolicyClient;
use ferrule_proxy_core::idle_cache::{IdleCache, sweep_interval};
use ferrule_proxy_core::metrics::{Direction, Metrics, TargetMetrics};
use ferrule_proxy_core::server::{self, BoxIo, Dispatcher, HttpStack};
use ferrule_proxy_policy::balance::Algorithm;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_transport::client::Clients;
use logical::LogicalTarget;
use target::Target;

/// Settings of the outbound side.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
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
            EndpointConnector::new(clients.clone()),
            policy_metrics.clone(),
            config.target_idle,
        );
        let dispatcher = Dispatcher {
            direction: Direction::Outbound,
            metrics: metrics.clone(),
            detect_timeout: config.detect_timeout,
            shutdown: shutdown.clone(),
        };
        let outbound = Arc::new(Self {
            dispatcher,
            clients,
            concretes: Arc::new(concretes),
            policies,
            metrics,
            policy_metrics,
            logical: IdleCache::new(config.target_idle),
            discovery,
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
            );
            let http = http::stack(name.clone(), logical, &self.metrics, self.config.access_log);
            LogicalService {
                concrete,
                http,
                tcp: self.metrics.target(Direction::Outbound, name),
                policy_metrics: self.policy_metrics.clone(),
            }
        })
    }

    /// Serves `listener` until shutdown; `opaque` skips protocol detection.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        target: Arc<dyn Target>,
        opaque: bool,
    ) {
        let this = self.clone();
        server::accept_loop(
            listener,
            self.shutdown.clone(),
            self.tracker.clone(),
            move |stream, peer| Box::pin(this.clone().handle(stream, peer, target.clone(), opaque)),
        )
        .await;
    }

    async fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        target: Arc<dyn Target>,
        opaque_port: bool,
    ) {
        let service = match target.target(&stream) {
            Ok(service) => service,
            Err(error) => {
                tracing::warn!(%peer, %error, "outbound connection dropped");
                return;
            }
        };
        let logical = self.logical(&service);
        let series = logical.tcp.clone();
        let connect_timeout = self.clients.connect_timeout();
        let http = logical.http.clone();
        let metrics = self.metrics.clone();
        let opaque = |io: BoxIo| async move {
            opaque::forward(io, &logical.concrete.balance, connect_timeout, &metrics).await;
        };
        self.dispatcher
            .dispatch(stream, peer, &series, opaque_port, http, Some(opaque))
            .await;
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
