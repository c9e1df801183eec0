//! The proxy's configuration: one struct, parsed from flags and `FERRULE_*` environment
//! variables, with every default written here.
//!
//! Listeners: `--outbound-addr` (transparent mode, with `--transparent`), `--inbound-addr`,
//! `--admin-addr`.
//! App ports: `--app-addr ADDR` for one unnamed port, or `--app-port NAME=ADDR` (repeatable) for
//! named ports; the first app port listens on `--inbound-addr`, each further one on its
//! `--inbound-port NAME=ADDR` if given, else on `--inbound-addr`'s IP with a port the system
//! picks (shown in the log and on `/config`). Upstreams (explicit mode):
//! `--upstream NAME[:PORT]=ADDR` opens a local listener at ADDR for service NAME (port name
//! PORT). Every listener may bind port 0. Discovery comes from `--controller`s, or, without
//! a controller (benchmarks, static setups), from `--static-endpoint`s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferrule_proto::names::{ServiceRef, validate_label, validate_service};
use ferrule_proto::ports;
use ferrule_proto::v1::{Endpoint, ProxyInfo};
use ferrule_proxy_core::logging::LogFormat;
use serde::Serialize;

use ferrule_proxy_policy::balance::Algorithm;

/// `NAME=ADDR`: a named app port, inbound port or upstream listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedAddr {
    pub name: String,
    pub addr: SocketAddr,
}

/// `NAME[:PORT]=ADDR`: a local listener for an upstream service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstream {
    #[serde(serialize_with = "display")]
    pub service: ServiceRef,
    pub listen: SocketAddr,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn humantime_ser<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn algorithm_ser<S: serde::Serializer>(a: &Algorithm, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match a {
        Algorithm::PeakEwma => "p2c-ewma",
        Algorithm::RoundRobin => "round-robin",
        Algorithm::LeastRequest => "least-request",
    })
}

fn parse_named_addr(s: &str) -> Result<NamedAddr, String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=ADDR"))?;
    validate_label("port name", name).map_err(|e| e.to_string())?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an IP:PORT address: {e}"))?;
    Ok(NamedAddr {
        name: name.to_string(),
        addr,
    })
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let (service, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SERVICE[:PORT]=127.0.0.1:LOCALPORT"))?;
    let service = ServiceRef::parse(service).map_err(|e| e.to_string())?;
    let listen = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an IP:PORT address: {e}"))?;
    Ok(Upstream { service, listen })
}

/// `SERVICE[:PORT]=ADDR[/meshed]`: an endpoint known without a controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaticEndpoint {
    #[serde(serialize_with = "display")]
    pub service: ServiceRef,
    pub addr: SocketAddr,
    /// A ferrule proxy's inbound listener: spoken to with the mesh protocol.
    pub meshed: bool,
}

