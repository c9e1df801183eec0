//! The config client: follows `ferrule.v1.Config/Watch` and publishes the [`PolicySet`] this
//! proxy applies.
//!
//! [`PolicyClient::spawn`] starts one task that subscribes (its proxy and the upstream
//! services it calls) on one of the controllers, tried in turn and reconnected with jittered
//! exponential backoff capped at 5 s. The upstreams are not a list fixed at start: a target
//! is subscribed when the proxy first uses it ([`PolicyClient::subscribe`] returns a guard)
//! and unsubscribed when its last guard drops (the target was idle-evicted); each change
//! subscribes again on the open stream with a new `generation`, and the controller's snapshots
//! echo the generation they reflect, so a new target can wait until its policy is in force
//! ([`PolicySubscription::ready`]). Each snapshot is parsed, validated and compiled: a good
//! one is published on the `watch` channel and acked with its version; a bad one is nacked
//! with the reason and the last good set stays in force. A snapshot of the version already in
//! force (sent again after a reconnect) is acked without being republished, so stacks do not
//! rebuild for nothing. While no controller is reachable the last good set stays too: the
//! proxy never drops its config because the control plane is away.
//!
//! A proxy may add its own [`Check`] ([`PolicyClient::spawn_checked`]): a set that compiles
//! but that the proxy cannot use (the gateway's `Gateway` resource naming a key file it cannot
//! read) is nacked with the check's reason, like one that does not compile. The set carries
//! every resource it was sent, `Gateway` included ([`PolicySet::gateway`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferrule_proto::v1::config_client::ConfigClient;
use ferrule_proto::v1::{
    Ack, ConfigRequest, ConfigSnapshot, Nack, ProxyInfo, Subscribe, config_request,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::control::{Backoff, ControlError, Controllers};
use ferrule_proxy_policy::PolicySet;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A version this proxy refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Nacked {
    pub version: i64,
    pub reason: String,
}

/// A proxy's own test of a set that compiled: `Err(reason)` nacks it with the reason.
pub type Check = Arc<dyn Fn(&PolicySet) -> Result<(), String> + Send + Sync>;

/// The services this proxy calls, each with how many users hold it and the generation at
/// which it joined; every change makes a new generation.
#[derive(Debug, Default)]
struct Upstreams {
    services: BTreeMap<String, (usize, u64)>,
    generation: u64,
}

/// What [`PolicyClient::subscribe`] changes and the stream task follows.
#[derive(Debug)]
struct Subscriptions {
    upstreams: Mutex<Upstreams>,
    /// The latest generation, for the task to subscribe again.
    changed: watch::Sender<u64>,
    /// The generation the set in force reflects (echoed by the controller).
    reflected: watch::Sender<u64>,
}

impl Subscriptions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Upstreams> {
        self.upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The subscribe request for the current upstreams.
    fn request(&self, proxy: &ProxyInfo) -> Subscribe {
        let upstreams = self.lock();
        Subscribe {
            proxy: Some(proxy.clone()),
            upstreams: upstreams.services.keys().cloned().collect(),
            generation: upstreams.generation,
        }
    }
}

/// Holds a service in this proxy's subscription; dropping the last one for a service
/// unsubscribes it.
#[derive(Debug)]
pub struct PolicySubscription {
    /// `None` from a client with a fixed set.
    subscriptions: Option<Arc<Subscriptions>>,
    service: String,
    /// The generation from which the controller's snapshots include the service.
    since: u64,
    /// Set once [`Self::ready`] has waited: later callers never wait again, also when the
    /// controller did not confirm in time (it may predate re-subscribing).
    settled: std::sync::atomic::AtomicBool,
}

impl PolicySubscription {
    /// Waits, at most `wait`, until the set in force reflects this subscription (the
    /// service's policy, if it has one, is applied). Returns whether it does; on `false` the
    /// caller goes on with what is in force (the defaults for a service never seen), as a
    /// proxy whose controller is away must.
    pub async fn ready(&self, wait: Duration) -> bool {
        use std::sync::atomic::Ordering;
        let Some(subscriptions) = &self.subscriptions else {
            return true;
        };
        let mut reflected = subscriptions.reflected.subscribe();
        let since = self.since;
        if *reflected.borrow() >= since {
            return true;
        }
        if self.settled.load(Ordering::Relaxed) {
            return false;
        }
        let ready = matches!(
            tokio::time::timeout(wait, reflected.wait_for(|g| *g >= since)).await,
            Ok(Ok(_))
        );
        self.settled.store(true, Ordering::Relaxed);
        ready
    }
}

impl Drop for PolicySubscription {
    fn drop(&mut self) {
        let Some(subscriptions) = &self.subscriptions else {
            return;
        };
        let generation = {
            let mut upstreams = subscriptions.lock();
            let Some((users, _)) = upstreams.services.get_mut(&self.service) else {
                return;
            };
            *users -= 1;
            if *users > 0 {
                return;
            }
            upstreams.services.remove(&self.service);
            upstreams.generation += 1;
            upstreams.generation
        };
        subscriptions.changed.send_replace(generation);
    }
}

/// The policy in force, kept up to date from the controllers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PolicyClient {
    policies: watch::Receiver<Arc<PolicySet>>,
    last_nack: Arc<Mutex<Option<Nacked>>>,
    /// `None` for [`PolicyClient::fixed`].
    subscriptions: Option<Arc<Subscriptions>>,
}

