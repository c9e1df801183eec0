//! A proxy's certificate as it reports it ([`ProxyCertificate`], sent with its announce), and
//! how that certificate stands against the trust bundle in force.
//!
//! The proxy fills the report ([`report`], with the `x509` feature): the identity, the
//! validity, and the fingerprint of the trust anchor its chain goes up to. The controller's
//! dashboard, `ferrule identity status` and `ferrule check` judge it with
//! [`certificate_problem`], so the three flag the same proxies for the same reasons.

use std::fmt;

use crate::v1::ProxyCertificate;

/// Why a proxy's certificate needs a look. The most serious applies when several do, in this
/// order: no certificate, expired, an anchor not in the bundle, expiring soon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateProblem {
    /// The proxy runs with identity but has no certificate from the mesh CA yet.
    NoCertificate,
    /// Past its `not_after`: peers refuse mutual TLS with the proxy.
    Expired,
    /// Chains to an anchor that is not in the current trust bundle (or to none the proxy
    /// knows): peers that trust only the current bundle refuse it.
    UnknownAnchor,
    /// Less than [`SOON_SHARE`] of its lifetime left: renewal (due at about 70 %) has been
    /// failing.
    ExpiresSoon,
}

/// Share of a certificate's lifetime under which the time left counts as "soon".
pub const SOON_SHARE: f64 = 0.1;

impl CertificateProblem {
    /// Stable machine name, as in JSON output: `no_certificate`, `expired`, `unknown_anchor`,
    /// `expires_soon`.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::Expired => "expired",
            Self::UnknownAnchor => "unknown_anchor",
            Self::ExpiresSoon => "expires_soon",
        }
    }

    /// Reads a [`CertificateProblem::code`] back.
    pub fn from_code(code: &str) -> Option<Self> {
        [
            Self::NoCertificate,
            Self::Expired,
            Self::UnknownAnchor,
            Self::ExpiresSoon,
        ]
        .into_iter()
        .find(|p| p.code() == code)
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            Self::NoCertificate => {
                "the proxy cannot get a certificate: read its log (\"no certificate from the mesh CA yet\" says why) and check its bootstrap token and that the controller is its CA"
            }
            Self::Expired => {
                "renewal has failed until the certificate expired: read the proxy's log and its identity_renewal_failures metric; restart it with a valid bootstrap token if its certificate can no longer renew"
            }
            Self::UnknownAnchor => {
                "the proxy's certificate chains to an anchor no longer in the trust bundle: put that anchor back in the bundle until the proxy has renewed from the current issuer (or restart the proxy), then remove it again (docs/identity.md, rotation)"
            }
            Self::ExpiresSoon => {
                "renewal is failing: read the proxy's log and its identity_renewal_failures metric, and check the controller's CA (ferrule identity status)"
            }
        }
    }
}

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoCertificate => "no certificate yet",
            Self::Expired => "expired",
            Self::UnknownAnchor => "chains to an anchor not in the trust bundle",
            Self::ExpiresSoon => "expires soon",
        })
    }
}

/// How `certificate` stands at `now` (unix seconds) against the trust bundle whose anchors'
/// fingerprints are `bundle`. `None` for a proxy without identity (no report) and for a
/// healthy certificate.
pub fn certificate_problem(
    certificate: Option<&ProxyCertificate>,
    bundle: &[String],
    now: i64,
) -> Option<CertificateProblem> {
    let cert = certificate?;
    if cert.identity.is_empty() {
        return Some(CertificateProblem::NoCertificate);
    }
    if cert.not_after <= now {
        return Some(CertificateProblem::Expired);
    }
    if !bundle
        .iter()
        .any(|f| f.eq_ignore_ascii_case(&cert.anchor_fingerprint))
    {
        return Some(CertificateProblem::UnknownAnchor);
    }
    let lifetime = (cert.not_after - cert.not_before).max(1) as f64;
    if ((cert.not_after - now) as f64) < lifetime * SOON_SHARE {
        return Some(CertificateProblem::ExpiresSoon);
    }
    None
}

