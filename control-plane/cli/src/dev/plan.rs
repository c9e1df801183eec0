//! The shape of the local mesh `ferrule dev up` starts: which processes, in which order, with
//! which flags and environment, on which loopback ports, and the gateway's configuration file.
//!
//! A [`Plan`] is plain data built from the options and a source of free ports, so it can be
//! checked without starting anything; [`super::supervisor`] runs it. The topology is the
//! sample shop of DESIGN.md: a controller, two `user` replicas, one `order`, one `payment`, a
//! sidecar in front of each, and the gateway at the edge. Apps talk to each other only through
//! their sidecars: `order`'s sidecar opens one local listener per upstream (`user:grpc`,
//! `payment:grpc`) and `order` is pointed at those.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// The binaries a plan runs; all must sit next to `ferrule`.
pub const BINARIES: [&str; 5] = [
    "ferrule-controller",
    "ferrule-proxy",
    "shop-user",
    "shop-order",
    "shop-payment",
];

/// The environment variable that carries the JWT signing key to `user` and the gateway.
pub const JWT_SECRET_ENV: &str = "USER_JWT_SECRET";

/// Requests per second (and burst) of the demo gateway's `/api` rate limit, per client IP.
pub const API_RATE_LIMIT: u32 = 10;

/// What `ferrule dev up` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Folder holding `ferrule-controller`, `ferrule-proxy` and the sample apps.
    pub bin_dir: PathBuf,
    /// Where databases, logs, `gateway.yaml` and `dev.json` go.
    pub state_dir: PathBuf,
    /// The gateway's client-facing listener.
    pub gateway: SocketAddr,
    /// The controller's store: an etcd URL, or the embedded store when `None`.
    pub etcd: Option<String>,
    /// The key `user` signs tokens with and the gateway checks them with.
    pub jwt_secret: String,
}

/// How to tell that a process is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The address accepts TCP connections.
    Listening(SocketAddr),
    /// `GET /ready` on this admin listener answers 200.
    AdminReady(SocketAddr),
}

/// One process of the mesh.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Unique name: the log file's stem and the prefix of its terminal lines.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// How readiness is checked; `None` when another process's probe covers it (an app is
    /// ready when its sidecar is: the sidecar is ready once the app passed its health check
    /// and is registered).
    pub probe: Option<Probe>,
    /// The proxy admin listener serving `/metrics`.
    pub admin: Option<SocketAddr>,
    /// The app's SQLite file.
    pub database: Option<PathBuf>,
}

/// Everything `ferrule dev up` starts, in start order: the controller first, the gateway last.
#[derive(Debug, Clone)]
pub struct Plan {
    pub controller: SocketAddr,
    pub gateway: SocketAddr,
    /// The gateway's configuration, to be written to [`Plan::gateway_config`].
    pub gateway_yaml: String,
    pub gateway_config: PathBuf,
    pub processes: Vec<Spec>,
}

/// A sample app and the ports it serves; `grpc` is `None` for `order`, which only calls out.
struct App {
    service: &'static str,
    /// Instance name: `user-1`, `order`...
    instance: String,
    /// Prefix of the app's environment variables: `USER`, `ORDER`, `PAYMENT`.
    env_prefix: &'static str,
    http: SocketAddr,
    grpc: Option<SocketAddr>,
    database: PathBuf,
    /// Extra environment: upstream addresses, the JWT key.
    env: Vec<(String, String)>,
}

