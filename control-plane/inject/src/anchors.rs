//! The trust anchors an injected proxy gets, as PEM text for its environment
//! (`FERRULE_IDENTITY_TRUST_ANCHORS_PEM`): only the `CERTIFICATE` blocks of a bundle file, so
//! that nothing else a file may hold (a comment, a key put there by mistake) is copied into
//! every pod.

use base64::Engine;

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Why a bundle cannot be given to proxies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorsError {
    #[error("holds no PEM CERTIFICATE block")]
    Empty,
    #[error("certificate {index} has no {END} line")]
    Unterminated { index: usize },
    #[error("certificate {index} is not base64: {reason}")]
    NotBase64 { index: usize, reason: String },
}

/// The `CERTIFICATE` blocks of `text`, each checked to be base64, one after the other.
pub fn certificates_pem(text: &str) -> Result<String, AnchorsError> {
    let mut out = String::new();
    let mut rest = text;
    let mut index = 0;
    while let Some(start) = rest.find(BEGIN) {
        index += 1;
        let body_and_more = &rest[start + BEGIN.len()..];
        let end = body_and_more
            .find(END)
            .ok_or(AnchorsError::Unterminated { index })?;
        let body = &body_and_more[..end];
        let compact: String = body.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(&compact)
            .map_err(|e| AnchorsError::NotBase64 {
                index,
                reason: e.to_string(),
            })?;
        out.push_str(BEGIN);
        out.push('\n');
        for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(END);
        out.push('\n');
        rest = &body_and_more[end + END.len()..];
    }
    if out.is_empty() {
        return Err(AnchorsError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_certificates() {
        let text = "# the mesh's anchors\n-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n\
                    -----BEGIN PRIVATE KEY-----\nCCCC\n-----END PRIVATE KEY-----\n\
                    -----BEGIN CERTIFICATE-----\r\nDDDD\r\n-----END CERTIFICATE-----";
        assert_eq!(
            certificates_pem(text).unwrap(),
            "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n\
             -----BEGIN CERTIFICATE-----\nDDDD\n-----END CERTIFICATE-----\n"
        );
    }

    #[test]
    fn refuses_what_is_no_bundle() {
        assert_eq!(certificates_pem(""), Err(AnchorsError::Empty));
        assert_eq!(
            certificates_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(AnchorsError::Empty)
        );
        assert_eq!(
            certificates_pem("-----BEGIN CERTIFICATE-----\nAAAA\n"),
            Err(AnchorsError::Unterminated { index: 1 })
        );
        let e = certificates_pem("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
            .unwrap_err();
        assert!(matches!(e, AnchorsError::NotBase64 { index: 1, .. }), "{e}");
    }
}
