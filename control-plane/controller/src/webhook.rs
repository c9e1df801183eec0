//! The injection webhook: `POST /inject` over HTTPS, an AdmissionReview v1 in and out.
//!
//! The API server only calls webhooks over TLS, so this listener is HTTPS (rustls, with the
//! certificate and key the `ferrule-webhook-tls` Secret mounts; the
//! MutatingWebhookConfiguration's `caBundle` must hold its CA). What each request gets is
//! decided by [`ferrule_inject::review`]; this module only carries it: a body that is no
//! AdmissionReview is answered 400 with the reason, any other path 404, and `GET /live` 200
//! for probes. It runs in the controller binary beside the gRPC and admin listeners
//! (`--webhook-addr`), sharing nothing with them but the shutdown signal and the mesh CA's
//! trust bundle file: [`Injectors`] reads the controller's `trust-anchors.pem` again for each
//! review, so a pod gets the bundle that is current when it is created, as PEM text for its
//! proxy to verify the controller with.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use ferrule_inject::{InjectConfig, Injector};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The API server sends objects of at most 3 MiB; anything larger is not a review.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server TLS config from PEM files: the certificate chain and its private key.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the webhook certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the webhook certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "the webhook certificate {} holds no PEM CERTIFICATE block",
            cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the webhook key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the webhook key does not match its certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The injector each review is answered with: `config` with the trust anchors of the
/// controller's bundle file as it is when the review comes.
#[derive(Debug)]
pub struct Injectors {
    config: InjectConfig,
    /// The mesh CA's `trust-anchors.pem` (none: a controller that is no CA).
    anchors: Option<PathBuf>,
    /// The last injector made, and the file text it was made from.
    current: Mutex<(String, Arc<Injector>)>,
}

impl Injectors {
    /// Reads `anchors` now: a file that gives proxies no anchors is an error here, at start,
    /// rather than pods that cannot verify the controller later.
    pub fn new(config: InjectConfig, anchors: Option<PathBuf>) -> anyhow::Result<Self> {
        let (text, injector) = match &anchors {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "reading the trust anchors for injected proxies {}",
                        path.display()
                    )
                })?;
                let injector = with_anchors(&config, &text).with_context(|| {
                    format!("the trust anchors for injected proxies {}", path.display())
                })?;
                (text, injector)
            }
            None => (String::new(), Injector::new(config.clone())),
        };
        Ok(Self {
            config,
            anchors,
            current: Mutex::new((text, Arc::new(injector))),
        })
    }

    /// The injector for the next review: the bundle file again, when it changed. A file that
    /// cannot be read or holds no certificate now (a Secret being replaced) keeps the last
    /// good anchors, with a warning.
    pub async fn current(&self) -> Arc<Injector> {
        let Some(path) = &self.anchors else {
            return self.current.lock().expect("not poisoned").1.clone();
        };
        let text = tokio::fs::read_to_string(path).await;
        let mut current = self.current.lock().expect("not poisoned");
        match text {
            Ok(text) if text == current.0 => {}
            Ok(text) => match with_anchors(&self.config, &text) {
                Ok(injector) => {
                    tracing::info!(file = %path.display(), "injected proxies get the changed trust anchors");
                    *current = (text, Arc::new(injector));
                }
                Err(error) => tracing::warn!(
                    file = %path.display(), %error,
                    "the trust anchors file is unusable; injecting the last good anchors"
                ),
            },
            Err(error) => tracing::warn!(
                file = %path.display(), %error,
                "reading the trust anchors failed; injecting the last good anchors"
            ),
        }
        current.1.clone()
    }
}

/// `config` with the `CERTIFICATE` blocks of `text` as the proxies' trust anchors.
fn with_anchors(config: &InjectConfig, text: &str) -> anyhow::Result<Injector> {
    let pem = ferrule_inject::anchors::certificates_pem(text)?;
    Ok(Injector::new(InjectConfig {
        trust_anchors_pem: Some(pem),
        ..config.clone()
    }))
}

