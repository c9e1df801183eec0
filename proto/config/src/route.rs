//! `HTTPRoute`: requests to a service matched by path, method, headers and query, and sent to
//! weighted backends (traffic split, canary), with per-rule timeout and retry overrides,
//! header rewrites and fault injection.
//!
//! Rules are tried in the order written; the first rule with a matching `matches` entry wins
//! (entries are alternatives, the conditions inside one entry must all hold). A request no rule
//! matches goes to the parent service with its `ServicePolicy`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{EffectivePolicy, EffectiveRetries, Retries};

/// Default for a fault's `percent` and a backend's `weight`.
pub const DEFAULT_FAULT_PERCENT: f64 = 100.0;
pub const DEFAULT_BACKEND_WEIGHT: u32 = 1;
pub const MAX_BACKEND_WEIGHT: u32 = 10_000;

/// The `spec` of an `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// The parent service: requests addressed to it are routed by this resource.
    pub service: String,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// Names the rule in metrics and errors; a DNS label, unique within the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Alternatives; empty matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Where matched requests go; empty sends them to the parent service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// Whole-request timeout, replacing the service policy's `timeouts.request`.
    #[serde(
        default,
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Overrides of the service policy's retries, field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Conditions that must all hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// An HTTP method such as `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The whole path equals `value`.
    Exact,
    /// The path starts with `value` at a segment boundary: `/api` matches `/api` and `/api/x`,
    /// not `/apix`.
    #[default]
    Prefix,
    /// `value` is a regular expression that must match the whole path.
    Regex,
}

/// A header or query parameter condition.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    pub value: String,
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    /// `value` is a regular expression that must match the whole value.
    Regex,
}

/// One destination of a traffic split.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    pub service: String,
    /// Named port of the backend service; unset: the port the request was addressed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Share of the rule's requests, relative to the other backends. 0..=10000, default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    DEFAULT_BACKEND_WEIGHT
}

/// Header rewrites, applied in the order remove, set, add.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replace the header's values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append a value, keeping existing ones.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Fault injection, for testing how callers cope.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Hold a share of requests for a fixed time before forwarding them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    #[serde(with = "crate::duration::required")]
    pub fixed: Duration,
    /// 0..=100, default 100.
    #[serde(default = "default_percent")]
    pub percent: f64,
}

/// Answer a share of requests with `status` without forwarding them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// 200..=599.
    pub status: u16,
    /// 0..=100, default 100.
    #[serde(default = "default_percent")]
    pub percent: f64,
}

fn default_percent() -> f64 {
    DEFAULT_FAULT_PERCENT
}

/// What a matched rule does once its overrides are merged with the parent service's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveRule {
    pub request_timeout: Option<Duration>,
    pub retries: EffectiveRetries,
    /// Never empty: a rule without backends sends everything to the parent service.
    pub backends: Vec<Backend>,
}

impl RouteRule {
    /// This rule over `policy`, the parent service's effective policy: the rule's `timeout`
    /// replaces the policy's request timeout, each retry field it sets replaces the policy's,
    /// and no backends means the parent service.
    pub fn effective(&self, parent: &str, policy: &EffectivePolicy) -> EffectiveRule {
        let backends = if self.backends.is_empty() {
            vec![Backend {
                service: parent.to_string(),
                port: None,
                weight: DEFAULT_BACKEND_WEIGHT,
            }]
        } else {
            self.backends.clone()
        };
        EffectiveRule {
            request_timeout: self.timeout.or(policy.request_timeout),
            retries: match &self.retries {
                Some(r) => r.apply_to(Some(&policy.retries)),
                None => policy.retries.clone(),
            },
            backends,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_overrides_merge_over_the_policy() {
        let policy = crate::policy::ServicePolicySpec {
            service: "user".into(),
            timeouts: Some(crate::policy::Timeouts {
                request: Some(Duration::from_secs(2)),
                ..Default::default()
            }),
            retries: Some(Retries {
                max_attempts: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        }
        .effective();

        let plain = RouteRule::default().effective("user", &policy);
        assert_eq!(plain.request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(plain.retries, policy.retries);
        assert_eq!(
            plain.backends,
            [Backend {
                service: "user".into(),
                port: None,
                weight: 1
            }]
        );

        let rule = RouteRule {
            timeout: Some(Duration::from_secs(10)),
            retries: Some(Retries {
                non_idempotent: Some(true),
                ..Default::default()
            }),
            backends: vec![Backend {
                service: "user-v2".into(),
                port: None,
                weight: 3,
            }],
            ..Default::default()
        };
        let eff = rule.effective("user", &policy);
        assert_eq!(eff.request_timeout, Some(Duration::from_secs(10)));
        assert!(eff.retries.non_idempotent);
        assert_eq!(eff.retries.max_attempts, 5);
        assert_eq!(eff.backends, rule.backends);
    }
}
