//! Ferrule's control-plane API and the few names both planes share.
//!
//! The proxy and the controller know each other only through this crate: the generated
//! `ferrule.v1` gRPC code ([`v1`]), the default ports ([`ports`]), and how an endpoint is keyed
//! and a service is named ([`names`]), and how a proxy's certificate is reported and judged
//! ([`certificate`]). Neither plane imports the other.

pub mod v1 {
    //! Generated from `proto/ferrule/v1/*.proto`.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ferrule.v1");
}

pub mod certificate;
pub mod identity;
pub mod names;

pub mod ports {
    //! Default ports, as in the design brief. Every binary takes its own flags; these are the
    //! values those flags default to.
    pub const PROXY_OUTBOUND: u16 = 4140;
    pub const PROXY_INBOUND: u16 = 4143;
    pub const PROXY_ADMIN: u16 = 4191;
    pub const CONTROLLER_GRPC: u16 = 8086;
    pub const CONTROLLER_WEBHOOK: u16 = 8443;
    pub const CONTROLLER_ADMIN: u16 = 9990;
    pub const GATEWAY: u16 = 8000;
}
