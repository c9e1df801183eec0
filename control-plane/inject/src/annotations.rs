//! The `ferrule.io/` annotations a pod (or a workload's pod template) may carry, parsed
//! strictly: an unknown value or a malformed port list is an error naming the annotation.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::pod::{InjectError, SidecarMode};

/// `enabled`, `disabled` or `identity`: whether the pod gets a proxy ([`Inject`]).
pub const INJECT: &str = "ferrule.io/inject";
/// `native` (default) or `classic`: how the proxy runs next to the app.
pub const SIDECAR: &str = "ferrule.io/sidecar";
/// Ports whose traffic the proxy copies without protocol detection, added to the defaults.
pub const OPAQUE_PORTS: &str = "ferrule.io/opaque-ports";
/// Inbound ports the iptables rules leave alone, added to the defaults.
pub const SKIP_INBOUND_PORTS: &str = "ferrule.io/skip-inbound-ports";
/// Outbound destination ports the iptables rules leave alone, added to the defaults.
pub const SKIP_OUTBOUND_PORTS: &str = "ferrule.io/skip-outbound-ports";
/// The mesh service the proxy registers the pod under (default: the `app.kubernetes.io/name`
/// or `app` label).
pub const SERVICE: &str = "ferrule.io/service";
/// Written by injection: the proxy version the pod was injected with. Its presence marks the
/// pod as injected.
pub const PROXY_VERSION: &str = "ferrule.io/proxy-version";

const KNOWN: &[&str] = &[
    INJECT,
    SIDECAR,
    OPAQUE_PORTS,
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SERVICE,
    PROXY_VERSION,
];

/// The values of `ferrule.io/inject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    /// `enabled`: the proxy beside the app (the default in a labelled namespace).
    Enabled,
    /// `disabled`: left alone.
    Disabled,
    /// `identity`: the pod is a Ferrule proxy itself (the shop's gateway): its one container
    /// gets what an injected proxy gets to have an identity (token, trust domain, trust
    /// anchors, namespace, service account), and no sidecar nor iptables rules.
    Identity,
}

/// What the annotations ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotations {
    /// `ferrule.io/inject`, when set.
    pub inject: Option<Inject>,
    pub sidecar: Option<SidecarMode>,
    pub opaque_ports: BTreeSet<u16>,
    pub skip_inbound_ports: BTreeSet<u16>,
    pub skip_outbound_ports: BTreeSet<u16>,
    pub service: Option<String>,
    /// Set when the pod already went through injection.
    pub proxy_version: Option<String>,
    /// `ferrule.io/` annotations this version does not know (a typo, or a newer release's).
    pub unknown: Vec<String>,
}

impl Annotations {
    /// Parses the `ferrule.io/` annotations of `metadata.annotations` (absent: none).
    pub fn parse(annotations: Option<&Value>) -> Result<Self, InjectError> {
        let mut out = Self::default();
        let Some(map) = annotations else {
            return Ok(out);
        };
        let map = map.as_object().ok_or_else(|| InjectError::Malformed {
            field: "metadata.annotations".into(),
            reason: "is not a map of strings".into(),
        })?;
        for (key, value) in map {
            if !key.starts_with("ferrule.io/") {
                continue;
            }
            let value = value.as_str().ok_or_else(|| InjectError::Malformed {
                field: format!("metadata.annotations[{key:?}]"),
                reason: "is not a string".into(),
            })?;
            let value = value.trim();
            match key.as_str() {
                INJECT => {
                    out.inject = Some(match value {
                        "enabled" => Inject::Enabled,
                        "disabled" => Inject::Disabled,
                        "identity" => Inject::Identity,
                        _ => {
                            return Err(unknown_value(
                                INJECT,
                                value,
                                "enabled, disabled or identity",
                            ));
                        }
                    })
                }
                SIDECAR => {
                    out.sidecar = Some(match value {
                        "native" => SidecarMode::Native,
                        "classic" => SidecarMode::Classic,
                        _ => return Err(unknown_value(SIDECAR, value, "native or classic")),
                    })
                }
                OPAQUE_PORTS => out.opaque_ports = parse_ports(OPAQUE_PORTS, value)?,
                SKIP_INBOUND_PORTS => {
                    out.skip_inbound_ports = parse_ports(SKIP_INBOUND_PORTS, value)?
                }
                SKIP_OUTBOUND_PORTS => {
                    out.skip_outbound_ports = parse_ports(SKIP_OUTBOUND_PORTS, value)?
                }
                SERVICE => {
                    ferrule_proto::names::validate_service(value).map_err(|e| {
                        InjectError::BadAnnotation {
                            annotation: SERVICE,
                            value: value.to_string(),
                            reason: e.to_string(),
                        }
                    })?;
                    out.service = Some(value.to_string());
                }
                PROXY_VERSION => out.proxy_version = Some(value.to_string()),
                other => {
                    debug_assert!(!KNOWN.contains(&other));
                    out.unknown.push(other.to_string());
                }
            }
        }
        if let Some(port) = out
            .skip_inbound_ports
            .intersection(&out.opaque_ports)
            .next()
        {
            return Err(InjectError::Conflict {
                first: SKIP_INBOUND_PORTS,
                second: OPAQUE_PORTS,
                reason: format!(
                    "port {port} is in both: a skipped port never reaches the proxy, so it cannot \
                     be opaque to it; list it in one of them"
                ),
            });
        }
        Ok(out)
    }
}

