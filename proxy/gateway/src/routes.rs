//! Route selection: the longest `pathPrefix` that matches on a segment boundary wins, and the
//! matched prefix is replaced by `rewritePrefix` before the request is forwarded.
//!
//! Matching is [`PathPrefix`]'s, the same as an `HTTPRoute`'s `Prefix` match: `/api` matches
//! `/api`, `/api/` and `/api/users`, never `/apix`; `/` matches every path. Trailing slashes
//! of a prefix do not matter (`/api/` is `/api`). Matching is on the raw path, so a
//! percent-encoded slash is not a segment boundary.

use ferrule_proxy_policy::route::PathPrefix;
use http::Uri;
use http::uri::PathAndQuery;

/// A routing table of `T`s (the gateway keeps each route's stack there).
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    /// Longest prefix first, so the first match is the longest.
    routes: Vec<(PathPrefix, Option<String>, T)>,
}

/// What matched a path.
#[derive(Debug)]
pub struct Matched<'a, T> {
    pub route: &'a T,
    /// The path to forward, rewritten when the route says so.
    pub path: String,
}

impl<T> RouteTable<T> {
    /// `routes`: (pathPrefix, rewritePrefix, value).
    pub fn new(routes: impl IntoIterator<Item = (PathPrefix, Option<String>, T)>) -> Self {
        let mut routes: Vec<_> = routes.into_iter().collect();
        routes.sort_by_key(|(prefix, _, _)| std::cmp::Reverse(prefix.specificity()));
        Self { routes }
    }

    /// The route for `path`, with the path to forward.
    pub fn find(&self, path: &str) -> Option<Matched<'_, T>> {
        self.routes.iter().find_map(|(prefix, rewrite, route)| {
            let path = forward_path(prefix, rewrite.as_deref(), path)?;
            Some(Matched { route, path })
        })
    }
}

/// The path to forward when `prefix` matches `path`: `path` itself, or with the prefix
/// replaced by `rewrite`.
pub fn forward_path(prefix: &PathPrefix, rewrite: Option<&str>, path: &str) -> Option<String> {
    let rest = prefix.strip(path)?;
    Some(match rewrite {
        None => path.to_string(),
        Some(rewrite) => {
            // `rest` is empty or starts with '/': join without doubling the slash.
            let joined = format!("{}{rest}", rewrite.trim_end_matches('/'));
            if joined.is_empty() {
                "/".to_string()
            } else {
                joined
            }
        }
    })
}

/// `uri` with its path replaced by `path`, keeping the query, scheme and authority.
pub fn with_path(uri: &Uri, path: &str) -> Result<Uri, http::Error> {
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query)?);
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable<&'static str> {
        let p = PathPrefix::new;
        RouteTable::new([
            (p("/login"), None, "login"),
            (p("/api/users"), Some("/users".to_string()), "users"),
            (p("/api/"), None, "api"),
            (p("/api/orders"), Some("/".to_string()), "orders"),
            (p("/"), None, "root"),
        ])
    }

    fn find(path: &str) -> (&'static str, String) {
        let table = table();
        let m = table.find(path).unwrap();
        (*m.route, m.path)
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        assert_eq!(find("/login"), ("login", "/login".into()));
        assert_eq!(find("/login/x"), ("login", "/login/x".into()));
        assert_eq!(find("/loginx"), ("root", "/loginx".into()));
        assert_eq!(find("/api"), ("api", "/api".into()));
        assert_eq!(find("/api/other"), ("api", "/api/other".into()));
        assert_eq!(find("/apix"), ("root", "/apix".into()));
        assert_eq!(find("/api/users"), ("users", "/users".into()));
        assert_eq!(find("/api/users/123"), ("users", "/users/123".into()));
        assert_eq!(find("/api/users/"), ("users", "/users/".into()));
        assert_eq!(find("/api/usersx"), ("api", "/api/usersx".into()));
        assert_eq!(find("/"), ("root", "/".into()));
    }

    #[test]
    fn rewrite_to_root_does_not_double_slashes() {
        assert_eq!(find("/api/orders/7"), ("orders", "/7".into()));
        assert_eq!(find("/api/orders"), ("orders", "/".into()));
    }

    #[test]
    fn no_match_without_a_root_route() {
        let t = RouteTable::new([(PathPrefix::new("/a"), None, 1)]);
        assert!(t.find("/b").is_none());
        assert!(t.find("/ab").is_none());
        assert_eq!(*t.find("/a/b").unwrap().route, 1);
    }

    /// A gRPC method is a path, `/package.Service/Method`: a route on the service's prefix takes
    /// every method of it, and only of it, with the path unchanged.
    #[test]
    fn grpc_services_are_prefixes_of_their_methods() {
        let t = RouteTable::new([
            (
                PathPrefix::new("/shop.order.v1.OrderService/"),
                None,
                "orders-grpc",
            ),
            (
                PathPrefix::new("/shop.order.v1.OrderService/GetOrder"),
                None,
                "get-only",
            ),
            (
                PathPrefix::new("/api/orders"),
                Some("/orders".to_string()),
                "orders",
            ),
        ]);
        let m = t.find("/shop.order.v1.OrderService/CreateOrder").unwrap();
        assert_eq!(
            (*m.route, m.path.as_str()),
            ("orders-grpc", "/shop.order.v1.OrderService/CreateOrder")
        );
        assert_eq!(
            *t.find("/shop.order.v1.OrderService/GetOrder")
                .unwrap()
                .route,
            "get-only"
        );
        assert!(
            t.find("/shop.order.v1.OrderServiceV2/CreateOrder")
                .is_none()
        );
        assert!(t.find("/shop.order.v1.Order/CreateOrder").is_none());
    }

    #[test]
    fn uri_rewrite_keeps_query_and_authority() {
        let uri: Uri = "http://gw:8000/api/users/1?x=1&y=2".parse().unwrap();
        let out = with_path(&uri, "/users/1").unwrap();
        assert_eq!(out.to_string(), "http://gw:8000/users/1?x=1&y=2");
        let origin: Uri = "/api/users".parse().unwrap();
        assert_eq!(with_path(&origin, "/users").unwrap().to_string(), "/users");
    }
}
