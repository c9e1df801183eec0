//! `ferrule tap`: the metadata of live requests through one proxy (method, path, status,
//! latency, direction, the service; never bodies), streamed from its admin listener's `/tap`
//! (newline-delimited JSON, filtered there).

use std::io::{self, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::client::ControllerAddr;
use crate::output::Format;
use crate::views;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  ferrule tap order                                # every request through order's sidecar
  ferrule tap order --path /orders --status 5xx    # failed order calls only
  ferrule tap user --method GET --max 10 -o json   # ten events as JSON lines, then exit")]
pub struct TapArgs {
    /// The proxy: a proxy id, or a service (its first proxy, by id).
    proxy: String,
    /// Only requests for this target service (the service called, or the app port inbound).
    #[arg(long)]
    service: Option<String>,
    /// Only paths starting with this.
    #[arg(long)]
    path: Option<String>,
    /// Only this HTTP method.
    #[arg(long)]
    method: Option<String>,
    /// Only this status: a code (503) or a class (5xx).
    #[arg(long)]
    status: Option<String>,
    /// Only this direction: inbound, outbound or gateway.
    #[arg(long)]
    direction: Option<String>,
    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    max: Option<u64>,
    /// Exit after this long (default: until interrupted).
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

pub async fn run(args: TapArgs, addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    let proxies = views::proxies(addr).await?;
    let proxy = proxies
        .iter()
        .find(|p| p.proxy_id == args.proxy)
        .or_else(|| proxies.iter().find(|p| p.service == args.proxy))
        .with_context(|| {
            let known: Vec<&str> = proxies.iter().map(|p| p.proxy_id.as_str()).collect();
            format!(
                "no proxy or service {:?} among the proxies the controller knows: {known:?}",
                args.proxy
            )
        })?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in [
        ("service", &args.service),
        ("path", &args.path),
        ("method", &args.method),
        ("status", &args.status),
        ("direction", &args.direction),
    ] {
        if let Some(value) = value {
            query.append_pair(key, value);
        }
    }
    let uri: http::Uri = format!("http://{}/tap?{}", proxy.admin, query.finish())
        .parse()
        .context("tap URI")?;
    eprintln!("tapping {} ({})", proxy.proxy_id, proxy.admin);
    let stream = stream(uri, &args, format);
    match args.duration {
        Some(d) => match tokio::time::timeout(d, stream).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        },
        None => stream.await,
    }
}

async fn stream(uri: http::Uri, args: &TapArgs, format: Format) -> anyhow::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let rsp = tokio::time::timeout(Duration::from_secs(3), client.get(uri.clone()))
        .await
        .with_context(|| format!("{uri} did not answer within 3s"))?
        .with_context(|| format!("GET {uri}"))?;
    let status = rsp.status();
    let mut body = rsp.into_body();
    if !status.is_success() {
        let text = body.collect().await?.to_bytes();
        bail!(
            "{uri} answered {status}: {}",
            String::from_utf8_lossy(&text).trim()
        );
    }
    let mut pending = Vec::new();
    let mut seen = 0u64;
    let mut out = io::stdout().lock();
    if format == Format::Table {
        writeln!(
            out,
            "{:<12} {:<8} {:<16} {:<7} {:<32} {:>6} {:>10}  ERROR",
            "TIME", "DIR", "SERVICE", "METHOD", "PATH", "STATUS", "LATENCY"
        )?;
    }
    while args.max.is_none_or(|max| seen < max) {
        let Some(frame) = body.frame().await else {
            return Ok(());
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line).context("a tap line")?;
            if let Some(lost) = event.get("lost") {
                eprintln!("the tap fell behind: {lost} events lost");
                continue;
            }
            match format {
                Format::Json => out.write_all(&line)?,
                Format::Yaml => write!(out, "---\n{}", serde_yaml::to_string(&event)?)?,
                Format::Table => writeln!(out, "{}", table_line(&event))?,
            }
            out.flush()?;
            seen += 1;
            if args.max.is_some_and(|max| seen >= max) {
                break;
            }
        }
    }
    Ok(())
}

fn table_line(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    let ts = e["ts_ms"].as_u64().unwrap_or(0);
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        ts / 3_600_000 % 24,
        ts / 60_000 % 60,
        ts / 1000 % 60,
        ts % 1000
    );
    format!(
        "{time:<12} {:<8} {:<16} {:<7} {:<32} {:>6} {:>8.1}ms  {}",
        s("direction"),
        s("target_service"),
        s("method"),
        s("path"),
        e["status"].as_u64().unwrap_or(0),
        e["latency_ms"].as_f64().unwrap_or(0.0),
        s("error"),
    )
}
