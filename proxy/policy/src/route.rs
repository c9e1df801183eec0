//! Compiled `HTTPRoute`s: which rule a request matches, which backend of the rule's traffic
//! split it goes to, and the rule's header rewrites.
//!
//! [`Routes::compile`] turns a route spec into matchers built once (regexes compiled, header
//! names parsed, weights summed), resolving each rule's timeout and retry overrides against the
//! parent service's [`EffectivePolicy`], so per request there is only matching left.
//! [`Routes::find`] tries the rules in the order written and returns the first whose `matches`
//! has an entry that holds (an empty `matches` holds for every request); `None` means the
//! request goes to the parent service under its `ServicePolicy`.
//!
//! Matching is on the request as the app sent it: the path as written (not percent-decoded),
//! the method, header values (any of a repeated header may match) and query parameters (the
//! first occurrence of a name, form-decoded). Path prefixes match whole segments: `/api` (or
//! `/api/`) matches `/api` and `/api/x`, not `/apix`. Regexes must match the whole value.

use std::sync::Arc;
use std::time::Duration;

use ferrule_config::{
    Backend, EffectivePolicy, HeaderModifier, HttpRouteSpec, PathMatch, PathMatchType, RouteMatch,
    RouteRule, ValueMatch, ValueMatchType,
};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};
use rand::Rng;
use regex::Regex;

use super::fault::FaultPolicy;
use super::retry::RetryPolicy;

/// Why a route spec could not be compiled. Validation in `ferrule-config` refuses most of
/// these before anything is stored; this is the proxy's own check of what it was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RouteError {
    /// `spec.rules[1].matches[0].path.value`.
    pub field: String,
    pub reason: String,
}

fn route_error(field: String, reason: impl Into<String>) -> RouteError {
    RouteError {
        field,
        reason: reason.into(),
    }
}

/// The rules of one `HTTPRoute`, ready to match requests.
#[derive(Debug, Clone)]
pub struct Routes {
    rules: Vec<Rule>,
}

impl Routes {
    /// Compiles `spec`. `parent` is the effective policy of the route's parent service: a
    /// rule's `timeout` and `retries` override it field by field.
    pub fn compile(spec: &HttpRouteSpec, parent: &EffectivePolicy) -> Result<Self, RouteError> {
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| Rule::compile(i, rule, parent))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// The first rule that matches `req`, or `None` (the parent service's policy applies).
    pub fn find<B>(&self, req: &Request<B>) -> Option<&Rule> {
        self.find_parts(req.method(), req.uri(), req.headers())
    }

    /// [`Routes::find`] on the parts of a request.
    pub fn find_parts(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<&Rule> {
        let request = RequestView {
            method,
            uri,
            headers,
        };
        self.rules.iter().find(|rule| rule.matches(&request))
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// One rule: what it matches and what happens to the requests it matches.
#[derive(Debug, Clone)]
pub struct Rule {
    label: String,
    matches: Vec<Match>,
    split: Split,
    request_timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retry: Arc<RetryPolicy>,
    request_headers: HeaderRewrite,
    response_headers: HeaderRewrite,
    fault: Option<FaultPolicy>,
}

impl Rule {
    fn compile(
        index: usize,
        rule: &RouteRule,
        parent: &EffectivePolicy,
    ) -> Result<Self, RouteError> {
        let field = |rest: &str| format!("spec.rules[{index}].{rest}");
        let matches = rule
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| Match::compile(&field(&format!("matches[{i}]")), m))
            .collect::<Result<_, _>>()?;
        let retries = match &rule.retries {
            Some(overrides) => overrides.apply_to(Some(&parent.retries)),
            None => parent.retries.clone(),
        };
        Ok(Self {
            label: rule.name.clone().unwrap_or_else(|| format!("rule-{index}")),
            matches,
            split: Split::new(&rule.backends).map_err(|e| route_error(field("backends"), e))?,
            request_timeout: rule.timeout.or(parent.request_timeout),
            per_try_timeout: parent.per_try_timeout,
            retry: Arc::new(RetryPolicy::new(&retries)),
            request_headers: HeaderRewrite::compile(rule.request_headers.as_ref())
                .map_err(|(f, r)| route_error(field(&format!("requestHeaders.{f}")), r))?,
            response_headers: HeaderRewrite::compile(rule.response_headers.as_ref())
                .map_err(|(f, r)| route_error(field(&format!("responseHeaders.{f}")), r))?,
            fault: rule
                .fault
                .as_ref()
                .map(FaultPolicy::new)
                .transpose()
                .map_err(|e| route_error(field("fault.abort.status"), e.to_string()))?,
        })
    }

    fn matches(&self, request: &RequestView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(request))
    }

    /// The rule's name, or `rule-<index>` when it has none: for metrics labels and logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The backend this request goes to, drawn by weight; `None` when the rule names no
    /// backends (the request goes to the parent service). Production passes `rand::rng()`,
    /// tests a seeded generator.
    pub fn pick_backend<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<&Backend> {
        self.split.pick(rng)
    }

    /// The rule's backends with their weights.
    pub fn backends(&self) -> &[Backend] {
        &self.split.backends
    }

    /// Whole-request timeout, retries included: the rule's, else the service policy's.
    pub fn request_timeout(&self) -> Option<Duration> {
        self.request_timeout
    }

    /// Per-attempt timeout (the parent service's `timeouts.perTry`).
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.per_try_timeout
    }

