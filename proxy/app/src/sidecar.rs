//! Assembles a running proxy from its configuration: binds every listener, starts discovery
//! users, registration and the admin server, and owns the shutdown sequence.
//!
//! Shutdown (SIGTERM, `/shutdown`, or [`Proxy::shutdown`]): deregister the app's endpoints at
//! once, stop accepting, let in-flight requests and connections finish for up to the grace
//! period, then stop the admin listener. Peers that still send to this proxy see their
//! connection close before the request leaves and retry another endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use ferrule_proto::v1::ProtocolHint;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigError};
use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_api::policy::PolicyClient;
use ferrule_proxy_api::registration::{
    HealthCheck, HealthCheckKind, RegisteredPort, Registration, RegistrationConfig,
};
use ferrule_proxy_core::lifecycle::{Drain, Lifecycle};
use ferrule_proxy_core::metrics::{Direction, Metrics};
use ferrule_proxy_inbound::http::LocalRateLimit;
use ferrule_proxy_inbound::transparent::AppPorts;
use ferrule_proxy_inbound::{Inbound, InboundConfig, InboundPort, InboundTls};
use ferrule_proxy_outbound::target::{DEFAULT_OPAQUE_PORTS, Fixed, OrigDst};
use ferrule_proxy_outbound::{Outbound, OutboundConfig};
use ferrule_proxy_policy::PolicySet;
use ferrule_proxy_policy::authz::Authorizer;
use ferrule_proxy_policy::metrics::PolicyMetrics;
use ferrule_proxy_transport::client::{ClientConfig, Clients};
use ferrule_proxy_transport::metrics::PoolMetrics;
use ferrule_proxy_transport::orig_dst;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tracing(#[from] ferrule_trace::export::ExportError),
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Bounds a mutual TLS handshake on an inbound listener.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where each listener is bound (useful when configured with port 0).
#[derive(Debug, Clone, Serialize)]
pub struct BoundAddrs {
    pub admin: SocketAddr,
    /// App port name ("" for `--app-addr`) → inbound listener.
    pub inbound: Vec<(String, SocketAddr)>,
    /// Upstream service (`name[:port]`) → local listener.
    pub upstreams: Vec<(String, SocketAddr)>,
    /// The transparent-mode outbound listener (`--transparent`).
    pub outbound: Option<SocketAddr>,
    /// Transparent mode's inbound listeners (every app port; IPv4, then its IPv6 sibling).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transparent_inbound: Vec<SocketAddr>,
}

impl BoundAddrs {
    /// The local listener of an upstream service.
    pub fn upstream(&self, service: &str) -> Option<SocketAddr> {
        self.upstreams
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, a)| *a)
    }

    /// The inbound listener of an app port ("" for `--app-addr`).
    pub fn inbound_port(&self, name: &str) -> Option<SocketAddr> {
        self.inbound
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }
}

/// A running proxy.
pub struct Proxy {
    pub addrs: BoundAddrs,
    pub metrics: Metrics,
    lifecycle: Lifecycle,
}

async fn bind(what: impl Into<String>, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let what = what.into();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what: what.clone(),
            addr,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| StartError::Bind {
        what: what.clone(),
        addr,
        source,
    })?;
    tracing::info!(listener = %what, addr = %bound, "listening");
    Ok(listener)
}

/// Binds `addr` and, for `127.0.0.1` or `0.0.0.0`, the same port on `::1` or `::` (IPv6
/// only), where ip6tables' redirects arrive. A host without IPv6 gets the IPv4 listener alone.
async fn with_ipv6_sibling(what: &str, addr: SocketAddr) -> Result<Vec<TcpListener>, StartError> {
    let v4 = bind(what, addr).await?;
    let bound = v4.local_addr().unwrap_or(addr);
    let mut listeners = vec![v4];
    if let Some(v6) = orig_dst::ipv6_sibling(bound) {
        match orig_dst::bind_ipv6_only(v6) {
            Ok(listener) => {
                tracing::info!(listener = %what, addr = %v6, "listening");
                listeners.push(listener);
            }
            Err(error) => tracing::info!(listener = %what, addr = %v6, %error, "no IPv6 listener"),
        }
    }
    Ok(listeners)
}

