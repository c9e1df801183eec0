//! Retry decisions: whether a request may be retried at all, whether a failed attempt is
//! worth retrying, how long to wait before the next attempt, and the retry budget that caps
//! how much extra load retries may add.
//!
//! All of it is synchronous and cheap; the retry layer of the outbound stack asks, per
//! request: [`RetryPolicy::allows_method`] (and whether the body can be replayed, see
//! [`super::replay`]); after each failed attempt [`RetryPolicy::classify`] or
//! [`RetryPolicy::retries_connect_errors`], then [`RetryBudget::try_withdraw`], then sleeps
//! [`RetryPolicy::backoff`]. Each original request is [`RetryBudget::deposit`]ed once.
//!
//! The budget is Finagle's and Linkerd's: over a sliding window, retries may number at most
//! `ratio × requests + minPerSecond × window`. With every request failing, retries therefore add
//! at most `ratio` extra load once traffic is above `minPerSecond / ratio` requests per second,
//! instead of multiplying load by `maxAttempts` when a service is already struggling.
//! (`tower::retry::budget::TpsBudget` does the same but rounds the ratio to `1/n` — 0.3 becomes
//! ⅓ — and panics on windows outside 1..=60 s, which config allows; hence this one.)

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ferrule_config::{EffectiveRetries, GrpcCode};
use http::{HeaderMap, Method, StatusCode};
use rand::Rng;
use tokio::time::Instant;

use super::window::Window;

/// The header (or trailer) carrying a gRPC call's status.
use ferrule_proxy_core::headers::GRPC_STATUS;

/// Why an attempt is retried: for logs and the `reason` label of retry metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    Status(StatusCode),
    Grpc(GrpcCode),
    ConnectError,
    /// The request was written but its connection broke before any response byte: safe to
    /// send again when the method is idempotent (or the policy allows any method).
    ConnectionBroken,
    PerTryTimeout,
}

impl prometheus_client::encoding::EncodeLabelValue for RetryReason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_fmt(encoder, format_args!("{self}"))
    }
}

impl std::fmt::Display for RetryReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetryReason::Status(s) => write!(f, "status {}", s.as_u16()),
            RetryReason::Grpc(c) => write!(f, "grpc-status {c}"),
            RetryReason::ConnectError => f.write_str("connect error"),
            RetryReason::ConnectionBroken => f.write_str("connection broken"),
            RetryReason::PerTryTimeout => f.write_str("per-try timeout"),
        }
    }
}

/// The retry settings of a service or route, ready to answer per request.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    status_codes: Vec<u16>,
    grpc_codes: Vec<GrpcCode>,
    connect_errors: bool,
    non_idempotent: bool,
    backoff_base: Duration,
    backoff_max: Duration,
    backoff_jitter: f64,
    budget: BudgetSettings,
}

/// The settings of a [`RetryBudget`]: retries may number `ratio × requests + minPerSecond ×
/// window` over `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSettings {
    pub ratio: f64,
    pub min_per_second: u32,
    pub window: Duration,
}

impl RetryPolicy {
    pub fn new(retries: &EffectiveRetries) -> Self {
        Self {
            max_attempts: retries.max_attempts.max(1),
            status_codes: retries.status_codes.clone(),
            grpc_codes: retries.grpc_codes.clone(),
            connect_errors: retries.connect_errors,
            non_idempotent: retries.non_idempotent,
            backoff_base: retries.backoff_base,
            backoff_max: retries.backoff_max,
            backoff_jitter: retries.backoff_jitter.clamp(0.0, 1.0),
            budget: BudgetSettings {
                ratio: retries.budget_ratio,
                min_per_second: retries.budget_min_per_second,
                window: retries.budget_window,
            },
        }
    }

    /// The budget this policy's retries draw from. Requests whose policies have equal
    /// settings may share one [`RetryBudget`].
    pub fn budget(&self) -> BudgetSettings {
        self.budget
    }

    /// Attempts in all, the first included; 1 means no retries.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether a request with `method` may be retried: idempotent methods always (RFC 9110
    /// §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE), others only when the policy says
    /// `nonIdempotent`.
    pub fn allows_method(&self, method: &Method) -> bool {
        self.non_idempotent || method.is_idempotent()
    }

