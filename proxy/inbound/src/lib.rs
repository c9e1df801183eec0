//! The inbound side: traffic from peers and clients to the app this proxy fronts.
//!
//! One listener per app port. Each accepted connection is detected (unless the port is
//! opaque): HTTP goes through the port's stack ([`http`]), anything else is copied to the app
//! as bytes. mTLS termination will happen here, before detection.

pub mod http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ferrule_proxy_core::errors::Reason;
use ferrule_proxy_core::metrics::{Direction, Metrics, TargetMetrics};
use ferrule_proxy_core::server::{self, BoxIo, Dispatcher, HttpStack};
use ferrule_proxy_transport::client::{Clients, connect_tcp};

/// One app port this proxy fronts.
#[derive(Debug, Clone)]
pub struct InboundPort {
    /// What requests are counted under: `service` or `service:port-name`.
    pub name: Arc<str>,
    pub app_addr: SocketAddr,
    /// Skip detection: the app speaks first or is not HTTP.
    pub opaque: bool,
}

#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub detect_timeout: Duration,
    pub access_log: bool,
    /// Starts each request's server span (off: `Tracer::default()`).
    pub tracer: ferrule_proxy_core::trace::Tracer,
}

pub struct Inbound {
    config: InboundConfig,
    clients: Clients,
    limit: Arc<http::LocalRateLimit>,
    metrics: Metrics,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

struct Port {
    port: InboundPort,
    http: HttpStack,
    series: Arc<TargetMetrics>,
}

impl Inbound {
    pub fn new(
        config: InboundConfig,
        clients: Clients,
        limit: http::LocalRateLimit,
        metrics: Metrics,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        let dispatcher = Dispatcher {
            direction: Direction::Inbound,
            metrics: metrics.clone(),
            detect_timeout: config.detect_timeout,
            shutdown: shutdown.clone(),
        };
        Arc::new(Self {
            dispatcher,
            config,
            clients,
            limit: Arc::new(limit),
            metrics,
            shutdown,
            tracker,
        })
    }

    /// Serves one app port on `listener` until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, port: InboundPort) {
        let http = http::stack(
            port.name.clone(),
            port.app_addr,
            self.clients.clone(),
            self.limit.clone(),
            &self.metrics,
            self.config.access_log,
            &self.config.tracer,
        );
        let series = self.metrics.target(Direction::Inbound, port.name.clone());
        let port = Arc::new(Port { port, http, series });
        let this = self.clone();
        server::accept_loop(
            listener,
            self.shutdown.clone(),
            self.tracker.clone(),
            move |stream, peer| Box::pin(this.clone().handle(stream, peer, port.clone())),
        )
        .await;
    }

    async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, port: Arc<Port>) {
        let opaque = |io: BoxIo| self.forward_opaque(io, &port.port);
        self.dispatcher
            .dispatch(
                stream,
                peer,
                &port.series,
                port.port.opaque,
                port.http.clone(),
                Some(opaque),
            )
            .await;
    }

    async fn forward_opaque<I>(&self, io: I, port: &InboundPort)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match connect_tcp(port.app_addr, self.clients.connect_timeout()).await {
            Ok(app) => server::splice_tcp(io, app, port.app_addr).await,
            Err(error) => {
                tracing::info!(service = %port.name, %error, "opaque connection: app unreachable");
                self.metrics
                    .proxy_error(Direction::Inbound, Reason::UpstreamConnectFailure);
            }
        }
    }
}
