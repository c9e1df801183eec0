//! The proxy's workload identity: its own key, its certificate from the mesh CA, renewed
//! before it expires, and the trust bundle, followed live.
//!
//! * The key is made here at start (ECDSA P-256) and never leaves the process.
//! * The first certificate is asked for with the bootstrap credential (a join token, or a
//!   Kubernetes service-account token the controller checks with the API server); each
//!   renewal proves the identity with the current certificate and a CSR of the same key, so
//!   a short-lived join token only has to last until the first certificate.
//! * Renewal starts at about 70 % of the certificate's lifetime, with jitter so a fleet does
//!   not renew in lockstep. While it fails the proxy keeps serving with the certificate it
//!   has, retries with backoff, counts the failures and logs why; only an expired certificate
//!   stops mutual TLS (peers refuse it), and the logs say so.
//! * The trust bundle comes with each certificate and from the controller's
//!   `WatchTrustBundle` stream, so added or removed anchors apply without a restart. Once the
//!   stream has delivered a bundle, that one wins over the bundle a certificate came with: a
//!   Certify answer signed just before the controller reloaded its files carries the old
//!   bundle, and the stream (which announces each change once) would never correct it. That
//!   would drop an anchor just added until the next renewal, and with it every peer whose new
//!   certificate chains to it (a rotation's step 3, docs/identity.md).
//! * [`reports`] turns the certificate in use into what the proxy announces to the controller
//!   (identity, validity, the anchor it chains to), for `ferrule identity status`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferrule_proto::v1::{
    CertifyRequest, ProxyCertificate, WatchTrustBundleRequest, identity_client::IdentityClient,
};
use ferrule_proxy_core::metrics::Metrics;
use ferrule_proxy_transport::tls::{Credentials, MeshTls};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control::{Backoff, Controllers};

/// Share of a certificate's lifetime after which it is renewed (before jitter).
const RENEW_AT: f64 = 0.7;
/// Jitter around [`RENEW_AT`], as a share of the lifetime.
const RENEW_JITTER: f64 = 0.05;
/// Bounds one Certify call.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy needs to get its identity.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Bootstrap credential for the first certificate.
    pub token: String,
    /// The file `token` was read from: read again whenever the token is needed (the kubelet
    /// replaces a projected service-account token before it expires), `token` being the
    /// fallback while the file cannot be read.
    pub token_file: Option<std::path::PathBuf>,
    /// The identity the proxy expects to be given (`spiffe://...`); the CA refuses instead of
    /// issuing another. Empty: whatever the token proves.
    pub expected: String,
}

impl IdentitySettings {
    fn bootstrap_token(&self) -> String {
        self.token_file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| self.token.clone())
    }
}

/// Counters of the identity client, on `/metrics`.
#[derive(Clone, Default)]
struct IdentityMetrics {
    renewals: Counter,
    failures: Counter,
    expiry: Gauge,
}