fn parse_static_endpoint(s: &str) -> Result<StaticEndpoint, String> {
    let (service, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SERVICE[:PORT]=ADDR[/meshed]"))?;
    let service = ServiceRef::parse(service).map_err(|e| e.to_string())?;
    let (addr, meshed) = match addr.strip_suffix("/meshed") {
        Some(addr) => (addr, true),
        None => (addr, false),
    };
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an IP:PORT address: {e}"))?;
    Ok(StaticEndpoint {
        service,
        addr,
        meshed,
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// The flags every mode has (sidecar and gateway), with the same names, environment variables
/// and defaults in both.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct CommonArgs {
    /// Controller gRPC addresses, tried in turn.
    #[arg(long = "controller", env = "FERRULE_CONTROLLER", value_delimiter = ',')]
    pub controllers: Vec<String>,

    /// Where the admin listener (/live, /ready, /metrics, /config, /tap, /shutdown) binds.
    #[arg(long, env = "FERRULE_PROXY_ADMIN_ADDR", default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::PROXY_ADMIN)))]
    pub admin_addr: SocketAddr,

    /// How long protocol detection waits for the client's first bytes (before treating the
    /// connection as opaque; the gateway closes it).
    #[arg(long, env = "FERRULE_PROXY_DETECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub detect_timeout: Duration,

    /// Load-balancing algorithm across a service's endpoints: p2c-ewma (power of two choices
    /// over peak-EWMA latency), round-robin or least-request.
    #[arg(long, env = "FERRULE_PROXY_BALANCER", default_value = "p2c-ewma")]
    #[serde(serialize_with = "algorithm_ser")]
    pub balancer: Algorithm,

    /// How long a request waits for an available endpoint before failing with 503.
    #[arg(long, env = "FERRULE_PROXY_ENDPOINT_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub endpoint_wait: Duration,

    /// How long a target (a service this proxy calls) may go unused before its stacks,
    /// discovery watch and metric series are dropped.
    #[arg(long, env = "FERRULE_PROXY_TARGET_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub target_idle_timeout: Duration,

    /// How long a TCP connect to the app or to an endpoint may take before it fails.
    #[arg(long, env = "FERRULE_PROXY_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub connect_timeout: Duration,

    /// How long a pooled connection (to the app, or to an endpoint) stays open while it
    /// carries no request. The default is `ServicePolicy`'s `timeouts.idle` default; a
    /// service's own `timeouts.idle` applies to connections to its endpoints.
    #[arg(long, env = "FERRULE_PROXY_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub idle_timeout: Duration,

    /// Unique id of this proxy; generated when absent (from the service, or the gateway's
    /// name).
    #[arg(long, env = "FERRULE_PROXY_ID")]
    pub proxy_id: Option<String>,

    /// Log line format on stderr: plain text or one JSON object per line (RUST_LOG filters).
    #[arg(long, env = "FERRULE_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// One log line per request, at info, target "access".
    #[arg(long, env = "FERRULE_PROXY_ACCESS_LOG")]
    pub access_log: bool,

    /// How long shutdown waits for in-flight requests and connections.
    #[arg(long, env = "FERRULE_PROXY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub shutdown_grace: Duration,

    /// The OTLP collector to export trace spans to, e.g. http://127.0.0.1:4317 (gRPC) or
    /// http://127.0.0.1:4318 (with --otlp-protocol http/protobuf). Without it tracing is off
    /// and costs nothing.
    #[arg(long, env = "FERRULE_PROXY_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// How spans reach the collector: grpc or http/protobuf.
    #[arg(
        long,
        env = "FERRULE_PROXY_OTLP_PROTOCOL",
        default_value = "grpc",
        value_name = "PROTOCOL"
    )]
    #[serde(serialize_with = "protocol_ser")]
    pub otlp_protocol: ferrule_trace::Protocol,

    /// The share of new traces sampled, 0 to 1 (a request that carries a trace context follows
    /// its caller's decision). Changeable live: `POST /tracing?sample_ratio=R` on the admin
    /// listener, from loopback.
    #[arg(long, env = "FERRULE_PROXY_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio, value_name = "RATIO")]
    pub trace_sample_ratio: f64,

    /// The most finished spans held for export; beyond it spans are dropped and counted
    /// (trace_spans_dropped_total), so a slow or dead collector never costs memory.
    #[arg(
        long,
        env = "FERRULE_PROXY_TRACE_QUEUE_SIZE",
        default_value_t = 2048,
        value_name = "SPANS"
    )]
    pub trace_queue_size: usize,

    /// Runtime worker threads. 1 (the default) runs every connection on one thread, as one
    /// nginx worker or one HAProxy thread does: a sidecar serves one app, and one thread
    /// wastes no CPU on cross-thread wake-ups (bench/results/threads.md has the measurement).
    /// 0 means one per CPU, for a proxy that must use a whole machine (a busy gateway).
    #[arg(
        long,
        env = "FERRULE_PROXY_THREADS",
        default_value_t = 1,
        value_name = "N"
    )]
    pub threads: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub identity: IdentityArgs,

    /// TLS to the controllers, made once ([`CommonArgs::control_tls`]) and shared by every
    /// channel, so they all present the certificate the identity client keeps current.
    #[arg(skip)]
    #[serde(skip)]
    control_tls: std::sync::Arc<std::sync::OnceLock<ferrule_proxy_api::control::ControlTls>>,
}

