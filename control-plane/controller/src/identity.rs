//! The mesh CA: the `ferrule.v1.Identity` service.
//!
//! The trust bundle, the issuer certificate and its key come from files ([`CaFiles`]; in
//! Kubernetes a Secret mounted as files). They are read at start (a controller told to be a CA
//! whose files do not load refuses to start) and then re-read every `check_interval`: a
//! changed file is loaded and, when it is valid, replaces the CA at once; an invalid one is
//! logged and counted and the CA in use stays. The same check sets the issuer's remaining
//! lifetime metric and warns well before it expires. Polling, rather than file-change
//! notifications, because a Secret volume swaps a symlink that inotify watchers miss, and
//! because a missed event must never leave an expired issuer in use.
//!
//! Credentials: a join token made by `CreateJoinToken` (stored as a SHA-256 hash under
//! `/ferrule/identity/join-tokens/`, with a lease so it vanishes when it expires), a
//! Kubernetes service-account token checked by the API server ([`crate::tokenreview`], when
//! `--kubernetes-api` is given; any token without the join-token prefix is taken for one), or
//! the proxy's current certificate for a renewal. The identity in the certificate is the one
//! the credential proves, never one the CSR names.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrule_ca::{Ca, CertInfo, SignError};
use ferrule_proto::identity::{JOIN_TOKEN_PREFIX, SpiffeId, is_reserved};
use ferrule_proto::names::{namespace_or_default, validate_namespace, validate_service};
use ferrule_proto::v1::{
    CertificateSummary, CertifyRequest, CertifyResponse, CreateJoinTokenRequest,
    CreateJoinTokenResponse, IdentityStatus, IdentityStatusRequest, TrustBundle,
    WatchTrustBundleRequest, identity_server::Identity,
};
use ferrule_store::Store;
use futures::Stream;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::tokenreview::{ReviewError, TokenReviewer};

/// Where join tokens live in the store, by the hex SHA-256 of the token.
pub const JOIN_TOKENS_PREFIX: &str = "/ferrule/identity/join-tokens/";
/// A join token's lifetime unless asked otherwise.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may live: it is a bearer secret.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How many certificates of replaced issuers renewals still accept leaves of.
const MAX_EARLIER_ISSUERS: usize = 4;
/// Below this share of its lifetime left, the issuer's expiry is warned about.
const WARN_REMAINING_SHARE: f64 = 0.25;

/// The CA's files and settings.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub trust_domain: String,
    pub trust_anchors: PathBuf,
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
    /// How often the files are re-read and the issuer's expiry checked.
    pub check_interval: Duration,
    /// Lifetime of the workload certificates the CA signs.
    pub leaf_lifetime: Duration,
    /// Where Kubernetes service-account tokens are checked; `None`: join tokens only.
    pub token_review: Option<crate::tokenreview::TokenReviewConfig>,
}

impl CaFiles {
    /// The files `ferrule identity init` writes into `dir`.
    pub fn in_dir(dir: &Path, trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            trust_anchors: dir.join("trust-anchors.pem"),
            issuer_cert: dir.join("issuer.pem"),
            issuer_key: dir.join("issuer.key"),
            check_interval: Duration::from_secs(10),
            leaf_lifetime: ferrule_ca::DEFAULT_LEAF_LIFETIME,
            token_review: None,
        }
    }

    /// Reads and checks the files without serving: a controller started with files that do
    /// not fit together says so before it announces itself ready.
    pub fn check(&self) -> anyhow::Result<()> {
        let raw = self.read().map_err(anyhow::Error::msg)?;
        self.load(&raw).map(drop).map_err(anyhow::Error::msg)?;
        self.token_reviewer().map(drop)
    }

    fn token_reviewer(&self) -> anyhow::Result<Option<Arc<TokenReviewer>>> {
        self.token_review
            .clone()
            .map(|config| TokenReviewer::new(config).map(Arc::new))
            .transpose()
            .map_err(anyhow::Error::msg)
    }

    fn read(&self) -> Result<(Vec<u8>, Vec<u8>, String), String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let anchors = read(&self.trust_anchors)?;
        let cert = read(&self.issuer_cert)?;
        let key = String::from_utf8(read(&self.issuer_key)?)
            .map_err(|_| format!("{} is not PEM text", self.issuer_key.display()))?;
        Ok((anchors, cert, key))
    }

    fn load(&self, raw: &(Vec<u8>, Vec<u8>, String)) -> Result<Ca, String> {
        Ca::from_pem(&self.trust_domain, &raw.0, &raw.1, &raw.2).map_err(|e| {
            format!(
                "{e} (files {}, {}, {})",
                self.trust_anchors.display(),
                self.issuer_cert.display(),
                self.issuer_key.display()
            )
        })
    }
}

