//! The configuration centre: validated, versioned config resources in the store.
//!
//! Writes come through `Admin` (apply, delete, rollback), are validated with `ferrule-config`
//! (a bad resource is refused naming the field, and nothing is stored) and land in one store
//! commit, all or nothing. Every config commit also rewrites [`keys::CONFIG_VERSION`], so that
//! key's revision is the config version: unrelated writes (registrations) never change it, and
//! history and rollback read the store at that revision.
//!
//! `Config/Watch` streams each proxy the resources that apply to it as versioned snapshots
//! (`select` says which), and records each ack or nack on the proxy's record for `ferrule
//! status`. One store watch on the config prefix is shared by every stream ([`ConfigHub`]).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferrule_config::{Kind, Resource, Spec};
use ferrule_proto::names::{qualified, qualify};
use ferrule_proto::v1::{
    self as pb, ApplyConfigResponse, ConfigChange, ConfigRequest, ConfigSnapshot, ProxyInfo,
    ProxyStatus, Subscribe, config_request,
};
use ferrule_store::{Listing, Op, Revision, Store, StoreError, WatchEvent};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::keys;
use crate::metrics::Metrics;
use crate::registry::{now_unix, store_status};

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Every stored resource, as of one config version.
#[derive(Debug, Clone, Default)]
pub struct ConfigState {
    pub synced: bool,
    /// The config version: the revision of the last config commit (0: never configured).
    pub version: Revision,
    /// Keyed by store key.
    pub resources: BTreeMap<String, Stored>,
    /// Stored values that are not a valid resource, keyed by store key: skipped, and shown by
    /// `Admin/GetConfig`, `Admin/ListUnreadable` and the `unreadable_keys` metric.
    pub unreadable: BTreeMap<String, Unreadable>,
}

/// A stored value the controller cannot read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub reason: String,
    pub revision: Revision,
}

