//! Store URLs: `memory` for the embedded store, `etcd://host:port[,host:port…]` for etcd.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::{EtcdStore, MemoryStore, Store, StoreError};

/// A parsed `--store` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Memory,
    /// `host:port` of each etcd member.
    Etcd(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    #[error("unknown store {0:?}: expected `memory` or `etcd://host:port[,host:port...]`")]
    UnknownScheme(String),
    #[error("etcd store URL {0:?} names no member: expected `etcd://host:port[,host:port...]`")]
    NoMembers(String),
    #[error("etcd member {member:?} in {url:?} is not host:port with a port number (1-65535)")]
    BadMember { url: String, member: String },
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "memory" || s == "memory://" {
            return Ok(StoreUrl::Memory);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(StoreUrlError::UnknownScheme(s.to_string()));
        };
        let members: Vec<&str> = rest
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        if members.is_empty() {
            return Err(StoreUrlError::NoMembers(s.to_string()));
        }
        for member in &members {
            let valid = member.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !valid {
                return Err(StoreUrlError::BadMember {
                    url: s.to_string(),
                    member: member.to_string(),
                });
            }
        }
        Ok(StoreUrl::Etcd(
            members.into_iter().map(String::from).collect(),
        ))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Etcd(members) => write!(f, "etcd://{}", members.join(",")),
        }
    }
}

/// Opens the store a URL names. Must run inside a tokio runtime.
pub async fn connect(url: &StoreUrl) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match url {
        StoreUrl::Memory => Arc::new(MemoryStore::new()),
        StoreUrl::Etcd(members) => Arc::new(EtcdStore::connect(members).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!("memory".parse::<StoreUrl>().unwrap(), StoreUrl::Memory);
        assert_eq!(
            "etcd://127.0.0.1:2379,10.0.0.2:2379"
                .parse::<StoreUrl>()
                .unwrap(),
            StoreUrl::Etcd(vec!["127.0.0.1:2379".into(), "10.0.0.2:2379".into()])
        );
        assert_eq!(
            "etcd://a:1".parse::<StoreUrl>().unwrap().to_string(),
            "etcd://a:1"
        );
    }

    #[test]
    fn refuses_bad_urls() {
        assert!(matches!(
            "redis://x:1".parse::<StoreUrl>(),
            Err(StoreUrlError::UnknownScheme(_))
        ));
        assert!(matches!(
            "etcd://".parse::<StoreUrl>(),
            Err(StoreUrlError::NoMembers(_))
        ));
        for bad in [
            "etcd://host",
            "etcd://host:0",
            "etcd://:2379",
            "etcd://h:99999",
        ] {
            let err = bad.parse::<StoreUrl>().unwrap_err();
            assert!(
                matches!(err, StoreUrlError::BadMember { .. }),
                "{bad}: {err}"
            );
        }
    }
}
