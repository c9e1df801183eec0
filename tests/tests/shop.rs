//! The sample shop end to end, as `make demo` runs it (issue #4's walkthrough): `ferrule dev
//! up` starts the controller, the shop with a sidecar per app and the gateway; the test logs
//! in, reads a user, is refused without a valid token, creates an order whose calls go through
//! order's sidecar into order's own database, loses a user replica without failing requests,
//! runs into the rate limit, and sees an `HTTPRoute` fault on `user` apply to requests through
//! the gateway.
//!
//! The mesh is owned by `ferrule_harness::dev_mesh::DevMesh`, which runs `ferrule dev down` when dropped and kills `dev up`
//! after it, so nothing outlives the test, whether it passes or fails.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use ferrule_harness::dev_mesh::{DevMesh, metric_sum};
use ferrule_harness::{Reply, binary, eventually, http_get};
use ferrule_proto::v1::{ListEndpointsRequest, admin_client::AdminClient};
use serde_json::{Value, json};

/// Start-up of ten debug-build processes on a busy machine; `dev up` itself gives up at 60 s.
const UP_WITHIN: Duration = Duration::from_secs(90);
/// The demo gateway's limit on `/api`: requests per second and burst, per client IP.
const API_LIMIT: usize = 10;

/// The SQLite file of the app `name`, from `dev.json`.
fn database(mesh: &DevMesh, name: &str) -> Result<PathBuf> {
    let db = mesh.process(name)?["database"]
        .as_str()
        .context("database")?;
    Ok(PathBuf::from(db))
}

fn json_body(reply: &Reply) -> Result<Value> {
    serde_json::from_str(&reply.body).with_context(|| format!("not JSON: {reply:?}"))
}

/// The value of `key` in a process's environment.
fn environ(pid: u32, key: &str) -> Result<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ"))?;
    env.split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .with_context(|| format!("process {pid} has no {key}"))
}

/// A token signed with the right key that expired an hour ago.
fn expired_token(secret: &str) -> Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = json!({
        "sub": "123", "name": "alice", "iss": "ferrule-shop",
        "iat": now - 7200, "exp": now - 3600,
    });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The sum of `request_total` samples on a proxy whose labels satisfy `select`.
async fn requests(
    admin: SocketAddr,
    select: impl Fn(&prometheus_parse::Labels) -> bool,
) -> Result<f64> {
    metric_sum(admin, "request_total", select).await
}

/// Waits until the controller lists `n` endpoints of `service`.
async fn wait_endpoints(mesh: &DevMesh, service: &'static str, n: usize) -> Result<()> {
    eventually(
        Duration::from_secs(20),
        &format!("{n} endpoints of {service}"),
        || async move {
            let mut admin = AdminClient::new(mesh.controller_channel().await.ok()?);
            let resp = admin
                .list_endpoints(ListEndpointsRequest {
                    service: service.into(),
                })
                .await
                .ok()?;
            (resp.into_inner().endpoints.len() == n).then_some(())
        },
    )
    .await
}

