//! Discovery client: the endpoints of the services this proxy's app calls.
//!
//! The first [`Discovery::resolve`] of a service spawns one task that holds a
//! `ferrule.v1.Discovery/Watch` stream to one of the controllers (tried in turn, reconnecting
//! with jittered exponential backoff capped at 5 s) and applies its updates: a snapshot
//! replaces everything known about the service, a delta upserts endpoints by
//! [`endpoint_key`] and removes the keys it names. Each [`ServiceRef`] resolved gets its own
//! `watch` channel holding the endpoints of its port, so balancers follow changes without
//! polling. A lost controller never clears endpoints: the last known set keeps serving until a
//! new stream delivers a fresh snapshot.
//!
//! Port selection for a [`ServiceRef`] without a port name (the service's default port):
//! endpoints registered with an empty port name if there are any; otherwise, when the service
//! has exactly one port name, that port; otherwise the port named `http`; otherwise none (the
//! caller must name the port, and sees "no endpoints" until it does).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ferrule_proto::names::{ServiceRef, endpoint_key, namespace_or_default};
use ferrule_proto::v1::discovery_client::DiscoveryClient;
use ferrule_proto::v1::discovery_update::Kind;
use ferrule_proto::v1::{DiscoveryUpdate, Endpoint, LookupRequest, ProxyInfo, WatchRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use ferrule_proxy_policy::balance::Endpoints;
use ferrule_proxy_policy::endpoint::EndpointTarget;

use crate::control::{Backoff, Controllers};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The port a [`ServiceRef`] without a port name means when the service has several.
const DEFAULT_PORT_NAME: &str = "http";

/// Subscribes to the controller's `Discovery` stream per service on first use. Cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` for [`Discovery::fixed`].
    source: Option<Source>,
    state: Arc<Shared>,
}

struct Source {
    controllers: Option<Controllers>,
    proxy: ProxyInfo,
    /// Stops every watch task when the last `Discovery` clone is dropped.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(source) = &self.source {
            source.stop.cancel();
        }
    }
}

/// What the watch tasks and `resolve` share.
#[derive(Default)]
struct Shared {
    services: Mutex<HashMap<String, ServiceState>>,
    /// Watch streams currently established.
    streams_up: AtomicUsize,
}

impl Shared {
    fn services(&self) -> MutexGuard<'_, HashMap<String, ServiceState>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters more than losing every endpoint would, so keep serving.
        self.services.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Everything known about one service, and the channels of the targets resolved on it.
#[derive(Default)]
struct ServiceState {
    version: i64,
    synced: bool,
    /// By endpoint key, so deltas apply in place and the order is stable.
    endpoints: BTreeMap<String, Endpoint>,
    /// By port name as the caller gave it (empty for the default port).
    targets: HashMap<String, watch::Sender<Endpoints>>,
    /// Given to [`Discovery::fixed`]: kept whether or not anyone reads it.
    pinned: bool,
    /// Stops the service's watch stream when the service is released.
    stop: Option<CancellationToken>,
}

impl ServiceState {
    fn view(&self, port_name: &str) -> Endpoints {
        let port = self.resolve_port(port_name);
        let endpoints = match port {
            Some(port) => EndpointTarget::resolve_all(
                self.endpoints.values().filter(|ep| ep.port_name == port),
            ),
            None => Arc::from([]),
        };
        Endpoints {
            version: self.version,
            endpoints,
            synced: self.synced,
        }
    }

    /// The port name that `requested` means (see the module docs).
    fn resolve_port<'a>(&'a self, requested: &'a str) -> Option<&'a str> {
        if !requested.is_empty() {
            return Some(requested);
        }
        let names: BTreeSet<&str> = self
            .endpoints
            .values()
            .map(|ep| ep.port_name.as_str())
            .collect();
        if names.contains("") {
            Some("")
        } else if names.len() == 1 {
            names.into_iter().next()
        } else if names.contains(DEFAULT_PORT_NAME) {
            Some(DEFAULT_PORT_NAME)
        } else {
            None
        }
    }

