//! `ferrule.v1.Discovery`: one store watch per service, fanned out to every subscriber.
//!
//! The [`Hub`] keeps, per watched service, a task that lists the service's endpoints, then
//! follows a store watch from that listing's revision, and publishes the resulting state into
//! a `tokio::sync::watch` channel. Each subscriber sends a snapshot of the first synced state,
//! then diffs every later state against what it last sent and sends the delta. A slow
//! subscriber therefore never blocks others and never misses a change: it receives one larger
//! delta. When the store is unreachable the task keeps its last state, so subscribers keep
//! their endpoints, and the store watch resumes from the last revision it saw. The task ends
//! when its last subscriber leaves.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrule_proto::names::{ServiceRef, qualified, validate_namespace, validate_service};
use ferrule_proto::v1::{
    Delta, DiscoveryUpdate, Endpoint, LookupRequest, LookupResponse, Snapshot, WatchRequest,
    discovery_server::Discovery, discovery_update::Kind,
};
use ferrule_store::{Revision, Store, StoreError, WatchEvent};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::addresses::AddressIndex;
use crate::keys;
use crate::metrics::Metrics;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The endpoints of one service as of one store revision.
#[derive(Debug, Default, Clone)]
pub struct ServiceState {
    /// False until the first listing succeeded.
    pub synced: bool,
    pub revision: Revision,
    /// Keyed by `endpoint_key`.
    pub endpoints: BTreeMap<String, Endpoint>,
}

type StateRx = watch::Receiver<Arc<ServiceState>>;

/// Shares one store watch per service among all subscribers.
#[derive(Clone)]
pub struct Hub {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    services: Arc<Mutex<HashMap<String, watch::Sender<Arc<ServiceState>>>>>,
}

impl Hub {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            services: Arc::default(),
        }
    }

    /// The state of `service`, starting its store watch if nobody watches it yet.
    pub fn subscribe(&self, service: &str) -> StateRx {
        let mut services = self.services.lock().expect("hub lock poisoned");
        if let Some(tx) = services.get(service) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Arc::new(ServiceState::default()));
        services.insert(service.to_string(), tx.clone());
        self.metrics.service_watches.inc();
        tokio::spawn(follow_service(self.clone(), service.to_string(), tx));
        rx
    }

    /// Forgets `service` if nobody subscribes any more. Checked under the hub lock so a
    /// concurrent `subscribe` either sees the old channel (and keeps the task) or a new one.
    fn release(&self, service: &str, tx: &watch::Sender<Arc<ServiceState>>) -> bool {
        let mut services = self.services.lock().expect("hub lock poisoned");
        if tx.receiver_count() > 0 {
            return false;
        }
        if services.get(service).is_some_and(|t| t.same_channel(tx)) {
            services.remove(service);
        }
        self.metrics.service_watches.dec();
        true
    }
}

