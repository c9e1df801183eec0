//! What a user can see of the mesh (issue #11): problems that used to be silent (unreadable
//! stored values, a sidecar waiting for an unhealthy app, undocumented verbs), the golden
//! metrics views (`ferrule stat`, `top`, `tap`, `get endpoints` with breaker state and EWMA
//! latency) against a real dev mesh with traffic, and the Grafana dashboard's metric names
//! against a real proxy's `/metrics`.

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::{Controller, Etcd, Proxy, binary, eventually, http_get};
use serde_json::Value;

async fn ferrule(controller: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.arg("--controller").arg(controller).args(args);
    ferrule_harness::output(cmd).await
}

fn ok(out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "command failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace's root folder (for docs/ and k8s/).
fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// Item 7: problems a user could not see.

/// Values written straight into etcd that the controller cannot read: a config value that is
/// not JSON, one that is JSON but not a valid resource, and a registry value that is not an
/// `Endpoint`. Each is counted on the controller's `/metrics` and named, with its reason, by
/// `ferrule get config` and `ferrule status`.
#[tokio::test]
async fn unreadable_stored_values_are_counted_and_shown() -> Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    let addr = controller.grpc.to_string();
    let url: ferrule_store::StoreUrl = etcd.url().parse()?;
    let store = ferrule_store::connect(&url).await?;

    let not_json = "/ferrule/config/ServicePolicy/default/not-json";
    let not_valid = "/ferrule/config/ServicePolicy/default/not-valid";
    let not_endpoint = "/ferrule/registry/default/user/http/127.0.0.1:9";
    store
        .put(not_json, b"{service: user".to_vec(), None)
        .await?;
    store
        .put(
            not_valid,
            br#"{"service": "user", "nonsense": 1}"#.to_vec(),
            None,
        )
        .await?;
    store
        .put(not_endpoint, b"not a protobuf".to_vec(), None)
        .await?;

    // The controller's metric, from its watches of both prefixes.
    let admin = controller.admin;
    eventually(
        Duration::from_secs(10),
        "unreadable_keys on /metrics",
        || async move {
            let (_, text) = http_get(admin, "/metrics").await.ok()?;
            (text.contains(r#"ferrule_controller_unreadable_keys{area="config"} 2"#)
                && text.contains(r#"ferrule_controller_unreadable_keys{area="registry"} 1"#))
            .then_some(())
        },
    )
    .await?;

    // `get config`: the table names both keys and why; JSON lists them.
    let table = ok(ferrule(&addr, &["get", "config"]).await?)?;
    assert!(table.contains("cannot be read"), "{table}");
    assert!(
        table.contains(not_json) && table.contains(not_valid),
        "{table}"
    );
    assert!(
        table.contains("nonsense"),
        "the reason names the field: {table}"
    );
    let json: Value =
        serde_json::from_str(&ok(ferrule(&addr, &["get", "config", "-o", "json"]).await?)?)?;
    let unreadable = json["unreadable"].as_array().context("unreadable")?;
    let keys: BTreeSet<&str> = unreadable
        .iter()
        .filter_map(|u| u["key"].as_str())
        .collect();
    assert_eq!(keys, BTreeSet::from([not_json, not_valid]), "{json}");
    assert!(
        unreadable
            .iter()
            .all(|u| !u["reason"].as_str().unwrap_or("").is_empty()),
        "{json}"
    );

    // `status`: config and registry.
    let status: Value =
        serde_json::from_str(&ok(ferrule(&addr, &["status", "-o", "json"]).await?)?)?;
    let unreadable = status["unreadable"].as_array().context("unreadable")?;
    let registry: Vec<&Value> = unreadable
        .iter()
        .filter(|u| u["area"] == "registry")
        .collect();
    assert_eq!(registry.len(), 1, "{status}");
    assert_eq!(registry[0]["key"], not_endpoint);
    assert!(
        registry[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not a protobuf Endpoint"),
        "{status}"
    );
    assert_eq!(
        unreadable.iter().filter(|u| u["area"] == "config").count(),
        2,
        "{status}"
    );
    let table = ok(ferrule(&addr, &["status"]).await?)?;
    assert!(
        table.contains(not_endpoint) && table.contains(not_json),
        "{table}"
    );

    // Fixed in the store: no longer counted or shown.
    store.delete(not_json).await?;
    store.delete(not_valid).await?;
    store.delete(not_endpoint).await?;
    eventually(
        Duration::from_secs(10),
        "unreadable_keys back to 0",
        || async move {
            let (_, text) = http_get(admin, "/metrics").await.ok()?;
            (text.contains(r#"ferrule_controller_unreadable_keys{area="config"} 0"#)
                && text.contains(r#"ferrule_controller_unreadable_keys{area="registry"} 0"#))
            .then_some(())
        },
    )
    .await?;
    let status: Value =
        serde_json::from_str(&ok(ferrule(&addr, &["status", "-o", "json"]).await?)?)?;
    assert_eq!(status["unreadable"], serde_json::json!([]), "{status}");
    Ok(())
}

/// A sidecar whose app fails its health check says so at info level (once, not per probe)
/// and on `/ready`, naming the check and why the last one failed; once the app passes it is
/// ready and says nothing more.
#[tokio::test]
async fn a_sidecar_says_what_it_waits_for() -> Result<()> {
    let controller = Controller::start("memory").await?;
    let app = HttpBackend::start("user").await?;
    // Every request but `/health` fails with 503: check another path.
    app.set_fail_per_mille(1000);
    let proxy = Proxy::builder("user")
        .args(["--service", "user", "--app-addr", &app.addr.to_string()])
        .args(["--controller", &controller.url(), "--health-path", "/check"])
        .args(["--health-interval", "100ms"])
        .start()
        .await?;

    // `/ready` says what it waits for and why; wait until ten checks failed.
    let admin = proxy.admin;
    let body = eventually(
        Duration::from_secs(20),
        "ten failed checks on /ready",
        || async move {
            let (status, body) = http_get(admin, "/ready").await.ok()?;
            let failures: u32 = body
                .split("the last ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            (status == 503 && failures >= 10).then_some(body)
        },
    )
    .await?;
    let check = format!("GET http://{}/check", app.addr);
    assert!(body.contains(&check), "{body}");
    assert!(
        body.contains("503"),
        "the reason of the last failure: {body}"
    );

    // The log at info says it once, not once per probe (the period is 10 s).
    let log = proxy.process.log();
    let said = log
        .lines()
        .filter(|l| l.contains("waiting for the app to pass its health check"))
        .collect::<Vec<_>>();
    assert!(
        !said.is_empty(),
        "no info line about the failing check:\n{log}"
    );
    assert!(said.len() <= 2, "rate-limited, not per probe: {said:#?}");
    assert!(
        said[0].contains("INFO") && said[0].contains("503"),
        "{}",
        said[0]
    );

    app.set_fail_per_mille(0);
    proxy.wait_ready(Duration::from_secs(20)).await?;
    let (status, body) = proxy.admin_get("/ready").await?;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    Ok(())
}

/// Every verb of `ferrule` (and `dev up`/`dev down`) has its section in docs/cli.md.
#[test]
fn every_cli_verb_is_documented() -> Result<()> {
    let docs = std::fs::read_to_string(repo_root().join("docs/cli.md"))?;
    // `-h`: the short help, one line per verb.
    let help = std::process::Command::new(binary("ferrule")?)
        .arg("-h")
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    let verbs: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .context("no Commands: in ferrule --help")?
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .collect();
    assert!(verbs.contains(&"dev"), "{help}");
    let headings: Vec<&str> = docs.lines().filter(|l| l.starts_with("## ")).collect();
    let mut missing = Vec::new();
    for verb in verbs {
        let sections: Vec<String> = match verb {
            "dev" => vec!["dev up".into(), "dev down".into()],
            "get" => vec!["get services".into(), "get endpoints".into()],
            verb => vec![verb.to_string()],
        };
        for section in sections {
            // `## `ferrule apply`...`, or a heading grouping verbs: `... `delete`, ...`.
            let documented = headings.iter().any(|h| {
                h.contains(&format!("`ferrule {section}"))
                    || (h.contains("`ferrule ") && h.contains(&format!("`{section}`")))
            });
            if !documented {
                missing.push(section);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/cli.md has no section for {missing:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 4: the golden metrics views, against a real dev mesh with traffic.

const UP_WITHIN: Duration = Duration::from_secs(90);

/// Sends the shop's traffic through the gateway until dropped: a user read and an order (order
/// calls user and payment) every 250 ms, under the demo's 10/s rate limit.
struct Traffic(tokio::task::JoinHandle<()>);

impl Traffic {
    async fn start(mesh: &ferrule_harness::dev_mesh::DevMesh) -> Result<Self> {
        let token = mesh.login().await?;
        let gateway = mesh.gateway;
        let order = serde_json::json!({"user_id": "123", "items": [{"sku": "book", "quantity": 1, "unit_price_cents": 500}]});
        Ok(Self(tokio::spawn(async move {
            loop {
                for (method, path, body) in [
                    ("GET", "/api/users/123", None),
                    ("POST", "/api/orders", Some(&order)),
                ] {
                    let mut req = http::Request::builder()
                        .method(method)
                        .uri(format!("http://{gateway}{path}"))
                        .header("host", gateway.to_string())
                        .header("authorization", format!("Bearer {token}"));
                    if body.is_some() {
                        req = req.header("content-type", "application/json");
                    }
                    let body = body.map(|b| b.to_string()).unwrap_or_default();
                    if let Ok(req) = req.body(http_body_util::Full::new(bytes::Bytes::from(body))) {
                        let _ = ferrule_harness::http1(gateway, req).await;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        })))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn rows<'a>(doc: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    doc[key]
        .as_array()
        .with_context(|| format!("no {key} in {doc}"))
}

#[tokio::test]
async fn golden_metrics_views_against_the_dev_mesh() -> Result<()> {
    let mesh = ferrule_harness::dev_mesh::DevMesh::up(&[], UP_WITHIN).await?;
    let controller = mesh.addr("controller")?.to_string();
    let _traffic = Traffic::start(&mesh).await?;

    // `stat` per service: user and order answered requests in the window, with latency.
    let stat = eventually(
        Duration::from_secs(30),
        "stat with traffic on user and order",
        || {
            let controller = controller.clone();
            async move {
                let out = ferrule(&controller, &["stat", "--window", "2s", "-o", "json"])
                    .await
                    .ok()?;
                let doc: Value = serde_json::from_slice(&out.stdout).ok()?;
                let busy = |name: &str| {
                    doc["rows"].as_array().is_some_and(|rows| {
                        rows.iter()
                            .any(|r| r["service"] == name && r["requests"].as_f64() > Some(0.0))
                    })
                };
                (busy("user") && busy("order")).then_some(doc)
            }
        },
    )
    .await?;
    assert_eq!(stat["by"], "service");
    for row in rows(&stat, "rows")? {
        if row["requests"].as_f64() > Some(0.0) {
            let rate = row["success_rate"].as_f64().context("success_rate")?;
            assert!((0.0..=1.0).contains(&rate), "{row}");
            assert!(row["rps"].as_f64() > Some(0.0), "{row}");
            let (p50, p99) = (row["p50_ms"].as_f64(), row["p99_ms"].as_f64());
            assert!(p50.is_some() && p50 <= p99, "{row}");
        }
    }
    // The table, for people.
    let table = ok(ferrule(&controller, &["stat", "user", "--window", "1s"]).await?)?;
    assert!(
        table.starts_with("SERVICE") && table.contains("P99"),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("user ")), "{table}");

    // `stat --by edge`: order's sidecar calls user and payment.
    let edges = eventually(
        Duration::from_secs(30),
        "edges order -> user and payment",
        || {
            let controller = controller.clone();
            async move {
                let out = ferrule(
                    &controller,
                    &["stat", "--by", "edge", "--window", "2s", "-o", "json"],
                )
                .await
                .ok()?;
                let doc: Value = serde_json::from_slice(&out.stdout).ok()?;
                let edge = |callee: &str| {
                    doc["rows"].as_array().is_some_and(|rows| {
                        rows.iter().any(|r| {
                            r["caller"] == "order"
                                && r["callee"] == callee
                                && r["requests"].as_f64() > Some(0.0)
                        })
                    })
                };
                (edge("user") && edge("payment")).then_some(doc)
            }
        },
    )
    .await?;
    assert_eq!(edges["by"], "edge");

    // `stat --by path`: order's requests by method and path, read live through its tap.
    let paths = eventually(
        Duration::from_secs(30),
        "POST /orders in stat --by path",
        || {
            let controller = controller.clone();
            async move {
                let out = ferrule(
                    &controller,
                    &[
                        "stat", "order", "--by", "path", "--window", "2s", "-o", "json",
                    ],
                )
                .await
                .ok()?;
                let doc: Value = serde_json::from_slice(&out.stdout).ok()?;
                let row = doc["rows"]
                    .as_array()?
                    .iter()
                    .find(|r| r["service"] == "order" && r["route"] == "POST /orders")?
                    .clone();
                (row["requests"].as_f64() > Some(0.0)).then_some(row)
            }
        },
    )
    .await?;
    assert!(
        paths["p99_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{paths}"
    );
    assert_eq!(paths["success_rate"], 1.0, "{paths}");

    // `top`: one refresh as JSON, busiest first; two as a table.
    let top: Value = serde_json::from_str(&ok(ferrule(
        &controller,
        &["top", "--once", "--interval", "2s", "-o", "json"],
    )
    .await?)?)?;
    let paths = rows(&top, "paths")?;
    assert!(!paths.is_empty(), "{top}");
    let rps: Vec<f64> = paths.iter().filter_map(|p| p["rps"].as_f64()).collect();
    assert!(rps.windows(2).all(|w| w[0] >= w[1]), "busiest first: {top}");
    let table = ok(ferrule(
        &controller,
        &["top", "--iterations", "2", "--interval", "1s"],
    )
    .await?)?;
    assert_eq!(
        table.matches("ferrule top: busiest paths").count(),
        2,
        "{table}"
    );
    assert!(table.contains("order -> user"), "{table}");

    // `tap`: live POSTs through order's sidecar, metadata only.
    let out = ferrule(
        &controller,
        &[
            "tap",
            "order",
            "--method",
            "POST",
            "--direction",
            "inbound",
            "--max",
            "2",
            "--for",
            "30s",
            "-o",
            "json",
        ],
    )
    .await?;
    let text = ok(out)?;
    let events: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(events.len(), 2, "{text}");
    for e in &events {
        assert_eq!(e["method"], "POST", "{e}");
        assert_eq!(e["direction"], "inbound", "{e}");
        assert!(
            e["path"].as_str().is_some_and(|p| p.starts_with("/orders")),
            "{e}"
        );
        assert!(e["status"].as_u64().is_some_and(|s| s >= 200), "{e}");
        assert!(e.get("body").is_none(), "never bodies: {e}");
    }
    // A bad filter is refused naming it.
    let out = ferrule(
        &controller,
        &["tap", "order", "--status", "abc", "--for", "10s"],
    )
    .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("status"), "{stderr}");

    // `get endpoints`: the breaker state and EWMA latency order's sidecar has for user.
    let endpoints: Value = serde_json::from_str(&ok(ferrule(
        &controller,
        &["get", "endpoints", "user", "-o", "json"],
    )
    .await?)?)?;
    let endpoints = rows(&endpoints, "endpoints")?;
    // Two user replicas with an http and a grpc port each; order calls user over gRPC, so its
    // sidecar balances over (and has a breaker for) both grpc endpoints.
    assert_eq!(endpoints.len(), 4, "{endpoints:?}");
    let grpc: Vec<&Value> = endpoints
        .iter()
        .filter(|e| e["port_name"] == "grpc")
        .collect();
    assert_eq!(grpc.len(), 2, "{endpoints:?}");
    for e in grpc {
        assert_eq!(e["breaker"], "closed", "{e}");
        assert!(
            e["latency_ewma_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "{e}"
        );
    }
    let table = ok(ferrule(&controller, &["get", "endpoints", "user"]).await?)?;
    assert!(
        table.contains("BREAKER") && table.contains("closed"),
        "{table}"
    );

    // Every view's --help has an example.
    for verb in [&["stat"][..], &["top"], &["tap"], &["get", "endpoints"]] {
        let mut args = verb.to_vec();
        args.push("--help");
        let help = ok(ferrule(&controller, &args).await?)?;
        assert!(help.contains("Examples:\n  ferrule "), "{verb:?}: {help}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 6: the Grafana dashboard queries the proxies' real metric names.

/// Metric names a PromQL expression selects: every identifier written right before a `{`
/// selector (the dashboard writes every metric with one, even `{}`).
fn selected_metrics(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'{' {
            continue;
        }
        let start = bytes[..i]
            .iter()
            .rposition(|c| !(c.is_ascii_alphanumeric() || *c == b'_' || *c == b':'))
            .map_or(0, |p| p + 1);
        if start < i {
            names.push(expr[start..i].to_string());
        }
    }
    names
}

/// Whether `/metrics` text has series (or at least the family, before its first sample) of
/// `name`: a counter `x_total` is declared `# TYPE x counter`, a histogram's `x_bucket` as
/// `# TYPE x histogram`.
fn exposes(text: &str, name: &str) -> bool {
    let family = ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    text.lines().any(|l| {
        l.starts_with(&format!("{name}{{"))
            || l.starts_with(&format!("{name} "))
            || l.starts_with(&format!("# TYPE {name} "))
            || l.starts_with(&format!("# TYPE {family} "))
    })
}

const POLICY_FOR_METRICS: &str = "\
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: user
spec:
  service: user
  timeouts:
    request: 500ms
  retries:
    maxAttempts: 2
    budget:
      ratio: 0.0
      minPerSecond: 1
  rateLimit:
    requestsPerSecond: 2
    burst: 4
---
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata:
  name: user-faults
spec:
  service: user
  rules:
    - matches:
        - path: {type: Prefix, value: /abort}
      backends:
        - {service: user}
      fault:
        abort: {status: 500}
";

#[tokio::test]
async fn the_dashboard_queries_metrics_real_proxies_expose() -> Result<()> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("k8s/observability/grafana-dashboard.json"),
    )?)?;
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            let names = selected_metrics(expr);
            assert!(!names.is_empty(), "no metric in {expr:?}");
            wanted.extend(names);
        }
    }
    assert!(wanted.contains("request_total") && wanted.contains("response_latency_ms_bucket"));

    // A caller's sidecar sending to a service's sidecar, through a controller: the families
    // of both sides, discovery, balancing and breakers exist.
    let controller = Controller::start("memory").await?;
    let app = HttpBackend::start("user").await?;
    let user = Proxy::builder("user")
        .args(["--service", "user", "--app-addr", &app.addr.to_string()])
        .args(["--controller", &controller.url()])
        .start()
        .await?;
    user.wait_ready(Duration::from_secs(20)).await?;
    let web = Proxy::builder("web")
        .args(["--service", "web", "--controller", &controller.url()])
        .upstream("user")
        .start()
        .await?;
    let upstream = web.upstream("user")?;
    eventually(
        Duration::from_secs(20),
        "a request through web's sidecar",
        || async move { matches!(http_get(upstream, "/hello").await, Ok((200, _))).then_some(()) },
    )
    .await?;

    // Policy families have series only once they count something: a policy with a timeout,
    // a small retry budget and a rate limit, and a route that aborts `/abort`.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("user.yaml");
    std::fs::write(&config, POLICY_FOR_METRICS)?;
    ok(ferrule(
        &controller.grpc.to_string(),
        &["apply", "-f", &config.display().to_string()],
    )
    .await?)?;
    let (web_admin, user_admin) = (web.admin, user.admin);
    let both = || async move {
        let (_, a) = http_get(web_admin, "/metrics").await.ok()?;
        let (_, b) = http_get(user_admin, "/metrics").await.ok()?;
        Some(format!("{a}{b}"))
    };
    // Each stimulus is repeated (bounded) until its family shows: no timing is assumed.
    for (family, path, delay_ms, fail) in [
        ("faults_total", "/abort", 0, 0),
        ("timeouts_total", "/slow", 1500, 0),
        ("proxy_errors_total", "/slow", 1500, 0),
        ("retries_total", "/fail", 0, 1000),
        ("retry_budget_exhausted_total", "/fail", 0, 1000),
        ("rate_limited_total", "/hello", 0, 0),
    ] {
        app.set_delay(Duration::from_millis(delay_ms));
        app.set_fail_per_mille(fail);
        eventually(Duration::from_secs(30), family, || async move {
            let _ = http_get(upstream, path).await;
            both()
                .await
                .filter(|text| exposes(text, family))
                .map(|_| ())
        })
        .await?;
    }
    app.set_delay(Duration::from_millis(0));
    app.set_fail_per_mille(0);
    let text = both().await.context("scraping the proxies")?;
    let (_, controller_text) = http_get(controller.admin, "/metrics").await?;

    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| match name.strip_prefix("ferrule_controller_") {
            Some(_) => !exposes(&controller_text, name),
            None => !exposes(&text, name),
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no proxy exposes: {missing:?}\n{text}"
    );
    Ok(())
}
