//! The mesh CA's certificate work, shared by the controller (which signs) and the CLI (which
//! creates a new mesh's trust anchor and issuer).
//!
//! * A **trust anchor** is a self-signed CA certificate; the **trust bundle** is every anchor
//!   proxies accept, several at once during a rotation.
//! * The **issuer** is an intermediate CA signed by one anchor; its key signs every workload
//!   certificate. It lives in files (a Kubernetes Secret in a cluster) the controller reads
//!   and re-reads; this crate never makes one up unless asked to ([`new_trust_anchor`],
//!   [`new_issuer`], for `ferrule identity init`).
//! * A **leaf** is a workload certificate: the CSR's public key, one URI SAN with the identity
//!   the controller authenticated (never a name from the CSR), both TLS usages, valid for the
//!   requested lifetime but never past the issuer.
//!
//! Every key is ECDSA P-256.

use std::time::Duration;

use ferrule_proto::identity::{SpiffeId, identity_of_certificate, validate_trust_domain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// How long a workload certificate is valid unless asked otherwise.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this much before they are signed, for peers whose clocks run behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// A CSR larger than this is not one a proxy made.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// Why the CA's files cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

fn invalid(what: &'static str, reason: impl Into<String>) -> LoadError {
    LoadError::Invalid {
        what,
        reason: reason.into(),
    }
}

/// Why a CSR was not signed. Each maps to one gRPC status in the controller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("the issuer expired at {0}; install a new issuer (docs/identity.md, rotation)")]
    IssuerExpired(OffsetDateTime),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Why a certificate presented for renewal does not prove an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewalError {
    #[error("the current certificate is not valid: {0}")]
    Invalid(String),
    #[error("the current certificate is for another key than the CSR")]
    OtherKey,
}

/// A certificate and its key, PEM-encoded, as `ferrule identity init` writes them.
#[derive(Debug, Clone)]
pub struct Generated {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new self-signed trust anchor for `trust_domain`, valid for `lifetime`.
pub fn new_trust_anchor(trust_domain: &str, lifetime: Duration) -> Result<Generated, LoadError> {
    validate_trust_domain(trust_domain).map_err(|e| invalid("trust domain", e))?;
    let key = KeyPair::generate().map_err(|e| invalid("trust anchor key", e.to_string()))?;
    let params = ca_params(
        &format!("{trust_domain} trust anchor"),
        trust_domain,
        lifetime,
        None,
    )?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| invalid("trust anchor", e.to_string()))?;
    Ok(Generated {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new issuer signed by the anchor in `anchor_cert_pem`/`anchor_key_pem`, valid for
/// `lifetime` but never past the anchor.
pub fn new_issuer(
    anchor_cert_pem: &str,
    anchor_key_pem: &str,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<Generated, LoadError> {
    validate_trust_domain(trust_domain).map_err(|e| invalid("trust domain", e))?;
    let anchor_key = KeyPair::from_pem(anchor_key_pem)
        .map_err(|e| invalid("trust anchor key", e.to_string()))?;
    let anchor_der = CertificateDer::from_pem_slice(anchor_cert_pem.as_bytes())
        .map_err(|e| invalid("trust anchor certificate", e.to_string()))?;
    let anchor = parse(&anchor_der, "trust anchor certificate")?;
    if anchor.public_key().subject_public_key.data.as_ref() != anchor_key.public_key_raw() {
        return Err(invalid(
            "trust anchor key",
            "does not belong to the trust anchor certificate",
        ));
    }
    let anchor_not_after = anchor.validity().not_after.to_datetime();
    let issuer = Issuer::from_ca_cert_der(&anchor_der, anchor_key)
        .map_err(|e| invalid("trust anchor certificate", e.to_string()))?;
    let key = KeyPair::generate().map_err(|e| invalid("issuer key", e.to_string()))?;
    let params = ca_params(
        &format!("{trust_domain} issuer"),
        trust_domain,
        lifetime,
        Some(anchor_not_after),
    )?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| invalid("issuer", e.to_string()))?;
    Ok(Generated {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn ca_params(
    common_name: &str,
    trust_domain: &str,
    lifetime: Duration,
    not_after_cap: Option<OffsetDateTime>,
) -> Result<CertificateParams, LoadError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // The trust domain itself as a SPIFFE id, so the files say which mesh they belong to.
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|_| invalid("trust domain", "not usable in a URI"))?,
    )];
    params.not_before = now - CLOCK_SKEW;
    let not_after = now + lifetime;
    params.not_after = not_after_cap.map_or(not_after, |cap| not_after.min(cap));
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn random_serial() -> Result<SerialNumber, LoadError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| invalid("serial number", "no randomness from the system"))?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from(bytes.to_vec()))
}

fn parse<'a>(der: &'a [u8], what: &'static str) -> Result<X509Certificate<'a>, LoadError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| invalid(what, format!("does not parse: {e}")))
}