/// Starts getting and renewing the proxy's certificate; the returned TLS state has none until
/// the first one arrives (see [`MeshTls::credentials`]).
pub fn spawn(
    controllers: Controllers,
    settings: IdentitySettings,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> Result<MeshTls, String> {
    let key = KeyPair::generate().map_err(|e| format!("making the proxy's key: {e}"))?;
    // Over TLS to the controller, the channels present what is published here.
    let tx = controllers
        .tls()
        .map(|tls| tls.credentials())
        .unwrap_or_else(|| Arc::new(watch::Sender::new(None)));
    let rx = tx.subscribe();
    let m = IdentityMetrics::default();
    metrics.register(
        "identity_certificates_renewed",
        "Certificates the proxy obtained from the mesh CA (the first one included)",
        m.renewals.clone(),
    );
    metrics.register(
        "identity_renewal_failures",
        "Failed attempts to obtain or renew the proxy's certificate",
        m.failures.clone(),
    );
    metrics.register(
        "identity_certificate_expiry_timestamp_seconds",
        "When the proxy's current certificate expires (unix seconds; 0 before the first)",
        m.expiry.clone(),
    );
    let client = Client {
        controllers,
        settings,
        key: Arc::new(key),
        credentials: tx,
        metrics: m,
        streamed_bundle: Arc::new(Mutex::new(None)),
    };
    tokio::spawn(client.clone().renew_loop(shutdown.clone()));
    tokio::spawn(client.follow_bundle(shutdown));
    Ok(MeshTls::new(rx))
}

#[derive(Clone)]
struct Client {
    controllers: Controllers,
    settings: IdentitySettings,
    key: Arc<KeyPair>,
    credentials: Arc<watch::Sender<Option<Arc<Credentials>>>>,
    metrics: IdentityMetrics,
    /// The last bundle the controller's stream delivered (`None` before the first). Its lock
    /// is held while credentials are replaced, so a certificate and a bundle arriving at once
    /// never overwrite each other with older state.
    streamed_bundle: Arc<Mutex<Option<Vec<CertificateDer<'static>>>>>,
}

impl Client {
    fn csr(&self) -> Result<Vec<u8>, String> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "ferrule-proxy");
        params
            .serialize_request(self.key.as_ref())
            .map(|csr| csr.der().to_vec())
            .map_err(|e| format!("making the CSR: {e}"))
    }

    async fn renew_loop(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let next = match self.certify().await {
                Ok(lifetime) => {
                    backoff.reset();
                    self.metrics.renewals.inc();
                    renew_after(lifetime)
                }
                Err(error) => {
                    self.metrics.failures.inc();
                    let current = self.credentials.borrow().clone();
                    match current {
                        Some(c) if c.not_after() > SystemTime::now() => tracing::warn!(
                            %error,
                            expires = %humantime::format_rfc3339_seconds(c.not_after()),
                            "certificate renewal failed; serving with the current certificate until it expires"
                        ),
                        Some(_) => tracing::error!(
                            %error,
                            "certificate renewal failed and the current certificate has expired: peers refuse mutual TLS with this proxy"
                        ),
                        None => tracing::warn!(%error, "no certificate from the mesh CA yet"),
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Asks for a certificate; returns its remaining lifetime.
    async fn certify(&self) -> Result<Duration, String> {
        let current = self.credentials.borrow().clone();
        let current_cert = current
            .as_ref()
            .filter(|c| c.not_after() > SystemTime::now())
            .and_then(|c| c.leaf_der());
        let request = CertifyRequest {
            identity: self.settings.expected.clone(),
            token: if current_cert.is_some() {
                String::new()
            } else {
                self.settings.bootstrap_token()
            },
            csr_der: self.csr()?,
            current_certificate_der: current_cert.unwrap_or_default(),
        };
        let (address, channel) = self
            .controllers
            .connect_bootstrap()
            .await
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(
            CERTIFY_TIMEOUT,
            IdentityClient::new(channel).certify(request),
        )
        .await
        .map_err(|_| format!("controller {address}: no answer within {CERTIFY_TIMEOUT:?}"))?
        .map_err(|status| {
            format!(
                "controller {address}: {}: {}",
                status.code(),
                status.message()
            )
        })?
        .into_inner();
        let mut chain = vec![CertificateDer::from(response.leaf_certificate_der)];
        chain.extend(
            response
                .intermediate_certificates_der
                .into_iter()
                .map(CertificateDer::from),
        );
        let credentials = {
            let streamed = self.streamed_bundle.lock().expect("not poisoned");
            let anchors: Vec<CertificateDer<'static>> = match streamed.as_ref() {
                Some(bundle) => bundle.clone(),
                None => response
                    .trust_anchors_der
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect(),
            };
            let credentials = Credentials::new(chain, self.key.serialize_der(), &anchors)
                .map(Arc::new)
                .map_err(|e| format!("the certificate the CA sent is unusable: {e}"))?;
            self.credentials.send_replace(Some(credentials.clone()));
            credentials
        };
        let not_after = credentials.not_after();
        let renewed = current.is_some();
        tracing::info!(
            identity = %credentials.identity(),
            expires = %humantime::format_rfc3339_seconds(not_after),
            renewed,
            "certificate from the mesh CA"
        );
        self.metrics.expiry.set(
            not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        Ok(not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default())
    }

    /// Follows the controller's trust bundle stream; an anchor change replaces the bundle of
    /// the current credentials.
    async fn follow_bundle(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let result = tokio::select! {
                result = self.bundle_stream() => result,
                () = shutdown.cancelled() => return,
            };
            if let Err(error) = result {
                tracing::debug!(%error, "trust bundle stream ended");
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn bundle_stream(&self) -> Result<(), String> {
        let (_, channel) = self
            .controllers
            .connect_bootstrap()
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = IdentityClient::new(channel)
            .watch_trust_bundle(WatchTrustBundleRequest {})
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        while let Some(bundle) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            let anchors: Vec<CertificateDer<'static>> = bundle
                .trust_anchors_der
                .into_iter()
                .map(CertificateDer::from)
                .collect();
            let mut streamed = self.streamed_bundle.lock().expect("not poisoned");
            *streamed = Some(anchors.clone());
            let Some(current) = self.credentials.borrow().clone() else {
                continue;
            };
            if current.anchors() == anchors.len() && current.same_anchors(&anchors) {
                continue;
            }
            match current.with_anchors(&anchors) {
                Ok(updated) => {
                    tracing::info!(anchors = anchors.len(), "trust bundle changed");
                    self.credentials.send_replace(Some(Arc::new(updated)));
                }
                Err(error) => {
                    tracing::warn!(%error, "unusable trust bundle from the controller; keeping the one in use")
                }
            }
        }
        Err("the controller closed the stream".into())
    }
}

/// What the proxy reports of its certificate, following `tls` until `shutdown`: empty (no
/// certificate yet) until the first one, then a new report at each renewal or bundle change
/// that changes what is reported.
pub fn reports(tls: &MeshTls, shutdown: CancellationToken) -> watch::Receiver<ProxyCertificate> {
    let mut credentials = tls.watch();
    let (tx, rx) = watch::channel(ProxyCertificate::default());
    tokio::spawn(async move {
        loop {
            let current = credentials.borrow_and_update().clone();
            if let Some(current) = current {
                let next = report(&current, &tx.borrow());
                tx.send_if_modified(|old| {
                    let changed = *old != next;
                    *old = next;
                    changed
                });
            }
            tokio::select! {
                changed = credentials.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        }
    });
    rx
}

/// The report for `credentials`. A certificate keeps the anchor found for it when a later
/// bundle no longer holds that anchor: it still chains there, which is what the controller
/// needs to see (its anchor left the bundle before the proxy renewed).
fn report(credentials: &Credentials, previous: &ProxyCertificate) -> ProxyCertificate {
    let key: &CertifiedKey = credentials.certified_key();
    let chain: Vec<&[u8]> = key.cert.iter().map(|c| c.as_ref()).collect();
    let anchors: Vec<&[u8]> = credentials
        .anchor_certs()
        .iter()
        .map(|c| c.as_ref())
        .collect();
    match ferrule_proto::certificate::report(&chain, &anchors) {
        Ok(mut report) => {
            let same_certificate = report.identity == previous.identity
                && report.not_before == previous.not_before
                && report.not_after == previous.not_after;
            if report.anchor_fingerprint.is_empty() && same_certificate {
                report.anchor_fingerprint = previous.anchor_fingerprint.clone();
            }
            report
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read the proxy's own certificate for its report");
            previous.clone()
        }
    }
}

/// When to renew a certificate with `lifetime` left: about 70 % of it, jittered.
fn renew_after(lifetime: Duration) -> Duration {
    let share = RENEW_AT + rand::rng().random_range(-RENEW_JITTER..=RENEW_JITTER);
    lifetime.mul_f64(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_about_seventy_percent() {
        for _ in 0..100 {
            let at = renew_after(Duration::from_secs(1000));
            assert!(
                (Duration::from_secs(650)..=Duration::from_secs(750)).contains(&at),
                "{at:?}"
            );
        }
    }
}
