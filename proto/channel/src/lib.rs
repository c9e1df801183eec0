//! Reaching the controller's gRPC API over TLS, for everyone who calls it: the proxy, the
//! `ferrule` CLI and the tests.
//!
//! A controller that is the mesh CA serves its API over TLS 1.3 with a certificate it issues
//! itself for `spiffe://<trust-domain>/ns/ferrule-system/sa/ferrule-controller`
//! (docs/identity.md, "The controller's API"). A caller trusts it only through trust anchors it
//! was given beforehand (a file: never trust on first use), and accepts the server only when
//! its chain ends at one of them *and* it carries the controller's identity, the way proxies
//! check each other. The caller proves who it is with a client certificate ([`ClientCert`]: a
//! proxy's own, renewed, or the admin's from files) or, for the CLI, an admin token sent as
//! `authorization: Bearer` ([`Token`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ferrule_proto::identity::{SpiffeId, identity_of_certificate};
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why TLS to the controller could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("the trust anchors hold no certificate")]
    NoAnchors,
    #[error("a trust anchor is unusable: {0}")]
    BadAnchor(String),
    #[error("the client certificate does not fit its key: {0}")]
    Key(String),
    #[error("the token is not usable in a header: {0}")]
    Token(String),
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Reads every certificate of a PEM file (trust anchors, a certificate chain).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ChannelError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| ChannelError::Read {
        path: shown.clone(),
        source,
    })?;
    certificates_from_pem(&pem, &shown)
}

/// Every certificate of PEM text (a file's, or trust anchors given in an environment
/// variable); `source` names where it came from in errors.
pub fn certificates_from_pem(
    pem: &[u8],
    source: &str,
) -> Result<Vec<CertificateDer<'static>>, ChannelError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ChannelError::Pem {
            path: source.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ChannelError::Pem {
            path: source.to_string(),
            reason: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

/// A certificate chain and its key from PEM files, for presenting as a client.
pub fn read_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, ChannelError> {
    let chain = read_certificates(cert)?;
    let shown = key.display().to_string();
    let pem = std::fs::read(key).map_err(|source| ChannelError::Read {
        path: shown.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| ChannelError::Pem {
        path: shown,
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| ChannelError::Key(e.to_string()))
}

/// A certificate chain (leaf first) and its PKCS#8 key, for presenting as a client.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
) -> Result<Arc<CertifiedKey>, ChannelError> {
    CertifiedKey::from_der(chain, PrivateKeyDer::Pkcs8(key_pkcs8.into()), &provider())
        .map(Arc::new)
        .map_err(|e| ChannelError::Key(e.to_string()))
}

/// The trust domain a certificate belongs to: that of its SPIFFE id, or the `spiffe://<td>`
/// URI SAN the mesh's anchors and issuers carry.
pub fn trust_domain_of(der: &[u8]) -> Option<String> {
    if let Ok(id) = identity_of_certificate(der) {
        return Some(id.trust_domain);
    }
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .filter(|d| !d.is_empty() && !d.contains('/'))
            .map(str::to_string),
        _ => None,
    })
}

/// Where the certificate a caller presents comes from; asked at every handshake, so a renewed
/// certificate is used from the next connection on.
pub trait ClientCert: Send + Sync + fmt::Debug {
    /// The certificate and key to present, if the caller has one now.
    fn current(&self) -> Option<Arc<CertifiedKey>>;
    /// Anchors learnt since start (a proxy follows the controller's trust bundle), trusted
    /// beside the ones given at start.
    fn anchors(&self) -> Vec<CertificateDer<'static>> {
        Vec::new()
    }
}

/// A fixed certificate (the admin's, from files), or none.
#[derive(Debug, Clone, Default)]
pub struct StaticCert(pub Option<Arc<CertifiedKey>>);

