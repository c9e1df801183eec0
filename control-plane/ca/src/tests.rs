use super::*;
use proptest::prelude::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

struct Mesh {
    anchor: Generated,
    issuer: Generated,
    ca: Ca,
}

fn mesh(issuer_lifetime: Duration) -> Mesh {
    let anchor = new_trust_anchor("cluster.local", 365 * DAY).unwrap();
    let issuer = new_issuer(
        &anchor.cert_pem,
        &anchor.key_pem,
        "cluster.local",
        issuer_lifetime,
    )
    .unwrap();
    let ca = Ca::from_pem(
        "cluster.local",
        anchor.cert_pem.as_bytes(),
        issuer.cert_pem.as_bytes(),
        &issuer.key_pem,
    )
    .unwrap();
    Mesh { anchor, issuer, ca }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

/// A proxy's CSR; `names` are what a dishonest proxy would ask for.
fn csr(names: &[&str]) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "whoever");
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[test]
fn signs_the_authenticated_identity_and_nothing_else() {
    let m = mesh(30 * DAY);
    // The CSR asks for a DNS name; the certificate carries only the identity the CA was given.
    let (_, der) = csr(&["payment.shop.svc"]);
    let leaf = m.ca.sign(&der, &id("user"), DAY, now()).unwrap();
    assert_eq!(identity_of_certificate(&leaf).unwrap(), id("user"));
    let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1, "{:?}", san.value);
    assert!(!cert.is_ca());
    let lifetime =
        cert.validity().not_after.to_datetime() - cert.validity().not_before.to_datetime();
    assert_eq!(
        lifetime,
        time::Duration::try_from(DAY + CLOCK_SKEW).unwrap()
    );
}

