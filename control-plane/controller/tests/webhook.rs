//! The injection webhook for real: the `ferrule-controller` binary serving `--webhook-addr`
//! over HTTPS with a certificate made for the test, asked with real AdmissionReview bodies over
//! a TLS connection that verifies that certificate.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use ferrule_harness::{ANY_PORT, Process, binary};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

/// How long one request may take before the test fails.
const BOUND: Duration = Duration::from_secs(10);

#[derive(serde::Deserialize)]
struct Listeners {
    webhook: SocketAddr,
}

struct Webhook {
    _process: Process,
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    _dir: tempfile::TempDir,
}

async fn start() -> anyhow::Result<Webhook> {
    let dir = tempfile::Builder::new()
        .prefix("ferrule-webhook-")
        .tempdir()?;
    start_in(dir, &[]).await
}

/// The controller with its webhook, its files in `dir`, with `extra` flags.
async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> anyhow::Result<Webhook> {
    let certified = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "ferrule-webhook.ferrule-system.svc".to_string(),
    ])?;
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, certified.cert.pem())?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;

    let mut cmd = Command::new(binary("ferrule-controller")?);
    cmd.args([
        "--store",
        "memory",
        "--grpc-addr",
        ANY_PORT,
        "--admin-addr",
        ANY_PORT,
    ])
    .args(["--webhook-addr", ANY_PORT])
    .arg("--webhook-cert")
    .arg(&cert)
    .arg("--webhook-key")
    .arg(&key)
    .args(["--proxy-image", "ferrule/proxy:webhook-test"])
    .args(extra)
    .env("RUST_LOG", "info");
    let mut process = Process::spawn(
        "ferrule-controller",
        cmd,
        &dir.path().join("controller.log"),
    )?;
    let listeners: Listeners = process
        .ready("ferrule-controller", Duration::from_secs(20))
        .await?;
    Ok(Webhook {
        _process: process,
        addr: listeners.webhook,
        ca: certified.cert.der().clone(),
        _dir: dir,
    })
}

impl Webhook {
    /// One HTTPS request over a fresh connection that checks the server's certificate.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(self.addr).await?;
            let tls = connector
                .connect(ServerName::try_from("localhost")?, tcp)
                .await
                .context("TLS handshake with the webhook")?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes().to_vec();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(BOUND, exchange)
            .await
            .context("the webhook did not answer in time")?
    }

    async fn review(&self, body: &Value) -> anyhow::Result<Value> {
        let (status, answer) = self
            .request("POST", "/inject", body.to_string().into_bytes())
            .await?;
        anyhow::ensure!(
            status == 200,
            "status {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(serde_json::from_slice(&answer)?)
    }
}

/// A pod as the ReplicaSet controller creates it for the shop's `user` Deployment.
fn user_review(annotations: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3f8e4b2a-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a1b2c3d4",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": "user-7d9f8c6b5-",
                    "namespace": "shop",
                    "labels": { "app.kubernetes.io/name": "user", "pod-template-hash": "7d9f8c6b5" },
                    "annotations": annotations,
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "user-7d9f8c6b5",
                        "uid": "e5f6a7b8", "controller": true, "blockOwnerDeletion": true
                    }]
                },
                "spec": {
                    "serviceAccountName": "user",
                    "containers": [{
                        "name": "user",
                        "image": "ferrule/shop-user:0.1.0",
                        "ports": [
                            { "name": "http", "containerPort": 8001, "protocol": "TCP" },
                            { "name": "grpc", "containerPort": 50051, "protocol": "TCP" }
                        ],
                        "readinessProbe": { "httpGet": { "path": "/health", "port": "http" } },
                        "terminationMessagePath": "/dev/termination-log",
                        "imagePullPolicy": "IfNotPresent"
                    }],
                    "restartPolicy": "Always",
                    "dnsPolicy": "ClusterFirst"
                }
            },
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" }
        }
    })
}

#[tokio::test]
async fn the_webhook_injects_over_https() -> anyhow::Result<()> {
    let webhook = start().await?;
    let review = user_review(json!({}));
    let answer = webhook.review(&review).await?;
    let response = &answer["response"];
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true, "{answer}");
    assert_eq!(response["patchType"], "JSONPatch");

    let patch = ferrule_inject::review::decode_patch(&answer).context("the patch decodes")?;
    let mut pod = review["request"]["object"].clone();
    json_patch_apply(&mut pod, patch)?;
    let init = pod["spec"]["initContainers"]
        .as_array()
        .context("initContainers")?;
    assert_eq!(init[0]["name"], "ferrule-init");
    assert_eq!(init[1]["name"], "ferrule-proxy");
    assert_eq!(init[1]["restartPolicy"], "Always");
    assert_eq!(
        init[1]["image"], "ferrule/proxy:webhook-test",
        "the flag reaches the patch"
    );
    assert_eq!(init[1]["startupProbe"]["httpGet"]["path"], "/ready");
    let env = init[1]["env"].to_string();
    assert!(
        env.contains("http=127.0.0.1:8001,grpc=127.0.0.1:50051"),
        "{env}"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["ferrule.io/proxy-version"],
        env!("CARGO_PKG_VERSION")
    );
    Ok(())
}

