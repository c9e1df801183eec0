//! The controller over a real etcd (and over the embedded store): registrations under leases,
//! discovery streams (snapshot, then deltas, promptly), namespaces keeping same-named services
//! apart, two replicas agreeing, and etcd restarts that lose and duplicate nothing.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrule_harness::{Controller, Etcd, eventually};
use ferrule_proto::v1::{
    DeregisterRequest, DiscoveryUpdate, Endpoint, KeepAliveRequest, ListEndpointsRequest,
    ListServicesRequest, LookupRequest, RegisterRequest, WatchRequest, admin_client::AdminClient,
    discovery_client::DiscoveryClient, discovery_update::Kind, registry_client::RegistryClient,
};
use futures::StreamExt;
use tonic::Streaming;

/// How long a discovery watcher may take to see a store event.
const WATCH_BOUND: Duration = Duration::from_secs(1);

fn endpoint(service: &str, port: u32) -> Endpoint {
    Endpoint {
        service: service.into(),
        address: "127.0.0.1".into(),
        port,
        weight: 1,
        ..Default::default()
    }
}

async fn register(controller: &Controller, ep: Endpoint, ttl: u32) -> Result<i64> {
    let mut registry = RegistryClient::connect(controller.url()).await?;
    let resp = registry
        .register(RegisterRequest {
            endpoint: Some(ep),
            ttl_seconds: ttl,
        })
        .await?
        .into_inner();
    Ok(resp.lease_id)
}

async fn watch(controller: &Controller, service: &str) -> Result<Streaming<DiscoveryUpdate>> {
    let mut discovery = DiscoveryClient::connect(controller.url()).await?;
    Ok(discovery
        .watch(WatchRequest {
            service: service.into(),
            namespace: String::new(),
            proxy: None,
        })
        .await?
        .into_inner())
}

async fn next(
    stream: &mut Streaming<DiscoveryUpdate>,
    within: Duration,
) -> Result<DiscoveryUpdate> {
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(Ok(u))) => Ok(u),
        Ok(Some(Err(status))) => bail!("discovery stream failed: {status}"),
        Ok(None) => bail!("discovery stream ended"),
        Err(_) => bail!("no discovery update within {within:?}"),
    }
}

fn ports(update: &DiscoveryUpdate) -> (Vec<u32>, Vec<String>) {
    match &update.kind {
        Some(Kind::Snapshot(s)) => (s.endpoints.iter().map(|e| e.port).collect(), vec![]),
        Some(Kind::Delta(d)) => (d.added.iter().map(|e| e.port).collect(), d.removed.clone()),
        None => (vec![], vec![]),
    }
}