impl ClientCert for StaticCert {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

/// TLS to the controller: whom to trust, whom to expect, what to present. Cheap to clone.
#[derive(Clone)]
pub struct ControllerTls {
    config: Arc<ClientConfig>,
    expected: Arc<SpiffeId>,
}

impl fmt::Debug for ControllerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerTls")
            .field("expected", &self.expected.to_string())
            .finish()
    }
}

impl ControllerTls {
    /// Trusts `anchors` (and whatever `client` adds), expects the server to prove
    /// `expected` (the controller's identity), presents what `client` holds.
    pub fn new(
        anchors: Vec<CertificateDer<'static>>,
        expected: SpiffeId,
        client: Arc<dyn ClientCert>,
    ) -> Result<Self, ChannelError> {
        if anchors.is_empty() {
            return Err(ChannelError::NoAnchors);
        }
        let mut check = RootCertStore::empty();
        for anchor in &anchors {
            check
                .add(anchor.clone())
                .map_err(|e| ChannelError::BadAnchor(e.to_string()))?;
        }
        let expected = Arc::new(expected);
        let verifier = ControllerVerifier {
            anchors,
            expected: expected.clone(),
            client: client.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Resolver(client)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session keeps the client certificate of the first
        // handshake, so a proxy that asked for its certificate over a session without one
        // would stay anonymous on every later connection.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
            expected,
        })
    }

    /// The identity the controller must prove.
    pub fn expected(&self) -> &SpiffeId {
        &self.expected
    }

    /// Connects `endpoint` (an `http://HOST:PORT` URI) over TLS.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.connector()).await
    }

    /// A channel that connects on first use.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector())
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = server_name(&self.expected);
        tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let host = uri
                    .host()
                    .ok_or_else(|| std::io::Error::other(format!("{uri} names no host")))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = uri.port_u16().unwrap_or(8086);
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await.map_err(explain)?;
                Ok(TokioIo::new(tls))
            }
        })
    }
}

/// A handshake error in words (an identity mismatch would print as a debug structure).
fn explain(error: std::io::Error) -> std::io::Error {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) = rustls_error
        && let Some(wrong) = other.0.downcast_ref::<NotTheController>()
    {
        return std::io::Error::new(error.kind(), wrong.to_string());
    }
    error
}

/// The SNI: the controller's identity as a DNS name, for logs; never relied on.
fn server_name(id: &SpiffeId) -> ServerName<'static> {
    ServerName::try_from(format!(
        "{}.{}.serviceaccount.identity.{}",
        id.service_account, id.namespace, id.trust_domain
    ))
    .unwrap_or_else(|_| ServerName::try_from("controller.ferrule.invalid").expect("a DNS name"))
}

#[derive(Debug)]
struct Resolver(Arc<dyn ClientCert>);

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct ControllerVerifier {
    anchors: Vec<CertificateDer<'static>>,
    expected: Arc<SpiffeId>,
    client: Arc<dyn ClientCert>,
}

/// A server that chains fine but is not the controller.
#[derive(Debug)]
struct NotTheController {
    expected: String,
    found: String,
}

impl fmt::Display for NotTheController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server is {}, not the controller ({})",
            self.found, self.expected
        )
    }
}

impl std::error::Error for NotTheController {}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for anchor in self.anchors.iter().cloned().chain(self.client.anchors()) {
            // A bad learnt anchor is skipped: the ones given at start still count.
            let _ = roots.add(anchor);
        }
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let found = identity_of_certificate(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if found != *self.expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotTheController {
                    expected: self.expected.to_string(),
                    found: found.to_string(),
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Adds `authorization: Bearer <admin token>` to every call, when there is a token.
#[derive(Clone, Default)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Token(set)"
        } else {
            "Token(none)"
        })
    }
}

impl Token {
    pub fn new(token: Option<&str>) -> Result<Self, ChannelError> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|e| ChannelError::Token(e.to_string()))
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert(http::header::AUTHORIZATION.as_str(), value.clone());
        }
        Ok(request)
    }
}

/// A channel that adds the admin token to each call.
pub type AuthChannel = InterceptedService<Channel, Token>;
