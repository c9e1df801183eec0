//! JWT verification for the gateway's non-public routes.
//!
//! Each provider of the config has exactly one key source, and the key fixes the algorithms a
//! token may use: an HS256 secret accepts only HS256, an RSA PEM key only RS256, an EC PEM key
//! only ES256, a JWK set each key's own `alg` (or the usual one for its type). So a token
//! whose header names another algorithm is refused before any signature check; that closes
//! the classic "alg confusion" attack (an HS256 token signed with an RSA public key as the
//! secret). Then the signature, `exp` (required), `nbf`, and the provider's `iss` and `aud`
//! when configured are checked, with [`LEEWAY`] for clock skew. Keys and secrets are read when
//! the router is built: at start, and again for each new `Gateway` version.

use std::path::Path;

use http::HeaderName;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use super::config::{ConfigError, GatewayConfig, Jwt, KeySource};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: u64 = 5;

/// Why a token was refused; the text follows `invalid token: ` in the 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token ({0})")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("no key with id {0:?}")]
    UnknownKey(String),
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("missing claim {0:?}")]
    MissingClaim(String),
}

impl TokenError {
    fn from_jwt(e: &jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidSignature => TokenError::Signature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidIssuer => TokenError::Issuer,
            ErrorKind::InvalidAudience => TokenError::Audience,
            ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
            _ => TokenError::Malformed(e.to_string()),
        }
    }

    /// How much a failure says about the token: a failed signature says the key was not the
    /// right one; any later check failing says the key was right and the token is wrong.
    fn weight(&self) -> u8 {
        match self {
            TokenError::Algorithm(_) | TokenError::UnknownKey(_) => 0,
            TokenError::Signature => 1,
            _ => 2,
        }
    }
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `sub` claim.
    pub subject: Option<String>,
    /// The provider whose key verified it.
    pub provider: String,
}

/// The claims the gateway reads itself (the time claims are checked by `jsonwebtoken`).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
}

struct Key {
    /// The JWK's `kid`, for JWK sets.
    id: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

struct Provider {
    name: String,
    keys: Vec<Key>,
    issuer: Option<String>,
    audiences: Vec<String>,
}

impl Provider {
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.leeway = LEEWAY;
        v.validate_nbf = true;
        if let Some(issuer) = &self.issuer {
            v.set_issuer(&[issuer]);
        }
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
        }
        v
    }
}

/// Verifies bearer tokens against the configured providers.
pub struct JwtVerifier {
    subject_header: HeaderName,
    providers: Vec<Provider>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("JwtVerifier")
            .field("subject_header", &self.subject_header)
            .field("providers", &names)
            .finish()
    }
}

impl JwtVerifier {
    /// Loads every provider's key; `env` looks up environment variables (`hs256SecretEnv`).
    pub fn from_config(
        config: &GatewayConfig,
        jwt: &Jwt,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let subject_header = HeaderName::from_bytes(jwt.subject_header().as_bytes())
            .map_err(|e| config.invalid("jwt.subjectHeader", e.to_string()))?;
        let mut providers = Vec::new();
        for (i, p) in jwt.providers.iter().enumerate() {
            let (field, source) = p.key_source().ok_or_else(|| {
                config.invalid(format!("jwt.providers[{i}]"), "give exactly one key source")
            })?;
            let bad =
                |message: String| config.invalid(format!("jwt.providers[{i}].{field}"), message);
            let keys = load_keys(config, &source, &env).map_err(bad)?;
            providers.push(Provider {
                name: p.name.clone(),
                keys,
                issuer: p.issuer.clone(),
                audiences: p.audiences.clone(),
            });
        }
        Ok(Self {
            subject_header,
            providers,
        })
    }

    /// The header the verified subject goes in (and every client-sent value is removed from).
    pub fn subject_header(&self) -> &HeaderName {
        &self.subject_header
    }

    /// Checks `token` against every provider whose keys accept its algorithm; the first that
    /// verifies it wins. When none does, the most telling failure is reported.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let mut failure = TokenError::Algorithm(header.alg);
        for provider in &self.providers {
            for key in provider.keys.iter().filter(|k| k.algorithm == header.alg) {
                if let (Some(want), Some(have)) = (&header.kid, &key.id)
                    && want != have
                {
                    if failure.weight() == 0 {
                        failure = TokenError::UnknownKey(want.clone());
                    }
                    continue;
                }
                match jsonwebtoken::decode::<Claims>(
                    token,
                    &key.key,
                    &provider.validation(key.algorithm),
                ) {
                    Ok(data) => {
                        return Ok(Verified {
                            subject: data.claims.sub,
                            provider: provider.name.clone(),
                        });
                    }
                    Err(e) => {
                        let e = TokenError::from_jwt(&e);
                        if e.weight() > failure.weight() {
                            failure = e;
                        }
                    }
                }
            }
        }
        Err(failure)
    }
}

