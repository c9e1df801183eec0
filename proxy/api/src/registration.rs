//! Self-registration: health-check the app and keep its ports registered only while healthy.
//!
//! Two tasks per proxy. The health checker probes the app every `interval` (an HTTP GET of a
//! path, 2xx/3xx healthy; or a TCP connect to every port) and flips its verdict after
//! `healthy_threshold` consecutive successes or `unhealthy_threshold` consecutive failures.
//! The registrar follows that verdict: it announces the proxy (`Registry/AnnounceProxy`),
//! registers every port (`Registry/Register`) while the app is healthy, keeps all leases alive
//! over one `KeepAlive` stream (a request per lease every `ttl / 3`; `found = false` means the
//! lease is gone, so it registers again), and deregisters the ports at once when the app turns
//! unhealthy. When a controller call fails it reconnects with backoff, to the next controller
//! if need be: leases live in the shared store, so they stay valid across replicas. On
//! shutdown every lease is revoked, bounded by 2 s.
//!
//! With identity, the announcement carries the proxy's certificate (identity, validity, the
//! anchor it chains to) and is made again, under the same lease, whenever that changes (each
//! renewal), so `ferrule identity status` shows every proxy's current certificate.
//!
//! The HTTP check goes to the port named `http`, else the first port hinted HTTP/1, else the
//! first port.
//!
//! While the app is not healthy the checker says what it waits for: at info level (the first
//! failure, then at most every [`WAITING_LOG_PERIOD`]) and in [`Registration::waiting_for`],
//! which `/ready` shows, with the reason the last check failed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferrule_proto::v1::registry_client::RegistryClient;
use ferrule_proto::v1::{
    AnnounceProxyRequest, DeregisterRequest, Endpoint, KeepAliveRequest, KeepAliveResponse,
    ProtocolHint, ProxyCertificate, ProxyInfo, RegisterRequest, RegisterResponse,
};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Streaming;
use tonic::transport::Channel;

use crate::control::{Backoff, ControlError, Controllers};

/// Bound on each unary call to the controller.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on revoking every lease at shutdown (connecting included).
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While the app fails its checks, how often the checker says so at info level.
pub const WAITING_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Keep-alives are never sent more often than this, whatever the TTL.
const MIN_KEEPALIVE_PERIOD: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub enum HealthCheckKind {
    /// GET this path on the app; 2xx/3xx is healthy.
    Http { path: String },
    /// A TCP connect succeeds.
    Tcp,
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before the app counts as healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures before the app counts as unhealthy.
    pub unhealthy_threshold: u32,
}

/// One app port the proxy fronts and registers.
#[derive(Debug, Clone)]
pub struct RegisteredPort {
    /// Empty for a single unnamed port.
    pub port_name: String,
    /// Where the app listens (health checks and inbound forwarding go here).
    pub app_addr: SocketAddr,
    /// What peers dial: this proxy's inbound listener for the port.
    pub advertise: SocketAddr,
    pub protocol_hint: ProtocolHint,
}

#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub proxy: ProxyInfo,
    pub ports: Vec<RegisteredPort>,
    pub labels: Vec<(String, String)>,
    pub zone: String,
    pub ttl: Duration,
    pub health: HealthCheck,
    /// The identity peers must see proven by this proxy's certificate (`spiffe://...`);
    /// empty without mutual TLS.
    pub identity: String,
    /// Registers only while this is true as well as the app is healthy (the proxy holds a
    /// certificate, so peers that find the endpoint can complete mutual TLS with it).
    pub gate: Option<watch::Receiver<bool>>,
    /// The proxy's certificate as reported with the announcement (see
    /// [`crate::identity::reports`]); `None` without identity. Each change is announced again.
    pub certificate: Option<watch::Receiver<ProxyCertificate>>,
}

/// What `/ready` and metrics read; see [`Registration::status`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistrationStatus {
    /// The app passes its health check.
    pub healthy: bool,
    /// Every port holds a lease the controller confirmed within its TTL.
    pub registered: bool,
}

/// Runs health checks and keeps registrations alive while healthy.
pub struct Registration {
    status: watch::Receiver<RegistrationStatus>,
    /// What the health checker waits for, while the app is not healthy.
    waiting: watch::Receiver<Option<String>>,
    deregister: mpsc::Sender<oneshot::Sender<()>>,
    /// Dropping the handle stops (and deregisters) like a shutdown.
    _stop: DropGuard,
}

