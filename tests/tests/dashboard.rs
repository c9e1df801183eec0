//! The controller's web dashboard (issue #11, item 5) in a real browser: `ferrule dev up` runs
//! the shop, orders flow through the gateway, and `tests/browser/dashboard.py` loads the
//! dashboard from the controller's admin port in headless Chromium (Debian's `chromium`,
//! driven by Playwright for Python) and waits until the graph shows the shop's edges
//! (gateway → order, order → user, order → payment) with traffic, the proxies' certificate
//! expiry and recent traces. The screenshot is kept in `target/test-artifacts/dashboard.png`.
//!
//! Chromium and Playwright come from `make deps`; without them this test fails saying so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferrule_harness::dev_mesh::DevMesh;
use ferrule_harness::{binary, eventually, http_get};
use serde_json::{Value, json};

/// Start-up of ten debug-build processes on a busy machine; `dev up` itself gives up at 60 s.
const UP_WITHIN: Duration = Duration::from_secs(90);
/// How long the page gets to show everything (inside the script).
const PAGE_WITHIN: &str = "40";
/// One order every this long: under the demo gateway's 10 requests a second per client.
const ORDER_EVERY: Duration = Duration::from_millis(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// Chromium and Playwright are there, or an error saying how to get them.
fn browser_present() -> Result<()> {
    let chromium = std::env::var("FERRULE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).is_file() {
        bail!(
            "{chromium} is missing: `make deps` installs Debian's chromium (the dashboard test needs a real browser)"
        );
    }
    let playwright = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output()
        .context("running python3: `make deps` expects Debian's python3")?;
    if !playwright.status.success() {
        bail!(
            "the Python package playwright is missing: `make deps` installs it (pip install playwright): {}",
            String::from_utf8_lossy(&playwright.stderr).trim()
        );
    }
    Ok(())
}

/// Orders through the gateway until `stop`, so every edge of the shop carries traffic.
async fn keep_ordering(
    gateway: std::net::SocketAddr,
    token: String,
    stop: Arc<AtomicBool>,
) -> Result<u32> {
    let mut placed = 0;
    while !stop.load(Ordering::Relaxed) {
        let body = json!({"user_id": "123", "items": [{"sku": "book", "quantity": 1, "unit_price_cents": 500}]});
        let req = http::Request::post(format!("http://{gateway}/api/orders"))
            .header("host", gateway.to_string())
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))?;
        let reply = ferrule_harness::http1(gateway, req).await?;
        ensure!(reply.status == 201, "POST /api/orders: {reply:?}");
        placed += 1;
        tokio::time::sleep(ORDER_EVERY).await;
    }
    Ok(placed)
}

#[tokio::test]
async fn the_dashboard_shows_the_shop_in_a_real_browser() -> Result<()> {
    // Before the mesh starts: a missing browser fails at once, with what to do.
    browser_present()?;
    let mesh = DevMesh::up(&[], UP_WITHIN).await?;
    let admin = mesh.admin("controller")?;
    let token = mesh.login().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(keep_ordering(mesh.gateway, token, stop.clone()));

    // The JSON the page polls: the shop's edges appear once the proxies have sent traffic.
    eventually(
        Duration::from_secs(30),
        "the shop's edges in /api/v1/overview",
        || async move {
            let (status, body) = http_get(admin, "/api/v1/overview").await.ok()?;
            let overview: Value = serde_json::from_str(&body).ok()?;
            let edges = overview["edges"].as_array()?;
            let has = |caller: &str, callee: &str| {
                edges
                    .iter()
                    .any(|e| e["caller"] == caller && e["callee"] == callee)
            };
            (status == 200
                && has("gateway", "order")
                && has("order", "user")
                && has("order", "payment"))
            .then_some(())
        },
    )
    .await?;
    // Wrong paths answer clearly.
    let (status, body) = http_get(admin, "/api/v1/traces/not-a-trace").await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("32 hex digits"), "{body}");
    let (status, _) = http_get(admin, "/api/v1/nothing").await?;
    assert_eq!(status, 404);

    let target = binary("ferrule")?
        .parent()
        .and_then(Path::parent)
        .context("the binaries' folder is target/<profile>")?
        .to_path_buf();
    let screenshot = target.join("test-artifacts").join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut script = Command::new("python3");
    script
        .arg(repo_root().join("tests/browser/dashboard.py"))
        .args(["--url", &format!("http://{admin}/")])
        .args([
            "--edge",
            "gateway:order",
            "--edge",
            "order:user",
            "--edge",
            "order:payment",
        ])
        .arg("--expect-certificates")
        .args(["--timeout", PAGE_WITHIN])
        .arg("--screenshot")
        .arg(&screenshot);
    let out = ferrule_harness::output(script).await;
    stop.store(true, Ordering::Relaxed);
    let placed = traffic.await.context("the traffic task panicked")??;
    let out = out?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(2) => bail!("{stderr}"),
        _ => bail!(
            "the browser check failed ({}): {stderr}\n{stdout}",
            out.status
        ),
    }
    let seen: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("the script's output: {stdout}"))?;
    println!("dashboard screenshot: {}", screenshot.display());
    println!("the page showed (after {placed} orders): {}", seen["seen"]);
    ensure!(
        screenshot.is_file(),
        "no screenshot at {}",
        screenshot.display()
    );
    Ok(())
}
