//! The shape of the local mesh `ferrule dev up` starts: which processes, with which flags and
//! environment, and the gateway's configuration file.
//!
//! The functions here are plain data built from the options (and from the addresses earlier
//! processes reported), so they can be checked without starting anything; [`super::supervisor`]
//! runs them and `dev.rs` says in which order. The topology is the sample shop of DESIGN.md: a
//! controller, two `user` replicas, one `order`, one `payment`, a sidecar in front of each, and
//! the gateway at the edge. Apps talk to each other only through their sidecars: `order`'s
//! sidecar opens one local listener per upstream (`user:grpc`, `payment:grpc`) and `order` is
//! pointed at those.
//!
//! With `--postgres` the apps' databases are on one PostgreSQL server (one database per
//! service) instead of SQLite files, and that server is a mesh service too: a sidecar of its
//! own registers it as `postgres` (an opaque TCP port, health-checked by TCP connect), and each
//! app dials its own sidecar's local listener for `postgres`, so the database traffic crosses
//! the mesh like the shop's HTTP and gRPC.
//!
//! Every listener binds port 0 ([`ANY_PORT`]) and the process reports the port it got on its
//! ready line, except three that must be known before their process starts: the gateway's
//! client-facing address (the user's `--gateway-addr`), its admin listener (the gateway has no
//! ready line yet), the sidecars' upstream listeners (`order`'s for `user` and `payment`, and
//! every app's for `postgres`: an app and its sidecar each need the other's address, so one
//! side is chosen up front), and PostgreSQL's port (it reports none).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use rustix::process::Signal;
use serde::Deserialize;

use super::postgres::{self, Cluster};

/// The binaries the mesh runs; all must sit next to `ferrule`.
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

/// The path prefix of order's gRPC API (`shop.order.v1.OrderService`) on the demo gateway.
pub const ORDER_GRPC_PREFIX: &str = "/shop.order.v1.OrderService/";

/// A loopback listener on a port the system picks; the process reports which.
pub const ANY_PORT: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

/// How many sidecar listeners [`apps`] needs chosen up front: `order`'s for `user:grpc` and
/// `payment:grpc`, then one for `postgres` per app, in start order (unused without
/// `--postgres`).
pub const CHOSEN_PORTS: usize = 6;

/// The mesh service name of the PostgreSQL server.
pub const POSTGRES_SERVICE: &str = "postgres";

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
    /// `--postgres`: the cluster the apps' databases are in; SQLite files when `None`.
    pub postgres: Option<Cluster>,
    /// The OTLP/gRPC collector every proxy exports trace spans to (`--otlp`, or `dev up`'s
    /// own receiver).
    pub otlp: Option<String>,
    /// The JSON API of `dev up`'s own trace receiver, which the controller's dashboard lists
    /// recent traces from; `None` with `--otlp`.
    pub traces_api: Option<SocketAddr>,
    /// The mesh CA's files (`<state dir>/identity`), so every hop between proxies is mutual
    /// TLS; `None` with `--no-identity`.
    pub identity: Option<PathBuf>,
    /// Each service's join token (made once the controller is up).
    pub tokens: std::collections::BTreeMap<String, String>,
}

/// The services whose proxies get an identity: the shop's, the database's and the gateway's.
pub const IDENTITIES: [&str; 5] = ["user", "order", "payment", POSTGRES_SERVICE, "gateway"];

/// The environment that gives `service`'s proxy its identity (its join token) and the trust
/// anchors it reaches the controller's protected API with.
fn identity_env(opts: &Options, service: &str) -> Vec<(String, String)> {
    let token = opts
        .tokens
        .get(service)
        .map(|token| ("FERRULE_IDENTITY_TOKEN".to_string(), token.clone()));
    let anchors = opts.identity.as_ref().map(|dir| {
        (
            "FERRULE_IDENTITY_TRUST_ANCHORS".to_string(),
            dir.join(crate::identity::TRUST_ANCHORS)
                .display()
                .to_string(),
        )
    });
    token.into_iter().chain(anchors).collect()
}

