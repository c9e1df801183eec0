//! ferrule-proxy: the data plane.
//!
//! Control-plane side: [`discovery`] (endpoints of the services the app calls), [`balance`]
//! (which endpoint gets a request) and [`registration`] (health-check the app and keep its
//! endpoints registered).

pub mod balance;
pub mod control;
pub mod discovery;
pub mod registration;
