//! The gateway as a caller in the mesh (issue #5, item 5), end to end on a real etcd, a real
//! controller, `user` served by a harness backend behind its sidecar, and a real
//! `ferrule-proxy gateway` in front, all configured with the `ferrule` CLI:
//!
//! * a `Gateway` resource applied with `ferrule apply` replaces the gateway's file without a
//!   restart (a new route, a new rate limit), is acked in `ferrule status`, an invalid one is
//!   refused naming the field, and one the gateway cannot use is nacked while the last good
//!   one keeps running;
//! * the `HTTPRoute` fault, the `ServicePolicy` timeout and the retry policy of `user` apply
//!   to requests that enter through the gateway.
//!
//! The backend is a harness one rather than the dev mesh's `user` because the test must make
//! `user` fail and stall on demand, which the sample app cannot.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ferrule_harness::backend::HttpBackend;
use ferrule_harness::{
    Controller, Etcd, Process, Proxy, Reply, binary, eventually, http_get, http1,
};
use http_body_util::Full;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// The gateway's file: only `/api/users`.
const FILE: &str = "\
routes:
  - name: users
    pathPrefix: /api/users
    rewritePrefix: /
    service: user
    public: true
";

async fn ferrule(controller: &Controller, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(binary("ferrule").expect("ferrule is built"));
    cmd.arg("--controller")
        .arg(controller.grpc.to_string())
        .args(args);
    ferrule_harness::output(cmd).await.expect("ferrule runs")
}