impl Registration {
    /// Starts health checking and registration in the background; stops (and deregisters at
    /// once) when `shutdown` is cancelled. Must be called within a Tokio runtime.
    ///
    /// Controller addresses that do not parse are reported at error level and nothing gets
    /// registered; validate flags early with [`Controllers::parse`] to refuse them instead.
    pub fn spawn(
        config: RegistrationConfig,
        controllers: Vec<String>,
        shutdown: CancellationToken,
    ) -> Self {
        Self::spawn_with(
            config,
            crate::control::parse_or_log(&controllers, "registration"),
            shutdown,
        )
    }

    /// [`Registration::spawn`] with the controllers already parsed (and their TLS set).
    pub fn spawn_with(
        config: RegistrationConfig,
        controllers: Option<Controllers>,
        shutdown: CancellationToken,
    ) -> Self {
        let stop = shutdown.child_token();
        let (health_tx, app_health) = watch::channel(false);
        let health_rx = match config.gate.clone() {
            Some(gate) => gated(app_health, gate, stop.clone()),
            None => app_health,
        };
        let probe = HealthProbe::new(&config);
        let (waiting_tx, waiting_rx) = watch::channel(Some(format!(
            "the app's first health check ({})",
            probe.describe()
        )));
        let (status_tx, status_rx) = watch::channel(RegistrationStatus::default());
        let (deregister_tx, deregister_rx) = mpsc::channel(1);
        tokio::spawn(check_health(
            probe,
            config.health.clone(),
            health_tx,
            waiting_tx,
            stop.clone(),
        ));
        let registrar = Registrar {
            leases: vec![None; config.ports.len()],
            config,
            controllers,
            session: None,
            announce: None,
            reannounce: false,
            healthy: false,
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            retry_at: None,
            status: status_tx,
        };
        tokio::spawn(registrar.run(health_rx, deregister_rx, stop.clone()));
        Self {
            status: status_rx,
            waiting: waiting_rx,
            deregister: deregister_tx,
            _stop: stop.drop_guard(),
        }
    }

    /// True while every port is registered (the app is healthy and the controller took it).
    pub fn registered(&self) -> bool {
        self.status.borrow().registered
    }

    /// True while the app passes its health check.
    pub fn healthy(&self) -> bool {
        self.status.borrow().healthy
    }

    /// While the app is not healthy: what the proxy waits for, and why the last health check
    /// failed (`/ready` shows it). `None` once the app is healthy.
    pub fn waiting_for(&self) -> Option<String> {
        self.waiting.borrow().clone()
    }

    /// Health and registration as they change, for callers that wait on them.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Deregisters every port at once and waits (bounded) for the controller to confirm.
    /// Registration stops for good: this is the first step of a graceful shutdown.
    pub async fn deregister(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.deregister.send(done_tx).await.is_err() {
            return; // Already stopped, and deregistered on the way out.
        }
        // The registrar bounds its own work; this bound only guards against a stuck task.
        let _ = tokio::time::timeout(DEREGISTER_TIMEOUT * 2, done_rx).await;
    }
}

/// How the app is probed.
enum HealthProbe {
    Http {
        client: Box<Client<HttpConnector, Empty<Bytes>>>,
        uri: String,
    },
    Tcp(Vec<SocketAddr>),
}

impl HealthProbe {
    fn new(config: &RegistrationConfig) -> Self {
        match &config.health.kind {
            HealthCheckKind::Tcp => Self::Tcp(config.ports.iter().map(|p| p.app_addr).collect()),
            HealthCheckKind::Http { path } => {
                let ports = &config.ports;
                let target = ports
                    .iter()
                    .find(|p| p.port_name == "http")
                    .or_else(|| {
                        ports
                            .iter()
                            .find(|p| p.protocol_hint == ProtocolHint::Http1)
                    })
                    .or(ports.first());
                match target {
                    Some(port) => Self::Http {
                        client: Box::new(Client::builder(TokioExecutor::new()).build_http()),
                        uri: format!("http://{}{path}", port.app_addr),
                    },
                    // Nothing to check and nothing to register.
                    None => Self::Tcp(Vec::new()),
                }
            }
        }
    }

    /// What the check does, for people: `GET http://127.0.0.1:9001/health`.
    fn describe(&self) -> String {
        match self {
            Self::Http { uri, .. } => format!("GET {uri}"),
            Self::Tcp(addrs) => {
                let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                format!("TCP connect to {}", addrs.join(", "))
            }
        }
    }

    /// `Err` says why the app failed the check.
    async fn probe(&self) -> Result<(), String> {
        match self {
            Self::Http { client, uri } => {
                let uri: http::Uri = uri.parse().map_err(|e| format!("bad URI {uri}: {e}"))?;
                let response = client.get(uri).await.map_err(|e| e.to_string())?;
                let status = response.status();
                if status.is_success() || status.is_redirection() {
                    Ok(())
                } else {
                    Err(format!("status {status}"))
                }
            }
            Self::Tcp(addrs) => {
                for addr in addrs {
                    tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(|e| format!("connect {addr}: {e}"))?;
                }
                Ok(())
            }
        }
    }
}

