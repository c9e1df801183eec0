//! The inbound side: traffic from peers and clients to the app this proxy fronts.
//!
//! One listener per app port, or in transparent mode one listener for all of them
//! ([`transparent`]: the original destination's port says which). With mesh TLS
//! ([`InboundTls`]) a connection that starts with a TLS ClientHello is terminated here first
//! (mutual TLS: the client's verified identity becomes the connection's `peer_identity`);
//! plaintext is served too unless the proxy requires mutual TLS, when it is closed and
//! counted. Then the protocol is detected (unless the port is opaque): HTTP goes through the
//! port's stack ([`http`]), authorized per request; anything else is authorized once per
//! connection (a refused one is closed and counted) and copied to the app as bytes.

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
use ferrule_proxy_policy::authz::{Access, Authorizer};
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
    authz: Arc<Authorizer>,
    metrics: Metrics,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

struct Port {
    port: InboundPort,
    /// The part of the port's name after `service:`, for policies narrowed to ports.
    port_name: Option<Arc<str>>,
    http: HttpStack,
    series: Arc<TargetMetrics>,
}

impl Inbound {
    pub fn new(
        config: InboundConfig,
        clients: Clients,
        limit: http::LocalRateLimit,
        authz: Authorizer,
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
            authz: Arc::new(authz),
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
        let port_name: Option<Arc<str>> = port.name.split_once(':').map(|(_, p)| p.into());
        let guards = http::Guards {
            authz: self.authz.clone(),
            limit: self.limit.clone(),
            port_name: port_name.clone(),
        };
        let http = http::stack(
            port.name.clone(),
            port.app_addr,
            self.clients.clone(),
            guards,
            &self.metrics,
            self.config.access_log,
            &self.config.tracer,
        );
        let series = self.metrics.target(Direction::Inbound, port.name.clone());
        Arc::new(Port {
            port,
            port_name,
            http,
            series,
        })
    }

    async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, port: Arc<Port>) {
        let Some(tls) = &self.config.tls else {
            let opaque = |io: BoxIo| self.forward_opaque(io, &port, None);
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
        let (io, identity): (BoxIo, _) = match self.tls_or_plain(io, is_tls, tls, peer, &port).await
        {
            Some(accepted) => accepted,
            None => return,
        };
        let client = identity.clone();
        let opaque = |io: BoxIo| self.forward_opaque(io, &port, client.as_deref());
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

    /// Terminates mutual TLS, or takes a plaintext connection where that is allowed; `None`
    /// when the connection is refused (counted and logged here).
    async fn tls_or_plain<I: server::Io>(
        &self,
        io: I,
        is_tls: bool,
        tls: &InboundTls,
        peer: SocketAddr,
        port: &Port,
    ) -> Option<(BoxIo, Option<Arc<str>>)> {
        if !is_tls {
            if tls.require {
                self.metrics
                    .detected(Direction::Inbound, DetectResult::PlaintextRefused);
                tracing::info!(%peer, service = %port.port.name, "plaintext connection refused: this proxy requires mutual TLS");
                return None;
            }
            return Some((Box::new(io), None));
        }
        self.metrics.detected(Direction::Inbound, DetectResult::Tls);
        match tokio::time::timeout(tls.handshake_timeout, tls.tls.accept(io)).await {
            Ok(Ok((io, identity))) => Some((Box::new(io), Some(identity))),
            Ok(Err(error)) => {
                self.metrics
                    .proxy_error(Direction::Inbound, Reason::TlsHandshake);
                tracing::info!(%peer, %error, "mutual TLS refused");
                None
            }
            Err(_) => {
                self.metrics
                    .proxy_error(Direction::Inbound, Reason::TlsHandshake);
                tracing::info!(%peer, timeout = ?tls.handshake_timeout, "mutual TLS handshake timed out");
                None
            }
        }
    }

    /// Authorizes a connection of opaque TCP once, then copies it to the app; a refused one
    /// is closed and counted (`proxy_errors_total{reason="forbidden"}` and
    /// `authz_decisions_total`).
    async fn forward_opaque<I>(&self, io: I, port: &Port, client: Option<&str>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let access = Access::<()> {
            port: port.port_name.as_deref(),
            request: None,
            client,
        };
        if let Err(denial) = self.authz.check(&access) {
            self.metrics
                .proxy_error(Direction::Inbound, Reason::Forbidden);
            tracing::debug!(service = %port.port.name, %denial, "opaque connection refused");
            return;
        }
        let port = &port.port;
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
