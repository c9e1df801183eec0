//! A configured `--upstream` is never forgotten for being idle: its discovery watch, which
//! `/ready` and `controller_connected` report on, outlives `--target-idle-timeout`.

use std::time::Duration;

use anyhow::Result;
use ferrule_harness::{Controller, Etcd, Proxy};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn an_idle_configured_upstream_keeps_the_proxy_ready() -> Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    let proxy = Proxy::builder("idle-client")
        .args(["--controller", &controller.grpc.to_string()])
        .args(["--target-idle-timeout", "1s"])
        .upstream("web")
        .start()
        .await?;
    proxy.wait_ready(WAIT).await?;
    // No event marks "the reaper ran and kept the target": wait several idle periods (the
    // reaper sweeps every second) and check nothing was let go.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, body) = proxy.admin_get("/ready").await?;
    assert_eq!(status, 200, "/ready after the idle time: {body}");
    let metrics = proxy.metrics().await?;
    assert!(
        metrics.contains("controller_connected 1"),
        "the upstream's discovery stream was closed:\n{metrics}\nlog:\n{}",
        proxy.process.log()
    );
    Ok(())
}
