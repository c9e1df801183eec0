//! Resilience policies end to end (issue #5's "done when"): a real controller on a real etcd,
//! real proxy processes, harness backends told to fail or stall, and config applied with the
//! `ferrule` CLI. The client proxy's retries, budget, breakers, timeouts, split and faults are
//! checked by counting what the backends served against what the client sent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::{Controller, Etcd, Proxy, binary, eventually};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const WAIT: Duration = Duration::from_secs(15);

async fn ferrule(controller: &Controller, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.arg("--controller")
        .arg(controller.grpc.to_string())
        .args(args);
    let out = ferrule_harness::output(cmd).await?;
    if !out.status.success() {
        bail!(
            "ferrule {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `yaml` and returns the stored config version.
async fn apply(controller: &Controller, dir: &Path, yaml: &str) -> Result<i64> {
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml)?;
    ferrule(controller, &["apply", "-f", &path.display().to_string()]).await?;
    let doc: serde_json::Value =
        serde_json::from_str(&ferrule(controller, &["get", "config", "-o", "json"]).await?)?;
    doc["version"].as_i64().context("stored version")
}

/// Waits until `proxy` runs config `version` (its admin `/config`).
async fn wait_version(proxy: &Proxy, version: i64) -> Result<()> {
    eventually(
        WAIT,
        &format!("config version {version} applied"),
        || async {
            let (_, body) = proxy.admin_get("/config").await.ok()?;
            let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
            (doc["policy"]["version"].as_i64() == Some(version)).then_some(())
        },
    )
    .await
}

/// A keep-alive HTTP/1.1 connection to a client proxy's upstream listener.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

/// What one request got back: status and the backend that answered (if any).
struct Reply {
    status: u16,
    backend: String,
    /// The `x-route` response header, which a route rule may set.
    route: String,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Result<Client> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Client { sender })
    }

    async fn send(&mut self, method: &str, path: &str) -> Result<Reply> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web")
            .body(Full::new(Bytes::from_static(b"order")))?;
        tokio::time::timeout(WAIT, async {
            self.sender.ready().await?;
            let rsp = self.sender.send_request(req).await?;
            let status = rsp.status().as_u16();
            let header = |name: &str| {
                rsp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let (backend, route) = (header("x-backend"), header("x-route"));
            rsp.into_body().collect().await?;
            Ok(Reply {
                status,
                backend,
                route,
            })
        })
        .await
        .context("request timed out")?
    }

    /// Sends `n` requests; returns the replies.
    async fn many(&mut self, n: usize, method: &str, path: &str) -> Result<Vec<Reply>> {
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(self.send(method, path).await?);
        }
        Ok(replies)
    }
}

