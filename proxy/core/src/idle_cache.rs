//! A cache of per-target state that forgets targets nobody has used for a while.
//!
//! A proxy in front of a busy cluster meets thousands of targets over its life; its memory must
//! follow the working set (linkerd's `idle-cache`). Each value lives in an `Arc`: a caller that
//! holds one (a connection for the service, a request in flight) keeps the entry in use, and it
//! is never evicted while held. Once the last holder is gone and nobody has asked for the key
//! for `idle`, [`IdleCache::evict_idle`] drops the cache's reference, and with it whatever the
//! value owns: its stacks, discovery subscriptions, metric series and connections.
//!
//! Eviction runs when the owner calls [`IdleCache::evict_idle`] (the outbound side does so on
//! a timer, see its `reaper`), so one task can evict several caches in an order that respects
//! their dependencies.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

pub struct IdleCache<K, V> {
    idle: Duration,
    entries: Mutex<HashMap<K, Entry<V>>>,
}

struct Entry<V> {
    value: Arc<V>,
    last_used: Instant,
}

impl<K: Eq + Hash + Clone, V> IdleCache<K, V> {
    /// Entries unused for `idle` are evicted.
    pub fn new(idle: Duration) -> Self {
        Self {
            idle,
            entries: Mutex::default(),
        }
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// The value of `key`, made with `make` when absent. Marks the entry used.
    ///
    /// `make` runs under the cache's lock, so two callers never build the same target twice;
    /// it must not use this cache.
    pub fn get_or_insert_with(&self, key: &K, make: impl FnOnce() -> V) -> Arc<V> {
        let now = Instant::now();
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(key) {
            entry.last_used = now;
            return entry.value.clone();
        }
        let value = Arc::new(make());
        entries.insert(
            key.clone(),
            Entry {
                value: value.clone(),
                last_used: now,
            },
        );
        value
    }

    /// The value of `key` if cached, without marking it used.
    pub fn peek(&self, key: &K) -> Option<Arc<V>> {
        self.lock().get(key).map(|e| e.value.clone())
    }

    /// Drops every entry nobody holds that has not been used for the idle time; an entry
    /// still held counts as used now. Returns how many were dropped. The values are dropped
    /// after the lock is released, so their `Drop` may take locks of its own.
    pub fn evict_idle(&self) -> usize {
        let now = Instant::now();
        let mut evicted = Vec::new();
        {
            let mut entries = self.lock();
            entries.retain(|_, entry| {
                if Arc::strong_count(&entry.value) > 1 {
                    entry.last_used = now;
                    return true;
                }
                if now.saturating_duration_since(entry.last_used) < self.idle {
                    return true;
                }
                evicted.push(entry.value.clone());
                false
            });
        }
        evicted.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry<V>>> {
        // Every change to the map is a single insert or retain: a panic elsewhere cannot
        // leave it half-updated.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How often a reaper should call [`IdleCache::evict_idle`] for an idle time: often enough
/// that an entry outlives its idle time by at most a quarter of it, never more than once a
/// second.
pub fn sweep_interval(idle: Duration) -> Duration {
    (idle / 4).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tracked(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unused_entries_go_after_the_idle_time_and_held_ones_stay() {
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let cache = IdleCache::new(Duration::from_secs(60));
        let held = cache.get_or_insert_with(&"held", || Tracked(dropped.clone()));
        drop(cache.get_or_insert_with(&"idle", || Tracked(dropped.clone())));
        assert_eq!(cache.len(), 2);

        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(cache.evict_idle(), 0, "nothing is idle for 60 s yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.evict_idle(), 1);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(cache.peek(&"idle").is_none());

        // Released now, the held entry counts from its release, not from its creation.
        drop(held);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(cache.evict_idle(), 0);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(cache.evict_idle(), 1);
        assert!(cache.is_empty());
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_marks_the_entry_used() {
        let cache = IdleCache::new(Duration::from_secs(10));
        let mut made = 0;
        cache.get_or_insert_with(&1, || made += 1);
        tokio::time::advance(Duration::from_secs(8)).await;
        cache.get_or_insert_with(&1, || made += 1);
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(cache.evict_idle(), 0, "used 8 s ago");
        assert_eq!(made, 1, "built once");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(cache.evict_idle(), 1);
    }
}
