//! Tracing end to end, with real processes.
//!
//! * The shop under `ferrule dev up`, whose own OTLP receiver keeps the traces and which
//!   `ferrule trace ID -o json` reads: one `POST /api/orders` through the gateway is one trace
//!   holding gateway → order, order → user and order → payment, a server span and a client
//!   span per hop, each child under the right parent; a W3C caller and a B3-only caller keep
//!   their trace id through every hop; a request without trace headers gets a new trace from
//!   the gateway; a malformed `traceparent` starts a new trace, is counted on the gateway's
//!   `/metrics`, and the order still succeeds; the controller's RPCs are spans too.
//!   `ferrule traces` and `ferrule trace` are run as a user would.
//! * A real `ferrule-proxy` exporting to a blackholed collector (a socket that never answers):
//!   every request succeeds, spans are dropped and counted, and the export queue never holds
//!   more than its bound.
//!
//! The retry of a failed attempt as a second client span is covered in-process by
//! `proxy/app/tests/tracing.rs`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::dev_mesh::{DevMesh, metric_sum};
use ferrule_harness::{Proxy, Reply, binary, eventually, http1, output};
use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};

/// Start-up of ten debug-build processes on a busy machine; `dev up` itself gives up at 60 s.
const UP_WITHIN: Duration = Duration::from_secs(90);
/// Spans leave a proxy in batches at most 500 ms apart; generous for a loaded machine.
const SPANS_WITHIN: Duration = Duration::from_secs(30);

/// `POST /api/orders` through the gateway with `headers`.
async fn order(mesh: &DevMesh, token: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    let body = json!({"user_id": "123", "items": [{"sku": "book", "quantity": 1, "unit_price_cents": 500}]});
    let mut req = Request::post(format!("http://{}/api/orders", mesh.gateway))
        .header("host", mesh.gateway.to_string())
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let reply = http1(
        mesh.gateway,
        req.body(Full::new(Bytes::from(body.to_string())))?,
    )
    .await?;
    ensure!(reply.status == 201, "POST /api/orders: {reply:?}");
    Ok(reply)
}

/// `ferrule <args> --state-dir <mesh's> -o json`, parsed.
async fn ferrule_json(mesh: &DevMesh, args: &[&str]) -> Result<Option<Value>> {
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.args(args)
        .arg("--state-dir")
        .arg(&mesh.state_dir)
        .args(["-o", "json"]);
    let out = output(cmd).await?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(stderr.contains("no trace"), "ferrule {args:?}: {stderr}");
        return Ok(None);
    }
    Ok(Some(serde_json::from_slice(&out.stdout).with_context(
        || format!("ferrule {args:?}: {}", String::from_utf8_lossy(&out.stdout)),
    )?))
}

/// The spans of `trace` once `done` holds for them.
async fn trace_spans(
    mesh: &DevMesh,
    trace: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    let last = std::sync::Mutex::new(Vec::new());
    let found = eventually(SPANS_WITHIN, what, || {
        let last = &last;
        let done = &done;
        async move {
            let spans = ferrule_json(mesh, &["trace", trace])
                .await
                .ok()??
                .get("spans")?
                .as_array()?
                .clone();
            let ok = done(&spans);
            *last.lock().unwrap() = spans.clone();
            ok.then_some(spans)
        }
    })
    .await;
    found.with_context(|| format!("spans of {trace} so far: {:#?}", last.lock().unwrap()))
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a str {
    span["attributes"][key].as_str().unwrap_or("")
}

/// The spans of `service` of `kind` ("server"/"client"); for client spans `service` is the
/// callee (`ferrule.service`, `name` or `name:port`).
fn find<'a>(spans: &'a [Value], kind: &str, service: &str, callee: Option<&str>) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["kind"] == kind && s["service"] == service)
        .filter(|s| {
            callee.is_none_or(|c| {
                let called = attr(s, "ferrule.service");
                called == c || called.starts_with(&format!("{c}:"))
            })
        })
        .collect()
}

/// Every hop the order makes is there: gateway → order, order → user, order → payment.
fn complete(spans: &[Value]) -> bool {
    !find(spans, "server", "gateway", None).is_empty()
        && !find(spans, "client", "gateway", Some("order")).is_empty()
        && !find(spans, "server", "order", None).is_empty()
        && !find(spans, "client", "order", Some("user")).is_empty()
        && !find(spans, "server", "user", None).is_empty()
        && !find(spans, "client", "order", Some("payment")).is_empty()
        && !find(spans, "server", "payment", None).is_empty()
}

