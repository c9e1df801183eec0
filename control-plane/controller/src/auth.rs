//! The controller's own API, protected: who may call what (docs/identity.md, "The
//! controller's API").
//!
//! * **Transport** ([`ServerTls`], [`incoming`]): a controller that is the mesh CA serves its
//!   gRPC port over TLS 1.3 with a certificate it issues itself from its issuer, for
//!   `spiffe://<td>/ns/ferrule-system/sa/ferrule-controller` plus the DNS names and addresses
//!   of `--api-san`, and issues again at 70 % of its lifetime or as soon as the CA changes.
//!   A client certificate is optional at the TLS layer (a proxy's bootstrap call has none
//!   yet) but one that is presented must chain to the trust bundle, or the handshake fails.
//!   Each accepted connection's first byte tells a TLS ClientHello from plaintext, as the
//!   proxy's inbound does; plaintext is still served so that a caller that was not given the
//!   trust anchors gets one clear UNAUTHENTICATED status rather than a broken connection.
//! * **Authentication** ([`Caller`]): the verified client certificate's SPIFFE id (the admin's,
//!   or a workload's), or an admin token in `authorization: Bearer`, which is accepted over
//!   TLS only.
//! * **Authorization** ([`AuthLayer`]) per RPC: `Identity/Certify` and `WatchTrustBundle` are
//!   open to any TLS caller (the bootstrap); Registry, Discovery, Config and `Identity/Status`
//!   need a workload or the admin; Admin and `Identity/CreateJoinToken` need the admin. The
//!   Registry then checks that a proxy touches only its own endpoints ([`may_register`],
//!   [`may_announce`]) and leases (`registry`). No credential is UNAUTHENTICATED, a wrong one
//!   PERMISSION_DENIED; each refusal is logged and counted (`api_calls_refused_total`).
//!
//! `--api-auth off` keeps TLS but checks nothing (a migration step); a controller without a
//! CA serves plaintext and checks nothing, and says so at start.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use ferrule_ca::Ca;
use ferrule_proto::identity::{
    SpiffeId, admin_identity, controller_identity, identity_of_certificate,
};
use ferrule_proto::names::namespace_or_default;
use ferrule_proto::v1::{Endpoint, ProxyInfo};
use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

use crate::metrics::{Metrics, ReasonLabel};

/// Whether the API checks its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiAuth {
    /// Every call needs the credential its RPC asks for.
    Required,
    /// TLS (and plaintext) is served but nothing is checked: a step while callers are given
    /// their credentials; the default for now.
    #[default]
    Off,
}

impl std::str::FromStr for ApiAuth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(Self::Required),
            "off" => Ok(Self::Off),
            _ => Err(format!("{s:?}: expected required or off")),
        }
    }
}

/// How the API is protected.
#[derive(Debug, Clone, Default)]
pub struct AuthOptions {
    pub mode: ApiAuth,
    /// DNS names and IP addresses the server certificate carries beside the controller's
    /// identity (the listen address when empty).
    pub names: Vec<String>,
    /// A file holding the admin token (`ferrule identity init` writes `admin-token`).
    pub admin_token_file: Option<PathBuf>,
}

/// The admin token's file in an identity dir, as `ferrule identity init` writes it.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// How long a new connection may take to send its first byte and finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The controller's own certificate is issued again after this share of its lifetime.
const RENEW_AT: f64 = 0.7;
/// After a failed issue, the next attempt.
const RETRY_ISSUE: Duration = Duration::from_secs(10);
/// The first byte of a TLS record carrying a handshake (the ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a connection proved, attached to each of its requests.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    pub tls: bool,
    /// The verified client certificate's identity.
    pub identity: Option<SpiffeId>,
}

/// Who is calling, as the [`AuthLayer`] established it; in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Nothing is checked (no CA, or `--api-auth off`).
    Unchecked,
    /// TLS without a credential.
    Anonymous,
    /// The admin certificate or the admin token.
    Admin,
    /// A workload's certificate.
    Workload(SpiffeId),
}

/// The caller a handler was reached by (unchecked when no [`AuthLayer`] ran, as in unit
/// tests of the services).
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Unchecked)
}