/// The proxy's workload identity and mutual TLS (docs/identity.md).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct IdentityArgs {
    /// Join token for the proxy's first certificate (`ferrule identity token create`). With a
    /// token (or a token file) the proxy gets a certificate from the controller's mesh CA and
    /// speaks mutual TLS to peers that have an identity; without, it runs without identity.
    #[arg(
        long,
        env = "FERRULE_IDENTITY_TOKEN",
        conflicts_with = "identity_token_file"
    )]
    #[serde(skip)]
    pub identity_token: Option<String>,

    /// File holding the bootstrap token (a Kubernetes projected service-account token, or a
    /// join token), read at start and again whenever a certificate is asked for with it.
    #[arg(long, env = "FERRULE_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<std::path::PathBuf>,

    /// The mesh's trust domain (the controller's `--trust-domain`).
    #[arg(long, env = "FERRULE_TRUST_DOMAIN", default_value = ferrule_proto::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The mesh's trust anchors (PEM, `trust-anchors.pem` of `ferrule identity init`): the
    /// proxy then talks TLS to the controller and accepts it only with the controller's
    /// identity (spiffe://<trust-domain>/ns/ferrule-system/sa/ferrule-controller) chaining to
    /// them; needed when the controller's API is protected (docs/identity.md). E.g.
    /// --identity-trust-anchors /var/run/ferrule/trust-anchors.pem
    #[arg(long, env = "FERRULE_IDENTITY_TRUST_ANCHORS", value_name = "PEM")]
    pub identity_trust_anchors: Option<std::path::PathBuf>,

    /// The same trust anchors as PEM text instead of a file: how injected pods get them (the
    /// webhook puts the controller's bundle into FERRULE_IDENTITY_TRUST_ANCHORS_PEM, as Linkerd
    /// does). Read once at start; the proxy also trusts anchors the controller's bundle stream
    /// adds later. E.g. FERRULE_IDENTITY_TRUST_ANCHORS_PEM="$(cat trust-anchors.pem)"
    #[arg(
        long,
        env = "FERRULE_IDENTITY_TRUST_ANCHORS_PEM",
        value_name = "PEM_TEXT",
        conflicts_with = "identity_trust_anchors",
        allow_hyphen_values = true,
        hide_env_values = true
    )]
    #[serde(skip)]
    pub identity_trust_anchors_pem: Option<String>,

    /// The workload's service account: the `<sa>` of its identity
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`. Default: the service name.
    #[arg(long, env = "FERRULE_PROXY_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Accept only mutual TLS on the inbound listeners: plaintext connections (from clients
    /// outside the mesh) are closed and counted. Default: served, as unauthenticated.
    #[arg(long, env = "FERRULE_PROXY_REQUIRE_MTLS")]
    pub require_mtls: bool,
}

impl IdentityArgs {
    /// The identity settings, when the proxy is to have an identity; `account` is the
    /// default service account (the service name), `namespace` the workload's.
    pub fn settings(
        &self,
        account: &str,
        namespace: &str,
    ) -> Result<Option<ferrule_proxy_api::identity::IdentitySettings>, ConfigError> {
        let token = match (&self.identity_token, &self.identity_token_file) {
            (Some(token), _) => token.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Invalid {
                    flag: "--identity-token-file",
                    reason: format!("reading {}: {e}", path.display()),
                })?
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        if token.is_empty() {
            return Err(ConfigError::Invalid {
                flag: "--identity-token",
                reason: "is empty".into(),
            });
        }
        let account = self.service_account.as_deref().unwrap_or(account);
        let expected =
            ferrule_proto::identity::SpiffeId::new(&self.trust_domain, namespace, account)
                .map_err(|e| ConfigError::Invalid {
                    flag: "--service-account",
                    reason: e.to_string(),
                })?;
        Ok(Some(ferrule_proxy_api::identity::IdentitySettings {
            token,
            token_file: self
                .identity_token
                .is_none()
                .then(|| self.identity_token_file.clone())
                .flatten(),
            expected: expected.to_string(),
        }))
    }
}

fn protocol_ser<S: serde::Serializer>(
    p: &ferrule_trace::Protocol,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(match p {
        ferrule_trace::Protocol::Grpc => "grpc",
        ferrule_trace::Protocol::HttpProtobuf => "http/protobuf",
    })
}

/// A sampling ratio: a number from 0 to 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio from 0 to 1 (e.g. 0.01 for 1 %)"
        )),
    }
}

impl CommonArgs {
    /// TLS to the controllers when `--identity-trust-anchors` (or its PEM-text twin
    /// `--identity-trust-anchors-pem`) is given; made at the first call and the same for every
    /// later one.
    pub fn control_tls(
        &self,
    ) -> Result<Option<ferrule_proxy_api::control::ControlTls>, ConfigError> {
        if let Some(tls) = self.control_tls.get() {
            return Ok(Some(tls.clone()));
        }
        let (flag, anchors) = match (
            &self.identity.identity_trust_anchors,
            &self.identity.identity_trust_anchors_pem,
        ) {
            (Some(path), _) => (
                "--identity-trust-anchors",
                ferrule_channel::read_certificates(path),
            ),
            (None, Some(pem)) => (
                "--identity-trust-anchors-pem (FERRULE_IDENTITY_TRUST_ANCHORS_PEM)",
                ferrule_channel::certificates_from_pem(pem.as_bytes(), "the PEM text"),
            ),
            (None, None) => return Ok(None),
        };
        let invalid = |reason: String| ConfigError::Invalid { flag, reason };
        let anchors = anchors.map_err(|e| invalid(e.to_string()))?;
        let tls = ferrule_proxy_api::control::ControlTls::new(anchors, &self.identity.trust_domain)
            .map_err(invalid)?;
        Ok(Some(self.control_tls.get_or_init(|| tls).clone()))
    }

    /// The controllers with their TLS, or an error naming the flag.
    pub fn parse_controllers(
        &self,
    ) -> Result<ferrule_proxy_api::control::Controllers, ConfigError> {
        let controllers = ferrule_proxy_api::control::Controllers::parse(&self.controllers)
            .map_err(|e| ConfigError::Invalid {
                flag: "--controller",
                reason: e.to_string(),
            })?;
        Ok(controllers.with_tls(self.control_tls()?))
    }

    /// [`CommonArgs::parse_controllers`] for a component that may run without a controller:
    /// none configured is logged at info, a bad flag at error.
    pub fn controllers(&self, component: &str) -> Option<ferrule_proxy_api::control::Controllers> {
        if self.controllers.is_empty() {
            tracing::info!(component, "no controller configured");
            return None;
        }
        self.parse_controllers()
            .inspect_err(|error| tracing::error!(component, %error, "no usable controller"))
            .ok()
    }

    /// `--proxy-id`, else `{name}-{pid}-{random}`, written back so that every later call
    /// returns the same id: call it once, early, and pass the id on.
    pub fn resolve_proxy_id(&mut self, name: &str) -> String {
        self.proxy_id
            .get_or_insert_with(|| {
                format!(
                    "{name}-{}-{:04x}",
                    std::process::id(),
                    rand::random::<u16>()
                )
            })
            .clone()
    }
}

#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "ferrule-proxy", version, about = "Ferrule's sidecar proxy")]
pub struct Config {
    /// Another mode of the same binary; without one, the sidecar runs.
    #[command(subcommand)]
    #[serde(skip)]
    pub mode: Option<Mode>,

    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,

    /// Service this proxy fronts; with app ports it registers them under this name.
    #[arg(long, env = "FERRULE_PROXY_SERVICE", value_parser = parse_service)]
    pub service: Option<String>,

    /// Namespace of the proxy's service (its registrations and policies). Upstreams and
    /// static endpoints name services as `name` (default namespace) or `name.namespace`.
    #[arg(long, env = "FERRULE_PROXY_NAMESPACE", default_value = "default", value_parser = parse_namespace)]
    pub namespace: String,

    /// The app's single unnamed port.
    #[arg(long, env = "FERRULE_PROXY_APP_ADDR", conflicts_with = "app_ports")]
    pub app_addr: Option<SocketAddr>,

    /// A named app port, NAME=ADDR (repeatable).
    #[arg(long = "app-port", env = "FERRULE_PROXY_APP_PORTS", value_delimiter = ',', value_parser = parse_named_addr)]
    pub app_ports: Vec<NamedAddr>,

    /// Where the inbound listener of a named app port (other than the first) binds.
    #[arg(long = "inbound-port", env = "FERRULE_PROXY_INBOUND_PORTS", value_delimiter = ',', value_parser = parse_named_addr)]
    pub inbound_ports: Vec<NamedAddr>,

    /// A local listener for an upstream service, SERVICE[:PORT]=ADDR (repeatable).
    #[arg(long = "upstream", env = "FERRULE_PROXY_UPSTREAMS", value_delimiter = ',', value_parser = parse_upstream)]
    pub upstreams: Vec<Upstream>,

    /// An endpoint of an upstream service known without a controller,
    /// SERVICE[:PORT]=ADDR[/meshed] (repeatable). With any of these, discovery is static and
    /// no controller is used for it.
    #[arg(long = "static-endpoint", env = "FERRULE_PROXY_STATIC_ENDPOINTS", value_delimiter = ',', value_parser = parse_static_endpoint, conflicts_with = "controllers")]
    pub static_endpoints: Vec<StaticEndpoint>,

    /// Transparent mode: bind `--outbound-addr` for connections iptables redirects to it,
    /// and send each where its original destination says (a service the mesh knows, else
    /// plain TCP to that address); serve every app port on the one `--inbound-addr`
    /// listener, the original destination's port picking the app port. The rules come from
    /// `ferrule-proxy init` (docs/transparent.md).
    #[arg(long, env = "FERRULE_PROXY_TRANSPARENT")]
    pub transparent: bool,

    /// Outbound listener of transparent mode (bound only with `--transparent`).
    #[arg(long, env = "FERRULE_PROXY_OUTBOUND_ADDR", default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, ports::PROXY_OUTBOUND)))]
    pub outbound_addr: SocketAddr,

    /// Where the inbound listener of the app's (first) port binds: what peers dial.
    #[arg(long, env = "FERRULE_PROXY_INBOUND_ADDR", default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::PROXY_INBOUND)))]
    pub inbound_addr: SocketAddr,

    /// IP peers dial to reach this proxy's inbound listeners when they bind a wildcard address.
    #[arg(long, env = "FERRULE_PROXY_ADVERTISE_IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub advertise_ip: IpAddr,

    /// Ports whose traffic is never detected, only copied: app ports (inbound), upstream
    /// listener ports (outbound) and, in transparent mode, destination ports (default there:
    /// 25, 587, 3306, 5432, 6379, 11211). Use for server-speaks-first protocols.
    #[arg(long, env = "FERRULE_PROXY_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<u16>,

    /// HTTP path the app is health-checked on; without it a TCP connect is the check.
    #[arg(long, env = "FERRULE_PROXY_HEALTH_PATH")]
    pub health_path: Option<String>,

    /// How often the app is health-checked.
    #[arg(long, env = "FERRULE_PROXY_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub health_interval: Duration,

    /// How long one health check may take before it counts as failed.
    #[arg(long, env = "FERRULE_PROXY_HEALTH_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub health_timeout: Duration,

    /// Consecutive passed checks before the app counts as healthy.
    #[arg(long, env = "FERRULE_PROXY_HEALTHY_THRESHOLD", default_value_t = 1)]
    pub healthy_threshold: u32,

    /// Consecutive failed checks before the app counts as unhealthy.
    #[arg(long, env = "FERRULE_PROXY_UNHEALTHY_THRESHOLD", default_value_t = 2)]
    pub unhealthy_threshold: u32,

    /// Lease of each registration; kept alive while the app is healthy.
    #[arg(long, env = "FERRULE_PROXY_REGISTER_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "humantime_ser")]
    pub register_ttl: Duration,

    /// Label of the registered endpoints, KEY=VALUE (repeatable).
    #[arg(long = "label", env = "FERRULE_PROXY_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Zone (failure domain) of the registered endpoints, for zone-aware callers.
    #[arg(long, env = "FERRULE_PROXY_ZONE", default_value = "")]
    pub zone: String,
}

/// The modes other than the sidecar.
#[derive(Debug, Clone, Subcommand)]
pub enum Mode {
    /// The edge gateway: routes, JWT, rate limits and CORS in front of mesh services, from
    /// its file or, with a controller, its `Gateway` resource (flags go after `gateway`; see
    /// docs/gateway.md).
    Gateway(Box<crate::gateway::GatewayArgs>),
    /// The init container's job: write the iptables rules that send the pod's TCP through
    /// its sidecar, then exit (see docs/transparent.md).
    Init(crate::init::InitArgs),
}

fn parse_namespace(s: &str) -> Result<String, String> {
    ferrule_proto::names::validate_namespace(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn parse_service(s: &str) -> Result<String, String> {
    validate_service(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// A configuration that parses but cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("app ports need --service: the proxy registers them under a service name")]
    AppPortsWithoutService,
    #[error("--inbound-port {0} names no --app-port")]
    InboundPortWithoutApp(String),
    #[error("app port name {0:?} appears twice")]
    DuplicateAppPort(String),
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

/// An app port with the address its inbound listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPort {
    /// Empty for the single unnamed port of `--app-addr`.
    pub name: String,
    pub app_addr: SocketAddr,
    pub listen: SocketAddr,
}

impl Config {
    /// Every app port and where its inbound listener binds.
    pub fn app_ports(&self) -> Result<Vec<AppPort>, ConfigError> {
        let named = self.app_addr.map_or_else(
            || self.app_ports.clone(),
            |addr| {
                vec![NamedAddr {
                    name: String::new(),
                    addr,
                }]
            },
        );
        if !named.is_empty() && self.service.is_none() {
            return Err(ConfigError::AppPortsWithoutService);
        }
        for ip in &self.inbound_ports {
            if !named.iter().any(|p| p.name == ip.name) {
                return Err(ConfigError::InboundPortWithoutApp(ip.name.clone()));
            }
        }
        let mut ports: Vec<AppPort> = Vec::new();
        for (i, port) in named.into_iter().enumerate() {
            if ports.iter().any(|p| p.name == port.name) {
                return Err(ConfigError::DuplicateAppPort(port.name));
            }
            let explicit = self.inbound_ports.iter().find(|p| p.name == port.name);
            let listen = match (i, explicit) {
                (_, Some(p)) => p.addr,
                (0, None) => self.inbound_addr,
                (_, None) => SocketAddr::new(self.inbound_addr.ip(), 0),
            };
            ports.push(AppPort {
                name: port.name,
                app_addr: port.addr,
                listen,
            });
        }
        Ok(ports)
    }

    /// `--static-endpoint`s grouped by service, as [`ferrule_proxy_api::discovery::Discovery::fixed`]
    /// takes them.
    pub fn static_discovery(&self) -> Vec<(ServiceRef, Vec<Endpoint>)> {
        let mut grouped: Vec<(ServiceRef, Vec<Endpoint>)> = Vec::new();
        for ep in &self.static_endpoints {
            let endpoint = Endpoint {
                service: ep.service.service.clone(),
                port_name: ep.service.port_name.clone(),
                address: ep.addr.ip().to_string(),
                port: u32::from(ep.addr.port()),
                meshed: ep.meshed,
                ..Default::default()
            };
            match grouped.iter_mut().find(|(s, _)| *s == ep.service) {
                Some((_, eps)) => eps.push(endpoint),
                None => grouped.push((ep.service.clone(), vec![endpoint])),
            }
        }
        grouped
    }

    /// Who this proxy is, as told to the controller.
    pub fn proxy_info(&self, proxy_id: &str) -> ProxyInfo {
        ProxyInfo {
            proxy_id: proxy_id.to_string(),
            service: self.service.clone().unwrap_or_default(),
            namespace: self.namespace.clone(),
            address: self.advertise_ip.to_string(),
            mode: "sidecar".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            // Known once the admin listener is bound (`sidecar.rs`).
            admin_address: String::new(),
            certificate: None,
        }
    }

    /// This proxy's id: `--proxy-id`, else the service (or "proxy"), the process id and a
    /// random suffix, generated on the first call and the same on every later one.
    pub fn proxy_id(&mut self) -> String {
        let name = self.service.clone().unwrap_or_else(|| "proxy".into());
        self.common.resolve_proxy_id(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of `ferrule-proxy` and of its subcommands says what it is for in `--help`.
    #[test]
    fn every_flag_has_a_description() {
        fn undescribed(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let described = arg
                    .get_help()
                    .or(arg.get_long_help())
                    .is_some_and(|h| !h.to_string().trim().is_empty());
                if !described {
                    out.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                undescribed(sub, &format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut cmd = <Config as clap::CommandFactory>::command();
        cmd.build();
        let mut missing = Vec::new();
        undescribed(&cmd, "ferrule-proxy", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without a description: {missing:?}"
        );
        // And as a user reads it: no option line in `--help` is followed straight by only the
        // env/default annotations.
        let help = cmd.render_long_help().to_string();
        let lines: Vec<&str> = help.lines().collect();
        for pair in lines.windows(2) {
            if pair[0].trim_start().starts_with("--") {
                assert!(
                    !pair[1].trim_start().starts_with('['),
                    "{:?} has no description in --help",
                    pair[0].trim()
                );
            }
        }
    }

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("ferrule-proxy").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn named_app_ports_get_listeners() {
        let c = parse(&[
            "--service=user",
            "--inbound-addr=127.0.0.1:4143",
            "--app-port=http=127.0.0.1:8001",
            "--app-port=grpc=127.0.0.1:50051",
            "--app-port=admin=127.0.0.1:9000",
            "--inbound-port=admin=127.0.0.1:5000",
        ]);
        let ports = c.app_ports().unwrap();
        assert_eq!(ports[0].listen, "127.0.0.1:4143".parse().unwrap());
        assert_eq!(ports[1].listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(ports[2].listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(ports[1].name, "grpc");
    }

    #[test]
    fn upstreams_and_lists() {
        let c = parse(&[
            "--controller=127.0.0.1:1,127.0.0.1:2",
            "--upstream=user:grpc=127.0.0.1:7001",
            "--upstream=payment=127.0.0.1:7002",
            "--opaque-ports=5432,6379",
            "--detect-timeout=250ms",
        ]);
        assert_eq!(c.common.controllers.len(), 2);
        assert_eq!(c.upstreams[0].service.to_string(), "user:grpc");
        assert_eq!(c.upstreams[1].listen.port(), 7002);
        assert_eq!(c.opaque_ports, vec![5432, 6379]);
        assert_eq!(c.common.detect_timeout, Duration::from_millis(250));
    }

    #[test]
    fn idle_timeout_defaults_to_the_policy_default() {
        assert_eq!(
            parse(&[]).common.idle_timeout,
            ferrule_config::DEFAULT_IDLE_TIMEOUT
        );
        assert_eq!(
            parse(&["--idle-timeout=5s"]).common.idle_timeout,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn static_endpoints_group_by_service() {
        let c = parse(&[
            "--static-endpoint=user=127.0.0.1:4143/meshed",
            "--static-endpoint=user=127.0.0.1:4144",
            "--static-endpoint=db:sql=10.0.0.1:5432",
        ]);
        let d = c.static_discovery();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].1.len(), 2);
        assert!(d[0].1[0].meshed && !d[0].1[1].meshed);
        assert_eq!(d[1].1[0].port_name, "sql");
        assert!(
            Config::try_parse_from([
                "ferrule-proxy",
                "--controller=127.0.0.1:8086",
                "--static-endpoint=user=127.0.0.1:1"
            ])
            .is_err()
        );
    }

    /// The anchors as PEM text (how injected pods get them) make the same controller TLS as
    /// the file; bad text is refused naming the flag, and the two ways exclude each other.
    #[test]
    fn trust_anchors_as_pem_text() {
        let anchor = rcgen::generate_simple_self_signed(vec!["anchor.test".to_string()]).unwrap();
        let pem = anchor.cert.pem();
        assert!(parse(&[]).common.control_tls().unwrap().is_none());
        let c = parse(&["--identity-trust-anchors-pem", pem.as_str()]);
        assert!(c.common.control_tls().unwrap().is_some());

        let refused = |text: &str| {
            parse(&["--identity-trust-anchors-pem", text])
                .common
                .control_tls()
                .unwrap_err()
                .to_string()
        };
        let e = refused("not a certificate");
        assert!(
            e.contains("--identity-trust-anchors-pem") && e.contains("holds no certificate"),
            "{e}"
        );
        let e = refused("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n");
        assert!(e.starts_with("--identity-trust-anchors-pem"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trust-anchors.pem");
        std::fs::write(&file, &pem).unwrap();
        let both = Config::try_parse_from([
            "ferrule-proxy",
            "--identity-trust-anchors",
            file.to_str().unwrap(),
            "--identity-trust-anchors-pem",
            pem.as_str(),
        ]);
        assert!(both.is_err(), "the file and the PEM text are exclusive");
    }

    #[test]
    fn refuses_bad_input() {
        let bad = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("ferrule-proxy").chain(args.iter().copied()))
                .is_err()
        };
        assert!(bad(&["--upstream=User=127.0.0.1:1"]));
        assert!(bad(&["--upstream=user"]));
        assert!(bad(&["--app-port=http"]));
        assert!(bad(&[
            "--app-addr=127.0.0.1:1",
            "--app-port=http=127.0.0.1:2"
        ]));
        let no_service = parse(&["--app-addr=127.0.0.1:1"]);
        assert!(matches!(
            no_service.app_ports(),
            Err(ConfigError::AppPortsWithoutService)
        ));
    }
}