    /// Retries: the service policy's with the rule's overrides on top.
    pub fn retry(&self) -> &Arc<RetryPolicy> {
        &self.retry
    }

    /// Rewrites for the request before it is forwarded.
    pub fn request_headers(&self) -> &HeaderRewrite {
        &self.request_headers
    }

    /// Rewrites for the response before it is returned to the app.
    pub fn response_headers(&self) -> &HeaderRewrite {
        &self.response_headers
    }

    pub fn fault(&self) -> Option<&FaultPolicy> {
        self.fault.as_ref()
    }
}

/// What matching looks at.
struct RequestView<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
}

/// One `matches` entry: every condition set must hold.
#[derive(Debug, Clone)]
struct Match {
    path: Option<PathMatcher>,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

impl Match {
    fn compile(field: &str, m: &RouteMatch) -> Result<Self, RouteError> {
        let path = m
            .path
            .as_ref()
            .map(|p| {
                PathMatcher::compile(p).map_err(|r| route_error(format!("{field}.path.value"), r))
            })
            .transpose()?;
        let method = m
            .method
            .as_ref()
            .map(|name| {
                Method::from_bytes(name.as_bytes()).map_err(|_| {
                    route_error(
                        format!("{field}.method"),
                        format!("{name:?} is not an HTTP method"),
                    )
                })
            })
            .transpose()?;
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let f = format!("{field}.headers[{i}]");
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    route_error(
                        format!("{f}.name"),
                        format!("{:?} is not a header name", h.name),
                    )
                })?;
                let value =
                    ValueMatcher::compile(h).map_err(|r| route_error(format!("{f}.value"), r))?;
                Ok((name, value))
            })
            .collect::<Result<_, RouteError>>()?;
        let query = m
            .query_params
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let value = ValueMatcher::compile(q)
                    .map_err(|r| route_error(format!("{field}.queryParams[{i}].value"), r))?;
                Ok((q.name.clone(), value))
            })
            .collect::<Result<_, RouteError>>()?;
        Ok(Self {
            path,
            method,
            headers,
            query,
        })
    }

    fn matches(&self, request: &RequestView<'_>) -> bool {
        if let Some(method) = &self.method
            && method != request.method
        {
            return false;
        }
        if let Some(path) = &self.path
            && !path.matches(request.uri.path())
        {
            return false;
        }
        let headers_hold = self.headers.iter().all(|(name, value)| {
            request
                .headers
                .get_all(name)
                .iter()
                .any(|v| value.matches_bytes(v.as_bytes()))
        });
        if !headers_hold {
            return false;
        }
        self.query.iter().all(|(name, value)| {
            let query = request.uri.query().unwrap_or_default();
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == name)
                .is_some_and(|(_, v)| value.matches_str(&v))
        })
    }
}

/// A path prefix that matches whole segments: `/api` (or `/api/`) matches `/api` and `/api/x`,
/// never `/apix`; `/` matches every path. The one prefix matcher of the proxy: `HTTPRoute`
/// `Prefix` matches and the gateway's `pathPrefix` routes both use it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPrefix {
    /// Without trailing slashes; empty for `/`.
    trimmed: String,
}