/// Lists, then follows the store watch for one service (by qualified name), until no
/// subscriber is left.
async fn follow_service(hub: Hub, service: String, tx: watch::Sender<Arc<ServiceState>>) {
    let prefix = match ServiceRef::parse(&service) {
        Ok(s) => keys::service_prefix(&s.namespace, &s.service),
        // Subscribers only ever pass names they parsed.
        Err(_) => return,
    };
    let mut backoff = RETRY_MIN;
    loop {
        // (Re)build the state from a listing: at start, and after a compaction made the
        // watch's start revision unavailable.
        let listing = loop {
            match hub.store.list(&prefix, None).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(%service, error = %e, "listing endpoints failed; keeping last known state");
                    hub.metrics.store_errors.inc();
                    tokio::select! {
                        _ = tx.closed() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
            if tx.is_closed() && hub.release(&service, &tx) {
                return;
            }
        };
        backoff = RETRY_MIN;
        let mut state = ServiceState {
            synced: true,
            revision: listing.revision,
            endpoints: listing
                .kvs
                .iter()
                .filter_map(|kv| decode(&kv.key, &kv.value))
                .collect(),
        };
        tx.send_replace(Arc::new(state.clone()));

        let mut events = match hub.store.watch(&prefix, state.revision).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(%service, error = %e, "watching endpoints failed; retrying");
                hub.metrics.store_errors.inc();
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        loop {
            let event = tokio::select! {
                _ = tx.closed() => {
                    if hub.release(&service, &tx) {
                        return;
                    }
                    continue;
                }
                e = events.next() => e,
            };
            match event {
                Some(Ok(event)) => {
                    apply(&mut state, event);
                    tx.send_replace(Arc::new(state.clone()));
                }
                Some(Err(StoreError::Compacted { .. })) | None => {
                    tracing::info!(%service, "endpoint watch restarted from a fresh listing");
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(%service, error = %e, "endpoint watch error");
                    hub.metrics.store_errors.inc();
                    break;
                }
            }
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Option<(String, Endpoint)> {
    let ep_key = keys::split_endpoint(key)?.key;
    match Endpoint::decode(value) {
        Ok(ep) => Some((ep_key.to_string(), ep)),
        Err(e) => {
            tracing::warn!(%key, error = %e, "skipping an undecodable registration");
            None
        }
    }
}

fn apply(state: &mut ServiceState, event: WatchEvent) {
    state.revision = event.revision();
    match event {
        WatchEvent::Put(kv) => {
            if let Some((k, ep)) = decode(&kv.key, &kv.value) {
                state.endpoints.insert(k, ep);
            }
        }
        WatchEvent::Delete { key, .. } => {
            if let Some(k) = keys::split_endpoint(&key) {
                state.endpoints.remove(k.key);
            }
        }
    }
}

/// What changed from `old` to `new`: added or changed endpoints, and removed keys.
pub fn diff(old: &ServiceState, new: &ServiceState) -> Delta {
    let added = new
        .endpoints
        .iter()
        .filter(|(k, ep)| old.endpoints.get(*k) != Some(ep))
        .map(|(_, ep)| ep.clone())
        .collect();
    let removed = old
        .endpoints
        .keys()
        .filter(|k| !new.endpoints.contains_key(*k))
        .cloned()
        .collect();
    Delta { added, removed }
}

pub struct DiscoveryService {
    hub: Hub,
    addresses: AddressIndex,
    /// Ends every stream when the controller stops, so proxies reconnect to another replica.
    shutdown: CancellationToken,
}

impl DiscoveryService {
    pub fn new(hub: Hub, addresses: AddressIndex, shutdown: CancellationToken) -> Self {
        Self {
            hub,
            addresses,
            shutdown,
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<DiscoveryUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        validate_service(&req.service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        if !req.namespace.is_empty() {
            validate_namespace(&req.namespace)
                .map_err(|e| Status::invalid_argument(format!("namespace: {e}")))?;
        }
        let proxy = req.proxy.map(|p| p.proxy_id).unwrap_or_default();
        tracing::debug!(service = %req.service, namespace = %req.namespace, %proxy, "discovery watch");
        let rx = self.hub.subscribe(&qualified(&req.namespace, &req.service));
        let (tx, out) = mpsc::channel(16);
        let metrics = self.hub.metrics.clone();
        tokio::spawn(async move {
            metrics.discovery_streams.inc();
            stream_updates(req.service, rx, tx).await;
            metrics.discovery_streams.dec();
        });
        let out = ReceiverStream::new(out).take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(out)))
    }

    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let req = request.into_inner();
        let ip: IpAddr = req.address.parse().map_err(|_| {
            Status::invalid_argument(format!("address: {:?} is not an IP address", req.address))
        })?;
        let port = u16::try_from(req.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port: {} is not a TCP port", req.port))
            })?;
        let answer = self
            .addresses
            .lookup(SocketAddr::new(ip, port))
            .ok_or_else(|| {
                Status::unavailable("the address index is not synced with the store yet")
            })?;
        Ok(Response::new(answer))
    }
}

/// Sends a snapshot once the service state is synced, then a delta per change, until the
/// client goes away.
async fn stream_updates(
    service: String,
    mut rx: StateRx,
    tx: mpsc::Sender<Result<DiscoveryUpdate, Status>>,
) {
    let mut sent: Option<Arc<ServiceState>> = None;
    loop {
        let current = rx.borrow_and_update().clone();
        if current.synced {
            let kind = match &sent {
                None => Some(Kind::Snapshot(Snapshot {
                    endpoints: current.endpoints.values().cloned().collect(),
                })),
                Some(prev) => {
                    let delta = diff(prev, &current);
                    (!delta.added.is_empty() || !delta.removed.is_empty())
                        .then_some(Kind::Delta(delta))
                }
            };
            if let Some(kind) = kind {
                let update = DiscoveryUpdate {
                    service: service.clone(),
                    version: current.revision,
                    kind: Some(kind),
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
            sent = Some(current);
        }
        tokio::select! {
            _ = tx.closed() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_proto::names::endpoint_key;

    fn ep(port: u32) -> Endpoint {
        Endpoint {
            service: "user".into(),
            address: "127.0.0.1".into(),
            port,
            ..Default::default()
        }
    }

    fn state(eps: &[Endpoint]) -> ServiceState {
        ServiceState {
            synced: true,
            revision: 1,
            endpoints: eps.iter().map(|e| (endpoint_key(e), e.clone())).collect(),
        }
    }

    #[test]
    fn diff_reports_adds_changes_and_removes() {
        let mut changed = ep(2);
        changed.zone = "z1".into();
        let old = state(&[ep(1), ep(2)]);
        let new = state(&[changed.clone(), ep(3)]);
        let d = diff(&old, &new);
        assert_eq!(d.added, vec![changed, ep(3)]);
        assert_eq!(d.removed, vec!["/127.0.0.1:1".to_string()]);
        assert_eq!(diff(&new, &new), Delta::default());
    }
}