/// A mesh: etcd, a controller, `web` served by three backends behind their own proxies,
/// `web-v2` by one, and a client proxy calling `web`.
struct Mesh {
    _etcd: Etcd,
    controller: Controller,
    web: Vec<HttpBackend>,
    v2: HttpBackend,
    servers: Vec<Proxy>,
    client: Proxy,
    upstream: SocketAddr,
    dir: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Result<Mesh> {
        let etcd = Etcd::start().await?;
        let controller = Controller::start(&etcd.url()).await?;
        let mut web = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=3 {
            let backend = HttpBackend::start(&format!("web-{i}")).await?;
            servers.push(server_proxy(&controller, "web", backend.addr).await?);
            web.push(backend);
        }
        let v2 = HttpBackend::start("web-v2").await?;
        servers.push(server_proxy(&controller, "web-v2", v2.addr).await?);
        let client = Proxy::builder("client-proxy")
            .args(["--controller", &controller.grpc.to_string()])
            .args(["--endpoint-wait", "2s", "--balancer", "round-robin"])
            .upstream("web")
            .start()
            .await?;
        let upstream = client.upstream("web")?;
        client.wait_ready(WAIT).await?;
        for server in &servers {
            server.wait_ready(WAIT).await?;
        }
        let mesh = Mesh {
            _etcd: etcd,
            controller,
            web,
            v2,
            servers,
            client,
            upstream,
            dir: tempfile::tempdir()?,
        };
        // Every web endpoint is known to the client before counting starts.
        let mut client = Client::connect(mesh.upstream).await?;
        tokio::time::timeout(WAIT, async {
            loop {
                let replies = client.many(6, "GET", "/").await?;
                let seen: BTreeSet<_> = replies.into_iter().map(|r| r.backend).collect();
                if seen.len() == 3 {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .context("the three web endpoints never all served")??;
        Ok(mesh)
    }

    /// Applies `yaml` and waits until the client proxy runs it.
    async fn apply(&self, yaml: &str) -> Result<i64> {
        let version = apply(&self.controller, self.dir.path(), yaml).await?;
        wait_version(&self.client, version).await?;
        Ok(version)
    }

    fn web_load(&self) -> u64 {
        self.web.iter().map(HttpBackend::requests).sum()
    }
}

async fn server_proxy(controller: &Controller, service: &str, app: SocketAddr) -> Result<Proxy> {
    Proxy::builder(&format!("{service}-proxy"))
        .args(["--controller", &controller.grpc.to_string()])
        .args(["--service", service, "--app-addr", &app.to_string()])
        .args(["--register-ttl", "3s", "--health-interval", "200ms"])
        .args(["--health-path", "/health"])
        .start()
        .await
}

/// `web`'s policy: retries of 503s within a budget, breakers off unless `breaker` is given.
fn policy(extra: &str) -> String {
    format!(
        "\
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: web
spec:
  service: web
  retries:
    maxAttempts: 4
    retryOn:
      statusCodes: [503]
    backoff: {{base: 1ms, max: 5ms}}
    budget: {{ratio: 0.2, minPerSecond: 1, window: 30s}}
{extra}
---
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: web-v2
spec:
  service: web-v2
"
    )
}

const NO_BREAKER: &str = "  circuitBreaker: {consecutiveFailures: 0}";

#[tokio::test]
async fn retries_stay_within_the_budget_and_posts_are_not_retried() -> Result<()> {
    let mesh = Mesh::start().await?;
    mesh.apply(&policy(NO_BREAKER)).await?;
    let mut client = Client::connect(mesh.upstream).await?;

    // One backend of three fails 30 % of GETs: retries hide it, at little extra load.
    mesh.web[0].set_fail_per_mille(300);
    let before = mesh.web_load();
    let n = 1000;
    let replies = client.many(n, "GET", "/").await?;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let load = mesh.web_load() - before;
    assert!(ok as f64 >= 0.999 * n as f64, "{ok} of {n} succeeded");
    assert!(
        load as f64 <= 1.2 * n as f64,
        "backends served {load} for {n}"
    );
    assert!(load > n as u64, "failures were retried");

    // POSTs are not retried: each reaches a backend exactly once.
    for b in &mesh.web {
        b.set_fail_per_mille(300);
    }
    let before = mesh.web_load();
    let replies = client.many(200, "POST", "/orders").await?;
    assert_eq!(mesh.web_load() - before, 200, "no POST was retried");
    assert!(
        replies.iter().any(|r| r.status == 503),
        "POST failures reach the client"
    );

    // Every backend fails 30 %: retries never exceed ratio × requests + minPerSecond × window
    // (everything here is within one 30 s window).
    // Twice as many requests as before: without the budget, retries would add about 40 %.
    let before = mesh.web_load();
    client.many(2 * n, "GET", "/").await?;
    let retries_total = (mesh.web_load() - before - 2 * n as u64) + (load - n as u64);
    let requests_total = (3 * n + 200) as f64;
    let cap = 0.2 * requests_total + 30.0;
    assert!(
        retries_total as f64 <= cap,
        "{retries_total} retries for {requests_total} requests exceed the budget {cap}"
    );
    let metrics = mesh.client.metrics().await?;
    assert!(
        metrics.contains("retry_budget_exhausted_total{target_service=\"web\"}"),
        "the budget ran out: {metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn breakers_timeouts_split_faults_and_rollback() -> Result<()> {
    let mesh = Mesh::start().await?;
    let mut client = Client::connect(mesh.upstream).await?;

    // A backend failing everything is ejected after 3 failures, gets nothing while open,
    // one probe after the ejection time, and is back when the probe succeeds.
    let breaker = "  circuitBreaker: {consecutiveFailures: 3, baseEjectionTime: 1s, \
                   maxEjectionTime: 2s, maxEjectionPercent: 50}";
    let first = mesh.apply(&policy(breaker)).await?;
    let bad = &mesh.web[2];
    bad.set_fail_per_mille(1000);
    let before = bad.requests();
    client.many(60, "GET", "/").await?;
    let ejected_at = bad.requests() - before;
    // Retries may have sent a request or two more before the third failure was counted.
    assert!(
        (3..=5).contains(&ejected_at),
        "{ejected_at} requests before ejection"
    );
    client.many(30, "GET", "/").await?;
    assert_eq!(bad.requests() - before, ejected_at, "no traffic while open");
    let half_open = |m: &str| {
        m.lines().any(|l| {
            l.starts_with("breaker_state{target_service=\"web\"")
                && l.contains("state=\"half_open\"} 1")
        })
    };
    eventually(WAIT, "the ejection ends", || async {
        half_open(&mesh.client.metrics().await.ok()?).then_some(())
    })
    .await?;
    client.many(30, "GET", "/").await?;
    assert_eq!(bad.requests() - before, ejected_at + 1, "a single probe");
    bad.set_fail_per_mille(0);
    eventually(WAIT, "the second ejection ends", || async {
        half_open(&mesh.client.metrics().await.ok()?).then_some(())
    })
    .await?;
    let replies = client.many(30, "GET", "/").await?;
    assert!(replies.iter().all(|r| r.status == 200));
    assert!(
        replies.iter().filter(|r| r.backend == "web-3").count() >= 5,
        "back in service"
    );

    // A per-try timeout cuts a slow attempt; the retry succeeds on another endpoint.
    mesh.web[0].set_delay(Duration::from_secs(5));
    mesh.apply(&policy(&format!(
        "{NO_BREAKER}\n  timeouts: {{request: 4s, perTry: 300ms}}"
    )))
    .await?;
    for _ in 0..9 {
        let started = std::time::Instant::now();
        let reply = client.send("GET", "/").await?;
        assert_eq!(reply.status, 200);
        assert_ne!(reply.backend, "web-1");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    mesh.web[0].set_delay(Duration::ZERO);

    // A 90/10 split, and a 50 % injected 500 on /chaos.
    let route = "\
---
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  service: web
  rules:
    - name: chaos
      matches:
        - path: {value: /chaos}
      fault:
        abort: {status: 500, percent: 50}
    - name: slow
      matches:
        - path: {value: /slow}
      fault:
        delay: {fixed: 300ms}
      responseHeaders:
        set: {x-route: slow}
    - name: canary
      backends:
        - {service: web, weight: 90}
        - {service: web-v2, weight: 10}
";
    mesh.apply(&format!("{}{route}", policy(NO_BREAKER)))
        .await?;
    let replies = client.many(2000, "GET", "/").await?;
    let mut seen: BTreeMap<bool, usize> = BTreeMap::new();
    for r in &replies {
        assert_eq!(r.status, 200);
        *seen.entry(r.backend.starts_with("web-v2")).or_default() += 1;
    }
    let first_share = seen.get(&false).copied().unwrap_or(0) as f64 / 2000.0;
    assert!((0.87..=0.93).contains(&first_share), "{seen:?}");
    assert!(mesh.v2.requests() > 0);

    let replies = client.many(2000, "GET", "/chaos").await?;
    let aborted = replies.iter().filter(|r| r.status == 500).count() as f64 / 2000.0;
    assert!((0.45..=0.55).contains(&aborted), "{aborted} aborted");

    // A delay fault holds the request, which then goes on; the rule rewrites the response.
    let started = std::time::Instant::now();
    let slow = client.send("GET", "/slow").await?;
    let held = started.elapsed();
    assert_eq!((slow.status, slow.route.as_str()), (200, "slow"));
    assert!(held >= Duration::from_millis(300), "held only {held:?}");
    assert_eq!(
        client.send("GET", "/").await?.route,
        "",
        "only /slow is rewritten"
    );

    // Every proxy acks the version in force, and `ferrule status` says so: the four server
    // proxies and the client proxy, which registers no app and is known by its config stream.
    // A rollback is a new version that every proxy acks too.
    let in_sync = |version: i64| {
        let controller = &mesh.controller;
        move || async move {
            let doc: serde_json::Value =
                serde_json::from_str(&ferrule(controller, &["status", "-o", "json"]).await.ok()?)
                    .ok()?;
            let proxies = doc["proxies"].as_array()?;
            (doc["config_version"].as_i64() == Some(version)
                && proxies.len() == 5
                && proxies
                    .iter()
                    .all(|p| p["acked_version"].as_i64() == Some(version)))
            .then_some(())
        }
    };
    let doc: serde_json::Value =
        serde_json::from_str(&ferrule(&mesh.controller, &["get", "config", "-o", "json"]).await?)?;
    let current = doc["version"].as_i64().context("version")?;
    eventually(WAIT, "every proxy acked the route", in_sync(current)).await?;
    wait_version(&mesh.client, current).await?;

    ferrule(&mesh.controller, &["rollback", "--to", &first.to_string()]).await?;
    let doc: serde_json::Value =
        serde_json::from_str(&ferrule(&mesh.controller, &["get", "config", "-o", "json"]).await?)?;
    let rolled_back = doc["version"].as_i64().context("version")?;
    assert!(rolled_back > current);
    eventually(WAIT, "every proxy acked the rollback", in_sync(rolled_back)).await?;
    wait_version(&mesh.client, rolled_back).await?;
    for server in &mesh.servers {
        wait_version(server, rolled_back).await?;
    }
    Ok(())
}