/// Seconds since the Unix epoch: the `now` to judge certificates at.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Hex SHA-256 of `der`: how anchors and issuers are told apart everywhere.
#[cfg(feature = "x509")]
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The report a proxy sends for its certificate `chain` (leaf first, then the issuer and any
/// intermediates), given the trust `anchors` it knows: the anchor is the one whose key signed
/// the top of the chain. `Err` when the leaf does not parse or carries no identity.
#[cfg(feature = "x509")]
pub fn report(chain: &[&[u8]], anchors: &[&[u8]]) -> Result<ProxyCertificate, String> {
    let leaf = chain.first().ok_or("no certificate")?;
    let identity = crate::identity::identity_of_certificate(leaf)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let validity = parsed.validity();
    Ok(ProxyCertificate {
        identity: identity.to_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        anchor_fingerprint: anchor_of(chain, anchors).unwrap_or_default(),
    })
}

/// Fingerprint of the anchor among `anchors` that signed the top of `chain` (or that is the
/// top of the chain itself).
#[cfg(feature = "x509")]
fn anchor_of(chain: &[&[u8]], anchors: &[&[u8]]) -> Option<String> {
    let top_der: &[u8] = chain.last()?;
    let (_, top) = x509_parser::parse_x509_certificate(top_der).ok()?;
    anchors
        .iter()
        .copied()
        .find(|anchor| {
            *anchor == top_der
                || x509_parser::parse_x509_certificate(anchor)
                    .is_ok_and(|(_, a)| top.verify_signature(Some(a.public_key())).is_ok())
        })
        .map(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn cert(not_before: i64, not_after: i64, anchor: &str) -> ProxyCertificate {
        ProxyCertificate {
            identity: "spiffe://cluster.local/ns/default/sa/user".into(),
            not_before,
            not_after,
            anchor_fingerprint: anchor.into(),
        }
    }

    #[test]
    fn problems_are_classified_most_serious_first() {
        let bundle = vec!["aa".to_string(), "bb".to_string()];
        let now = 10 * DAY;
        let check = |c: Option<&ProxyCertificate>| certificate_problem(c, &bundle, now);
        assert_eq!(check(None), None, "no identity: nothing to flag");
        assert_eq!(
            check(Some(&ProxyCertificate::default())),
            Some(CertificateProblem::NoCertificate)
        );
        // Issued a day ago for a day: just expired, even with an unknown anchor.
        assert_eq!(
            check(Some(&cert(now - DAY, now, "cc"))),
            Some(CertificateProblem::Expired)
        );
        assert_eq!(
            check(Some(&cert(now - 1, now + DAY, "cc"))),
            Some(CertificateProblem::UnknownAnchor)
        );
        assert_eq!(
            check(Some(&cert(now - 1, now + DAY, ""))),
            Some(CertificateProblem::UnknownAnchor),
            "an anchor the proxy could not tell is not one in the bundle"
        );
        // 2 h 24 min is 10 % of a day: just under it is soon, just over it is fine.
        let tenth = DAY / 10;
        assert_eq!(
            check(Some(&cert(now + tenth - 1 - DAY, now + tenth - 1, "BB"))),
            Some(CertificateProblem::ExpiresSoon),
            "fingerprints compare without regard to case"
        );
        assert_eq!(
            check(Some(&cert(now + tenth + 1 - DAY, now + tenth + 1, "bb"))),
            None
        );
        assert_eq!(check(Some(&cert(now - 1, now + DAY, "aa"))), None);
    }

    #[test]
    fn codes_round_trip() {
        for p in [
            CertificateProblem::NoCertificate,
            CertificateProblem::Expired,
            CertificateProblem::UnknownAnchor,
            CertificateProblem::ExpiresSoon,
        ] {
            assert_eq!(CertificateProblem::from_code(p.code()), Some(p));
        }
        assert_eq!(CertificateProblem::from_code("fine"), None);
    }
}