    /// Whether a response calls for another attempt: its status is listed in `statusCodes`,
    /// or its `grpc-status` header (a trailers-only gRPC response, which is how gRPC servers
    /// answer calls that fail before any message) is listed in `grpcCodes`.
    ///
    /// A `grpc-status` that arrives in trailers after a streamed body is not seen here: by
    /// then the response is on its way to the app. [`RetryPolicy::classify_grpc`] reads a
    /// header map for callers that buffer responses.
    pub fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Option<RetryReason> {
        if self.status_codes.contains(&status.as_u16()) {
            return Some(RetryReason::Status(status));
        }
        self.classify_grpc(headers)
    }

    /// Whether the `grpc-status` in `headers` (headers or trailers) is retryable.
    pub fn classify_grpc(&self, headers: &HeaderMap) -> Option<RetryReason> {
        let code = headers
            .get(GRPC_STATUS)?
            .to_str()
            .ok()?
            .parse::<GrpcCode>()
            .ok()?;
        self.grpc_codes
            .contains(&code)
            .then_some(RetryReason::Grpc(code))
    }

    /// Whether failing to connect to an endpoint is retried (nothing was sent, so it is safe
    /// for any method).
    pub fn retries_connect_errors(&self) -> bool {
        self.connect_errors
    }

    /// The wait before retry number `retry` (1 for the first retry): `min(max, base ×
    /// 2^(retry-1))`, of which a `jitter` share is random, so a fleet of proxies does not
    /// retry in lockstep. Production passes `rand::rng()`, tests a seeded generator.
    pub fn backoff<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        let full = self
            .backoff_base
            .saturating_mul(1 << doublings)
            .min(self.backoff_max);
        let random_part = full.mul_f64(self.backoff_jitter);
        let fixed_part = full - random_part;
        fixed_part + random_part.mul_f64(rng.random::<f64>())
    }
}

/// How many retries the traffic of a service (or route) may add. Shared by every request to
/// it; thread-safe.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// `minPerSecond × window`: retries always allowed per window, however little traffic.
    reserve: f64,
    /// `requests` are deposits (original requests), `marked` are withdrawals (retries).
    window: Mutex<Window>,
}

impl RetryBudget {
    pub fn new(settings: BudgetSettings) -> Self {
        Self {
            ratio: settings.ratio.max(0.0),
            reserve: f64::from(settings.min_per_second) * settings.window.as_secs_f64(),
            window: Mutex::new(Window::new(settings.window, Instant::now())),
        }
    }

    /// Records one original request (not a retry).
    pub fn deposit(&self) {
        self.lock().add(Instant::now(), 1, 0);
    }

    /// Takes one retry from the budget: `false` when the budget is exhausted and the failure
    /// should be returned to the app instead.
    pub fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let mut window = self.lock();
        let counts = window.sum(now);
        // Compared in f64: counts are far below 2^52, where it is exact.
        let allowed = self.ratio * counts.requests as f64 + self.reserve;
        if (counts.marked + 1) as f64 <= allowed {
            window.add(now, 0, 1);
            true
        } else {
            false
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window is two counters per slot; a panic elsewhere cannot leave it inconsistent.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use ferrule_config::Retries;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn settings(ratio: f64, min_per_second: u32, window_secs: u64) -> BudgetSettings {
        BudgetSettings {
            ratio,
            min_per_second,
            window: Duration::from_secs(window_secs),
        }
    }

    fn policy(yaml_retries: Retries) -> RetryPolicy {
        RetryPolicy::new(&yaml_retries.apply_to(None))
    }

    #[test]
    fn idempotent_methods_only_unless_configured() {
        let p = policy(Retries::default());
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(p.allows_method(&m), "{m}");
        }
        assert!(!p.allows_method(&Method::POST));
        assert!(!p.allows_method(&Method::PATCH));
        assert_eq!(p.budget(), settings(0.2, 10, 10), "the documented defaults");
        let p = policy(Retries {
            non_idempotent: Some(true),
            ..Default::default()
        });
        assert!(p.allows_method(&Method::POST));
    }

