//! `ferrule.v1.Registry`: endpoint registrations and proxy announcements under leases.
//!
//! A registration is a key under the registrant's lease: it lives while the registrant keeps
//! the lease alive (through any replica, since leases live in the store) and disappears when
//! the lease expires or is revoked.
//!
//! A proxy's announcement carries its certificate (`ProxyInfo.certificate`); the proxy
//! announces again under the same lease whenever it renews, and the record keeps the config
//! acks recorded on it meanwhile.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrule_proto::names::{
    DEFAULT_NAMESPACE, validate_label, validate_namespace, validate_service,
};
use ferrule_proto::v1::{
    AnnounceProxyRequest, DeregisterRequest, DeregisterResponse, Endpoint, KeepAliveRequest,
    KeepAliveResponse, ProxyCertificate, ProxyStatus, RegisterRequest, RegisterResponse,
    registry_server::Registry,
};
use ferrule_store::{Store, StoreError};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Caller};
use crate::keys;
use crate::metrics::Metrics;

pub const MIN_TTL_SECONDS: u32 = 2;
pub const MAX_TTL_SECONDS: u32 = 3600;
pub const DEFAULT_TTL_SECONDS: u32 = 30;

pub struct RegistryService {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Ends keep-alive streams when the controller stops, so registrants move to another
    /// replica at once instead of being answered by one that is going away.
    shutdown: CancellationToken,
}

impl RegistryService {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        Self {
            store,
            metrics,
            shutdown,
        }
    }

    /// Grants a lease, writes `key` under it (and, for a proxy, who owns the lease), and
    /// gives the lease back if a write fails.
    async fn put_leased(
        &self,
        key: String,
        value: Vec<u8>,
        ttl: u32,
        caller: &Caller,
    ) -> Result<RegisterResponse, Status> {
        let lease = self
            .store
            .grant_lease(Duration::from_secs(ttl.into()))
            .await
            .map_err(store_status)?;
        let owned = match caller {
            Caller::Workload(id) => {
                self.store
                    .put(
                        &keys::lease_owner(lease),
                        id.to_string().into_bytes(),
                        Some(lease),
                    )
                    .await
            }
            _ => Ok(0),
        };
        let written = match owned {
            Ok(_) => self.store.put(&key, value, Some(lease)).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(revision) => Ok(RegisterResponse {
                lease_id: lease,
                ttl_seconds: ttl,
                revision,
            }),
            Err(e) => {
                let _ = self.store.revoke_lease(lease).await;
                Err(store_status(e))
            }
        }
    }
}

/// Maps a store failure to the status a client can act on.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(format!("store unavailable: {m}")),
        StoreError::LeaseNotFound(id) => Status::not_found(format!("lease {id} not found")),
        other => Status::internal(other.to_string()),
    }
}

/// Whether `caller` may refresh or revoke `lease`: a proxy only the leases it was granted
/// (recorded under `/ferrule/lease-owners/`), anyone else every lease.
async fn lease_owned(store: &dyn Store, caller: &Caller, lease: i64) -> Result<bool, Status> {
    let Caller::Workload(id) = caller else {
        return Ok(true);
    };
    let owner = store
        .get(&keys::lease_owner(lease))
        .await
        .map_err(store_status)?;
    Ok(owner.is_some_and(|kv| kv.value == id.to_string().as_bytes()))
}

fn refused(status: &Status, rpc: &str) {
    tracing::info!(rpc, message = status.message(), "registry call refused");
}

fn clamp_ttl(ttl: u32) -> u32 {
    if ttl == 0 {
        DEFAULT_TTL_SECONDS
    } else {
        ttl.clamp(MIN_TTL_SECONDS, MAX_TTL_SECONDS)
    }
}