/// The environment that turns tracing on in a proxy.
fn tracing_env(opts: &Options) -> Vec<(String, String)> {
    opts.otlp
        .iter()
        .map(|url| ("FERRULE_PROXY_OTLP_ENDPOINT".to_string(), url.clone()))
        .collect()
}

/// One process of the mesh.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Unique name: the log file's stem and the prefix of its terminal lines.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The program name on its ready line (`<name> ready: {JSON}`), which it prints once its
    /// listeners are bound; `None` for the gateway, which prints none yet.
    pub ready_line: Option<&'static str>,
    /// The app's SQLite file.
    pub database: Option<PathBuf>,
    /// The user and group to run as (PostgreSQL, when `dev up` runs as root).
    pub run_as: Option<(u32, u32)>,
    /// What asks the process to stop.
    pub stop_signal: Signal,
}

/// The JSON of `ferrule-controller ready: ...`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ControllerAddrs {
    pub grpc: SocketAddr,
    /// `/ready`, `/metrics` and the web dashboard.
    pub admin: SocketAddr,
}

/// The JSON of `shop-<service> ready: ...`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct AppAddrs {
    pub http: SocketAddr,
    /// `None` for an app without a gRPC port (every shop app has one).
    pub grpc: Option<SocketAddr>,
}

/// The JSON of `ferrule-proxy ready: ...` (the `listeners` of its `/config`), as far as
/// `dev up` needs it.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ProxyAddrs {
    pub admin: SocketAddr,
}

/// The controller, on [`ANY_PORT`]s.
pub fn controller(opts: &Options) -> Spec {
    let store = opts
        .etcd
        .as_deref()
        .map_or_else(|| "memory".to_string(), etcd_store_url);
    let any = ANY_PORT.to_string();
    Spec {
        name: "controller".into(),
        program: opts.bin_dir.join("ferrule-controller"),
        args: strings(&["--store", &store, "--grpc-addr", &any, "--admin-addr", &any])
            .into_iter()
            .chain(opts.identity.iter().flat_map(|dir| {
                [
                    "--identity-dir".to_string(),
                    dir.to_string_lossy().into_owned(),
                ]
            }))
            .chain(
                opts.traces_api
                    .iter()
                    .flat_map(|api| ["--traces-api".to_string(), api.to_string()]),
            )
            .collect(),
        env: opts
            .otlp
            .iter()
            .map(|url| ("FERRULE_CONTROLLER_OTLP_ENDPOINT".to_string(), url.clone()))
            .collect(),
        ready_line: Some("ferrule-controller"),
        database: None,
        run_as: None,
        stop_signal: Signal::TERM,
    }
}

/// The PostgreSQL server of `--postgres`, on `addr`.
pub fn postgres(cluster: &Cluster, addr: SocketAddr) -> Spec {
    Spec {
        name: POSTGRES_SERVICE.into(),
        program: cluster.bin.join("postgres"),
        args: cluster.server_args(addr.port()),
        env: Vec::new(),
        // It prints no `ready:` line: `dev up` waits for [`postgres::READY_LINE`].
        ready_line: None,
        database: None,
        run_as: cluster.run_as,
        // Fast shutdown: SIGTERM would wait for every client to disconnect first.
        stop_signal: Signal::INT,
    }
}

/// The sidecar that registers the PostgreSQL server at `server` as the mesh service
/// `postgres`: one opaque port (never detected: the client speaks first, but PostgreSQL is
/// still no protocol the mesh knows), health-checked by TCP connect.
pub fn postgres_sidecar(opts: &Options, controller: SocketAddr, server: SocketAddr) -> Spec {
    let any = ANY_PORT.to_string();
    Spec {
        name: format!("{POSTGRES_SERVICE}-proxy"),
        program: opts.bin_dir.join("ferrule-proxy"),
        args: strings(&[
            "--controller",
            &controller.to_string(),
            "--service",
            POSTGRES_SERVICE,
            "--proxy-id",
            POSTGRES_SERVICE,
            "--label",
            &format!("instance={POSTGRES_SERVICE}"),
            "--app-addr",
            &server.to_string(),
            "--opaque-ports",
            &server.port().to_string(),
            "--admin-addr",
            &any,
            "--inbound-addr",
            &any,
            "--outbound-addr",
            &any,
            "--shutdown-grace",
            "5s",
            "--access-log",
        ]),
        env: tracing_env(opts)
            .into_iter()
            .chain(identity_env(opts, POSTGRES_SERVICE))
            .collect(),
        ready_line: Some("ferrule-proxy"),
        database: None,
        run_as: None,
        stop_signal: Signal::TERM,
    }
}