    fn apply(&mut self, update: DiscoveryUpdate) {
        match update.kind {
            Some(Kind::Snapshot(snapshot)) => {
                self.endpoints = snapshot
                    .endpoints
                    .into_iter()
                    .map(|ep| (endpoint_key(&ep), ep))
                    .collect();
                self.synced = true;
            }
            Some(Kind::Delta(delta)) => {
                for key in &delta.removed {
                    self.endpoints.remove(key);
                }
                for ep in delta.added {
                    self.endpoints.insert(endpoint_key(&ep), ep);
                }
            }
            None => return,
        }
        self.version = update.version;
        self.publish();
    }

    fn publish(&self) {
        for (port_name, tx) in &self.targets {
            tx.send_replace(self.view(port_name));
        }
    }
}

impl Discovery {
    /// `controllers`: gRPC addresses ("127.0.0.1:8086" or "http://..."), tried in turn.
    ///
    /// Addresses that do not parse are reported at error level and leave discovery without a
    /// controller (every service stays unsynced); validate flags early with
    /// [`Controllers::parse`] to refuse them at startup instead.
    pub fn new(controllers: Vec<String>, proxy: ProxyInfo) -> Self {
        Self::with_controllers(
            crate::control::parse_or_log(&controllers, "discovery"),
            proxy,
        )
    }

    /// [`Discovery::new`] with the controllers already parsed (and their TLS set).
    pub fn with_controllers(controllers: Option<Controllers>, proxy: ProxyInfo) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: Some(Source {
                    controllers,
                    proxy,
                    stop: CancellationToken::new(),
                }),
                state: Arc::default(),
            }),
        }
    }

    /// Fixed endpoints, no controller: for tests and for static upstreams.
    ///
    /// Each [`ServiceRef`] resolves to exactly the endpoints given for it (no port filtering);
    /// any other resolves to an empty, synced set.
    pub fn fixed(services: Vec<(ServiceRef, Vec<Endpoint>)>) -> Self {
        let state = Shared::default();
        {
            let mut map = state.services();
            for (target, endpoints) in services {
                let entry = map.entry(target.name()).or_default();
                entry.synced = true;
                entry.pinned = true;
                entry.targets.insert(
                    target.port_name,
                    watch::Sender::new(Endpoints {
                        version: 0,
                        endpoints: EndpointTarget::resolve_all(&endpoints),
                        synced: true,
                    }),
                );
            }
        }
        Self {
            inner: Arc::new(Inner {
                source: None,
                state: Arc::new(state),
            }),
        }
    }

    /// The endpoints of `target`; subscribes on first call, shared afterwards.
    ///
    /// Must be called within a Tokio runtime (the first call per service spawns its watch).
    pub fn resolve(&self, target: &ServiceRef) -> watch::Receiver<Endpoints> {
        let mut services = self.inner.state.services();
        let name = target.name();
        let new_service = !services.contains_key(&name);
        let state = services
            .entry(name.clone())
            .or_insert_with(|| ServiceState {
                // Fixed discovery knows everything it will ever know from the start.
                synced: self.inner.source.is_none(),
                ..Default::default()
            });
        if let Some(tx) = state.targets.get(&target.port_name) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(state.view(&target.port_name));
        state.targets.insert(target.port_name.clone(), tx);
        if let (Some(source), true) = (&self.inner.source, new_service)
            && let Some(controllers) = &source.controllers
        {
            tracing::info!(service = %name, "discovery: watching service");
            let stop = source.stop.child_token();
            state.stop = Some(stop.clone());
            tokio::spawn(watch_service(
                ServiceRef::new(&target.namespace, &target.service),
                source.proxy.clone(),
                controllers.clone(),
                self.inner.state.clone(),
                stop,
            ));
        }
        rx
    }

    /// Forgets the targets nobody reads any more (every receiver [`Discovery::resolve`] gave
    /// out was dropped) and stops the watch stream of each service left without targets.
    /// Returns how many services were released.
    pub fn release_unused(&self) -> usize {
        let mut services = self.inner.state.services();
        let mut released = 0;
        services.retain(|service, state| {
            if state.pinned {
                return true;
            }
            state.targets.retain(|_, tx| tx.receiver_count() > 0);
            if !state.targets.is_empty() {
                return true;
            }
            if let Some(stop) = &state.stop {
                stop.cancel();
            }
            tracing::info!(%service, "discovery: no longer watching service");
            released += 1;
            false
        });
        released
    }

    /// Which service `addr` belongs to, for a connection intercepted on its way there
    /// (transparent mode): first from the endpoints this proxy already watches, then by
    /// asking a controller (`Discovery/Lookup`). `Ok(None)`: the mesh knows no such address.
    pub async fn lookup(&self, addr: SocketAddr) -> Result<Option<ServiceRef>, LookupError> {
        if let Some(known) = self.lookup_local(addr) {
            return Ok(Some(known));
        }
        let Some(source) = &self.inner.source else {
            return Ok(None);
        };
        let Some(controllers) = &source.controllers else {
            return Err(LookupError::NoController);
        };
        let (controller, channel) = controllers.connect().await?;
        let answer = DiscoveryClient::new(channel)
            .lookup(LookupRequest {
                address: addr.ip().to_string(),
                port: u32::from(addr.port()),
                proxy: Some(source.proxy.clone()),
            })
            .await
            .map_err(|status| LookupError::Status { controller, status })?
            .into_inner();
        if !answer.found {
            return Ok(None);
        }
        Ok(Some(ServiceRef {
            namespace: namespace_or_default(&answer.namespace).to_string(),
            service: answer.service,
            port_name: answer.port_name,
        }))
    }

    /// The target already resolved here whose endpoints include `addr`.
    fn lookup_local(&self, addr: SocketAddr) -> Option<ServiceRef> {
        let services = self.inner.state.services();
        services.iter().find_map(|(name, state)| {
            state.targets.iter().find_map(|(port_name, tx)| {
                let known = tx.borrow().endpoints.iter().any(|ep| ep.addr == addr);
                let mut target = ServiceRef::parse(name).ok().filter(|_| known)?;
                target.port_name.clone_from(port_name);
                Some(target)
            })
        })
    }

    /// How many services discovery holds state for (for tests).
    pub fn services(&self) -> usize {
        self.inner.state.services().len()
    }

    /// True while a stream to some controller is established (for `/ready` and metrics).
    /// Always true for [`Discovery::fixed`], which needs no controller.
    pub fn connected(&self) -> bool {
        self.inner.source.is_none() || self.inner.state.streams_up.load(Ordering::Relaxed) > 0
    }
}