fn read(config: &GatewayConfig, file: &Path) -> Result<Vec<u8>, String> {
    let path = config.resolve(file);
    std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn load_keys(
    config: &GatewayConfig,
    source: &KeySource<'_>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<Key>, String> {
    let single = |algorithm, key| {
        Ok(vec![Key {
            id: None,
            algorithm,
            key,
        }])
    };
    match source {
        KeySource::Hs256Env(var) => {
            let secret = env(var)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("environment variable {var} is not set or empty"))?;
            single(
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            )
        }
        KeySource::Hs256File(file) => {
            let secret = read(config, file)?;
            // A trailing newline from `echo secret > file` is not part of the secret.
            let secret = secret.trim_ascii_end();
            if secret.is_empty() {
                return Err(format!("{} is empty", file.display()));
            }
            single(Algorithm::HS256, DecodingKey::from_secret(secret))
        }
        KeySource::RsaPem(file) => {
            let key = DecodingKey::from_rsa_pem(&read(config, file)?)
                .map_err(|e| format!("{} is not an RSA public key in PEM: {e}", file.display()))?;
            single(Algorithm::RS256, key)
        }
        KeySource::EcPem(file) => {
            let key = DecodingKey::from_ec_pem(&read(config, file)?)
                .map_err(|e| format!("{} is not an EC public key in PEM: {e}", file.display()))?;
            single(Algorithm::ES256, key)
        }
        KeySource::Jwks(file) => {
            let set: JwkSet = serde_json::from_slice(&read(config, file)?)
                .map_err(|e| format!("{} is not a JWK set: {e}", file.display()))?;
            if set.keys.is_empty() {
                return Err(format!("{} has no keys", file.display()));
            }
            set.keys
                .iter()
                .enumerate()
                .map(|(i, jwk)| {
                    let algorithm = match jwk.common.key_algorithm {
                        Some(alg) => Algorithm::try_from(alg)
                            .map_err(|e| format!("keys[{i}] of {}: {e}", file.display()))?,
                        None => match &jwk.algorithm {
                            AlgorithmParameters::RSA(_) => Algorithm::RS256,
                            AlgorithmParameters::EllipticCurve(ec)
                                if ec.curve == EllipticCurve::P256 =>
                            {
                                Algorithm::ES256
                            }
                            AlgorithmParameters::EllipticCurve(ec)
                                if ec.curve == EllipticCurve::P384 =>
                            {
                                Algorithm::ES384
                            }
                            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                            _ => {
                                return Err(format!(
                                    "keys[{i}] of {}: give its \"alg\"",
                                    file.display()
                                ));
                            }
                        },
                    };
                    let key = DecodingKey::from_jwk(jwk)
                        .map_err(|e| format!("keys[{i}] of {}: {e}", file.display()))?;
                    Ok(Key {
                        id: jwk.common.key_id.clone(),
                        algorithm,
                        key,
                    })
                })
                .collect()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    pub(crate) const SECRET: &str = "test-secret-of-reasonable-length";

    /// Seconds since the epoch.
    pub(crate) fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// An HS256 token with `claims`.
    pub(crate) fn hs256(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn config(jwt_yaml: &str, dir: &Path) -> GatewayConfig {
        let text =
            format!("jwt:\n{jwt_yaml}\nroutes: [{{name: all, pathPrefix: /, service: web}}]");
        GatewayConfig::parse(&text, &dir.join("gateway.yaml")).unwrap()
    }

    fn verifier(jwt_yaml: &str, dir: &Path) -> Result<JwtVerifier, ConfigError> {
        let c = config(jwt_yaml, dir);
        let env = |name: &str| (name == "SECRET").then(|| SECRET.to_string());
        JwtVerifier::from_config(&c, c.jwt.as_ref().unwrap(), env)
    }

    fn hs_verifier(extra: &str) -> JwtVerifier {
        verifier(
            &format!("  providers: [{{name: shop, hs256SecretEnv: SECRET{extra}}}]"),
            Path::new("/tmp"),
        )
        .unwrap()
    }

    #[test]
    fn hs256_valid_expired_and_not_yet_valid() {
        let v = hs_verifier("");
        let ok = hs256(json!({"sub": "123", "exp": now() + 60}), SECRET);
        assert_eq!(
            v.verify(&ok),
            Ok(Verified {
                subject: Some("123".into()),
                provider: "shop".into()
            })
        );
        let expired = hs256(json!({"sub": "123", "exp": now() - 60}), SECRET);
        assert_eq!(v.verify(&expired), Err(TokenError::Expired));
        let early = hs256(
            json!({"sub": "123", "exp": now() + 600, "nbf": now() + 300}),
            SECRET,
        );
        assert_eq!(v.verify(&early), Err(TokenError::NotYetValid));
        let no_exp = hs256(json!({"sub": "123"}), SECRET);
        assert_eq!(
            v.verify(&no_exp),
            Err(TokenError::MissingClaim("exp".into()))
        );
    }

    #[test]
    fn wrong_key_and_tampering_fail_the_signature() {
        let v = hs_verifier("");
        let other = hs256(json!({"sub": "1", "exp": now() + 60}), "another-secret");
        assert_eq!(v.verify(&other), Err(TokenError::Signature));
        // Swap the payload for one naming another subject, keeping the signature.
        let good = hs256(json!({"sub": "1", "exp": now() + 60}), SECRET);
        let forged = hs256(json!({"sub": "admin", "exp": now() + 60}), "x");
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[1] = forged.split('.').nth(1).unwrap();
        assert_eq!(v.verify(&parts.join(".")), Err(TokenError::Signature));
        assert!(matches!(
            v.verify("not-a-jwt"),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_set() {
        let v = hs_verifier(", issuer: ferrule-shop, audiences: [shop-api]");
        let exp = now() + 60;
        let good = hs256(
            json!({"sub": "1", "exp": exp, "iss": "ferrule-shop", "aud": "shop-api"}),
            SECRET,
        );
        assert!(v.verify(&good).is_ok());
        let iss = hs256(
            json!({"sub": "1", "exp": exp, "iss": "evil", "aud": "shop-api"}),
            SECRET,
        );
        assert_eq!(v.verify(&iss), Err(TokenError::Issuer));
        let aud = hs256(
            json!({"sub": "1", "exp": exp, "iss": "ferrule-shop", "aud": "other"}),
            SECRET,
        );
        assert_eq!(v.verify(&aud), Err(TokenError::Audience));
        // Without audiences configured, any `aud` passes.
        let open = hs_verifier("");
        assert!(open.verify(&aud).is_ok());
    }

    /// Test keys (generated once with openssl for these tests only).
    const RSA_PRIVATE: &str = include_str!("testdata/rsa-private.pem");
    const RSA_PUBLIC: &str = include_str!("testdata/rsa-public.pem");
    const EC_PRIVATE: &str = include_str!("testdata/ec-private.pem");

    /// The folder holding the test keys, as a config's folder.
    fn testdata() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata")
    }

    #[test]
    fn rs256_and_alg_confusion_is_refused() {
        let v = verifier(
            "  providers: [{name: rsa, rsaPublicKeyFile: rsa-public.pem}]",
            &testdata(),
        )
        .unwrap();
        let claims = json!({"sub": "7", "exp": now() + 60});
        let token = encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&token).unwrap().subject.as_deref(), Some("7"));
        // HS256 "signed" with the public key as the secret: refused on the algorithm.
        let confused = hs256(claims, RSA_PUBLIC);
        assert_eq!(
            v.verify(&confused),
            Err(TokenError::Algorithm(Algorithm::HS256))
        );
    }

    #[test]
    fn es256_pem_and_jwks() {
        let encoding = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        let claims = json!({"sub": "9", "exp": now() + 60});
        let v = verifier(
            "  providers: [{name: ec, ecPublicKeyFile: ec-public.pem}]",
            &testdata(),
        )
        .unwrap();
        let token = encode(&Header::new(Algorithm::ES256), &claims, &encoding).unwrap();
        assert_eq!(v.verify(&token).unwrap().subject.as_deref(), Some("9"));

        // The same key as a JWK set (kid "k1"): the token's kid must name it.
        let v = verifier(
            "  providers: [{name: set, jwksFile: ec-jwks.json}]",
            &testdata(),
        )
        .unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let token = encode(&header, &claims, &encoding).unwrap();
        assert_eq!(v.verify(&token).unwrap().provider, "set");
        header.kid = Some("k2".into());
        let token = encode(&header, &claims, &encoding).unwrap();
        assert_eq!(v.verify(&token), Err(TokenError::UnknownKey("k2".into())));
        // An RS256 token is refused by an EC-only set.
        let rs = encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&rs), Err(TokenError::Algorithm(Algorithm::RS256)));
    }

    #[test]
    fn key_problems_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let err = verifier(
            "  providers: [{name: a, hs256SecretEnv: MISSING}]",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("jwt.providers[0].hs256SecretEnv") && err.contains("MISSING"),
            "{err}"
        );
        let err = verifier(
            "  providers: [{name: a, rsaPublicKeyFile: none.pem}]",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("jwt.providers[0].rsaPublicKeyFile") && err.contains("none.pem"),
            "{err}"
        );
        std::fs::write(dir.path().join("junk.pem"), "junk").unwrap();
        let err = verifier(
            "  providers: [{name: a, ecPublicKeyFile: junk.pem}]",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an EC public key"), "{err}");
    }

    #[test]
    fn secret_file_ignores_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
        let v = verifier(
            "  providers: [{name: a, hs256SecretFile: secret}]",
            dir.path(),
        )
        .unwrap();
        let token = hs256(json!({"sub": "1", "exp": now() + 60}), SECRET);
        assert!(v.verify(&token).is_ok());
    }
}
