//! `ferrule get services|endpoints|proxies`: reads of the registry through the Admin API
//! (`get config` is the configuration centre's, in [`crate::config`]).
//!
//! Each listing is converted from the proto messages into a document of our own (stable
//! snake_case fields, sorted rows) so that table, JSON and YAML output are deterministic and do
//! not change when the proto grows a field.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use ferrule_proto::names::socket_string;
use ferrule_proto::v1::admin_client::AdminClient;
use ferrule_proto::v1::{
    Endpoint, ListEndpointsRequest, ListProxiesRequest, ListServicesRequest, ProtocolHint,
    ProxyStatus, ServiceSummary,
};
use serde::Serialize;

use crate::client::{self, ControllerAddr};
use crate::output::{self, Format, Render, write_table};
use crate::parse;

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// List registered services with their endpoint counts and port names.
    #[command(visible_alias = "svc", alias = "service")]
    Services,
    /// List the registered endpoints of one service (an unknown service has none), with each
    /// endpoint's circuit breaker state and EWMA latency as the proxies calling it see them.
    #[command(
        visible_alias = "ep",
        alias = "endpoint",
        after_help = "Examples:\n  ferrule get endpoints user\n  ferrule get endpoints user.shop -o json"
    )]
    Endpoints {
        /// The service, e.g. `user`, or `user.shop` in namespace `shop`.
        #[arg(value_parser = parse::service_name)]
        service: String,
    },
    /// List the proxies connected to the controller and the config version each runs.
    #[command(alias = "proxy")]
    Proxies,
    /// Show config resources: every kind, one kind, or one resource (`-o yaml` prints them
    /// ready to edit and apply again).
    Config(crate::config::GetConfigArgs),
}

pub async fn run(args: GetArgs, addr: &ControllerAddr, format: Format) -> anyhow::Result<()> {
    let what = match args.what {
        What::Config(config) => return crate::config::get(config, addr, format).await,
        what => what,
    };
    let mut admin = AdminClient::new(client::connect(addr).await?);
    let mut stdout = io::stdout().lock();
    match what {
        What::Services => {
            let resp = client::call(
                addr,
                "Admin/ListServices",
                admin.list_services(ListServicesRequest {}),
            )
            .await?;
            let doc = ServiceList::new(resp.revision, resp.services);
            if doc.services.is_empty() && format == Format::Table {
                eprintln!("no services are registered");
            }
            output::render(&doc, format, &mut stdout)
        }
        What::Endpoints { service } => {
            let resp = client::call(
                addr,
                "Admin/ListEndpoints",
                admin.list_endpoints(ListEndpointsRequest {
                    service: service.clone(),
                }),
            )
            .await?;
            let mut doc = EndpointList::new(resp.revision, resp.endpoints);
            // Best effort: without proxies to ask, the columns stay empty.
            if let Ok(proxies) = crate::views::proxies(addr).await {
                let health = crate::views::endpoint_health(&proxies, &service).await;
                doc.add_health(&health);
            }
            if doc.endpoints.is_empty() && format == Format::Table {
                eprintln!("no endpoints are registered for service {service}");
            }
            output::render(&doc, format, &mut stdout)
        }
        What::Proxies => {
            let resp = client::call(
                addr,
                "Admin/ListProxies",
                admin.list_proxies(ListProxiesRequest {}),
            )
            .await?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let doc = ProxyList::new(resp.proxies, now);
            if doc.proxies.is_empty() && format == Format::Table {
                eprintln!("no proxies are connected");
            }
            output::render(&doc, format, &mut stdout)
        }
        What::Config(_) => unreachable!("handled before connecting"),
    }
}

/// `ferrule get services`.
#[derive(Debug, Serialize)]
struct ServiceList {
    /// Store revision the listing was read at.
    revision: i64,
    services: Vec<ServiceView>,
}

#[derive(Debug, Serialize)]
struct ServiceView {
    name: String,
    endpoints: u32,
    /// Port names, sorted; "" is a service's single unnamed port.
    ports: Vec<String>,
}

