//! The authentication step of a route: verify the bearer token, put its subject in the
//! subject header.
//!
//! The subject header is the backend's proof of who called, so a value a client sent is
//! always removed first, on public routes too; only a verified `sub` is ever put there.
//! Public routes need no token. The verified subject also rides in the request's extensions
//! ([`Subject`]) for the rate limit keyed by subject.

use std::sync::Arc;

use http::{HeaderValue, Request, header};
use tower::filter::Predicate;

use super::errors::GatewayError;
use super::jwt::JwtVerifier;
use ferrule_proxy_core::body::{BoxBody, BoxError};

/// The verified `sub` of the request's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(pub String);

/// A `tower::filter` predicate: passes a request on with its subject, or refuses it.
#[derive(Clone, Debug)]
pub struct Authenticate {
    /// `None` when the config has no `jwt` section (then every route is public).
    verifier: Option<Arc<JwtVerifier>>,
    public: bool,
}

impl Authenticate {
    pub fn new(verifier: Option<Arc<JwtVerifier>>, public: bool) -> Self {
        Self { verifier, public }
    }

    fn authenticate(&self, req: &mut Request<BoxBody>) -> Result<(), GatewayError> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        req.headers_mut().remove(verifier.subject_header());
        if self.public {
            return Ok(());
        }
        let value = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("?").trim())
            .filter(|v| !v.is_empty())
            .ok_or(GatewayError::MissingAuthorization)?;
        let token = bearer_token(value).ok_or_else(|| {
            GatewayError::InvalidToken("expected \"Authorization: Bearer <token>\"".into())
        })?;
        let verified = verifier
            .verify(token)
            .map_err(|e| GatewayError::InvalidToken(e.to_string()))?;
        if let Some(sub) = verified.subject {
            let value = HeaderValue::from_str(&sub).map_err(|_| {
                GatewayError::InvalidToken("the sub claim cannot be sent as a header".into())
            })?;
            req.headers_mut()
                .insert(verifier.subject_header().clone(), value);
            req.extensions_mut().insert(Subject(sub));
        }
        Ok(())
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Predicate<Request<BoxBody>> for Authenticate {
    type Request = Request<BoxBody>;

    fn check(&mut self, mut req: Request<BoxBody>) -> Result<Request<BoxBody>, BoxError> {
        self.authenticate(&mut req)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;
    use crate::jwt::tests::{SECRET, hs256, now};
    use ferrule_proxy_core::body;
    use serde_json::json;
    use std::path::Path;

    fn verifier() -> Arc<JwtVerifier> {
        let c = GatewayConfig::parse(
            "jwt: {providers: [{name: a, hs256SecretEnv: S}]}\nroutes: [{name: r, pathPrefix: /, service: web}]",
            Path::new("gateway.yaml"),
        )
        .unwrap();
        Arc::new(
            JwtVerifier::from_config(&c, c.jwt.as_ref().unwrap(), |_| Some(SECRET.into())).unwrap(),
        )
    }

    fn req(auth: Option<&str>) -> Request<BoxBody> {
        let mut b = Request::get("/").header("x-user-id", "forged");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(body::empty()).unwrap()
    }

    #[test]
    fn verified_subject_replaces_the_client_header() {
        let auth = Authenticate::new(Some(verifier()), false);
        let token = hs256(json!({"sub": "123", "exp": now() + 60}), SECRET);
        let mut r = req(Some(&format!("bearer {token}")));
        auth.authenticate(&mut r).unwrap();
        let values: Vec<_> = r.headers().get_all("x-user-id").iter().collect();
        assert_eq!(values, ["123"]);
        assert_eq!(
            r.extensions().get::<Subject>(),
            Some(&Subject("123".into()))
        );
    }

    #[test]
    fn refusals() {
        let auth = Authenticate::new(Some(verifier()), false);
        assert_eq!(
            auth.authenticate(&mut req(None)),
            Err(GatewayError::MissingAuthorization)
        );
        assert_eq!(
            auth.authenticate(&mut req(Some("  "))),
            Err(GatewayError::MissingAuthorization)
        );
        assert!(matches!(
            auth.authenticate(&mut req(Some("Basic YTpi"))),
            Err(GatewayError::InvalidToken(m)) if m.contains("Bearer")
        ));
        let expired = hs256(json!({"sub": "1", "exp": now() - 600}), SECRET);
        assert_eq!(
            auth.authenticate(&mut req(Some(&format!("Bearer {expired}")))),
            Err(GatewayError::InvalidToken("token expired".into()))
        );
    }

    #[test]
    fn public_routes_need_no_token_but_lose_the_forged_header() {
        let auth = Authenticate::new(Some(verifier()), true);
        let mut r = req(None);
        auth.authenticate(&mut r).unwrap();
        assert!(!r.headers().contains_key("x-user-id"));
        assert!(r.extensions().get::<Subject>().is_none());
    }
}
