//! The pool behind [`Clients`](crate::client::Clients): HTTP connections kept for reuse, keyed
//! by who is at the other end.
//!
//! **Keys.** A [`PoolKey`] is the address, the identity expected there and the protocol. Two
//! requests share a connection only when all three are equal, so a connection made for one
//! identity is never used for another, and an HTTP/1 request never lands on an HTTP/2
//! connection. Upgrades (`Upgrade`, `CONNECT`) take their connection with them and are never
//! pooled. Each side of the proxy has a pool of its own (see
//! [`Clients::new`](crate::client::Clients::new)), so an app's address and an endpoint's never
//! share one either.
//!
//! **One handshake for a cold key.** HTTP/2 carries every request to a key on one connection.
//! Callers that find none wait on the key's handshake permit (one permit); the first makes the
//! connection and puts it in the pool, the others then find it there: a thousand requests to a
//! cold endpoint make one handshake. HTTP/1 carries one request at a time per connection, so a
//! request that finds no idle connection needs a new one: handshakes per key run at most
//! [`HTTP1_HANDSHAKES_PER_KEY`] at a time, and a caller that gets a permit looks for an idle
//! connection again before making one. A burst therefore never makes more handshakes than there
//! are requests, connections finished meanwhile are reused, and an unreachable app sees a
//! bounded number of connects at once. For both protocols a failed handshake is handed to
//! every caller that was already waiting for that key, instead of each trying in turn; a caller
//! that arrives after the failure tries again.
//!
//! **Forgetting.** Each connection has a task that drives it and watches its use. The task
//! closes the connection once it has carried no request for its idle timeout (HTTP/2
//! keep-alive pings do not count as use), and removes a connection from the pool as soon as
//! it closes for any other reason (the peer went away, a keep-alive ping was not answered). A
//! key with no connection and nobody waiting is removed, so the pool follows the working set.
//! The work is one timer per connection, and the pool lock taken when it fires or the
//! connection closes.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use ferrule_proxy_core::FastMap;
use ferrule_proxy_core::body::{BoxBody, BoxError};
use ferrule_proxy_core::metrics::Direction;
use hyper::client::conn::http1;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::ClientError;
use crate::http2::Http2Sender;
use crate::metrics::PoolMetrics;

/// HTTP/1 handshakes to one key in flight at once.
pub const HTTP1_HANDSHAKES_PER_KEY: usize = 8;
/// Idle HTTP/1 connections kept per key (those carrying a request or streaming a response are
/// not counted). As many as the bench's nginx keeps (`keepalive 256`): with 32, a load of 50
/// requests at once made a new app connection for every fifth request and cost the server
/// sidecar a third more CPU per request. An idle connection holds about 25 KiB (hyper's
/// buffers and its task) until its idle timeout.
pub const MAX_IDLE_HTTP1_PER_KEY: usize = 256;

/// The identity a peer is expected to prove: its SPIFFE id as discovery announces it
/// (`spiffe://cluster.local/ns/shop/sa/user`). Part of the pool key; mutual TLS verifies it
/// when connecting (see [`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<str>);

impl Identity {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The protocols whose connections are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolProtocol {
    Http1,
    Http2,
}

impl PoolProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolProtocol::Http1 => "http1",
            PoolProtocol::Http2 => "http2",
        }
    }
}

/// What a pooled connection is for: requests share a connection only when their keys are
/// equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub addr: SocketAddr,
    /// `None`: a peer that is not meshed (plaintext, nothing to verify).
    pub identity: Option<Identity>,
    pub protocol: PoolProtocol,
}

