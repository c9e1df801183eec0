//! The proxy's clients of the controller's gRPC API.
//!
//! [`control`] holds the controller set and the reconnect backoff; [`discovery`] follows the
//! endpoints of the services the app calls; [`registration`] health-checks the app and keeps
//! its endpoints registered; [`policy`] follows the `Config` stream and acks each version;
//! [`identity`] gets and renews the proxy's certificate from the mesh CA.

pub mod control;
pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod registration;
