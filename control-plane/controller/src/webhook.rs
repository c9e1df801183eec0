//! The injection webhook: `POST /inject` over HTTPS, an AdmissionReview v1 in and out.
//!
//! The API server only calls webhooks over TLS, so this listener is HTTPS (rustls, with the
//! certificate and key the `ferrule-webhook-tls` Secret mounts; the
//! MutatingWebhookConfiguration's `caBundle` must hold its CA). What each request gets is
//! decided by [`ferrule_inject::review`]; this module only carries it: a body that is no
//! AdmissionReview is answered 400 with the reason, any other path 404, and `GET /live` 200
//! for probes. It runs in the controller binary beside the gRPC and admin listeners
//! (`--webhook-addr`), sharing nothing with them but the shutdown signal.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use ferrule_inject::Injector;
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

/// Serves the webhook on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    injector: Arc<Injector>,
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
        let injector = injector.clone();
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
            let service = service_fn(move |req| handle(req, injector.clone()));
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
    injector: Arc<Injector>,
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
}