/// Probes the app until `stop`, publishing healthy/unhealthy as the thresholds are crossed, and
/// while it is not healthy, what it waits for.
async fn check_health(
    probe: HealthProbe,
    config: HealthCheck,
    verdict: watch::Sender<bool>,
    waiting: watch::Sender<Option<String>>,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(config.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    let check = probe.describe();
    let healthy_threshold = config.healthy_threshold.max(1);
    // When the checker last said at info level that it is waiting.
    let mut said_waiting: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let outcome = tokio::time::timeout(config.timeout, probe.probe())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", config.timeout)));
        let healthy = *verdict.borrow();
        match outcome {
            Ok(()) => {
                tracing::debug!("health check passed");
                successes = successes.saturating_add(1);
                failures = 0;
                if !healthy && successes >= healthy_threshold {
                    tracing::info!(checks = successes, "app is healthy");
                    verdict.send_replace(true);
                    waiting.send_replace(None);
                    said_waiting = None;
                } else if !healthy {
                    waiting.send_replace(Some(format!(
                        "the app's health check ({check}) to pass {} more time(s); it passed {successes} in a row",
                        healthy_threshold - successes
                    )));
                }
            }
            Err(reason) => {
                tracing::debug!(%reason, "health check failed");
                failures = failures.saturating_add(1);
                successes = 0;
                if healthy && failures >= config.unhealthy_threshold.max(1) {
                    tracing::warn!(checks = failures, %reason, "app is unhealthy");
                    verdict.send_replace(false);
                }
                if !*verdict.borrow() {
                    waiting.send_replace(Some(format!(
                        "the app's health check ({check}) to pass; the last {failures} check(s) failed, the last with: {reason}"
                    )));
                    let now = Instant::now();
                    if said_waiting.is_none_or(|at| now - at >= WAITING_LOG_PERIOD) {
                        tracing::info!(%check, failures, %reason, "waiting for the app to pass its health check");
                        said_waiting = Some(now);
                    }
                }
            }
        }
    }
}

/// Why a controller call failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no usable controller address")]
    NoControllers,
    #[error(transparent)]
    Connect(#[from] ControlError),
    #[error("controller {controller}: {call} failed: {status}")]
    Status {
        controller: String,
        call: &'static str,
        status: tonic::Status,
    },
    #[error("controller {controller}: {call} got no answer within {RPC_TIMEOUT:?}")]
    Timeout {
        controller: String,
        call: &'static str,
    },
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    /// When the lease runs out unless a keep-alive is answered before.
    valid_until: Instant,
}

impl Lease {
    fn granted(response: &RegisterResponse, now: Instant) -> Self {
        Self {
            id: response.lease_id,
            valid_until: now + Duration::from_secs(response.ttl_seconds.into()),
        }
    }
}

/// A connection to one controller with its open KeepAlive stream.
struct Session {
    controller: String,
    client: RegistryClient<Channel>,
    keepalives: mpsc::Sender<KeepAliveRequest>,
    responses: Streaming<KeepAliveResponse>,
}

impl Session {
    async fn unary<T>(
        &self,
        call: &'static str,
        response: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(RPC_TIMEOUT, response).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CallError::Status {
                controller: self.controller.clone(),
                call,
                status,
            }),
            Err(_) => Err(CallError::Timeout {
                controller: self.controller.clone(),
                call,
            }),
        }
    }
}

/// Owns the leases; the only task that talks to the Registry.
struct Registrar {
    config: RegistrationConfig,
    controllers: Option<Controllers>,
    session: Option<Session>,
    /// One per configured port, in order.
    leases: Vec<Option<Lease>>,
    announce: Option<Lease>,
    /// The announced record is out of date (the certificate changed): announce again.
    reannounce: bool,
    healthy: bool,
    backoff: Backoff,
    retry_at: Option<Instant>,
    status: watch::Sender<RegistrationStatus>,
}