fn unknown_value(annotation: &'static str, value: &str, expected: &str) -> InjectError {
    InjectError::BadAnnotation {
        annotation,
        value: value.to_string(),
        reason: format!("unknown value; expected {expected}"),
    }
}

/// A comma-separated list of ports or ranges (`5432,6379,8000-8010`); spaces are allowed.
fn parse_ports(annotation: &'static str, value: &str) -> Result<BTreeSet<u16>, InjectError> {
    let bad = |reason: String| InjectError::BadAnnotation {
        annotation,
        value: value.to_string(),
        reason,
    };
    let port = |s: &str| -> Result<u16, InjectError> {
        match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad(format!("{:?} is not a port (1-65535)", s.trim()))),
        }
    };
    let mut ports = BTreeSet::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(bad(format!("range {item:?} runs backwards")));
                }
                if usize::from(hi - lo) >= 1024 {
                    return Err(bad(format!(
                        "range {item:?} holds more than 1024 ports; skip a CIDR or use fewer ports"
                    )));
                }
                ports.extend(lo..=hi);
            }
            None => {
                ports.insert(port(item)?);
            }
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_known_annotation() {
        let a = Annotations::parse(Some(&json!({
            "ferrule.io/inject": "enabled",
            "ferrule.io/sidecar": "classic",
            "ferrule.io/opaque-ports": "5432, 6379",
            "ferrule.io/skip-inbound-ports": "9000-9002",
            "ferrule.io/skip-outbound-ports": "25",
            "ferrule.io/service": "user",
            "other.io/x": "kept out",
        })))
        .unwrap();
        assert_eq!(a.inject, Some(Inject::Enabled));
        assert_eq!(a.sidecar, Some(SidecarMode::Classic));
        assert_eq!(a.opaque_ports, BTreeSet::from([5432, 6379]));
        assert_eq!(a.skip_inbound_ports, BTreeSet::from([9000, 9001, 9002]));
        assert_eq!(a.skip_outbound_ports, BTreeSet::from([25]));
        assert_eq!(a.service.as_deref(), Some("user"));
        assert!(a.unknown.is_empty());
        let a = Annotations::parse(Some(&json!({"ferrule.io/inject": "identity"}))).unwrap();
        assert_eq!(a.inject, Some(Inject::Identity));
    }

    #[test]
    fn bad_values_name_the_annotation() {
        let cases = [
            (json!({"ferrule.io/inject": "yes"}), "ferrule.io/inject"),
            (json!({"ferrule.io/sidecar": "side"}), "ferrule.io/sidecar"),
            (
                json!({"ferrule.io/opaque-ports": "5432,x"}),
                "ferrule.io/opaque-ports",
            ),
            (
                json!({"ferrule.io/skip-inbound-ports": "0"}),
                "ferrule.io/skip-inbound-ports",
            ),
            (
                json!({"ferrule.io/skip-outbound-ports": "10-1"}),
                "ferrule.io/skip-outbound-ports",
            ),
            (json!({"ferrule.io/service": "User"}), "ferrule.io/service"),
            (json!({"ferrule.io/inject": 1}), "ferrule.io/inject"),
        ];
        for (annotations, named) in cases {
            let err = Annotations::parse(Some(&annotations))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{annotations}: {err}");
        }
    }

    #[test]
    fn a_port_both_skipped_and_opaque_is_a_conflict() {
        let err = Annotations::parse(Some(&json!({
            "ferrule.io/skip-inbound-ports": "3306",
            "ferrule.io/opaque-ports": "3306",
        })))
        .unwrap_err()
        .to_string();
        assert!(err.contains("ferrule.io/skip-inbound-ports"), "{err}");
        assert!(err.contains("ferrule.io/opaque-ports"), "{err}");
        assert!(err.contains("3306"), "{err}");
    }

    #[test]
    fn unknown_ferrule_annotations_are_collected() {
        let a = Annotations::parse(Some(&json!({"ferrule.io/injct": "enabled"}))).unwrap();
        assert_eq!(a.unknown, vec!["ferrule.io/injct".to_string()]);
    }
}
