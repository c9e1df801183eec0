//! The outbound side: traffic the app sends to other services.
//!
//! Levels as in linkerd: [`target`] says which logical service a connection is for; the
//! logical level ([`logical`]) applies the service's routes and policy and chooses a concrete
//! backend service; the concrete level ([`concrete`]) owns a balancer fed by discovery and the
//! service's limits and breakers; the endpoint level ([`endpoint`]) connects to the address the
//! balancer picked. [`http`] assembles the HTTP stack; connections that are not HTTP go
//! through [`opaque`] straight to the concrete service's balancer. One [`LogicalService`] is
//! built per service on first use and shared by every connection for it.

pub mod concrete;
pub mod endpoint;
pub mod http;
pub mod logical;
pub mod opaque;
pub mod target;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrule_proto::names::ServiceRef;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use concrete::{Concrete, ConcreteConfig, Concretes};
use endpoint::EndpointConnector;
use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_api::policy::PolicyClient;
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_core::server::{self, BoxIo, Dispatcher, HttpStack};
use ferrule_proxy_policy::balance::Algorithm;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_transport::client::Clients;
use logical::Logical;
use target::Target;

/// Settings of the outbound side.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub algorithm: Algorithm,
    pub detect_timeout: Duration,
    pub endpoint_wait: Duration,
    pub access_log: bool,
}

/// A logical service: the concrete service of the same name and its HTTP stack.
pub struct LogicalService {
    concrete: Arc<Concrete>,
    http: HttpStack,
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
    logical: Mutex<HashMap<ServiceRef, Arc<LogicalService>>>,
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
        proxy_id: &str,
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
            discovery,
            EndpointConnector::new(clients.clone(), proxy_id),
            policy_metrics.clone(),
        );
        let dispatcher = Dispatcher {
            direction: Direction::Outbound,
            metrics: metrics.clone(),
            detect_timeout: config.detect_timeout,
            shutdown: shutdown.clone(),
        };
        Arc::new(Self {
            dispatcher,
            config,
            clients,
            concretes: Arc::new(concretes),
            policies,
            metrics,
            policy_metrics,
            logical: Mutex::default(),
            shutdown,
            tracker,
        })
    }

    /// The logical service `target`, subscribing to its endpoints on first use.
    pub fn logical(&self, target: &ServiceRef) -> Arc<LogicalService> {
        let mut logical = self.logical.lock().expect("logical cache lock poisoned");
        if let Some(l) = logical.get(target) {
            return l.clone();
        }
        let concrete = self.concretes.get(target);
        let http = http::stack(
            Logical {
                service: target.clone(),
                name: concrete.balance.name.clone(),
                policies: self.policies.watch(),
                parent: concrete.clone(),
                concretes: self.concretes.clone(),
                metrics: self.policy_metrics.clone(),
            },
            &self.metrics,
            self.config.access_log,
        );
        let l = Arc::new(LogicalService { concrete, http });
        logical.insert(target.clone(), l.clone());
        l
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
        let name = logical.concrete.balance.name.clone();
        let connect_timeout = self.clients.connect_timeout();
        let http = logical.http.clone();
        let metrics = self.metrics.clone();
        let opaque = |io: BoxIo| async move {
            opaque::forward(io, &logical.concrete.balance, connect_timeout, &metrics).await;
        };
        self.dispatcher
            .dispatch(stream, peer, name, opaque_port, http, Some(opaque))
            .await;
    }
}
