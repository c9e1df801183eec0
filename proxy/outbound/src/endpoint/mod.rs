//! The endpoint level: one address the balancer picked, as a stack built per endpoint target
//! by [`NewEndpoint::new_service`], in the order a request meets it:
//!
//! 1. [`accrual`]: the endpoint's circuit breaker (failure accrual). `poll_ready` asks the
//!    breaker for admission (claiming the single probe of a half-open endpoint) and fails with
//!    [`EndpointError::Ejected`] while it is ejected; the call's outcome is recorded on it.
//! 2. [`connect`]: the connection (the pool, the meshed HTTP/2 upgrade and
//!    `ferrule-orig-proto`), then the send.
//!
//! The breakers of one service share state ([`FailureAccrual`]: `maxEjectionPercent` is a
//! share of the service's endpoints), so [`NewEndpoint`] holds the service's accrual, keeps
//! it knowing exactly the endpoints discovery lists ([`NewEndpoint::track`]) and answers the
//! balancer's question "can this endpoint take a request now" ([`NewEndpoint::available`])
//! without claiming a probe. An endpoint stack is a few reference counts: the state it uses
//! lives in the breaker and in the connection pool, so it is built per attempt.

pub mod accrual;
pub mod connect;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Request;

use ferrule_proxy_core::body::BoxBody;
use ferrule_proxy_core::errors::{ProxyError, Reason};
use ferrule_proxy_policy::breaker::FailureAccrual;
use ferrule_proxy_policy::endpoint::EndpointTarget;
use ferrule_proxy_transport::client::ClientError;

pub use connect::{Connect, EndpointConnector};

/// The stack of one endpoint: failure accrual → connection.
pub type EndpointStack = accrual::Accrual<Connect>;

/// How a request to one endpoint went, when it got no response.
#[derive(Debug)]
pub enum EndpointError {
    /// The breaker admits no request now (another took the half-open endpoint's probe).
    Ejected,
    /// Nothing was sent (connecting failed, or the connection closed before the request
    /// left): the request, as it arrived, may go to another endpoint. Boxed: the error path
    /// is rare and a request is large.
    Unsent {
        error: ClientError,
        req: Box<Request<BoxBody>>,
    },
    /// The connection broke after the request was written, before a response head.
    Broken(ClientError),
}

/// Builds the endpoint stacks of one service under one config version.
#[derive(Clone)]
pub struct NewEndpoint {
    inner: Arc<Inner>,
}

struct Inner {
    accrual: FailureAccrual,
    connector: EndpointConnector,
    /// The service's `timeouts.idle`, for the connections its endpoints get.
    idle_timeout: Duration,
    /// The discovery set the accrual last learnt its endpoints from (compared by pointer).
    tracked: Mutex<Option<Arc<[EndpointTarget]>>>,
}

impl NewEndpoint {
    pub fn new(
        accrual: FailureAccrual,
        connector: EndpointConnector,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                accrual,
                connector,
                idle_timeout,
                tracked: Mutex::default(),
            }),
        }
    }

    /// Makes the breakers know exactly `endpoints` (new ones start closed, known ones keep
    /// their state): the base of `maxEjectionPercent`.
    pub fn track(&self, endpoints: &Arc<[EndpointTarget]>) {
        let mut tracked = self
            .inner
            .tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if tracked.as_ref().is_some_and(|t| Arc::ptr_eq(t, endpoints)) {
            return;
        }
        self.inner
            .accrual
            .set_endpoints(endpoints.iter().map(|ep| ep.key.to_string()));
        *tracked = Some(endpoints.clone());
    }

    /// Whether the endpoint keyed `key` can take a request now: its breaker is closed, or
    /// half-open with no probe in flight. Claims nothing.
    pub fn available(&self, key: &str) -> bool {
        self.inner.accrual.is_available(key)
    }

    /// The stack of `target`.
    pub fn new_service(&self, target: &EndpointTarget) -> EndpointStack {
        accrual::Accrual::new(
            self.inner.accrual.clone(),
            target.key.clone(),
            Connect::new(
                self.inner.connector.clone(),
                target.clone(),
                self.inner.idle_timeout,
            ),
        )
    }
}

/// The error a request sees when no endpoint could be connected.
pub fn connect_failure(service: &Arc<str>, error: &ClientError) -> ProxyError {
    ProxyError::new(
        Reason::UpstreamConnectFailure,
        service.to_string(),
        format!("could not connect to any endpoint of {service}: {error}"),
    )
}