fn json_patch_apply(pod: &mut Value, patch: impl serde::Serialize) -> anyhow::Result<()> {
    // The controller's test sees the patch only as JSON: apply it with the inject crate's
    // own manifest path would hide a wire-format mistake, so apply it by hand here.
    let ops: Vec<Value> = serde_json::from_value(serde_json::to_value(patch)?)?;
    for op in ops {
        anyhow::ensure!(op["op"] == "add", "only add operations are expected: {op}");
        let path = op["path"].as_str().context("path")?;
        let (parent, last) = path.rsplit_once('/').context("pointer")?;
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = pod
            .pointer_mut(parent)
            .with_context(|| format!("{parent} exists"))?;
        match target {
            Value::Object(map) => {
                map.insert(last, op["value"].clone());
            }
            Value::Array(list) if last == "-" => list.push(op["value"].clone()),
            Value::Array(list) => list.insert(last.parse()?, op["value"].clone()),
            other => anyhow::bail!("cannot add under {other}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_clear_answers_over_https() -> anyhow::Result<()> {
    let webhook = start().await?;

    // Not an AdmissionReview at all: 400 naming the problem.
    let (status, body) = webhook
        .request("POST", "/inject", b"{\"kind\":".to_vec())
        .await?;
    let body = String::from_utf8(body)?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("malformed AdmissionReview") && body.contains("not JSON"),
        "{body}"
    );

    // An unknown annotation value: denied, naming the annotation and the value.
    let answer = webhook
        .review(&user_review(json!({ "ferrule.io/inject": "on" })))
        .await?;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("ferrule.io/inject") && message.contains("\"on\""),
        "{message}"
    );

    // Conflicting annotations: denied, naming both.
    let answer = webhook
        .review(&user_review(json!({
            "ferrule.io/skip-inbound-ports": "8001",
            "ferrule.io/opaque-ports": "8001",
        })))
        .await?;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("ferrule.io/skip-inbound-ports")
            && message.contains("ferrule.io/opaque-ports"),
        "{message}"
    );

    // Opted out: allowed, untouched.
    let answer = webhook
        .review(&user_review(json!({ "ferrule.io/inject": "disabled" })))
        .await?;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");

    // Other paths and methods.
    let (status, _) = webhook.request("GET", "/inject", Vec::new()).await?;
    assert_eq!(status, 405);
    let (status, _) = webhook.request("GET", "/live", Vec::new()).await?;
    assert_eq!(status, 200);
    let (status, _) = webhook.request("POST", "/mutate", Vec::new()).await?;
    assert_eq!(status, 404);
    Ok(())
}

/// The proxy container's value of `name` in the pod `answer`'s patch makes of [`user_review`].
fn proxy_env(review: &Value, answer: &Value, name: &str) -> anyhow::Result<Option<String>> {
    let patch = ferrule_inject::review::decode_patch(answer).context("the patch decodes")?;
    let mut pod = review["request"]["object"].clone();
    json_patch_apply(&mut pod, patch)?;
    Ok(pod["spec"]["initContainers"][1]["env"]
        .as_array()
        .context("the proxy's env")?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .map(str::to_string))
}

/// With a mesh CA, injected proxies get the CA's trust bundle as it is when their pod is
/// created: after an anchor is added to the bundle file (a rotation's first step), the next
/// pod gets both.
#[tokio::test]
async fn injected_proxies_get_the_current_trust_anchors() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ferrule-webhook-")
        .tempdir()?;
    let (ca, next) = (dir.path().join("mesh-ca"), dir.path().join("next-ca"));
    ferrule_harness::identity_mesh::init_ca(&ca).await?;
    ferrule_harness::identity_mesh::init_ca(&next).await?;
    let anchors = ca.join("trust-anchors.pem");
    let first = std::fs::read_to_string(&anchors)?;
    let ca_arg = ca.display().to_string();
    let webhook = start_in(dir, &["--identity-dir", &ca_arg]).await?;

    let review = user_review(json!({}));
    let answer = webhook.review(&review).await?;
    let env = proxy_env(&review, &answer, ferrule_inject::pod::TRUST_ANCHORS_ENV)?;
    assert_eq!(
        env,
        Some(ferrule_inject::anchors::certificates_pem(&first)?),
        "{answer}"
    );

    let added = format!(
        "{first}{}",
        std::fs::read_to_string(next.join("trust-anchors.pem"))?
    );
    std::fs::write(&anchors, &added)?;
    let answer = webhook.review(&review).await?;
    let env = proxy_env(&review, &answer, ferrule_inject::pod::TRUST_ANCHORS_ENV)?
        .context("anchors after the change")?;
    assert_eq!(env, ferrule_inject::anchors::certificates_pem(&added)?);
    assert_eq!(env.matches("BEGIN CERTIFICATE").count(), 2, "{env}");
    Ok(())
}