impl Unreadable {
    pub fn to_proto(&self, key: &str) -> pb::UnreadableKey {
        pb::UnreadableKey {
            key: key.to_string(),
            reason: self.reason.clone(),
            revision: self.revision,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub resource: Resource,
    pub revision: Revision,
}

impl Stored {
    pub fn to_proto(&self) -> pb::Resource {
        pb::Resource {
            kind: self.resource.kind.to_string(),
            namespace: self.resource.metadata.namespace.clone(),
            name: self.resource.metadata.name.clone(),
            spec_json: self.resource.spec_json(),
            revision: self.revision,
        }
    }
}

/// Decodes a listing of the config prefix into resources and the config version.
fn decode_listing(listing: &Listing) -> ConfigState {
    let mut state = ConfigState {
        synced: true,
        ..ConfigState::default()
    };
    for kv in &listing.kvs {
        if kv.key == keys::CONFIG_VERSION {
            state.version = kv.mod_revision;
        } else {
            state.put(&kv.key, &kv.value, kv.mod_revision);
        }
    }
    state
}

impl ConfigState {
    /// Records the value stored at `key`: a resource, or an unreadable value (which also
    /// takes the place of the resource the key held before, as a fresh listing would).
    fn put(&mut self, key: &str, value: &[u8], revision: Revision) {
        match decode(key, value, revision) {
            Ok(stored) => {
                self.unreadable.remove(key);
                self.resources.insert(key.to_string(), stored);
            }
            Err(unreadable) => {
                self.resources.remove(key);
                self.unreadable.insert(key.to_string(), unreadable);
            }
        }
    }

    fn delete(&mut self, key: &str) {
        self.resources.remove(key);
        self.unreadable.remove(key);
    }
}

fn decode(key: &str, value: &[u8], revision: Revision) -> Result<Stored, Unreadable> {
    let unreadable = |reason: String| {
        tracing::warn!(%key, %reason, "skipping a stored config value that does not parse");
        Unreadable { reason, revision }
    };
    let Some((kind, namespace, name)) = keys::split_config(key) else {
        return Err(unreadable(
            "not a config key: expected /ferrule/config/<kind>/<namespace>/<name>".into(),
        ));
    };
    let spec = std::str::from_utf8(value)
        .map_err(|e| unreadable(format!("the value is not UTF-8 text: {e}")))?;
    Resource::from_parts(kind, namespace, name, spec)
        .map(|resource| Stored { resource, revision })
        .map_err(|e| unreadable(e.to_string()))
}

/// Applies, deletes and rolls back config; answers reads and history.
#[derive(Clone)]
pub struct ConfigStore {
    store: Arc<dyn Store>,
}

/// How one resource of an apply changes what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

impl ConfigStore {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    async fn current(&self) -> Result<ConfigState, Status> {
        let listing = self
            .store
            .list(keys::CONFIG, None)
            .await
            .map_err(store_status)?;
        Ok(decode_listing(&listing))
    }

    /// Services a route may send to: those with registered endpoints, and those any stored or
    /// applied resource configures.
    async fn known_services(
        &self,
        state: &ConfigState,
        batch: &[Resource],
    ) -> Result<BTreeSet<String>, Status> {
        let registry = self
            .store
            .list(keys::REGISTRY, None)
            .await
            .map_err(store_status)?;
        let mut known: BTreeSet<String> = registry
            .kvs
            .iter()
            .filter_map(|kv| keys::split_endpoint(&kv.key).map(|k| k.qualified_service()))
            .collect();
        known.extend(
            state
                .resources
                .values()
                .filter_map(|s| s.resource.target_service()),
        );
        known.extend(batch.iter().filter_map(Resource::target_service));
        Ok(known)
    }

    /// Validates and stores `resources` atomically. With `dry_run`, validates and reports the
    /// outcomes without storing.
    pub async fn apply(
        &self,
        resources: Vec<pb::Resource>,
        dry_run: bool,
    ) -> Result<ApplyConfigResponse, Status> {
        if resources.is_empty() {
            return Err(Status::invalid_argument("resources: nothing to apply"));
        }
        let mut batch = Vec::with_capacity(resources.len());
        for (i, r) in resources.iter().enumerate() {
            let parsed = Resource::from_parts(&r.kind, &r.namespace, &r.name, &r.spec_json)
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "resource {i} ({}/{}/{}): {e}",
                        r.kind, r.namespace, r.name
                    ))
                })?;
            batch.push(parsed);
        }
        let state = self.current().await?;
        let known = self.known_services(&state, &batch).await?;
        // Validate the configuration this apply would leave behind (the batch, then every stored
        // resource it does not replace), so rules across resources (one policy per service)
        // also hold against what is already stored.
        let replaced: BTreeSet<String> = batch.iter().map(keys::config).collect();
        let mut result = batch.clone();
        result.extend(
            state
                .resources
                .iter()
                .filter(|(k, _)| !replaced.contains(*k))
                .map(|(_, s)| s.resource.clone()),
        );
        ferrule_config::validate(&result, Some(&known))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;

        let mut ops = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for resource in &batch {
            let key = keys::config(resource);
            let outcome = match state.resources.get(&key) {
                Some(stored) if stored.resource == *resource => Outcome::Unchanged,
                Some(_) => Outcome::Configured,
                None => Outcome::Created,
            };
            if outcome != Outcome::Unchanged {
                ops.push(Op::Put {
                    key,
                    value: resource.spec_json().into_bytes(),
                });
            }
            outcomes.push(outcome.as_str().to_string());
        }
        let version = if dry_run || ops.is_empty() {
            state.version
        } else {
            self.commit(ops).await?
        };
        if !dry_run {
            tracing::info!(version, resources = batch.len(), "config applied");
        }
        Ok(ApplyConfigResponse { version, outcomes })
    }

    /// Commits config ops together with the version marker; returns the new version.
    async fn commit(&self, mut ops: Vec<Op>) -> Result<Revision, Status> {
        ops.push(Op::Put {
            key: keys::CONFIG_VERSION.to_string(),
            value: Vec::new(),
        });
        self.store.commit(ops).await.map_err(store_status)
    }

    /// Resources under `kind[/namespace[/name]]`, and the config version.
    pub async fn get(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<(Vec<pb::Resource>, Revision), Status> {
        let (resources, _, version) = self.get_all(kind, namespace, name).await?;
        Ok((resources, version))
    }

    /// [`ConfigStore::get`], and the unreadable values under the same keys.
    pub async fn get_all(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<(Vec<pb::Resource>, Vec<pb::UnreadableKey>, Revision), Status> {
        let selector = keys::ConfigSelector::new(&parse_kind(kind)?, namespace, name)?;
        let state = self.current().await?;
        let resources = state
            .resources
            .iter()
            .filter(|(k, _)| selector.matches(k))
            .map(|(_, s)| s.to_proto())
            .collect();
        let unreadable = state
            .unreadable
            .iter()
            .filter(|(k, _)| selector.matches(k))
            .map(|(k, u)| u.to_proto(k))
            .collect();
        Ok((resources, unreadable, state.version))
    }

    /// Every stored config value that is not a valid resource.
    pub async fn unreadable(&self) -> Result<Vec<pb::UnreadableKey>, Status> {
        let state = self.current().await?;
        Ok(state
            .unreadable
            .iter()
            .map(|(k, u)| u.to_proto(k))
            .collect())
    }

    pub async fn delete(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Revision, Status> {
        let kind = parse_kind(kind)?.ok_or_else(|| Status::invalid_argument("kind: required"))?;
        if name.is_empty() {
            return Err(Status::invalid_argument("name: required"));
        }
        let namespace = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        let key = keys::config_key(kind, namespace, name);
        if self.store.get(&key).await.map_err(store_status)?.is_none() {
            return Err(Status::not_found(format!(
                "{kind}/{namespace}/{name} not found"
            )));
        }
        let version = self.commit(vec![Op::Delete { key }]).await?;
        tracing::info!(version, %kind, %namespace, %name, "config deleted");
        Ok(version)
    }

    /// Every config change still in the store's history, oldest first, optionally for one
    /// resource or kind.
    pub async fn history(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<ConfigChange>, Status> {
        let selector = keys::ConfigSelector::new(&parse_kind(kind)?, namespace, name)?;
        let Some(marker) = self
            .store
            .get(keys::CONFIG_VERSION)
            .await
            .map_err(store_status)?
        else {
            return Ok(Vec::new());
        };
        // Replay the whole config prefix from the start of history: every commit ends with the
        // version marker, so the marker at the current version ends the replay.
        let mut events = self
            .store
            .watch(keys::CONFIG, 0)
            .await
            .map_err(store_status)?;
        let mut changes = Vec::new();
        loop {
            let event = match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
                Ok(Some(Ok(e))) => e,
                Ok(Some(Err(StoreError::Compacted { oldest, .. }))) => {
                    return Err(Status::failed_precondition(format!(
                        "the store's history before revision {oldest} was compacted"
                    )));
                }
                Ok(Some(Err(e))) => return Err(store_status(e)),
                Ok(None) => break,
                Err(_) => return Err(Status::unavailable("replaying config history timed out")),
            };
            if event.key() == keys::CONFIG_VERSION {
                if event.revision() >= marker.mod_revision {
                    break;
                }
                continue;
            }
            if !selector.matches(event.key()) {
                continue;
            }
            let (resource, deleted) = match &event {
                WatchEvent::Put(kv) => (
                    decode(&kv.key, &kv.value, kv.mod_revision)
                        .ok()
                        .map(|s| s.to_proto()),
                    false,
                ),
                WatchEvent::Delete { key, revision } => (
                    keys::split_config(key).map(|(kind, namespace, name)| pb::Resource {
                        kind: kind.to_string(),
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        spec_json: String::new(),
                        revision: *revision,
                    }),
                    true,
                ),
            };
            changes.push(ConfigChange {
                version: event.revision(),
                resource,
                deleted,
            });
        }
        Ok(changes)
    }

    /// Makes the stored config what it was at version `to`: one commit, so proxies see a single
    /// new version.
    pub async fn rollback(&self, to: Revision) -> Result<ApplyConfigResponse, Status> {
        let target = match self.store.list(keys::CONFIG, Some(to)).await {
            Ok(l) => decode_listing(&l),
            Err(StoreError::Compacted { .. }) => {
                return Err(Status::failed_precondition(format!(
                    "version {to} has been compacted"
                )));
            }
            Err(StoreError::FutureRevision(_)) => {
                return Err(Status::invalid_argument(format!(
                    "version {to} does not exist yet"
                )));
            }
            Err(e) => return Err(store_status(e)),
        };
        let current = self.current().await?;
        let mut ops = Vec::new();
        let mut outcomes = Vec::new();
        for (key, stored) in &target.resources {
            match current.resources.get(key) {
                Some(now) if now.resource == stored.resource => {}
                Some(_) => outcomes.push(format!("{} configured", stored.resource.id())),
                None => outcomes.push(format!("{} created", stored.resource.id())),
            }
            if current.resources.get(key).map(|s| &s.resource) != Some(&stored.resource) {
                ops.push(Op::Put {
                    key: key.clone(),
                    value: stored.resource.spec_json().into_bytes(),
                });
            }
        }
        for (key, stored) in &current.resources {
            if !target.resources.contains_key(key) {
                ops.push(Op::Delete { key: key.clone() });
                outcomes.push(format!("{} deleted", stored.resource.id()));
            }
        }
        if ops.is_empty() {
            return Ok(ApplyConfigResponse {
                version: current.version,
                outcomes,
            });
        }
        let version = self.commit(ops).await?;
        tracing::info!(version, to, "config rolled back");
        Ok(ApplyConfigResponse { version, outcomes })
    }
}

/// An empty kind means every kind.
fn parse_kind(kind: &str) -> Result<Option<Kind>, Status> {
    if kind.is_empty() {
        return Ok(None);
    }
    kind.parse::<Kind>()
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("kind: {e}")))
}

