//! Kubernetes service-account tokens as bootstrap credentials, checked with a TokenReview.
//!
//! In a cluster an injected proxy proves who it is with a projected service-account token
//! (audience `ferrule` by default, mounted by injection). The CA cannot verify such a token
//! itself: only the API server knows its signing keys and whether the pod still exists. So
//! [`TokenReviewer::review`] asks it: `POST /apis/authentication.k8s.io/v1/tokenreviews`
//! with the token and the audience the controller expects, authenticated by the controller's
//! own service-account token and over TLS verified with the cluster's CA (both read from the
//! in-cluster paths unless flags say otherwise). An authenticated review names the pod's
//! service account as `system:serviceaccount:<namespace>:<name>`, and that is the identity
//! the certificate gets.
//!
//! Outcomes map to gRPC codes by whose fault they are: a token the API server refuses (or one
//! that is not a JWT at all, which is never sent) is the caller's, UNAUTHENTICATED with the
//! API server's reason; an API server that cannot be reached, times out, or refuses the
//! controller itself is not, UNAVAILABLE, so the proxy retries. Every review is bounded by
//! `timeout`. The audience is never dropped from a review (Linkerd retries without it when
//! the API server complains; that would accept tokens minted for anything else).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use serde_json::json;

/// Where a pod finds its service account's token and the cluster's CA.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The audience injected proxies' tokens are minted for.
pub const DEFAULT_AUDIENCE: &str = ferrule_inject::pod::DEFAULT_TOKEN_AUDIENCE;
/// The API path of TokenReview.
pub const TOKENREVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// A service-account token is a JWT of about a kilobyte; anything far larger is not one.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The most of an API server's answer that is read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The controller's TokenReview flags (off unless `--kubernetes-api` is given).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenReviewArgs {
    /// The Kubernetes API server that checks proxies' service-account tokens (TokenReview),
    /// e.g. https://kubernetes.default.svc. Without it only join tokens are accepted. Needs
    /// --identity-dir.
    #[arg(long, env = "FERRULE_KUBERNETES_API", value_name = "URL")]
    pub kubernetes_api: Option<String>,

    /// The controller's own token for the API server (re-read for every review: the kubelet
    /// rotates it).
    #[arg(long, env = "FERRULE_KUBERNETES_TOKEN_FILE", default_value = IN_CLUSTER_TOKEN, value_name = "PATH")]
    pub kubernetes_token_file: PathBuf,

    /// The PEM CA bundle the API server's certificate must chain to.
    #[arg(long, env = "FERRULE_KUBERNETES_CA_FILE", default_value = IN_CLUSTER_CA, value_name = "PATH")]
    pub kubernetes_ca_file: PathBuf,

    /// The audience proxies' tokens must be minted for (the projected token's `audience`).
    #[arg(long, env = "FERRULE_TOKEN_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub token_audience: String,

    /// How long one review may take before the proxy is told to retry (UNAVAILABLE).
    #[arg(long, env = "FERRULE_KUBERNETES_API_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kubernetes_api_timeout: Duration,
}

impl TokenReviewArgs {
    /// The reviewer's configuration, when `--kubernetes-api` is given.
    pub fn config(&self) -> Option<TokenReviewConfig> {
        self.kubernetes_api.as_ref().map(|api| TokenReviewConfig {
            api: api.clone(),
            token_file: self.kubernetes_token_file.clone(),
            ca_file: self.kubernetes_ca_file.clone(),
            audience: self.token_audience.clone(),
            timeout: self.kubernetes_api_timeout,
        })
    }
}

/// Where the API server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// `https://host[:port]`.
    pub api: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub audience: String,
    pub timeout: Duration,
}

/// A service account the API server vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

/// Why a token proves nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The token is refused: the caller's fault (UNAUTHENTICATED).
    #[error("{0}")]
    Refused(String),
    /// No verdict: the API server is unreachable, slow, or refuses the controller
    /// (UNAVAILABLE: the proxy retries).
    #[error("{0}")]
    Unavailable(String),
}

