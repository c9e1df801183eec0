//! Rotation without outage, under continuous load: real proxies carrying HTTP and opaque TCP
//! (each TCP connection a new mutual TLS handshake between the proxies) while the mesh CA's
//! files change under a running controller, which picks them up by polling
//! (`--identity-check-interval`). No request may fail.
//!
//! (a) The trust anchor, as docs/identity.md's procedure says: a second anchor is appended to
//! the bundle, the issuer is replaced by one the new anchor signed, every proxy renews onto it,
//! and the old anchor is removed. (b) The issuer alone: a new issuer from the same anchor.
//!
//! Leaves live 8 s, so proxies renew about every 5.6 s and have over 2 s to spare on a busy
//! machine (with 5 s leaves a renewal delayed by the load let a certificate expire: the peer
//! rightly refused it). Every wait is on an event (the controller's bundle stream and status,
//! the proxies' renewal counters) and bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrule_harness::backend::{HttpBackend, TcpEcho};
use ferrule_harness::{ANY_PORT, Controller, Etcd, Proxy, binary, eventually, http1, output};
use ferrule_proto::v1::{
    IdentityStatusRequest, TrustBundle, WatchTrustBundleRequest, identity_client::IdentityClient,
};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn ferrule(args: &[&str], paths: &[&Path]) -> Result<String> {
    let mut cmd = std::process::Command::new(binary("ferrule")?);
    cmd.args(args).args(paths);
    let shown = format!("{cmd:?}");
    let out = output(cmd).await?;
    if !out.status.success() {
        bail!("{shown}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

async fn token(controller: &Controller, service: &str) -> Result<String> {
    let mut cmd = controller.cli()?;
    cmd.args(["identity", "token", "create", "--service", service]);
    let out = output(cmd).await?;
    if !out.status.success() {
        bail!("token create: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The sum of a proxy's `identity_certificates_renewed_total` samples.
async fn renewed(proxy: &Proxy) -> Result<f64> {
    Ok(proxy
        .metrics()
        .await?
        .lines()
        .filter(|l| l.starts_with("identity_certificates_renewed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits until every proxy has obtained `n` more certificates than now.
async fn renewals(proxies: &[&Proxy], n: f64, what: &str) -> Result<()> {
    let mut base = Vec::new();
    for p in proxies {
        base.push(renewed(p).await?);
    }
    eventually(Duration::from_secs(30), what, || async {
        for (p, b) in proxies.iter().zip(&base) {
            if renewed(p).await.ok()? < b + n {
                return None;
            }
        }
        Some(())
    })
    .await
}

async fn next_bundle(stream: &mut tonic::Streaming<TrustBundle>) -> Result<TrustBundle> {
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(bundle))) => Ok(bundle),
        Ok(Some(Err(status))) => bail!("bundle stream failed: {status}"),
        Ok(None) => bail!("bundle stream ended"),
        Err(_) => bail!("no trust bundle within 10 s"),
    }
}

/// Waits until the controller signs with an issuer other than `old` and reports no problem
/// with its files; returns the new issuer's fingerprint.
async fn issuer_replaced(controller: &Controller, old: &str) -> Result<String> {
    eventually(
        Duration::from_secs(10),
        "the new issuer to be loaded",
        || async move {
            let status = IdentityClient::new(controller.channel().await.ok()?)
                .status(IdentityStatusRequest {})
                .await
                .ok()?
                .into_inner();
            let issuer = status.issuer?.fingerprint;
            (issuer != old && status.problem.is_empty()).then_some(issuer)
        },
    )
    .await
}

/// Copies a new issuer over the controller's: the key first, then the certificate (a check
/// in between sees a pair that does not fit and keeps the old one).
fn install_issuer(from: &Path, ca: &Path) -> Result<()> {
    std::fs::copy(from.join("issuer.key"), ca.join("issuer.key"))?;
    std::fs::copy(from.join("issuer.pem"), ca.join("issuer.pem"))?;
    // The admin's certificate of the new issuer: the old one stops chaining once the old
    // anchor is removed (the harness's `channel()` and `cli()` read them from here).
    std::fs::copy(from.join("admin.key"), ca.join("admin.key"))?;
    std::fs::copy(from.join("admin.pem"), ca.join("admin.pem"))?;
    Ok(())
}

/// HTTP and opaque TCP through the client proxy, in a loop until `stop`; every failure is
/// recorded with what it was.
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(web: SocketAddr, raw: SocketAddr) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, f, s) = (ok.clone(), failures.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let http = http1(web, ferrule_harness::get("web", "/load")).await;
                match http {
                    Ok(r) if r.status == 200 => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    other => f.lock().unwrap().push(format!("http {n}: {other:?}")),
                }
                match echo(raw, n).await {
                    Ok(()) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => f.lock().unwrap().push(format!("tcp {n}: {e:#}")),
                }
            }
        });
        Self {
            ok,
            failures,
            stop,
            task,
        }
    }

    fn check(&self, phase: &str) -> Result<u64> {
        let failures = self.failures.lock().unwrap();
        if !failures.is_empty() {
            bail!(
                "{} failed request(s) by {phase}: {:?}",
                failures.len(),
                &failures[..failures.len().min(5)]
            );
        }
        Ok(self.ok.load(Ordering::Relaxed))
    }

    async fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .context("the load loop did not stop")??;
        self.check("the end")
    }
}

/// `e` with what the proxies logged about TLS, the bundle and their certificates: a failed
/// request's cause is in a proxy's log, not in the empty answer the load loop saw.
fn with_logs(e: anyhow::Error, proxies: &[&Proxy]) -> anyhow::Error {
    let mut text = format!("{e:#}");
    for p in proxies {
        let log = p.process.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["TLS", "bundle", "certificate", "WARN"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .collect();
        text.push_str(&format!(
            "\n---- last lines of a proxy's log:\n{}",
            lines[lines.len().saturating_sub(10)..].join("\n")
        ));
    }
    anyhow::anyhow!(text)
}

/// One opaque TCP round trip on a new connection (a new mTLS handshake between the proxies).
async fn echo(raw: SocketAddr, n: u64) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut conn = tokio::net::TcpStream::connect(raw).await?;
        let sent = format!("ping {n}");
        conn.write_all(sent.as_bytes()).await?;
        conn.shutdown().await?;
        let mut back = Vec::new();
        conn.read_to_end(&mut back).await?;
        anyhow::ensure!(
            back == sent.as_bytes(),
            "echoed {:?}",
            String::from_utf8_lossy(&back)
        );
        Ok(())
    })
    .await
    .context("no echo within 10 s")?
}