impl ServiceList {
    fn new(revision: i64, services: Vec<ServiceSummary>) -> Self {
        let mut services: Vec<ServiceView> = services
            .into_iter()
            .map(|s| {
                let mut ports = s.ports;
                ports.sort();
                ports.dedup();
                ServiceView {
                    name: s.name,
                    endpoints: s.endpoints,
                    ports,
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Self { revision, services }
    }
}

impl Render for ServiceList {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.services.is_empty() {
            return Ok(());
        }
        let rows: Vec<Vec<String>> = self
            .services
            .iter()
            .map(|s| {
                let ports: Vec<&str> = s
                    .ports
                    .iter()
                    .map(|p| if p.is_empty() { "(unnamed)" } else { p })
                    .collect();
                vec![s.name.clone(), s.endpoints.to_string(), ports.join(",")]
            })
            .collect();
        write_table(out, &["NAME", "ENDPOINTS", "PORTS"], &rows)
    }
}

/// `ferrule get endpoints SERVICE`.
#[derive(Debug, Serialize)]
struct EndpointList {
    revision: i64,
    endpoints: Vec<EndpointView>,
}

#[derive(Debug, Serialize)]
struct EndpointView {
    service: String,
    port_name: String,
    address: String,
    port: u32,
    identity: String,
    zone: String,
    labels: BTreeMap<String, String>,
    /// `unspecified`, `http1`, `http2`, `grpc` or `opaque`.
    protocol: String,
    /// Load-balancing weight as peers use it (an unset weight counts as 1).
    weight: u32,
    meshed: bool,
    proxy_id: String,
    /// The worst circuit breaker state among the proxies calling it (`open`, `half_open`,
    /// `closed`); empty when no caller has sent it a request yet.
    breaker: String,
    /// Mean of the callers' peak-EWMA latency estimates, in ms.
    latency_ewma_ms: Option<f64>,
}

impl EndpointList {
    fn new(revision: i64, endpoints: Vec<Endpoint>) -> Self {
        let mut endpoints: Vec<EndpointView> = endpoints
            .into_iter()
            .map(|e| EndpointView {
                protocol: protocol_name(e.protocol_hint),
                weight: e.weight.max(1),
                service: e.service,
                port_name: e.port_name,
                address: e.address,
                port: e.port,
                identity: e.identity,
                zone: e.zone,
                labels: e.labels.into_iter().collect(),
                meshed: e.meshed,
                proxy_id: e.proxy_id,
                breaker: String::new(),
                latency_ewma_ms: None,
            })
            .collect();
        endpoints.sort_by(|a, b| {
            (&a.service, &a.port_name, &a.address, a.port).cmp(&(
                &b.service,
                &b.port_name,
                &b.address,
                b.port,
            ))
        });
        Self {
            revision,
            endpoints,
        }
    }
}

impl EndpointList {
    /// Fills in what the callers' proxies report, by endpoint key.
    fn add_health(&mut self, health: &BTreeMap<String, crate::views::EndpointHealth>) {
        for e in &mut self.endpoints {
            let key = format!("{}/{}", e.port_name, socket_string(&e.address, e.port));
            let Some(h) = health.get(&key) else {
                continue;
            };
            e.breaker = ["open", "half_open", "closed"]
                .into_iter()
                .find(|state| h.breaker.iter().any(|b| b == state))
                .unwrap_or("")
                .to_string();
            if !h.ewma_ms.is_empty() {
                e.latency_ewma_ms = Some(h.ewma_ms.iter().sum::<f64>() / h.ewma_ms.len() as f64);
            }
        }
    }
}

impl Render for EndpointList {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.endpoints.is_empty() {
            return Ok(());
        }
        let rows: Vec<Vec<String>> = self
            .endpoints
            .iter()
            .map(|e| {
                let labels: Vec<String> =
                    e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                vec![
                    e.service.clone(),
                    e.port_name.clone(),
                    socket_string(&e.address, e.port),
                    e.identity.clone(),
                    e.zone.clone(),
                    labels.join(","),
                    e.meshed.to_string(),
                    e.breaker.clone(),
                    crate::views::ms(e.latency_ewma_ms),
                ]
            })
            .collect();
        write_table(
            out,
            &[
                "SERVICE",
                "PORT-NAME",
                "ADDRESS",
                "IDENTITY",
                "ZONE",
                "LABELS",
                "MESHED",
                "BREAKER",
                "EWMA",
            ],
            &rows,
        )
    }
}

/// `http1` for `PROTOCOL_HINT_HTTP1`; a value this client does not know is shown by number.
fn protocol_name(hint: i32) -> String {
    match ProtocolHint::try_from(hint) {
        Ok(h) => h
            .as_str_name()
            .trim_start_matches("PROTOCOL_HINT_")
            .to_ascii_lowercase(),
        Err(_) => format!("unknown({hint})"),
    }
}

/// `ferrule get proxies`.
#[derive(Debug, Serialize)]
struct ProxyList {
    proxies: Vec<ProxyView>,
    /// Unix seconds when the listing was read, to show ages in the table.
    #[serde(skip)]
    now: i64,
}

#[derive(Debug, Serialize)]
struct ProxyView {
    proxy_id: String,
    service: String,
    namespace: String,
    address: String,
    mode: String,
    version: String,
    acked_version: i64,
    nacked_version: i64,
    nack_reason: String,
    /// Unix seconds of the proxy's last announce or keep-alive.
    last_seen: i64,
}

impl ProxyList {
    fn new(proxies: Vec<ProxyStatus>, now: i64) -> Self {
        let mut proxies: Vec<ProxyView> = proxies
            .into_iter()
            .map(|p| {
                let info = p.proxy.unwrap_or_default();
                ProxyView {
                    proxy_id: info.proxy_id,
                    service: info.service,
                    namespace: info.namespace,
                    address: info.address,
                    mode: info.mode,
                    version: info.version,
                    acked_version: p.acked_version,
                    nacked_version: p.nacked_version,
                    nack_reason: p.nack_reason,
                    last_seen: p.last_seen,
                }
            })
            .collect();
        proxies.sort_by(|a, b| a.proxy_id.cmp(&b.proxy_id));
        Self { proxies, now }
    }
}

impl Render for ProxyList {
    fn write_human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.proxies.is_empty() {
            return Ok(());
        }
        let rows: Vec<Vec<String>> = self
            .proxies
            .iter()
            .map(|p| {
                let acked = (p.acked_version > 0).then(|| format!("v{}", p.acked_version));
                let nacked = (p.nacked_version > 0)
                    .then(|| format!("(refused v{}: {})", p.nacked_version, p.nack_reason));
                let config: Vec<String> = [acked, nacked].into_iter().flatten().collect();
                let age = u64::try_from(self.now.saturating_sub(p.last_seen)).unwrap_or(0);
                vec![
                    p.proxy_id.clone(),
                    p.service.clone(),
                    p.namespace.clone(),
                    p.address.clone(),
                    p.mode.clone(),
                    p.version.clone(),
                    config.join(" "),
                    format!("{age}s ago"),
                ]
            })
            .collect();
        write_table(
            out,
            &[
                "PROXY",
                "SERVICE",
                "NAMESPACE",
                "ADDRESS",
                "MODE",
                "VERSION",
                "CONFIG",
                "LAST-SEEN",
            ],
            &rows,
        )
    }
}