/// A sample app of the shop, which gets a sidecar.
#[derive(Debug, Clone)]
pub struct App {
    service: &'static str,
    /// Instance name: `user-1`, `order`...
    pub instance: String,
    /// Prefix of the app's environment variables: `USER`, `ORDER`, `PAYMENT`.
    env_prefix: &'static str,
    /// Whether it serves gRPC besides HTTP.
    grpc: bool,
    database: Database,
    /// Extra environment: upstream addresses, the JWT key.
    env: Vec<(String, String)>,
    /// The sidecar's local listeners for the services the app calls.
    upstreams: Vec<(&'static str, SocketAddr)>,
}

/// Where an app's database is.
#[derive(Debug, Clone)]
enum Database {
    /// A file in the state dir.
    Sqlite(PathBuf),
    /// The database named after the service on the `--postgres` server, reached through the
    /// sidecar's listener for `postgres` at this address.
    Postgres(SocketAddr),
}

/// The shop's apps, in start order, with the sidecar listeners `chosen` up front (see
/// [`CHOSEN_PORTS`]): `order` calls `user` and `payment` through its sidecar's listeners at
/// `chosen[0]` and `chosen[1]`, and with `--postgres` each app reaches the database through
/// its own sidecar's listener at `chosen[2..]`.
pub fn apps(opts: &Options, chosen: [SocketAddr; CHOSEN_PORTS]) -> Vec<App> {
    let [to_user, to_payment, to_database @ ..] = chosen;
    let mut to_database = to_database.into_iter();
    let mut database = |service: &str| match opts.postgres {
        Some(_) => Database::Postgres(to_database.next().expect("one port per app")),
        // One database per service, shared by its replicas.
        None => Database::Sqlite(opts.state_dir.join(format!("{service}.db"))),
    };
    let mut apps: Vec<App> = (1..=2)
        .map(|replica| App {
            service: "user",
            instance: format!("user-{replica}"),
            env_prefix: "USER",
            grpc: true,
            database: database("user"),
            env: vec![(JWT_SECRET_ENV.into(), opts.jwt_secret.clone())],
            upstreams: Vec::new(),
        })
        .collect();
    apps.push(App {
        service: "payment",
        instance: "payment".into(),
        env_prefix: "PAYMENT",
        grpc: true,
        database: database("payment"),
        env: Vec::new(),
        upstreams: Vec::new(),
    });
    apps.push(App {
        service: "order",
        instance: "order".into(),
        env_prefix: "ORDER",
        grpc: true,
        database: database("order"),
        env: vec![
            ("ORDER_USER_GRPC_ADDR".into(), format!("http://{to_user}")),
            (
                "ORDER_PAYMENT_GRPC_ADDR".into(),
                format!("http://{to_payment}"),
            ),
        ],
        upstreams: vec![("user:grpc", to_user), ("payment:grpc", to_payment)],
    });
    apps
}

impl App {
    /// The app itself, on [`ANY_PORT`]s.
    pub fn spec(&self, opts: &Options) -> Spec {
        let prefix = self.env_prefix;
        let database_url = match &self.database {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Postgres(local) => postgres::url(*local, self.service),
        };
        let mut env = vec![
            (format!("{prefix}_HTTP_ADDR"), ANY_PORT.to_string()),
            (format!("{prefix}_DATABASE_URL"), database_url),
        ];
        if self.grpc {
            env.push((format!("{prefix}_GRPC_ADDR"), ANY_PORT.to_string()));
        }
        env.extend(self.env.iter().cloned());
        Spec {
            name: self.instance.clone(),
            program: opts.bin_dir.join(format!("shop-{}", self.service)),
            args: Vec::new(),
            env,
            ready_line: Some(match self.service {
                "user" => "shop-user",
                "payment" => "shop-payment",
                _ => "shop-order",
            }),
            database: match &self.database {
                Database::Sqlite(path) => Some(path.clone()),
                Database::Postgres(_) => None,
            },
            run_as: None,
            stop_signal: Signal::TERM,
        }
    }