impl Proxy {
    /// Binds every listener and starts serving. The binary passes discovery from the
    /// controllers; tests pass [`Discovery::fixed`]. Policies come from the controllers'
    /// `Config` stream (for the proxy's service and its upstreams), or are the defaults when
    /// there is no controller.
    pub async fn start(config: Config, discovery: Discovery) -> Result<Proxy, StartError> {
        Self::start_with_policies(config, discovery, None).await
    }

    /// [`Proxy::start`] with the policies given (tests pass [`PolicyClient::fixed`]) instead
    /// of following the controllers.
    pub async fn start_with_policies(
        mut config: Config,
        discovery: Discovery,
        policies: Option<PolicyClient>,
    ) -> Result<Proxy, StartError> {
        let app_ports = config.app_ports()?;
        let proxy_id = config.proxy_id();
        let shutdown = CancellationToken::new();
        let policies = policies.unwrap_or_else(|| {
            match config.common.controllers("config") {
                // Targets subscribe to their policy as they are first used (the configured
                // upstreams below, at once).
                Some(controllers) => PolicyClient::spawn(
                    controllers,
                    config.proxy_info(&proxy_id),
                    shutdown.child_token(),
                ),
                None => PolicyClient::fixed(PolicySet::default()),
            }
        });
        // Listeners and connections stop on `serving`; the admin server outlives them.
        let serving = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Metrics::new();
        let policy_metrics = PolicyMetrics::register(&metrics);
        ferrule_proxy_api::metrics::register(&metrics, discovery.clone(), Some(policies.clone()));
        let pool_metrics = PoolMetrics::register(&metrics);
        // The workload's identity: a certificate from the mesh CA, renewed in the background.
        let tls = crate::identity::start(
            &config.common,
            config.service.as_deref().unwrap_or_default(),
            &config.namespace,
            &metrics,
            &shutdown,
        )?;
        let tracer = crate::trace::tracer(
            &config.common,
            config.service.as_deref().unwrap_or("ferrule-proxy"),
            "sidecar",
            &proxy_id,
            &metrics,
        )?;
        let pool_config = ClientConfig {
            connect_timeout: config.common.connect_timeout,
            idle_timeout: config.common.idle_timeout,
        };
        // A pool per side: the app's address and an endpoint's never share a connection.
        let app_clients = Clients::new(Direction::Inbound, pool_config, &pool_metrics);
        let peer_clients = Clients::new(Direction::Outbound, pool_config, &pool_metrics)
            .with_tls(tls.as_ref().map(|(tls, _)| tls.clone()));

        let admin_listener = bind("admin", config.common.admin_addr).await?;
        let mut inbound_listeners = Vec::new();
        // Transparent mode: one inbound listener (and its IPv6 sibling) for every app port.
        let transparent_inbound = match config.transparent {
            true => with_ipv6_sibling("inbound (transparent)", config.inbound_addr).await?,
            false => Vec::new(),
        };
        for port in app_ports.iter().filter(|_| !config.transparent) {
            let what = if port.name.is_empty() {
                "inbound".to_string()
            } else {
                format!("inbound {}", port.name)
            };
            inbound_listeners.push((port.clone(), bind(what, port.listen).await?));
        }
        let transparent_listeners = match config.transparent {
            true => with_ipv6_sibling("outbound (transparent)", config.outbound_addr).await?,
            false => Vec::new(),
        };
        let mut upstream_listeners = Vec::new();
        for upstream in &config.upstreams {
            let listener = bind(format!("upstream {}", upstream.service), upstream.listen).await?;
            upstream_listeners.push((upstream.clone(), listener));
        }

        let local = |l: &TcpListener, addr: SocketAddr| l.local_addr().unwrap_or(addr);
        let addrs = BoundAddrs {
            admin: local(&admin_listener, config.common.admin_addr),
            inbound: inbound_listeners
                .iter()
                .map(|(p, l)| (p.name.clone(), local(l, p.listen)))
                .collect(),
            upstreams: upstream_listeners
                .iter()
                .map(|(u, l)| (u.service.to_string(), local(l, u.listen)))
                .collect(),
            outbound: transparent_listeners
                .first()
                .map(|l| local(l, config.outbound_addr)),
            transparent_inbound: transparent_inbound
                .iter()
                .map(|l| local(l, config.inbound_addr))
                .collect(),
        };

        let outbound = Outbound::new(
            OutboundConfig {
                tracer: tracer.clone(),
                algorithm: config.common.balancer,
                detect_timeout: config.common.detect_timeout,
                endpoint_wait: config.common.endpoint_wait,
                target_idle: config.common.target_idle_timeout,
                access_log: config.common.access_log,
            },
            discovery.clone(),
            policies.clone(),
            peer_clients,
            metrics.clone(),
            policy_metrics.clone(),
            serving.clone(),
            tracker.clone(),
        );
        for (upstream, listener) in upstream_listeners {
            // Subscribe now, so discovery (and `/ready`) does not wait for the first request,
            // and hold the target for as long as its listener serves: a configured upstream
            // is never idle-evicted (its discovery watch is what `/ready` reports on).
            let pinned = outbound.logical(&upstream.service);
            let target = Arc::new(Fixed {
                opaque: config.opaque_ports.contains(&upstream.listen.port()),
                service: upstream.service,
            });
            let serve = outbound.clone().serve(listener, target);
            tokio::spawn(async move {
                serve.await;
                drop(pinned);
            });
        }
        if !transparent_listeners.is_empty() {
            let target = Arc::new(OrigDst::new(discovery.clone(), &config.opaque_ports));
            for listener in transparent_listeners {
                tokio::spawn(outbound.clone().serve(listener, target.clone()));
            }
        }

        // The app's service by qualified name (`name`, or `name.namespace` outside the
        // default namespace): the key of its policy and the label of its inbound series.
        let service = config
            .service
            .as_deref()
            .map(|s| ferrule_proto::names::qualified(&config.namespace, s))
            .unwrap_or_default();
        let inbound = Inbound::new(
            InboundConfig {
                detect_timeout: config.common.detect_timeout,
                access_log: config.common.access_log,
                tls: tls.as_ref().map(|(tls, _)| InboundTls {
                    tls: tls.clone(),
                    require: config.common.identity.require_mtls,
                    handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
                }),
                tracer: tracer.clone(),
            },
            app_clients,
            LocalRateLimit::new(policies.watch(), &service, policy_metrics),
            Authorizer::new(policies.watch(), &service, &metrics),
            metrics.clone(),
            serving.clone(),
            tracker.clone(),
        );
        let mut registered_ports = Vec::new();
        for (port, listener) in inbound_listeners {
            let opaque = config.opaque_ports.contains(&port.app_addr.port());
            let name = if port.name.is_empty() {
                service.clone()
            } else {
                format!("{service}:{}", port.name)
            };
            let listen = local(&listener, port.listen);
            let advertise = if listen.ip().is_unspecified() {
                SocketAddr::new(config.advertise_ip, listen.port())
            } else {
                listen
            };
            registered_ports.push(RegisteredPort {
                port_name: port.name.clone(),
                app_addr: port.app_addr,
                advertise,
                protocol_hint: if opaque {
                    ProtocolHint::Opaque
                } else {
                    ProtocolHint::Unspecified
                },
            });
            let inbound_port = InboundPort {
                name: name.into(),
                app_addr: port.app_addr,
                opaque,
            };
            tokio::spawn(inbound.clone().serve(listener, inbound_port));
        }

        if config.transparent {
            // Peers dial the app's own ports on this pod's address; the init rules bring
            // them here.
            let opaque_ports = match config.opaque_ports.is_empty() {
                true => DEFAULT_OPAQUE_PORTS.to_vec(),
                false => config.opaque_ports.clone(),
            };
            let mut ports = Vec::new();
            for port in &app_ports {
                let opaque = opaque_ports.contains(&port.app_addr.port());
                registered_ports.push(RegisteredPort {
                    port_name: port.name.clone(),
                    app_addr: port.app_addr,
                    advertise: SocketAddr::new(config.advertise_ip, port.app_addr.port()),
                    protocol_hint: if opaque {
                        ProtocolHint::Opaque
                    } else {
                        ProtocolHint::Unspecified
                    },
                });
                ports.push(InboundPort {
                    name: match port.name.is_empty() {
                        true => service.clone().into(),
                        false => format!("{service}:{}", port.name).into(),
                    },
                    app_addr: port.app_addr,
                    opaque,
                });
            }
            let app = AppPorts {
                service: service.clone().into(),
                ports,
                opaque_ports,
            };
            for listener in transparent_inbound {
                tokio::spawn(inbound.clone().serve_transparent(listener, app.clone()));
            }
        }

        let mut proxy_info = config.proxy_info(&proxy_id);
        // What `ferrule stat`/`top`/`tap` dial: a wildcard bind is reached at the advertised IP.
        proxy_info.admin_address = match addrs.admin.ip().is_unspecified() {
            true => SocketAddr::new(config.advertise_ip, addrs.admin.port()).to_string(),
            false => addrs.admin.to_string(),
        };
        // A sidecar with no app port of its own registers nothing, but with an identity it
        // still announces itself, so its certificate shows in `ferrule identity status`.
        let fronts_app = !registered_ports.is_empty();
        let registration = ((fronts_app || tls.is_some()) && !config.common.controllers.is_empty())
            .then(|| {
                let health = HealthCheck {
                    kind: match &config.health_path {
                        Some(path) => HealthCheckKind::Http { path: path.clone() },
                        None => HealthCheckKind::Tcp,
                    },
                    interval: config.health_interval,
                    timeout: config.health_timeout,
                    healthy_threshold: config.healthy_threshold,
                    unhealthy_threshold: config.unhealthy_threshold,
                };
                Arc::new(Registration::spawn_with(
                    RegistrationConfig {
                        proxy: proxy_info.clone(),
                        ports: registered_ports,
                        labels: config.labels.clone(),
                        zone: config.zone.clone(),
                        ttl: config.register_ttl,
                        health,
                        identity: tls.as_ref().map(|(_, id)| id.clone()).unwrap_or_default(),
                        gate: tls
                            .as_ref()
                            .map(|(tls, _)| crate::identity::has_certificate(tls, &shutdown)),
                        certificate: tls.as_ref().map(|(tls, _)| {
                            ferrule_proxy_api::identity::reports(tls, shutdown.child_token())
                        }),
                    },
                    config.common.controllers("registration"),
                    shutdown.child_token(),
                ))
            });

        let config_json = serde_json::json!({
            "proxy_id": proxy_id,
            "version": env!("CARGO_PKG_VERSION"),
            "config": config,
            "listeners": addrs,
        });
        let admin_state = Arc::new(AdminState {
            identity: tls.map(|(tls, _)| tls),
            metrics: metrics.clone(),
            discovery,
            needs_discovery: !config.upstreams.is_empty() && !config.common.controllers.is_empty(),
            // `/ready` waits for registration only where there is something to register.
            registration: registration.clone().filter(|_| fronts_app),
            config: config_json,
            gateway: None,
            policies: Some(policies),
            tracer,
            shutdown: shutdown.clone(),
        });
        let lifecycle = Lifecycle::start(
            shutdown,
            admin::spawn(admin_listener, admin_state),
            Drain {
                serving,
                tracker,
                grace: config.common.shutdown_grace,
            },
            async move {
                if let Some(registration) = &registration {
                    tracing::info!("shutting down: deregistering");
                    registration.deregister().await;
                }
            },
        );
        tracing::info!(%proxy_id, "proxy started");
        Ok(Proxy {
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
