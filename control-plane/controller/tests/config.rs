//! The configuration centre's store side, in process, over the embedded store and a real etcd:
//! apply is validated and all-or-nothing, versions are revisions of config commits only,
//! history lists every change, rollback restores an earlier version in one commit; a
//! `Gateway` reaches, over the Config stream, the gateway it names and no other proxy; and a
//! proxy that subscribes again with other upstreams gets their policy on the same stream.

use std::sync::Arc;

use anyhow::Result;
use ferrule_config::Resource;
use ferrule_controller::config::ConfigStore;
use ferrule_harness::Etcd;
use ferrule_proto::v1 as pb;
use ferrule_store::{EtcdStore, MemoryStore, Store};

const POLICY: &str = r#"
apiVersion: ferrule.io/v1
kind: ServicePolicy
metadata: {name: user}
spec:
  service: user
  timeouts: {request: 2s}
"#;

const ROUTE: &str = r#"
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  service: user
  rules:
    - backends: [{service: user, weight: 90}, {service: user, weight: 10}]
"#;

fn docs(yaml: &str) -> Result<Vec<pb::Resource>> {
    Ok(Resource::parse_documents(yaml)?
        .into_iter()
        .map(|r| pb::Resource {
            kind: r.kind.to_string(),
            namespace: r.metadata.namespace.clone(),
            name: r.metadata.name.clone(),
            spec_json: r.spec_json(),
            revision: 0,
        })
        .collect())
}

async fn scenario(store: Arc<dyn Store>) -> Result<()> {
    let config = ConfigStore::new(store.clone());

    // Dry run stores nothing.
    let dry = config.apply(docs(POLICY)?, true).await?;
    assert_eq!(dry.outcomes, ["created"]);
    assert!(config.get("", "", "").await?.0.is_empty());

    let v1 = config.apply(docs(POLICY)?, false).await?;
    assert_eq!(v1.outcomes, ["created"]);
    let same = config.apply(docs(POLICY)?, false).await?;
    assert_eq!(
        (same.version, same.outcomes.as_slice()),
        (v1.version, ["unchanged".to_string()].as_slice())
    );

    // Unrelated writes do not move the config version.
    store
        .put("/ferrule/registry/user//127.0.0.1:1", vec![], None)
        .await?;
    assert_eq!(config.get("", "", "").await?.1, v1.version);

    // A batch with one bad document stores nothing, and names the field.
    let bad = format!("{ROUTE}---\n{}", POLICY.replace("2s", "-1s"));
    let err = config
        .apply(
            docs(ROUTE)?.into_iter().chain(bad_policy()?).collect(),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("weight"), "{}", err.message());
    assert!(
        docs(&bad).is_err(),
        "a negative duration is refused by parsing"
    );
    let (stored, version) = config.get("", "", "").await?;
    assert_eq!(
        (stored.len(), version),
        (1, v1.version),
        "nothing stored, version unchanged"
    );

    let v2 = config
        .apply(docs(&POLICY.replace("2s", "3s"))?, false)
        .await?;
    assert_eq!(v2.outcomes, ["configured"]);
    assert!(v2.version > v1.version);

    let history = config.history("ServicePolicy", "default", "user").await?;
    let versions: Vec<i64> = history.iter().map(|c| c.version).collect();
    assert_eq!(versions, [v1.version, v2.version]);

    let back = config.rollback(v1.version).await?;
    assert!(back.version > v2.version);
    let (now, _) = config.get("ServicePolicy", "default", "user").await?;
    assert!(now[0].spec_json.contains("2s"), "{}", now[0].spec_json);

    config.delete("ServicePolicy", "", "user").await?;
    assert!(config.get("", "", "").await?.0.is_empty());
    let missing = config
        .delete("ServicePolicy", "", "user")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    Ok(())
}

/// A route whose backend weights sum to 0: refused by validation, not parsing.
fn bad_policy() -> Result<Vec<pb::Resource>> {
    docs(
        &ROUTE
            .replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 0")
            .replace("name: split", "name: zero"),
    )
}

