//! The sample shop's own gRPC APIs, generated from `user.proto`, `payment.proto` and
//! `order.proto` beside this crate.
//!
//! The shop's services (`sample-apps/`) are plain applications: this is the only shared crate
//! they import, and it holds nothing of Ferrule, so the mesh around them stays invisible.

pub mod user {
    //! `shop.user.v1`: the user service (clients and server traits).
    pub mod v1 {
        //! Generated from `user.proto`.
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("shop.user.v1");
    }
}

pub mod payment {
    //! `shop.payment.v1`: the payment service (clients and server traits).
    pub mod v1 {
        //! Generated from `payment.proto`.
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("shop.payment.v1");
    }
}

pub mod order {
    //! `shop.order.v1`: the order service (clients and server traits).
    pub mod v1 {
        //! Generated from `order.proto`.
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("shop.order.v1");
    }
}
