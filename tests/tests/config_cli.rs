//! The configuration centre through the CLI, on a real etcd: apply (and --dry-run), get, diff,
//! history, rollback, delete; and every kind of invalid resource refused naming the field,
//! with the stored config and its version unchanged.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Result, bail};
use ferrule_harness::{Controller, Etcd, binary};

const POLICY: &str = "\
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: web
spec:
  service: web
  timeouts:
    request: 2s
  retries:
    maxAttempts: 3
";

const ROUTE: &str = "\
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata:
  name: web-split
spec:
  service: web
  rules:
    - matches:
        - path: {type: Prefix, value: /api}
      backends:
        - {service: web, weight: 90}
        - {service: web-v2, weight: 10}
";

/// Makes `web-v2` a service the mesh knows, so routes may send to it.
const CANARY: &str = "\
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata:
  name: web-v2
spec:
  service: web-v2
";

async fn ferrule(controller: &Controller, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(binary("ferrule")?);
    cmd.arg("--controller")
        .arg(controller.grpc.to_string())
        .args(args);
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

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

/// The stored config as JSON: (version, resource count).
async fn stored(controller: &Controller) -> Result<(i64, usize)> {
    let doc: serde_json::Value =
        serde_json::from_str(&ok(
            ferrule(controller, &["get", "config", "-o", "json"]).await?
        )?)?;
    Ok((
        doc["version"].as_i64().unwrap_or(-1),
        doc["resources"].as_array().map_or(0, Vec::len),
    ))
}

#[tokio::test]
async fn apply_get_diff_history_rollback_delete() -> Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    let dir = tempfile::tempdir()?;
    let both = write(
        dir.path(),
        "web.yaml",
        &format!("{POLICY}---\n{CANARY}---\n{ROUTE}"),
    )?;

    let out = ok(ferrule(&controller, &["apply", "-f", &both, "--dry-run"]).await?)?;
    assert!(
        out.contains("ServicePolicy/default/web created (dry run)"),
        "{out}"
    );
    assert_eq!(
        stored(&controller).await?,
        (0, 0),
        "a dry run stores nothing"
    );

    let out = ok(ferrule(&controller, &["apply", "-f", &both]).await?)?;
    assert!(out.contains("HTTPRoute/default/web-split created"), "{out}");
    let (v1, n) = stored(&controller).await?;
    assert_eq!(n, 3);
    assert!(v1 > 0);

    // What is stored comes back as YAML that applies again unchanged.
    let yaml = ok(ferrule(
        &controller,
        &["get", "config", "ServicePolicy", "web", "-o", "yaml"],
    )
    .await?)?;
    let again = write(dir.path(), "again.yaml", &yaml)?;
    let out = ok(ferrule(&controller, &["apply", "-f", &again]).await?)?;
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(
        stored(&controller).await?.0,
        v1,
        "an unchanged apply keeps the version"
    );

    // diff: in sync → 0; a change → 1 with the changed line.
    assert_eq!(
        ferrule(&controller, &["diff", "-f", &both])
            .await?
            .status
            .code(),
        Some(0)
    );
    let changed = write(dir.path(), "changed.yaml", &POLICY.replace("2s", "5s"))?;
    let out = ferrule(&controller, &["diff", "-f", &changed]).await?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-    request: 2s") && text.contains("+    request: 5s"),
        "{text}"
    );

    let out = ok(ferrule(&controller, &["apply", "-f", &changed]).await?)?;
    assert!(
        out.contains("ServicePolicy/default/web configured"),
        "{out}"
    );
    let (v2, _) = stored(&controller).await?;
    assert!(v2 > v1);

    let history: serde_json::Value = serde_json::from_str(&ok(ferrule(
        &controller,
        &["history", "ServicePolicy/web", "-o", "json"],
    )
    .await?)?)?;
    let versions: Vec<i64> = history["changes"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["version"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(versions, [v1, v2]);

    let out = ok(ferrule(&controller, &["rollback", "--to", &v1.to_string()]).await?)?;
    assert!(
        out.contains("ServicePolicy/default/web configured"),
        "{out}"
    );
    let yaml = ok(ferrule(
        &controller,
        &["get", "config", "servicepolicy", "web", "-o", "yaml"],
    )
    .await?)?;
    assert!(yaml.contains("request: 2s"), "rolled back: {yaml}");
    assert!(
        stored(&controller).await?.0 > v2,
        "a rollback is a new version"
    );

    ok(ferrule(&controller, &["delete", "httproute", "web-split"]).await?)?;
    assert_eq!(stored(&controller).await?.1, 2);
    let out = ferrule(&controller, &["delete", "httproute", "web-split"]).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    Ok(())
}

#[tokio::test]
async fn invalid_resources_are_refused_naming_the_field() -> Result<()> {
    let controller = Controller::start("memory").await?;
    let dir = tempfile::tempdir()?;
    let good = write(dir.path(), "good.yaml", &format!("{POLICY}---\n{CANARY}"))?;
    ok(ferrule(&controller, &["apply", "-f", &good]).await?)?;
    let before = stored(&controller).await?;

    let two_rules = ROUTE.replace(
        "        - {service: web-v2, weight: 10}\n",
        "        - {service: web-v2, weight: 10}\n    - backends: [{service: web, weight: 1}]\n",
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown field",
            POLICY.replace("maxAttempts", "maxAttempt"),
            "spec.retries.maxAttempt",
        ),
        (
            "negative timeout",
            POLICY.replace("2s", "-1s"),
            "spec.timeouts.request",
        ),
        (
            "weights summing to 0",
            ROUTE
                .replace("weight: 90", "weight: 0")
                .replace("weight: 10", "weight: 0"),
            "weights",
        ),
        (
            "bad regex",
            ROUTE.replace("type: Prefix, value: /api", "type: Regex, value: \"(\""),
            "spec.rules[0].matches[0].path",
        ),
        (
            "unknown backend",
            ROUTE.replace(
                "{service: web-v2, weight: 10}",
                "{service: nowhere, weight: 10}",
            ),
            "nowhere",
        ),
        (
            "duplicate names",
            format!("{ROUTE}---\n{two_rules}"),
            "HTTPRoute/default/web-split",
        ),
    ];
    for (what, yaml, field) in cases {
        let file = write(dir.path(), "bad.yaml", &yaml)?;
        // Pair each bad document with a good one: the batch is all or nothing.
        let extra = write(dir.path(), "extra.yaml", &POLICY.replace("2s", "9s"))?;
        let out = ferrule(&controller, &["apply", "-f", &extra, "-f", &file]).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} must be refused");
        assert!(
            stderr.contains(field),
            "{what}: the error should name {field}: {stderr}"
        );
        assert_eq!(
            stored(&controller).await?,
            before,
            "{what}: nothing stored, version unchanged"
        );
    }
    Ok(())
}