/// Refuses an endpoint that could not be dialled or keyed, naming the field.
pub fn validate_endpoint(ep: &Endpoint) -> Result<(), Status> {
    validate_service(&ep.service)
        .map_err(|e| Status::invalid_argument(format!("endpoint.service: {e}")))?;
    if !ep.namespace.is_empty() {
        validate_namespace(&ep.namespace)
            .map_err(|e| Status::invalid_argument(format!("endpoint.namespace: {e}")))?;
    }
    if !ep.port_name.is_empty() {
        validate_label("port name", &ep.port_name)
            .map_err(|e| Status::invalid_argument(format!("endpoint.port_name: {e}")))?;
    }
    ep.address.parse::<IpAddr>().map_err(|_| {
        Status::invalid_argument(format!(
            "endpoint.address: {:?} is not an IP address",
            ep.address
        ))
    })?;
    if ep.port == 0 || ep.port > u32::from(u16::MAX) {
        return Err(Status::invalid_argument(format!(
            "endpoint.port: {} is not a port number (1-65535)",
            ep.port
        )));
    }
    Ok(())
}

/// Refuses a certificate report that could not be shown or judged, naming the field. A
/// workload may report only a certificate of its own identity.
pub fn validate_certificate(cert: &ProxyCertificate, caller: &Caller) -> Result<(), Status> {
    let invalid = |field: &str, reason: String| {
        Status::invalid_argument(format!("proxy.certificate.{field}: {reason}"))
    };
    if cert.identity.is_empty() {
        // No certificate yet: nothing else may be said.
        if cert.not_before != 0 || cert.not_after != 0 || !cert.anchor_fingerprint.is_empty() {
            return Err(invalid(
                "identity",
                "empty (no certificate yet) but the validity or anchor is set".into(),
            ));
        }
        return Ok(());
    }
    let id: ferrule_proto::identity::SpiffeId = cert
        .identity
        .parse()
        .map_err(|e: ferrule_proto::identity::IdentityError| invalid("identity", e.to_string()))?;
    if let Caller::Workload(caller_id) = caller
        && *caller_id != id
    {
        return Err(Status::permission_denied(format!(
            "proxy.certificate.identity: {caller_id} may report only its own certificate, not one of {id}"
        )));
    }
    if cert.not_after <= cert.not_before {
        return Err(invalid(
            "not_after",
            format!(
                "{} is not after not_before {}",
                cert.not_after, cert.not_before
            ),
        ));
    }
    let fp = &cert.anchor_fingerprint;
    let hex_sha256 = fp.len() == 64 && fp.chars().all(|c| c.is_ascii_hexdigit());
    if !fp.is_empty() && !hex_sha256 {
        return Err(invalid(
            "anchor_fingerprint",
            format!("{fp:?} is not a hex SHA-256 (64 hex digits)"),
        ));
    }
    Ok(())
}

/// Reads the endpoint stored at a registry key, or says why it cannot be read: the value is
/// not a protobuf `Endpoint`, or the endpoint is not one `Register` would have accepted.
/// Such a value is skipped by discovery and shown by `Admin/ListUnreadable`.
pub fn read_stored_endpoint(value: &[u8]) -> Result<Endpoint, String> {
    let ep = Endpoint::decode(value).map_err(|e| format!("not a protobuf Endpoint: {e}"))?;
    validate_endpoint(&ep).map_err(|status| status.message().to_string())?;
    Ok(ep)
}

