//! `ferrule stat`: golden metrics (success rate, requests per second, p50/p95/p99 latency) per
//! service or per edge caller→callee, from two scrapes of every proxy's `/metrics` a window
//! apart ([`crate::views`] finds and reads the proxies, `ferrule_golden` computes).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::time::Duration;

use clap::{Args, ValueEnum};
pub use ferrule_golden::Row;
use ferrule_golden::{Golden, Measurement};
use serde::Serialize;
use tokio::time::Instant;

use crate::client::ControllerAddr;
use crate::output::{self, Format, Render, write_table};
use crate::views::{self, ms, percent};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  ferrule stat                          # every service, over 3 s
  ferrule stat user --window 10s        # one service
  ferrule stat --by edge -o json        # caller→callee edges, as JSON
  ferrule stat order --by path          # order's requests by method and path")]
pub struct StatArgs {
    /// Only this service (for edges: as caller or callee).
    service: Option<String>,
    /// What a row is: a service (what its sidecars answered, inbound), an edge caller→callee
    /// (what the caller's sidecar sent to the callee, outbound), or a service's method and path.
    #[arg(long, value_enum, default_value_t = By::Service)]
    by: By,
    /// How long to measure: rates and percentiles come from two scrapes this far apart.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum By {
    /// One row per service.
    Service,
    /// One row per caller→callee pair.
    Edge,
    /// One row per service, method and path, from the requests the services' sidecars
    /// answered during the window (read live through `/tap`, not from counters). `route` is
    /// accepted for it.
    #[value(alias = "route")]
    Path,
}

/// Scrapes every proxy, waits `window`, scrapes again, and sums the differences.
pub async fn measure(addr: &ControllerAddr, window: Duration) -> anyhow::Result<Measurement> {
    let proxies = views::proxies(addr).await?;
    if proxies.is_empty() {
        anyhow::bail!(
            "the controller knows no proxy with an admin address (proxies announce themselves when they register an app)"
        );
    }
    let before = views::scrape_all(&proxies).await;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = views::scrape_all(&proxies).await;
    Ok(ferrule_golden::compare(&before, &after, started.elapsed()))
}

/// `ferrule stat`'s document.
#[derive(Debug, Serialize)]
struct Stat {
    by: By,
    window_seconds: f64,
    rows: Vec<Row>,
}

impl Render for Stat {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        let first = match self.by {
            By::Service => "SERVICE",
            By::Edge => "EDGE",
            By::Path => "SERVICE PATH",
        };
        write_rows(out, first, &self.rows)
    }
}

/// The table of `stat` and `top`.
pub fn write_rows(out: &mut dyn Write, first: &str, rows: &[Row]) -> io::Result<()> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.path(),
                percent(r.golden.success_rate),
                format!("{:.1}", r.golden.rps),
                ms(r.golden.p50_ms),
                ms(r.golden.p95_ms),
                ms(r.golden.p99_ms),
            ]
        })
        .collect();
    write_table(out, &[first, "SUCCESS", "RPS", "P50", "P95", "P99"], &rows)
}

/// What `--by path` saw of one (service, "METHOD path"): the proxies, the successes and every
/// latency.
type PathSamples = (BTreeSet<String>, f64, Vec<f64>);

/// `--by path`: taps every proxy's inbound side for `window` and groups what it answered.
async fn measure_paths(addr: &ControllerAddr, window: Duration) -> anyhow::Result<Measurement> {
    let proxies = views::proxies(addr).await?;
    let started = Instant::now();
    let taps = futures::future::join_all(proxies.iter().map(|p| async move {
        (
            p,
            views::tap_for(&p.admin, "direction=inbound", window).await,
        )
    }))
    .await;
    let window = started.elapsed();
    let mut groups: BTreeMap<(String, String), PathSamples> = BTreeMap::new();
    for (proxy, events) in taps {
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                eprintln!("skipping proxy {} ({}): {e:#}", proxy.proxy_id, proxy.admin);
                continue;
            }
        };
        for e in events {
            let route = format!(
                "{} {}",
                e["method"].as_str().unwrap_or(""),
                e["path"].as_str().unwrap_or("")
            );
            let entry = groups.entry((proxy.service.clone(), route)).or_default();
            entry.0.insert(proxy.proxy_id.clone());
            // As `request_total` classifies a response head: a 5xx is a failure.
            if e["status"].as_u64().is_some_and(|s| s < 500) {
                entry.1 += 1.0;
            }
            entry.2.push(e["latency_ms"].as_f64().unwrap_or(0.0));
        }
    }
    let services = groups
        .into_iter()
        .map(|((service, route), (seen, successes, mut latencies))| {
            latencies.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            let requests = latencies.len() as f64;
            Row {
                service: Some(service),
                caller: None,
                callee: None,
                route: Some(route),
                proxies: seen.len(),
                golden: Golden {
                    requests,
                    success_rate: (requests > 0.0).then(|| successes / requests),
                    rps: requests / window.as_secs_f64().max(f64::EPSILON),
                    p50_ms: ferrule_golden::sample_quantile(&latencies, 0.50),
                    p95_ms: ferrule_golden::sample_quantile(&latencies, 0.95),
                    p99_ms: ferrule_golden::sample_quantile(&latencies, 0.99),
                },
            }
        })
        .collect();
    Ok(Measurement {
        window,
        services,
        edges: Vec::new(),
    })
}

pub async fn run(args: StatArgs, addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    let m = match args.by {
        By::Path => measure_paths(addr, args.window).await?,
        _ => measure(addr, args.window).await?,
    };
    let rows = match args.by {
        By::Edge => m.edges,
        _ => m.services,
    };
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| {
            args.service.as_deref().is_none_or(|s| {
                [&r.service, &r.caller, &r.callee]
                    .iter()
                    .any(|name| name.as_deref() == Some(s))
            })
        })
        .collect();
    if rows.is_empty() && format == Format::Table {
        eprintln!("no traffic series yet: the proxies have not seen a request");
    }
    let doc = Stat {
        by: args.by,
        window_seconds: m.window.as_secs_f64(),
        rows,
    };
    output::render(&doc, format, &mut io::stdout().lock())
}