/// A proxy registers endpoints in its own namespace only, each announcing its own identity
/// (so clients will accept no other certificate for them).
///
/// Which service a workload serves is not tied to its service account: in Kubernetes pods
/// often share an account (`default`), and anyone who may create pods in a namespace may run
/// them under any of its accounts, so the namespace is the boundary Kubernetes itself draws.
/// What a workload cannot do is announce another's identity, or register outside its
/// namespace: an endpoint it registers is reachable only as itself.
pub fn may_register(caller: &Caller, ep: &Endpoint) -> Result<(), Status> {
    let Caller::Workload(id) = caller else {
        return Ok(());
    };
    let namespace = namespace_or_default(&ep.namespace);
    if namespace != id.namespace {
        return Err(Status::permission_denied(format!(
            "{id} may register endpoints in namespace {} only, not of service {} in namespace {namespace}",
            id.namespace, ep.service
        )));
    }
    if ep.identity != id.to_string() {
        return Err(Status::permission_denied(format!(
            "{id} must announce its own identity for its endpoint of service {}, not {:?}",
            ep.service, ep.identity
        )));
    }
    Ok(())
}

/// A proxy announces itself in its own namespace only.
pub fn may_announce(caller: &Caller, proxy: &ProxyInfo) -> Result<(), Status> {
    let Caller::Workload(id) = caller else {
        return Ok(());
    };
    let namespace = namespace_or_default(&proxy.namespace);
    if namespace != id.namespace {
        return Err(Status::permission_denied(format!(
            "{id} may announce a proxy in namespace {} only, not of service {:?} in namespace {namespace}",
            id.namespace, proxy.service
        )));
    }
    Ok(())
}

/// What an RPC asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any TLS caller: the bootstrap of a proxy's identity.
    Anyone,
    /// A workload (a proxy's certificate) or the admin.
    Member,
    /// The admin.
    Admin,
}

fn need(path: &str) -> Need {
    let rpc = path.trim_start_matches('/');
    match rpc.split_once('/') {
        Some(("ferrule.v1.Identity", "Certify" | "WatchTrustBundle")) => Need::Anyone,
        Some(("ferrule.v1.Identity", "Status")) => Need::Member,
        Some(("ferrule.v1.Registry" | "ferrule.v1.Discovery" | "ferrule.v1.Config", _)) => {
            Need::Member
        }
        // Admin, CreateJoinToken, and whatever is added later until someone decides.
        _ => Need::Admin,
    }
}