#[tokio::test]
async fn config_on_memory() -> Result<()> {
    scenario(Arc::new(MemoryStore::new())).await
}

#[tokio::test]
async fn config_on_etcd() -> Result<()> {
    let etcd = Etcd::start().await?;
    let store = EtcdStore::connect(&[etcd.client_addr().to_string()]).await?;
    scenario(Arc::new(store)).await
}

/// Rules across resources hold against what is stored: a second policy for the same service
/// under another name is refused, and nothing changes.
#[tokio::test]
async fn second_policy_for_a_service_is_refused() -> Result<()> {
    let config = ConfigStore::new(Arc::new(MemoryStore::new()));
    let v1 = config.apply(docs(POLICY)?, false).await?;
    let err = config
        .apply(docs(&POLICY.replace("name: user", "name: user-2"))?, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let (stored, version) = config.get("", "", "").await?;
    assert_eq!((stored.len(), version), (1, v1.version));
    Ok(())
}

const GATEWAY: &str = r#"
apiVersion: ferrule.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  rateLimits:
    api: {requestsPerSecond: 10, key: client-ip}
  routes:
    - {name: users, pathPrefix: /api/users, rewritePrefix: /users, service: "user:http", public: true, rateLimit: api}
"#;

/// Subscribes to `Config/Watch` as proxy `id` of `service` in `mode`; the sender keeps the
/// request stream open.
async fn subscribe(
    channel: tonic::transport::Channel,
    id: &str,
    service: &str,
    mode: &str,
) -> Result<(
    tokio::sync::mpsc::Sender<pb::ConfigRequest>,
    tonic::Streaming<pb::ConfigSnapshot>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ConfigRequest {
        kind: Some(pb::config_request::Kind::Subscribe(pb::Subscribe {
            proxy: Some(pb::ProxyInfo {
                proxy_id: id.into(),
                service: service.into(),
                namespace: "default".into(),
                mode: mode.into(),
                ..Default::default()
            }),
            upstreams: Vec::new(),
            generation: 0,
        })),
    })
    .await?;
    let snapshots = pb::config_client::ConfigClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, snapshots))
}

/// The next snapshot as (version, [Kind/namespace/name]), within 10 s.
async fn next(snapshots: &mut tonic::Streaming<pb::ConfigSnapshot>) -> Result<(i64, Vec<String>)> {
    let snapshot = tokio::time::timeout(std::time::Duration::from_secs(10), snapshots.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("the config stream ended"))?;
    let ids = snapshot
        .resources
        .iter()
        .map(|r| format!("{}/{}/{}", r.kind, r.namespace, r.name))
        .collect();
    Ok((snapshot.version, ids))
}

