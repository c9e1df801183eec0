//! A stand-in Kubernetes API server for TokenReview, the one thing of Kubernetes the controller
//! calls and that cannot run here.
//!
//! It speaks the real wire format over real HTTPS (rustls, a CA of its own whose certificate
//! [`KubeApi::ca_file`] holds, as a pod's `ca.crt`): `POST
//! /apis/authentication.k8s.io/v1/tokenreviews` with a bearer token, answered as the API
//! server answers. The caller's bearer token must be the controller's ([`KubeApi::token_file`];
//! another gets 401 and a `Status` body); the body must be an `authentication.k8s.io/v1`
//! `TokenReview` (else 400). A review of a token [`KubeApi::issue`]d for one of the audiences
//! asked for is `201` with `status.authenticated: true`, the service account's
//! `system:serviceaccount:NS:SA` and the audiences; any other token, or one of another audience,
//! is `201` with `status.error` as the API server words it. [`KubeApi::stall`] makes it accept
//! and never answer (a hung API server).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A projected token the stand-in knows.
#[derive(Clone)]
struct Issued {
    namespace: String,
    service_account: String,
    audiences: Vec<String>,
}

#[derive(Default)]
struct State {
    tokens: Mutex<HashMap<String, Issued>>,
    /// Every TokenReview body received, in order.
    reviews: Mutex<Vec<Value>>,
    stalled: AtomicBool,
    serial: AtomicU64,
}

/// The running stand-in; stops when dropped.
pub struct KubeApi {
    pub addr: SocketAddr,
    state: Arc<State>,
    controller_token: String,
    dir: tempfile::TempDir,
    task: JoinHandle<()>,
}

impl KubeApi {
    /// Starts it on a port of loopback, with a new CA and serving certificate for 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferrule-kube-").tempdir()?;
        let (ca_pem, cert_pem, key_pem) = serving_certificate()?;
        std::fs::write(dir.path().join("ca.crt"), &ca_pem)?;
        let controller_token = jwt_shaped("controller", 0);
        std::fs::write(dir.path().join("token"), format!("{controller_token}\n"))?;
        let tls = server_tls(&cert_pem, &key_pem)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let (s, expected) = (state.clone(), controller_token.clone());
        let task = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            while let Ok((tcp, _)) = listener.accept().await {
                let (s, expected, acceptor) = (s.clone(), expected.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| handle(req, s.clone(), expected.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            controller_token,
            dir,
            task,
        })
    }

    /// `https://127.0.0.1:PORT`, the controller's `--kubernetes-api`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA bundle the serving certificate chains to (`--kubernetes-ca-file`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The controller's own service-account token (`--kubernetes-token-file`).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// The controller flags that point it here.
    pub fn controller_args(&self) -> Vec<String> {
        vec![
            "--kubernetes-api".into(),
            self.url(),
            "--kubernetes-token-file".into(),
            self.token_file().display().to_string(),
            "--kubernetes-ca-file".into(),
            self.ca_file().display().to_string(),
        ]
    }

    /// A projected token of service account `namespace/service_account` for `audiences`, as
    /// the kubelet would mount it.
    pub fn issue(&self, namespace: &str, service_account: &str, audiences: &[&str]) -> String {
        let n = self.state.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let token = jwt_shaped(&format!("{namespace}:{service_account}"), n);
        self.state.tokens.lock().expect("not poisoned").insert(
            token.clone(),
            Issued {
                namespace: namespace.into(),
                service_account: service_account.into(),
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
            },
        );
        token
    }

    /// The token stops being valid (its pod was deleted).
    pub fn revoke(&self, token: &str) {
        self.state
            .tokens
            .lock()
            .expect("not poisoned")
            .remove(token);
    }

    /// Every TokenReview received so far.
    pub fn reviews(&self) -> Vec<Value> {
        self.state.reviews.lock().expect("not poisoned").clone()
    }

    /// From now on, connections are accepted and requests never answered.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::Relaxed);
    }

    /// The controller's token, for a test that checks what a wrong one gets.
    pub fn controller_token(&self) -> &str {
        &self.controller_token
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A token with a JWT's shape (three base64url parts); only the stand-in knows what it means.
fn jwt_shaped(subject: &str, n: u64) -> String {
    let hex = |s: &[u8]| s.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "eyJhbGciOiJSUzI1NiIsImtpZCI6InN0YW5kLWluIn0.{}.{}",
        hex(format!("{subject}/{n}").as_bytes()),
        hex(format!("{nanos}/{n}").as_bytes())
    )
}

fn serving_certificate() -> anyhow::Result<(String, String, String)> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "stand-in-kubernetes-ca");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let mut params = rcgen::CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "kubernetes.default.svc".to_string(),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

fn server_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A Kubernetes `Status` answer.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    controller_token: String,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    if state.stalled.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    if req.method() != http::Method::POST
        || req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        return Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(controller_token.as_str()) {
        return Ok(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    let json_body = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = req.into_body().collect().await?.to_bytes();
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) if json_body => v,
        _ => {
            return Ok(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body of the request was in an unknown format",
            ));
        }
    };
    state
        .reviews
        .lock()
        .expect("not poisoned")
        .push(review.clone());
    if review["apiVersion"] != "authentication.k8s.io/v1" || review["kind"] != "TokenReview" {
        return Ok(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the object is no authentication.k8s.io/v1 TokenReview",
        ));
    }
    let Some(token) = review["spec"]["token"].as_str() else {
        return Ok(status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "TokenReview.authentication.k8s.io is invalid: spec.token: Required value",
        ));
    };
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let issued = state
        .tokens
        .lock()
        .expect("not poisoned")
        .get(token)
        .cloned();
    let status_field = match issued {
        None => json!({
            "user": {},
            "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive, token lookup failed]",
        }),
        // No audiences asked for: the API server's own audience, which projected tokens for
        // `ferrule` do not have.
        Some(t) if !asked.iter().any(|a| t.audiences.contains(a)) => json!({
            "user": {},
            "error": format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                t.audiences, asked
            ),
        }),
        Some(t) => json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
                "uid": format!("uid-{}-{}", t.namespace, t.service_account),
                "groups": [
                    "system:serviceaccounts",
                    format!("system:serviceaccounts:{}", t.namespace),
                    "system:authenticated",
                ],
                "extra": { "authentication.kubernetes.io/pod-name": ["pod-1"] },
            },
            "audiences": asked.iter().filter(|a| t.audiences.contains(a)).collect::<Vec<_>>(),
        }),
    };
    let mut answer = review;
    answer["metadata"] = json!({ "creationTimestamp": null });
    answer["status"] = status_field;
    Ok(Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .expect("valid response"))
}