impl PathPrefix {
    pub fn new(prefix: &str) -> Self {
        Self {
            trimmed: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The prefix as written without its trailing slashes; `/` for the root.
    pub fn as_str(&self) -> &str {
        if self.trimmed.is_empty() {
            "/"
        } else {
            &self.trimmed
        }
    }

    /// The part of `path` after the prefix when it matches (`Some("")` for an exact match,
    /// `Some("/x")` below it, the whole path for the root prefix).
    pub fn strip<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix(self.trimmed.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }

    pub fn matches(&self, path: &str) -> bool {
        self.strip(path).is_some()
    }

    /// Longer prefixes are more specific: sorting by this, descending, makes the first match
    /// the longest.
    pub fn specificity(&self) -> usize {
        self.trimmed.len()
    }
}

#[derive(Debug, Clone)]
enum PathMatcher {
    Exact(String),
    Prefix(PathPrefix),
    Regex(Regex),
}

impl PathMatcher {
    fn compile(p: &PathMatch) -> Result<Self, String> {
        Ok(match p.kind {
            PathMatchType::Exact => PathMatcher::Exact(p.value.clone()),
            PathMatchType::Prefix => PathMatcher::Prefix(PathPrefix::new(&p.value)),
            PathMatchType::Regex => PathMatcher::Regex(whole(&p.value)?),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(value) => path == value,
            PathMatcher::Prefix(prefix) => prefix.matches(path),
            PathMatcher::Regex(re) => re.is_match(path),
        }
    }
}

#[derive(Debug, Clone)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(m: &ValueMatch) -> Result<Self, String> {
        Ok(match m.kind {
            ValueMatchType::Exact => ValueMatcher::Exact(m.value.clone()),
            ValueMatchType::Regex => ValueMatcher::Regex(whole(&m.value)?),
        })
    }

    fn matches_str(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(want) => value == want,
            ValueMatcher::Regex(re) => re.is_match(value),
        }
    }

    /// Header values may hold bytes that are not UTF-8; such a value matches nothing but an
    /// exact byte-for-byte condition.
    fn matches_bytes(&self, value: &[u8]) -> bool {
        match self {
            ValueMatcher::Exact(want) => value == want.as_bytes(),
            ValueMatcher::Regex(re) => std::str::from_utf8(value).is_ok_and(|v| re.is_match(v)),
        }
    }
}

/// A regex that must match the whole input.
fn whole(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        format!(
            "invalid regex {pattern:?}: {}",
            e.to_string().lines().last().unwrap_or_default()
        )
    })
}

/// A weighted choice among a rule's backends.
#[derive(Debug, Clone)]
struct Split {
    backends: Vec<Backend>,
    /// Running sums of the weights: backend `i` owns `[cumulative[i-1], cumulative[i])`.
    cumulative: Vec<u64>,
}

impl Split {
    fn new(backends: &[Backend]) -> Result<Self, String> {
        let cumulative: Vec<u64> = backends
            .iter()
            .scan(0u64, |sum, b| {
                *sum += u64::from(b.weight);
                Some(*sum)
            })
            .collect();
        if cumulative.last() == Some(&0) {
            return Err("backend weights sum to 0: no backend could receive a request".into());
        }
        Ok(Self {
            backends: backends.to_vec(),
            cumulative,
        })
    }

    fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<&Backend> {
        let total = *self.cumulative.last()?;
        let x = rng.random_range(0..total);
        let i = self.cumulative.partition_point(|&c| c <= x);
        self.backends.get(i)
    }
}