/// Counts an established stream for as long as it lives.
struct StreamUp<'a>(&'a AtomicUsize);

impl<'a> StreamUp<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for StreamUp<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps one service's watch stream up until `stop`.
async fn watch_service(
    service: ServiceRef,
    proxy: ProxyInfo,
    controllers: Controllers,
    state: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = run_stream(&service, &proxy, &controllers, &state) => outcome,
        };
        match outcome {
            Ok(received) => {
                if received {
                    backoff.reset();
                }
                tracing::warn!(%service, "discovery stream ended by the controller; reconnecting");
            }
            Err(error) => {
                tracing::warn!(%service, %error, "discovery stream failed; keeping last known endpoints");
            }
        }
        let delay = backoff.next_delay();
        tracing::debug!(%service, ?delay, "discovery: waiting before reconnecting");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why [`Discovery::lookup`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no controller address is usable")]
    NoController,
    #[error(transparent)]
    Connect(#[from] crate::control::ControlError),
    #[error("controller {controller} answered {status}")]
    Status {
        controller: String,
        status: tonic::Status,
    },
}

/// Why one watch stream stopped.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Connect(#[from] crate::control::ControlError),
    #[error("controller {controller} answered {status}")]
    Status {
        controller: String,
        status: tonic::Status,
    },
}

