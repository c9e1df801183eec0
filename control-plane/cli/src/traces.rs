//! `ferrule traces` and `ferrule trace ID`: the traces the dev mesh's own OTLP receiver kept,
//! read over its HTTP/JSON API (`GET /traces`, `GET /traces/<id>`; see
//! `ferrule_trace::receiver`). The API's address comes from `--traces-addr`, else from the
//! `dev.json` of `--state-dir`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::dev::state::DevState;
use crate::output::{Format, Render, render, write_table};

/// Where the trace API is.
#[derive(Debug, Args)]
pub struct Source {
    /// The state dir of the `ferrule dev up` whose traces to read.
    #[arg(long, value_name = "DIR", default_value = ".ferrule/dev")]
    state_dir: PathBuf,

    /// The trace API's address instead (as in dev.json's `traces`).
    #[arg(long, value_name = "ADDR")]
    traces_addr: Option<SocketAddr>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferrule traces                 # the last traces of `ferrule dev up`\n  \
                        ferrule traces --limit 5 -o json"
)]
pub struct TracesArgs {
    #[command(flatten)]
    source: Source,

    /// Show at most this many traces, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferrule trace 4bf92f3577b34da6a3ce929d0e0e4736\n  \
                        ferrule trace 4bf92f3577b34da6a3ce929d0e0e4736 -o json"
)]
pub struct TraceArgs {
    /// The trace id: 32 hex digits (as `ferrule traces` lists them).
    #[arg(value_parser = parse_trace_id, value_name = "TRACE_ID")]
    id: String,

    #[command(flatten)]
    source: Source,
}

fn parse_trace_id(s: &str) -> Result<String, String> {
    if s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("{s:?} is not a trace id (32 hex digits)"))
    }
}

impl Source {
    fn addr(&self) -> anyhow::Result<SocketAddr> {
        if let Some(addr) = self.traces_addr {
            return Ok(addr);
        }
        let state = DevState::load(&self.state_dir)
            .with_context(|| format!("reading the dev state in {}", self.state_dir.display()))?
            .with_context(|| {
                format!(
                    "no `ferrule dev up` is running with --state-dir {} (start one, or pass \
                     --traces-addr)",
                    self.state_dir.display()
                )
            })?;
        match (state.traces, state.otlp) {
            (Some(addr), _) => Ok(addr),
            (None, Some(otlp)) => {
                bail!("this mesh exports its traces to {otlp} (dev up --otlp): look for them there")
            }
            (None, None) => bail!("this mesh keeps no traces"),
        }
    }

    async fn get<T: for<'de> Deserialize<'de>>(&self, path: &str) -> anyhow::Result<Option<T>> {
        let addr = self.addr()?;
        let client: Client<_, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let uri: hyper::Uri = format!("http://{addr}{path}").parse()?;
        let rsp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
            .await
            .with_context(|| format!("the trace API at {addr} did not answer within 10s"))?
            .with_context(|| format!("cannot reach the trace API at {addr}: is dev up running?"))?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        if status == hyper::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            bail!(
                "the trace API answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(Some(serde_json::from_slice(&body).with_context(|| {
            format!("the trace API at {addr} answered something else than traces")
        })?))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Summary {
    trace_id: String,
    root_service: String,
    root_name: String,
    start_unix_nano: u64,
    duration_nano: u64,
    spans: usize,
    errors: usize,
    services: Vec<String>,
}

#[derive(Debug, Serialize)]
struct TraceList {
    traces: Vec<Summary>,
}

fn ms(nanos: u64) -> String {
    format!("{:.1}ms", nanos as f64 / 1e6)
}

fn age(start_unix_nano: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(start_unix_nano / 1_000_000_000);
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

impl Render for TraceList {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.traces.is_empty() {
            return writeln!(
                out,
                "no traces yet: send a request through the gateway (they arrive within a second)"
            );
        }
        let rows: Vec<Vec<String>> = self
            .traces
            .iter()
            .map(|t| {
                vec![
                    t.trace_id.clone(),
                    format!("{}: {}", t.root_service, t.root_name),
                    t.services.join(","),
                    t.spans.to_string(),
                    t.errors.to_string(),
                    ms(t.duration_nano),
                    age(t.start_unix_nano),
                ]
            })
            .collect();
        write_table(
            out,
            &[
                "TRACE ID", "ROOT", "SERVICES", "SPANS", "ERRORS", "DURATION", "STARTED",
            ],
            &rows,
        )
    }
}