fn one<'a>(spans: &'a [Value], kind: &str, service: &str, callee: Option<&str>) -> &'a Value {
    let found = find(spans, kind, service, callee);
    assert_eq!(
        found.len(),
        1,
        "one {kind} span of {service} (callee {callee:?}): {spans:#?}"
    );
    found[0]
}

/// `child`'s parent is `parent`.
fn assert_child(child: &Value, parent: &Value) {
    assert_eq!(
        child["parent_span_id"], parent["span_id"],
        "{} {} should be a child of {} {}",
        child["service"], child["name"], parent["service"], parent["name"]
    );
}

/// Checks the parent/child links of one order's trace; `caller` is the span id the client
/// sent (`None`: the gateway started the trace).
fn assert_order_trace(spans: &[Value], caller: Option<&str>) {
    let gateway = one(spans, "server", "gateway", None);
    match caller {
        Some(caller) => assert_eq!(gateway["parent_span_id"], caller, "{gateway:#}"),
        None => assert!(gateway["parent_span_id"].is_null(), "{gateway:#}"),
    }
    assert_eq!(attr(gateway, "ferrule.direction"), "gateway");
    assert_eq!(gateway["attributes"]["http.response.status_code"], 201);
    // The gateway's attempt to order (no retry here: one client span) → order's server span.
    let to_order = one(spans, "client", "gateway", Some("order"));
    assert_child(to_order, gateway);
    let order = one(spans, "server", "order", None);
    assert_child(order, to_order);
    for callee in ["user", "payment"] {
        let call = one(spans, "client", "order", Some(callee));
        assert_child(call, order);
        assert_eq!(call["attributes"]["rpc.system"], "grpc", "{call:#}");
        assert!(!attr(call, "ferrule.endpoint").is_empty(), "{call:#}");
        let server = one(spans, "server", callee, None);
        assert_child(server, call);
        assert_eq!(server["status"], "unset", "{server:#}");
    }
    let trace_ids: std::collections::HashSet<&str> = spans
        .iter()
        .filter_map(|s| s["trace_id"].as_str())
        .collect();
    assert_eq!(trace_ids.len(), 1, "{trace_ids:?}");
}

#[tokio::test]
async fn one_order_is_one_trace_across_the_shop() -> Result<()> {
    let mesh = DevMesh::up(&[], UP_WITHIN).await?;
    let token = mesh.login().await?;

    // A W3C caller keeps its trace: the gateway's server span is the caller span's child.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    order(
        &mesh,
        &token,
        &[("traceparent", &format!("00-{trace}-{caller}-01"))],
    )
    .await?;
    let spans = trace_spans(&mesh, trace, "the W3C order's whole trace", complete).await?;
    assert_order_trace(&spans, Some(caller));

    // A B3-only caller (multi header) keeps its trace too.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let b3_caller = "e457b5a2e4d86bd1";
    order(
        &mesh,
        &token,
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", b3_caller),
            ("x-b3-sampled", "1"),
        ],
    )
    .await?;
    let spans = trace_spans(&mesh, b3_trace, "the B3 order's whole trace", complete).await?;
    assert_order_trace(&spans, Some(b3_caller));

    // Without trace headers, the gateway starts the trace: find it in `ferrule traces`.
    let before: Vec<String> = list_ids(&mesh).await?;
    order(&mesh, &token, &[]).await?;
    let spans = new_order_trace(&mesh, &before).await?;
    assert_order_trace(&spans, None);

    // A malformed traceparent: the order succeeds, a new trace starts, the gateway counts it.
    let before = list_ids(&mesh).await?;
    order(&mesh, &token, &[("traceparent", "00-zzzz-01")]).await?;
    let spans = new_order_trace(&mesh, &before).await?;
    assert_order_trace(&spans, None);
    let malformed = metric_sum(
        mesh.admin("gateway")?,
        "trace_context_malformed_total",
        |l| l.get("header") == Some("traceparent"),
    )
    .await?;
    assert_eq!(malformed, 1.0);

    // The controller is traced too: the proxies' registrations and watches are its spans.
    let rpc = eventually(SPANS_WITHIN, "a controller RPC span", || async {
        let list = ferrule_json(&mesh, &["traces", "--limit", "1000"])
            .await
            .ok()??;
        list["traces"].as_array()?.iter().find_map(|t| {
            (t["root_service"] == "ferrule-controller"
                && t["root_name"].as_str()?.starts_with("ferrule.v1.Registry/"))
            .then(|| t["trace_id"].as_str().map(str::to_string))?
        })
    })
    .await?;
    let spans = trace_spans(&mesh, &rpc, "the controller's span", |s| !s.is_empty()).await?;
    assert_eq!(spans[0]["kind"], "server");
    assert_eq!(spans[0]["attributes"]["rpc.system"], "grpc");

    // The table views work as a user would run them.
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.args(["trace", trace, "--state-dir"])
        .arg(&mesh.state_dir);
    let out = output(cmd).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "ferrule trace: {out:?}");
    for needle in [
        "SERVICE",
        "WATERFALL",
        "gateway",
        "payment",
        "server shop.user.v1.UserService/GetUser",
    ] {
        ensure!(
            text.contains(needle),
            "ferrule trace lacks {needle:?}:\n{text}"
        );
    }
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.args(["traces", "--state-dir"]).arg(&mesh.state_dir);
    let out = output(cmd).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains(trace) && text.contains(b3_trace),
        "ferrule traces:\n{text}"
    );
    Ok(())
}

