//! Argument parsers: bad input is refused by clap, naming the argument, before anything is
//! sent to the controller.
//!
//! Service and port names follow `ferrule_proto::names`; label keys and values follow the
//! Kubernetes label rules, so a label written here means the same thing in a cluster.

use std::net::SocketAddr;
use std::time::Duration;

use ferrule_proto::names::{validate_label, validate_service};

/// A service name (`user`).
pub fn service(s: &str) -> Result<String, String> {
    validate_service(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// A service by qualified name: `user`, or `user.shop` in namespace `shop`.
pub fn service_name(s: &str) -> Result<String, String> {
    ferrule_proto::names::validate_service_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// A namespace (`shop`).
pub fn namespace(s: &str) -> Result<String, String> {
    ferrule_proto::names::validate_namespace(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// A port name (`grpc`).
pub fn port_name(s: &str) -> Result<String, String> {
    validate_label("port name", s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// An address peers can dial: `IP:PORT`, IPv6 in brackets, neither unspecified nor port 0.
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("expected IP:PORT such as 127.0.0.1:5432 or [::1]:5432, got {s:?}"))?;
    if addr.ip().is_unspecified() {
        return Err(format!(
            "{} is not an address peers can dial; give the endpoint's own IP",
            addr.ip()
        ));
    }
    if addr.port() == 0 {
        return Err("port 0 is not a port peers can dial".to_string());
    }
    Ok(addr)
}

/// A lease TTL: a whole number of seconds, at least one (`30s`, `2m`).
pub fn ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration such as 30s or 2m ({e})"))?;
    if ttl.is_zero() {
        return Err("the TTL must be at least 1s".to_string());
    }
    if ttl.subsec_nanos() != 0 {
        return Err("the TTL must be a whole number of seconds".to_string());
    }
    if u32::try_from(ttl.as_secs()).is_err() {
        return Err("the TTL is too long".to_string());
    }
    Ok(ttl)
}

/// A label `KEY=VALUE`. The key is `[PREFIX/]NAME` with a DNS-subdomain prefix
/// (`ferrule.io/role`); name and value are at most 63 letters, digits, `-`, `_` or `.`,
/// starting and ending with a letter or digit; the value may be empty.
pub fn label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty()
                || prefix.len() > 253
                || prefix
                    .split('.')
                    .any(|part| validate_label("", part).is_err())
            {
                return Err(format!(
                    "label key prefix {prefix:?} must be a lowercase DNS name such as ferrule.io"
                ));
            }
            name
        }
        None => key,
    };
    if name.is_empty() || !label_word(name) {
        return Err(format!(
            "label key {key:?} must be [PREFIX/]NAME, NAME being at most 63 letters, digits, \
             '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    if !value.is_empty() && !label_word(value) {
        return Err(format!(
            "label value {value:?} must be at most 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

fn label_word(s: &str) -> bool {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63 && s.chars().all(inner) && edge(s.chars().next()) && edge(s.chars().last())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_ports() {
        assert_eq!(service("user-db").unwrap(), "user-db");
        assert!(service("User").unwrap_err().contains("\"User\""));
        assert!(service("").is_err());
        assert_eq!(port_name("grpc").unwrap(), "grpc");
        assert!(port_name("gRPC").unwrap_err().contains("port name"));
    }

    #[test]
    fn socket_addrs() {
        assert_eq!(
            socket_addr("127.0.0.1:9001").unwrap(),
            "127.0.0.1:9001".parse().unwrap()
        );
        assert_eq!(socket_addr("[::1]:5432").unwrap().port(), 5432);
        for bad in [
            "127.0.0.1",
            "localhost:80",
            "127.0.0.1:99999",
            "0.0.0.0:80",
            "[::]:80",
            "10.0.0.1:0",
        ] {
            assert!(socket_addr(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ttls() {
        assert_eq!(ttl("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(ttl("2m").unwrap(), Duration::from_secs(120));
        assert!(ttl("3x").unwrap_err().contains("30s"));
        assert!(ttl("0s").unwrap_err().contains("at least 1s"));
        assert!(ttl("1500ms").unwrap_err().contains("whole number"));
        assert!(ttl("200y").is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(label("role=db").unwrap(), ("role".into(), "db".into()));
        assert_eq!(label("tier=").unwrap(), ("tier".into(), String::new()));
        assert_eq!(
            label("ferrule.io/engine=postgres.16").unwrap(),
            ("ferrule.io/engine".into(), "postgres.16".into())
        );
        assert_eq!(
            label("a=b=c").unwrap_err(),
            "label value \"b=c\" must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        );
        assert!(label("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(label("=x").unwrap_err().contains("label key"));
        assert!(label("Ferrule.IO/x=y").unwrap_err().contains("prefix"));
        assert!(label("/x=y").unwrap_err().contains("prefix"));
        assert!(label(&format!("k={}", "v".repeat(64))).is_err());
        assert!(label("k=-v").is_err());
    }
}
