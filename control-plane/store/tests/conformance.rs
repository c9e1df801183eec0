//! The store conformance suite: every test runs against the embedded store and against a real
//! etcd (started by the harness on free loopback ports), so both implementations keep the same
//! semantics. Tests that only etcd can run (restarts) are at the end.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrule_harness::Etcd;
use ferrule_store::{
    EtcdStore, MemoryStore, Op, Revision, Store, StoreError, WatchEvent, WatchStream,
};
use futures::StreamExt;

/// How long a watcher may take to see a store event.
const WATCH_BOUND: Duration = Duration::from_secs(1);

struct Fixture {
    store: Arc<dyn Store>,
    // Keeps etcd running for the test; dropped (killed) after the store.
    _etcd: Option<Etcd>,
}

async fn memory() -> Result<Fixture> {
    Ok(Fixture {
        store: Arc::new(MemoryStore::new()),
        _etcd: None,
    })
}

async fn etcd() -> Result<Fixture> {
    let etcd = Etcd::start().await?;
    let store = EtcdStore::connect(&[etcd.client_addr().to_string()]).await?;
    Ok(Fixture {
        store: Arc::new(store),
        _etcd: Some(etcd),
    })
}

async fn next_event(watch: &mut WatchStream, within: Duration) -> Result<WatchEvent> {
    match tokio::time::timeout(within, watch.next()).await {
        Ok(Some(Ok(event))) => Ok(event),
        Ok(Some(Err(e))) => bail!("watch failed: {e}"),
        Ok(None) => bail!("watch ended"),
        Err(_) => bail!("no watch event within {within:?}"),
    }
}

async fn put_get_list_delete(store: Arc<dyn Store>) -> Result<()> {
    let r1 = store.put("/t/a", b"1".to_vec(), None).await?;
    let r2 = store.put("/t/b", b"2".to_vec(), None).await?;
    store.put("/u/c", b"3".to_vec(), None).await?;
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");

    let a = store.get("/t/a").await?.context("a exists")?;
    assert_eq!(a.value, b"1");
    assert_eq!((a.create_revision, a.mod_revision), (r1, r1));
    assert_eq!(store.get("/t/missing").await?, None);

    let r3 = store.put("/t/a", b"1b".to_vec(), None).await?;
    let a = store.get("/t/a").await?.context("a exists")?;
    assert_eq!((a.create_revision, a.mod_revision), (r1, r3));

    let listing = store.list("/t/", None).await?;
    let keys: Vec<_> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b"]);
    assert!(listing.revision >= r3);

    let rd = store.delete("/t/b").await?.context("b deleted")?;
    assert!(rd > r3);
    assert_eq!(store.delete("/t/b").await?, None, "deleting a missing key");
    assert_eq!(store.list("/t/", None).await?.kvs.len(), 1);
    Ok(())
}

async fn list_at_past_revision(store: Arc<dyn Store>) -> Result<()> {
    let r1 = store.put("/h/x", b"v1".to_vec(), None).await?;
    store.put("/h/x", b"v2".to_vec(), None).await?;
    let r3 = store.put("/h/y", b"y".to_vec(), None).await?;
    store.delete("/h/x").await?;

    let at1 = store.list("/h/", Some(r1)).await?;
    assert_eq!(at1.revision, r1);
    let view: Vec<_> = at1
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(view, [("/h/x", b"v1".as_slice())]);

    let at3 = store.list("/h/", Some(r3)).await?;
    let view: Vec<_> = at3
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(
        view,
        [("/h/x", b"v2".as_slice()), ("/h/y", b"y".as_slice())]
    );

    let now = store.list("/h/", None).await?;
    assert_eq!(now.kvs.len(), 1);
    match store.list("/h/", Some(now.revision + 100)).await {
        Err(StoreError::FutureRevision(_)) => {}
        other => bail!("a future revision must be refused, got {other:?}"),
    }
    Ok(())
}