#[cfg(test)]
mod tests {
    use ferrule_proto::v1::ProxyInfo;

    use super::*;

    fn table(doc: &impl Render) -> String {
        let mut out = Vec::new();
        output::render(doc, Format::Table, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn endpoint(port_name: &str, address: &str, port: u32) -> Endpoint {
        Endpoint {
            service: "user".into(),
            port_name: port_name.into(),
            address: address.into(),
            port,
            ..Default::default()
        }
    }

    #[test]
    fn services_are_sorted_with_sorted_ports() {
        let doc = ServiceList::new(
            7,
            vec![
                ServiceSummary {
                    name: "user".into(),
                    namespace: "default".into(),
                    endpoints: 2,
                    ports: vec!["http".into(), "grpc".into()],
                },
                ServiceSummary {
                    name: "db".into(),
                    namespace: "default".into(),
                    endpoints: 1,
                    ports: vec![String::new()],
                },
            ],
        );
        assert_eq!(
            table(&doc),
            "NAME   ENDPOINTS   PORTS\n\
             db     1           (unnamed)\n\
             user   2           grpc,http\n"
        );
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["revision"], 7);
        assert_eq!(
            json["services"][1]["ports"],
            serde_json::json!(["grpc", "http"])
        );
    }

    #[test]
    fn endpoints_are_sorted_and_complete_in_json() {
        let mut meshed = endpoint("grpc", "10.0.0.2", 4143);
        meshed.meshed = true;
        meshed.identity = "spiffe://cluster.local/ns/shop/sa/user".into();
        meshed.zone = "z1".into();
        meshed.labels = [
            ("version".to_string(), "v2".to_string()),
            ("a".into(), "b".into()),
        ]
        .into_iter()
        .collect();
        meshed.protocol_hint = ProtocolHint::Grpc as i32;
        let mut doc = EndpointList::new(
            3,
            vec![
                meshed,
                endpoint("grpc", "10.0.0.1", 9001),
                endpoint("", "::1", 9000),
            ],
        );
        // Two callers: the worst breaker state and the mean EWMA are shown.
        let health = BTreeMap::from([(
            "grpc/10.0.0.2:4143".to_string(),
            crate::views::EndpointHealth {
                breaker: vec!["closed".into(), "open".into()],
                ewma_ms: vec![10.0, 20.0],
            },
        )]);
        doc.add_health(&health);
        assert_eq!(
            table(&doc),
            "SERVICE   PORT-NAME   ADDRESS         IDENTITY                                 ZONE   LABELS           MESHED   BREAKER   EWMA\n\
             user      -           [::1]:9000      -                                        -      -                false    -         -\n\
             user      grpc        10.0.0.1:9001   -                                        -      -                false    -         -\n\
             user      grpc        10.0.0.2:4143   spiffe://cluster.local/ns/shop/sa/user   z1     a=b,version=v2   true     open      15.0ms\n"
        );
        let json = serde_json::to_value(&doc).unwrap();
        let last = &json["endpoints"][2];
        assert_eq!(last["address"], "10.0.0.2");
        assert_eq!(last["port"], 4143);
        assert_eq!(last["protocol"], "grpc");
        assert_eq!(last["weight"], 1);
        assert_eq!(
            last["labels"],
            serde_json::json!({"a": "b", "version": "v2"})
        );
        assert_eq!(json["endpoints"][0]["protocol"], "unspecified");
    }

    #[test]
    fn empty_listings_print_no_table() {
        assert_eq!(table(&EndpointList::new(1, vec![])), "");
        let yaml = {
            let mut out = Vec::new();
            output::render(&EndpointList::new(1, vec![]), Format::Yaml, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(yaml, "revision: 1\nendpoints: []\n");
    }

    #[test]
    fn proxies_show_config_and_age() {
        let status = |id: &str, acked, nacked, reason: &str| ProxyStatus {
            proxy: Some(ProxyInfo {
                proxy_id: id.into(),
                service: "order".into(),
                namespace: "shop".into(),
                address: "127.0.0.1".into(),
                mode: "sidecar".into(),
                version: "0.1.0".into(),
                admin_address: "127.0.0.1:4191".into(),
                certificate: None,
            }),
            acked_version: acked,
            nacked_version: nacked,
            nack_reason: reason.into(),
            last_seen: 990,
        };
        let doc = ProxyList::new(
            vec![
                status("order-b", 4, 5, "bad route"),
                status("order-a", 4, 0, ""),
            ],
            1000,
        );
        assert_eq!(
            table(&doc),
            "PROXY     SERVICE   NAMESPACE   ADDRESS     MODE      VERSION   CONFIG                       LAST-SEEN\n\
             order-a   order     shop        127.0.0.1   sidecar   0.1.0     v4                           10s ago\n\
             order-b   order     shop        127.0.0.1   sidecar   0.1.0     v4 (refused v5: bad route)   10s ago\n"
        );
        assert_eq!(
            serde_json::to_value(&doc).unwrap()["proxies"][0]["last_seen"],
            990
        );
    }

    #[test]
    fn unknown_protocol_hints_are_shown_by_number() {
        assert_eq!(protocol_name(ProtocolHint::Opaque as i32), "opaque");
        assert_eq!(protocol_name(42), "unknown(42)");
    }
}