    /// Its sidecar, in front of the app listening at `app`; every listener but the upstream
    /// ones on [`ANY_PORT`].
    pub fn sidecar(&self, opts: &Options, controller: SocketAddr, app: AppAddrs) -> Spec {
        let any = ANY_PORT.to_string();
        let mut args = strings(&[
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
            &format!("http={}", app.http),
            "--health-path",
            "/health",
            "--admin-addr",
            &any,
            "--inbound-addr",
            &any,
            // Not bound in explicit mode; port 0 so it never asks for a fixed one.
            "--outbound-addr",
            &any,
            "--shutdown-grace",
            "5s",
            "--access-log",
        ]);
        if let Some(grpc) = app.grpc {
            args.extend(strings(&[
                "--app-port",
                &format!("grpc={grpc}"),
                "--inbound-port",
                &format!("grpc={any}"),
            ]));
        }
        for (service, listen) in &self.upstreams {
            args.extend(strings(&["--upstream", &format!("{service}={listen}")]));
        }
        if let Database::Postgres(local) = self.database {
            args.extend(strings(&[
                "--upstream",
                &format!("{POSTGRES_SERVICE}={local}"),
                // Forwarded as bytes, never detected.
                "--opaque-ports",
                &local.port().to_string(),
            ]));
        }
        Spec {
            name: self.sidecar_name(),
            program: opts.bin_dir.join("ferrule-proxy"),
            args,
            env: tracing_env(opts)
                .into_iter()
                .chain(identity_env(opts, self.service))
                .collect(),
            ready_line: Some("ferrule-proxy"),
            database: None,
            run_as: None,
            stop_signal: Signal::TERM,
        }
    }

    pub fn sidecar_name(&self) -> String {
        format!("{}-proxy", self.instance)
    }

    /// True when the sidecar binds ports chosen before it started (which another process may
    /// have taken meanwhile).
    pub fn has_chosen_ports(&self) -> bool {
        !self.upstreams.is_empty() || matches!(self.database, Database::Postgres(_))
    }
}

/// Where `dev up` writes the gateway's configuration.
pub fn gateway_config(opts: &Options) -> PathBuf {
    opts.state_dir.join("gateway.yaml")
}

/// The gateway, with its admin listener at `admin`.
pub fn gateway(opts: &Options, controller: SocketAddr, admin: SocketAddr) -> Spec {
    Spec {
        name: "gateway".into(),
        program: opts.bin_dir.join("ferrule-proxy"),
        args: strings(&[
            "gateway",
            "--config",
            &gateway_config(opts).to_string_lossy(),
            "--controller",
            &controller.to_string(),
            "--listen",
            &opts.gateway.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--proxy-id",
            "gateway",
            "--access-log",
        ]),
        env: [(JWT_SECRET_ENV.into(), opts.jwt_secret.clone())]
            .into_iter()
            .chain(tracing_env(opts))
            .chain(identity_env(opts, "gateway"))
            .collect(),
        ready_line: None,
        database: None,
        run_as: None,
        stop_signal: Signal::TERM,
    }
}

/// Whether the gateway's `/config` (`config`) is that of the gateway started with `config_file`
/// and `admin`: another process may have taken the admin port first.
pub fn is_our_gateway(config: &serde_json::Value, config_file: &Path, admin: SocketAddr) -> bool {
    config["mode"] == "gateway"
        && config["config_file"].as_str() == config_file.to_str()
        && config["listeners"]["admin"].as_str() == Some(&admin.to_string())
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
/// rate limit, and order's gRPC API ([`ORDER_GRPC_PREFIX`], to `order:grpc`) behind the same
/// JWTs and the same limit.
pub fn gateway_yaml(listen: SocketAddr) -> String {
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
  - name: orders-grpc
    pathPrefix: {ORDER_GRPC_PREFIX}
    service: order:grpc
    grpc: true
    rateLimit: api
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            bin_dir: "/bin/dir".into(),
            state_dir: "/state".into(),
            gateway: "127.0.0.1:8000".parse().unwrap(),
            etcd: None,
            jwt_secret: "s3cret".into(),
            postgres: None,
            otlp: None,
            traces_api: None,
            identity: None,
            tokens: Default::default(),
        }
    }

