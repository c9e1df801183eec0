//! Reaching the controller: the list of controller replicas given with `--controller A,B`,
//! connecting to whichever answers first (in turn, starting after the last one used), and the
//! jittered exponential backoff that discovery and registration wait between attempts.
//!
//! Controllers are stateless replicas in front of one store, so any of them serves any stream;
//! trying them in turn is all the failover there is.
//!
//! Every controller channel of the proxy (identity, discovery, config, registration) is made
//! here, so [`ControlTls`] applies to all of them: with the mesh's trust anchors given
//! (`--identity-trust-anchors`), the proxy talks TLS to the controller, accepts it only as
//! `spiffe://<td>/ns/ferrule-system/sa/ferrule-controller`, and presents its own certificate
//! once it has one (the bootstrap `Certify` goes without).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrule_channel::{ClientCert, ControllerTls};
use ferrule_proxy_transport::tls::Credentials;
use rand::Rng;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

/// How long a call that needs the proxy's certificate waits for the first one before it
/// tries without (and is refused, with a status that says why).
const CERTIFICATE_WAIT: Duration = Duration::from_secs(10);

/// The proxy's credentials as the controller channels see them: the certificate the identity
/// client keeps current ([`ControlTls::credentials`]).
#[derive(Debug)]
struct ProxyCert(Arc<watch::Sender<Option<Arc<Credentials>>>>);

impl ClientCert for ProxyCert {
    fn current(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // An expired certificate would fail the handshake; without one the bootstrap call
        // (a join token) still goes through.
        self.0
            .borrow()
            .as_ref()
            .filter(|c| c.not_after() > std::time::SystemTime::now())
            .map(|c| c.certified_key().clone())
    }

    fn anchors(&self) -> Vec<CertificateDer<'static>> {
        self.0
            .borrow()
            .as_ref()
            .map(|c| c.anchor_certs().to_vec())
            .unwrap_or_default()
    }
}

/// TLS to the controllers, shared by every channel of one proxy.
#[derive(Clone, Debug)]
pub struct ControlTls {
    tls: ControllerTls,
    credentials: Arc<watch::Sender<Option<Arc<Credentials>>>>,
}

impl ControlTls {
    /// Trusts `anchors` (from a file given at start, never from the controller itself) and
    /// expects the controller of `trust_domain`.
    pub fn new(anchors: Vec<CertificateDer<'static>>, trust_domain: &str) -> Result<Self, String> {
        let expected = ferrule_proto::identity::controller_identity(trust_domain)
            .map_err(|e| e.to_string())?;
        let credentials = Arc::new(watch::Sender::new(None));
        let tls = ControllerTls::new(anchors, expected, Arc::new(ProxyCert(credentials.clone())))
            .map_err(|e| e.to_string())?;
        Ok(Self { tls, credentials })
    }

    /// Where the identity client publishes the proxy's certificate; the channels present it.
    pub fn credentials(&self) -> Arc<watch::Sender<Option<Arc<Credentials>>>> {
        self.credentials.clone()
    }
}

/// How long a TCP + HTTP/2 connect to one controller may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings notice a controller that vanished without closing its connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the controllers could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no controller address given")]
    NoControllers,
    #[error("controller address {address:?} is not a valid URI: {source}")]
    InvalidAddress {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("no controller reachable (tried {tried}); last error: {last}")]
    Unreachable { tried: String, last: String },
}

/// [`Controllers::parse`] for components that may run without a controller: logs why there is
/// none (at info when none was configured, at error when an address is bad).
pub fn parse_or_log(addresses: &[String], component: &str) -> Option<Controllers> {
    match Controllers::parse(addresses) {
        Ok(controllers) => Some(controllers),
        Err(ControlError::NoControllers) => {
            tracing::info!(component, "no controller configured");
            None
        }
        Err(error) => {
            tracing::error!(component, %error, "no usable controller");
            None
        }
    }
}

/// The controller replicas, parsed once. Cheap to clone; clones share the rotation.
#[derive(Clone, Debug)]
pub struct Controllers {
    endpoints: Arc<[(String, Endpoint)]>,
    next: Arc<AtomicUsize>,
    tls: Option<ControlTls>,
}

