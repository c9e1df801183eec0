//! Local rate limits: token buckets (`requestsPerSecond` refill, `burst` size), one per key.
//!
//! A [`RateLimiter`] is keyed by a [`RateKey`]: one global bucket for a service's
//! `ServicePolicy.rateLimit`, or one per client IP or per arbitrary string (an API key, a JWT
//! subject) for the gateway. The number of buckets is bounded ([`DEFAULT_MAX_KEYS`]) so a
//! flood of distinct keys cannot grow memory: a new key at the bound first drops every bucket
//! that has refilled (it is indistinguishable from a new one), then, if none has, the least
//! recently used. [`RateLimiter::check`] takes a token or says when one will be available
//! (the `Retry-After` of the 429 the caller answers). Time is `tokio::time::Instant`, so tests
//! drive it with a paused clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ferrule_config::EffectiveRateLimit;
use tokio::time::Instant;

/// Buckets kept per limiter unless told otherwise.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// What a bucket is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    Global,
    ClientIp(IpAddr),
    Key(String),
}

/// A request over the limit, and how long until a token will be available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded; a request will be allowed in {retry_after:?}")]
pub struct RateLimited {
    pub retry_after: Duration,
}

/// Token buckets sharing one rate and burst, one per key. Thread-safe.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<RateKey, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date; also the last use, for eviction.
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, per_second: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.updated = now;
    }
}

impl RateLimiter {
    pub fn new(limit: EffectiveRateLimit) -> Self {
        Self::with_max_keys(limit, DEFAULT_MAX_KEYS)
    }

    pub fn with_max_keys(limit: EffectiveRateLimit, max_keys: usize) -> Self {
        Self {
            // Validation keeps both at 1 or more; a zero would mean "never", not a panic.
            per_second: f64::from(limit.requests_per_second.max(1)),
            burst: f64::from(limit.burst.max(1)),
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token from `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &RateKey) -> Result<(), RateLimited> {
        let now = Instant::now();
        // A panic elsewhere cannot leave a bucket half-updated: it is two plain numbers.
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        bucket.refill(now, self.per_second, self.burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_second;
            Err(RateLimited {
                retry_after: Duration::from_secs_f64(wait),
            })
        }
    }

    /// Buckets currently kept.
    pub fn keys(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Makes room for one bucket (see the module docs).
    fn evict(&self, buckets: &mut HashMap<RateKey, Bucket>, now: Instant) {
        buckets.retain(|_, b| {
            let mut b = *b;
            b.refill(now, self.per_second, self.burst);
            b.tokens < self.burst
        });
        if buckets.len() >= self.max_keys
            && let Some(oldest) = buckets
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(k, _)| k.clone())
        {
            buckets.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u32, burst: u32, max_keys: usize) -> RateLimiter {
        RateLimiter::with_max_keys(
            EffectiveRateLimit {
                requests_per_second: per_second,
                burst,
            },
            max_keys,
        )
    }

    /// Token arithmetic is in f64: equal to within a microsecond.
    fn assert_close(got: Duration, want: Duration) {
        assert!(
            got.abs_diff(want) < Duration::from_micros(1),
            "{got:?} != {want:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_rate() {
        let l = limiter(10, 5, 10);
        for _ in 0..5 {
            assert_eq!(l.check(&RateKey::Global), Ok(()));
        }
        let err = l.check(&RateKey::Global).unwrap_err();
        assert_close(err.retry_after, Duration::from_millis(100));

        tokio::time::advance(Duration::from_millis(50)).await;
        let err = l.check(&RateKey::Global).unwrap_err();
        assert_close(err.retry_after, Duration::from_millis(50));
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(l.check(&RateKey::Global), Ok(()));
        assert!(l.check(&RateKey::Global).is_err());

        // Over a long run the rate holds: 10/s for 10 s plus the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        let mut allowed = 0;
        for _ in 0..1_000 {
            if l.check(&RateKey::Global).is_ok() {
                allowed += 1;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!((104..=106).contains(&allowed), "{allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_their_own_buckets() {
        let l = limiter(1, 1, 10);
        let a = RateKey::ClientIp("10.0.0.1".parse().unwrap());
        let b = RateKey::ClientIp("10.0.0.2".parse().unwrap());
        assert!(l.check(&a).is_ok());
        assert!(l.check(&a).is_err());
        assert!(l.check(&b).is_ok());
        assert!(l.check(&RateKey::Key("tenant-a".into())).is_ok());
        assert_eq!(l.keys(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn key_count_is_bounded() {
        let l = limiter(1, 2, 3);
        let key = |i: u32| RateKey::Key(format!("k{i}"));
        // k0 is drained (one token left of two), k1 and k2 are drained further.
        for i in 0..3 {
            l.check(&key(i)).unwrap();
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        l.check(&key(1)).unwrap();
        l.check(&key(2)).unwrap();
        // No bucket has refilled: the least recently used (k0) goes.
        l.check(&key(3)).unwrap();
        assert_eq!(l.keys(), 3);
        // k1 is still limited: it was kept.
        assert!(l.check(&key(1)).is_err());

        // After everything has refilled, a new key clears all refilled buckets.
        tokio::time::advance(Duration::from_secs(5)).await;
        l.check(&key(4)).unwrap();
        assert_eq!(l.keys(), 1);
        for i in 5..1_000 {
            let _ = l.check(&key(i));
        }
        assert!(l.keys() <= 3);
    }
}
