//! Mutual TLS between proxies (TLS 1.3 only, rustls with the ring provider).
//!
//! [`MeshTls`] holds the proxy's current [`Credentials`] (its certificate chain and key, and
//! the trust bundle), replaced whole on renewal or when the bundle changes; every handshake
//! reads the current ones, so nothing is rebuilt or restarted.
//!
//! * Client side ([`MeshTls::connect`]): presents the proxy's certificate and accepts the
//!   server only when its chain ends at an anchor of the bundle *and* its single `spiffe://`
//!   URI SAN is the identity discovery announced for the endpoint. A certificate that chains
//!   fine but names someone else is refused: that is what stops a compromised workload from
//!   answering for another.
//! * Server side ([`MeshTls::accept`]): requires a client certificate chaining to the bundle
//!   and returns the client's verified identity, which becomes the connection's
//!   `ConnMeta::peer_identity` (the only source of the `ferrule-client-id` header).
//!
//! Protocol detection tells TLS from plaintext with `ferrule_proxy_core::detect::detect_tls`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ferrule_proto::identity::identity_of_certificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// Why credentials could not be made from what the CA sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialsError {
    #[error("the trust bundle is empty")]
    NoAnchors,
    #[error("a trust anchor is unusable: {0}")]
    BadAnchor(String),
    #[error("the certificate does not fit the key: {0}")]
    Key(String),
    #[error("the certificate carries no usable identity: {0}")]
    Identity(String),
}

/// What a proxy proves and trusts: its certificate chain and key, and the trust bundle.
pub struct Credentials {
    identity: Arc<str>,
    anchors: Vec<CertificateDer<'static>>,
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    /// Built once per bundle: verifies client certificates against `roots`.
    client_verifier: Arc<dyn ClientCertVerifier>,
    not_after: SystemTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("anchors", &self.roots.len())
            .field("not_after", &self.not_after)
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

impl Credentials {
    /// Credentials from a certificate chain (leaf first), the PKCS#8 key the leaf certifies,
    /// and the trust anchors.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
        anchors: &[CertificateDer<'static>],
    ) -> Result<Self, CredentialsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| CredentialsError::Identity("no certificate".into()))?;
        let identity = identity_of_certificate(leaf).map_err(CredentialsError::Identity)?;
        let not_after = not_after(leaf).map_err(CredentialsError::Identity)?;
        let key =
            CertifiedKey::from_der(chain, PrivateKeyDer::Pkcs8(key_pkcs8.into()), &provider())
                .map_err(|e| CredentialsError::Key(e.to_string()))?;
        Self::with_key(
            identity.to_string().into(),
            Arc::new(key),
            not_after,
            anchors,
        )
    }

    /// The same certificate with another trust bundle.
    pub fn with_anchors(
        &self,
        anchors: &[CertificateDer<'static>],
    ) -> Result<Self, CredentialsError> {
        Self::with_key(
            self.identity.clone(),
            self.key.clone(),
            self.not_after,
            anchors,
        )
    }

    fn with_key(
        identity: Arc<str>,
        key: Arc<CertifiedKey>,
        not_after: SystemTime,
        anchors: &[CertificateDer<'static>],
    ) -> Result<Self, CredentialsError> {
        if anchors.is_empty() {
            return Err(CredentialsError::NoAnchors);
        }
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots
                .add(anchor.clone())
                .map_err(|e| CredentialsError::BadAnchor(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| CredentialsError::BadAnchor(e.to_string()))?;
        Ok(Self {
            identity,
            anchors: anchors.to_vec(),
            key,
            roots,
            client_verifier,
            not_after,
        })
    }

    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn anchors(&self) -> usize {
        self.anchors.len()
    }

    /// Whether `anchors` is the bundle in use.
    pub fn same_anchors(&self, anchors: &[CertificateDer<'static>]) -> bool {
        self.anchors == anchors
    }

    /// The certificate chain and key, for presenting to the controller too.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.key
    }

    /// The trust bundle.
    pub fn anchor_certs(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    /// The leaf certificate, DER.
    pub fn leaf_der(&self) -> Option<Vec<u8>> {
        self.key.cert.first().map(|c| c.to_vec())
    }
}

fn not_after(der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
}

/// Why a TLS connection failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("this proxy has no certificate yet (waiting for the mesh CA)")]
    NoCredentials,
    #[error("TLS handshake: {0}")]
    Handshake(String),
}

/// The proxy's TLS state: current credentials and the configs built over them. Cheap to clone.
#[derive(Clone)]
pub struct MeshTls {
    credentials: watch::Receiver<Option<Arc<Credentials>>>,
    /// One client config per expected server identity (its verifier knows whom to expect);
    /// they read the credentials at each handshake, so they never need rebuilding.
    clients: Arc<Mutex<HashMap<Arc<str>, Arc<ClientConfig>>>>,
    server: Arc<ServerConfig>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls")
            .field("credentials", &*self.credentials.borrow())
            .finish()
    }
}

impl MeshTls {
    /// TLS over whatever `credentials` holds at each handshake (none yet: handshakes fail with
    /// [`TlsError::NoCredentials`]).
    pub fn new(credentials: watch::Receiver<Option<Arc<Credentials>>>) -> Self {
        let current = Current(credentials.clone());
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(current.clone()))
            .with_cert_resolver(Arc::new(current));
        // Between proxies only; inner protocols are detected after the handshake.
        server.alpn_protocols = vec![];
        // No session resumption, either side: a resumed handshake skips certificate
        // verification, so a peer would stay accepted after its anchor left the bundle (a
        // rotation's last step, or a compromised anchor) and with a certificate that has
        // expired since. Linkerd's proxy disables it for the same reason.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Self {
            credentials,
            clients: Arc::default(),
            server: Arc::new(server),
        }
    }

    /// The current credentials, if the proxy has a certificate.
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.credentials.borrow().clone()
    }

    /// A receiver that sees every change of credentials.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.credentials.clone()
    }

    fn client_config(&self, expected: &Arc<str>) -> Arc<ClientConfig> {
        let mut clients = self.clients.lock().expect("not poisoned");
        clients
            .entry(expected.clone())
            .or_insert_with(|| {
                let current = Current(self.credentials.clone());
                let verifier = ServerIdentity {
                    expected: expected.clone(),
                    current: current.clone(),
                };
                let config = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("the ring provider supports TLS 1.3")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_client_cert_resolver(Arc::new(current));
                let mut config = config;
                config.resumption = rustls::client::Resumption::disabled();
                Arc::new(config)
            })
            .clone()
    }

    /// Opens TLS on `io` to a peer that must prove `expected`.
    pub async fn connect<I>(
        &self,
        io: I,
        expected: &Arc<str>,
    ) -> Result<client::TlsStream<I>, TlsError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        if self.credentials().is_none() {
            return Err(TlsError::NoCredentials);
        }
        let connector = TlsConnector::from(self.client_config(expected));
        connector
            .connect(server_name(expected), io)
            .await
            .map_err(|e| TlsError::Handshake(explain(&e)))
    }

    /// Completes a server handshake on `io` and returns the stream with the client's verified
    /// identity.
    pub async fn accept<I>(&self, io: I) -> Result<(server::TlsStream<I>, Arc<str>), TlsError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        if self.credentials().is_none() {
            return Err(TlsError::NoCredentials);
        }
        let stream = TlsAcceptor::from(self.server.clone())
            .accept(io)
            .await
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| TlsError::Handshake("the client sent no certificate".into()))
            .and_then(|leaf| {
                identity_of_certificate(leaf)
                    .map_err(|e| TlsError::Handshake(format!("client certificate: {e}")))
            })?;
        Ok((stream, identity.to_string().into()))
    }
}