/// The admin token's SHA-256, re-read from its file now and then.
#[derive(Clone, Default)]
struct AdminToken(Arc<RwLock<Option<[u8; 32]>>>);

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl AdminToken {
    fn load(&self, path: &std::path::Path) -> Result<bool, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                *self.0.write().expect("not poisoned") = None;
                return Ok(false);
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let token = text.trim();
        if token.len() < 32 {
            return Err(format!(
                "{}: an admin token must have at least 32 characters",
                path.display()
            ));
        }
        *self.0.write().expect("not poisoned") = Some(sha256(token.as_bytes()));
        Ok(true)
    }

    /// Compares digests without an early exit.
    fn matches(&self, presented: &str) -> bool {
        let Some(expected) = *self.0.read().expect("not poisoned") else {
            return false;
        };
        let got = sha256(presented.as_bytes());
        expected
            .iter()
            .zip(got)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Decides every call; shared by the layer's clones.
pub struct Authorizer {
    mode: ApiAuth,
    ca: watch::Receiver<Option<Arc<Ca>>>,
    token: AdminToken,
    metrics: Arc<Metrics>,
}

impl Authorizer {
    /// Checks with the CA `ca` follows; reads the admin token from `options.admin_token_file`
    /// at start and every `check_interval` until `shutdown`.
    pub fn new(
        options: &AuthOptions,
        ca: watch::Receiver<Option<Arc<Ca>>>,
        metrics: Arc<Metrics>,
        check_interval: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let token = AdminToken::default();
        if let Some(path) = options.admin_token_file.clone() {
            if token.load(&path).map_err(anyhow::Error::msg)? {
                tracing::info!(file = %path.display(), "admin token loaded");
            }
            let token = token.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(check_interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        () = shutdown.cancelled() => return,
                    }
                    if let Err(error) = token.load(&path) {
                        tracing::error!(%error, "the admin token file does not load; keeping the token in use");
                    }
                }
            });
        }
        Ok(Arc::new(Self {
            mode: options.mode,
            ca,
            token,
            metrics,
        }))
    }

    fn refuse(
        &self,
        reason: &'static str,
        rpc: &str,
        peer: Option<&Peer>,
        status: Status,
    ) -> Status {
        self.metrics
            .api_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
        tracing::info!(
            rpc,
            reason,
            remote = ?peer.and_then(|p| p.remote),
            identity = ?peer.and_then(|p| p.identity.as_ref()).map(ToString::to_string),
            message = status.message(),
            "API call refused"
        );
        status
    }

    /// Who calls, from the connection and the headers.
    fn identify(
        &self,
        peer: Option<&Peer>,
        headers: &http::HeaderMap,
        rpc: &str,
    ) -> Result<Caller, Status> {
        let Some(trust_domain) = self
            .ca
            .borrow()
            .as_ref()
            .map(|ca| ca.trust_domain().to_string())
        else {
            return Ok(Caller::Unchecked);
        };
        if !peer.is_some_and(|p| p.tls) {
            return Err(self.refuse(
                "plaintext",
                rpc,
                peer,
                Status::unauthenticated(
                    "this controller's API needs TLS: give the proxy --identity-trust-anchors, \
                     the CLI --ca-file (docs/identity.md, \"The controller's API\")",
                ),
            ));
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .unwrap_or_default();
            if !token.is_empty() && self.token.matches(token) {
                return Ok(Caller::Admin);
            }
            return Err(self.refuse(
                "bad_token",
                rpc,
                peer,
                Status::unauthenticated("the admin token is not this controller's"),
            ));
        }
        match peer.and_then(|p| p.identity.clone()) {
            Some(id) if admin_identity(&trust_domain).is_ok_and(|admin| admin == id) => {
                Ok(Caller::Admin)
            }
            Some(id) if id.trust_domain == trust_domain => Ok(Caller::Workload(id)),
            Some(id) => Err(self.refuse(
                "other_trust_domain",
                rpc,
                peer,
                Status::permission_denied(format!(
                    "{id} is not of this mesh's trust domain {trust_domain}"
                )),
            )),
            None => Ok(Caller::Anonymous),
        }
    }

    /// The caller of a request to `path`, or the status refusing it.
    fn authorize(
        &self,
        path: &str,
        peer: Option<&Peer>,
        headers: &http::HeaderMap,
    ) -> Result<Caller, Status> {
        if self.mode == ApiAuth::Off {
            return Ok(Caller::Unchecked);
        }
        let rpc = path.trim_start_matches('/');
        let caller = self.identify(peer, headers, rpc)?;
        let need = need(path);
        match (&caller, need) {
            (Caller::Unchecked | Caller::Admin, _) | (_, Need::Anyone) => Ok(caller),
            (Caller::Workload(_), Need::Member) => Ok(caller),
            (Caller::Anonymous, _) => Err(self.refuse(
                "no_credential",
                rpc,
                peer,
                Status::unauthenticated(format!(
                    "{rpc} needs a credential: {}",
                    match need {
                        Need::Admin => "the admin certificate or token (ferrule identity init writes them)",
                        _ => "a proxy's certificate from the mesh CA, or the admin certificate or token",
                    }
                )),
            )),
            (Caller::Workload(id), _) => Err(self.refuse(
                "not_admin",
                rpc,
                peer,
                Status::permission_denied(format!(
                    "{id} may not call {rpc}: it needs the admin certificate or token"
                )),
            )),
        }
    }
}

/// The tower layer that puts [`Authorizer`] in front of every service.
#[derive(Clone)]
pub struct AuthLayer(pub Arc<Authorizer>);

impl<S> Layer<S> for AuthLayer {
    type Service = Authorized<S>;
    fn layer(&self, inner: S) -> Authorized<S> {
        Authorized {
            inner,
            authorizer: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorized<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
}

impl<S, B, RB> Service<Request<B>> for Authorized<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let decision = self.authorizer.authorize(
            req.uri().path(),
            req.extensions().get::<Peer>(),
            req.headers(),
        );
        match decision {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Either::Left(self.inner.call(req))
            }
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

/// The controller's server credentials, replaced whole when issued again.
struct ServerCreds {
    key: Arc<CertifiedKey>,
    clients: Arc<dyn ClientCertVerifier>,
}

/// The TLS side of the gRPC port: the controller's own certificate, issued from the CA in use
/// and issued again before it expires or when the CA changes.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCreds")
    }
}

