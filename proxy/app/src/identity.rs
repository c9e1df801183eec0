//! Starting the proxy's workload identity, shared by the sidecar and the gateway.

use std::time::Duration;

use ferrule_proto::v1::ProxyInfo;
use ferrule_proxy_api::control::Controllers;
use ferrule_proxy_api::registration::{
    HealthCheck, HealthCheckKind, Registration, RegistrationConfig,
};
use ferrule_proxy_core::metrics::Metrics;
use ferrule_proxy_transport::tls::MeshTls;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{CommonArgs, ConfigError};

/// The proxy's TLS state and the identity it asked for, when it is to have one: `account`
/// is the default service account (the service or gateway name), `namespace` the workload's.
pub fn start(
    common: &CommonArgs,
    account: &str,
    namespace: &str,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<(MeshTls, String)>, ConfigError> {
    let Some(settings) = common.identity.settings(account, namespace)? else {
        return Ok(None);
    };
    let controllers = common
        .parse_controllers()
        .map_err(|e| ConfigError::Invalid {
            flag: "--controller",
            reason: format!("identity needs the controller's CA: {e}"),
        })?;
    let expected = settings.expected.clone();
    let tls =
        ferrule_proxy_api::identity::spawn(controllers, settings, metrics, shutdown.child_token())
            .map_err(|reason| ConfigError::Invalid {
                flag: "--identity-token",
                reason,
            })?;
    Ok(Some((tls, expected)))
}

/// True once the proxy holds a certificate.
pub fn has_certificate(tls: &MeshTls, shutdown: &CancellationToken) -> watch::Receiver<bool> {
    let mut credentials = tls.watch();
    let (tx, rx) = watch::channel(credentials.borrow().is_some());
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = credentials.wait_for(Option::is_some) => { let _ = tx.send(true); }
            () = shutdown.cancelled() => {}
        }
    });
    rx
}

/// Lease of the announcement of a proxy that fronts no app (the sidecar's default TTL).
const ANNOUNCE_TTL: Duration = Duration::from_secs(10);
/// Its "health check" checks nothing (there is no app port); rarely, then.
const ANNOUNCE_CHECK: Duration = Duration::from_secs(10);

/// Announces a proxy that fronts no app (a gateway) with its certificate, again after each
/// renewal, so `ferrule identity status` lists it: a registration of no port. Deregister it
/// on shutdown.
pub fn announce(
    proxy: ProxyInfo,
    tls: &MeshTls,
    controllers: Option<Controllers>,
    shutdown: &CancellationToken,
) -> Registration {
    let config = RegistrationConfig {
        proxy,
        ports: Vec::new(),
        labels: Vec::new(),
        zone: String::new(),
        ttl: ANNOUNCE_TTL,
        health: HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval: ANNOUNCE_CHECK,
            timeout: ANNOUNCE_CHECK,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        },
        identity: String::new(),
        gate: None,
        certificate: Some(ferrule_proxy_api::identity::reports(
            tls,
            shutdown.child_token(),
        )),
    };
    Registration::spawn_with(config, controllers, shutdown.child_token())
}
