//! Login tokens: HS256 JWTs whose claims say who logged in, for the edge gateway to verify with
//! the same shared key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use crate::store::User;

/// The `iss` claim of every token this service issues.
const ISSUER: &str = "ferrule-shop";

/// What a login token says.
#[derive(Serialize)]
struct Claims<'a> {
    /// The user id.
    sub: &'a str,
    name: &'a str,
    /// Issued at, seconds since the Unix epoch.
    iat: u64,
    /// Expires at, seconds since the Unix epoch.
    exp: u64,
    iss: &'static str,
}

pub(crate) struct TokenIssuer {
    key: EncodingKey,
    ttl: Duration,
}

/// A signed token and how many seconds it stays valid.
pub(crate) struct Token {
    pub token: String,
    pub expires_in: u64,
}

impl TokenIssuer {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            key: EncodingKey::from_secret(secret),
            ttl,
        }
    }

    pub fn issue(&self, user: &User) -> Result<Token, jsonwebtoken::errors::Error> {
        // A clock before 1970 is not worth an error path: such a token is simply expired.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let expires_in = self.ttl.as_secs();
        let claims = Claims {
            sub: &user.user_id,
            name: &user.name,
            iat: now,
            exp: now + expires_in,
            iss: ISSUER,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &self.key)?;
        Ok(Token { token, expires_in })
    }
}