#[derive(Debug, Clone)]
struct Current(Arc<RwLock<Option<Arc<ServerCreds>>>>);

impl Current {
    fn get(&self) -> Option<Arc<ServerCreds>> {
        self.0.read().expect("not poisoned").clone()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().map(|c| c.key.clone())
    }
}

impl ClientCertVerifier for Current {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

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
            .ok_or(rustls::Error::General("no server certificate yet".into()))?;
        current
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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

/// Issues the controller's certificate (a fresh key each time) from `ca`, with `names` beside
/// its identity; returns the credentials and when to issue again.
fn issue(ca: &Ca, names: &[String]) -> Result<(ServerCreds, Duration), String> {
    let identity = controller_identity(ca.trust_domain()).map_err(|e| e.to_string())?;
    let key = rcgen::KeyPair::generate().map_err(|e| format!("making a key: {e}"))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| format!("making a CSR: {e}"))?;
    let now = time::OffsetDateTime::now_utc();
    let leaf = ca
        .sign_with_names(
            csr.der(),
            &identity,
            names,
            ferrule_ca::DEFAULT_LEAF_LIFETIME,
            now,
        )
        .map_err(|e| e.to_string())?;
    let not_after = ferrule_ca::CertInfo::of(&leaf)
        .map_err(|e| e.to_string())?
        .not_after;
    let mut chain = vec![leaf];
    chain.extend(ca.chain().iter().cloned());
    let certified = CertifiedKey::from_der(
        chain,
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        &provider(),
    )
    .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for anchor in ca.anchors() {
        roots.add(anchor.clone()).map_err(|e| e.to_string())?;
    }
    let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    let left = (not_after - now).whole_seconds().max(0) as u64;
    Ok((
        ServerCreds {
            key: Arc::new(certified),
            clients,
        },
        Duration::from_secs(left).mul_f64(RENEW_AT),
    ))
}

impl ServerTls {
    /// Issues the first certificate now (an error if the CA cannot) and keeps it fresh until
    /// `shutdown`.
    pub fn start(
        mut ca: watch::Receiver<Option<Arc<Ca>>>,
        names: Vec<String>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let first = ca
            .borrow_and_update()
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no mesh CA to issue the API's certificate from"))?;
        let (creds, mut renew_in) = issue(&first, &names)
            .map_err(|e| anyhow::anyhow!("issuing the controller's API certificate: {e}"))?;
        tracing::info!(
            identity = %controller_identity(first.trust_domain()).map(|i| i.to_string()).unwrap_or_default(),
            names = ?names,
            "API certificate issued"
        );
        let current = Arc::new(RwLock::new(Some(Arc::new(creds))));
        let resolver = Current(current.clone());
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(resolver.clone()))
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed handshake carries the client certificate (or its
        // absence) of the session it resumes, so a proxy that bootstrapped without one would
        // stay anonymous, and a certificate's anchor removed later would still be trusted.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        let tls = Self {
            config: Arc::new(config),
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(renew_in) => {}
                    changed = ca.changed() => if changed.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
                let Some(now_ca) = ca.borrow_and_update().clone() else {
                    continue;
                };
                match issue(&now_ca, &names) {
                    Ok((creds, next)) => {
                        tracing::info!("API certificate issued again");
                        *current.write().expect("not poisoned") = Some(Arc::new(creds));
                        renew_in = next;
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot issue the controller's API certificate; serving the one it has");
                        renew_in = RETRY_ISSUE;
                    }
                }
            }
        });
        Ok(tls)
    }
}

/// A connection to the gRPC port: plaintext, or TLS with what the client proved.
pub enum Conn {
    Plain(TcpStream, Peer),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Peer),
}

