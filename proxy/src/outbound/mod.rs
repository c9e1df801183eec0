//! The outbound side: traffic the app sends to other services.
//!
//! Levels as in linkerd: [`target`] says which logical service a connection is for; the
//! logical service owns a balancer fed by discovery and an HTTP stack ([`http`]); the endpoint
//! level ([`endpoint`]) connects to the address the balancer picked. Connections that are not
//! HTTP go through [`opaque`]. One [`Logical`] is built per service on first use and shared by
//! every connection for it.

pub mod endpoint;
pub mod http;
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

use crate::balance::{Algorithm, Balancer};
use crate::client::Clients;
use crate::detect::detect;
use crate::discovery::Discovery;
use crate::metrics::{DetectResult, Direction, Metrics};
use crate::server::{self, ConnMeta, HttpStack, HttpVersion};
use endpoint::EndpointConnector;
use http::BalanceTarget;
use target::Target;

/// Settings of the outbound side.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub algorithm: Algorithm,
    pub detect_timeout: Duration,
    pub endpoint_wait: Duration,
    pub access_log: bool,
}

/// A logical service: its balancer and HTTP stack.
pub struct Logical {
    balance: BalanceTarget,
    http: HttpStack,
}

impl Logical {
    /// The service's HTTP stack, for listeners other than the outbound ones (the gateway).
    pub fn http(&self) -> HttpStack {
        self.http.clone()
    }
}

pub struct Outbound {
    config: OutboundConfig,
    discovery: Discovery,
    clients: Clients,
    connector: EndpointConnector,
    metrics: Metrics,
    logical: Mutex<HashMap<ServiceRef, Arc<Logical>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Outbound {
    pub fn new(
        config: OutboundConfig,
        discovery: Discovery,
        clients: Clients,
        proxy_id: &str,
        metrics: Metrics,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            discovery,
            connector: EndpointConnector::new(clients.clone(), proxy_id),
            clients,
            metrics,
            logical: Mutex::default(),
            shutdown,
            tracker,
        })
    }

    /// The logical service `target`, subscribing to its endpoints on first use.
    pub fn logical(&self, target: &ServiceRef) -> Arc<Logical> {
        let mut logical = self.logical.lock().expect("logical cache lock poisoned");
        if let Some(l) = logical.get(target) {
            return l.clone();
        }
        let endpoints = self.discovery.resolve(target);
        let balancer = Balancer::new(endpoints.clone(), self.config.algorithm);
        let name: Arc<str> = target.to_string().into();
        self.metrics
            .watch_balancer(name.to_string(), balancer.clone());
        let balance = BalanceTarget {
            service: target.clone(),
            name,
            endpoints,
            balancer,
            wait: self.config.endpoint_wait,
        };
        let http = http::stack(
            balance.clone(),
            self.connector.clone(),
            &self.metrics,
            self.config.access_log,
        );
        let l = Arc::new(Logical { balance, http });
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
        opaque: bool,
    ) {
        let service = match target.target(&stream) {
            Ok(service) => service,
            Err(error) => {
                tracing::warn!(%peer, %error, "outbound connection dropped");
                return;
            }
        };
        let logical = self.logical(&service);
        let name = logical.balance.name.clone();
        let io = self
            .metrics
            .count_io(&Metrics::tcp_labels(Direction::Outbound, &name), stream);
        let connect_timeout = self.clients.connect_timeout();
        if opaque {
            self.metrics
                .detected(Direction::Outbound, DetectResult::OpaquePort);
            opaque::forward(io, &logical.balance, connect_timeout, &self.metrics).await;
            return;
        }
        let (result, io) = match detect(io, self.config.detect_timeout).await {
            Ok(detected) => detected,
            Err(error) => {
                tracing::debug!(%peer, %error, "connection failed during detection");
                return;
            }
        };
        self.metrics.detected(Direction::Outbound, result);
        let meta = ConnMeta {
            direction: Direction::Outbound,
            target: name.clone(),
            client: peer,
        };
        let version = match result {
            DetectResult::Http1 => HttpVersion::Http1,
            DetectResult::Http2 => HttpVersion::Http2,
            DetectResult::MalformedHttp => {
                server::refuse_malformed(io, &meta, &self.metrics).await;
                return;
            }
            DetectResult::Opaque | DetectResult::Timeout | DetectResult::OpaquePort => {
                opaque::forward(io, &logical.balance, connect_timeout, &self.metrics).await;
                return;
            }
        };
        server::serve_http(
            io,
            version,
            logical.http.clone(),
            meta,
            self.shutdown.clone(),
        )
        .await;
    }
}