/// The sending half of a pooled connection.
pub(crate) enum Sender {
    Http1(http1::SendRequest<BoxBody>),
    Http2(Http2Sender),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// The connection's other half, driven by the pool until the connection closes.
pub(crate) type Driver = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// How a connection is used: its driver closes it once `in_flight` has been 0 for
/// `idle_timeout`.
#[derive(Debug, Clone, Copy)]
struct Use {
    in_flight: usize,
    since: Instant,
    idle_timeout: Duration,
}

impl Use {
    /// When the connection is due to close; `None` while it is in use (or for a timeout too
    /// long to be reached).
    fn idle_at(&self) -> Option<Instant> {
        if self.in_flight > 0 {
            return None;
        }
        self.since.checked_add(self.idle_timeout)
    }

    /// When the driver should look again: at the deadline when idle; when busy, a timeout
    /// from now (the connection cannot close sooner). Requests never wake the driver, so a
    /// busy connection costs one timer per idle timeout.
    fn next_look(&self) -> Option<Instant> {
        if self.in_flight > 0 {
            Instant::now().checked_add(self.idle_timeout)
        } else {
            self.idle_at()
        }
    }
}

type Usage = Arc<Mutex<Use>>;

fn lock_use(usage: &Usage) -> MutexGuard<'_, Use> {
    // A `Use` is plain data updated in one step: a poisoned lock still holds a whole one.
    usage.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One request's hold on a connection, from checkout to the end of its response body: while
/// any is held the connection is in use. Released on drop, so a cancelled request never keeps
/// a connection busy.
pub(crate) struct Lease(Usage);

impl Lease {
    fn new(usage: &Usage, idle_timeout: Duration) -> Self {
        let mut u = lock_use(usage);
        u.in_flight += 1;
        // The latest caller's setting wins: a changed policy reaches open connections.
        u.idle_timeout = idle_timeout;
        drop(u);
        Self(usage.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut u = lock_use(&self.0);
        u.in_flight -= 1;
        if u.in_flight == 0 {
            u.since = Instant::now();
        }
    }
}

struct Pooled {
    id: u64,
    sender: Sender,
    usage: Usage,
}

/// A connection handed to one request.
pub(crate) struct Checkout {
    pub(crate) key: PoolKey,
    pub(crate) id: u64,
    pub(crate) sender: Sender,
    pub(crate) lease: Lease,
    /// Taken from the pool rather than just made.
    pub(crate) reused: bool,
}

struct KeyState {
    /// HTTP/2: the one shared connection; HTTP/1: connections not lent out.
    conns: Vec<Pooled>,
    /// Making a connection for this key: one at a time (HTTP/2) or a few (HTTP/1).
    handshakes: Arc<Semaphore>,
    /// Callers between finding no connection and getting one (or an error); the key stays
    /// while there are any.
    waiting: usize,
    /// Failed handshakes so far, and the last one's error: a caller that was waiting when one
    /// failed gets its error.
    failures: u64,
    last_failure: Option<ClientError>,
}

impl KeyState {
    fn new(protocol: PoolProtocol) -> Self {
        let permits = match protocol {
            PoolProtocol::Http1 => HTTP1_HANDSHAKES_PER_KEY,
            PoolProtocol::Http2 => 1,
        };
        Self {
            conns: Vec::new(),
            handshakes: Arc::new(Semaphore::new(permits)),
            waiting: 0,
            failures: 0,
            last_failure: None,
        }
    }

    fn is_unused(&self) -> bool {
        self.conns.is_empty() && self.waiting == 0
    }

