//! Self-registration (interface stub; the implementation is being written).

use std::net::SocketAddr;
use std::time::Duration;

use ferrule_proto::v1::{ProtocolHint, ProxyInfo};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub enum HealthCheckKind {
    /// GET this path on the app; 2xx/3xx is healthy.
    Http { path: String },
    /// A TCP connect succeeds.
    Tcp,
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before the app counts as healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures before the app counts as unhealthy.
    pub unhealthy_threshold: u32,
}

/// One app port the proxy fronts and registers.
#[derive(Debug, Clone)]
pub struct RegisteredPort {
    /// Empty for a single unnamed port.
    pub port_name: String,
    /// Where the app listens (health checks and inbound forwarding go here).
    pub app_addr: SocketAddr,
    /// What peers dial: this proxy's inbound listener for the port.
    pub advertise: SocketAddr,
    pub protocol_hint: ProtocolHint,
}

#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub proxy: ProxyInfo,
    pub ports: Vec<RegisteredPort>,
    pub labels: Vec<(String, String)>,
    pub zone: String,
    pub ttl: Duration,
    pub health: HealthCheck,
}

/// Runs health checks and keeps registrations alive while healthy.
pub struct Registration {}

impl Registration {
    /// Starts health checking and registration in the background; stops (and deregisters at
    /// once) when `shutdown` is cancelled.
    pub fn spawn(
        _config: RegistrationConfig,
        _controllers: Vec<String>,
        _shutdown: CancellationToken,
    ) -> Self {
        unimplemented!()
    }

    /// True while every port is registered (the app is healthy and the controller took it).
    pub fn registered(&self) -> bool {
        unimplemented!()
    }

    /// True while the app passes its health check.
    pub fn healthy(&self) -> bool {
        unimplemented!()
    }

    /// Deregisters every port at once and waits (bounded) for the controller to confirm.
    pub async fn deregister(&self) {
        unimplemented!()
    }
}