#[test]
fn leaf_verifies_as_client_and_server_against_the_bundle() {
    let m = mesh(30 * DAY);
    let (_, der) = csr(&[]);
    let leaf = m.ca.sign(&der, &id("user"), DAY, now()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(m.ca.anchors()[0].clone()).unwrap();
    let roots = std::sync::Arc::new(roots);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .unwrap();
    client
        .verify_client_cert(&leaf, m.ca.chain(), UnixTime::now())
        .unwrap();
    let parsed = rustls::server::ParsedCertificate::try_from(&leaf).unwrap();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        m.ca.chain(),
        UnixTime::now(),
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
    .unwrap();
}

#[test]
fn leaf_never_outlives_the_issuer() {
    let m = mesh(Duration::from_secs(3600));
    let (_, der) = csr(&[]);
    let leaf = m.ca.sign(&der, &id("user"), DAY, now()).unwrap();
    let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
    assert_eq!(
        cert.validity().not_after.to_datetime(),
        m.ca.issuer_info().not_after
    );
}

#[test]
fn expired_issuer_signs_nothing() {
    let m = mesh(Duration::from_secs(3600));
    let (_, der) = csr(&[]);
    let later = now() + time::Duration::hours(2);
    assert!(matches!(
        m.ca.sign(&der, &id("user"), DAY, later),
        Err(SignError::IssuerExpired(_))
    ));
}

#[test]
fn malformed_and_oversized_csrs_are_refused() {
    let m = mesh(30 * DAY);
    let (_, mut der) = csr(&[]);
    assert!(matches!(
        m.ca.sign(b"not a csr", &id("user"), DAY, now()),
        Err(SignError::MalformedCsr(_))
    ));
    // A CSR whose signature does not match its content: someone else's key.
    let last = der.len() - 1;
    der[last] ^= 0xff;
    assert!(matches!(
        m.ca.sign(&der, &id("user"), DAY, now()),
        Err(SignError::MalformedCsr(_))
    ));
    let big = vec![0x30; MAX_CSR_BYTES + 1];
    let err = m.ca.sign(&big, &id("user"), DAY, now()).unwrap_err();
    assert!(err.to_string().contains("more than"), "{err}");
}

#[test]
fn files_that_do_not_fit_together_are_refused() {
    let m = mesh(30 * DAY);
    let other = mesh(30 * DAY);
    let load = |anchors: &str, cert: &str, key: &str| {
        Ca::from_pem("cluster.local", anchors.as_bytes(), cert.as_bytes(), key)
            .unwrap_err()
            .to_string()
    };
    let err = load(
        &m.anchor.cert_pem,
        &m.issuer.cert_pem,
        &other.issuer.key_pem,
    );
    assert!(
        err.contains("issuer key") && err.contains("does not belong"),
        "{err}"
    );
    let err = load(
        &other.anchor.cert_pem,
        &m.issuer.cert_pem,
        &m.issuer.key_pem,
    );
    assert!(err.contains("not signed by any trust anchor"), "{err}");
    let err = load("", &m.issuer.cert_pem, &m.issuer.key_pem);
    assert!(err.contains("trust bundle"), "{err}");
    let err = load(&m.anchor.cert_pem, "garbage", &m.issuer.key_pem);
    assert!(err.contains("issuer certificate"), "{err}");
    let err = Ca::from_pem(
        "other.domain",
        m.anchor.cert_pem.as_bytes(),
        m.issuer.cert_pem.as_bytes(),
        &m.issuer.key_pem,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("trust domain \"cluster.local\""), "{err}");
}

#[test]
fn a_bundle_may_hold_several_anchors() {
    let m = mesh(30 * DAY);
    let other = mesh(30 * DAY);
    let bundle = format!("{}{}", other.anchor.cert_pem, m.anchor.cert_pem);
    let ca = Ca::from_pem(
        "cluster.local",
        bundle.as_bytes(),
        m.issuer.cert_pem.as_bytes(),
        &m.issuer.key_pem,
    )
    .unwrap();
    assert_eq!(ca.anchors().len(), 2);
    assert_eq!(ca.issuer_anchor(), fingerprint(&m.ca.anchors()[0]));
}

#[test]
fn a_proxy_reports_the_anchor_its_chain_goes_up_to() {
    let old = mesh(30 * DAY);
    let new = mesh(30 * DAY);
    let (_, der) = csr(&[]);
    let leaf = new.ca.sign(&der, &id("user"), DAY, now()).unwrap();
    let chain: Vec<&[u8]> = std::iter::once(leaf.as_ref())
        .chain(new.ca.chain().iter().map(|c| c.as_ref()))
        .collect();
    // A rotation's bundle: the old anchor and the new one, in either order.
    let anchors: Vec<&[u8]> = vec![old.ca.anchors()[0].as_ref(), new.ca.anchors()[0].as_ref()];
    let report = ferrule_proto::certificate::report(&chain, &anchors).unwrap();
    assert_eq!(report.identity, id("user").to_string());
    assert_eq!(report.anchor_fingerprint, new.ca.issuer_anchor());
    assert_ne!(report.anchor_fingerprint, old.ca.issuer_anchor());
    let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
    assert_eq!(report.not_after, cert.validity().not_after.timestamp());
    assert_eq!(report.not_before, cert.validity().not_before.timestamp());
    // Only the old anchor known: the proxy cannot tell, and says so with no fingerprint.
    let unknown = ferrule_proto::certificate::report(&chain, &anchors[..1]).unwrap();
    assert_eq!(unknown.anchor_fingerprint, "");
    assert!(ferrule_proto::certificate::report(&[b"junk".as_slice()], &anchors).is_err());
}

#[test]
fn renewal_proves_the_identity_of_the_current_certificate() {
    let m = mesh(30 * DAY);
    let (key, der) = csr(&[]);
    let leaf = m.ca.sign(&der, &id("user"), DAY, now()).unwrap();
    // The same key's next CSR proves the identity.
    let params = CertificateParams::default();
    let again = params.serialize_request(&key).unwrap().der().to_vec();
    assert_eq!(
        m.ca.renewal_identity(&leaf, &again, UnixTime::now())
            .unwrap(),
        id("user")
    );
    // Someone who copied the certificate but holds another key proves nothing.
    let (_, theirs) = csr(&[]);
    assert_eq!(
        m.ca.renewal_identity(&leaf, &theirs, UnixTime::now()),
        Err(RenewalError::OtherKey)
    );
    // A certificate of another mesh proves nothing here.
    let other = mesh(30 * DAY);
    let foreign = other.ca.sign(&again, &id("user"), DAY, now()).unwrap();
    assert!(matches!(
        m.ca.renewal_identity(&foreign, &again, UnixTime::now()),
        Err(RenewalError::Invalid(_))
    ));
    // An expired one neither.
    let later = UnixTime::since_unix_epoch(
        (std::time::SystemTime::now() + 2 * DAY)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
    );
    assert!(matches!(
        m.ca.renewal_identity(&leaf, &again, later),
        Err(RenewalError::Invalid(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_pass_as_a_csr(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let m = mesh_once();
        prop_assert!(m.ca.sign(&bytes, &id("user"), DAY, now()).is_err());
        prop_assert!(m.ca.renewal_identity(&bytes, &bytes, UnixTime::now()).is_err());
    }

    #[test]
    fn mangled_csrs_never_panic(flip in 0usize..400, value in any::<u8>()) {
        let m = mesh_once();
        let (_, mut der) = csr(&[]);
        let i = flip % der.len();
        der[i] = value;
        // Either refused or, when the byte did not change anything that matters, signed for the
        // authenticated identity: never a panic, never another identity.
        if let Ok(leaf) = m.ca.sign(&der, &id("user"), DAY, now()) {
            prop_assert_eq!(identity_of_certificate(&leaf).unwrap(), id("user"));
        }
    }
}

fn mesh_once() -> &'static Mesh {
    static MESH: std::sync::OnceLock<Mesh> = std::sync::OnceLock::new();
    MESH.get_or_init(|| mesh(30 * DAY))
}