/// Shares one store watch on the config prefix among every `Config/Watch` stream.
#[derive(Clone)]
pub struct ConfigHub {
    store: Arc<dyn Store>,
    state: watch::Receiver<Arc<ConfigState>>,
}

impl ConfigHub {
    /// Starts following the config prefix; the task lives as long as the controller.
    pub fn spawn(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = watch::channel(Arc::new(ConfigState::default()));
        tokio::spawn(follow_config(store.clone(), metrics, tx));
        Self { store, state: rx }
    }

    /// Serves one proxy's `Config/Watch` stream.
    pub async fn serve(
        &self,
        mut requests: Streaming<ConfigRequest>,
    ) -> Result<SnapshotStream, Status> {
        let first = tokio::time::timeout(Duration::from_secs(10), requests.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no subscribe request within 10s"))?
            .ok_or_else(|| Status::invalid_argument("stream closed before subscribing"))??;
        let Some(config_request::Kind::Subscribe(subscribe)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first request must be `subscribe`",
            ));
        };
        let proxy = subscribe.proxy.unwrap_or_default();
        let subscriber = Subscriber::new(&proxy, subscribe.upstreams);
        tracing::debug!(proxy = %proxy.proxy_id, ?subscriber, "config watch");
        let (subscription, subscribed) = watch::channel((subscriber, subscribe.generation));
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        tokio::spawn(send_snapshots(state, subscribed, tx.clone()));
        tokio::spawn(record_acks(
            self.store.clone(),
            proxy,
            requests,
            subscription,
        ));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

fn set_unreadable_gauge(metrics: &Metrics, state: &ConfigState) {
    metrics
        .unreadable_keys(crate::metrics::Area::Config)
        .set(i64::try_from(state.unreadable.len()).unwrap_or(i64::MAX));
}

async fn follow_config(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Arc<ConfigState>>,
) {
    let mut backoff = RETRY_MIN;
    loop {
        let listing = match store.list(keys::CONFIG, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing config failed; keeping the last known config");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        backoff = RETRY_MIN;
        let mut state = decode_listing(&listing);
        set_unreadable_gauge(&metrics, &state);
        tx.send_replace(Arc::new(state.clone()));
        let mut events = match store.watch(keys::CONFIG, listing.revision).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "watching config failed; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::info!(error = %e, "config watch restarts from a fresh listing");
                    break;
                }
            };
            match &event {
                WatchEvent::Put(kv) if kv.key == keys::CONFIG_VERSION => {
                    // The marker is written last in each commit's op list, but a commit's
                    // events share one revision, so publish once the marker arrives.
                    state.version = kv.mod_revision;
                    tx.send_replace(Arc::new(state.clone()));
                }
                WatchEvent::Put(kv) => state.put(&kv.key, &kv.value, kv.mod_revision),
                WatchEvent::Delete { key, .. } => state.delete(key),
            }
            set_unreadable_gauge(&metrics, &state);
        }
    }
}

