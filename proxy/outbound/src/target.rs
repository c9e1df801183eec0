//! Which service an outbound connection is for.
//!
//! The one piece that differs between the proxy's modes. Explicit mode (no root, the local dev
//! mesh) gives each upstream service its own local listener, so the listener answers
//! ([`Fixed`]). Transparent mode will answer from the connection's original destination
//! (`SO_ORIGINAL_DST`) and implement the same trait; nothing else on the outbound path changes.

use ferrule_proto::names::ServiceRef;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The connection's destination names no service the mesh knows how to reach.
    #[error("no service for the connection to {0}")]
    Unknown(String),
}

/// Answers "which service is this connection for".
pub trait Target: Send + Sync + 'static {
    fn target(&self, conn: &TcpStream) -> Result<ServiceRef, TargetError>;
}

/// Every connection on the listener is for one service (an explicit `--upstream`).
#[derive(Debug, Clone)]
pub struct Fixed(pub ServiceRef);

impl Target for Fixed {
    fn target(&self, _conn: &TcpStream) -> Result<ServiceRef, TargetError> {
        Ok(self.0.clone())
    }
}