/// How many resources are stored, and the config version.
async fn stored_count(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> Result<(usize, i64)> {
    let all = admin
        .get_config(pb::GetConfigRequest::default())
        .await?
        .into_inner();
    Ok((all.resources.len(), all.version))
}

/// A `Gateway` through the controller's gRPC API on a real etcd: an invalid one is refused
/// naming the field, with nothing stored; a valid one reaches the Config stream of the gateway
/// named as its service (with the policy of the service its routes call), live, and no other
/// proxy's.
#[tokio::test]
async fn gateway_reaches_only_its_gateway_on_etcd() -> Result<()> {
    let etcd = Etcd::start().await?;
    let store = EtcdStore::connect(&[etcd.client_addr().to_string()]).await?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(ferrule_controller::serve(
        Arc::new(store),
        grpc,
        http,
        shutdown.clone(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());

    let bad = GATEWAY.replace("rateLimit: api", "rateLimit: apii");
    let err = admin
        .apply_config(pb::ApplyConfigRequest {
            resources: docs(&format!("{POLICY}---{bad}"))?,
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert_eq!(
        err.message(),
        "Gateway/default/edge: spec.routes[0].rateLimit: no rate limit named \"apii\" in rateLimits"
    );
    assert_eq!(stored_count(&mut admin).await?, (0, 0), "nothing stored");

    let v1 = admin
        .apply_config(pb::ApplyConfigRequest {
            resources: docs(&format!("{POLICY}---{GATEWAY}"))?,
            dry_run: false,
        })
        .await?
        .into_inner();
    assert_eq!(v1.outcomes, ["created", "created"]);

    let (gateway_tx, mut gateway) = subscribe(channel.clone(), "gw-1", "edge", "gateway").await?;
    let (other_tx, mut other) = subscribe(channel.clone(), "gw-2", "other", "gateway").await?;
    let (sidecar_tx, mut sidecar) = subscribe(channel.clone(), "edge-1", "edge", "sidecar").await?;
    assert_eq!(
        next(&mut gateway).await?,
        (
            v1.version,
            vec![
                "Gateway/default/edge".to_string(),
                "ServicePolicy/default/user".to_string()
            ]
        )
    );
    assert_eq!(next(&mut other).await?, (v1.version, vec![]));
    assert_eq!(next(&mut sidecar).await?, (v1.version, vec![]));

    // `ferrule apply` changes it live: the gateway gets the new version.
    let v2 = admin
        .apply_config(pb::ApplyConfigRequest {
            resources: docs(&GATEWAY.replace("requestsPerSecond: 10", "requestsPerSecond: 5"))?,
            dry_run: false,
        })
        .await?
        .into_inner();
    assert_eq!(v2.outcomes, ["configured"]);
    let snapshot = tokio::time::timeout(std::time::Duration::from_secs(10), gateway.message())
        .await??
        .expect("a new snapshot");
    assert_eq!(snapshot.version, v2.version);
    let gw = snapshot
        .resources
        .iter()
        .find(|r| r.kind == "Gateway")
        .expect("the gateway's resource");
    assert!(
        gw.spec_json.contains(r#""requestsPerSecond":5"#),
        "{}",
        gw.spec_json
    );

    // Closing every client lets the controller stop without waiting out its drain grace.
    shutdown.cancel();
    drop((
        gateway, other, sidecar, gateway_tx, other_tx, sidecar_tx, admin, channel,
    ));
    tokio::time::timeout(std::time::Duration::from_secs(10), server).await???;
    Ok(())
}

/// A proxy subscribes to a service when it first calls it and unsubscribes when it forgets it:
/// each later `subscribe` on the stream changes what its snapshots select, at the same config
/// version, and the snapshot says which subscribe it reflects.
#[tokio::test]
async fn a_later_subscribe_changes_the_selection_on_the_same_stream() -> Result<()> {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(ferrule_controller::serve(
        Arc::new(MemoryStore::new()),
        grpc,
        http,
        shutdown.clone(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let v1 = admin
        .apply_config(pb::ApplyConfigRequest {
            resources: docs(POLICY)?,
            dry_run: false,
        })
        .await?
        .into_inner();

    let (tx, mut snapshots) = subscribe(channel.clone(), "order-1", "order", "sidecar").await?;
    assert_eq!(next(&mut snapshots).await?, (v1.version, vec![]));

    let resubscribe = |upstreams: &[&str], generation| pb::ConfigRequest {
        kind: Some(pb::config_request::Kind::Subscribe(pb::Subscribe {
            proxy: None,
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
            generation,
        })),
    };
    tx.send(resubscribe(&["user"], 1)).await?;
    let snapshot = tokio::time::timeout(std::time::Duration::from_secs(10), snapshots.message())
        .await??
        .expect("a snapshot for the new subscription");
    assert_eq!((snapshot.version, snapshot.subscription), (v1.version, 1));
    let names: Vec<_> = snapshot.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["user"]);

    tx.send(resubscribe(&[], 2)).await?;
    let snapshot = tokio::time::timeout(std::time::Duration::from_secs(10), snapshots.message())
        .await??
        .expect("a snapshot for the emptied subscription");
    assert_eq!((snapshot.version, snapshot.subscription), (v1.version, 2));
    assert!(snapshot.resources.is_empty());

    shutdown.cancel();
    drop((snapshots, tx, admin, channel));
    tokio::time::timeout(std::time::Duration::from_secs(10), server).await???;
    Ok(())
}