/// A certificate's essentials for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Hex SHA-256 of the DER.
    pub fingerprint: String,
}

impl CertInfo {
    pub fn of(der: &[u8]) -> Result<Self, LoadError> {
        let cert = parse(der, "certificate")?;
        Ok(Self {
            subject: cert.subject().to_string(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            fingerprint: fingerprint(der),
        })
    }
}

/// Hex SHA-256 of `der` (shared with the proxies, which report their anchor by it).
pub use ferrule_proto::certificate::fingerprint;

/// The CA the controller signs with: the trust bundle and the issuer.
pub struct Ca {
    trust_domain: String,
    anchors: Vec<CertificateDer<'static>>,
    /// The issuer's certificate first, then any intermediates up to (not including) an anchor.
    chain: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    issuer_info: CertInfo,
    /// Fingerprint of the anchor the issuer chains to.
    issuer_anchor: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("anchors", &self.anchors.len())
            .field("issuer", &self.issuer_info)
            .finish()
    }
}

impl Ca {
    /// Loads the CA from PEM text: the trust bundle (one or more anchors), the issuer's
    /// certificate (optionally followed by intermediates) and its key. Refuses files that do not
    /// fit together: a key of another certificate, an issuer no anchor signed, an issuer that
    /// is not a CA, a trust domain other than the issuer's.
    pub fn from_pem(
        trust_domain: &str,
        anchors_pem: &[u8],
        issuer_cert_pem: &[u8],
        issuer_key_pem: &str,
    ) -> Result<Self, LoadError> {
        validate_trust_domain(trust_domain).map_err(|e| invalid("trust domain", e))?;
        let anchors: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(anchors_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("trust bundle", e.to_string()))?;
        if anchors.is_empty() {
            return Err(invalid("trust bundle", "holds no certificate"));
        }
        for anchor in &anchors {
            let cert = parse(anchor, "trust bundle")?;
            if !cert.is_ca() {
                return Err(invalid(
                    "trust bundle",
                    format!("{} is not a CA certificate", cert.subject()),
                ));
            }
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(issuer_cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("issuer certificate", e.to_string()))?;
        let Some(issuer_der) = chain.first() else {
            return Err(invalid("issuer certificate", "holds no certificate"));
        };
        let issuer_cert = parse(issuer_der, "issuer certificate")?;
        if !issuer_cert.is_ca() {
            return Err(invalid("issuer certificate", "is not a CA certificate"));
        }
        let key =
            KeyPair::from_pem(issuer_key_pem).map_err(|e| invalid("issuer key", e.to_string()))?;
        if issuer_cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(
                "issuer key",
                "does not belong to the issuer certificate",
            ));
        }
        if let Some(domain) = spiffe_trust_domain(&issuer_cert)
            && domain != trust_domain
        {
            return Err(invalid(
                "issuer certificate",
                format!(
                    "is for trust domain {domain:?}, the controller is configured for {trust_domain:?}"
                ),
            ));
        }
        let top = parse(chain.last().unwrap_or(issuer_der), "issuer certificate")?;
        let issuer_anchor = anchors
            .iter()
            .find(|anchor| {
                parse(anchor, "trust bundle")
                    .is_ok_and(|a| top.verify_signature(Some(a.public_key())).is_ok())
            })
            .map(|anchor| fingerprint(anchor))
            .ok_or_else(|| {
                invalid(
                    "issuer certificate",
                    "is not signed by any trust anchor in the bundle",
                )
            })?;
        let issuer_info = CertInfo::of(issuer_der)?;
        let issuer = Issuer::from_ca_cert_der(issuer_der, key)
            .map_err(|e| invalid("issuer certificate", e.to_string()))?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            anchors,
            chain,
            issuer,
            issuer_info,
            issuer_anchor,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn anchors(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    /// The issuer's certificate and any intermediates, as sent after a leaf.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn issuer_info(&self) -> &CertInfo {
        &self.issuer_info
    }