    #[test]
    fn classifies_statuses_grpc_codes_and_connect_errors() {
        let p = policy(Retries::default());
        let none = HeaderMap::new();
        assert_eq!(
            p.classify(StatusCode::SERVICE_UNAVAILABLE, &none),
            Some(RetryReason::Status(StatusCode::SERVICE_UNAVAILABLE))
        );
        assert_eq!(p.classify(StatusCode::INTERNAL_SERVER_ERROR, &none), None);
        assert_eq!(p.classify(StatusCode::OK, &none), None);

        let mut grpc = HeaderMap::new();
        grpc.insert(GRPC_STATUS, "14".parse().unwrap());
        assert_eq!(
            p.classify(StatusCode::OK, &grpc),
            Some(RetryReason::Grpc(GrpcCode::Unavailable))
        );
        grpc.insert(GRPC_STATUS, "13".parse().unwrap());
        assert_eq!(p.classify(StatusCode::OK, &grpc), None);
        grpc.insert(GRPC_STATUS, "garbage".parse().unwrap());
        assert_eq!(p.classify_grpc(&grpc), None);
        assert!(p.retries_connect_errors());

        let p = policy(Retries {
            retry_on: Some(ferrule_config::RetryOn {
                status_codes: Some(vec![500]),
                grpc_codes: Some(vec![GrpcCode::Internal]),
                connect_errors: Some(false),
            }),
            ..Default::default()
        });
        assert!(p.classify(StatusCode::SERVICE_UNAVAILABLE, &none).is_none());
        assert!(
            p.classify(StatusCode::INTERNAL_SERVER_ERROR, &none)
                .is_some()
        );
        grpc.insert(GRPC_STATUS, "13".parse().unwrap());
        assert!(p.classify_grpc(&grpc).is_some());
        assert!(!p.retries_connect_errors());
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter() {
        let p = policy(Retries {
            backoff: Some(ferrule_config::Backoff {
                base: Some(Duration::from_millis(100)),
                max: Some(Duration::from_millis(1000)),
                jitter: Some(0.5),
            }),
            ..Default::default()
        });
        let mut rng = StdRng::seed_from_u64(1);
        for (retry, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let full = Duration::from_millis(full);
            for _ in 0..50 {
                let d = p.backoff(retry, &mut rng);
                assert!(
                    d >= full / 2 && d <= full,
                    "retry {retry}: {d:?} vs {full:?}"
                );
            }
        }
        let fixed = policy(Retries {
            backoff: Some(ferrule_config::Backoff {
                jitter: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            fixed.backoff(2, &mut rng),
            2 * ferrule_config::DEFAULT_BACKOFF_BASE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_allows_min_per_second_without_traffic() {
        let budget = RetryBudget::new(settings(0.2, 2, 10));
        let granted = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 20, "2 per second over a 10s window");
        // Withdrawals age out of the window and the reserve is available again.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn all_requests_failing_never_exceed_the_budget() {
        // Every request fails and asks for a retry: 200 req/s for 60 s, ratio 0.3 (a ratio
        // tower's budget would round to 1/3), 5 retries/s minimum, 10 s window.
        let (ratio, min_per_second, window) = (0.3, 5, Duration::from_secs(10));
        let budget = RetryBudget::new(BudgetSettings {
            ratio,
            min_per_second,
            window,
        });
        let tick = Duration::from_millis(5);
        let seconds = 60;
        let (mut requests, mut retries) = (0u64, 0u64);
        let mut per_window = vec![(0u64, 0u64); seconds / 10];
        for i in 0..(seconds as u64 * 200) {
            budget.deposit();
            requests += 1;
            let w = (i / 2000) as usize;
            per_window[w].0 += 1;
            if budget.try_withdraw() {
                retries += 1;
                per_window[w].1 += 1;
            }
            tokio::time::advance(tick).await;
        }
        // The cap holds in every window and over the whole run ...
        let reserve = f64::from(min_per_second) * window.as_secs_f64();
        for (i, (req, ret)) in per_window.iter().enumerate() {
            assert!(
                *ret as f64 <= ratio * *req as f64 + reserve,
                "window {i}: {ret} retries for {req} requests"
            );
        }
        let cap = ratio * requests as f64 + reserve * (seconds as f64 / 10.0);
        assert!(retries as f64 <= cap, "{retries} retries > cap {cap}");
        // ... and the budget is not needlessly stingy: most of it is used.
        assert!(retries as f64 >= 0.9 * ratio * requests as f64, "{retries}");
    }

    #[tokio::test]
    async fn budget_is_shared_across_threads() {
        let budget = std::sync::Arc::new(RetryBudget::new(settings(0.0, 1, 10)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..100).filter(|_| budget.try_withdraw()).count())
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 10);
    }
}
