//! The etcd store, via `etcd-client`.
//!
//! Watches survive etcd outages: each [`Store::watch`] runs a task that re-creates the etcd
//! watch from the last revision it delivered, so the stream a caller holds sees every change
//! exactly once, in order, however often etcd restarts. Only a compacted start revision ends it.

use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{
    KeyValue, LeaseId, Listing, Op, Result, Revision, Store, StoreError, WatchEvent, WatchStream,
};

/// Bounds on how long one etcd call may take, so an outage surfaces as an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff between attempts to re-create a broken watch.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);

pub struct EtcdStore {
    client: Client,
    members: Vec<String>,
}

impl EtcdStore {
    /// Connects to the etcd cluster made of `members` (`host:port`).
    pub async fn connect(members: &[String]) -> Result<Self> {
        let urls: Vec<String> = members.iter().map(|m| format!("http://{m}")).collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(&urls, Some(options)).await.map_err(|e| {
            StoreError::Unavailable(format!("connecting to etcd at {}: {e}", urls.join(",")))
        })?;
        Ok(Self {
            client,
            members: members.to_vec(),
        })
    }
}

fn map_err(e: etcd_client::Error) -> StoreError {
    match e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                StoreError::Unavailable(status.message().to_string())
            }
            // tonic reports a broken connection to etcd as Unknown("transport error").
            tonic::Code::Unknown if status.message().contains("transport error") => {
                StoreError::Unavailable(status.message().to_string())
            }
            _ if status.message().contains("requested lease not found") => {
                StoreError::Other(status.message().to_string())
            }
            _ if status
                .message()
                .contains("required revision has been compacted") =>
            {
                StoreError::Compacted {
                    requested: 0,
                    oldest: 0,
                }
            }
            _ if status.message().contains("future rev") => StoreError::FutureRevision(0),
            _ => StoreError::Other(format!("{}: {}", status.code(), status.message())),
        },
        etcd_client::Error::TransportError(e) => StoreError::Unavailable(e.to_string()),
        etcd_client::Error::IoError(e) => StoreError::Unavailable(e.to_string()),
        other => StoreError::Other(other.to_string()),
    }
}

fn lease_err(lease: LeaseId, e: etcd_client::Error) -> StoreError {
    match map_err(e) {
        StoreError::Other(m) if m.contains("lease not found") => StoreError::LeaseNotFound(lease),
        other => other,
    }
}

fn convert(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision())
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.client.clone().get(key, None).await.map_err(map_err)?;
        Ok(resp.kvs().first().map(convert))
    }

    async fn list(&self, prefix: &str, at: Option<Revision>) -> Result<Listing> {
        let mut options = GetOptions::new().with_prefix();
        if let Some(rev) = at {
            options = options.with_revision(rev);
        }
        let resp = self
            .client
            .clone()
            .get(prefix, Some(options))
            .await
            .map_err(|e| match map_err(e) {
                StoreError::Compacted { .. } => StoreError::Compacted {
                    requested: at.unwrap_or(0),
                    oldest: 0,
                },
                StoreError::FutureRevision(_) => StoreError::FutureRevision(at.unwrap_or(0)),
                other => other,
            })?;
        Ok(Listing {
            kvs: resp.kvs().iter().map(convert).collect(),
            revision: at.unwrap_or_else(|| header_revision(resp.header())),
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        let resp = self
            .client
            .clone()
            .put(key, value, options)
            .await
            .map_err(|e| match lease {
                Some(id) => lease_err(id, e),
                None => map_err(e),
            })?;
        Ok(header_revision(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let resp = self
            .client
            .clone()
            .delete(key, None::<DeleteOptions>)
            .await
            .map_err(map_err)?;
        Ok((resp.deleted() > 0).then(|| header_revision(resp.header())))
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let resp = self
            .client
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(map_err)?;
        Ok(header_revision(resp.header()))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_watch(
            self.client.clone(),
            prefix.to_string(),
            after,
            tx,
        ));
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .client
            .clone()
            .lease_grant(secs, None)
            .await
            .map_err(map_err)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut client = self.client.clone();
        let (mut keeper, mut stream) = client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| lease_err(lease, e))?;
        keeper.keep_alive().await.map_err(|e| lease_err(lease, e))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, stream.message())
            .await
            .map_err(|_| StoreError::Unavailable("lease keep-alive timed out".into()))?
            .map_err(|e| lease_err(lease, e))?
            .ok_or_else(|| StoreError::Unavailable("lease keep-alive stream closed".into()))?;
        // etcd answers an unknown lease with TTL 0 rather than an error.
        if resp.ttl() <= 0 {
            return Err(StoreError::LeaseNotFound(lease));
        }
        Ok(Duration::from_secs(resp.ttl() as u64))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.client
            .clone()
            .lease_revoke(lease)
            .await
            .map_err(|e| lease_err(lease, e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("etcd://{}", self.members.join(","))
    }
}

/// Feeds `tx` with every change under `prefix` after `after`, re-creating the etcd watch from
/// the last delivered revision whenever it breaks. Ends when the receiver is dropped or the
/// revision was compacted.
async fn run_watch(
    mut client: Client,
    prefix: String,
    after: Revision,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
) {
    let mut delivered = after;
    let mut backoff = WATCH_RETRY_MIN;
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(delivered + 1)
            .with_progress_notify();
        let result = tokio::select! {
            _ = tx.closed() => return,
            r = client.watch(prefix.as_str(), Some(options)) => r,
        };
        let mut stream = match result {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%prefix, error = %e, "etcd watch could not start; retrying");
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(WATCH_RETRY_MAX);
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = tx.closed() => return,
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%prefix, error = %e, "etcd watch broke; resuming");
                    break;
                }
            };
            backoff = WATCH_RETRY_MIN;
            if resp.compact_revision() > 0 {
                let _ = tx.send(Err(StoreError::Compacted {
                    requested: delivered + 1,
                    oldest: resp.compact_revision(),
                }));
                return;
            }
            if resp.canceled() {
                tracing::debug!(%prefix, reason = resp.cancel_reason(), "etcd watch canceled; resuming");
                break;
            }
            let mut last = delivered;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                // A resumed watch starts after `delivered`, so this only guards against a
                // server replaying what it already sent.
                if kv.mod_revision() <= delivered {
                    continue;
                }
                let event = match event.event_type() {
                    EventType::Put => WatchEvent::Put(convert(kv)),
                    EventType::Delete => WatchEvent::Delete {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        revision: kv.mod_revision(),
                    },
                };
                last = last.max(event.revision());
                if tx.send(Ok(event)).is_err() {
                    return;
                }
            }
            delivered = last;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(WATCH_RETRY_MAX);
    }
}