/// The rate limit refills at `API_LIMIT` per second: after a second of quiet its bucket is full
/// again. Waiting for time to pass is the point here, so this sleeps.
async fn let_the_rate_limit_refill() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test]
async fn the_shop_walkthrough_through_dev_up() -> Result<()> {
    let mesh = DevMesh::up(&[], UP_WITHIN).await?;

    // Log in: /login is public.
    let token = mesh.login().await?;

    // A user, with the token.
    let reply = mesh
        .call("GET", "/api/users/123", Some(&token), None)
        .await?;
    ensure!(reply.status == 200, "GET /api/users/123: {reply:?}");
    let user = json_body(&reply)?;
    assert_eq!(user["user_id"], "123", "{user}");
    assert!(
        user["name"].is_string() && user["email"].is_string(),
        "{user}"
    );

    // Without a token, with a tampered one, with an expired one.
    let reply = mesh.call("GET", "/api/users/123", None, None).await?;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(
        json_body(&reply)?["error"],
        "missing authorization header",
        "{reply:?}"
    );
    assert!(reply.header("ferrule-error").is_some(), "{reply:?}");

    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered)?;
    let reply = mesh
        .call("GET", "/api/users/123", Some(&tampered), None)
        .await?;
    assert_eq!(reply.status, 401, "tampered token: {reply:?}");
    let error = json_body(&reply)?["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.starts_with("invalid token"), "{reply:?}");

    let secret = environ(mesh.pid("user-1")?, "USER_JWT_SECRET")?;
    let expired = expired_token(&secret)?;
    let reply = mesh
        .call("GET", "/api/users/123", Some(&expired), None)
        .await?;
    assert_eq!(reply.status, 401, "expired token: {reply:?}");
    let error = json_body(&reply)?["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.starts_with("invalid token"), "{reply:?}");

    // An order: order's sidecar carries its calls to user and payment.
    let order_proxy = mesh.admin("order-proxy")?;
    let to = |service: &'static str| {
        move |l: &prometheus_parse::Labels| {
            l.get("direction") == Some("outbound")
                && l.get("target_service")
                    .is_some_and(|t| t.split(':').next() == Some(service))
        }
    };
    let (users_before, payments_before) = (
        requests(order_proxy, to("user")).await?,
        requests(order_proxy, to("payment")).await?,
    );
    let order = json!({"user_id": "123", "items": [{"sku": "book", "quantity": 2, "unit_price_cents": 1299}]});
    let reply = mesh
        .call("POST", "/api/orders", Some(&token), Some(&order))
        .await?;
    ensure!(reply.status == 201, "POST /api/orders: {reply:?}");
    let created = json_body(&reply)?;
    assert_eq!(created["status"], "paid", "{created}");
    assert_eq!(created["total_cents"], 2598, "{created}");
    let id = created["id"].as_str().context("order id")?.to_string();
    assert!(
        requests(order_proxy, to("user")).await? > users_before,
        "order's sidecar counted no request to user"
    );
    assert!(
        requests(order_proxy, to("payment")).await? > payments_before,
        "order's sidecar counted no request to payment"
    );
    // Every hop between the proxies was mutual TLS: the user and payment sidecars terminated
    // TLS from order's, and no plaintext reached them from a peer.
    let tls = |l: &prometheus_parse::Labels| {
        l.get("direction") == Some("inbound") && l.get("result") == Some("tls")
    };
    let payment_tls =
        metric_sum(mesh.admin("payment-proxy")?, "protocol_detect_total", tls).await?;
    assert!(
        payment_tls >= 1.0,
        "payment's sidecar terminated no mutual TLS"
    );
    let mut user_tls = 0.0;
    for replica in ["user-1-proxy", "user-2-proxy"] {
        user_tls += metric_sum(mesh.admin(replica)?, "protocol_detect_total", tls).await?;
    }
    assert!(user_tls >= 1.0, "no user sidecar terminated mutual TLS");

    // The order is in order's own database, and readable through the gateway.
    let db = rusqlite::Connection::open_with_flags(
        database(&mesh, "order")?,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let (status, total): (String, i64) = db.query_row(
        "SELECT status, total_cents FROM orders WHERE id = ?1",
        [&id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    assert_eq!((status.as_str(), total), ("paid", 2598));
    let reply = mesh
        .call("GET", &format!("/api/orders/{id}"), Some(&token), None)
        .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(json_body(&reply)?["id"], id.as_str());

    // One user replica dies: once the mesh has noticed, every request still succeeds.
    wait_endpoints(&mesh, "user", 4).await?;
    let status = Command::new("kill")
        .args(["-KILL", &mesh.pid("user-1")?.to_string()])
        .status()?;
    ensure!(status.success(), "kill user-1");
    wait_endpoints(&mesh, "user", 2).await?;
    let_the_rate_limit_refill().await;
    for i in 0..API_LIMIT - 2 {
        let reply = mesh
            .call("GET", "/api/users/123", Some(&token), None)
            .await?;
        assert_eq!(reply.status, 200, "request {i} with user-1 down: {reply:?}");
    }

    // More than the limit inside one second: the excess gets 429.
    let_the_rate_limit_refill().await;
    let burst = API_LIMIT + 5;
    let started = Instant::now();
    let replies = futures::future::join_all(
        (0..burst).map(|_| mesh.call("GET", "/api/users/123", Some(&token), None)),
    )
    .await;
    let elapsed = started.elapsed();
    let mut ok = 0;
    let mut limited = Vec::new();
    for reply in replies {
        let reply = reply?;
        match reply.status {
            200 => ok += 1,
            429 => limited.push(reply),
            _ => bail!("neither 200 nor 429: {reply:?}"),
        }
    }
    ensure!(
        elapsed < Duration::from_secs(1),
        "the burst took {elapsed:?}: too slow to test a per-second limit"
    );
    // Tokens that refilled while the burst ran may let one more through.
    let refilled = (elapsed.as_secs_f64() * API_LIMIT as f64).ceil() as usize;
    assert!(
        ok <= API_LIMIT + refilled,
        "{ok} of {burst} passed a limit of {API_LIMIT}/s in {elapsed:?}"
    );
    let reply = limited.first().context("no request was rate limited")?;
    assert_eq!(json_body(reply)?["error"], "Too Many Requests", "{reply:?}");
    assert!(reply.header("retry-after").is_some(), "{reply:?}");

    // The gateway is a caller like order's sidecar: an HTTPRoute aborting every request to
    // `user` applies to requests through the gateway once it runs that config version.
    let route = mesh.state_dir.join("user-abort.yaml");
    std::fs::write(
        &route,
        "apiVersion: ferrule.io/v1\nkind: HTTPRoute\nmetadata: {name: user}\nspec:\n  service: user\n  rules:\n    - name: chaos\n      fault: {abort: {status: 503}}\n",
    )?;
    let controller = mesh.state["controller"].as_str().context("controller")?;
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.args(["--controller", controller, "apply", "-f"])
        .arg(&route);
    let out = ferrule_harness::output(cmd).await?;
    ensure!(
        out.status.success(),
        "ferrule apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gateway_admin = mesh.admin("gateway")?;
    eventually(
        Duration::from_secs(20),
        "the gateway applies the route",
        || async {
            let (_, body) = http_get(gateway_admin, "/config").await.ok()?;
            let doc: Value = serde_json::from_str(&body).ok()?;
            let resources = doc["policy"]["resources"].as_array()?;
            resources
                .iter()
                .any(|r| r["kind"] == "HTTPRoute")
                .then_some(())
        },
    )
    .await?;
    let_the_rate_limit_refill().await;
    let reply = mesh
        .call("GET", "/api/users/123", Some(&token), None)
        .await?;
    assert_eq!(
        reply.status, 503,
        "the fault through the gateway: {reply:?}"
    );

    drop(mesh);
    Ok(())
}
