//! The store layer: where all of the controller's state lives.
//!
//! One trait, [`Store`], with two implementations that pass the same conformance suite
//! (`tests/conformance.rs`): [`EtcdStore`] for production (leases for registrations, watches for
//! streams, revisions as config versions) and [`MemoryStore`], an embedded MVCC map for the
//! zero-setup dev mesh. The controller is stateless because everything it knows comes from here.
//!
//! The model is etcd's: every write bumps a store-wide revision; a watch from revision `R`
//! delivers every change after `R` in order, exactly once, even across reconnects to the
//! backing store; a lease owns keys and deletes them when it expires.

mod etcd;
mod memory;
mod url;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

pub use etcd::EtcdStore;
pub use memory::MemoryStore;
pub use url::{StoreUrl, StoreUrlError, connect};

/// A store-wide, monotonically increasing version number. Every write gets a new one.
pub type Revision = i64;

/// Handle on a lease: keys put with it are deleted when it expires or is revoked.
pub type LeaseId = i64;

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was created (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last change to the key.
    pub mod_revision: Revision,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// The key was deleted (explicitly or by lease expiry) at `revision`.
    Delete {
        key: String,
        revision: Revision,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// A list of keys as of one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    /// The revision the listing reflects: watch from here to see every later change.
    pub revision: Revision,
}

/// One write inside an atomic [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// A stream of changes. It ends only with an error the watcher cannot recover from (such as
/// [`StoreError::Compacted`]); outages of the backing store are bridged inside it.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} has been compacted (oldest kept: {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("revision {0} is in the future")]
    FutureRevision(Revision),
    #[error("store error: {0}")]
    Other(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The controller's view of its state store.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key at the current revision.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Lists every key under `prefix`, at the current revision or at an earlier one (for
    /// config history). Keys come sorted.
    async fn list(&self, prefix: &str, at: Option<Revision>) -> Result<Listing>;

    /// Writes a key, optionally attached to a lease. Returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision>;

    /// Deletes a key. Returns the new revision, or `None` when the key did not exist.
    async fn delete(&self, key: &str) -> Result<Option<Revision>>;

    /// Applies every op or none, at one new revision, which it returns.
    async fn commit(&self, ops: Vec<Op>) -> Result<Revision>;

    /// Watches every key under `prefix`, delivering each change with a revision greater than
    /// `after` in revision order.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// Grants a lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Refreshes a lease; returns its TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Revokes a lease, deleting its keys at once.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// A short description for logs and `/config` ("etcd://127.0.0.1:2379", "memory").
    fn describe(&self) -> String;
}
