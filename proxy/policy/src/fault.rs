//! Fault injection: a route rule can delay a share of its requests by a fixed time and answer
//! a share with an error status without forwarding them, to test how callers cope.
//!
//! [`FaultPolicy::decide`] draws both independently per request (a request may be delayed and
//! then aborted); the stack sleeps [`FaultDecision::delay`] and, for
//! [`FaultDecision::abort`], answers with that status itself. The random source is a
//! parameter so tests can seed it.

use std::time::Duration;

use ferrule_config::Fault;
use http::StatusCode;
use rand::Rng;

/// A fault's abort status that is not an HTTP status (validation allows 200..=599).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not an HTTP status code")]
pub struct BadStatus(u16);

/// A rule's fault injection, ready to draw per request.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPolicy {
    delay: Option<(Duration, f64)>,
    abort: Option<(StatusCode, f64)>,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultDecision {
    /// Hold the request this long before going on.
    pub delay: Option<Duration>,
    /// Answer with this status instead of forwarding.
    pub abort: Option<StatusCode>,
}

impl FaultPolicy {
    pub fn new(fault: &Fault) -> Result<Self, BadStatus> {
        let abort = fault
            .abort
            .as_ref()
            .map(|a| {
                StatusCode::from_u16(a.status)
                    .map(|s| (s, a.percent))
                    .map_err(|_| BadStatus(a.status))
            })
            .transpose()?;
        Ok(Self {
            delay: fault.delay.as_ref().map(|d| (d.fixed, d.percent)),
            abort,
        })
    }

    /// Draws this request's fault. Production passes `rand::rng()`, tests a seeded generator.
    pub fn decide<R: Rng + ?Sized>(&self, rng: &mut R) -> FaultDecision {
        FaultDecision {
            delay: self
                .delay
                .filter(|(_, percent)| hit(rng, *percent))
                .map(|(d, _)| d),
            abort: self
                .abort
                .filter(|(_, percent)| hit(rng, *percent))
                .map(|(s, _)| s),
        }
    }
}

/// True for `percent` % of draws. 0 never and 100 always hit, whatever the generator.
fn hit<R: Rng + ?Sized>(rng: &mut R, percent: f64) -> bool {
    rng.random::<f64>() * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use ferrule_config::{FaultAbort, FaultDelay};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn fault(delay: Option<f64>, abort: Option<(u16, f64)>) -> Fault {
        Fault {
            delay: delay.map(|percent| FaultDelay {
                fixed: Duration::from_millis(100),
                percent,
            }),
            abort: abort.map(|(status, percent)| FaultAbort { status, percent }),
        }
    }

    #[test]
    fn shares_follow_the_percentages() {
        let policy = FaultPolicy::new(&fault(Some(10.0), Some((500, 50.0)))).unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        let n = 10_000;
        let decisions: Vec<_> = (0..n).map(|_| policy.decide(&mut rng)).collect();
        let delayed = decisions.iter().filter(|d| d.delay.is_some()).count();
        let aborted = decisions.iter().filter(|d| d.abort.is_some()).count();
        assert!((800..=1_200).contains(&delayed), "{delayed}");
        assert!((4_700..=5_300).contains(&aborted), "{aborted}");
        assert!(
            decisions
                .iter()
                .all(|d| d.delay.is_none_or(|d| d == Duration::from_millis(100)))
        );
        assert!(decisions.iter().all(|d| {
            d.abort
                .is_none_or(|s| s == StatusCode::INTERNAL_SERVER_ERROR)
        }));
    }

    #[test]
    fn zero_and_hundred_percent_are_exact() {
        let mut rng = StdRng::seed_from_u64(0);
        let always = FaultPolicy::new(&fault(Some(100.0), Some((503, 100.0)))).unwrap();
        let never = FaultPolicy::new(&fault(Some(0.0), Some((503, 0.0)))).unwrap();
        for _ in 0..1_000 {
            let d = always.decide(&mut rng);
            assert!(d.delay.is_some() && d.abort == Some(StatusCode::SERVICE_UNAVAILABLE));
            assert_eq!(never.decide(&mut rng), FaultDecision::default());
        }
        let none = FaultPolicy::new(&Fault::default()).unwrap();
        assert_eq!(none.decide(&mut rng), FaultDecision::default());
    }

    #[test]
    fn refuses_statuses_http_does_not_have() {
        assert_eq!(
            FaultPolicy::new(&fault(None, Some((1000, 1.0)))),
            Err(BadStatus(1000))
        );
    }
}