/// Checks tokens with the API server.
pub struct TokenReviewer {
    config: TokenReviewConfig,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Checks the configuration: an `https` URL and a CA file that holds certificates (the
    /// controller refuses to start otherwise). The controller's token is read per review.
    pub fn new(config: TokenReviewConfig) -> Result<Self, String> {
        let uri: http::Uri = config
            .api
            .parse()
            .map_err(|e| format!("--kubernetes-api {:?}: {e}", config.api))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "--kubernetes-api {:?}: must be an https:// URL (the token travels in it)",
                config.api
            ));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!(
                "--kubernetes-api {:?}: give the server only, without a path",
                config.api
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("--kubernetes-api {:?}: no host", config.api))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| format!("--kubernetes-api {:?}: {e}", config.api))?;
        let tls = client_tls(&config.ca_file)?;
        Ok(Self {
            config,
            host,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(tls),
        })
    }

    pub fn audience(&self) -> &str {
        &self.config.audience
    }

    /// The service account `token` belongs to, as the API server says.
    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        check_shape(token)?;
        let body = review_request(token, &self.config.audience);
        let (status, answer) = tokio::time::timeout(self.config.timeout, self.post(body))
            .await
            .map_err(|_| {
                ReviewError::Unavailable(format!(
                    "the Kubernetes API server {} did not answer the TokenReview within {:?}",
                    self.config.api, self.config.timeout
                ))
            })??;
        match status {
            200 | 201 => verdict(&answer, &self.config.audience),
            401 | 403 => Err(ReviewError::Unavailable(format!(
                "the Kubernetes API server refused the controller's TokenReview ({status}: {}); \
                 the controller's service account needs `create` on tokenreviews \
                 (k8s/base/rbac.yaml)",
                api_message(&answer)
            ))),
            _ => Err(ReviewError::Unavailable(format!(
                "the Kubernetes API server answered the TokenReview with {status}: {}",
                api_message(&answer)
            ))),
        }
    }

    /// One POST on a new connection: (status, body).
    async fn post(&self, body: Vec<u8>) -> Result<(u16, Vec<u8>), ReviewError> {
        let api = &self.config.api;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            ReviewError::Unavailable(format!("the Kubernetes API server {api}: {what}: {e}"))
        };
        let own_token = std::fs::read_to_string(&self.config.token_file).map_err(|e| {
            ReviewError::Unavailable(format!(
                "reading the controller's own token {}: {e}",
                self.config.token_file.display()
            ))
        })?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unavailable("connecting", &e))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| unavailable("TLS", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unavailable("HTTP", &e))?;
        tokio::spawn(conn);
        let authority = if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = http::Request::post(TOKENREVIEW_PATH)
            .header(http::header::HOST, authority)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", own_token.trim()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable("building the request", &e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unavailable("sending the TokenReview", &e))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| unavailable("reading the answer", &e))?
            .to_bytes();
        Ok((status, body.to_vec()))
    }
}

fn client_tls(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("--kubernetes-ca-file {}: {e}", ca_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--kubernetes-ca-file {}: {e}", ca_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--kubernetes-ca-file {}: holds no PEM certificate",
            ca_file.display()
        ));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("--kubernetes-ca-file {}: {e}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A service-account token is a JWT: three base64url parts joined by dots. Anything else is
/// refused here, without bothering the API server.
fn check_shape(token: &str) -> Result<(), ReviewError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(ReviewError::Refused(format!(
            "the token is {} bytes, more than a Kubernetes service-account token ({MAX_TOKEN_BYTES})",
            token.len()
        )));
    }
    let base64url = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || !parts.iter().all(|p| base64url(p)) {
        return Err(ReviewError::Refused(
            "the token is neither a join token nor a Kubernetes service-account token (a JWT)"
                .into(),
        ));
    }
    Ok(())
}

/// The TokenReview the controller creates.
fn review_request(token: &str, audience: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": { "token": token, "audiences": [audience] },
    }))
    .expect("a JSON value serializes")
}

#[derive(Deserialize)]
struct Review {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Deserialize, Default)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: User,
    #[serde(default)]
    audiences: Option<Vec<String>>,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize, Default)]
struct User {
    #[serde(default)]
    username: String,
}

/// Reads the API server's verdict on a review created with `audience`.
fn verdict(body: &[u8], audience: &str) -> Result<ServiceAccount, ReviewError> {
    let review: Review = serde_json::from_slice(body).map_err(|e| {
        ReviewError::Unavailable(format!(
            "the Kubernetes API server's answer is no TokenReview: {e}"
        ))
    })?;
    let status = review.status;
    if !status.authenticated {
        let why = if status.error.is_empty() {
            "the token is not valid".to_string()
        } else {
            status.error
        };
        return Err(ReviewError::Refused(format!(
            "the Kubernetes API server refused the service-account token: {why}"
        )));
    }
    // The API server only authenticates a token for one of the audiences asked for, and says
    // which; one that ignored the audiences must not pass a token minted for another.
    if let Some(audiences) = &status.audiences
        && !audiences.iter().any(|a| a == audience)
    {
        return Err(ReviewError::Refused(format!(
            "the service-account token is for {audiences:?}, not for {audience:?}"
        )));
    }
    service_account(&status.user.username)
}