impl PolicyClient {
    /// Subscribes for `proxy` until `shutdown`, and for each service [`Self::subscribe`]d
    /// while its guard lives. Until the first snapshot arrives the set is empty (version 0:
    /// every service gets the defaults).
    ///
    /// Must be called within a Tokio runtime.
    pub fn spawn(controllers: Controllers, proxy: ProxyInfo, shutdown: CancellationToken) -> Self {
        Self::spawn_checked(controllers, proxy, Arc::new(|_| Ok(())), shutdown)
    }

    /// [`PolicyClient::spawn`], with `check` deciding whether a set that compiled is applied
    /// (and acked) or nacked.
    pub fn spawn_checked(
        controllers: Controllers,
        proxy: ProxyInfo,
        check: Check,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, policies) = watch::channel(Arc::new(PolicySet::default()));
        let last_nack = Arc::new(Mutex::new(None));
        let subscriptions = Arc::new(Subscriptions {
            upstreams: Mutex::default(),
            changed: watch::Sender::new(0),
            reflected: watch::Sender::new(0),
        });
        let task = Task {
            controllers,
            proxy,
            subscriptions: subscriptions.clone(),
            tx,
            last_nack: last_nack.clone(),
            check,
        };
        tokio::spawn(task.run(shutdown));
        Self {
            policies,
            last_nack,
            subscriptions: Some(subscriptions),
        }
    }

    /// A fixed set, no controller: for tests and proxies run without a control plane.
    pub fn fixed(set: PolicySet) -> Self {
        let (_, policies) = watch::channel(Arc::new(set));
        Self {
            policies,
            last_nack: Arc::default(),
            subscriptions: None,
        }
    }

    /// Adds `service` to what this proxy subscribes to, for as long as the guard lives.
    pub fn subscribe(&self, service: &str) -> PolicySubscription {
        let Some(subscriptions) = &self.subscriptions else {
            return PolicySubscription {
                subscriptions: None,
                service: service.to_string(),
                since: 0,
                settled: Default::default(),
            };
        };
        let (since, changed) = {
            let mut upstreams = subscriptions.lock();
            let next = upstreams.generation + 1;
            let entry = upstreams
                .services
                .entry(service.to_string())
                .or_insert((0, next));
            entry.0 += 1;
            let since = entry.1;
            let changed = since == next;
            if changed {
                upstreams.generation = next;
            }
            (since, changed)
        };
        if changed {
            subscriptions.changed.send_replace(since);
        }
        PolicySubscription {
            subscriptions: Some(subscriptions.clone()),
            service: service.to_string(),
            since,
            settled: Default::default(),
        }
    }

    /// The services subscribed now (for `/config` and tests).
    pub fn subscribed(&self) -> Vec<String> {
        self.subscriptions
            .as_ref()
            .map(|s| s.lock().services.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A receiver that sees every new set; for stacks that rebuild on change.
    pub fn watch(&self) -> watch::Receiver<Arc<PolicySet>> {
        self.policies.clone()
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<PolicySet> {
        self.policies.borrow().clone()
    }

    /// The config version in force.
    pub fn version(&self) -> i64 {
        self.policies.borrow().version()
    }

    /// The last version refused, if the one in force is older than it.
    pub fn last_nack(&self) -> Option<Nacked> {
        self.last_nack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The admin `/config` view: `{"version", "resources", "lastNack", "subscribed"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self.current().to_json();
        json["lastNack"] = serde_json::to_value(self.last_nack()).unwrap_or_default();
        json["subscribed"] = serde_json::to_value(self.subscribed()).unwrap_or_default();
        json
    }
}

/// Why one stream stopped.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Connect(#[from] ControlError),
    #[error("controller {controller} answered {status}")]
    Status {
        controller: String,
        status: tonic::Status,
    },
}

struct Task {
    controllers: Controllers,
    proxy: ProxyInfo,
    subscriptions: Arc<Subscriptions>,
    tx: watch::Sender<Arc<PolicySet>>,
    last_nack: Arc<Mutex<Option<Nacked>>>,
    check: Check,
}

impl Task {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = self.stream() => outcome,
            };
            match outcome {
                Ok(received) => {
                    if received {
                        backoff.reset();
                    }
                    tracing::warn!("config stream ended by the controller; reconnecting");
                }
                Err(error) => {
                    tracing::warn!(%error, version = self.tx.borrow().version(), "config stream failed; keeping the config in force");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One stream: subscribe, then apply and answer snapshots until it ends. Returns whether
    /// any snapshot arrived.
    async fn stream(&self) -> Result<bool, StreamError> {
        let (controller, channel) = self.controllers.connect().await?;
        let status = |status| StreamError::Status {
            controller: controller.clone(),
            status,
        };
        let (requests, rx) = mpsc::channel(4);
        let mut changed = self.subscriptions.changed.subscribe();
        changed.mark_unchanged();
        let subscribe = self.subscriptions.request(&self.proxy);
        // The receiver is right here and the channel empty: this cannot fail.
        let _ = requests
            .send(request(config_request::Kind::Subscribe(subscribe)))
            .await;
        let mut snapshots = ConfigClient::new(channel)
            .watch(ReceiverStream::new(rx))
            .await
            .map_err(status)?
            .into_inner();
        tracing::info!(%controller, "config stream established");
        let mut received = false;
        loop {
            let answer = tokio::select! {
                snapshot = snapshots.message() => match snapshot.map_err(status)? {
                    Some(snapshot) => {
                        received = true;
                        self.apply(snapshot)
                    }
                    None => break,
                },
                // `changed` lives as long as the task's `Subscriptions`: never closed here.
                Ok(()) = changed.changed() => {
                    let subscribe = self.subscriptions.request(&self.proxy);
                    tracing::debug!(upstreams = ?subscribe.upstreams, generation = subscribe.generation, "config: subscribing again");
                    request(config_request::Kind::Subscribe(subscribe))
                }
            };
            if requests.send(answer).await.is_err() {
                // The request side closed: the call is over.
                break;
            }
        }
        Ok(received)
    }

    /// Publishes a good snapshot; returns its ack or nack.
    fn apply(&self, snapshot: ConfigSnapshot) -> ConfigRequest {
        let version = snapshot.version;
        let subscription = snapshot.subscription;
        let checked = PolicySet::from_snapshot(&snapshot)
            .map_err(|e| e.to_string())
            .and_then(|set| (self.check)(&set).map(|()| set));
        match checked {
            Ok(set) => {
                // The same version for the same subscription (sent again after a reconnect)
                // changes nothing; for a new subscription it may bring a new service's policy.
                let reflected = *self.subscriptions.reflected.borrow();
                let published = self.tx.send_if_modified(|current| {
                    if current.version() == version && reflected == subscription {
                        return false;
                    }
                    *current = Arc::new(set);
                    true
                });
                self.subscriptions.reflected.send_replace(subscription);
                if published {
                    tracing::info!(version, "config applied");
                    let mut last = self
                        .last_nack
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if last.as_ref().is_some_and(|n| n.version <= version) {
                        *last = None;
                    }
                }
                request(config_request::Kind::Ack(Ack { version }))
            }
            Err(reason) => {
                tracing::warn!(version, %reason, "config refused; keeping the config in force");
                *self
                    .last_nack
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Nacked {
                    version,
                    reason: reason.clone(),
                });
                request(config_request::Kind::Nack(Nack { version, reason }))
            }
        }
    }
}

fn request(kind: config_request::Kind) -> ConfigRequest {
    ConfigRequest { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use ferrule_proto::v1::config_server::{self, ConfigServer};
    use tokio::net::TcpListener;
    use tokio_stream::Stream;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    fn resource(kind: &str, name: &str, spec: serde_json::Value) -> ferrule_proto::v1::Resource {
        ferrule_proto::v1::Resource {
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            spec_json: spec.to_string(),
            revision: 1,
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    type Snapshots = mpsc::Sender<Result<ConfigSnapshot, Status>>;
    type Calls = mpsc::Receiver<(Streaming<ConfigRequest>, Snapshots)>;

    /// A real Config server whose streams the test drives: each Watch hands the test the
    /// proxy's request stream and a sender for snapshots.
    struct FakeController {
        calls: mpsc::Sender<(Streaming<ConfigRequest>, Snapshots)>,
    }

    #[tonic::async_trait]
    impl config_server::Config for FakeController {
        type WatchStream = Pin<Box<dyn Stream<Item = Result<ConfigSnapshot, Status>> + Send>>;

        async fn watch(
            &self,
            request: Request<Streaming<ConfigRequest>>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let (tx, rx) = mpsc::channel(4);
            self.calls
                .send((request.into_inner(), tx))
                .await
                .map_err(|_| Status::unavailable("test over"))?;
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    async fn start_controller() -> (String, Calls, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(ConfigServer::new(FakeController { calls: tx }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        (addr, rx, stop)
    }

    async fn next_call(calls: &mut Calls) -> (Streaming<ConfigRequest>, Snapshots) {
        tokio::time::timeout(WAIT, calls.recv())
            .await
            .expect("no Watch call within bound")
            .expect("controller gone")
    }

    async fn next_request(requests: &mut Streaming<ConfigRequest>) -> config_request::Kind {
        tokio::time::timeout(WAIT, requests.message())
            .await
            .expect("no request within bound")
            .expect("request stream failed")
            .expect("request stream ended")
            .kind
            .expect("request without kind")
    }

    fn policy_snapshot(version: i64, request_timeout: &str) -> ConfigSnapshot {
        ConfigSnapshot {
            version,
            resources: vec![resource(
                "ServicePolicy",
                "user",
                serde_json::json!({"service": "user", "timeouts": {"request": request_timeout}}),
            )],
            subscription: 0,
        }
    }

    async fn wait_version(rx: &mut watch::Receiver<Arc<PolicySet>>, version: i64) {
        tokio::time::timeout(WAIT, rx.wait_for(|set| set.version() == version))
            .await
            .unwrap_or_else(|_| panic!("version {version} never applied"))
            .expect("client gone");
    }

    #[tokio::test]
    async fn applies_acks_nacks_and_keeps_the_last_good_set() {
        let (addr_a, mut calls_a, stop_a) = start_controller().await;
        let (addr_b, mut calls_b, _stop_b) = start_controller().await;
        let controllers = Controllers::parse(&[addr_a, addr_b]).unwrap();
        let proxy = ProxyInfo {
            proxy_id: "order-1".into(),
            service: "order".into(),
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        let client = PolicyClient::spawn(controllers, proxy, shutdown.clone());
        // Subscribed before the stream is up: the first subscribe carries it.
        let _user = client.subscribe("user");
        let mut rx = client.watch();
        assert_eq!(client.version(), 0);

        let (mut requests, snapshots) = next_call(&mut calls_a).await;
        let config_request::Kind::Subscribe(subscribe) = next_request(&mut requests).await else {
            panic!("the first request must subscribe")
        };
        assert_eq!(subscribe.proxy.unwrap().proxy_id, "order-1");
        assert_eq!(
            (subscribe.upstreams, subscribe.generation),
            (vec!["user".to_string()], 1)
        );

        // A good snapshot is applied and acked.
        snapshots.send(Ok(policy_snapshot(5, "2s"))).await.unwrap();
        wait_version(&mut rx, 5).await;
        assert_eq!(
            client.current().policy("user").request_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            next_request(&mut requests).await,
            config_request::Kind::Ack(Ack { version: 5 })
        );

        // A bad one is nacked with the field, and version 5 stays.
        let mut bad = policy_snapshot(6, "2s");
        bad.resources[0].spec_json = r#"{"service":"user","timeouts":{"request":"-1s"}}"#.into();
        snapshots.send(Ok(bad)).await.unwrap();
        let config_request::Kind::Nack(nack) = next_request(&mut requests).await else {
            panic!("a bad snapshot must be nacked")
        };
        assert_eq!(nack.version, 6);
        assert!(
            nack.reason.contains("spec.timeouts.request"),
            "{}",
            nack.reason
        );
        assert_eq!(client.version(), 5);
        assert_eq!(client.last_nack().unwrap().version, 6);
        let json = client.to_json();
        assert_eq!(
            (
                json["version"].as_i64(),
                json["lastNack"]["version"].as_i64()
            ),
            (Some(5), Some(6))
        );

        // Controller A goes away: the set stays while the client fails over to B.
        stop_a.cancel();
        drop((requests, snapshots, calls_a));
        let (mut requests, snapshots) = next_call(&mut calls_b).await;
        assert!(matches!(
            next_request(&mut requests).await,
            config_request::Kind::Subscribe(_)
        ));
        assert_eq!(client.version(), 5);

        // The same version again (after a reconnect) is acked but not republished.
        rx.mark_unchanged();
        snapshots.send(Ok(policy_snapshot(5, "2s"))).await.unwrap();
        assert_eq!(
            next_request(&mut requests).await,
            config_request::Kind::Ack(Ack { version: 5 })
        );
        assert!(!rx.has_changed().unwrap());

        // A newer good version replaces it and clears the nack.
        snapshots.send(Ok(policy_snapshot(7, "9s"))).await.unwrap();
        wait_version(&mut rx, 7).await;
        assert_eq!(
            client.current().policy("user").request_timeout,
            Some(Duration::from_secs(9))
        );
        assert_eq!(client.last_nack(), None);

        // Shutdown ends the task; the last set stays readable.
        shutdown.cancel();
        tokio::time::timeout(WAIT, rx.changed())
            .await
            .expect("the task did not stop")
            .expect_err("the sender is dropped when the task stops");
        assert_eq!(client.version(), 7);
    }

    /// A target is subscribed on the open stream when first used and unsubscribed when its
    /// last guard drops; `ready` waits for the snapshot that reflects the subscription.
    #[tokio::test]
    async fn targets_subscribe_and_unsubscribe_on_the_open_stream() {
        let (addr, mut calls, _stop) = start_controller().await;
        let proxy = ProxyInfo {
            proxy_id: "order-1".into(),
            service: "order".into(),
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        let client = PolicyClient::spawn(Controllers::parse(&[addr]).unwrap(), proxy, shutdown);
        let (mut requests, snapshots) = next_call(&mut calls).await;
        let config_request::Kind::Subscribe(first) = next_request(&mut requests).await else {
            panic!("the first request must subscribe")
        };
        assert_eq!((first.upstreams.len(), first.generation), (0, 0));

        let user = client.subscribe("user");
        let again = client.subscribe("user");
        let config_request::Kind::Subscribe(second) = next_request(&mut requests).await else {
            panic!("a new target must subscribe again")
        };
        assert_eq!(
            (second.upstreams, second.generation),
            (vec!["user".to_string()], 1)
        );
        assert!(
            !again.ready(Duration::from_millis(50)).await,
            "ready before any snapshot reflected the subscription"
        );

        let mut snapshot = policy_snapshot(4, "3s");
        snapshot.subscription = 1;
        snapshots.send(Ok(snapshot)).await.unwrap();
        assert!(user.ready(WAIT).await && again.ready(WAIT).await);
        assert_eq!(
            client.current().policy("user").request_timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(client.subscribed(), ["user"]);
        assert_eq!(client.to_json()["subscribed"], serde_json::json!(["user"]));

        // One guard of two dropped: still subscribed. The last one: unsubscribed.
        drop(again);
        assert_eq!(
            next_request(&mut requests).await,
            config_request::Kind::Ack(Ack { version: 4 })
        );
        drop(user);
        let config_request::Kind::Subscribe(third) = next_request(&mut requests).await else {
            panic!("forgetting the target must subscribe again")
        };
        assert_eq!((third.upstreams.len(), third.generation), (0, 2));
        assert!(client.subscribed().is_empty());
    }

    #[tokio::test]
    async fn fixed_serves_the_given_set() {
        let set = PolicySet::from_snapshot(&policy_snapshot(3, "1s")).unwrap();
        let client = PolicyClient::fixed(set);
        assert_eq!(client.version(), 3);
        assert_eq!(client.to_json()["lastNack"], serde_json::Value::Null);
    }

    fn gateway_snapshot(version: i64, route: &str) -> ConfigSnapshot {
        ConfigSnapshot {
            version,
            resources: vec![resource(
                "Gateway",
                "edge",
                serde_json::json!({"routes": [
                    {"name": route, "pathPrefix": "/", "service": "user", "public": true}
                ]}),
            )],
            subscription: 0,
        }
    }

    #[tokio::test]
    async fn a_gateway_resource_is_applied_and_the_proxys_check_can_nack_it() {
        let (addr, mut calls, _stop) = start_controller().await;
        let proxy = ProxyInfo {
            proxy_id: "edge-1".into(),
            service: "edge".into(),
            mode: "gateway".into(),
            ..Default::default()
        };
        let check: Check = Arc::new(|set: &PolicySet| match set.gateway("edge") {
            Some(spec) if spec.routes[0].name == "unusable" => Err("routes[0]: unusable".into()),
            _ => Ok(()),
        });
        let shutdown = CancellationToken::new();
        let client = PolicyClient::spawn_checked(
            Controllers::parse(&[addr]).unwrap(),
            proxy,
            check,
            shutdown.clone(),
        );
        let mut rx = client.watch();
        let (mut requests, snapshots) = next_call(&mut calls).await;
        next_request(&mut requests).await;

        snapshots
            .send(Ok(gateway_snapshot(3, "all")))
            .await
            .unwrap();
        assert_eq!(
            next_request(&mut requests).await,
            config_request::Kind::Ack(Ack { version: 3 })
        );
        wait_version(&mut rx, 3).await;
        assert_eq!(
            client.current().gateway("edge").unwrap().routes[0].name,
            "all"
        );
        assert!(client.current().gateway("other").is_none());

        snapshots
            .send(Ok(gateway_snapshot(4, "unusable")))
            .await
            .unwrap();
        let config_request::Kind::Nack(nack) = next_request(&mut requests).await else {
            panic!("the check must nack")
        };
        assert_eq!(
            (nack.version, nack.reason.as_str()),
            (4, "routes[0]: unusable")
        );
        assert_eq!(client.version(), 3);
        shutdown.cancel();
    }
}
