//! Ferrule's config resources: the model, parsing and validation that the controller (which
//! validates and stores them), the CLI (which reads users' files) and the proxy (which applies
//! them) share.
//!
//! A resource is a Kubernetes-style document (`apiVersion: ferrule.io/v1`, `kind`,
//! `metadata`, `spec`) read into a [`Resource`] by [`Resource::parse_documents`] or, from the
//! store, by [`Resource::from_parts`]. Parsing refuses malformed input (unknown fields, wrong
//! types, bad durations or gRPC codes) with the field's path; [`validate`] then checks what
//! parsing cannot (ranges, regexes, weights, names, references, duplicates across a batch).
//! Kinds: [`ServicePolicySpec`] (`ServicePolicy`), [`HttpRouteSpec`] (`HTTPRoute`),
//! [`GatewaySpec`] (`Gateway`) and [`AuthorizationPolicySpec`] (`AuthorizationPolicy`, see
//! `docs/authorization.md`); the proxy reads a policy through [`ServicePolicySpec::effective`], where defaults are filled in, and a matched route rule
//! through [`RouteRule::effective`], merged over that policy. The gateway's own file is a
//! `GatewaySpec` too, read with [`GatewaySpec::parse_file`].
//! `docs/config.md` documents every field.

mod authz;
mod duration;
mod gateway;
mod grpc;
mod policy;
mod resource;
mod route;
mod validate;

pub use authz::{
    AuthorizationPolicySpec, AuthzFrom, AuthzMode, AuthzTo, DefaultPolicy, IdentityPattern,
    IdentityPatternError,
};
pub use gateway::{
    Cors, DEFAULT_GATEWAY_LISTEN, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_SUBJECT_HEADER,
    GatewayFileError, GatewayFileErrors, GatewayRateLimit, GatewayRoute, GatewaySpec, Jwt,
    JwtProvider, KeySource, RateLimitKey,
};
pub use grpc::{GrpcCode, GrpcCodeError};
pub use policy::*;
pub use resource::{
    API_VERSION, ConfigError, DEFAULT_NAMESPACE, Kind, Metadata, Resource, ResourceId, Spec,
};
pub use route::*;
pub use validate::{FieldError, ValidationErrors, validate};
