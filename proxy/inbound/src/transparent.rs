//! Transparent mode's inbound side: one listener for every port of the app.
//!
//! The init rules (`ferrule-proxy init`) redirect TCP arriving at the pod to this listener;
//! each connection's original destination (`SO_ORIGINAL_DST`, IPv4 or IPv6) says which app
//! port it was for. A configured app port (`--app-port NAME=ADDR`) is forwarded to its address
//! and counted under `service:NAME`; any other port to the same port on loopback (`127.0.0.1`,
//! or `::1` for an IPv6 destination), counted under `service:PORT` (`PORT` for a proxy
//! without a service). Opaque ports (the
//! server-speaks-first list) skip detection, so the app's banner is never held up. A
//! connection that was not redirected, or was made to this listener's own port, has no app
//! port to go to and is closed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpStream};

use ferrule_proxy_core::server;
use ferrule_proxy_transport::orig_dst::original_dst;

use crate::{Inbound, InboundPort, Port};

/// The app ports one transparent listener serves.
#[derive(Debug, Clone)]
pub struct AppPorts {
    /// The app's service (qualified name), the first part of every series name.
    pub service: Arc<str>,
    /// The configured ports; `app_addr`'s port is the one peers dial.
    pub ports: Vec<InboundPort>,
    /// Destination ports that skip detection.
    pub opaque_ports: Vec<u16>,
}

impl AppPorts {
    /// The port a connection to `dst` is for: a configured one, else the same port on
    /// loopback of `dst`'s family.
    pub fn port_for(&self, dst: SocketAddr) -> InboundPort {
        if let Some(port) = self.ports.iter().find(|p| p.app_addr.port() == dst.port()) {
            return port.clone();
        }
        let loopback = match dst.ip().to_canonical() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        let name = match self.service.is_empty() {
            true => dst.port().to_string(),
            false => format!("{}:{}", self.service, dst.port()),
        };
        InboundPort {
            name: name.into(),
            app_addr: SocketAddr::new(loopback, dst.port()),
            opaque: self.opaque_ports.contains(&dst.port()),
        }
    }
}

/// Per-port stacks, built on first use.
pub(crate) struct Ports {
    app: AppPorts,
    built: Mutex<HashMap<SocketAddr, Arc<Port>>>,
}

impl Inbound {
    /// Serves every app port on `listener` (transparent mode) until shutdown.
    pub async fn serve_transparent(self: Arc<Self>, listener: TcpListener, app: AppPorts) {
        let own_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let ports = Arc::new(Ports {
            app,
            built: Mutex::new(HashMap::new()),
        });
        let this = self.clone();
        server::accept_loop(
            listener,
            self.shutdown.clone(),
            self.tracker.clone(),
            move |stream, peer| {
                Box::pin(
                    this.clone()
                        .handle_transparent(stream, peer, own_port, ports.clone()),
                )
            },
        )
        .await;
    }

    async fn handle_transparent(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        own_port: u16,
        ports: Arc<Ports>,
    ) {
        let dst = match original_dst(&stream) {
            Ok(dst) => dst,
            Err(error) => {
                tracing::info!(%peer, %error, "inbound connection without an original destination (not redirected by the init rules?); closing it");
                return;
            }
        };
        if dst.port() == own_port {
            tracing::info!(%peer, %dst, "inbound connection made to the inbound listener itself; closing it rather than looping");
            return;
        }
        let port = self.port_stack(&ports, dst);
        self.handle(stream, peer, port).await;
    }

    /// The stack for the app port `dst` names, built once per app address.
    fn port_stack(&self, ports: &Ports, dst: SocketAddr) -> Arc<Port> {
        let port = ports.app.port_for(dst);
        let mut built = ports.built.lock().unwrap_or_else(PoisonError::into_inner);
        built
            .entry(port.app_addr)
            .or_insert_with(|| self.port(port))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_ports_first_then_loopback_of_the_same_family() {
        let app = AppPorts {
            service: "user".into(),
            ports: vec![InboundPort {
                name: "user:http".into(),
                app_addr: "127.0.0.1:8001".parse().unwrap(),
                opaque: false,
            }],
            opaque_ports: vec![6379],
        };
        let http = app.port_for("[fd00::2]:8001".parse().unwrap());
        assert_eq!(http.app_addr, "127.0.0.1:8001".parse().unwrap());
        assert_eq!(&*http.name, "user:http");

        let other = app.port_for("10.0.0.2:9000".parse().unwrap());
        assert_eq!(other.app_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(&*other.name, "user:9000");
        assert!(!other.opaque);

        let redis = app.port_for("[fd00::2]:6379".parse().unwrap());
        assert_eq!(redis.app_addr, "[::1]:6379".parse().unwrap());
        assert!(redis.opaque);
    }
}
