//! `ferrule.v1.Discovery/Lookup`'s index: which service each registered endpoint address
//! belongs to.
//!
//! A proxy in transparent mode sees connections to an IP:port, not to a service name. When it
//! does not know the address from its own discovery watches it asks here. One task lists the
//! whole registry, then follows a store watch on it, keeping a map from address to the
//! endpoint's service and port name; a lookup is one map read. While the store is unreachable
//! the last known index keeps answering; until the first listing succeeds, lookups fail with
//! UNAVAILABLE so the proxy does not cache "unknown" for an address that is in fact meshed.
//!
//! A service's virtual IP (what cluster DNS answers for its name, a Kubernetes ClusterIP) is
//! declared by its endpoints: an endpoint labelled [`SERVICE_IP_LABEL`]`=IP` makes `IP:port`
//! (the endpoint's port) an address of its service too, for as long as one such endpoint is
//! registered. Sidecars pass it with `--label`, `ferrule register` with `--label`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use ferrule_proto::names::namespace_or_default;
use ferrule_proto::v1::{Endpoint, LookupResponse};
use ferrule_store::{Store, WatchEvent};
use futures::StreamExt;

use crate::keys;
use crate::metrics::{Area, Metrics};
use crate::registry::read_stored_endpoint;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The endpoint label declaring its service's virtual IP.
pub const SERVICE_IP_LABEL: &str = "ferrule.io/service-ip";

#[derive(Default)]
struct Index {
    synced: bool,
    /// Store key → the endpoint's address and the service address it declared, to undo a
    /// deletion.
    by_key: HashMap<String, (SocketAddr, Option<SocketAddr>)>,
    /// Address → (the endpoint's namespace, service and port name; store key).
    by_addr: HashMap<SocketAddr, (LookupResponse, String)>,
    /// Keys whose value is not a readable endpoint (the `unreadable_keys{area="registry"}`
    /// metric).
    unreadable: HashSet<String>,
    /// Service address → (its service and port name; the keys of the endpoints declaring it).
    by_service_ip: HashMap<SocketAddr, (LookupResponse, BTreeSet<String>)>,
}

impl Index {
    fn put(&mut self, key: &str, value: &[u8]) {
        let ep = match read_stored_endpoint(value) {
            Ok(ep) => ep,
            Err(reason) => {
                if !self.unreadable.contains(key) {
                    tracing::warn!(%key, %reason, "skipping a stored registration that cannot be read");
                }
                self.delete(key);
                self.unreadable.insert(key.to_string());
                return;
            }
        };
        self.unreadable.remove(key);
        let Some(addr) = socket_addr(&ep) else {
            return;
        };
        self.delete(key);
        let service_ip = ep.labels.get(SERVICE_IP_LABEL).and_then(|ip| match ip.parse() {
            Ok(ip) => Some(SocketAddr::new(ip, addr.port())),
            Err(_) => {
                tracing::warn!(%key, %ip, "address index: the {SERVICE_IP_LABEL} label is not an IP address; ignoring it");
                None
            }
        });
        self.by_key.insert(key.to_string(), (addr, service_ip));
        let answer = LookupResponse {
            found: true,
            namespace: namespace_or_default(&ep.namespace).to_string(),
            service: ep.service,
            port_name: ep.port_name,
        };
        if let Some(service_ip) = service_ip {
            let (declared, keys) = self
                .by_service_ip
                .entry(service_ip)
                .or_insert_with(|| (answer.clone(), BTreeSet::new()));
            if *declared == answer {
                keys.insert(key.to_string());
            } else {
                tracing::warn!(%key, %service_ip, "address index: the service address is already {}'s; ignoring the label", declared.service);
            }
        }
        self.by_addr.insert(addr, (answer, key.to_string()));
    }

    fn delete(&mut self, key: &str) {
        self.unreadable.remove(key);
        if let Some((addr, service_ip)) = self.by_key.remove(key) {
            // Another registration may have taken the address since; leave that one alone.
            if self.by_addr.get(&addr).is_some_and(|(_, k)| k == key) {
                self.by_addr.remove(&addr);
            }
            if let Some(service_ip) = service_ip
                && let Some((_, keys)) = self.by_service_ip.get_mut(&service_ip)
            {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_service_ip.remove(&service_ip);
                }
            }
        }
    }

    fn get(&self, addr: &SocketAddr) -> Option<&LookupResponse> {
        self.by_addr
            .get(addr)
            .map(|(answer, _)| answer)
            .or_else(|| self.by_service_ip.get(addr).map(|(answer, _)| answer))
    }
}

fn socket_addr(ep: &Endpoint) -> Option<SocketAddr> {
    let ip: IpAddr = ep.address.parse().ok()?;
    Some(SocketAddr::new(ip, u16::try_from(ep.port).ok()?))
}

/// Address → service of every registered endpoint. Cheap to clone.
#[derive(Clone, Default)]
pub struct AddressIndex {
    index: Arc<RwLock<Index>>,
}

impl AddressIndex {
    /// Starts following the registry; the task lives as long as the controller.
    pub fn spawn(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        let this = Self::default();
        tokio::spawn(follow(store, metrics, this.index.clone()));
        this
    }