/// The CA in use, replaced whole when its files change.
#[derive(Clone)]
pub struct CaHandle {
    current: watch::Receiver<Option<Arc<Ca>>>,
    problem: Arc<Mutex<Option<String>>>,
    leaf_lifetime: Duration,
    token_review: Option<Arc<TokenReviewer>>,
    /// The issuer chains of the CAs this one replaced (the last few): leaves they signed are
    /// still renewed while they chain to the current bundle.
    earlier_issuers: Arc<Mutex<Vec<rustls_pki_types::CertificateDer<'static>>>>,
}

impl CaHandle {
    /// No CA: this controller signs nothing and says why.
    pub fn disabled() -> Self {
        let (_, current) = watch::channel(None);
        Self {
            current,
            problem: Arc::new(Mutex::new(None)),
            leaf_lifetime: ferrule_ca::DEFAULT_LEAF_LIFETIME,
            token_review: None,
            earlier_issuers: Arc::default(),
        }
    }

    /// Loads the CA from `files` (an error if they do not load) and re-reads them every
    /// `files.check_interval` until `shutdown`.
    pub fn load(
        files: CaFiles,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let raw = files.read().map_err(anyhow::Error::msg)?;
        let ca = files.load(&raw).map_err(anyhow::Error::msg)?;
        let token_review = files.token_reviewer()?;
        tracing::info!(
            trust_domain = ca.trust_domain(),
            anchors = ca.anchors().len(),
            issuer_expires = %ca.issuer_info().not_after,
            "mesh CA loaded"
        );
        let (tx, current) = watch::channel(Some(Arc::new(ca)));
        let handle = Self {
            current,
            problem: Arc::new(Mutex::new(None)),
            leaf_lifetime: files.leaf_lifetime,
            token_review,
            earlier_issuers: Arc::default(),
        };
        handle.check_expiry(&metrics, &mut None);
        tokio::spawn(handle.clone().reload(files, raw, tx, metrics, shutdown));
        Ok(handle)
    }

    fn ca(&self) -> Option<Arc<Ca>> {
        self.current.borrow().clone()
    }