async fn commit_is_atomic(store: Arc<dyn Store>) -> Result<()> {
    store.put("/c/old", b"o".to_vec(), None).await?;
    let before = store.list("/c/", None).await?.revision;
    let mut watch = store.watch("/c/", before).await?;
    let rev = store
        .commit(vec![
            Op::Put {
                key: "/c/a".into(),
                value: b"a".to_vec(),
            },
            Op::Put {
                key: "/c/b".into(),
                value: b"b".to_vec(),
            },
            Op::Delete {
                key: "/c/old".into(),
            },
        ])
        .await?;
    let listing = store.list("/c/", None).await?;
    let keys: Vec<_> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/c/a", "/c/b"]);
    for kv in &listing.kvs {
        assert_eq!(kv.mod_revision, rev, "one revision for the whole commit");
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = next_event(&mut watch, WATCH_BOUND).await?;
        assert_eq!(e.revision(), rev);
        seen.push(e.key().to_string());
    }
    seen.sort();
    assert_eq!(seen, ["/c/a", "/c/b", "/c/old"]);
    Ok(())
}

async fn watch_sees_put_and_delete_promptly(store: Arc<dyn Store>) -> Result<()> {
    let start = store.list("/w/", None).await?.revision;
    let mut watch = store.watch("/w/", start).await?;
    let r_put = store.put("/w/a", b"1".to_vec(), None).await?;
    store.put("/other/z", b"x".to_vec(), None).await?;
    let r_del = store.delete("/w/a").await?.context("deleted")?;

    match next_event(&mut watch, WATCH_BOUND).await? {
        WatchEvent::Put(kv) => assert_eq!((kv.key.as_str(), kv.mod_revision), ("/w/a", r_put)),
        other => bail!("expected the put, got {other:?}"),
    }
    match next_event(&mut watch, WATCH_BOUND).await? {
        WatchEvent::Delete { key, revision } => {
            assert_eq!((key.as_str(), revision), ("/w/a", r_del))
        }
        other => bail!("expected the delete, got {other:?}"),
    }
    Ok(())
}

async fn watch_from_past_revision_replays(store: Arc<dyn Store>) -> Result<()> {
    let r1 = store.put("/p/a", b"1".to_vec(), None).await?;
    let r2 = store.put("/p/b", b"2".to_vec(), None).await?;
    let r3 = store.put("/p/a", b"3".to_vec(), None).await?;
    let mut watch = store.watch("/p/", r1).await?;
    let revs = [
        next_event(&mut watch, WATCH_BOUND).await?.revision(),
        next_event(&mut watch, WATCH_BOUND).await?.revision(),
    ];
    assert_eq!(revs, [r2, r3], "every change after r1, in order, once");
    let r4 = store.put("/p/c", b"4".to_vec(), None).await?;
    assert_eq!(next_event(&mut watch, WATCH_BOUND).await?.revision(), r4);
    Ok(())
}

async fn lease_expiry_removes_keys(store: Arc<dyn Store>) -> Result<()> {
    let lease = store.grant_lease(Duration::from_secs(2)).await?;
    let start = store.list("/l/", None).await?.revision;
    let mut watch = store.watch("/l/", start).await?;
    store.put("/l/ep", b"e".to_vec(), Some(lease)).await?;
    let put = next_event(&mut watch, WATCH_BOUND).await?;
    assert!(
        matches!(&put, WatchEvent::Put(kv) if kv.lease == Some(lease)),
        "{put:?}"
    );
    let granted_at = tokio::time::Instant::now();

    // etcd checks expiry every 500 ms on top of the TTL; allow the TTL plus the watch bound
    // plus that check interval.
    let deadline = Duration::from_secs(2) + WATCH_BOUND + Duration::from_millis(600);
    match next_event(&mut watch, deadline).await? {
        WatchEvent::Delete { key, .. } => assert_eq!(key, "/l/ep"),
        other => bail!("expected expiry, got {other:?}"),
    }
    assert!(
        granted_at.elapsed() >= Duration::from_millis(1500),
        "expired too early"
    );
    assert_eq!(store.get("/l/ep").await?, None);
    match store.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease),
        other => bail!("keep-alive of an expired lease: {other:?}"),
    }
    Ok(())
}

async fn keep_alive_extends_lease(store: Arc<dyn Store>) -> Result<()> {
    let lease = store.grant_lease(Duration::from_secs(2)).await?;
    store.put("/k/ep", b"e".to_vec(), Some(lease)).await?;
    // Three keep-alives spaced 1 s apart carry the key well past its 2 s TTL. Sleeping is the
    // point of this test: time passing is what a lease measures.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ttl = store.keep_alive(lease).await?;
        assert!(ttl >= Duration::from_secs(1), "ttl {ttl:?}");
        assert!(store.get("/k/ep").await?.is_some(), "kept alive");
    }
    Ok(())
}

