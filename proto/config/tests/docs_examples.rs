//! The examples in `docs/config.md` and `docs/authorization.md` are real: every `yaml` block
//! there parses and validates, alone and all together, and survives the store's round trip
//! unchanged.

use ferrule_config::{Kind, Resource, validate};

const DOC: &str = include_str!("../../../docs/config.md");
const AUTHZ_DOC: &str = include_str!("../../../docs/authorization.md");

/// The bodies of the docs' ```yaml blocks.
fn yaml_blocks() -> Vec<&'static str> {
    [DOC, AUTHZ_DOC]
        .into_iter()
        .flat_map(|doc| doc.split("```yaml\n").skip(1))
        .map(|rest| rest.split("```").next().expect("block is closed"))
        .collect()
}

#[test]
fn every_example_parses_validates_and_round_trips() {
    let blocks = yaml_blocks();
    assert!(
        blocks.len() >= 3,
        "expected the doc's examples, found {}",
        blocks.len()
    );
    let mut all = Vec::new();
    for block in blocks {
        let resources = Resource::parse_documents(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        assert_eq!(resources.len(), 1, "{block}");
        validate(&resources, None).unwrap_or_else(|e| panic!("{e}\n{block}"));
        for r in &resources {
            let id = r.id();
            let back =
                Resource::from_parts(r.kind.as_str(), &id.namespace, &id.name, &r.spec_json())
                    .unwrap();
            assert_eq!(&back, r);
            assert_eq!(
                Resource::parse_documents(&r.to_yaml()).unwrap(),
                std::slice::from_ref(r)
            );
        }
        all.extend(resources);
    }
    validate(&all, None).unwrap();
    for kind in Kind::ALL {
        assert!(all.iter().any(|r| r.kind == kind), "no example of {kind}");
    }
}

#[test]
fn the_complete_route_example_sets_every_rule_field() {
    let all: Vec<Resource> = yaml_blocks()
        .into_iter()
        .flat_map(|b| Resource::parse_documents(b).unwrap())
        .collect();
    let route = all
        .iter()
        .find_map(|r| match &r.spec {
            ferrule_config::Spec::HttpRoute(spec) => Some(spec),
            _ => None,
        })
        .unwrap();
    let rules = &route.rules;
    assert!(rules.iter().any(|r| {
        r.fault
            .as_ref()
            .is_some_and(|f| f.delay.is_some() && f.abort.is_some())
    }));
    assert!(
        rules
            .iter()
            .any(|r| r.request_headers.is_some() && r.response_headers.is_some())
    );
    assert!(
        rules
            .iter()
            .any(|r| r.retries.is_some() && r.timeout.is_some())
    );
    assert!(rules.iter().any(|r| r.backends.len() > 1));
    let matches: Vec<_> = rules.iter().flat_map(|r| &r.matches).collect();
    assert!(matches.iter().any(|m| !m.headers.is_empty()));
    assert!(matches.iter().any(|m| !m.query_params.is_empty()));
    assert!(matches.iter().any(|m| m.method.is_some()));
}