/// A handshake error in words: rustls' own for most, ours for an identity mismatch (which
/// rustls would print as a debug structure).
fn explain(error: &std::io::Error) -> String {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) = rustls_error
        && let Some(wrong) = other.0.downcast_ref::<WrongIdentity>()
    {
        return wrong.to_string();
    }
    error.to_string()
}

/// The SNI sent to a peer: its identity written as a DNS name
/// (`<sa>.<ns>.serviceaccount.identity.<trust-domain>`, as Linkerd does), for logs and
/// captures; verification never relies on it.
fn server_name(identity: &str) -> ServerName<'static> {
    let name = identity
        .parse::<ferrule_proto::identity::SpiffeId>()
        .map(|id| {
            format!(
                "{}.{}.serviceaccount.identity.{}",
                id.service_account, id.namespace, id.trust_domain
            )
        })
        .unwrap_or_else(|_| "identity.ferrule.invalid".into());
    ServerName::try_from(name).unwrap_or_else(|_| {
        ServerName::try_from("identity.ferrule.invalid").expect("valid DNS name")
    })
}

/// Reads the current credentials at each use.
#[derive(Clone, Debug)]
struct Current(watch::Receiver<Option<Arc<Credentials>>>);

impl Current {
    fn get(&self) -> Option<Arc<Credentials>> {
        self.0.borrow().clone()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().map(|c| c.key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Current {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Current {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let current = self
            .get()
            .ok_or(rustls::Error::General("no trust bundle yet".into()))?;
        current
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Verifies a server: chain to the bundle, then the expected identity.
#[derive(Debug)]
struct ServerIdentity {
    expected: Arc<str>,
    current: Current,
}

/// A certificate that chains fine but names another workload.
#[derive(Debug)]
struct WrongIdentity {
    expected: Arc<str>,
    found: String,
}

impl fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the peer is {}, discovery announced {}",
            self.found, self.expected
        )
    }
}

impl std::error::Error for WrongIdentity {}

impl ServerCertVerifier for ServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let current = self
            .current
            .get()
            .ok_or(rustls::Error::General("no trust bundle yet".into()))?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &current.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let found = identity_of_certificate(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?
            .to_string();
        if *found != *self.expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.clone(),
                    found,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