    /// The service registered at `addr`; `None` before the first listing succeeded.
    pub fn lookup(&self, addr: SocketAddr) -> Option<LookupResponse> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        if !index.synced {
            return None;
        }
        Some(index.get(&addr).cloned().unwrap_or_default())
    }
}

fn set_unreadable_gauge(metrics: &Metrics, index: &Index) {
    metrics
        .unreadable_keys(Area::Registry)
        .set(i64::try_from(index.unreadable.len()).unwrap_or(i64::MAX));
}

async fn follow(store: Arc<dyn Store>, metrics: Arc<Metrics>, index: Arc<RwLock<Index>>) {
    let write = || index.write().unwrap_or_else(PoisonError::into_inner);
    let mut backoff = RETRY_MIN;
    loop {
        let listing = match store.list(keys::REGISTRY, None).await {
            Ok(listing) => listing,
            Err(error) => {
                tracing::warn!(%error, "listing the registry for the address index failed; keeping the last index");
                metrics.store_errors.inc();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        backoff = RETRY_MIN;
        {
            let mut fresh = Index {
                synced: true,
                ..Index::default()
            };
            for kv in &listing.kvs {
                fresh.put(&kv.key, &kv.value);
            }
            set_unreadable_gauge(&metrics, &fresh);
            *write() = fresh;
        }
        let mut events = match store.watch(keys::REGISTRY, listing.revision).await {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(%error, "watching the registry for the address index failed; retrying");
                metrics.store_errors.inc();
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        // A compaction or an error ends the watch: start again from a fresh listing.
        while let Some(Ok(event)) = events.next().await {
            let mut index = write();
            match event {
                WatchEvent::Put(kv) => index.put(&kv.key, &kv.value),
                WatchEvent::Delete { key, .. } => index.delete(&key),
            }
            set_unreadable_gauge(&metrics, &index);
        }
        tracing::info!("address index: registry watch restarts from a fresh listing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_store::MemoryStore;
    use prost::Message;

    fn endpoint(service: &str, port_name: &str, address: &str, port: u32) -> Endpoint {
        Endpoint {
            service: service.into(),
            port_name: port_name.into(),
            address: address.into(),
            port,
            ..Default::default()
        }
    }

    async fn wait_for(index: &AddressIndex, addr: &str, found: bool) -> LookupResponse {
        let addr = addr.parse().unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match index.lookup(addr) {
                    Some(answer) if answer.found == found => return answer,
                    // The index offers no change event; poll it, bounded by the timeout.
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
        .await
        .expect("the index did not reach the expected answer within 10 s")
    }

    #[tokio::test]
    async fn follows_registrations_and_removals() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let user = endpoint("user", "", "10.0.0.1", 8080);
        store
            .put(&keys::endpoint(&user), user.encode_to_vec(), None)
            .await
            .unwrap();
        let index = AddressIndex::spawn(store.clone(), Arc::default());

        let answer = wait_for(&index, "10.0.0.1:8080", true).await;
        assert_eq!(
            (answer.service.as_str(), answer.port_name.as_str()),
            ("user", "")
        );
        assert!(
            !index
                .lookup("10.0.0.1:8081".parse().unwrap())
                .unwrap()
                .found
        );

        let grpc = endpoint("payment", "grpc", "10.0.0.2", 9000);
        store
            .put(&keys::endpoint(&grpc), grpc.encode_to_vec(), None)
            .await
            .unwrap();
        let answer = wait_for(&index, "10.0.0.2:9000", true).await;
        assert_eq!(
            (answer.service.as_str(), answer.port_name.as_str()),
            ("payment", "grpc")
        );
        assert_eq!(answer.namespace, "default");

        store.delete(&keys::endpoint(&user)).await.unwrap();
        wait_for(&index, "10.0.0.1:8080", false).await;
    }

    /// A service address is known while at least one endpoint declares it.
    #[tokio::test]
    async fn endpoints_declare_their_service_address() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let index = AddressIndex::spawn(store.clone(), Arc::default());
        let mut eps = Vec::new();
        for address in ["10.0.0.1", "10.0.0.2"] {
            let mut ep = endpoint("user", "http", address, 8001);
            ep.labels
                .insert(SERVICE_IP_LABEL.into(), "10.96.0.10".into());
            store
                .put(&keys::endpoint(&ep), ep.encode_to_vec(), None)
                .await
                .unwrap();
            eps.push(ep);
        }
        let answer = wait_for(&index, "10.96.0.10:8001", true).await;
        assert_eq!(
            (answer.service.as_str(), answer.port_name.as_str()),
            ("user", "http")
        );
        assert!(
            !index
                .lookup("10.96.0.10:8002".parse().unwrap())
                .unwrap()
                .found
        );
        store.delete(&keys::endpoint(&eps[0])).await.unwrap();
        wait_for(&index, "10.0.0.1:8001", false).await;
        assert!(
            index
                .lookup("10.96.0.10:8001".parse().unwrap())
                .unwrap()
                .found
        );
        store.delete(&keys::endpoint(&eps[1])).await.unwrap();
        wait_for(&index, "10.96.0.10:8001", false).await;
    }
}
