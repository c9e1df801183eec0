//! Which service an outbound connection is for.
//!
//! The one piece that differs between the proxy's modes. Explicit mode (no root, the local dev
//! mesh) gives each upstream service its own local listener, so the listener answers
//! ([`Fixed`]). Transparent mode ([`OrigDst`]) answers from where the connection was going
//! before iptables redirected it (`SO_ORIGINAL_DST`): an address the mesh knows (an endpoint
//! this proxy already watches, else the controller's `Discovery/Lookup`) is its service; any
//! other address is passed through as plain TCP to where it was going, never dropped.
//!
//! The answer also says whether the connection is opaque (no protocol detection): by the
//! listener's port in explicit mode, by the destination's port in transparent mode, so
//! server-speaks-first protocols (SMTP, MySQL, PostgreSQL, Redis, memcached) never wait out
//! detection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferrule_proto::names::ServiceRef;
use ferrule_proxy_api::discovery::Discovery;
use ferrule_proxy_transport::orig_dst::original_dst;
use futures::future::BoxFuture;
use tokio::net::TcpStream;

/// Ports of server-speaks-first protocols, opaque in transparent mode unless configured
/// otherwise: SMTP (25, 587), MySQL (3306), PostgreSQL (5432), Redis (6379), memcached (11211).
pub const DEFAULT_OPAQUE_PORTS: [u16; 6] = [25, 587, 3306, 5432, 6379, 11211];

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The connection was not redirected: nobody knows where it was going.
    #[error("no original destination (was the connection redirected here by iptables?): {0}")]
    NoOriginalDst(std::io::Error),
    /// The connection's original destination is this listener itself: forwarding it would
    /// loop.
    #[error("the connection was made to the outbound listener {0} itself")]
    Loop(SocketAddr),
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A service of the mesh, through its logical stack; `opaque` skips protocol detection.
    Service { service: ServiceRef, opaque: bool },
    /// Not the mesh's: copied as plain TCP to the address it was going to.
    Passthrough(SocketAddr),
}

/// Answers "which service is this connection for".
pub trait Target: Send + Sync + 'static {
    fn target<'a>(&'a self, conn: &'a TcpStream)
    -> BoxFuture<'a, Result<Destination, TargetError>>;
}

/// Every connection on the listener is for one service (an explicit `--upstream`).
#[derive(Debug, Clone)]
pub struct Fixed {
    pub service: ServiceRef,
    pub opaque: bool,
}

impl Target for Fixed {
    fn target<'a>(
        &'a self,
        _conn: &'a TcpStream,
    ) -> BoxFuture<'a, Result<Destination, TargetError>> {
        Box::pin(std::future::ready(Ok(Destination::Service {
            service: self.service.clone(),
            opaque: self.opaque,
        })))
    }
}

/// How long an answer about an address is reused: a known service for as long as targets
/// stay cached; "unknown" briefly, so an endpoint that registers soon is found.
const KNOWN_TTL: Duration = Duration::from_secs(60);
const UNKNOWN_TTL: Duration = Duration::from_secs(5);
/// The answer cache is swept of expired entries when it grows past this (and then past
/// twice what the last sweep left).
const SWEEP_AT: usize = 1024;

/// Transparent mode: the connection's original destination, mapped to a service.
pub struct OrigDst {
    discovery: Discovery,
    opaque_ports: Vec<u16>,
    cache: Mutex<Answers>,
}

#[derive(Default)]
struct Answers {
    by_addr: HashMap<SocketAddr, (Option<ServiceRef>, Instant)>,
    sweep_at: usize,
}

impl OrigDst {
    /// `opaque_ports`: destination ports never detected (empty: [`DEFAULT_OPAQUE_PORTS`]).
    pub fn new(discovery: Discovery, opaque_ports: &[u16]) -> Self {
        let opaque_ports = if opaque_ports.is_empty() {
            DEFAULT_OPAQUE_PORTS.to_vec()
        } else {
            opaque_ports.to_vec()
        };
        Self {
            discovery,
            opaque_ports,
            cache: Mutex::new(Answers {
                by_addr: HashMap::new(),
                sweep_at: SWEEP_AT,
            }),
        }
    }

    /// Maps `addr` to a service; `None` for an address the mesh does not know. A failed
    /// lookup (no controller reachable) is not remembered, and the connection passes
    /// through: traffic keeps flowing while the control plane is away.
    pub async fn resolve(&self, addr: SocketAddr) -> Option<ServiceRef> {
        let now = Instant::now();
        if let Some((answer, expires)) = self.answers().by_addr.get(&addr)
            && *expires > now
        {
            return answer.clone();
        }
        let answer = match self.discovery.lookup(addr).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(%addr, %error, "looking up an original destination failed; passing the connection through");
                return None;
            }
        };
        let ttl = if answer.is_some() {
            KNOWN_TTL
        } else {
            UNKNOWN_TTL
        };
        let mut answers = self.answers();
        answers
            .by_addr
            .insert(addr, (answer.clone(), Instant::now() + ttl));
        if answers.by_addr.len() >= answers.sweep_at {
            let now = Instant::now();
            answers.by_addr.retain(|_, (_, expires)| *expires > now);
            answers.sweep_at = SWEEP_AT.max(answers.by_addr.len() * 2);
        }
        answer
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Target for OrigDst {
    fn target<'a>(
        &'a self,
        conn: &'a TcpStream,
    ) -> BoxFuture<'a, Result<Destination, TargetError>> {
        Box::pin(async move {
            let orig = original_dst(conn).map_err(TargetError::NoOriginalDst)?;
            if conn.local_addr().is_ok_and(|local| local == orig) {
                return Err(TargetError::Loop(orig));
            }
            Ok(match self.resolve(orig).await {
                Some(service) => Destination::Service {
                    service,
                    opaque: self.opaque_ports.contains(&orig.port()),
                },
                None => Destination::Passthrough(orig),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrule_proto::v1::Endpoint;

    #[tokio::test]
    async fn known_addresses_are_services_and_others_pass_through() {
        let user = ServiceRef::parse("user").unwrap();
        let endpoint = Endpoint {
            service: "user".into(),
            address: "10.1.0.7".into(),
            port: 8080,
            ..Default::default()
        };
        let target = OrigDst::new(Discovery::fixed(vec![(user.clone(), vec![endpoint])]), &[]);
        assert_eq!(
            target.resolve("10.1.0.7:8080".parse().unwrap()).await,
            Some(user)
        );
        assert_eq!(target.resolve("10.1.0.7:9090".parse().unwrap()).await, None);
        assert!(target.opaque_ports.contains(&5432));
    }
}