impl Controllers {
    /// Parses `addresses` ("127.0.0.1:8086" or "http://host:8086"; a bare `host:port` gets
    /// `http://` prepended).
    pub fn parse(addresses: &[String]) -> Result<Self, ControlError> {
        if addresses.is_empty() {
            return Err(ControlError::NoControllers);
        }
        let endpoints = addresses
            .iter()
            .map(|address| {
                let uri = if address.contains("://") {
                    address.clone()
                } else {
                    format!("http://{address}")
                };
                let endpoint = Endpoint::from_shared(uri)
                    .map_err(|source| ControlError::InvalidAddress {
                        address: address.clone(),
                        source,
                    })?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true);
                Ok((address.clone(), endpoint))
            })
            .collect::<Result<Vec<_>, ControlError>>()?;
        Ok(Self {
            endpoints: endpoints.into(),
            next: Arc::new(AtomicUsize::new(0)),
            tls: None,
        })
    }

    /// The same controllers, reached over TLS.
    pub fn with_tls(mut self, tls: Option<ControlTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The TLS the channels use, if any.
    pub fn tls(&self) -> Option<&ControlTls> {
        self.tls.as_ref()
    }

    /// Connects to one controller, trying each in turn once, starting with the one after the
    /// controller the previous call settled on. Returns the address used and the channel.
    /// Over TLS, waits (a while) for the proxy's first certificate: every call but the
    /// bootstrap needs it.
    pub async fn connect(&self) -> Result<(String, Channel), ControlError> {
        if let Some(tls) = &self.tls {
            let mut credentials = tls.credentials.subscribe();
            let _ =
                tokio::time::timeout(CERTIFICATE_WAIT, credentials.wait_for(Option::is_some)).await;
        }
        self.connect_bootstrap().await
    }

    /// [`Controllers::connect`] without waiting for a certificate: for getting the first one.
    pub async fn connect_bootstrap(&self) -> Result<(String, Channel), ControlError> {
        let n = self.endpoints.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let index = (start + i) % n;
            let (address, endpoint) = &self.endpoints[index];
            let connected = match &self.tls {
                Some(tls) => tls.tls.connect(endpoint.clone()).await,
                None => endpoint.connect().await,
            };
            match connected {
                Ok(channel) => {
                    // The next caller starts here too: connections stick to a healthy replica.
                    self.next.store(index, Ordering::Relaxed);
                    return Ok((address.clone(), channel));
                }
                Err(e) => {
                    tracing::debug!(controller = %address, error = %e, "controller connect failed");
                    last = format!("{address}: {e}");
                }
            }
        }
        // Start with the following replica next time.
        self.next.store((start + 1) % n, Ordering::Relaxed);
        Err(ControlError::Unreachable {
            tried: self.addresses().join(", "),
            last,
        })
    }

    /// The addresses as given.
    pub fn addresses(&self) -> Vec<String> {
        self.endpoints.iter().map(|(a, _)| a.clone()).collect()
    }
}

/// Exponential backoff with full jitter in the upper half: each delay is drawn from
/// `[d/2, d]` where `d` doubles from `base` up to `max`. Jitter keeps a fleet of proxies from
/// reconnecting in lockstep after a controller restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            current: base,
        }
    }

    /// The delay to wait now; the following one will be about twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to `base`, after an attempt succeeded.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_prepends_scheme_and_rejects_garbage() {
        let c = Controllers::parse(&["127.0.0.1:8086".into(), "http://h:1".into()]).unwrap();
        assert_eq!(c.endpoints[0].1.uri().to_string(), "http://127.0.0.1:8086/");
        assert_eq!(c.endpoints[1].1.uri().to_string(), "http://h:1/");
        assert!(matches!(
            Controllers::parse(&[]),
            Err(ControlError::NoControllers)
        ));
        assert!(matches!(
            Controllers::parse(&["bad address".into()]),
            Err(ControlError::InvalidAddress { .. })
        ));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_max() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for (d, hi) in delays.iter().zip(bounds) {
            let hi = Duration::from_millis(hi);
            assert!(
                *d >= hi / 2 && *d <= hi,
                "{d:?} not in [{:?}, {hi:?}]",
                hi / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn connect_skips_unreachable_controllers() {
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let c = Controllers::parse(&[dead_addr]).unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), c.connect())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ControlError::Unreachable { .. }), "{err}");
    }
}