    /// The CA in use, followed: the controller's own server certificate is issued from it
    /// (`auth`), and re-issued when it changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Ca>>> {
        self.current.clone()
    }

    async fn reload(
        self,
        files: CaFiles,
        mut loaded: (Vec<u8>, Vec<u8>, String),
        tx: watch::Sender<Option<Arc<Ca>>>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut last_warning = None;
        let mut ticks = tokio::time::interval(files.check_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            match files.read() {
                Ok(raw) if raw != loaded => match files.load(&raw) {
                    Ok(ca) => {
                        if let Some(old) = self.ca() {
                            let mut earlier = self.earlier_issuers.lock().expect("not poisoned");
                            earlier.extend(old.chain().iter().cloned());
                            let excess = earlier.len().saturating_sub(MAX_EARLIER_ISSUERS);
                            earlier.drain(..excess);
                        }
                        tracing::info!(
                            anchors = ca.anchors().len(),
                            issuer_expires = %ca.issuer_info().not_after,
                            "mesh CA files changed: reloaded"
                        );
                        tx.send_replace(Some(Arc::new(ca)));
                        loaded = raw;
                        *self.problem.lock().expect("not poisoned") = None;
                    }
                    Err(error) => self.reload_failed(&metrics, error),
                },
                Ok(_) => {}
                Err(error) => self.reload_failed(&metrics, error),
            }
            self.check_expiry(&metrics, &mut last_warning);
        }
    }

    fn reload_failed(&self, metrics: &Metrics, error: String) {
        metrics.identity_reload_failures.inc();
        let mut problem = self.problem.lock().expect("not poisoned");
        if problem.as_deref() != Some(error.as_str()) {
            tracing::error!(%error, "mesh CA files changed but do not load; still signing with the CA loaded before");
            *problem = Some(error);
        }
    }

    /// Sets the issuer-expiry gauge; warns (at most hourly) once less than a quarter of the
    /// issuer's lifetime is left, and errors once it has expired.
    fn check_expiry(&self, metrics: &Metrics, last_warning: &mut Option<std::time::Instant>) {
        let Some(ca) = self.ca() else { return };
        let info = ca.issuer_info();
        let now = OffsetDateTime::now_utc();
        let left = (info.not_after - now).whole_seconds();
        metrics.identity_issuer_expiry_seconds.set(left);
        let lifetime = (info.not_after - info.not_before).whole_seconds().max(1);
        let due = last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(3600));
        if left <= 0 {
            if due {
                tracing::error!(expired = %info.not_after, "the mesh CA's issuer has expired: no certificate can be issued; install a new issuer (docs/identity.md)");
                *last_warning = Some(std::time::Instant::now());
            }
        } else if (left as f64) < lifetime as f64 * WARN_REMAINING_SHARE && due {
            tracing::warn!(expires = %info.not_after, seconds_left = left, "the mesh CA's issuer expires soon; rotate it (docs/identity.md)");
            *last_warning = Some(std::time::Instant::now());
        }
    }
}

/// A stored join token (the token itself is never stored).
#[derive(Debug, Serialize, Deserialize)]
struct JoinToken {
    service: String,
    namespace: String,
    /// Unix seconds.
    expires_at: i64,
}

/// The `Identity` gRPC service.
pub struct IdentityService {
    store: Arc<dyn Store>,
    ca: CaHandle,
    metrics: Arc<Metrics>,
}

impl IdentityService {
    pub fn new(store: Arc<dyn Store>, ca: CaHandle, metrics: Arc<Metrics>) -> Self {
        Self { store, ca, metrics }
    }

    fn ca(&self) -> Result<Arc<Ca>, Status> {
        self.ca.ca().ok_or_else(|| {
            Status::failed_precondition(
                "this controller has no mesh CA: start it with --identity-dir (see docs/identity.md)",
            )
        })
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics
            .identity_refused
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
        tracing::info!(
            reason,
            message = status.message(),
            "certificate request refused"
        );
        status
    }

    /// The identity a request's credential proves.
    async fn authenticate(&self, ca: &Ca, req: &CertifyRequest) -> Result<SpiffeId, Status> {
        if !req.current_certificate_der.is_empty() {
            let earlier = self
                .ca
                .earlier_issuers
                .lock()
                .expect("not poisoned")
                .clone();
            return ca
                .renewal_identity_after(
                    &req.current_certificate_der,
                    &req.csr_der,
                    rustls_pki_types::UnixTime::now(),
                    &earlier,
                )
                .map_err(|e| {
                    self.refuse(
                        "bad_certificate",
                        Status::unauthenticated(format!("renewal refused: {e}")),
                    )
                });
        }
        if req.token.is_empty() {
            return Err(self.refuse(
                "no_credential",
                Status::unauthenticated(
                    "no credential: send a join token (ferrule identity token create) or the current certificate",
                ),
            ));
        }
        if !req.token.starts_with(JOIN_TOKEN_PREFIX) {
            return self.review_kubernetes_token(ca, &req.token).await;
        }
        let key = format!(
            "{JOIN_TOKENS_PREFIX}{}",
            ferrule_ca::fingerprint(req.token.as_bytes())
        );
        let stored = self.store.get(&key).await.map_err(|e| {
            Status::unavailable(format!("reading the join token from the store: {e}"))
        })?;
        let unknown = || {
            self.refuse(
                "bad_token",
                Status::unauthenticated("unknown or expired join token"),
            )
        };
        let stored = stored.ok_or_else(unknown)?;
        let token: JoinToken = serde_json::from_slice(&stored.value).map_err(|_| unknown())?;
        if token.expires_at <= unix_now() {
            return Err(unknown());
        }
        SpiffeId::new(ca.trust_domain(), &token.namespace, &token.service)
            .map_err(|e| Status::internal(format!("stored join token names a bad identity: {e}")))
    }
}