    fn with_postgres() -> Options {
        Options {
            postgres: Some(Cluster {
                bin: "/usr/lib/postgresql/15/bin".into(),
                data: "/state/postgres/data".into(),
                run_as: Some((101, 104)),
            }),
            ..opts()
        }
    }

    /// 127.0.0.1:20001, :20002...
    fn chosen() -> [SocketAddr; CHOSEN_PORTS] {
        std::array::from_fn(|i| SocketAddr::from((Ipv4Addr::LOCALHOST, 20001 + i as u16)))
    }

    fn app(instance: &str) -> App {
        app_of(&opts(), instance)
    }

    fn app_of(opts: &Options, instance: &str) -> App {
        apps(opts, chosen())
            .into_iter()
            .find(|a| a.instance == instance)
            .unwrap_or_else(|| panic!("no app {instance}"))
    }

    /// The sidecar of `instance`, as if its app had reported these addresses.
    fn sidecar(instance: &str) -> Spec {
        let bound = AppAddrs {
            http: "127.0.0.1:30001".parse().unwrap(),
            grpc: Some("127.0.0.1:30002".parse().unwrap()),
        };
        app(instance).sidecar(&opts(), "127.0.0.1:30000".parse().unwrap(), bound)
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
    fn the_shop_is_two_users_payment_and_order() {
        let names: Vec<String> = apps(&opts(), chosen())
            .iter()
            .flat_map(|a| [a.instance.clone(), a.sidecar_name()])
            .collect();
        assert_eq!(
            names,
            [
                "user-1",
                "user-1-proxy",
                "user-2",
                "user-2-proxy",
                "payment",
                "payment-proxy",
                "order",
                "order-proxy",
            ]
        );
    }

    #[test]
    fn listeners_bind_port_zero_and_report_their_ports() {
        let controller = controller(&opts());
        assert_eq!(flag(&controller, "--grpc-addr"), ["127.0.0.1:0"]);
        assert_eq!(flag(&controller, "--admin-addr"), ["127.0.0.1:0"]);
        assert_eq!(controller.ready_line, Some("ferrule-controller"));
        let user = app("user-1").spec(&opts());
        assert_eq!(env(&user, "USER_HTTP_ADDR"), "127.0.0.1:0");
        assert_eq!(env(&user, "USER_GRPC_ADDR"), "127.0.0.1:0");
        assert_eq!(user.ready_line, Some("shop-user"));
        let proxy = sidecar("user-1");
        for listener in ["--admin-addr", "--inbound-addr", "--outbound-addr"] {
            assert_eq!(flag(&proxy, listener), ["127.0.0.1:0"], "{listener}");
        }
        assert_eq!(flag(&proxy, "--inbound-port"), ["grpc=127.0.0.1:0"]);
        assert_eq!(flag(&proxy, "--controller"), ["127.0.0.1:30000"]);
        assert_eq!(proxy.ready_line, Some("ferrule-proxy"));
        assert!(!app("user-1").has_chosen_ports());
    }

    #[test]
    fn order_reaches_user_and_payment_through_its_sidecar() {
        let order = app("order");
        assert!(order.has_chosen_ports());
        let (spec, sidecar) = (order.spec(&opts()), sidecar("order"));
        let user = env(&spec, "ORDER_USER_GRPC_ADDR")
            .strip_prefix("http://")
            .unwrap();
        let payment = env(&spec, "ORDER_PAYMENT_GRPC_ADDR")
            .strip_prefix("http://")
            .unwrap();
        assert_eq!(
            flag(&sidecar, "--upstream"),
            [
                format!("user:grpc={user}"),
                format!("payment:grpc={payment}")
            ]
        );
        assert_eq!(flag(&sidecar, "--service"), ["order"]);
        // Order's own gRPC API is a port of its own, fronted like user's.
        assert_eq!(env(&spec, "ORDER_GRPC_ADDR"), "127.0.0.1:0");
        assert_eq!(
            flag(&sidecar, "--app-port"),
            ["http=127.0.0.1:30001", "grpc=127.0.0.1:30002"]
        );
        assert_eq!(flag(&sidecar, "--inbound-port"), ["grpc=127.0.0.1:0"]);
    }

    #[test]
    fn user_replicas_share_a_database_and_the_gateway_shares_their_key() {
        let (one, two) = (app("user-1").spec(&opts()), app("user-2").spec(&opts()));
        assert_eq!(env(&one, "USER_DATABASE_URL"), "sqlite:///state/user.db");
        assert_eq!(env(&two, "USER_DATABASE_URL"), "sqlite:///state/user.db");
        assert_eq!(env(&one, JWT_SECRET_ENV), "s3cret");
        let gateway = gateway(
            &opts(),
            "127.0.0.1:30000".parse().unwrap(),
            "127.0.0.1:30003".parse().unwrap(),
        );
        assert_eq!(env(&gateway, JWT_SECRET_ENV), "s3cret");
        assert!(
            !gateway.args.iter().any(|a| a.contains("s3cret")),
            "the key stays out of the command line"
        );
        assert!(!gateway_yaml(opts().gateway).contains("s3cret"));
        assert_eq!(gateway.args[0], "gateway");
        assert_eq!(flag(&gateway, "--listen"), ["127.0.0.1:8000"]);
        assert_eq!(flag(&gateway, "--admin-addr"), ["127.0.0.1:30003"]);
        assert_eq!(
            flag(&gateway, "--config"),
            [gateway_config(&opts()).to_str().unwrap()]
        );
    }

    #[test]
    fn user_sidecar_fronts_both_ports_and_checks_health_over_http() {
        let sidecar = sidecar("user-2");
        assert_eq!(
            flag(&sidecar, "--app-port"),
            ["http=127.0.0.1:30001", "grpc=127.0.0.1:30002"]
        );
        assert_eq!(flag(&sidecar, "--health-path"), ["/health"]);
        assert_eq!(flag(&sidecar, "--inbound-port").len(), 1);
    }

    #[test]
    fn the_gateway_is_recognised_by_its_config_file_and_admin_port() {
        let admin: SocketAddr = "127.0.0.1:30003".parse().unwrap();
        let file = gateway_config(&opts());
        let config = serde_json::json!({
            "mode": "gateway",
            "config_file": file,
            "listeners": {"listen": "127.0.0.1:8000", "admin": admin},
        });
        assert!(is_our_gateway(&config, &file, admin));
        assert!(!is_our_gateway(
            &config,
            Path::new("/other/gateway.yaml"),
            admin
        ));
        let sidecar = serde_json::json!({"listeners": {"admin": admin}});
        assert!(!is_our_gateway(&sidecar, &file, admin));
    }

    #[test]
    fn gateway_yaml_routes_and_limits_as_the_demo_promises() {
        let yaml = gateway_yaml(opts().gateway);
        for line in [
            "listen: 127.0.0.1:8000",
            "  subjectHeader: x-user-id",
            "      hs256SecretEnv: USER_JWT_SECRET",
            "  api: {requestsPerSecond: 10, burst: 10, key: client-ip}",
            "    pathPrefix: /api/users\n    rewritePrefix: /users\n    service: user:http\n    rateLimit: api",
            "    pathPrefix: /api/orders\n    rewritePrefix: /orders\n    service: order:http\n    rateLimit: api",
            "    pathPrefix: /login\n    service: user:http\n    public: true",
            "    pathPrefix: /shop.order.v1.OrderService/\n    service: order:grpc\n    grpc: true\n    rateLimit: api",
        ] {
            assert!(yaml.contains(line), "missing {line:?} in\n{yaml}");
        }
    }

    /// The file is a `Gateway` spec, so the same routes can be applied as a resource.
    #[test]
    fn gateway_yaml_is_a_valid_gateway_spec() {
        let spec = ferrule_config::GatewaySpec::parse_file(&gateway_yaml(opts().gateway))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.listen(), "127.0.0.1:8000".parse().unwrap());
        let names: Vec<&str> = spec.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["login", "users", "orders", "orders-grpc"]);
        let grpc = &spec.routes[3];
        assert!(
            grpc.grpc && !grpc.public,
            "gRPC orders need a JWT like HTTP ones"
        );
        assert_eq!(
            grpc.rewrite_prefix, None,
            "gRPC paths are forwarded as they are"
        );
        assert_eq!(
            spec.rate_limits["api"].key(),
            ferrule_config::RateLimitKey::ClientIp
        );
    }

    #[test]
    fn with_postgres_every_app_reaches_its_database_through_its_sidecar() {
        let opts = with_postgres();
        let bound = |grpc: bool| AppAddrs {
            http: "127.0.0.1:30001".parse().unwrap(),
            grpc: grpc.then(|| "127.0.0.1:30002".parse().unwrap()),
        };
        for (instance, prefix, database) in [
            ("user-1", "USER", "user"),
            ("user-2", "USER", "user"),
            ("payment", "PAYMENT", "payment"),
            ("order", "ORDER", "order"),
        ] {
            let app = app_of(&opts, instance);
            assert!(app.has_chosen_ports(), "{instance}");
            let spec = app.spec(&opts);
            let url = env(&spec, &format!("{prefix}_DATABASE_URL"));
            let local = url
                .strip_prefix("postgres://ferrule@")
                .and_then(|rest| rest.strip_suffix(&format!("/{database}")))
                .unwrap_or_else(|| panic!("{instance}: {url}"));
            assert_eq!(spec.database, None, "{instance}");
            let sidecar = app.sidecar(&opts, "127.0.0.1:30000".parse().unwrap(), bound(true));
            assert!(
                flag(&sidecar, "--upstream").contains(&format!("postgres={local}").as_str()),
                "{instance}: {:?}",
                sidecar.args
            );
            let port = local.rsplit(':').next().unwrap();
            assert_eq!(flag(&sidecar, "--opaque-ports"), [port], "{instance}");
        }
        // Each app has its own local port for postgres.
        let locals: std::collections::HashSet<String> = apps(&opts, chosen())
            .iter()
            .map(|a| a.spec(&opts).env[1].1.clone())
            .collect();
        assert_eq!(locals.len(), 4);
    }

    #[test]
    fn postgres_runs_unprivileged_on_loopback_behind_an_opaque_sidecar() {
        let opts = with_postgres();
        let addr: SocketAddr = "127.0.0.1:25432".parse().unwrap();
        let server = postgres(opts.postgres.as_ref().unwrap(), addr);
        assert_eq!(server.run_as, Some((101, 104)));
        assert_eq!(server.stop_signal, Signal::INT);
        assert_eq!(flag(&server, "-h"), ["127.0.0.1"]);
        assert_eq!(flag(&server, "-p"), ["25432"]);
        assert_eq!(flag(&server, "-D"), ["/state/postgres/data"]);
        let sidecar = postgres_sidecar(&opts, "127.0.0.1:30000".parse().unwrap(), addr);
        assert_eq!(flag(&sidecar, "--service"), ["postgres"]);
        assert_eq!(flag(&sidecar, "--app-addr"), ["127.0.0.1:25432"]);
        assert_eq!(flag(&sidecar, "--opaque-ports"), ["25432"]);
        assert!(
            flag(&sidecar, "--health-path").is_empty(),
            "TCP health check"
        );
    }

    #[test]
    fn without_postgres_the_apps_keep_their_sqlite_files() {
        for app in apps(&opts(), chosen()) {
            let spec = app.spec(&opts());
            assert!(spec.env.iter().any(|(k, v)| k.ends_with("_DATABASE_URL")
                && v.starts_with("sqlite:///state/")));
            let sidecar = app.sidecar(
                &opts(),
                "127.0.0.1:30000".parse().unwrap(),
                AppAddrs {
                    http: "127.0.0.1:30001".parse().unwrap(),
                    grpc: None,
                },
            );
            assert!(flag(&sidecar, "--opaque-ports").is_empty());
            assert!(!sidecar.args.iter().any(|a| a.starts_with("postgres=")));
            assert_eq!(app.has_chosen_ports(), app.instance == "order");
        }
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