impl Registrar {
    async fn run(
        mut self,
        mut health: watch::Receiver<bool>,
        mut deregister: mpsc::Receiver<oneshot::Sender<()>>,
        stop: CancellationToken,
    ) {
        let period = (self.config.ttl / 3).max(MIN_KEEPALIVE_PERIOD);
        let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health_open = true;
        let mut certificate = self.config.certificate.take();
        if let Some(report) = &mut certificate {
            self.config.proxy.certificate = Some(report.borrow_and_update().clone());
        }
        self.reconcile().await;
        loop {
            self.publish();
            let retry_at = self.retry_at;
            let responses = self.session.as_mut().map(|s| &mut s.responses);
            tokio::select! {
                _ = stop.cancelled() => break,
                request = deregister.recv() => {
                    self.revoke_all().await;
                    if let Some(done) = request {
                        let _ = done.send(());
                    }
                    return;
                }
                changed = health.changed(), if health_open => {
                    health_open = changed.is_ok();
                    self.healthy = *health.borrow_and_update();
                    self.reconcile().await;
                }
                changed = changed_or_pending(certificate.as_mut()) => {
                    let Some(report) = certificate.as_mut() else { continue };
                    if changed.is_err() {
                        certificate = None; // The identity client stopped; keep the last.
                        continue;
                    }
                    self.config.proxy.certificate = Some(report.borrow_and_update().clone());
                    self.reannounce = true;
                    // While a retry is scheduled the session is down; the retry announces.
                    if self.retry_at.is_none() {
                        self.reconcile().await;
                    }
                }
                _ = keepalive.tick() => self.send_keepalives(),
                response = next_response(responses) => self.on_keepalive(response).await,
                _ = sleep_until_some(retry_at) => {
                    self.retry_at = None;
                    self.reconcile().await;
                }
            }
        }
        self.revoke_all().await;
    }

    fn publish(&self) {
        let now = Instant::now();
        let registered = self.healthy
            && self
                .leases
                .iter()
                .all(|l| l.is_some_and(|l| l.valid_until > now));
        let status = RegistrationStatus {
            healthy: self.healthy,
            registered,
        };
        self.status.send_if_modified(|old| {
            let changed = *old != status;
            *old = status;
            changed
        });
    }

    /// Brings the controller in line with what should be registered; on failure drops the
    /// session and schedules a retry.
    async fn reconcile(&mut self) {
        match self.try_reconcile().await {
            Ok(()) => self.backoff.reset(),
            Err(error) => {
                let delay = self.backoff.next_delay();
                tracing::warn!(%error, ?delay, "registration: controller call failed; retrying");
                self.session = None;
                self.retry_at = Some(Instant::now() + delay);
            }
        }
    }

    async fn try_reconcile(&mut self) -> Result<(), CallError> {
        if !self.healthy {
            let ids: Vec<i64> = self
                .leases
                .iter_mut()
                .filter_map(Option::take)
                .map(|l| l.id)
                .collect();
            if !ids.is_empty() {
                tracing::info!("app unhealthy: deregistering its ports");
                self.revoke(ids).await;
            }
        }
        self.ensure_session().await?;
        let session = self.session.as_ref().ok_or(CallError::NoControllers)?;
        if let Some(lease) = self.announce.filter(|_| self.reannounce) {
            let request = AnnounceProxyRequest {
                proxy: Some(self.config.proxy.clone()),
                ttl_seconds: ttl_seconds(self.config.ttl),
                lease_id: lease.id,
            };
            let mut client = session.client.clone();
            match session
                .unary("AnnounceProxy", client.announce_proxy(request))
                .await
            {
                Ok(response) => {
                    tracing::debug!(lease = response.lease_id, "proxy announced again");
                    if response.lease_id != lease.id {
                        // A controller that predates re-announcing granted a new lease; the
                        // old one expires unrefreshed.
                        self.announce = Some(Lease::granted(&response, Instant::now()));
                    }
                    self.reannounce = false;
                }
                Err(CallError::Status { status, .. }) if status.code() == tonic::Code::NotFound => {
                    tracing::info!(
                        lease = lease.id,
                        "announcement's lease is gone; announcing afresh"
                    );
                    self.announce = None;
                }
                Err(error) => return Err(error),
            }
        }
        if self.announce.is_none() {
            let request = AnnounceProxyRequest {
                proxy: Some(self.config.proxy.clone()),
                ttl_seconds: ttl_seconds(self.config.ttl),
                lease_id: 0,
            };
            let response = session
                .unary(
                    "AnnounceProxy",
                    session.client.clone().announce_proxy(request),
                )
                .await?;
            tracing::info!(lease = response.lease_id, controller = %session.controller, "proxy announced");
            self.announce = Some(Lease::granted(&response, Instant::now()));
            self.reannounce = false;
        }
        if self.healthy {
            for (i, port) in self.config.ports.iter().enumerate() {
                if self.leases[i].is_some() {
                    continue;
                }
                let request = RegisterRequest {
                    endpoint: Some(endpoint(&self.config, port)),
                    ttl_seconds: ttl_seconds(self.config.ttl),
                };
                let response = session
                    .unary("Register", session.client.clone().register(request))
                    .await?;
                tracing::info!(
                    port = %port.port_name,
                    advertise = %port.advertise,
                    lease = response.lease_id,
                    controller = %session.controller,
                    "registered"
                );
                self.leases[i] = Some(Lease::granted(&response, Instant::now()));
            }
        }
        Ok(())
    }