impl IdentityService {
    /// The identity a Kubernetes service-account token proves, as the API server says.
    async fn review_kubernetes_token(&self, ca: &Ca, token: &str) -> Result<SpiffeId, Status> {
        let Some(reviewer) = &self.ca.token_review else {
            return Err(self.refuse(
                "unknown_token_kind",
                Status::unauthenticated(format!(
                    "the token is not a join token (they start with {JOIN_TOKEN_PREFIX:?}), and this controller does not check Kubernetes service-account tokens (--kubernetes-api)"
                )),
            ));
        };
        let account = reviewer.review(token).await.map_err(|e| match e {
            ReviewError::Refused(why) => self.refuse("bad_token", Status::unauthenticated(why)),
            ReviewError::Unavailable(why) => {
                self.refuse("kubernetes_unavailable", Status::unavailable(why))
            }
        })?;
        SpiffeId::new(ca.trust_domain(), &account.namespace, &account.name).map_err(|e| {
            self.refuse(
                "bad_token",
                Status::unauthenticated(format!(
                    "the service account the token proves is no workload identity: {e}"
                )),
            )
        })
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn summary(info: &CertInfo) -> CertificateSummary {
    CertificateSummary {
        subject: info.subject.clone(),
        not_before: info.not_before.unix_timestamp(),
        not_after: info.not_after.unix_timestamp(),
        fingerprint: info.fingerprint.clone(),
    }
}

fn bundle(ca: &Ca) -> TrustBundle {
    TrustBundle {
        trust_anchors_der: ca.anchors().iter().map(|a| a.to_vec()).collect(),
        trust_domain: ca.trust_domain().to_string(),
    }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        let ca = self.ca()?;
        let identity = self.authenticate(&ca, &req).await?;
        // The control plane's own identities come from the issuer directly, never from here:
        // a workload holding one could answer as the controller or act as the admin.
        if is_reserved(&identity) {
            return Err(self.refuse(
                "reserved_identity",
                Status::permission_denied(format!(
                    "{identity} is the control plane's own identity; the CA does not issue it to workloads"
                )),
            ));
        }
        if !req.identity.is_empty() && req.identity != identity.to_string() {
            return Err(self.refuse(
                "other_identity",
                Status::permission_denied(format!(
                    "the credential proves {identity}, the request asks for {}",
                    req.identity
                )),
            ));
        }
        let leaf = ca
            .sign(
                &req.csr_der,
                &identity,
                self.ca.leaf_lifetime,
                OffsetDateTime::now_utc(),
            )
            .map_err(|e| match e {
                SignError::MalformedCsr(_) => {
                    self.refuse("malformed_csr", Status::invalid_argument(e.to_string()))
                }
                SignError::IssuerExpired(_) => {
                    self.refuse("issuer_expired", Status::unavailable(e.to_string()))
                }
                SignError::Signing(_) => Status::internal(e.to_string()),
            })?;
        let valid_until = CertInfo::of(&leaf)
            .map(|i| i.not_after.unix_timestamp())
            .unwrap_or_default();
        self.metrics.identity_issued.inc();
        tracing::debug!(%identity, valid_until, "certificate issued");
        Ok(Response::new(CertifyResponse {
            leaf_certificate_der: leaf.to_vec(),
            intermediate_certificates_der: ca.chain().iter().map(|c| c.to_vec()).collect(),
            trust_anchors_der: ca.anchors().iter().map(|a| a.to_vec()).collect(),
            valid_until,
            identity: identity.to_string(),
        }))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        _: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        self.ca()?;
        let mut current = self.ca.current.clone();
        let stream = async_stream_of(move |tx: tokio::sync::mpsc::Sender<_>| async move {
            let mut last: Option<Vec<Vec<u8>>> = None;
            loop {
                let ca = current.borrow_and_update().clone();
                if let Some(ca) = ca {
                    let next = bundle(&ca);
                    if last.as_ref() != Some(&next.trust_anchors_der) {
                        last = Some(next.trust_anchors_der.clone());
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    changed = current.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let req = request.into_inner();
        let ca = self.ca()?;
        validate_service(&req.service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let namespace = namespace_or_default(&req.namespace);
        validate_namespace(namespace)
            .map_err(|e| Status::invalid_argument(format!("namespace: {e}")))?;
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_JOIN_TOKEN_TTL,
            s if Duration::from_secs(s) > MAX_JOIN_TOKEN_TTL => {
                return Err(Status::invalid_argument(format!(
                    "ttl_seconds: {s} is more than the {} s a join token may live",
                    MAX_JOIN_TOKEN_TTL.as_secs()
                )));
            }
            s => Duration::from_secs(s),
        };
        let identity = SpiffeId::new(ca.trust_domain(), namespace, &req.service)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if is_reserved(&identity) {
            return Err(Status::invalid_argument(format!(
                "service: {identity} is the control plane's own identity; no join token proves it"
            )));
        }
        let token = new_token()?;
        let expires_at = unix_now() + ttl.as_secs() as i64;
        let record = serde_json::to_vec(&JoinToken {
            service: req.service.clone(),
            namespace: namespace.to_string(),
            expires_at,
        })
        .map_err(|e| Status::internal(e.to_string()))?;
        let store_error = |e: ferrule_store::StoreError| {
            Status::unavailable(format!("storing the join token: {e}"))
        };
        let lease = self.store.grant_lease(ttl).await.map_err(store_error)?;
        let key = format!(
            "{JOIN_TOKENS_PREFIX}{}",
            ferrule_ca::fingerprint(token.as_bytes())
        );
        self.store
            .put(&key, record, Some(lease))
            .await
            .map_err(store_error)?;
        tracing::info!(%identity, expires_at, "join token created");
        Ok(Response::new(CreateJoinTokenResponse {
            token,
            identity: identity.to_string(),
            expires_at,
        }))
    }

    async fn status(
        &self,
        _: Request<IdentityStatusRequest>,
    ) -> Result<Response<IdentityStatus>, Status> {
        let problem = self.ca.problem.lock().expect("not poisoned").clone();
        let Some(ca) = self.ca.ca() else {
            return Ok(Response::new(IdentityStatus {
                enabled: false,
                problem: "this controller has no mesh CA (--identity-dir)".into(),
                ..Default::default()
            }));
        };
        let mut problem = problem.unwrap_or_default();
        if ca.issuer_info().not_after <= OffsetDateTime::now_utc() {
            problem = format!("the issuer expired at {}", ca.issuer_info().not_after);
        }
        Ok(Response::new(IdentityStatus {
            enabled: true,
            trust_domain: ca.trust_domain().to_string(),
            trust_anchors: ca
                .anchors()
                .iter()
                .filter_map(|a| CertInfo::of(a).ok())
                .map(|i| summary(&i))
                .collect(),
            issuer: Some(summary(ca.issuer_info())),
            issuer_anchor: ca.issuer_anchor().to_string(),
            problem,
        }))
    }
}

/// A new join token: the prefix and 32 random bytes in hex.
fn new_token() -> Result<String, Status> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Status::internal("no randomness from the system"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{JOIN_TOKEN_PREFIX}{hex}"))
}

/// A response stream fed by `produce` through a small channel; the producer ends when the
/// client goes away.
fn async_stream_of<F, Fut>(produce: F) -> BundleStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<TrustBundle, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