/// Seconds since the Unix epoch, for `last_seen` fields.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let caller = auth::caller(&request);
        let req = request.into_inner();
        let mut ep = req
            .endpoint
            .ok_or_else(|| Status::invalid_argument("endpoint: missing"))?;
        validate_endpoint(&ep)?;
        auth::may_register(&caller, &ep).inspect_err(|s| refused(s, "Register"))?;
        if ep.namespace.is_empty() {
            ep.namespace = DEFAULT_NAMESPACE.to_string();
        }
        let ttl = clamp_ttl(req.ttl_seconds);
        let resp = self
            .put_leased(keys::endpoint(&ep), ep.encode_to_vec(), ttl, &caller)
            .await?;
        self.metrics.registrations.inc();
        tracing::info!(
            service = %ep.service,
            namespace = %ep.namespace,
            port_name = %ep.port_name,
            address = %ep.address,
            port = ep.port,
            lease = resp.lease_id,
            ttl,
            "endpoint registered"
        );
        Ok(Response::new(resp))
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let store = self.store.clone();
        let caller = auth::caller(&request);
        // Leases this stream was found to own: checked once each, not at every refresh.
        let owned = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let responses = request.into_inner().then(move |req| {
            let store = store.clone();
            let caller = caller.clone();
            let owned = owned.clone();
            async move {
                let lease_id = req?.lease_id;
                let known = owned.lock().expect("not poisoned").contains(&lease_id);
                if !known {
                    match lease_owned(&*store, &caller, lease_id).await? {
                        // Another's lease, or an expired one: to this caller it is gone.
                        false => {
                            return Ok(KeepAliveResponse {
                                lease_id,
                                found: false,
                                ttl_seconds: 0,
                            });
                        }
                        true => {
                            owned.lock().expect("not poisoned").insert(lease_id);
                        }
                    }
                }
                match store.keep_alive(lease_id).await {
                    Ok(ttl) => Ok(KeepAliveResponse {
                        lease_id,
                        found: true,
                        ttl_seconds: ttl.as_secs() as u32,
                    }),
                    Err(StoreError::LeaseNotFound(_)) => Ok(KeepAliveResponse {
                        lease_id,
                        found: false,
                        ttl_seconds: 0,
                    }),
                    Err(e) => Err(store_status(e)),
                }
            }
        });
        let responses = responses.take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(responses)))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let caller = auth::caller(&request);
        let lease = request.into_inner().lease_id;
        if !lease_owned(&*self.store, &caller, lease).await? {
            let status = Status::not_found(format!(
                "lease {lease}: no lease of {} (expired, or granted to another caller)",
                match &caller {
                    Caller::Workload(id) => id.to_string(),
                    other => format!("{other:?}"),
                }
            ));
            refused(&status, "Deregister");
            return Err(status);
        }
        match self.store.revoke_lease(lease).await {
            // Deregistering twice, or after expiry, is not an error: the endpoint is gone.
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => {
                tracing::info!(lease, "registration revoked");
                Ok(Response::new(DeregisterResponse {}))
            }
            Err(e) => Err(store_status(e)),
        }
    }

    async fn announce_proxy(
        &self,
        request: Request<AnnounceProxyRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let caller = auth::caller(&request);
        let req = request.into_inner();
        let proxy = req
            .proxy
            .ok_or_else(|| Status::invalid_argument("proxy: missing"))?;
        auth::may_announce(&caller, &proxy).inspect_err(|s| refused(s, "AnnounceProxy"))?;
        if proxy.proxy_id.is_empty() || proxy.proxy_id.contains('/') || proxy.proxy_id.len() > 253 {
            return Err(Status::invalid_argument(
                "proxy.proxy_id: must be 1-253 characters without '/'",
            ));
        }
        if let Some(cert) = &proxy.certificate {
            validate_certificate(cert, &caller).inspect_err(|s| refused(s, "AnnounceProxy"))?;
        }
        let key = keys::proxy(&proxy.proxy_id);
        // The config acks recorded on the proxy's record so far stay (announcing again after a
        // renewal must not blank them in `ferrule get proxies`).
        let previous = match self.store.get(&key).await.map_err(store_status)? {
            Some(kv) => ProxyStatus::decode(kv.value.as_slice()).unwrap_or_default(),
            None => ProxyStatus::default(),
        };
        let status = ProxyStatus {
            proxy: Some(proxy),
            last_seen: now_unix(),
            acked_version: previous.acked_version,
            nacked_version: previous.nacked_version,
            nack_reason: previous.nack_reason,
        };
        let ttl = clamp_ttl(req.ttl_seconds);
        if req.lease_id == 0 {
            let resp = self
                .put_leased(key, status.encode_to_vec(), ttl, &caller)
                .await?;
            return Ok(Response::new(resp));
        }
        // Announcing again: the record is rewritten under the lease the caller holds.
        let lease = req.lease_id;
        if !lease_owned(&*self.store, &caller, lease).await? {
            let status = Status::not_found(format!(
                "lease_id: lease {lease} is not one this caller holds (expired, or granted to another caller); announce with lease_id 0"
            ));
            refused(&status, "AnnounceProxy");
            return Err(status);
        }
        // Refreshing first finds a lease that is gone (NOT_FOUND) on every store alike.
        let ttl_seconds = self
            .store
            .keep_alive(lease)
            .await
            .map_err(store_status)?
            .as_secs() as u32;
        let revision = self
            .store
            .put(&key, status.encode_to_vec(), Some(lease))
            .await
            .map_err(store_status)?;
        Ok(Response::new(RegisterResponse {
            lease_id: lease,
            ttl_seconds,
            revision,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint {
            service: "user".into(),
            address: "127.0.0.1".into(),
            port: 4143,
            ..Default::default()
        }
    }

    #[test]
    fn validates_endpoints_naming_the_field() {
        assert!(validate_endpoint(&ep()).is_ok());
        let cases = [
            (
                Endpoint {
                    service: "User".into(),
                    ..ep()
                },
                "endpoint.service",
            ),
            (
                Endpoint {
                    address: "localhost".into(),
                    ..ep()
                },
                "endpoint.address",
            ),
            (Endpoint { port: 0, ..ep() }, "endpoint.port"),
            (
                Endpoint {
                    port: 70000,
                    ..ep()
                },
                "endpoint.port",
            ),
            (
                Endpoint {
                    port_name: "Grpc".into(),
                    ..ep()
                },
                "endpoint.port_name",
            ),
        ];
        for (bad, field) in cases {
            let status = validate_endpoint(&bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
        }
    }

    #[test]
    fn validates_certificate_reports_naming_the_field() {
        let good = ProxyCertificate {
            identity: "spiffe://cluster.local/ns/default/sa/user".into(),
            not_before: 100,
            not_after: 200,
            anchor_fingerprint: "0f".repeat(32),
        };
        let unchecked = Caller::Unchecked;
        assert!(validate_certificate(&good, &unchecked).is_ok());
        assert!(validate_certificate(&ProxyCertificate::default(), &unchecked).is_ok());
        let cases = [
            (
                ProxyCertificate {
                    identity: "user".into(),
                    ..good.clone()
                },
                "proxy.certificate.identity",
            ),
            (
                ProxyCertificate {
                    not_after: 100,
                    ..good.clone()
                },
                "proxy.certificate.not_after",
            ),
            (
                ProxyCertificate {
                    anchor_fingerprint: "xyz".into(),
                    ..good.clone()
                },
                "proxy.certificate.anchor_fingerprint",
            ),
            (
                ProxyCertificate {
                    not_after: 5,
                    ..ProxyCertificate::default()
                },
                "proxy.certificate.identity",
            ),
        ];
        for (bad, field) in cases {
            let status = validate_certificate(&bad, &unchecked).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
        }
        let payment = Caller::Workload(
            "spiffe://cluster.local/ns/default/sa/payment"
                .parse()
                .unwrap(),
        );
        let status = validate_certificate(&good, &payment).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(clamp_ttl(0), DEFAULT_TTL_SECONDS);
        assert_eq!(clamp_ttl(1), MIN_TTL_SECONDS);
        assert_eq!(clamp_ttl(10), 10);
        assert_eq!(clamp_ttl(100_000), MAX_TTL_SECONDS);
    }
}
