//! The embedded store: an in-process MVCC map with etcd's semantics, for the zero-setup dev
//! mesh and for tests that do not need etcd.
//!
//! Every write appends to a history log, which serves watches from a past revision and listings
//! at a past revision. The history is bounded ([`MAX_HISTORY`] events); asking for a revision
//! older than what is kept fails with [`StoreError::Compacted`], as etcd does after compaction.
//! Leases expire in a background task that sleeps until the earliest deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{
    KeyValue, LeaseId, Listing, Op, Result, Revision, Store, StoreError, WatchEvent, WatchStream,
};

/// Events kept for watches and listings at past revisions.
pub const MAX_HISTORY: usize = 100_000;

/// In-process store. Cheap to share behind an `Arc`; must be created inside a tokio runtime.
pub struct MemoryStore {
    inner: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the lease reaper when the earliest deadline may have moved.
    leases_changed: Notify,
}

#[derive(Default)]
struct State {
    revision: Revision,
    data: BTreeMap<String, KeyValue>,
    history: VecDeque<WatchEvent>,
    /// The data as of `compacted`: history replays on top of it for listings in the past.
    base: BTreeMap<String, KeyValue>,
    /// Oldest revision still answerable: every event after it is in `history`.
    compacted: Revision,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let inner = Arc::new(Shared {
            state: Mutex::new(State {
                next_lease: 1,
                ..State::default()
            }),
            leases_changed: Notify::new(),
        });
        tokio::spawn(reap_leases(Arc::downgrade(&inner)));
        Self { inner }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("memory store lock poisoned")
    }
}

impl State {
    /// Applies ops at one new revision and notifies watchers.
    fn apply(&mut self, ops: Vec<(Op, Option<LeaseId>)>) -> Revision {
        let revision = self.revision + 1;
        let mut events = Vec::with_capacity(ops.len());
        for (op, lease) in ops {
            match op {
                Op::Put { key, value } => {
                    let previous = self.data.get(&key);
                    let create_revision = previous.map_or(revision, |kv| kv.create_revision);
                    let old_lease = previous
                        .and_then(|kv| kv.lease)
                        .filter(|old| Some(*old) != lease);
                    if let Some(l) = old_lease.and_then(|old| self.leases.get_mut(&old)) {
                        l.keys.remove(&key);
                    }
                    if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
                        l.keys.insert(key.clone());
                    }
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                        lease,
                    };
                    self.data.insert(key, kv.clone());
                    events.push(WatchEvent::Put(kv));
                }
                Op::Delete { key } => {
                    if let Some(kv) = self.data.remove(&key) {
                        if let Some(l) = kv.lease.and_then(|id| self.leases.get_mut(&id)) {
                            l.keys.remove(&key);
                        }
                        events.push(WatchEvent::Delete { key, revision });
                    }
                }
            }
        }
        self.revision = revision;
        for event in events {
            self.watchers.retain(|w| {
                !event.key().starts_with(&w.prefix) || w.tx.send(Ok(event.clone())).is_ok()
            });
            self.history.push_back(event);
        }
        while self.history.len() > MAX_HISTORY {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.compacted = old.revision();
            match old {
                WatchEvent::Put(kv) => {
                    self.base.insert(kv.key.clone(), kv);
                }
                WatchEvent::Delete { key, .. } => {
                    self.base.remove(&key);
                }
            }
        }
        revision
    }

    fn check_revision(&self, at: Revision) -> Result<()> {
        if at > self.revision {
            return Err(StoreError::FutureRevision(at));
        }
        if at < self.compacted {
            return Err(StoreError::Compacted {
                requested: at,
                oldest: self.compacted,
            });
        }
        Ok(())
    }

    /// The keys under `prefix` as they were at `at`: the state at the compaction point,
    /// replayed forward through the kept history.
    fn list_at(&self, prefix: &str, at: Revision) -> Result<Vec<KeyValue>> {
        self.check_revision(at)?;
        let mut view: BTreeMap<&str, &KeyValue> = self
            .base
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        for event in self
            .history
            .iter()
            .take_while(|e| e.revision() <= at)
            .filter(|e| e.key().starts_with(prefix))
        {
            match event {
                WatchEvent::Put(kv) => view.insert(&kv.key, kv),
                WatchEvent::Delete { key, .. } => view.remove(key.as_str()),
            };
        }
        Ok(view.into_values().cloned().collect())
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.state().data.get(key).cloned())
    }

    async fn list(&self, prefix: &str, at: Option<Revision>) -> Result<Listing> {
        let state = self.state();
        let revision = state.revision;
        let kvs = match at {
            Some(at) if at < revision => state.list_at(prefix, at)?,
            Some(at) if at > revision => return Err(StoreError::FutureRevision(at)),
            _ => state
                .data
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.clone())
                .collect(),
        };
        Ok(Listing {
            kvs,
            revision: at.unwrap_or(revision),
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let mut state = self.state();
        if let Some(id) = lease.filter(|id| !state.leases.contains_key(id)) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let op = Op::Put {
            key: key.to_string(),
            value,
        };
        Ok(state.apply(vec![(op, lease)]))
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let mut state = self.state();
        if !state.data.contains_key(key) {
            return Ok(None);
        }
        let op = Op::Delete {
            key: key.to_string(),
        };
        Ok(Some(state.apply(vec![(op, None)])))
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        let mut state = self.state();
        Ok(state.apply(ops.into_iter().map(|op| (op, None)).collect()))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.state();
        if after < state.revision {
            state.check_revision(after)?;
        }
        // Replay and register under one lock, so no event falls between the two.
        for event in state
            .history
            .iter()
            .filter(|e| e.revision() > after && e.key().starts_with(prefix))
        {
            let _ = tx.send(Ok(event.clone()));
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        drop(state);
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut state = self.state();
        let id = state.next_lease;
        state.next_lease += 1;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        drop(state);
        self.inner.leases_changed.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut state = self.state();
        let l = state
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.state();
        let l = state
            .leases
            .remove(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        drop_lease_keys(&mut state, l);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_string()
    }
}

fn drop_lease_keys(state: &mut State, lease: Lease) {
    if lease.keys.is_empty() {
        return;
    }
    let ops = lease
        .keys
        .into_iter()
        .map(|key| (Op::Delete { key }, None))
        .collect();
    state.apply(ops);
}

/// Expires leases at their deadlines. Ends when the store is dropped.
async fn reap_leases(shared: Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let next = {
            let mut state = shared.state.lock().expect("memory store lock poisoned");
            let now = Instant::now();
            let expired: Vec<LeaseId> = state
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                if let Some(lease) = state.leases.remove(&id) {
                    tracing::debug!(lease = id, keys = lease.keys.len(), "lease expired");
                    drop_lease_keys(&mut state, lease);
                }
            }
            state.leases.values().map(|l| l.deadline).min()
        };
        // Sleep until the next deadline or a lease change, at most a second, so that a dropped
        // store ends this task soon after (only a weak reference is kept between rounds).
        let cap = Instant::now() + Duration::from_secs(1);
        let wait = next.map_or(cap, |n| n.min(cap));
        tokio::select! {
            _ = tokio::time::sleep_until(wait) => {}
            _ = shared.leases_changed.notified() => {}
        }
    }
}
