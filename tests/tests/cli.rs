//! The `ferrule` CLI against a real controller: the walkthrough (register in one shell,
//! list in another, stop the first) and its bad-input rules.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Result, bail};
use ferrule_harness::{Controller, Etcd, Process, binary, eventually};

async fn ferrule(controller: &Controller, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.arg("--controller")
        .arg(controller.grpc.to_string())
        .args(args);
    ferrule_harness::output(cmd).await
}

/// The endpoints of `service` as `ferrule get endpoints -o json` prints them.
async fn endpoints(controller: &Controller, service: &str) -> Result<Vec<(String, u64)>> {
    let out = ferrule(controller, &["get", "endpoints", service, "-o", "json"]).await?;
    if !out.status.success() {
        bail!(
            "get endpoints failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut eps: Vec<(String, u64)> = doc["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["address"].as_str().unwrap_or_default().to_string(),
                        e["port"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    eps.sort();
    Ok(eps)
}

async fn register(
    controller: &Controller,
    dir: &std::path::Path,
    args: &[&str],
) -> Result<Process> {
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.arg("--controller")
        .arg(controller.grpc.to_string())
        .arg("register")
        .args(args);
    let mut p = Process::spawn(
        "ferrule register",
        cmd,
        &dir.join(format!("register-{}.log", args[1].replace(':', "_"))),
    )?;
    p.wait_for_line("registered ", Duration::from_secs(10))
        .await?;
    Ok(p)
}

#[tokio::test]
async fn register_then_list_then_stop() -> Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    let dir = tempfile::tempdir()?;

    // Ctrl-C/SIGTERM deregisters at once.
    let mut first = register(
        &controller,
        dir.path(),
        &["user", "127.0.0.1:9001", "--label", "tier=db"],
    )
    .await?;
    assert_eq!(
        endpoints(&controller, "user").await?,
        [("127.0.0.1".to_string(), 9001)]
    );
    let out = ferrule(&controller, &["get", "services"]).await?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("NAME") && table.contains("user"), "{table}");
    first.terminate(Duration::from_secs(5)).await?;
    assert!(
        endpoints(&controller, "user").await?.is_empty(),
        "deregistered on SIGTERM"
    );

    // A killed registrant (no chance to deregister) disappears within its TTL.
    let mut second = register(
        &controller,
        dir.path(),
        &["user", "127.0.0.1:9002", "--ttl", "2s"],
    )
    .await?;
    assert_eq!(
        endpoints(&controller, "user").await?,
        [("127.0.0.1".to_string(), 9002)]
    );
    second.kill();
    let killed_at = std::time::Instant::now();
    eventually(
        Duration::from_secs(4),
        "the endpoint's lease to expire",
        || async {
            endpoints(&controller, "user")
                .await
                .ok()
                .filter(|e| e.is_empty())
        },
    )
    .await?;
    assert!(killed_at.elapsed() <= Duration::from_secs(4));
    Ok(())
}

#[tokio::test]
async fn bad_input_names_the_argument() -> Result<()> {
    let controller = Controller::start("memory").await?;
    let cases: [(&[&str], &str); 4] = [
        (&["register", "user", "127.0.0.1"], "ADDR"),
        (
            &["register", "user", "127.0.0.1:9001", "--ttl", "3x"],
            "--ttl",
        ),
        (
            &["register", "user", "127.0.0.1:9001", "--label", "novalue"],
            "--label",
        ),
        (&["register", "User", "127.0.0.1:9001"], "service"),
    ];
    for (args, named) in cases {
        let out = ferrule(&controller, args).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(named),
            "{args:?}: stderr should name {named}: {stderr}"
        );
    }

    // An unknown service is an empty list, not an error.
    assert!(endpoints(&controller, "nobody").await?.is_empty());

    // An unreachable controller: one clear line and a non-zero exit.
    let (_refusing, dead) = ferrule_harness::refusing_addr()?;
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.args(["--controller", &dead.to_string(), "get", "services"]);
    let out = ferrule_harness::output(cmd).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&dead.to_string()),
        "names the address: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    Ok(())
}