async fn list_ids(mesh: &DevMesh) -> Result<Vec<String>> {
    let list = ferrule_json(mesh, &["traces", "--limit", "1000"])
        .await?
        .context("ferrule traces answered")?;
    Ok(list["traces"]
        .as_array()
        .context("traces")?
        .iter()
        .filter_map(|t| t["trace_id"].as_str().map(str::to_string))
        .collect())
}

/// The one new trace (not in `before`) rooted at the gateway's `/api/orders` span, complete.
async fn new_order_trace(mesh: &DevMesh, before: &[String]) -> Result<Vec<Value>> {
    let new_id = eventually(SPANS_WITHIN, "a new order trace", || async {
        let list = ferrule_json(mesh, &["traces", "--limit", "1000"])
            .await
            .ok()??;
        list["traces"].as_array()?.iter().find_map(|t| {
            let id = t["trace_id"].as_str()?;
            (!before.iter().any(|b| b == id)
                && t["root_service"] == "gateway"
                && t["root_name"].as_str()?.contains("POST"))
            .then(|| id.to_string())
        })
    })
    .await?;
    trace_spans(mesh, &new_id, "the new order's whole trace", complete).await
}

#[tokio::test]
async fn a_blackholed_collector_costs_counted_spans_never_requests() -> Result<()> {
    // Bound and listening, never accepted: connections complete in the kernel's backlog and
    // nothing is ever answered.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0")?;
    let collector = blackhole.local_addr()?;
    let backend = HttpBackend::start("user").await?;
    let proxy = Proxy::builder("client-proxy")
        .args([
            "--static-endpoint".to_string(),
            format!("user={}", backend.addr),
            "--otlp-endpoint".to_string(),
            format!("http://{collector}"),
            "--trace-queue-size".to_string(),
            "8".to_string(),
        ])
        .upstream("user")
        .start()
        .await?;
    let upstream = proxy.upstream("user")?;
    for i in 0..200 {
        let req = Request::get(format!("http://{upstream}/items"))
            .header("host", "user")
            .body(Full::new(Bytes::new()))?;
        let reply = http1(upstream, req).await?;
        ensure!(reply.status == 200, "request {i}: {reply:?}");
    }
    let admin = proxy.admin;
    let sum = |metric: &'static str| metric_sum(admin, metric, |_| true);
    assert_eq!(sum("trace_queue_capacity").await?, 8.0);
    // Every span is either still queued (at most the bound), in the batch being sent, or
    // dropped; none is exported. Drops come once the stuck export times out.
    eventually(SPANS_WITHIN, "dropped spans to be counted", || async {
        (sum("trace_spans_dropped_total").await.ok()? > 0.0).then_some(())
    })
    .await?;
    ensure!(sum("trace_queue_spans").await? <= 8.0);
    assert_eq!(sum("trace_spans_exported_total").await?, 0.0);
    drop(blackhole);
    Ok(())
}