    /// Connects and opens the KeepAlive stream if there is no session; then refreshes every
    /// lease held, so leases lost while disconnected are noticed at once.
    async fn ensure_session(&mut self) -> Result<(), CallError> {
        if self.session.is_some() {
            return Ok(());
        }
        let controllers = self.controllers.as_ref().ok_or(CallError::NoControllers)?;
        let (controller, channel) = controllers.connect().await?;
        let mut client = RegistryClient::new(channel);
        let (tx, rx) = mpsc::channel(64);
        let opened = tokio::time::timeout(RPC_TIMEOUT, client.keep_alive(ReceiverStream::new(rx)));
        let responses = match opened.await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return Err(CallError::Status {
                    controller,
                    call: "KeepAlive",
                    status,
                });
            }
            Err(_) => {
                return Err(CallError::Timeout {
                    controller,
                    call: "KeepAlive",
                });
            }
        };
        tracing::info!(%controller, "registration: connected to controller");
        self.session = Some(Session {
            controller,
            client,
            keepalives: tx,
            responses,
        });
        self.send_keepalives();
        Ok(())
    }

    fn lease_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.announce
            .iter()
            .chain(self.leases.iter().flatten())
            .map(|l| l.id)
    }

    /// Queues one keep-alive per lease without waiting: a stream too stalled to take them is
    /// left to fail on its own rather than stall the registrar.
    fn send_keepalives(&self) {
        let Some(session) = &self.session else {
            return;
        };
        for lease_id in self.lease_ids() {
            tracing::debug!(lease = lease_id, "keep-alive");
            match session.keepalives.try_send(KeepAliveRequest { lease_id }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!("keep-alive stream backed up; skipping this round");
                    break;
                }
                // The stream is gone; its end shows up as a response error and reconnects.
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }

    async fn on_keepalive(&mut self, response: Result<Option<KeepAliveResponse>, tonic::Status>) {
        let response = match response {
            Ok(Some(response)) => response,
            outcome => {
                let delay = self.backoff.next_delay();
                let error = outcome.err().map(|s| s.to_string()).unwrap_or_default();
                tracing::warn!(%error, ?delay, "registration: keep-alive stream ended; reconnecting");
                self.session = None;
                self.retry_at = Some(Instant::now() + delay);
                return;
            }
        };
        let now = Instant::now();
        let lease = self
            .announce
            .iter_mut()
            .chain(self.leases.iter_mut().flatten())
            .find(|l| l.id == response.lease_id);
        let Some(lease) = lease else {
            return; // A lease given up on since (deregistered).
        };
        if response.found {
            lease.valid_until = now + Duration::from_secs(response.ttl_seconds.into());
            return;
        }
        tracing::info!(
            lease = response.lease_id,
            "lease expired at the controller; registering again"
        );
        if self.announce.is_some_and(|l| l.id == response.lease_id) {
            self.announce = None;
        }
        for slot in &mut self.leases {
            if slot.is_some_and(|l| l.id == response.lease_id) {
                *slot = None;
            }
        }
        self.reconcile().await;
    }

    /// Revokes every lease, ports and proxy announcement alike.
    async fn revoke_all(&mut self) {
        let ids: Vec<i64> = self.lease_ids().collect();
        self.announce = None;
        self.leases.iter_mut().for_each(|l| *l = None);
        self.healthy = false;
        self.publish();
        if !ids.is_empty() {
            tracing::info!(leases = ids.len(), "deregistering");
            self.revoke(ids).await;
        }
    }

    /// Deregisters `ids` concurrently, bounded by [`DEREGISTER_TIMEOUT`]; failures are only
    /// logged, since a lease no longer kept alive expires on its own.
    async fn revoke(&mut self, ids: Vec<i64>) {
        let work = async {
            if let Err(error) = self.ensure_session().await {
                tracing::warn!(%error, "cannot deregister; leases expire after their TTL");
                return;
            }
            let Some(session) = &self.session else {
                return;
            };
            let calls = ids.iter().map(|&lease_id| async move {
                let mut client = session.client.clone();
                let call = client.deregister(DeregisterRequest { lease_id });
                if let Err(error) = session.unary("Deregister", call).await {
                    tracing::warn!(lease = lease_id, %error, "deregister failed; lease expires after its TTL");
                } else {
                    tracing::debug!(lease = lease_id, "deregistered");
                }
            });
            futures::future::join_all(calls).await;
        };
        if tokio::time::timeout(DEREGISTER_TIMEOUT, work)
            .await
            .is_err()
        {
            tracing::warn!("deregistering timed out; leases expire after their TTL");
        }
    }
}