/// `ProxyInfo.mode` of a gateway: the proxies that follow a `Gateway` resource.
const GATEWAY_MODE: &str = "gateway";

/// What a proxy's `subscribe` says it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Subscriber {
    /// Its own service and the services it calls (`upstreams`), by qualified name.
    services: BTreeSet<String>,
    /// Its own service by qualified name (empty without one) and its namespace: the
    /// `AuthorizationPolicy`s it enforces are its service's and its namespace's default.
    own: String,
    namespace: String,
    /// For a gateway (`mode: "gateway"`), the store key of its `Gateway` resource: the one
    /// named as the gateway's service, in the gateway's namespace (`default` when empty).
    gateway: Option<String>,
}

impl Subscriber {
    /// `upstreams` are relative to the proxy's namespace, as its own service is.
    fn new(proxy: &ProxyInfo, upstreams: Vec<String>) -> Self {
        let mut services: BTreeSet<String> = upstreams
            .iter()
            .map(|u| qualify(&proxy.namespace, u))
            .collect();
        let own = if proxy.service.is_empty() {
            String::new()
        } else {
            qualified(&proxy.namespace, &proxy.service)
        };
        if !own.is_empty() {
            services.insert(own.clone());
        }
        let namespace = ferrule_proto::names::namespace_or_default(&proxy.namespace).to_string();
        let gateway = (proxy.mode == GATEWAY_MODE && !proxy.service.is_empty()).then(|| {
            let namespace = if proxy.namespace.is_empty() {
                ferrule_config::DEFAULT_NAMESPACE
            } else {
                &proxy.namespace
            };
            keys::config_key(Kind::Gateway, namespace, &proxy.service)
        });
        Self {
            services,
            own,
            namespace,
            gateway,
        }
    }
}