impl Plan {
    /// Lays out the mesh, taking every loopback port but the gateway's from `next_port`.
    pub fn build(
        opts: &Options,
        mut next_port: impl FnMut() -> io::Result<u16>,
    ) -> io::Result<Plan> {
        let mut addr = || next_port().map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)));
        let controller = addr()?;
        let controller_admin = addr()?;
        let store = opts
            .etcd
            .as_deref()
            .map_or_else(|| "memory".to_string(), etcd_store_url);
        let mut processes = vec![Spec {
            name: "controller".into(),
            program: opts.bin_dir.join("ferrule-controller"),
            args: strings(&[
                "--store",
                &store,
                "--grpc-addr",
                &controller.to_string(),
                "--admin-addr",
                &controller_admin.to_string(),
            ]),
            env: Vec::new(),
            probe: Some(Probe::Listening(controller)),
            admin: None,
            database: None,
        }];

        let user_db = opts.state_dir.join("user.db");
        for replica in 1..=2 {
            let app = App {
                service: "user",
                instance: format!("user-{replica}"),
                env_prefix: "USER",
                http: addr()?,
                grpc: Some(addr()?),
                // One database per service, shared by its replicas.
                database: user_db.clone(),
                env: vec![(JWT_SECRET_ENV.into(), opts.jwt_secret.clone())],
            };
            processes.extend(app.specs(opts, controller, &mut addr, &[])?);
        }

        let payment = App {
            service: "payment",
            instance: "payment".into(),
            env_prefix: "PAYMENT",
            http: addr()?,
            grpc: Some(addr()?),
            database: opts.state_dir.join("payment.db"),
            env: Vec::new(),
        };
        processes.extend(payment.specs(opts, controller, &mut addr, &[])?);

        let (to_user, to_payment) = (addr()?, addr()?);
        let order = App {
            service: "order",
            instance: "order".into(),
            env_prefix: "ORDER",
            http: addr()?,
            grpc: None,
            database: opts.state_dir.join("order.db"),
            env: vec![
                ("ORDER_USER_GRPC_ADDR".into(), format!("http://{to_user}")),
                (
                    "ORDER_PAYMENT_GRPC_ADDR".into(),
                    format!("http://{to_payment}"),
                ),
            ],
        };
        let upstreams = [("user:grpc", to_user), ("payment:grpc", to_payment)];
        processes.extend(order.specs(opts, controller, &mut addr, &upstreams)?);

        let gateway_admin = addr()?;
        let gateway_config = opts.state_dir.join("gateway.yaml");
        processes.push(Spec {
            name: "gateway".into(),
            program: opts.bin_dir.join("ferrule-proxy"),
            args: strings(&[
                "gateway",
                "--config",
                &gateway_config.to_string_lossy(),
                "--controller",
                &controller.to_string(),
                "--listen",
                &opts.gateway.to_string(),
                "--admin-addr",
                &gateway_admin.to_string(),
                "--access-log",
            ]),
            env: vec![(JWT_SECRET_ENV.into(), opts.jwt_secret.clone())],
            probe: Some(Probe::AdminReady(gateway_admin)),
            admin: Some(gateway_admin),
            database: None,
        });

        Ok(Plan {
            controller,
            gateway: opts.gateway,
            gateway_yaml: gateway_yaml(opts.gateway),
            gateway_config,
            processes,
        })
    }
}

impl App {
    /// The app and its sidecar; `upstreams` are the sidecar's local listeners for the
    /// services the app calls.
    fn specs(
        self,
        opts: &Options,
        controller: SocketAddr,
        addr: &mut impl FnMut() -> io::Result<SocketAddr>,
        upstreams: &[(&str, SocketAddr)],
    ) -> io::Result<[Spec; 2]> {
        let (admin, inbound, outbound) = (addr()?, addr()?, addr()?);
        let mut proxy_args = strings(&[
            "--controller",
            &controller.to_string(),
            "--service",
            self.service,
            "--proxy-id",
            &self.instance,
            "--label",
            &format!("instance={}", self.instance),
            // The first app port is the health-checked one.
            "--app-port",
            &format!("http={}", self.http),
            "--health-path",
            "/health",
            "--admin-addr",
            &admin.to_string(),
            "--inbound-addr",
            &inbound.to_string(),
            "--outbound-addr",
            &outbound.to_string(),
            "--shutdown-grace",
            "5s",
            "--access-log",
        ]);
        let prefix = self.env_prefix;
        let mut env = vec![
            (format!("{prefix}_HTTP_ADDR"), self.http.to_string()),
            (
                format!("{prefix}_DB"),
                self.database.to_string_lossy().into_owned(),
            ),
        ];
        if let Some(grpc) = self.grpc {
            let inbound_grpc = addr()?;
            proxy_args.extend(strings(&[
                "--app-port",
                &format!("grpc={grpc}"),
                "--inbound-port",
                &format!("grpc={inbound_grpc}"),
            ]));
            env.push((format!("{prefix}_GRPC_ADDR"), grpc.to_string()));
        }
        for (service, listen) in upstreams {
            proxy_args.extend(strings(&["--upstream", &format!("{service}={listen}")]));
        }
        env.extend(self.env);
        let app = Spec {
            name: self.instance.clone(),
            program: opts.bin_dir.join(format!("shop-{}", self.service)),
            args: Vec::new(),
            env,
            probe: None,
            admin: None,
            database: Some(self.database),
        };
        let sidecar = Spec {
            name: format!("{}-proxy", self.instance),
            program: opts.bin_dir.join("ferrule-proxy"),
            args: proxy_args,
            env: Vec::new(),
            probe: Some(Probe::AdminReady(admin)),
            admin: Some(admin),
            database: None,
        };
        Ok([app, sidecar])
    }
}