async fn next_response(
    responses: Option<&mut Streaming<KeepAliveResponse>>,
) -> Result<Option<KeepAliveResponse>, tonic::Status> {
    match responses {
        Some(responses) => responses.message().await,
        None => std::future::pending().await,
    }
}

/// `health` and `gate` both true.
fn gated(
    mut health: watch::Receiver<bool>,
    mut gate: watch::Receiver<bool>,
    stop: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        // A gate whose sender is gone keeps its last value (it opens once and stays open).
        let mut gate_open = true;
        loop {
            let both = *health.borrow_and_update() && *gate.borrow_and_update();
            tx.send_if_modified(|v| std::mem::replace(v, both) != both);
            tokio::select! {
                changed = health.changed() => if changed.is_err() { return },
                changed = gate.changed(), if gate_open => gate_open = changed.is_ok(),
                () = stop.cancelled() => return,
            }
        }
    });
    rx
}

/// The next change of `rx`, or never without one.
async fn changed_or_pending<T>(
    rx: Option<&mut watch::Receiver<T>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whole seconds, rounded up, at least 1.
fn ttl_seconds(ttl: Duration) -> u32 {
    (ttl.as_secs_f64().ceil() as u32).max(1)
}

fn endpoint(config: &RegistrationConfig, port: &RegisteredPort) -> Endpoint {
    Endpoint {
        service: config.proxy.service.clone(),
        port_name: port.port_name.clone(),
        address: port.advertise.ip().to_string(),
        port: port.advertise.port().into(),
        identity: config.identity.clone(),
        labels: config.labels.iter().cloned().collect::<HashMap<_, _>>(),
        zone: config.zone.clone(),
        protocol_hint: port.protocol_hint.into(),
        weight: 1,
        meshed: true,
        proxy_id: config.proxy.proxy_id.clone(),
        namespace: config.proxy.namespace.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use ferrule_proto::v1::registry_server::{self, RegistryServer};
    use ferrule_proto::v1::{DeregisterResponse, KeepAliveResponse};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio_stream::Stream;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    #[derive(Debug)]
    enum Event {
        Announce(ProxyInfo, i64),
        Register(Endpoint, i64),
        KeepAlive(i64, bool),
        Deregister(i64),
    }

    /// A real Registry server that keeps leases in memory and reports every call.
    #[derive(Clone)]
    struct FakeRegistry {
        leases: Arc<Mutex<HashSet<i64>>>,
        next_lease: Arc<AtomicUsize>,
        events: mpsc::UnboundedSender<Event>,
    }

    impl FakeRegistry {
        fn grant(&self, ttl_seconds: u32) -> RegisterResponse {
            let lease_id = 100 + self.next_lease.fetch_add(1, Ordering::Relaxed) as i64;
            self.leases.lock().unwrap().insert(lease_id);
            RegisterResponse {
                lease_id,
                ttl_seconds,
                revision: lease_id,
            }
        }
    }

    #[tonic::async_trait]
    impl registry_server::Registry for FakeRegistry {
        type KeepAliveStream =
            Pin<Box<dyn Stream<Item = Result<KeepAliveResponse, Status>> + Send>>;

        async fn register(
            &self,
            request: Request<RegisterRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            let request = request.into_inner();
            let response = self.grant(request.ttl_seconds);
            let _ = self.events.send(Event::Register(
                request.endpoint.unwrap_or_default(),
                response.lease_id,
            ));
            Ok(Response::new(response))
        }

        async fn keep_alive(
            &self,
            request: Request<Streaming<KeepAliveRequest>>,
        ) -> Result<Response<Self::KeepAliveStream>, Status> {
            let mut requests = request.into_inner();
            let (tx, rx) = mpsc::channel(16);
            let this = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(request)) = requests.message().await {
                    let found = this.leases.lock().unwrap().contains(&request.lease_id);
                    let _ = this.events.send(Event::KeepAlive(request.lease_id, found));
                    let response = KeepAliveResponse {
                        lease_id: request.lease_id,
                        found,
                        ttl_seconds: 1,
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        async fn deregister(
            &self,
            request: Request<DeregisterRequest>,
        ) -> Result<Response<DeregisterResponse>, Status> {
            let lease_id = request.into_inner().lease_id;
            self.leases.lock().unwrap().remove(&lease_id);
            let _ = self.events.send(Event::Deregister(lease_id));
            Ok(Response::new(DeregisterResponse {}))
        }

        async fn announce_proxy(
            &self,
            request: Request<AnnounceProxyRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            let request = request.into_inner();
            let response = if request.lease_id == 0 {
                self.grant(request.ttl_seconds)
            } else if self.leases.lock().unwrap().contains(&request.lease_id) {
                RegisterResponse {
                    lease_id: request.lease_id,
                    ttl_seconds: request.ttl_seconds,
                    revision: 0,
                }
            } else {
                return Err(Status::not_found("no such lease"));
            };
            let _ = self.events.send(Event::Announce(
                request.proxy.unwrap_or_default(),
                response.lease_id,
            ));
            Ok(Response::new(response))
        }
    }

    struct Controller {
        addr: String,
        registry: FakeRegistry,
        events: mpsc::UnboundedReceiver<Event>,
        _stop: DropGuard,
    }

    async fn start_controller() -> Controller {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, events) = mpsc::unbounded_channel();
        let registry = FakeRegistry {
            leases: Arc::default(),
            next_lease: Arc::default(),
            events: tx,
        };
        let stop = CancellationToken::new();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RegistryServer::new(registry.clone()))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        Controller {
            addr,
            registry,
            events,
            _stop: stop.drop_guard(),
        }
    }

    impl Controller {
        /// The next event `f` accepts (others, such as keep-alives, are skipped).
        async fn expect<T>(&mut self, what: &str, mut f: impl FnMut(Event) -> Option<T>) -> T {
            let find = async {
                loop {
                    let event = self.events.recv().await.expect("controller gone");
                    if let Some(found) = f(event) {
                        return found;
                    }
                }
            };
            tokio::time::timeout(WAIT, find)
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        }

        async fn registered(&mut self) -> (Endpoint, i64) {
            self.expect("Register", |e| match e {
                Event::Register(ep, lease) => Some((ep, lease)),
                _ => None,
            })
            .await
        }

        async fn deregistered(&mut self) -> i64 {
            self.expect("Deregister", |e| match e {
                Event::Deregister(lease) => Some(lease),
                _ => None,
            })
            .await
        }
    }

    /// An app answering every request with the status in `status`; counts requests.
    async fn start_app() -> (SocketAddr, Arc<AtomicU16>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicUsize::new(0));
        let (s, h) = (status.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (status, hits) = (s.clone(), h.clone());
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    assert_eq!(request.uri().path(), "/health");
                    hits.fetch_add(1, Ordering::SeqCst);
                    let code = status.load(Ordering::SeqCst);
                    async move {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .status(code)
                                .body(Empty::<Bytes>::new())
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, status, hits)
    }

    fn config(app: SocketAddr, kind: HealthCheckKind, ttl: Duration) -> RegistrationConfig {
        RegistrationConfig {
            proxy: ProxyInfo {
                proxy_id: "user-1".into(),
                service: "user".into(),
                ..Default::default()
            },
            ports: vec![RegisteredPort {
                port_name: "http".into(),
                app_addr: app,
                advertise: "127.0.0.1:4143".parse().unwrap(),
                protocol_hint: ProtocolHint::Http1,
            }],
            labels: vec![("version".into(), "v1".into())],
            zone: "z1".into(),
            ttl,
            health: HealthCheck {
                kind,
                interval: Duration::from_millis(20),
                timeout: Duration::from_millis(500),
                healthy_threshold: 2,
                unhealthy_threshold: 3,
            },
            identity: String::new(),
            gate: None,
            certificate: None,
        }
    }

    async fn wait_status(
        registration: &Registration,
        what: &str,
        f: impl FnMut(&RegistrationStatus) -> bool,
    ) {
        let mut status = registration.status();
        tokio::time::timeout(WAIT, status.wait_for(f))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("registrar gone");
    }

    #[tokio::test]
    async fn a_gate_that_opened_and_went_away_stays_open() {
        let (health_tx, health) = watch::channel(false);
        let (gate_tx, gate) = watch::channel(false);
        let stop = CancellationToken::new();
        let mut both = gated(health, gate, stop.clone());
        health_tx.send(true).unwrap();
        gate_tx.send(true).unwrap();
        // The gate's sender goes away once it has opened (the proxy got its certificate).
        drop(gate_tx);
        tokio::time::timeout(Duration::from_secs(5), both.wait_for(|b| *b))
            .await
            .expect("opens")
            .expect("still followed");
        // The app's health still counts.
        health_tx.send(false).unwrap();
        tokio::time::timeout(Duration::from_secs(5), both.wait_for(|b| !*b))
            .await
            .expect("follows the health")
            .expect("still followed");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_new_certificate_is_announced_again_under_the_same_lease() {
        let mut controller = start_controller().await;
        let (app, _, _) = start_app().await;
        let shutdown = CancellationToken::new();
        let (report_tx, report) = watch::channel(ProxyCertificate::default());
        let mut cfg = config(app, HealthCheckKind::Tcp, Duration::from_secs(30));
        cfg.certificate = Some(report);
        let _registration =
            Registration::spawn(cfg, vec![controller.addr.clone()], shutdown.clone());
        let announce = |e| match e {
            Event::Announce(proxy, lease) => Some((proxy, lease)),
            _ => None,
        };
        let (first, lease) = controller.expect("AnnounceProxy", announce).await;
        assert_eq!(
            first.certificate,
            Some(ProxyCertificate::default()),
            "with identity, the first announce says: no certificate yet"
        );
        let renewed = ProxyCertificate {
            identity: "spiffe://cluster.local/ns/default/sa/user".into(),
            not_before: 100,
            not_after: 200,
            anchor_fingerprint: "ab".repeat(32),
        };
        report_tx.send_replace(renewed.clone());
        let (again, same) = controller.expect("AnnounceProxy again", announce).await;
        assert_eq!(again.certificate, Some(renewed));
        assert_eq!(same, lease, "the record is rewritten under its lease");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn registers_while_healthy_and_deregisters_on_shutdown() {
        let mut controller = start_controller().await;
        let (app, app_status, hits) = start_app().await;
        let shutdown = CancellationToken::new();
        let cfg = config(
            app,
            HealthCheckKind::Http {
                path: "/health".into(),
            },
            Duration::from_secs(30),
        );
        let registration =
            Registration::spawn(cfg, vec![controller.addr.clone()], shutdown.clone());

        let announce = controller
            .expect("AnnounceProxy", |e| match e {
                Event::Announce(proxy, lease) => Some((proxy, lease)),
                _ => None,
            })
            .await;
        assert_eq!(announce.0.proxy_id, "user-1");
        let (endpoint, lease) = controller.registered().await;
        assert!(
            hits.load(Ordering::SeqCst) >= 2,
            "registered before the healthy threshold"
        );
        assert_eq!(endpoint.service, "user");
        assert_eq!(endpoint.port_name, "http");
        assert_eq!(
            (endpoint.address.as_str(), endpoint.port),
            ("127.0.0.1", 4143)
        );
        assert_eq!(
            endpoint.labels.get("version").map(String::as_str),
            Some("v1")
        );
        assert_eq!(endpoint.zone, "z1");
        assert_eq!(endpoint.protocol_hint(), ProtocolHint::Http1);
        assert!(endpoint.meshed);
        assert_eq!((endpoint.proxy_id.as_str(), endpoint.weight), ("user-1", 1));
        wait_status(&registration, "registered", |s| s.healthy && s.registered).await;

        // The app starts failing: deregistered once the unhealthy threshold is crossed.
        let before = hits.load(Ordering::SeqCst);
        app_status.store(500, Ordering::SeqCst);
        assert_eq!(controller.deregistered().await, lease);
        assert!(
            hits.load(Ordering::SeqCst) - before >= 3,
            "deregistered before the threshold"
        );
        wait_status(&registration, "unhealthy", |s| !s.healthy && !s.registered).await;

        // It recovers: registered again under a new lease.
        app_status.store(200, Ordering::SeqCst);
        let (_, lease) = controller.registered().await;
        wait_status(&registration, "registered again", |s| s.registered).await;

        // Shutdown revokes the port's lease and the proxy announcement.
        shutdown.cancel();
        let mut revoked = HashSet::new();
        revoked.insert(controller.deregistered().await);
        revoked.insert(controller.deregistered().await);
        assert_eq!(revoked, HashSet::from([lease, announce.1]));
        wait_status(&registration, "stopped", |s| !s.registered).await;
        assert!(controller.registry.leases.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn keeps_alive_re_registers_and_fails_over() {
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let mut controller = start_controller().await;
        // The app only needs to accept connections for a TCP check.
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(
            app.local_addr().unwrap(),
            HealthCheckKind::Tcp,
            Duration::from_millis(300),
        );
        let registration = Registration::spawn(
            cfg,
            vec![dead_addr, controller.addr.clone()],
            CancellationToken::new(),
        );
        let (_, lease) = controller.registered().await;
        controller
            .expect("keep-alive", |e| {
                matches!(e, Event::KeepAlive(l, true) if l == lease).then_some(())
            })
            .await;

        // The lease disappears from the store: the next keep-alive says so, and the port is
        // registered again.
        controller.registry.leases.lock().unwrap().remove(&lease);
        controller
            .expect("lost lease noticed", |e| {
                matches!(e, Event::KeepAlive(l, false) if l == lease).then_some(())
            })
            .await;
        let (_, new_lease) = controller.registered().await;
        assert_ne!(new_lease, lease);
        wait_status(&registration, "registered", |s| s.registered).await;

        // deregister() revokes everything and returns once the controller confirmed.
        registration.deregister().await;
        assert!(controller.registry.leases.lock().unwrap().is_empty());
        assert!(!registration.registered());
        drop(app);
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(300)), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_seconds(Duration::from_secs(10)), 10);
    }
}