async fn revoke_deletes_at_once(store: Arc<dyn Store>) -> Result<()> {
    let lease = store.grant_lease(Duration::from_secs(30)).await?;
    store.put("/r/a", b"a".to_vec(), Some(lease)).await?;
    store.put("/r/b", b"b".to_vec(), Some(lease)).await?;
    let start = store.list("/r/", None).await?.revision;
    let mut watch = store.watch("/r/", start).await?;
    store.revoke_lease(lease).await?;
    for _ in 0..2 {
        let e = next_event(&mut watch, WATCH_BOUND).await?;
        assert!(matches!(e, WatchEvent::Delete { .. }), "{e:?}");
    }
    assert!(store.list("/r/", None).await?.kvs.is_empty());
    match store.put("/r/c", b"c".to_vec(), Some(lease)).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => bail!("put with a revoked lease: {other:?}"),
    }
    Ok(())
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    let f = super::memory().await?;
                    super::$name(f.store.clone()).await
                }
            )*
        }
        mod etcd_store {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    let f = super::etcd().await?;
                    super::$name(f.store.clone()).await
                }
            )*
        }
    };
}

conformance!(
    put_get_list_delete,
    list_at_past_revision,
    commit_is_atomic,
    watch_sees_put_and_delete_promptly,
    watch_from_past_revision_replays,
    lease_expiry_removes_keys,
    keep_alive_extends_lease,
    revoke_deletes_at_once,
);

/// A watch from revision R sees every change after R exactly once, across an etcd restart:
/// changes before the outage, and changes made after etcd came back.
#[tokio::test]
async fn etcd_watch_resumes_across_restart() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let store = EtcdStore::connect(&[etcd.client_addr().to_string()]).await?;
    let r0 = store.put("/x/seed", b"0".to_vec(), None).await?;
    let mut watch = store.watch("/x/", r0).await?;
    let mut expected: Vec<Revision> = Vec::new();
    for i in 0..3 {
        expected.push(store.put(&format!("/x/before{i}"), vec![i], None).await?);
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_event(&mut watch, WATCH_BOUND).await?.revision());
    }

    etcd.restart().await?;
    // The client reconnects by itself; writes fail until it has.
    let mut after = Vec::new();
    for i in 0..3u8 {
        let key = format!("/x/after{i}");
        let rev = ferrule_harness::eventually(Duration::from_secs(15), "etcd back", || {
            let store = &store;
            let key = key.clone();
            async move { store.put(&key, vec![i], None).await.ok() }
        })
        .await?;
        after.push(rev);
    }
    expected.extend(&after);
    for _ in 0..3 {
        seen.push(
            next_event(&mut watch, Duration::from_secs(10))
                .await?
                .revision(),
        );
    }
    assert_eq!(
        seen, expected,
        "every change after r0, in order, none twice"
    );
    // And nothing more: no duplicate replay arrives.
    let extra = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
    Ok(())
}

/// While etcd is down, a watch stays open (it does not end) and reads fail with Unavailable.
#[tokio::test]
async fn etcd_outage_is_unavailable_not_fatal() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let store = EtcdStore::connect(&[etcd.client_addr().to_string()]).await?;
    let r0 = store.put("/o/a", b"1".to_vec(), None).await?;
    let mut watch = store.watch("/o/", r0).await?;
    etcd.stop();
    match store.get("/o/a").await {
        Err(StoreError::Unavailable(_)) => {}
        other => bail!("a read during an outage must be Unavailable, got {other:?}"),
    }
    let pending = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
    assert!(
        pending.is_err(),
        "the watch must stay open during the outage: {pending:?}"
    );
    etcd.restart().await?;
    let rev = ferrule_harness::eventually(Duration::from_secs(15), "etcd back", || {
        let store = &store;
        async move { store.put("/o/b", b"2".to_vec(), None).await.ok() }
    })
    .await?;
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(10))
            .await?
            .revision(),
        rev
    );
    Ok(())
}