pub async fn list(args: TracesArgs, format: Format) -> anyhow::Result<()> {
    let mut traces: Vec<Summary> = args.source.get("/traces").await?.unwrap_or_default();
    traces.truncate(args.limit);
    render(&TraceList { traces }, format, &mut io::stdout())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Span {
    trace_id: String,
    span_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent_span_id: Option<String>,
    service: String,
    name: String,
    kind: String,
    start_unix_nano: u64,
    end_unix_nano: u64,
    status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    status_message: String,
    #[serde(default)]
    attributes: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Trace {
    trace_id: String,
    spans: Vec<Span>,
}

/// Width of the waterfall's bars, in characters.
const BAR: usize = 40;

impl Trace {
    /// Spans in tree order (a parent before its children, siblings by start), with depth.
    fn tree(&self) -> Vec<(usize, &Span)> {
        let ids: HashSet<&str> = self.spans.iter().map(|s| s.span_id.as_str()).collect();
        let mut children: HashMap<Option<&str>, Vec<&Span>> = HashMap::new();
        for span in &self.spans {
            let parent = span.parent_span_id.as_deref().filter(|p| ids.contains(p));
            children.entry(parent).or_default().push(span);
        }
        for list in children.values_mut() {
            list.sort_by_key(|s| (s.start_unix_nano, s.end_unix_nano));
        }
        let mut out = Vec::new();
        let mut stack: Vec<(usize, &Span)> = children
            .get(&None)
            .map(|roots| roots.iter().rev().map(|s| (0, *s)).collect())
            .unwrap_or_default();
        while let Some((depth, span)) = stack.pop() {
            out.push((depth, span));
            if let Some(kids) = children.get(&Some(span.span_id.as_str())) {
                stack.extend(kids.iter().rev().map(|k| (depth + 1, *k)));
            }
        }
        out
    }
}

/// `200`, `503 error`, `grpc 14 error`, `error: reason`…
fn status_cell(span: &Span) -> String {
    let mut cell = String::new();
    if let Some(code) = span.attributes.get("http.response.status_code") {
        let _ = write!(cell, "{code}");
    }
    if let Some(code) = span.attributes.get("rpc.grpc.status_code") {
        let _ = write!(cell, " grpc {code}");
    }
    if span.status == "error" {
        let reason = span
            .attributes
            .get("ferrule.error")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| span.status_message.clone());
        if reason.is_empty() {
            cell.push_str(" error");
        } else {
            let _ = write!(cell, " error: {reason}");
        }
    }
    cell.trim().to_string()
}

impl Render for Trace {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        let start = self
            .spans
            .iter()
            .map(|s| s.start_unix_nano)
            .min()
            .unwrap_or(0);
        let end = self
            .spans
            .iter()
            .map(|s| s.end_unix_nano)
            .max()
            .unwrap_or(start);
        let total = end.saturating_sub(start).max(1);
        writeln!(
            out,
            "trace {} ({} spans, {})\n",
            self.trace_id,
            self.spans.len(),
            ms(total)
        )?;
        let rows: Vec<Vec<String>> = self
            .tree()
            .into_iter()
            .map(|(depth, span)| {
                let offset = span.start_unix_nano.saturating_sub(start);
                let duration = span.end_unix_nano.saturating_sub(span.start_unix_nano);
                let from = (offset as u128 * BAR as u128 / total as u128) as usize;
                let len = ((duration as u128 * BAR as u128 / total as u128) as usize).max(1);
                let from = from.min(BAR - 1);
                let len = len.min(BAR - from);
                let bar = format!(
                    "|{}{}{}|",
                    " ".repeat(from),
                    "█".repeat(len),
                    " ".repeat(BAR - from - len)
                );
                vec![
                    span.service.clone(),
                    format!("{}{} {}", "  ".repeat(depth), span.kind, span.name),
                    format!("+{}", ms(offset)),
                    ms(duration),
                    status_cell(span),
                    bar,
                ]
            })
            .collect();
        write_table(
            out,
            &[
                "SERVICE",
                "SPAN",
                "START",
                "DURATION",
                "STATUS",
                "WATERFALL",
            ],
            &rows,
        )
    }
}

pub async fn show(args: TraceArgs, format: Format) -> anyhow::Result<()> {
    let path = format!("/traces/{}", args.id);
    let Some(trace) = args.source.get::<Trace>(&path).await? else {
        bail!(
            "no trace {} is kept: `ferrule traces` lists the ones that are (the receiver keeps \
             only the last ones)",
            args.id
        );
    };
    render(&trace, format, &mut io::stdout())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: Option<&str>, start: u64, end: u64) -> Span {
        Span {
            trace_id: "t".into(),
            span_id: id.into(),
            parent_span_id: parent.map(str::to_string),
            service: "svc".into(),
            name: format!("span {id}"),
            kind: "server".into(),
            start_unix_nano: start,
            end_unix_nano: end,
            status: "unset".into(),
            status_message: String::new(),
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn the_waterfall_nests_children_under_parents() {
        let trace = Trace {
            trace_id: "t".into(),
            spans: vec![
                span("c2", Some("root"), 5_000_000, 9_000_000),
                span("root", None, 0, 10_000_000),
                span("c1", Some("root"), 1_000_000, 4_000_000),
                span("g", Some("c1"), 2_000_000, 3_000_000),
            ],
        };
        let order: Vec<(usize, &str)> = trace
            .tree()
            .into_iter()
            .map(|(d, s)| (d, s.span_id.as_str()))
            .collect();
        assert_eq!(order, [(0, "root"), (1, "c1"), (2, "g"), (1, "c2")]);
        let mut text = Vec::new();
        trace.write_human(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("trace t (4 spans, 10.0ms)"), "{text}");
        assert!(text.contains("+5.0ms"), "{text}");
        assert!(text.contains(&format!("|{}|", "█".repeat(BAR))), "{text}");
    }

    #[test]
    fn trace_ids_are_checked() {
        assert!(parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736").is_ok());
        assert!(parse_trace_id("xyz").unwrap_err().contains("32 hex digits"));
    }
}
