//! Per-target state follows the working set: traffic to 10,000 distinct targets, then nothing
//! for the idle time, leaves no logical or concrete stack, no metric series of those targets,
//! and an RSS back where it was (issue "The proxy, rebuilt", item 3).
//!
//! Static discovery knows every target from the start (that is configuration, not a cache);
//! the controller-stream side of the eviction is tested in `ferrule-proxy-api`'s discovery
//! tests against a real gRPC server.

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use ferrule_proto::names::ServiceRef;
use ferrule_proto::v1::Endpoint;
use ferrule_proxy::api::policy::PolicyClient;
use ferrule_proxy::balance::Algorithm;
use ferrule_proxy::body;
use ferrule_proxy::client::{ClientConfig, Clients};
use ferrule_proxy::discovery::Discovery;
use ferrule_proxy::metrics::{Direction, Metrics};
use ferrule_proxy::outbound::{Outbound, OutboundConfig};
use ferrule_proxy::policy::PolicySet;
use ferrule_proxy::policy::metrics::PolicyMetrics;
use ferrule_proxy_transport::metrics::PoolMetrics;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

const TARGETS: usize = 10_000;
const WAVES: usize = 3;
const IDLE: Duration = Duration::from_secs(2);

fn target(wave: usize, i: usize) -> ServiceRef {
    ServiceRef::parse(&format!("svc-{wave}-{i}")).expect("valid service name")
}

/// Resident set size of this test process, in bytes.
fn rss() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has no resident field")?
        .parse()?;
    Ok(pages * 4096)
}

/// Sends one GET through each target's stack, 64 at a time; every one must get 200.
async fn wave(outbound: &Arc<Outbound>, wave: usize) -> Result<()> {
    let failures: Vec<String> = futures::stream::iter(0..TARGETS)
        .map(|i| {
            let stack = outbound.logical(&target(wave, i)).http();
            async move {
                let req = http::Request::get("/").body(body::empty()).unwrap();
                let rsp = stack.oneshot(req).await.expect("infallible");
                (rsp.status() != http::StatusCode::OK)
                    .then(|| format!("{} {:?}", rsp.status(), rsp.headers().get("ferrule-error")))
            }
        })
        .buffer_unordered(64)
        .filter_map(std::future::ready)
        .collect()
        .await;
    ensure!(
        failures.is_empty(),
        "{} requests of wave {wave} failed, first: {}",
        failures.len(),
        failures[0]
    );
    Ok(())
}

/// Waits (bounded) until the idle reaper has emptied both caches.
async fn wait_evicted(outbound: &Outbound) -> Result<()> {
    tokio::time::timeout(IDLE * 10, async {
        while outbound.cached_targets() != (0, 0) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .with_context(|| {
        format!(
            "targets still cached after {:?}: {:?}",
            IDLE * 10,
            outbound.cached_targets()
        )
    })
}

/// Waits until no series of a forgotten target is left: a series goes when the last holder of
/// its target's counters lets go, which may be a connection task finishing just after the
/// target left the cache.
async fn wait_series_gone(metrics: &Metrics, what: &str) -> Result<()> {
    let gone = tokio::time::timeout(IDLE * 10, async {
        loop {
            match series_of_targets(metrics) {
                Ok(0) => return Ok(()),
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match gone {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "{what}: {} series of forgotten targets remain after {:?}",
            series_of_targets(metrics)?,
            IDLE * 10
        ),
    }
}

fn series_of_targets(metrics: &Metrics) -> Result<usize> {
    let text = metrics.encode()?;
    Ok(text
        .lines()
        .filter(|l| l.contains("target_service=\"svc-"))
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_targets_are_forgotten_after_the_idle_time() -> Result<()> {
    let backend = support::http_backend().await;
    let endpoint = Endpoint {
        address: backend.ip().to_string(),
        port: u32::from(backend.port()),
        ..Default::default()
    };
    let discovery = Discovery::fixed(
        (0..WAVES)
            .flat_map(|w| (0..TARGETS).map(move |i| target(w, i)))
            .map(|t| (t, vec![endpoint.clone()]))
            .collect(),
    );
    let metrics = Metrics::new();
    let policy_metrics = PolicyMetrics::register(&metrics);
    let shutdown = CancellationToken::new();
    let outbound = Outbound::new(
        OutboundConfig {
            tracer: Default::default(),
            algorithm: Algorithm::default(),
            detect_timeout: Duration::from_secs(1),
            endpoint_wait: Duration::from_secs(1),
            access_log: false,
            target_idle: IDLE,
        },
        discovery,
        PolicyClient::fixed(PolicySet::default()),
        Clients::new(
            Direction::Outbound,
            ClientConfig {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(90),
            },
            &PoolMetrics::register(&metrics),
        ),
        metrics.clone(),
        policy_metrics,
        shutdown.clone(),
        TaskTracker::new(),
    );

    // The first wave warms the allocator: the baseline is taken once it is forgotten.
    // (A wave outlasts the idle time, so its first targets may be gone already.)
    wave(&outbound, 0).await?;
    assert!(outbound.cached_targets().0 > 0, "targets were cached");
    assert!(series_of_targets(&metrics)? > 0, "series were recorded");
    wait_evicted(&outbound).await?;
    wait_series_gone(&metrics, "wave 0").await?;
    let baseline = rss()?;

    for w in 1..WAVES {
        wave(&outbound, w).await?;
        let loaded = rss()?;
        wait_evicted(&outbound).await?;
        wait_series_gone(&metrics, &format!("wave {w}")).await?;
        let after = rss()?;
        eprintln!(
            "wave {w}: RSS baseline {baseline}, with targets {loaded}, after eviction {after}"
        );
        assert!(
            after <= baseline + baseline / 10,
            "wave {w}: RSS {after} after eviction is over 10% above the baseline {baseline} \
             (with {TARGETS} targets cached: {loaded})"
        );
    }
    shutdown.cancel();
    Ok(())
}