#[tokio::test]
async fn anchor_and_issuer_rotation_under_load_fail_no_request() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ca = tempfile::tempdir()?;
    ferrule(&["identity", "init", "--dir"], &[ca.path()]).await?;
    let controller = Controller::start_with(
        &etcd.url(),
        ANY_PORT.parse()?,
        &[
            "--identity-dir",
            ca.path().to_str().context("utf-8")?,
            "--identity-check-interval",
            "200ms",
            "--identity-leaf-lifetime",
            "8s",
        ],
    )
    .await?;

    let web = HttpBackend::start("web-1").await?;
    let tcp = TcpEcho::start().await?;
    let server = |service: &'static str, app: SocketAddr, extra: Vec<String>| {
        let controller = &controller;
        async move {
            let proxy = Proxy::builder(&format!("{service}-proxy"))
                .args(controller.proxy_args())
                .args(["--service", service, "--app-addr", &app.to_string()])
                .args(["--register-ttl", "3s", "--health-interval", "200ms"])
                .args([
                    "--require-mtls",
                    "--identity-token",
                    &token(controller, service).await?,
                ])
                .args(extra)
                .start()
                .await?;
            proxy.wait_ready(Duration::from_secs(15)).await?;
            anyhow::Ok(proxy)
        }
    };
    let web_proxy = server("web", web.addr, vec![]).await?;
    let raw_proxy = server(
        "raw",
        tcp.addr,
        vec!["--opaque-ports".into(), tcp.addr.port().to_string()],
    )
    .await?;
    let client = Proxy::builder("client-proxy")
        .args(controller.proxy_args())
        .args(["--endpoint-wait", "5s", "--service-account", "client"])
        .args(["--identity-token", &token(&controller, "client").await?])
        .upstream("web")
        .upstream("raw")
        .start()
        .await?;
    client.wait_ready(Duration::from_secs(15)).await?;
    let (web_up, raw_up) = (client.upstream("web")?, client.upstream("raw")?);
    // Both services reachable before the load starts counting.
    eventually(Duration::from_secs(15), "web and raw reachable", || async {
        let http = http1(web_up, ferrule_harness::get("web", "/warm"))
            .await
            .ok()?;
        (http.status == 200 && echo(raw_up, 0).await.is_ok()).then_some(())
    })
    .await?;
    let proxies = [&web_proxy, &raw_proxy, &client];

    let mut identity = IdentityClient::new(controller.channel().await?);
    let mut bundles = identity
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await?
        .into_inner();
    assert_eq!(next_bundle(&mut bundles).await?.trust_anchors_der.len(), 1);
    let first_issuer = identity
        .status(IdentityStatusRequest {})
        .await?
        .into_inner()
        .issuer
        .context("issuer")?
        .fingerprint;

    let load = Load::start(web_up, raw_up);
    renewals(&proxies, 1.0, "a renewal under load before any change").await?;

    // (a) Trust anchor rotation.
    // 1. A new anchor and an issuer it signed.
    let next = tempfile::tempdir()?;
    ferrule(&["identity", "init", "--dir"], &[next.path()]).await?;
    // 2. Both anchors in the bundle; every proxy trusts both (the stream delivers it, and a
    //    renewal of each keeps it).
    let old_anchor = std::fs::read_to_string(ca.path().join("trust-anchors.pem"))?;
    let new_anchor = std::fs::read_to_string(next.path().join("trust-anchors.pem"))?;
    std::fs::write(
        ca.path().join("trust-anchors.pem"),
        format!("{old_anchor}{new_anchor}"),
    )?;
    assert_eq!(next_bundle(&mut bundles).await?.trust_anchors_der.len(), 2);
    renewals(&proxies, 1.0, "renewals after the second anchor").await?;
    load.check("the second anchor")
        .map_err(|e| with_logs(e, &proxies))?;
    // 3. The new anchor's issuer signs from now on.
    install_issuer(next.path(), ca.path())?;
    let second_issuer = issuer_replaced(&controller, &first_issuer).await?;
    // 4. Every proxy renews onto it.
    renewals(&proxies, 2.0, "renewals from the new anchor's issuer").await?;
    load.check("the new issuer")
        .map_err(|e| with_logs(e, &proxies))?;
    // 5. The old anchor goes.
    std::fs::write(ca.path().join("trust-anchors.pem"), &new_anchor)?;
    assert_eq!(next_bundle(&mut bundles).await?.trust_anchors_der.len(), 1);
    renewals(&proxies, 1.0, "renewals after the old anchor was removed").await?;
    let after_anchor = load
        .check("the old anchor's removal")
        .map_err(|e| with_logs(e, &proxies))?;

    // (b) Issuer rotation: a new issuer from the (new) anchor.
    let issuer_dir = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new(binary("ferrule")?);
    cmd.args(["identity", "issuer", "--anchor-dir"])
        .arg(next.path())
        .arg("--out-dir")
        .arg(issuer_dir.path());
    let out = output(cmd).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    install_issuer(issuer_dir.path(), ca.path())?;
    issuer_replaced(&controller, &second_issuer).await?;
    renewals(&proxies, 2.0, "renewals from the replaced issuer").await?;

    let total = load.finish().await.map_err(|e| with_logs(e, &proxies))?;
    assert!(
        after_anchor > 20 && total > after_anchor,
        "too little traffic to prove anything: {after_anchor}, then {total}"
    );
    // The bundle in use is the new anchor alone: a leaf of the first anchor would be refused.
    let status = identity
        .status(IdentityStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.trust_anchors.len(), 1);
    Ok(())
}
