//! The inbound side: traffic from peers and clients to the app this proxy fronts.
//!
//! One listener per app port, or in transparent mode one listener for all of them
//! ([`transparent`]: the original destination's port says which). With mesh TLS
//! ([`InboundTls`]) a connection that starts with a TLS ClientHello is terminated here first
//! (mutual TLS: the client's verified identity becomes the connection's `peer_identity`);
//! plaintext is served too unless the proxy requires mutual TLS, when it is closed and
//! counted. Then the protocol is detected (unless the port is opaque): HTTP goes through the
//! port's stack ([`http`]), anything else is copied to the app as bytes.

pub mod http;
pub mod transparent;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ferrule_proxy_core::detect::detect_tls;
use ferrule_proxy_core::errors::Reason;
use ferrule_proxy_core::metrics::DetectResult;
use ferrule_proxy_core::metrics::{Direction, Metrics, TargetMetrics};
use ferrule_proxy_core::server::{self, BoxIo, Dispatcher, HttpStack};
use ferrule_proxy_transport::client::{Clients, connect_tcp};
use ferrule_proxy_transport::tls::MeshTls;

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
    /// Mutual TLS from peer proxies; `None` when the proxy has no identity.
    pub tls: Option<InboundTls>,
}

/// How the inbound side takes mutual TLS.
#[derive(Debug, Clone)]
pub struct InboundTls {
    pub tls: MeshTls,
    /// Close plaintext connections instead of serving them as unauthenticated.
    pub require: bool,
    /// Bounds the TLS handshake.
    pub handshake_timeout: Duration,
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
        let port = self.port(port);
        let this = self.clone();
        server::accept_loop(
            listener,
            self.shutdown.clone(),
            self.tracker.clone(),
            move |stream, peer| Box::pin(this.clone().handle(stream, peer, port.clone())),
        )
        .await;
    }

    /// The stack and series of one app port.
    fn port(&self, port: InboundPort) -> Arc<Port> {
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
        Arc::new(Port { port, http, series })
    }

    async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, port: Arc<Port>) {
        let opaque = |io: BoxIo| self.forward_opaque(io, &port.port);
        let Some(tls) = &self.config.tls else {
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
            return;
        };
        let io = port.series.count_io(stream);
        // Peer proxies always speak first (the ClientHello), so this never stalls a meshed
        // client; a plaintext client of a server-speaks-first app waits at most the detection
        // timeout before it is served (or refused, when mutual TLS is required).
        let (is_tls, io) = match detect_tls(io, self.config.detect_timeout).await {
            Ok(detected) => detected,
            Err(error) => {
                tracing::debug!(%peer, %error, "connection failed during TLS detection");
                return;
            }
        };
        let (io, identity): (BoxIo, _) = if !is_tls {
            if tls.require {
                self.metrics
                    .detected(Direction::Inbound, DetectResult::PlaintextRefused);
                tracing::info!(%peer, service = %port.port.name, "plaintext connection refused: this proxy requires mutual TLS");
                return;
            }
            (Box::new(io), None)
        } else {
            self.metrics.detected(Direction::Inbound, DetectResult::Tls);
            match tokio::time::timeout(tls.handshake_timeout, tls.tls.accept(io)).await {
                Ok(Ok((io, identity))) => (Box::new(io), Some(identity)),
                Ok(Err(error)) => {
                    self.metrics
                        .proxy_error(Direction::Inbound, Reason::TlsHandshake);
                    tracing::info!(%peer, %error, "mutual TLS refused");
                    return;
                }
                Err(_) => {
                    self.metrics
                        .proxy_error(Direction::Inbound, Reason::TlsHandshake);
                    tracing::info!(%peer, timeout = ?tls.handshake_timeout, "mutual TLS handshake timed out");
                    return;
                }
            }
        };
        self.dispatcher
            .dispatch_io(
                io,
                peer,
                identity,
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