/// The resources a proxy needs, as of `state`:
///
/// * the `ServicePolicy` and `HTTPRoute` of its own service and of the services it calls;
/// * for a gateway, its `Gateway` (see [`Subscriber::gateway`]), and the services that
///   resource's routes send to count as services it calls, so a route added by `ferrule apply`
///   brings its service's policy along without the gateway subscribing again;
/// * the policies and routes of the backends that the routes of the services it calls split
///   traffic to;
/// * the `AuthorizationPolicy`s of its own service and its namespace's default (only the
///   inbound side enforces them, so never those of the services it calls).
///
/// Sidecars never receive a `Gateway`, and a gateway never receives another gateway's.
fn select(state: &ConfigState, subscriber: &Subscriber) -> Vec<pb::Resource> {
    let gateway = subscriber
        .gateway
        .as_ref()
        .and_then(|key| state.resources.get(key));
    let mut calls = subscriber.services.clone();
    if let Some(gateway) = gateway
        && let Spec::Gateway(spec) = &gateway.resource.spec
    {
        let namespace = &gateway.resource.metadata.namespace;
        calls.extend(spec.services().into_iter().map(|s| qualify(namespace, s)));
    }
    let mut wanted = calls.clone();
    for stored in state.resources.values() {
        if stored
            .resource
            .target_service()
            .is_some_and(|s| calls.contains(&s))
        {
            wanted.extend(stored.resource.backend_services());
        }
    }
    state
        .resources
        .iter()
        .filter(|(key, s)| {
            if let Spec::AuthorizationPolicy(_) = &s.resource.spec {
                return match s.resource.target_service() {
                    Some(target) => !subscriber.own.is_empty() && target == subscriber.own,
                    None => {
                        !subscriber.own.is_empty()
                            && s.resource.metadata.namespace == subscriber.namespace
                    }
                };
            }
            Some(*key) == subscriber.gateway.as_ref()
                || s.resource
                    .target_service()
                    .is_some_and(|t| wanted.contains(&t))
        })
        .map(|(_, s)| s.to_proto())
        .collect()
}