impl Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        match self {
            Conn::Plain(_, peer) | Conn::Tls(_, peer) => peer.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// The gRPC port's connections: accepted, told apart (TLS or plaintext) and, for TLS,
/// handshaken each in its own task, so a slow client never holds up the others. Ends when
/// `shutdown` is cancelled.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, say: the listener itself is fine.
                        tracing::warn!(%error, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let peer = Peer {
                remote: Some(remote),
                tls: false,
                identity: None,
            };
            let Some(tls) = tls.clone() else {
                if tx.send(Ok(Conn::Plain(stream, peer))).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(stream, peer, &tls)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(error)) => {
                        metrics
                            .api_refused
                            .get_or_create(&ReasonLabel {
                                reason: "tls_handshake".into(),
                            })
                            .inc();
                        tracing::info!(%remote, %error, "TLS handshake on the API refused");
                    }
                    Err(_) => tracing::debug!(%remote, "no TLS handshake within the timeout"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept(stream: TcpStream, mut peer: Peer, tls: &ServerTls) -> io::Result<Conn> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    if n == 0 || first[0] != TLS_HANDSHAKE {
        return Ok(Conn::Plain(stream, peer));
    }
    let stream = tokio_rustls::TlsAcceptor::from(tls.config.clone())
        .accept(stream)
        .await?;
    peer.tls = true;
    peer.identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|leaf| identity_of_certificate(leaf.as_ref()))
        .transpose()
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("client certificate: {e}"),
            )
        })?;
    Ok(Conn::Tls(Box::new(stream), peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn each_rpc_asks_for_a_credential() {
        assert_eq!(need("/ferrule.v1.Identity/Certify"), Need::Anyone);
        assert_eq!(need("/ferrule.v1.Identity/WatchTrustBundle"), Need::Anyone);
        assert_eq!(need("/ferrule.v1.Identity/Status"), Need::Member);
        assert_eq!(need("/ferrule.v1.Identity/CreateJoinToken"), Need::Admin);
        assert_eq!(need("/ferrule.v1.Registry/Register"), Need::Member);
        assert_eq!(need("/ferrule.v1.Discovery/Watch"), Need::Member);
        assert_eq!(need("/ferrule.v1.Config/Watch"), Need::Member);
        assert_eq!(need("/ferrule.v1.Admin/ApplyConfig"), Need::Admin);
        assert_eq!(need("/ferrule.v1.Admin/ListServices"), Need::Admin);
        assert_eq!(
            need("/grpc.reflection.v1.ServerReflection/Info"),
            Need::Admin
        );
        assert_eq!(need("garbage"), Need::Admin);
    }

    #[test]
    fn a_proxy_registers_its_own_endpoints_only() {
        const USER: &str = "spiffe://cluster.local/ns/shop/sa/user";
        let user = Caller::Workload(id(USER));
        let ep = |service: &str, namespace: &str, identity: &str| Endpoint {
            service: service.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            ..Default::default()
        };
        // Any service of its namespace, as itself: a pod's account need not be its service's.
        for good in [ep("user", "shop", USER), ep("web", "shop", USER)] {
            assert!(may_register(&user, &good).is_ok(), "{good:?}");
        }
        for (bad, says) in [
            (ep("user", "default", USER), "in namespace shop only"),
            (ep("user", "", USER), "in namespace shop only"),
            (ep("user", "shop", ""), "must announce its own identity"),
            (
                ep("user", "shop", "spiffe://cluster.local/ns/shop/sa/payment"),
                "must announce its own identity",
            ),
        ] {
            let status = may_register(&user, &bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{bad:?}");
            assert!(status.message().contains(USER), "{}", status.message());
            assert!(status.message().contains(says), "{}", status.message());
        }
        for free in [Caller::Admin, Caller::Unchecked] {
            assert!(may_register(&free, &ep("payment", "shop", "")).is_ok());
        }
        let announce = |service: &str, namespace: &str| ProxyInfo {
            service: service.into(),
            namespace: namespace.into(),
            ..Default::default()
        };
        assert!(may_announce(&user, &announce("user", "shop")).is_ok());
        assert!(may_announce(&user, &announce("", "shop")).is_ok());
        assert!(may_announce(&user, &announce("web", "shop")).is_ok());
        assert!(may_announce(&user, &announce("user", "other")).is_err());
    }

    #[test]
    fn admin_tokens_match_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        let token = AdminToken::default();
        assert!(!token.load(&path).unwrap(), "no file: no token");
        assert!(!token.matches("anything"));
        std::fs::write(&path, "short").unwrap();
        assert!(token.load(&path).is_err());
        let secret = "ferrule-admin-0123456789abcdef0123456789abcdef";
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        assert!(token.load(&path).unwrap());
        assert!(token.matches(secret));
        assert!(!token.matches(&secret[..secret.len() - 1]));
        assert!(!token.matches(""));
    }
}