/// `--etcd` takes what etcd users type (`http://127.0.0.1:2379`, `127.0.0.1:2379`, or several
/// comma-separated); the controller wants `etcd://host:port[,host:port]`.
fn etcd_store_url(etcd: &str) -> String {
    let hosts: Vec<&str> = etcd
        .split(',')
        .map(|h| {
            let h = h.trim();
            ["etcd://", "http://", "https://"]
                .iter()
                .find_map(|scheme| h.strip_prefix(scheme))
                .unwrap_or(h)
                .trim_end_matches('/')
        })
        .collect();
    format!("etcd://{}", hosts.join(","))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The demo gateway, written to the contract in the gateway's documentation: `/login` public,
/// `/api/users` and `/api/orders` behind HS256 JWTs from `user` and one shared per-client-IP
/// rate limit.
fn gateway_yaml(listen: SocketAddr) -> String {
    format!(
        "# Written by `ferrule dev up`; rewritten on every start.
listen: {listen}
maxRequestBytes: 1048576
jwt:
  subjectHeader: x-user-id
  providers:
    - name: shop
      issuer: ferrule-shop
      hs256SecretEnv: {JWT_SECRET_ENV}
rateLimits:
  api: {{requestsPerSecond: {API_RATE_LIMIT}, burst: {API_RATE_LIMIT}, key: client-ip}}
routes:
  - name: login
    pathPrefix: /login
    service: user:http
    public: true
  - name: users
    pathPrefix: /api/users
    rewritePrefix: /users
    service: user:http
    rateLimit: api
  - name: orders
    pathPrefix: /api/orders
    rewritePrefix: /orders
    service: order:http
    rateLimit: api
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let opts = Options {
            bin_dir: "/bin/dir".into(),
            state_dir: "/state".into(),
            gateway: "127.0.0.1:8000".parse().unwrap(),
            etcd: None,
            jwt_secret: "s3cret".into(),
        };
        let mut port = 20000;
        Plan::build(&opts, || {
            port += 1;
            Ok(port)
        })
        .unwrap()
    }

    fn spec<'a>(plan: &'a Plan, name: &str) -> &'a Spec {
        plan.processes
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    fn env<'a>(spec: &'a Spec, key: &str) -> &'a str {
        spec.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{} has no {key}", spec.name))
    }

    /// The value following `flag`, for each time it appears.
    fn flag<'a>(spec: &'a Spec, flag: &str) -> Vec<&'a str> {
        spec.args
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn starts_the_shop_controller_first_and_gateway_last() {
        let plan = plan();
        let names: Vec<&str> = plan.processes.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "controller",
                "user-1",
                "user-1-proxy",
                "user-2",
                "user-2-proxy",
                "payment",
                "payment-proxy",
                "order",
                "order-proxy",
                "gateway"
            ]
        );
    }

    #[test]
    fn order_reaches_user_and_payment_through_its_sidecar() {
        let plan = plan();
        let (order, sidecar) = (spec(&plan, "order"), spec(&plan, "order-proxy"));
        let upstreams = flag(sidecar, "--upstream");
        let user = env(order, "ORDER_USER_GRPC_ADDR")
            .strip_prefix("http://")
            .unwrap();
        let payment = env(order, "ORDER_PAYMENT_GRPC_ADDR")
            .strip_prefix("http://")
            .unwrap();
        assert_eq!(
            upstreams,
            [
                format!("user:grpc={user}"),
                format!("payment:grpc={payment}")
            ]
        );
        assert_eq!(flag(sidecar, "--service"), ["order"]);
        assert_eq!(
            flag(sidecar, "--app-port"),
            [format!("http={}", env(order, "ORDER_HTTP_ADDR"))]
        );
    }

    #[test]
    fn user_replicas_share_a_database_and_the_gateway_shares_their_key() {
        let plan = plan();
        let (one, two) = (spec(&plan, "user-1"), spec(&plan, "user-2"));
        assert_eq!(env(one, "USER_DB"), "/state/user.db");
        assert_eq!(env(two, "USER_DB"), "/state/user.db");
        assert_ne!(env(one, "USER_HTTP_ADDR"), env(two, "USER_HTTP_ADDR"));
        assert_eq!(env(one, JWT_SECRET_ENV), "s3cret");
        let gateway = spec(&plan, "gateway");
        assert_eq!(env(gateway, JWT_SECRET_ENV), "s3cret");
        assert!(
            !gateway.args.iter().any(|a| a.contains("s3cret")),
            "the key stays out of the command line"
        );
        assert!(!plan.gateway_yaml.contains("s3cret"));
        assert_eq!(gateway.args[0], "gateway");
        assert_eq!(flag(gateway, "--listen"), ["127.0.0.1:8000"]);
        assert_eq!(
            flag(gateway, "--config"),
            [plan.gateway_config.to_str().unwrap()]
        );
    }

    #[test]
    fn user_sidecar_fronts_both_ports_and_checks_health_over_http() {
        let plan = plan();
        let (user, sidecar) = (spec(&plan, "user-2"), spec(&plan, "user-2-proxy"));
        assert_eq!(
            flag(sidecar, "--app-port"),
            [
                format!("http={}", env(user, "USER_HTTP_ADDR")),
                format!("grpc={}", env(user, "USER_GRPC_ADDR")),
            ]
        );
        assert_eq!(flag(sidecar, "--health-path"), ["/health"]);
        assert_eq!(flag(sidecar, "--inbound-port").len(), 1);
        assert_eq!(sidecar.probe, sidecar.admin.map(Probe::AdminReady));
        assert!(sidecar.probe.is_some());
    }

    #[test]
    fn gateway_yaml_routes_and_limits_as_the_demo_promises() {
        let yaml = plan().gateway_yaml;
        for line in [
            "listen: 127.0.0.1:8000",
            "  subjectHeader: x-user-id",
            "      hs256SecretEnv: USER_JWT_SECRET",
            "  api: {requestsPerSecond: 10, burst: 10, key: client-ip}",
            "    pathPrefix: /api/users\n    rewritePrefix: /users\n    service: user:http\n    rateLimit: api",
            "    pathPrefix: /api/orders\n    rewritePrefix: /orders\n    service: order:http\n    rateLimit: api",
            "    pathPrefix: /login\n    service: user:http\n    public: true",
        ] {
            assert!(yaml.contains(line), "missing {line:?} in\n{yaml}");
        }
    }

    /// The file is a `Gateway` spec, so the same routes can be applied as a resource.
    #[test]
    fn gateway_yaml_is_a_valid_gateway_spec() {
        let spec = ferrule_config::GatewaySpec::parse_file(&plan().gateway_yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.listen(), "127.0.0.1:8000".parse().unwrap());
        let names: Vec<&str> = spec.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["login", "users", "orders"]);
        assert_eq!(
            spec.rate_limits["api"].key(),
            ferrule_config::RateLimitKey::ClientIp
        );
    }

    #[test]
    fn etcd_urls_in_the_forms_people_type() {
        assert_eq!(
            etcd_store_url("http://127.0.0.1:2379"),
            "etcd://127.0.0.1:2379"
        );
        assert_eq!(etcd_store_url("127.0.0.1:2379"), "etcd://127.0.0.1:2379");
        assert_eq!(etcd_store_url("etcd://a:1, http://b:2/"), "etcd://a:1,b:2");
    }
}