/// Applies `yaml`; returns the stored config version.
async fn apply(controller: &Controller, dir: &Path, yaml: &str) -> Result<i64> {
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml)?;
    let out = ferrule(controller, &["apply", "-f", &path.display().to_string()]).await;
    if !out.status.success() {
        bail!(
            "ferrule apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ferrule(controller, &["get", "config", "-o", "json"]).await;
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    doc["version"].as_i64().context("stored version")
}

/// The gateway's row of `ferrule status -o json`.
async fn gateway_status(controller: &Controller) -> Option<Value> {
    let out = ferrule(controller, &["status", "-o", "json"]).await;
    let doc: Value = serde_json::from_slice(&out.stdout).ok()?;
    doc["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["mode"] == "gateway")
        .cloned()
}

struct Mesh {
    _etcd: Etcd,
    controller: Controller,
    user: HttpBackend,
    _sidecar: Proxy,
    gateway: Process,
    listen: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

/// The gateway's ready line: where it listens.
#[derive(serde::Deserialize)]
struct GatewayAddrs {
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Mesh {
    async fn start() -> Result<Mesh> {
        let etcd = Etcd::start().await?;
        let controller = Controller::start(&etcd.url()).await?;
        let user = HttpBackend::start("user-1").await?;
        let sidecar = Proxy::builder("user-proxy")
            .args(["--controller", &controller.grpc.to_string()])
            .args(["--service", "user", "--app-addr", &user.addr.to_string()])
            .args(["--register-ttl", "3s", "--health-interval", "200ms"])
            .args(["--health-path", "/health"])
            .start()
            .await?;
        sidecar.wait_ready(WAIT).await?;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("gateway.yaml");
        std::fs::write(&file, FILE)?;
        let mut cmd = Command::new(binary("ferrule-proxy")?);
        cmd.arg("gateway")
            .arg("--config")
            .arg(&file)
            .args(["--controller", &controller.grpc.to_string()])
            .args(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--endpoint-wait", "2s"])
            .env("RUST_LOG", "info,ferrule_proxy=debug");
        let mut gateway = Process::spawn("gateway", cmd, &dir.path().join("gateway.log"))?;
        let GatewayAddrs { listen, admin } = gateway.ready("ferrule-proxy", WAIT).await?;
        let mesh = Mesh {
            _etcd: etcd,
            controller,
            user,
            _sidecar: sidecar,
            gateway,
            listen,
            admin,
            dir,
        };
        // The file's route answers once the sidecar's registration reached discovery.
        eventually(WAIT, "the file's route to answer 200", || async {
            (mesh.get("/api/users/1").await.ok()?.status == 200).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; gateway log:\n{}", mesh.gateway.log()))?;
        Ok(mesh)
    }

    async fn get(&self, path: &str) -> Result<Reply> {
        let req = http::Request::get(path)
            .header("host", "shop.example")
            .body(Full::new(Bytes::new()))?;
        http1(self.listen, req).await
    }

    /// `n` GETs of `path`, one after the other; their statuses.
    async fn statuses(&self, n: usize, path: &str) -> Result<Vec<u16>> {
        let mut statuses = Vec::with_capacity(n);
        for _ in 0..n {
            statuses.push(self.get(path).await?.status);
        }
        Ok(statuses)
    }

    async fn apply(&self, yaml: &str) -> Result<i64> {
        apply(&self.controller, self.dir.path(), yaml).await
    }

    /// Waits until the gateway runs config `version` (its admin `/config`).
    async fn wait_version(&self, version: i64) -> Result<Value> {
        let admin = self.admin;
        eventually(
            WAIT,
            &format!("the gateway runs version {version}"),
            || async move {
                let (_, body) = http_get(admin, "/config").await.ok()?;
                let doc: Value = serde_json::from_str(&body).ok()?;
                (doc["policy"]["version"].as_i64() == Some(version)).then_some(doc)
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}; gateway log:\n{}", self.gateway.log()))
    }
}

fn gateway_resource(routes_and_limits: &str) -> String {
    format!(
        "\
apiVersion: ferrule.io/v1
kind: Gateway
metadata:
  name: gateway
spec:
{routes_and_limits}"
    )
}

/// The file's route and `/limited`, a new route with a new rate limit of 1/s, burst 2.
const LIMITED: &str = "  rateLimits:
    tight: {requestsPerSecond: 1, burst: 2}
  routes:
    - name: users
      pathPrefix: /api/users
      rewritePrefix: /
      service: user
      public: true
    - name: limited
      pathPrefix: /limited
      rewritePrefix: /
      service: user
      public: true
      rateLimit: tight
";

#[tokio::test]
async fn a_gateway_resource_is_applied_live_and_acked() -> Result<()> {
    let mesh = Mesh::start().await?;
    assert_eq!(mesh.get("/limited/x").await?.status, 404, "not in the file");

    // Applied: the new route and its limit take effect without a restart.
    let version = mesh.apply(&gateway_resource(LIMITED)).await?;
    let config = mesh.wait_version(version).await?;
    assert_eq!(config["gateway"]["origin"]["from"], "resource", "{config}");
    let statuses = mesh.statuses(3, "/limited/x").await?;
    assert_eq!(&statuses[..2], [200, 200], "{statuses:?}");
    assert_eq!(statuses[2], 429, "the burst of 2 is spent: {statuses:?}");
    assert_eq!(mesh.get("/api/users/1").await?.status, 200);
    eventually(WAIT, "ferrule status shows the gateway acked", || async {
        let row = gateway_status(&mesh.controller).await?;
        (row["acked_version"].as_i64() == Some(version) && row["service"] == "gateway")
            .then_some(())
    })
    .await?;

    // Invalid: refused by the controller, naming the field; nothing changes.
    let bad = LIMITED.replace("rateLimit: tight", "rateLimit: loose");
    let path = mesh.dir.path().join("bad.yaml");
    std::fs::write(&path, gateway_resource(&bad))?;
    let out = ferrule(
        &mesh.controller,
        &["apply", "-f", &path.display().to_string()],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Gateway/default/gateway: spec.routes[1].rateLimit"),
        "{stderr}"
    );

    // Valid but unusable here (its key file does not exist): nacked with the reason, and the
    // router in force stays.
    let unusable = format!(
        "  jwt:\n    providers:\n      - name: partners\n        hs256SecretFile: /nonexistent/ferrule-key\n{LIMITED}"
    );
    let nacked = mesh.apply(&gateway_resource(&unusable)).await?;
    let row = eventually(WAIT, "the gateway nacks the unusable version", || async {
        let row = gateway_status(&mesh.controller).await?;
        (row["nacked_version"].as_i64() == Some(nacked)).then_some(row)
    })
    .await?;
    let reason = row["nack_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("jwt.providers[0].hs256SecretFile") && reason.contains("/nonexistent"),
        "{row}"
    );
    assert_eq!(row["acked_version"].as_i64(), Some(version), "{row}");
    assert_eq!(mesh.get("/api/users/1").await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn user_policies_apply_through_the_gateway() -> Result<()> {
    let mesh = Mesh::start().await?;

    // An HTTPRoute aborting half the requests to `user`.
    let version = mesh
        .apply(
            "\
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata:
  name: user
spec:
  service: user
  rules:
    - name: chaos
      fault:
        abort: {status: 503, percent: 50}
",
        )
        .await?;
    mesh.wait_version(version).await?;
    let statuses = mesh.statuses(40, "/api/users/1").await?;
    let aborted = statuses.iter().filter(|s| **s == 503).count();
    assert!(
        (6..=34).contains(&aborted),
        "{aborted} of 40 aborted: {statuses:?}"
    );
    assert_eq!(aborted + statuses.iter().filter(|s| **s == 200).count(), 40);

    // A request timeout on `user`: a stalled backend is cut off with 504.
    let policy = |extra: &str| {
        format!(
            "\
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: user
spec:
  service: user
{extra}"
        )
    };
    let out = ferrule(&mesh.controller, &["delete", "httproute", "user"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = mesh
        .apply(&policy("  timeouts: {request: 300ms}\n"))
        .await?;
    mesh.wait_version(version).await?;
    mesh.user.set_delay(Duration::from_secs(3));
    let reply = mesh.get("/api/users/1").await?;
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.header("ferrule-error"), Some("timeout"), "{reply:?}");
    mesh.user.set_delay(Duration::ZERO);

    // Retries of 503s on `user`: a backend failing half the time, and every request through
    // the gateway succeeds.
    let version = mesh.apply(&policy(
        "  retries:\n    maxAttempts: 10\n    retryOn: {statusCodes: [503]}\n    backoff: {base: 1ms, max: 2ms}\n    budget: {ratio: 1.0, minPerSecond: 100, window: 10s}\n  circuitBreaker: {consecutiveFailures: 0}\n",
    )).await?;
    mesh.wait_version(version).await?;
    mesh.user.set_fail_per_mille(500);
    let before = mesh.user.requests();
    let statuses = mesh.statuses(40, "/api/users/1").await?;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(mesh.user.requests() - before > 40, "failures were retried");
    Ok(())
}