/// One stream: connect, watch, apply updates until it ends. Returns whether any update
/// arrived (a stream that delivered something resets the backoff).
async fn run_stream(
    service: &ServiceRef,
    proxy: &ProxyInfo,
    controllers: &Controllers,
    state: &Shared,
) -> Result<bool, StreamError> {
    let (controller, channel) = controllers.connect().await?;
    let status = |status| StreamError::Status {
        controller: controller.clone(),
        status,
    };
    let request = WatchRequest {
        service: service.service.clone(),
        namespace: service.namespace.clone(),
        proxy: Some(proxy.clone()),
    };
    let name = service.name();
    let mut stream = DiscoveryClient::new(channel)
        .watch(request)
        .await
        .map_err(status)?
        .into_inner();
    let _up = StreamUp::new(&state.streams_up);
    tracing::info!(%service, %controller, "discovery stream established");
    let mut received = false;
    while let Some(update) = stream.message().await.map_err(status)? {
        received = true;
        tracing::debug!(%service, version = update.version, "discovery update");
        if let Some(entry) = state.services().get_mut(&name) {
            entry.apply(update);
        }
    }
    Ok(received)
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use ferrule_proto::v1::discovery_server::{self, DiscoveryServer};
    use ferrule_proto::v1::{Delta, LookupResponse, Snapshot};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Status};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn ep(port_name: &str, port: u32) -> Endpoint {
        Endpoint {
            service: "user".into(),
            port_name: port_name.into(),
            address: "127.0.0.1".into(),
            port,
            ..Default::default()
        }
    }

    fn snapshot(version: i64, endpoints: Vec<Endpoint>) -> DiscoveryUpdate {
        DiscoveryUpdate {
            service: "user".into(),
            version,
            kind: Some(Kind::Snapshot(Snapshot { endpoints })),
        }
    }

    fn ports(e: &Endpoints) -> Vec<u32> {
        e.endpoints.iter().map(|ep| ep.port()).collect()
    }

    /// A real Discovery server whose streams the test feeds: every Watch hands the test a
    /// sender for that stream.
    struct FakeController {
        watches: mpsc::Sender<(WatchRequest, mpsc::Sender<Result<DiscoveryUpdate, Status>>)>,
    }

    #[tonic::async_trait]
    impl discovery_server::Discovery for FakeController {
        type WatchStream = Pin<Box<dyn Stream<Item = Result<DiscoveryUpdate, Status>> + Send>>;

        async fn watch(
            &self,
            request: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let (tx, rx) = mpsc::channel(16);
            self.watches
                .send((request.into_inner(), tx))
                .await
                .map_err(|_| Status::unavailable("test over"))?;
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        /// Knows one address: 10.0.0.9:8080 is `payment.shop:grpc`.
        async fn lookup(
            &self,
            request: Request<LookupRequest>,
        ) -> Result<Response<LookupResponse>, Status> {
            let req = request.into_inner();
            let answer = if (req.address.as_str(), req.port) == ("10.0.0.9", 8080) {
                LookupResponse {
                    found: true,
                    namespace: "shop".into(),
                    service: "payment".into(),
                    port_name: "grpc".into(),
                }
            } else {
                LookupResponse::default()
            };
            Ok(Response::new(answer))
        }
    }

    type Watches = mpsc::Receiver<(WatchRequest, mpsc::Sender<Result<DiscoveryUpdate, Status>>)>;

    /// Starts a fake controller; dropping the returned token's guard stops it.
    async fn start_controller() -> (String, Watches, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(FakeController { watches: tx }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        (addr, rx, stop)
    }

    async fn next_watch(
        watches: &mut Watches,
    ) -> (WatchRequest, mpsc::Sender<Result<DiscoveryUpdate, Status>>) {
        tokio::time::timeout(WAIT, watches.recv())
            .await
            .expect("no watch within bound")
            .expect("controller gone")
    }

    async fn wait_for(
        rx: &mut watch::Receiver<Endpoints>,
        what: &str,
        f: impl FnMut(&Endpoints) -> bool,
    ) -> Endpoints {
        tokio::time::timeout(WAIT, rx.wait_for(f))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("discovery dropped")
            .clone()
    }

    #[tokio::test]
    async fn snapshot_and_deltas_reach_resolved_targets() {
        let (addr, mut watches, _stop) = start_controller().await;
        let proxy = ProxyInfo {
            proxy_id: "p1".into(),
            ..Default::default()
        };
        let discovery = Discovery::new(vec![addr], proxy);
        let mut http = discovery.resolve(&ServiceRef::parse("user:http").unwrap());
        let mut default = discovery.resolve(&ServiceRef::parse("user").unwrap());
        assert!(!http.borrow().synced);

        let (request, stream) = next_watch(&mut watches).await;
        assert_eq!(request.service, "user");
        assert_eq!(request.proxy.unwrap().proxy_id, "p1");
        wait_for_connected(&discovery, true).await;

        stream
            .send(Ok(snapshot(5, vec![ep("http", 1), ep("grpc", 2)])))
            .await
            .unwrap();
        let got = wait_for(&mut http, "snapshot", |e| e.synced).await;
        assert_eq!((got.version, ports(&got)), (5, vec![1]));
        // Two port names, one of them "http": the default port is "http".
        let got = wait_for(&mut default, "default port", |e| e.synced).await;
        assert_eq!(ports(&got), vec![1]);

        let delta = DiscoveryUpdate {
            service: "user".into(),
            version: 6,
            kind: Some(Kind::Delta(Delta {
                added: vec![ep("http", 3)],
                removed: vec![endpoint_key(&ep("http", 1))],
            })),
        };
        stream.send(Ok(delta)).await.unwrap();
        let got = wait_for(&mut http, "delta", |e| e.version == 6).await;
        assert_eq!(ports(&got), vec![3]);

        // A second target on a watched service shares the stream and starts from what is known.
        let grpc = discovery.resolve(&ServiceRef::parse("user:grpc").unwrap());
        assert_eq!(ports(&grpc.borrow()), vec![2]);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), watches.recv())
                .await
                .is_err(),
            "a second watch was opened for the same service"
        );
    }

    /// An intercepted connection's destination maps to a service: from a watched service's
    /// endpoints without asking, else from the controller's answer; an address nobody
    /// registered is not the mesh's.
    #[tokio::test]
    async fn lookup_answers_from_watched_endpoints_then_from_the_controller() {
        let (addr, mut watches, _stop) = start_controller().await;
        let discovery = Discovery::new(vec![addr], ProxyInfo::default());
        let mut user = discovery.resolve(&ServiceRef::parse("user").unwrap());
        let (_, stream) = next_watch(&mut watches).await;
        stream
            .send(Ok(snapshot(1, vec![ep("", 7001)])))
            .await
            .unwrap();
        wait_for(&mut user, "snapshot", |e| e.synced).await;

        let lookup = |a: &str| discovery.lookup(a.parse().unwrap());
        assert_eq!(
            lookup("127.0.0.1:7001").await.unwrap(),
            Some(ServiceRef::parse("user").unwrap())
        );
        assert_eq!(
            lookup("10.0.0.9:8080").await.unwrap(),
            Some(ServiceRef::parse("payment.shop:grpc").unwrap())
        );
        assert_eq!(lookup("10.0.0.9:8081").await.unwrap(), None);
    }

    #[tokio::test]
    async fn fixed_discovery_looks_up_its_own_endpoints_only() {
        let discovery = Discovery::fixed(vec![(
            ServiceRef::parse("user").unwrap(),
            vec![ep("", 7001)],
        )]);
        let lookup = |a: &str| discovery.lookup(a.parse().unwrap());
        assert_eq!(
            lookup("127.0.0.1:7001").await.unwrap(),
            Some(ServiceRef::parse("user").unwrap())
        );
        assert_eq!(lookup("127.0.0.1:7002").await.unwrap(), None);
    }

    async fn wait_for_connected(discovery: &Discovery, want: bool) {
        // `connected` is a plain flag with no change notification; poll it, bounded.
        let poll = async {
            while discovery.connected() != want {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(WAIT, poll)
            .await
            .unwrap_or_else(|_| panic!("connected never became {want}"));
    }

    #[tokio::test]
    async fn keeps_endpoints_while_controllers_are_gone_and_fails_over() {
        let (addr_a, mut watches_a, stop_a) = start_controller().await;
        let (addr_b, mut watches_b, _stop_b) = start_controller().await;
        let discovery = Discovery::new(vec![addr_a, addr_b], ProxyInfo::default());
        let mut rx = discovery.resolve(&ServiceRef::parse("user").unwrap());

        let (_, stream_a) = next_watch(&mut watches_a).await;
        stream_a
            .send(Ok(snapshot(1, vec![ep("", 1), ep("", 2)])))
            .await
            .unwrap();
        wait_for(&mut rx, "first snapshot", |e| e.synced).await;

        // Controller A goes away: the stream breaks, endpoints stay.
        stop_a.cancel();
        drop(stream_a);
        drop(watches_a);
        let (_, stream_b) = next_watch(&mut watches_b).await;
        assert_eq!(ports(&rx.borrow()), vec![1, 2]);

        // B's snapshot replaces everything.
        stream_b
            .send(Ok(snapshot(9, vec![ep("", 7)])))
            .await
            .unwrap();
        let got = wait_for(&mut rx, "snapshot from b", |e| e.version == 9).await;
        assert_eq!(ports(&got), vec![7]);
        wait_for_connected(&discovery, true).await;

        // B fails the stream: endpoints are kept and discovery watches again.
        stream_b
            .send(Err(Status::unavailable("going away")))
            .await
            .unwrap();
        drop(stream_b);
        let (_, _stream_b2) = next_watch(&mut watches_b).await;
        assert_eq!(ports(&rx.borrow()), vec![7]);
    }

    #[tokio::test]
    async fn a_service_nobody_reads_is_released_and_its_stream_closed() {
        let (addr, mut watches, _stop) = start_controller().await;
        let discovery = Discovery::new(vec![addr], ProxyInfo::default());
        let target = ServiceRef::parse("user").unwrap();
        let mut rx = discovery.resolve(&target);
        let (_, stream) = next_watch(&mut watches).await;
        stream.send(Ok(snapshot(1, vec![ep("", 1)]))).await.unwrap();
        wait_for(&mut rx, "the snapshot", |e| e.synced).await;

        assert_eq!(discovery.release_unused(), 0, "still read");
        assert_eq!(discovery.services(), 1);
        drop(rx);
        assert_eq!(discovery.release_unused(), 1);
        assert_eq!(discovery.services(), 0);
        // The proxy ended its stream: the controller's side sees it closed.
        tokio::time::timeout(WAIT, stream.closed())
            .await
            .expect("the watch stream was not closed after the release");

        // Resolving it again opens a new stream.
        let _rx = discovery.resolve(&target);
        next_watch(&mut watches).await;
    }

    #[tokio::test]
    async fn fixed_serves_static_endpoints() {
        let target = ServiceRef::parse("user:grpc").unwrap();
        let discovery = Discovery::fixed(vec![(target.clone(), vec![ep("grpc", 4)])]);
        let rx = discovery.resolve(&target);
        assert!(rx.borrow().synced);
        assert_eq!(ports(&rx.borrow()), vec![4]);
        let other = discovery.resolve(&ServiceRef::parse("order").unwrap());
        assert!(other.borrow().synced && other.borrow().endpoints.is_empty());
        assert!(discovery.connected());
    }

    #[test]
    fn default_port_rule() {
        let mut s = ServiceState::default();
        let with = |s: &mut ServiceState, eps: Vec<Endpoint>| {
            s.endpoints = eps.into_iter().map(|e| (endpoint_key(&e), e)).collect();
        };
        with(&mut s, vec![ep("", 1), ep("http", 2)]);
        assert_eq!(ports(&s.view("")), vec![1]);
        with(&mut s, vec![ep("grpc", 1)]);
        assert_eq!(ports(&s.view("")), vec![1]);
        with(&mut s, vec![ep("grpc", 1), ep("admin", 2)]);
        assert!(s.view("").endpoints.is_empty());
        assert_eq!(ports(&s.view("admin")), vec![2]);
    }

    #[tokio::test]
    async fn stream_of_updates_is_applied_in_order() {
        // Many deltas in a burst: the receiver sees the final state.
        let (addr, mut watches, _stop) = start_controller().await;
        let discovery = Discovery::new(vec![addr], ProxyInfo::default());
        let mut rx = discovery.resolve(&ServiceRef::parse("user").unwrap());
        let (_, stream) = next_watch(&mut watches).await;
        stream.send(Ok(snapshot(1, vec![]))).await.unwrap();
        let updates = tokio_stream::iter(2..=40).map(|v| {
            Ok(DiscoveryUpdate {
                service: "user".into(),
                version: v,
                kind: Some(Kind::Delta(Delta {
                    added: vec![ep("", v as u32)],
                    removed: vec![endpoint_key(&ep("", v as u32 - 1))],
                })),
            })
        });
        tokio::pin!(updates);
        while let Some(u) = updates.next().await {
            stream.send(u).await.unwrap();
        }
        let got = wait_for(&mut rx, "last delta", |e| e.version == 40).await;
        assert_eq!(ports(&got), vec![40]);
    }
}