    pub fn issuer_anchor(&self) -> &str {
        &self.issuer_anchor
    }

    /// Signs the public key of `csr_der` for `identity`, valid from a little before `now` for
    /// `lifetime`, never past the issuer. The CSR's own names and extensions are ignored: only
    /// its key and its signature (proof the requester holds the key) count.
    pub fn sign(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, SignError> {
        self.sign_with_names(csr_der, identity, &[], lifetime, now)
    }

    /// [`Ca::sign`] with DNS names or IP addresses beside the identity, for the controller's
    /// own server certificate (so tools that check a host name can reach its API too).
    pub fn sign_with_names(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        names: &[String],
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, SignError> {
        if now >= self.issuer_info.not_after {
            return Err(SignError::IssuerExpired(self.issuer_info.not_after));
        }
        let csr = parse_csr(csr_der)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.service_account.as_str());
        params.subject_alt_names =
            vec![SanType::URI(identity.to_string().try_into().map_err(
                |_| SignError::Signing(format!("{identity} is not usable in a URI")),
            )?)];
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|_| {
                    SignError::Signing(format!("{name:?} is neither an IP address nor a DNS name"))
                })?),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + lifetime).min(self.issuer_info.not_after);
        params.serial_number =
            Some(random_serial().map_err(|e| SignError::Signing(e.to_string()))?);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| SignError::Signing(e.to_string()))?;
        Ok(cert.der().clone())
    }

    /// The identity `current` proves for a renewal of `csr_der`: `current` must chain to this
    /// CA's bundle, be valid at `now`, and certify the same key the CSR is signed with (so
    /// whoever sends it holds that key).
    pub fn renewal_identity(
        &self,
        current: &[u8],
        csr_der: &[u8],
        now: UnixTime,
    ) -> Result<SpiffeId, RenewalError> {
        self.renewal_identity_after(current, csr_der, now, &[])
    }

    /// [`Ca::renewal_identity`] for a certificate that earlier issuers (`earlier`, certificates
    /// this CA signed with before its issuer was replaced) may have signed: it must still chain
    /// to an anchor of the current bundle. Without them every proxy's renewal after an issuer
    /// rotation would be refused until its certificate expired.
    pub fn renewal_identity_after(
        &self,
        current: &[u8],
        csr_der: &[u8],
        now: UnixTime,
        earlier: &[CertificateDer<'static>],
    ) -> Result<SpiffeId, RenewalError> {
        let csr = parse_csr(csr_der).map_err(|e| RenewalError::Invalid(e.to_string()))?;
        let leaf = CertificateDer::from(current);
        let parsed = rustls::server::ParsedCertificate::try_from(&leaf)
            .map_err(|e| RenewalError::Invalid(e.to_string()))?;
        let roots = self.root_store().map_err(RenewalError::Invalid)?;
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let intermediates: Vec<CertificateDer<'static>> =
            self.chain.iter().chain(earlier).cloned().collect();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &intermediates,
            now,
            algorithms.all,
        )
        .map_err(|e| RenewalError::Invalid(e.to_string()))?;
        let (_, cert) =
            X509Certificate::from_der(current).map_err(|e| RenewalError::Invalid(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != csr.public_key.der_bytes() {
            return Err(RenewalError::OtherKey);
        }
        identity_of_certificate(current).map_err(RenewalError::Invalid)
    }

    fn root_store(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        for anchor in &self.anchors {
            roots.add(anchor.clone()).map_err(|e| e.to_string())?;
        }
        Ok(roots)
    }
}

fn parse_csr(der: &[u8]) -> Result<CertificateSigningRequestParams, SignError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(SignError::MalformedCsr(format!(
            "{} bytes, more than the {MAX_CSR_BYTES} a CSR may have",
            der.len()
        )));
    }
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| SignError::MalformedCsr(e.to_string()))
}

/// The trust domain a CA certificate names in a `spiffe://<domain>` URI SAN, if it has one.
fn spiffe_trust_domain(cert: &X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .filter(|d| !d.contains('/'))
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