/// A rule's header rewrites, applied in the order remove, set, add.
#[derive(Debug, Clone, Default)]
pub struct HeaderRewrite {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRewrite {
    /// Errors name the failing field relative to the modifier (`set.x-name`) and the reason.
    fn compile(m: Option<&HeaderModifier>) -> Result<Self, (String, String)> {
        let Some(m) = m else {
            return Ok(Self::default());
        };
        let name = |field: &str, n: &str| {
            HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| (field.to_string(), format!("{n:?} is not a header name")))
        };
        let pairs = |field: &str, map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .map(|(n, v)| {
                    let value = HeaderValue::from_str(v).map_err(|_| {
                        (
                            format!("{field}.{n}"),
                            format!("{v:?} is not a valid header value"),
                        )
                    })?;
                    Ok((name(field, n)?, value))
                })
                .collect::<Result<Vec<_>, (String, String)>>()
        };
        Ok(Self {
            remove: m
                .remove
                .iter()
                .map(|n| name("remove", n))
                .collect::<Result<_, _>>()?,
            set: pairs("set", &m.set)?,
            add: pairs("add", &m.add)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Rewrites `headers` in place.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferrule_config::{Fault, FaultAbort, Resource, Retries, Spec};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn routes(yaml: &str) -> Routes {
        let resources = Resource::parse_documents(yaml).expect("test route parses");
        let Spec::HttpRoute(spec) = &resources[0].spec else {
            panic!("not a route")
        };
        Routes::compile(spec, &EffectivePolicy::default()).expect("test route compiles")
    }

    const ROUTE: &str = r#"
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata: {name: user}
spec:
  service: user
  rules:
    - name: exact
      matches: [{path: {type: Exact, value: /login}, method: POST}]
    - name: users
      matches:
        - path: {type: Prefix, value: /users/}
          headers: [{name: x-canary, value: "yes"}]
        - queryParams: [{name: version, value: "v[0-9]+", type: Regex}]
    - name: regex
      matches: [{path: {type: Regex, value: "/items/[0-9]+"}}]
    - name: fallback
"#;

    fn find(routes: &Routes, req: Request<()>) -> Option<&str> {
        routes.find(&req).map(Rule::label)
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn first_matching_rule_wins_in_order() {
        let r = routes(ROUTE);
        let post = |uri| Request::post(uri).body(()).unwrap();
        assert_eq!(find(&r, post("/login")), Some("exact"));
        // Exact path, wrong method: falls through to the catch-all.
        assert_eq!(find(&r, get("/login")), Some("fallback"));
        assert_eq!(find(&r, get("/login/x")), Some("fallback"));

        let canary = |uri| {
            Request::get(uri)
                .header("x-canary", "yes")
                .body(())
                .unwrap()
        };
        assert_eq!(find(&r, canary("/users")), Some("users"));
        assert_eq!(find(&r, canary("/users/42")), Some("users"));
        assert_eq!(find(&r, canary("/usersx")), Some("fallback"));
        // The header condition belongs to the same entry as the path: both must hold.
        assert_eq!(find(&r, get("/users/42")), Some("fallback"));
        // The second entry is an alternative: any path with a matching query parameter.
        assert_eq!(find(&r, get("/anything?a=1&version=v12")), Some("users"));
        assert_eq!(find(&r, get("/anything?version=v12x")), Some("fallback"));
        assert_eq!(find(&r, get("/anything?version=v%31")), Some("users"));

        assert_eq!(find(&r, get("/items/17")), Some("regex"));
        // Regexes match the whole path.
        assert_eq!(find(&r, get("/items/17/x")), Some("fallback"));
    }

    #[test]
    fn no_rule_matching_means_the_parent_service() {
        let r = routes(
            r#"
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata: {name: user}
spec:
  service: user
  rules:
    - matches: [{path: {value: /api}}]
"#,
        );
        assert_eq!(find(&r, get("/api/v1")), Some("rule-0"));
        assert_eq!(find(&r, get("/other")), None);
    }

    #[test]
    fn repeated_headers_match_any_value() {
        let r = routes(
            r#"
apiVersion: ferrule.io/v1
kind: HTTPRoute
metadata: {name: user}
spec:
  service: user
  rules:
    - matches: [{headers: [{name: X-Tenant, value: "b.*", type: Regex}]}]
"#,
        );
        let req = Request::get("/")
            .header("x-tenant", "alpha")
            .header("x-tenant", "beta")
            .body(())
            .unwrap();
        assert_eq!(find(&r, req), Some("rule-0"));
        let req = Request::get("/")
            .header("x-tenant", "alpha")
            .body(())
            .unwrap();
        assert_eq!(find(&r, req), None);
    }

    #[test]
    fn prefix_slash_matches_everything() {
        let p = PathMatcher::compile(&PathMatch {
            kind: PathMatchType::Prefix,
            value: "/".into(),
        })
        .unwrap();
        assert!(p.matches("/") && p.matches("/a/b"));
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        let api = PathPrefix::new("/api/");
        assert_eq!(api.as_str(), "/api");
        assert_eq!(api.strip("/api"), Some(""));
        assert_eq!(api.strip("/api/x"), Some("/x"));
        assert_eq!(api.strip("/apix"), None);
        let root = PathPrefix::new("/");
        assert_eq!(root.as_str(), "/");
        assert_eq!(root.strip("/a"), Some("/a"));
        assert!(root.specificity() < api.specificity());
    }

    fn backend(service: &str, weight: u32) -> Backend {
        Backend {
            service: service.into(),
            port: None,
            weight,
        }
    }

    #[test]
    fn weighted_split_follows_weights() {
        let split = Split::new(&[backend("v1", 90), backend("v2", 10), backend("off", 0)]).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = BTreeMap::new();
        for _ in 0..10_000 {
            *counts
                .entry(split.pick(&mut rng).unwrap().service.clone())
                .or_insert(0) += 1;
        }
        let v1 = counts["v1"];
        assert!((8_800..=9_200).contains(&v1), "{counts:?}");
        assert_eq!(
            counts.get("off"),
            None,
            "a weight of 0 never receives requests"
        );
        // The same seed draws the same sequence.
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| split.pick(&mut rng).unwrap().service.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));

        assert!(Split::new(&[]).unwrap().pick(&mut rng).is_none());
        assert!(Split::new(&[backend("a", 0)]).is_err());
    }

    #[test]
    fn header_rewrite_removes_sets_then_adds() {
        let rewrite = HeaderRewrite::compile(Some(&HeaderModifier {
            set: [("x-set".to_string(), "new".to_string())].into(),
            add: [("x-add".to_string(), "two".to_string())].into(),
            remove: vec!["x-gone".into(), "x-set".into()],
        }))
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-gone", HeaderValue::from_static("1"));
        headers.append("x-set", HeaderValue::from_static("old-a"));
        headers.append("x-set", HeaderValue::from_static("old-b"));
        headers.insert("x-add", HeaderValue::from_static("one"));
        rewrite.apply(&mut headers);
        assert!(!headers.contains_key("x-gone"));
        assert_eq!(headers.get_all("x-set").iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(
            headers.get_all("x-add").iter().collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert!(HeaderRewrite::default().is_empty() && !rewrite.is_empty());

        let bad = HeaderRewrite::compile(Some(&HeaderModifier {
            set: [("x".to_string(), "a\nb".to_string())].into(),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(bad.0, "set.x");
    }

    #[test]
    fn rule_overrides_resolve_against_the_parent_policy() {
        let parent = ferrule_config::ServicePolicySpec {
            service: "user".into(),
            timeouts: Some(ferrule_config::Timeouts {
                request: Some(Duration::from_secs(5)),
                per_try: Some(Duration::from_secs(1)),
                idle: None,
            }),
            retries: Some(Retries {
                max_attempts: Some(4),
                ..Default::default()
            }),
            ..Default::default()
        }
        .effective();
        let spec = HttpRouteSpec {
            service: "user".into(),
            rules: vec![
                RouteRule {
                    timeout: Some(Duration::from_secs(2)),
                    retries: Some(Retries {
                        non_idempotent: Some(true),
                        ..Default::default()
                    }),
                    fault: Some(Fault {
                        delay: None,
                        abort: Some(FaultAbort {
                            status: 503,
                            percent: 50.0,
                        }),
                    }),
                    ..Default::default()
                },
                RouteRule::default(),
            ],
        };
        let routes = Routes::compile(&spec, &parent).unwrap();
        let [first, second] = routes.rules() else {
            panic!("two rules")
        };
        assert_eq!(first.request_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(first.per_try_timeout(), Some(Duration::from_secs(1)));
        assert_eq!(first.retry().max_attempts(), 4);
        assert!(first.retry().allows_method(&Method::POST));
        assert!(first.fault().is_some());
        assert_eq!(second.request_timeout(), Some(Duration::from_secs(5)));
        assert!(!second.retry().allows_method(&Method::POST));
        assert!(second.fault().is_none());
    }

    #[test]
    fn compile_errors_name_the_field() {
        let spec = HttpRouteSpec {
            service: "user".into(),
            rules: vec![
                RouteRule::default(),
                RouteRule {
                    matches: vec![RouteMatch {
                        path: Some(PathMatch {
                            kind: PathMatchType::Regex,
                            value: "([".into(),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        };
        let err = Routes::compile(&spec, &EffectivePolicy::default()).unwrap_err();
        assert_eq!(err.field, "spec.rules[1].matches[0].path.value");
        assert!(err.reason.contains("invalid regex"), "{err}");
    }
}
