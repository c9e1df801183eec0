//! `ferrule top`: the busiest paths of the mesh, refreshed in place: every service (what its
//! sidecars answered) and every edge caller→callee, by requests per second, measured over each
//! interval as `ferrule stat` does.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::client::ControllerAddr;
use crate::output::Format;
use crate::stat::{self, Row};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  ferrule top                      # refresh every 2 s until Ctrl-C
  ferrule top --once -o json       # one measurement, as JSON
  ferrule top --iterations 5 --interval 1s --limit 10")]
pub struct TopArgs {
    /// How long each measurement lasts (and so how often the view refreshes).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(long, value_name = "N")]
    iterations: Option<u64>,
    /// One measurement, then exit (`--iterations 1`).
    #[arg(long, conflicts_with = "iterations")]
    once: bool,
    /// Rows shown.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

/// One refresh, as `-o json` prints it (one line each).
#[derive(Debug, Serialize)]
struct Frame {
    window_seconds: f64,
    /// Busiest first.
    paths: Vec<Row>,
}

pub async fn run(args: TopArgs, addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    let iterations = if args.once { Some(1) } else { args.iterations };
    let clear = format == Format::Table && io::stdout().is_terminal();
    let mut done = 0u64;
    while iterations.is_none_or(|n| done < n) {
        let m = stat::measure(addr, args.interval).await?;
        let mut paths: Vec<Row> = m.services.into_iter().chain(m.edges).collect();
        paths.sort_by(|a, b| {
            b.golden
                .rps
                .partial_cmp(&a.golden.rps)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.path().cmp(&b.path()))
        });
        paths.truncate(args.limit);
        let frame = Frame {
            window_seconds: m.window.as_secs_f64(),
            paths,
        };
        let mut out = io::stdout().lock();
        match format {
            Format::Table => {
                if clear {
                    // Home and clear: a plain terminal refresh.
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(
                    out,
                    "ferrule top: busiest paths over the last {:.1}s",
                    frame.window_seconds
                )?;
                stat::write_rows(&mut out, "PATH", &frame.paths)?;
                writeln!(out)?;
            }
            Format::Json => writeln!(out, "{}", serde_json::to_string(&frame)?)?,
            Format::Yaml => write!(out, "---\n{}", serde_yaml::to_string(&frame)?)?,
        }
        out.flush()?;
        done += 1;
    }
    Ok(())
}