/// What a stream's proxy subscribed to, and the `generation` of that subscribe.
type Subscription = (Subscriber, u64);

/// Sends a snapshot whenever the config version or the proxy's subscription changes.
async fn send_snapshots(
    mut state: watch::Receiver<Arc<ConfigState>>,
    mut subscription: watch::Receiver<Subscription>,
    tx: mpsc::Sender<Result<ConfigSnapshot, Status>>,
) {
    let mut sent = None;
    // A client may close its request side after subscribing and still read snapshots.
    let mut requests_open = true;
    loop {
        let current = state.borrow_and_update().clone();
        let (subscriber, generation) = subscription.borrow_and_update().clone();
        if current.synced && sent != Some((current.version, generation)) {
            let snapshot = ConfigSnapshot {
                version: current.version,
                resources: select(&current, &subscriber),
                subscription: generation,
            };
            if tx.send(Ok(snapshot)).await.is_err() {
                return;
            }
            sent = Some((current.version, generation));
        }
        tokio::select! {
            _ = tx.closed() => return,
            changed = state.changed() => if changed.is_err() { return },
            changed = subscription.changed(), if requests_open => {
                requests_open = changed.is_ok();
            }
        }
    }
}

/// How long the record of a proxy that is known only by its config stream outlives the stream.
const PRESENCE_TTL: Duration = Duration::from_secs(15);