    /// A connection ready for one more request, if there is one.
    fn take(&mut self, key: &PoolKey, idle_timeout: Duration) -> Option<Checkout> {
        match key.protocol {
            PoolProtocol::Http2 => self.conns.iter().find_map(|c| match &c.sender {
                Sender::Http2(s) if !s.is_closed() => Some(Checkout {
                    key: key.clone(),
                    sender: Sender::Http2(s.clone()),
                    lease: Lease::new(&c.usage, idle_timeout),
                    id: c.id,
                    reused: true,
                }),
                _ => None,
            }),
            PoolProtocol::Http1 => {
                // One still streaming a response stays. One whose response is over may need a
                // moment before it takes the next request: the caller waits for `ready`.
                let i = self
                    .conns
                    .iter()
                    .position(|c| lock_use(&c.usage).in_flight == 0 && !c.sender.is_closed())?;
                let c = self.conns.swap_remove(i);
                Some(Checkout {
                    key: key.clone(),
                    lease: Lease::new(&c.usage, idle_timeout),
                    sender: c.sender,
                    id: c.id,
                    reused: true,
                })
            }
        }
    }
}

/// The connections of one side of the proxy (see the module docs).
pub(crate) struct Pool {
    direction: Direction,
    metrics: PoolMetrics,
    keys: Mutex<FastMap<PoolKey, KeyState>>,
    next_id: AtomicU64,
}

impl Pool {
    pub(crate) fn new(direction: Direction, metrics: PoolMetrics) -> Self {
        Self {
            direction,
            metrics,
            keys: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FastMap<PoolKey, KeyState>> {
        // Every critical section leaves the map whole (no await, no user code), so a poisoned
        // lock still holds a consistent pool.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Each key and its pooled connections (HTTP/1 ones lent out are not counted).
    pub(crate) fn snapshot(&self) -> Vec<(PoolKey, usize)> {
        let mut keys: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, s)| (k.clone(), s.conns.len()))
            .collect();
        keys.sort();
        keys
    }

    /// A connection for `key`, made with `handshake` when the pool has none to spare (see
    /// the module docs for who makes it and who waits).
    pub(crate) async fn checkout<F, Fut>(
        self: &Arc<Self>,
        key: &PoolKey,
        idle_timeout: Duration,
        handshake: F,
    ) -> Result<Checkout, ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Sender, Driver), ClientError>>,
    {
        let (permits, seen_failures, waiting) = {
            let mut keys = self.lock();
            let state = keys
                .entry(key.clone())
                .or_insert_with(|| KeyState::new(key.protocol));
            if let Some(checkout) = state.take(key, idle_timeout) {
                return Ok(checkout);
            }
            state.waiting += 1;
            let waiting = Waiting {
                pool: self,
                key: key.clone(),
            };
            (state.handshakes.clone(), state.failures, waiting)
        };
        // Held until this caller has its answer. The semaphore is never closed, so this only
        // waits (an error would just mean no limit).
        let _permit = permits.acquire().await;
        {
            let mut keys = self.lock();
            // `waiting` keeps the key in the map.
            if let Some(state) = keys.get_mut(key) {
                if state.failures != seen_failures
                    && let Some(error) = &state.last_failure
                {
                    return Err(error.clone());
                }
                if let Some(checkout) = state.take(key, idle_timeout) {
                    return Ok(checkout);
                }
            }
        }
        let result = handshake().await;
        self.metrics
            .connect(self.direction, key.protocol, result.is_ok());
        let (sender, driver) = match result {
            Ok(made) => made,
            Err(error) => {
                let mut keys = self.lock();
                if let Some(state) = keys.get_mut(key) {
                    state.failures += 1;
                    state.last_failure = Some(error.clone());
                }
                return Err(error);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let usage = Arc::new(Mutex::new(Use {
            in_flight: 0,
            since: Instant::now(),
            idle_timeout,
        }));
        let lease = Lease::new(&usage, idle_timeout);
        let checkout = match sender {
            Sender::Http2(s) => {
                let mut keys = self.lock();
                if let Some(state) = keys.get_mut(key) {
                    // The one before, if any, closed (or it would have been taken).
                    state.conns.retain(|c| !c.sender.is_closed());
                    state.conns.push(Pooled {
                        id,
                        sender: Sender::Http2(s.clone()),
                        usage: usage.clone(),
                    });
                }
                Sender::Http2(s)
            }
            http1 => http1,
        };
        let open = self.metrics.open(self.direction, key.protocol);
        open.inc();
        tokio::spawn(drive(
            Arc::downgrade(self),
            key.clone(),
            id,
            usage.clone(),
            driver,
            open,
        ));
        drop(waiting);
        Ok(Checkout {
            key: key.clone(),
            sender: checkout,
            lease,
            id,
            reused: false,
        })
    }

    /// Gives an HTTP/1 connection back once its request has left; it is handed out again
    /// once its response is over.
    pub(crate) fn release(
        &self,
        key: PoolKey,
        id: u64,
        sender: http1::SendRequest<BoxBody>,
        lease: &Lease,
    ) {
        let mut keys = self.lock();
        // A closed one would never be handed out, nor forgotten: its driver is done. Checked
        // under the lock: a driver marks its sender closed before it takes the lock to forget.
        if sender.is_closed() {
            return;
        }
        let state = keys
            .entry(key.clone())
            .or_insert_with(|| KeyState::new(key.protocol));
        // Beyond the cap the sender is dropped, and the connection closes after this response.
        // Only idle ones count: those still streaming a response are busy, and a load with
        // more requests at once than the cap would otherwise close and reopen connections.
        if state.conns.len() < MAX_IDLE_HTTP1_PER_KEY || idle(&state.conns) < MAX_IDLE_HTTP1_PER_KEY
        {
            state.conns.push(Pooled {
                id,
                sender: Sender::Http1(sender),
                usage: lease.0.clone(),
            });
        }
    }

    /// Removes connection `id` if it has been unused for its idle timeout; false if it was
    /// used since (checked under the lock, which every checkout takes).
    fn expire(&self, key: &PoolKey, id: u64, usage: &Usage) -> bool {
        let mut keys = self.lock();
        let still_idle = lock_use(usage)
            .idle_at()
            .is_some_and(|at| at <= Instant::now());
        if still_idle {
            forget(&mut keys, key, id);
        }
        still_idle
    }
}

/// How many of `conns` carry no request (the others stream a response).
fn idle(conns: &[Pooled]) -> usize {
    conns
        .iter()
        .filter(|c| lock_use(&c.usage).in_flight == 0)
        .count()
}

fn forget(keys: &mut FastMap<PoolKey, KeyState>, key: &PoolKey, id: u64) {
    if let Some(state) = keys.get_mut(key) {
        state.conns.retain(|c| c.id != id);
        if state.is_unused() {
            keys.remove(key);
        }
    }
}

/// A caller waiting for a key's connection; on drop (answered or cancelled) the key may go.
struct Waiting<'a> {
    pool: &'a Pool,
    key: PoolKey,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut keys = self.pool.lock();
        if let Some(state) = keys.get_mut(&self.key) {
            state.waiting -= 1;
            if state.is_unused() {
                keys.remove(&self.key);
            }
        }
    }
}

/// Drives one pooled connection until it closes or stays unused for its idle timeout, then
/// takes it out of the pool. The connection also closes by itself once the pool and every
/// request have let go of its sender (the pool was dropped, or an HTTP/1 one over the cap).
async fn drive(
    pool: Weak<Pool>,
    key: PoolKey,
    id: u64,
    usage: Usage,
    mut conn: Driver,
    open: Gauge,
) {
    let why = loop {
        let next_look = lock_use(&usage).next_look();
        let look = async {
            match next_look {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut conn => break match result {
                Ok(()) => "closed",
                Err(error) => {
                    tracing::debug!(addr = %key.addr, %error, "pooled connection failed");
                    "failed"
                }
            },
            () = look => {
                if pool.upgrade().is_none_or(|p| p.expire(&key, id, &usage)) {
                    break "idle";
                }
            }
        }
    };
    // Closes the connection if it was still open, and marks its sender closed before it is
    // forgotten, so `Pool::release` cannot put it back afterwards.
    drop(conn);
    if let Some(pool) = pool.upgrade() {
        forget(&mut pool.lock(), &key, id);
    }
    open.dec();
    tracing::debug!(
        addr = %key.addr,
        identity = key.identity.as_ref().map(Identity::as_str),
        protocol = key.protocol.as_str(),
        why,
        "pooled connection closed"
    );
}
