//! Starting the proxy's workload identity, shared by the sidecar and the gateway.

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