/// Serves the webhook on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    injectors: Arc<Injectors>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    tracing::info!(addr = %listener.local_addr()?, "injection webhook serving");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let injectors = injectors.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |req| handle(req, injectors.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "webhook connection error");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    injectors: Arc<Injectors>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let respond = |status: StatusCode, content_type: &'static str, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    let text =
        |status, body: String| respond(status, "text/plain; charset=utf-8", body.into_bytes());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => return Ok(text(StatusCode::OK, "live\n".into())),
        (&Method::POST, "/inject") => {}
        (_, "/inject") => return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into())),
        (_, path) => {
            return Ok(text(
                StatusCode::NOT_FOUND,
                format!("no such path {path:?}: the injection webhook is POST /inject\n"),
            ));
        }
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("malformed AdmissionReview: reading the body failed: {e}\n"),
            ));
        }
    };
    let injector = injectors.current().await;
    Ok(match ferrule_inject::review::review(&injector, &body) {
        Ok(answer) => {
            if let Some(message) = answer.pointer("/response/status/message") {
                tracing::warn!(%message, "pod refused by the injector");
            }
            respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&answer).expect("a JSON value serializes"),
            )
        }
        Err(bad) => {
            tracing::warn!(error = %bad, "malformed admission request");
            text(StatusCode::BAD_REQUEST, format!("{bad}\n"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_certificate_files_are_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = write("tls.crt", &one.cert.pem());
        let key = write("tls.key", &one.signing_key.serialize_pem());
        let wrong_key = write("other.key", &other.signing_key.serialize_pem());
        let empty = write("empty.crt", "");
        let missing = dir.path().join("missing.crt");

        assert!(tls_config(&cert, &key).is_ok());
        let err = |c: &Path, k: &Path| format!("{:#}", tls_config(c, k).unwrap_err());
        let e = err(&empty, &key);
        assert!(
            e.contains("empty.crt") && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );
        let e = err(&missing, &key);
        assert!(e.contains("missing.crt"), "{e}");
        let e = err(&cert, &empty);
        assert!(e.contains("webhook key") && e.contains("empty.crt"), "{e}");
        let e = err(&cert, &wrong_key);
        assert!(e.contains("does not match"), "{e}");
    }

    fn anchors_env(injector: &Injector) -> Option<String> {
        let pod = serde_json::json!({
            "metadata": { "name": "p" },
            "spec": { "containers": [{ "name": "app", "image": "app" }] },
        });
        let ferrule_inject::Outcome::Inject { patch, .. } = injector.plan(&pod).unwrap() else {
            panic!("not injected");
        };
        let ops = serde_json::to_value(&patch).unwrap();
        let init = ops
            .as_array()
            .unwrap()
            .iter()
            .find(|op| op["path"] == "/spec/initContainers")
            .unwrap();
        init["value"][1]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == ferrule_inject::pod::TRUST_ANCHORS_ENV)
            .map(|e| e["value"].as_str().unwrap().to_string())
    }

    /// Each review gets the bundle file as it is then; an unusable file keeps the last good
    /// anchors, and one that is unusable at start is an error naming it.
    #[tokio::test]
    async fn injected_anchors_follow_the_bundle_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust-anchors.pem");
        let pem = |n: u8| {
            rcgen::generate_simple_self_signed(vec![format!("anchor{n}.test")])
                .unwrap()
                .cert
                .pem()
                .replace("\r\n", "\n")
        };
        let (one, two) = (pem(1), pem(2));
        std::fs::write(&path, &one).unwrap();
        let injectors = Injectors::new(InjectConfig::default(), Some(path.clone())).unwrap();
        assert_eq!(
            anchors_env(&*injectors.current().await).as_deref(),
            Some(one.as_str())
        );

        let both = format!("{one}{two}");
        std::fs::write(&path, &both).unwrap();
        assert_eq!(
            anchors_env(&*injectors.current().await).as_deref(),
            Some(both.as_str())
        );

        std::fs::write(&path, "being replaced").unwrap();
        assert_eq!(
            anchors_env(&*injectors.current().await).as_deref(),
            Some(both.as_str())
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            anchors_env(&*injectors.current().await).as_deref(),
            Some(both.as_str())
        );

        let err = format!(
            "{:#}",
            Injectors::new(InjectConfig::default(), Some(path.clone())).unwrap_err()
        );
        assert!(err.contains("trust-anchors.pem"), "{err}");
        std::fs::write(&path, "no certificate").unwrap();
        let err = format!(
            "{:#}",
            Injectors::new(InjectConfig::default(), Some(path)).unwrap_err()
        );
        assert!(
            err.contains("trust-anchors.pem") && err.contains("no PEM CERTIFICATE"),
            "{err}"
        );

        let none = Injectors::new(InjectConfig::default(), None).unwrap();
        assert_eq!(anchors_env(&*none.current().await), None);
    }
}