async fn endpoints_of(controller: &Controller, service: &str) -> Result<Vec<u32>> {
    let mut admin = AdminClient::connect(controller.url()).await?;
    let resp = admin
        .list_endpoints(ListEndpointsRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    let mut ports: Vec<u32> = resp.endpoints.iter().map(|e| e.port).collect();
    ports.sort();
    Ok(ports)
}

/// Snapshot first, then an add, a deregistration and a lease expiry, each within a second of
/// the store event.
async fn discovery_follows_registrations(store: &str) -> Result<()> {
    let controller = Controller::start(store).await?;
    register(&controller, endpoint("user", 9001), 30).await?;

    let mut stream = watch(&controller, "user").await?;
    let first = next(&mut stream, WATCH_BOUND).await?;
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
    assert_eq!(ports(&first).0, [9001]);

    let lease = register(&controller, endpoint("user", 9002), 30).await?;
    let add = next(&mut stream, WATCH_BOUND).await?;
    assert_eq!(ports(&add).0, [9002]);
    assert!(add.version > first.version);

    let mut registry = RegistryClient::connect(controller.url()).await?;
    registry
        .deregister(DeregisterRequest { lease_id: lease })
        .await?;
    let remove = next(&mut stream, WATCH_BOUND).await?;
    assert_eq!(ports(&remove).1, ["/127.0.0.1:9002"]);

    // An expiring registration: TTL 2 s, never kept alive. etcd checks expiry every 500 ms.
    register(&controller, endpoint("user", 9003), 2).await?;
    assert_eq!(ports(&next(&mut stream, WATCH_BOUND).await?).0, [9003]);
    let expiry = next(
        &mut stream,
        Duration::from_secs(2) + WATCH_BOUND + Duration::from_millis(600),
    )
    .await?;
    assert_eq!(ports(&expiry).1, ["/127.0.0.1:9003"]);
    assert_eq!(endpoints_of(&controller, "user").await?, [9001]);
    Ok(())
}

#[tokio::test]
async fn discovery_follows_registrations_on_etcd() -> Result<()> {
    let etcd = Etcd::start().await?;
    discovery_follows_registrations(&etcd.url()).await
}

#[tokio::test]
async fn discovery_follows_registrations_on_memory() -> Result<()> {
    discovery_follows_registrations("memory").await
}

/// `user` in `default` and `user` in `shop` are two services: each watch, listing and lookup
/// sees only its own, and a namespace that is not a DNS label is refused naming the field.
#[tokio::test]
async fn namespaces_keep_same_named_services_apart_on_etcd() -> Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    register(&controller, endpoint("user", 9101), 30).await?;
    let shop = Endpoint {
        namespace: "shop".into(),
        ..endpoint("user", 9102)
    };
    register(&controller, shop, 30).await?;

    let mut discovery = DiscoveryClient::connect(controller.url()).await?;
    for (namespace, port) in [("", 9101), ("default", 9101), ("shop", 9102)] {
        let mut stream = discovery
            .watch(WatchRequest {
                service: "user".into(),
                namespace: namespace.into(),
                proxy: None,
            })
            .await?
            .into_inner();
        let first = next(&mut stream, WATCH_BOUND).await?;
        assert_eq!(ports(&first).0, [port], "namespace {namespace:?}");
    }
    assert_eq!(endpoints_of(&controller, "user").await?, [9101]);
    assert_eq!(endpoints_of(&controller, "user.shop").await?, [9102]);

    let mut admin = AdminClient::connect(controller.url()).await?;
    let services = admin
        .list_services(ListServicesRequest {})
        .await?
        .into_inner()
        .services;
    let names: Vec<_> = services
        .iter()
        .map(|s| (s.name.as_str(), s.namespace.as_str()))
        .collect();
    assert_eq!(names, [("user", "default"), ("user.shop", "shop")]);

    let found = eventually(WATCH_BOUND * 10, "the address index", || {
        let mut discovery = discovery.clone();
        async move {
            let answer = discovery
                .lookup(LookupRequest {
                    address: "127.0.0.1".into(),
                    port: 9102,
                    proxy: None,
                })
                .await
                .ok()?
                .into_inner();
            answer.found.then_some(answer)
        }
    })
    .await?;
    assert_eq!(
        (found.namespace.as_str(), found.service.as_str()),
        ("shop", "user")
    );

    let mut registry = RegistryClient::connect(controller.url()).await?;
    let bad = registry
        .register(RegisterRequest {
            endpoint: Some(Endpoint {
                namespace: "Shop".into(),
                ..endpoint("user", 9103)
            }),
            ttl_seconds: 30,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().starts_with("endpoint.namespace:"),
        "{}",
        bad.message()
    );
    Ok(())
}

/// Two controllers on one etcd give the same answers; a lease granted through one is kept alive
/// through the other, and both streams see the same changes.
#[tokio::test]
async fn two_controllers_agree() -> Result<()> {
    let etcd = Etcd::start().await?;
    let a = Controller::start(&etcd.url()).await?;
    let b = Controller::start(&etcd.url()).await?;

    let mut on_a = watch(&a, "order").await?;
    let mut on_b = watch(&b, "order").await?;
    next(&mut on_a, WATCH_BOUND).await?;
    next(&mut on_b, WATCH_BOUND).await?;

    let lease = register(&a, endpoint("order", 9100), 2).await?;
    assert_eq!(ports(&next(&mut on_a, WATCH_BOUND).await?).0, [9100]);
    assert_eq!(ports(&next(&mut on_b, WATCH_BOUND).await?).0, [9100]);
    assert_eq!(
        endpoints_of(&a, "order").await?,
        endpoints_of(&b, "order").await?
    );

    // Keep the 2 s lease alive through B for 3 s: the registration made on A survives.
    let mut registry_b = RegistryClient::connect(b.url()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = registry_b
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    for _ in 0..6 {
        tx.send(KeepAliveRequest { lease_id: lease }).await?;
        let ack = tokio::time::timeout(Duration::from_secs(2), acks.next())
            .await
            .context("keep-alive answer")?
            .context("keep-alive stream ended")??;
        assert!(ack.found, "lease found through the other controller");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(endpoints_of(&a, "order").await?, [9100]);
    assert_eq!(endpoints_of(&b, "order").await?, [9100]);
    Ok(())
}

/// A discovery stream survives an etcd restart: it keeps its last snapshot during the outage
/// (the stream stays open) and then sees every change made after etcd returns, once.
#[tokio::test]
async fn discovery_survives_etcd_restart() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.url()).await?;
    register(&controller, endpoint("payment", 9200), 60).await?;
    let mut stream = watch(&controller, "payment").await?;
    assert_eq!(ports(&next(&mut stream, WATCH_BOUND).await?).0, [9200]);

    etcd.restart().await?;
    let lease = ferrule_harness::eventually(Duration::from_secs(15), "etcd back", || {
        let controller = &controller;
        async move {
            register(controller, endpoint("payment", 9201), 60)
                .await
                .ok()
        }
    })
    .await?;
    assert!(lease > 0);
    let update = next(&mut stream, Duration::from_secs(10)).await?;
    assert!(
        matches!(update.kind, Some(Kind::Delta(_))),
        "a delta, not a new snapshot: {update:?}"
    );
    assert_eq!(ports(&update).0, [9201]);
    let extra = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(extra.is_err(), "no duplicate update: {extra:?}");
    assert_eq!(endpoints_of(&controller, "payment").await?, [9200, 9201]);
    Ok(())
}

/// Bad input: an unknown service is an empty list; an invalid endpoint is refused naming the
/// field; a store URL that cannot be parsed stops the controller with a clear message.
#[tokio::test]
async fn bad_input_is_refused_clearly() -> Result<()> {
    let controller = Controller::start("memory").await?;
    assert!(endpoints_of(&controller, "nobody").await?.is_empty());

    let mut registry = RegistryClient::connect(controller.url()).await?;
    let err = registry
        .register(RegisterRequest {
            endpoint: Some(Endpoint {
                address: "not-an-ip".into(),
                ..endpoint("user", 1)
            }),
            ttl_seconds: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("endpoint.address"),
        "{}",
        err.message()
    );

    let mut cmd = std::process::Command::new(ferrule_harness::binary("ferrule-controller")?);
    cmd.args(["--store", "etcd:/oops"]);
    let output = ferrule_harness::output(cmd).await?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--store") && stderr.contains("etcd://host:port"),
        "stderr: {stderr}"
    );
    Ok(())
}

/// A stopping controller ends its streams at once (so proxies and registrants move to another
/// replica) and exits, instead of holding them open while it drains.
#[tokio::test]
async fn shutdown_ends_streams() -> Result<()> {
    let controller = Controller::start("memory").await?;
    let mut stream = watch(&controller, "user").await?;
    next(&mut stream, WATCH_BOUND).await?;
    let lease = register(&controller, endpoint("user", 9300), 30).await?;
    next(&mut stream, WATCH_BOUND).await?;
    let mut registry = RegistryClient::connect(controller.url()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut acks = registry
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(KeepAliveRequest { lease_id: lease }).await?;
    assert!(acks.next().await.context("ack")??.found);

    drop(tx);
    // The wait is async: the client connections need the runtime to answer GOAWAY meanwhile.
    let stopping = std::time::Instant::now();
    let mut controller = controller;
    let status = controller.process.terminate(Duration::from_secs(5)).await?;
    assert!(status.success(), "{status}");
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "took {:?}",
        stopping.elapsed()
    );
    let end = tokio::time::timeout(Duration::from_secs(2), stream.next()).await?;
    assert!(
        !matches!(end, Some(Ok(_))),
        "the discovery stream ended: {end:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(2), acks.next()).await?;
    assert!(
        !matches!(end, Some(Ok(_))),
        "the keep-alive stream ended: {end:?}"
    );
    Ok(())
}
