//! The configuration centre's store side, in process, over the embedded store and a real etcd:
//! apply is validated and all-or-nothing, versions are revisions of config commits only,
//! history lists every change, rollback restores an earlier version in one commit.

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