/// `system:serviceaccount:<namespace>:<name>`, both parts DNS labels.
fn service_account(username: &str) -> Result<ServiceAccount, ReviewError> {
    let refused = |why: String| {
        ReviewError::Refused(format!(
            "the token authenticates {username:?}, {why}; only service-account tokens prove a workload identity"
        ))
    };
    let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
        return Err(refused("not a service account".into()));
    };
    let Some((namespace, name)) = rest.split_once(':') else {
        return Err(refused("which names no service account".into()));
    };
    for (what, part) in [("namespace", namespace), ("service account", name)] {
        ferrule_proto::names::validate_label(what, part).map_err(|e| refused(e.to_string()))?;
    }
    Ok(ServiceAccount {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// The `message` of a Kubernetes `Status` body, or the start of the body.
fn api_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";

    #[test]
    fn only_jwt_shaped_tokens_are_sent() {
        assert!(check_shape(JWT).is_ok());
        for bad in [
            "",
            "abc",
            "a.b",
            "a..c",
            "a.b.c.d",
            "a b.c.d",
            "ferrule-join-x.y",
            "é.b.c",
        ] {
            assert!(
                matches!(check_shape(bad), Err(ReviewError::Refused(_))),
                "{bad:?}"
            );
        }
        let huge = format!("{}.b.c", "a".repeat(MAX_TOKEN_BYTES));
        assert!(matches!(check_shape(&huge), Err(ReviewError::Refused(m)) if m.contains("bytes")));
    }

    #[test]
    fn the_request_is_a_tokenreview_with_the_audience() {
        let body: serde_json::Value =
            serde_json::from_slice(&review_request(JWT, "ferrule")).unwrap();
        assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(body["kind"], "TokenReview");
        assert_eq!(body["spec"]["token"], JWT);
        assert_eq!(body["spec"]["audiences"], json!(["ferrule"]));
    }

    #[test]
    fn verdicts() {
        let ok = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "status": {"authenticated": true, "audiences": ["ferrule"],
                "user": {"username": "system:serviceaccount:shop:user", "uid": "1",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:shop"]}}});
        assert_eq!(
            verdict(ok.to_string().as_bytes(), "ferrule").unwrap(),
            ServiceAccount {
                namespace: "shop".into(),
                name: "user".into()
            }
        );
        let refused = json!({"status": {"authenticated": false, "error": "token has expired"}});
        match verdict(refused.to_string().as_bytes(), "ferrule") {
            Err(ReviewError::Refused(m)) => assert!(m.contains("token has expired"), "{m}"),
            other => panic!("{other:?}"),
        }
        let other_audience = json!({"status": {"authenticated": true, "audiences": ["vault"],
            "user": {"username": "system:serviceaccount:shop:user"}}});
        assert!(matches!(
            verdict(other_audience.to_string().as_bytes(), "ferrule"),
            Err(ReviewError::Refused(m)) if m.contains("vault")
        ));
        for username in [
            "kubernetes-admin",
            "system:serviceaccount:shop",
            "system:serviceaccount:Shop:user",
            "system:serviceaccount:shop:a:b",
            "system:node:n1",
        ] {
            let body = json!({"status": {"authenticated": true, "user": {"username": username}}});
            assert!(
                matches!(
                    verdict(body.to_string().as_bytes(), "ferrule"),
                    Err(ReviewError::Refused(_))
                ),
                "{username}"
            );
        }
        assert!(matches!(
            verdict(b"<html>", "ferrule"),
            Err(ReviewError::Unavailable(_))
        ));
    }

    #[test]
    fn configuration_errors_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "no certificate here").unwrap();
        let config = |api: &str| TokenReviewConfig {
            api: api.into(),
            token_file: dir.path().join("token"),
            ca_file: ca.clone(),
            audience: DEFAULT_AUDIENCE.into(),
            timeout: Duration::from_secs(1),
        };
        let err = TokenReviewer::new(config("http://k8s")).unwrap_err();
        assert!(err.contains("https://"), "{err}");
        let err = TokenReviewer::new(config("https://k8s/api")).unwrap_err();
        assert!(err.contains("without a path"), "{err}");
        let err = TokenReviewer::new(config("https://k8s:6443")).unwrap_err();
        assert!(err.contains("--kubernetes-ca-file"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a caller sends as a token, and whatever an API server answers, the
        /// checks return an error or a valid account, never panic.
        #[test]
        fn random_tokens_and_answers_never_panic(
            token in "\\PC{0,300}",
            dotted in "[A-Za-z0-9_.-]{0,200}",
            answer in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let _ = check_shape(&token);
            let _ = check_shape(&dotted);
            if let Ok(account) = verdict(&answer, "ferrule") {
                prop_assert!(ferrule_proto::names::validate_label("namespace", &account.namespace).is_ok());
            }
            let _ = api_message(&answer);
        }

        #[test]
        fn random_usernames_never_pass_unless_service_accounts(username in "\\PC{0,100}") {
            if let Ok(sa) = service_account(&username) {
                prop_assert_eq!(username, format!("system:serviceaccount:{}:{}", sa.namespace, sa.name));
            }
        }
    }
}