/// Records acks and nacks on the proxy's record, so any replica can show them. A proxy that
/// announced itself (it registers an app) has a record under its own lease, which is kept; a
/// proxy that did not (a client-only sidecar, a gateway) gets a record under a lease this stream
/// keeps alive, so `ferrule status` lists every proxy with a config stream.
async fn record_acks(
    store: Arc<dyn Store>,
    proxy: ProxyInfo,
    mut requests: Streaming<ConfigRequest>,
    subscription: watch::Sender<Subscription>,
) {
    // A later subscribe replaces the proxy's list of upstreams; the snapshot task sends what
    // the new list selects.
    let resubscribe = |subscribe: Subscribe| {
        let subscriber = Subscriber::new(&proxy, subscribe.upstreams);
        tracing::debug!(proxy = %proxy.proxy_id, ?subscriber, generation = subscribe.generation, "config resubscribe");
        subscription.send_replace((subscriber, subscribe.generation));
    };
    if proxy.proxy_id.is_empty() {
        // Nothing to key a record on; still drain the stream so acks do not back up.
        while let Some(Ok(request)) = requests.next().await {
            if let Some(config_request::Kind::Subscribe(subscribe)) = request.kind {
                resubscribe(subscribe);
            }
        }
        return;
    }
    let key = keys::proxy(&proxy.proxy_id);
    let own_lease = match store.get(&key).await {
        Ok(None) => match store.grant_lease(PRESENCE_TTL).await {
            Ok(lease) => {
                let status = ProxyStatus {
                    proxy: Some(proxy.clone()),
                    last_seen: now_unix(),
                    ..Default::default()
                };
                match store.put(&key, status.encode_to_vec(), Some(lease)).await {
                    Ok(_) => Some(lease),
                    Err(e) => {
                        tracing::warn!(proxy = %proxy.proxy_id, error = %e, "recording a proxy failed");
                        let _ = store.revoke_lease(lease).await;
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(proxy = %proxy.proxy_id, error = %e, "recording a proxy failed");
                None
            }
        },
        _ => None,
    };
    let mut keep_alive = tokio::time::interval(PRESENCE_TTL / 3);
    keep_alive.tick().await;
    loop {
        let request = tokio::select! {
            r = requests.next() => match r {
                Some(Ok(request)) => request,
                _ => break,
            },
            _ = keep_alive.tick(), if own_lease.is_some() => {
                if let Some(lease) = own_lease
                    && let Err(e) = store.keep_alive(lease).await
                {
                    tracing::debug!(proxy = %proxy.proxy_id, error = %e, "keeping a proxy record alive failed");
                }
                continue;
            }
        };
        let (acked, nacked) = match request.kind {
            Some(config_request::Kind::Ack(a)) => (Some(a.version), None),
            Some(config_request::Kind::Nack(n)) => {
                tracing::warn!(proxy = %proxy.proxy_id, version = n.version, reason = %n.reason, "proxy refused config");
                (None, Some((n.version, n.reason)))
            }
            Some(config_request::Kind::Subscribe(subscribe)) => {
                resubscribe(subscribe);
                continue;
            }
            None => continue,
        };
        let Ok(Some(kv)) = store.get(&key).await else {
            tracing::debug!(proxy = %proxy.proxy_id, "ack from a proxy with no record");
            continue;
        };
        let mut status = ProxyStatus::decode(kv.value.as_slice()).unwrap_or_default();
        if let Some(v) = acked {
            status.acked_version = v;
        }
        if let Some((v, reason)) = nacked {
            status.nacked_version = v;
            status.nack_reason = reason;
        }
        status.last_seen = now_unix();
        if let Err(e) = store.put(&key, status.encode_to_vec(), kv.lease).await {
            tracing::warn!(proxy = %proxy.proxy_id, error = %e, "recording a config ack failed");
        }
    }
    if let Some(lease) = own_lease {
        let _ = store.revoke_lease(lease).await;
    }
}

/// `ferrule.v1.Config`.
pub struct ConfigService {
    hub: ConfigHub,
    /// Ends every stream when the controller stops, so proxies reconnect to another replica.
    shutdown: CancellationToken,
}

impl ConfigService {
    pub fn new(hub: ConfigHub, shutdown: CancellationToken) -> Self {
        Self { hub, shutdown }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<ConfigSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl ferrule_proto::v1::config_server::Config for ConfigService {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        request: tonic::Request<Streaming<ConfigRequest>>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let stream = self.hub.serve(request.into_inner()).await?;
        let stream = stream.take_until(self.shutdown.clone().cancelled_owned());
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "
apiVersion: ferrule.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  routes: [{name: users, pathPrefix: /users, service: 'user:http', public: true}]
---
apiVersion: ferrule.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  routes: [{name: orders, pathPrefix: /orders, service: order, public: true}]
---
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata: {name: user}
spec: {service: user}
---
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata: {name: user}
spec:
  service: user
  rules: [{backends: [{service: user-v2}]}]
---
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata: {name: user-v2}
spec: {service: user-v2}
---
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata: {name: order}
spec: {service: order}
---
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata: {name: order, namespace: shop}
spec: {service: order}
";

    const AUTHZ: &str = "
---
apiVersion: ferrule.io/v1
kind: AuthorizationPolicy
metadata: {name: order-callers, namespace: shop}
spec: {service: order, from: {namespaces: [shop]}}
---
apiVersion: ferrule.io/v1
kind: AuthorizationPolicy
metadata: {name: default, namespace: shop}
spec: {default: authenticated-only}
";

    fn state() -> ConfigState {
        state_of(CONFIG)
    }

    fn state_of(config: &str) -> ConfigState {
        let resources = Resource::parse_documents(config)
            .unwrap()
            .into_iter()
            .map(|resource| {
                let key = keys::config(&resource);
                (
                    key,
                    Stored {
                        resource,
                        revision: 1,
                    },
                )
            })
            .collect();
        ConfigState {
            synced: true,
            version: 1,
            resources,
            ..ConfigState::default()
        }
    }

    #[test]
    fn an_unreadable_value_takes_the_place_of_its_resource_until_fixed() {
        let key = "/ferrule/config/ServicePolicy/default/user";
        let mut state = ConfigState::default();
        state.put(key, br#"{"service": "user"}"#, 1);
        assert!(state.resources.contains_key(key) && state.unreadable.is_empty());
        state.put(key, b"{service: user", 2);
        assert!(!state.resources.contains_key(key));
        assert_eq!(state.unreadable[key].revision, 2);
        assert!(!state.unreadable[key].reason.is_empty());
        state.put("/ferrule/config/stray", b"{}", 3);
        assert!(
            state.unreadable["/ferrule/config/stray"]
                .reason
                .contains("not a config key")
        );
        state.put(key, br#"{"service": "user"}"#, 4);
        state.delete("/ferrule/config/stray");
        assert!(state.resources.contains_key(key) && state.unreadable.is_empty());
    }

    /// `Kind/namespace/name` of what `proxy` (subscribing with `upstreams`) receives.
    fn selected(service: &str, namespace: &str, mode: &str, upstreams: &[&str]) -> Vec<String> {
        selected_in(&state(), service, namespace, mode, upstreams)
    }

    fn selected_in(
        state: &ConfigState,
        service: &str,
        namespace: &str,
        mode: &str,
        upstreams: &[&str],
    ) -> Vec<String> {
        let proxy = ProxyInfo {
            proxy_id: "p".into(),
            service: service.into(),
            namespace: namespace.into(),
            mode: mode.into(),
            ..Default::default()
        };
        let upstreams = upstreams.iter().map(|s| s.to_string()).collect();
        select(state, &Subscriber::new(&proxy, upstreams))
            .into_iter()
            .map(|r| format!("{}/{}/{}", r.kind, r.namespace, r.name))
            .collect()
    }

    #[test]
    fn a_gateway_receives_the_gateway_named_as_its_service_and_what_its_routes_call() {
        assert_eq!(
            selected("edge", "", "gateway", &[]),
            [
                "Gateway/default/edge",
                "HTTPRoute/default/user",
                "ServicePolicy/default/user",
                "ServicePolicy/default/user-v2",
            ]
        );
        // The shop's gateway routes to `order` in its own namespace.
        assert_eq!(
            selected("edge", "shop", "gateway", &[]),
            ["Gateway/shop/edge", "ServicePolicy/shop/order"]
        );
    }

    #[test]
    fn names_are_relative_to_the_proxys_namespace() {
        assert_eq!(
            selected("web", "shop", "sidecar", &["order"]),
            ["ServicePolicy/shop/order"]
        );
        assert_eq!(
            selected("web", "shop", "sidecar", &["order.default"]),
            ["ServicePolicy/default/order"]
        );
        // Its own service too: `order` in shop is not `order` in default.
        assert_eq!(
            selected("order", "shop", "sidecar", &[]),
            ["ServicePolicy/shop/order"]
        );
        assert!(selected("web", "shop", "sidecar", &["user"]).is_empty());
    }

    #[test]
    fn authorization_policies_go_to_their_own_service_and_namespace_only() {
        let state = state_of(&format!("{CONFIG}{AUTHZ}"));
        let selected = |service, namespace, mode, upstreams: &[&str]| {
            selected_in(&state, service, namespace, mode, upstreams)
        };
        assert_eq!(
            selected("order", "shop", "sidecar", &[]),
            [
                "AuthorizationPolicy/shop/default",
                "AuthorizationPolicy/shop/order-callers",
                "ServicePolicy/shop/order",
            ]
        );
        // A caller of order gets order's ServicePolicy, not its AuthorizationPolicy.
        assert_eq!(
            selected("web", "shop", "sidecar", &["order"]),
            [
                "AuthorizationPolicy/shop/default",
                "ServicePolicy/shop/order"
            ]
        );
        assert_eq!(
            selected("web", "", "sidecar", &["order.shop"]),
            ["ServicePolicy/shop/order"]
        );
        // A proxy without a service guards nothing.
        assert_eq!(
            selected("", "shop", "sidecar", &["order"]),
            ["ServicePolicy/shop/order"]
        );
    }

    #[test]
    fn no_other_proxy_receives_a_gateway() {
        assert!(selected("other", "", "gateway", &[]).is_empty());
        assert!(selected("", "", "gateway", &[]).is_empty());
        // A sidecar whose service shares the gateway's name gets that service's config only.
        assert!(selected("edge", "", "sidecar", &[]).is_empty());
        assert_eq!(
            selected("web", "", "sidecar", &["order"]),
            ["ServicePolicy/default/order"]
        );
    }
}
