//! Routes: which handler answers a request, decided from its host and path.
//!
//! The table is compiled once per configuration (at start and on each reload) and
//! swapped atomically; a request holds the table it started with. Matching: the probes
//! (`/livez`, `/readyz`) first, always; then routes for the request's exact host, then
//! `*.` wildcards (longest suffix first), then routes for any host — within each, the
//! longest path prefix wins, and a prefix matches whole segments. A host with routes of
//! its own still falls through to the any-host routes for paths none of its own match.
//! Each route has a bounded `name` for logs and metrics (never the raw path).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tiergate_config::{ProxySettings, RouteSettings, Settings};

use crate::metrics::RouteMetrics;
use crate::proxy::{Group, Split};

/// What answers a matched request.
#[derive(Debug, Clone)]
pub enum Handler {
    /// The in-process application (`app-core`).
    App,
    /// Liveness: the process runs and answers.
    Livez,
    /// Readiness: the app can serve (database prepared, not draining).
    Readyz,
    /// Nothing matched: a JSON 404.
    NotFound,
    /// Forwarded to an upstream group.
    Upstream(Arc<Group>),
    /// Forwarded to one of several groups, by weight.
    Split(Arc<Split>),
    /// A 308 to this URL prefix + the request's path and query.
    Redirect(String),
}

/// One entry of the table.
#[derive(Debug)]
pub struct Route {
    /// Bounded label for logs and metrics.
    pub name: String,
    /// What answers.
    pub handler: Handler,
    /// Request metrics, registered once.
    pub metrics: RouteMetrics,
    /// Counts against `http.max_in_flight` (the app's load shedding): the app's routes
    /// but `/health` (shedding the load balancer's health checks under load would pull
    /// healthy tasks out of service and shift their load onto the rest). Proxied routes
    /// count against their group's own bound.
    pub shed: bool,
    /// The path prefix without a trailing `/` (`""` for the root).
    prefix: String,
    /// Only the exact path (`path` as configured) matches.
    exact: Option<String>,
    /// What replaces `prefix` upstream.
    pub rewrite: Option<String>,
    /// As configured, for the admin API.
    pub settings: Option<RouteSettings>,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        if let Some(exact) = &self.exact {
            return path == exact;
        }
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The matched prefix and its replacement, when the route rewrites.
    pub fn rewrite(&self) -> Option<(&str, &str)> {
        self.rewrite.as_deref().map(|to| (self.prefix.as_str(), to))
    }
}

/// The compiled route table.
#[derive(Debug)]
pub struct Router {
    // Each route is shared: a request keeps the one it matched until it is answered.
    probes: [Arc<Route>; 2],
    exact_hosts: HashMap<String, Vec<Arc<Route>>>,
    /// `(".example.com", routes)`, longest suffix first.
    wildcard_hosts: Vec<(String, Vec<Arc<Route>>)>,
    any_host: Vec<Arc<Route>>,
    fallback: Arc<Route>,
    groups: BTreeMap<String, Arc<Group>>,
    /// Some route hands requests to the app (else the instance is a proxy only).
    serves_app: bool,
    /// How requests are forwarded.
    pub proxy: ProxySettings,
}

/// The configuration names something the table cannot be built from (validation rules
/// these out; this is the last line).
#[derive(Debug, thiserror::Error)]
#[error("route table: {0}")]
pub struct RouterError(String);

impl Router {
    /// Compiles the table of `settings`. Groups whose settings did not change since
    /// `previous` are taken over whole (pool, health, ejections), and so are the
    /// runtime weights of splits whose configured weights did not change.
    ///
    /// # Errors
    /// A route names a group that does not exist, or a target is not `host:port`.
    pub fn new(settings: &Settings, previous: Option<&Router>) -> Result<Self, RouterError> {
        let mut groups = BTreeMap::new();
        for upstream in &settings.upstreams {
            let kept = previous
                .and_then(|p| p.groups.get(&upstream.name))
                .filter(|g| g.settings == *upstream && g.proxy == settings.proxy);
            let group = match kept {
                Some(group) => group.clone(),
                None => Arc::new(
                    Group::new(upstream, &settings.proxy)
                        .map_err(|e| RouterError(format!("group {}: {e}", upstream.name)))?,
                ),
            };
            groups.insert(upstream.name.clone(), group);
        }
        let group = |name: &str| {
            groups
                .get(name)
                .cloned()
                .ok_or_else(|| RouterError(format!("no upstream group {name:?}")))
        };

        let mut exact_hosts: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        let mut wildcard_hosts: BTreeMap<String, Vec<Arc<Route>>> = BTreeMap::new();
        let mut any_host = Vec::new();
        for r in &settings.routes {
            let handler = if r.app {
                Handler::App
            } else if let Some(name) = &r.upstream {
                Handler::Upstream(group(name)?)
            } else if let Some(weights) = &r.split {
                let split = Split::new(weights, &groups, r.sticky_cookie.clone())
                    .ok_or_else(|| RouterError(format!("route {}: unknown group", r.name)))?;
                if let Some(Handler::Split(old)) = previous.and_then(|p| p.handler_of(&r.name)) {
                    split.carry_over(old);
                }
                Handler::Split(Arc::new(split))
            } else if let Some(url) = &r.redirect {
                Handler::Redirect(url.trim_end_matches('/').to_owned())
            } else {
                return Err(RouterError(format!("route {} has no target", r.name)));
            };
            let shed = r.app && r.path != "/health";
            let route = Arc::new(Route {
                name: r.name.clone(),
                metrics: RouteMetrics::new(r.name.clone()),
                shed,
                prefix: r.path.trim_end_matches('/').to_owned(),
                exact: r.exact.then(|| r.path.clone()),
                rewrite: r.rewrite_prefix.clone(),
                handler,
                settings: Some(r.clone()),
            });
            match r.host.as_deref().map(str::to_ascii_lowercase) {
                None => any_host.push(route),
                Some(host) => match host.strip_prefix('*') {
                    Some(suffix) => wildcard_hosts
                        .entry(suffix.to_owned())
                        .or_default()
                        .push(route),
                    None => exact_hosts.entry(host).or_default().push(route),
                },
            }
        }
        let by_specificity = |routes: &mut Vec<Arc<Route>>| {
            // Longest prefix first; an exact route before a prefix route of the same path.
            routes.sort_by_key(|r| (std::cmp::Reverse(r.prefix.len()), r.exact.is_none()));
        };
        exact_hosts.values_mut().for_each(by_specificity);
        let mut wildcard_hosts: Vec<(String, Vec<Arc<Route>>)> =
            wildcard_hosts.into_iter().collect();
        wildcard_hosts.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        wildcard_hosts
            .iter_mut()
            .for_each(|(_, r)| by_specificity(r));
        by_specificity(&mut any_host);

        let builtin = |name: &str, path: &str, handler| {
            Arc::new(Route {
                name: name.to_owned(),
                handler,
                metrics: RouteMetrics::new(name.to_owned()),
                shed: false,
                prefix: path.to_owned(),
                exact: Some(path.to_owned()),
                rewrite: None,
                settings: None,
            })
        };
        Ok(Self {
            probes: [
                builtin("livez", "/livez", Handler::Livez),
                builtin("readyz", "/readyz", Handler::Readyz),
            ],
            exact_hosts,
            wildcard_hosts,
            any_host,
            fallback: builtin("unmatched", "", Handler::NotFound),
            groups,
            serves_app: settings.routes.iter().any(|r| r.app),
            proxy: settings.proxy.clone(),
        })
    }

    /// Whether some route hands requests to the app.
    pub fn serves_app(&self) -> bool {
        self.serves_app
    }

    /// Whether any route matches on the host (else the host need not be looked at).
    pub fn matches_hosts(&self) -> bool {
        !self.exact_hosts.is_empty() || !self.wildcard_hosts.is_empty()
    }

    /// The route for a request to `host` (without port; `None` when the request named
    /// none) and `path`.
    pub fn route<'a>(&'a self, host: Option<&str>, path: &str) -> &'a Arc<Route> {
        fn first<'r>(routes: &'r [Arc<Route>], path: &str) -> Option<&'r Arc<Route>> {
            routes.iter().find(|r| r.matches(path))
        }
        let find = |routes: &'a [Arc<Route>]| first(routes, path);
        if let Some(probe) = find(&self.probes) {
            return probe;
        }
        if let Some(host) = host.filter(|_| self.matches_hosts()) {
            let host = host.to_ascii_lowercase();
            let by_host = self.exact_hosts.get(&host).and_then(|r| find(r));
            let by_wildcard = || {
                self.wildcard_hosts
                    .iter()
                    .filter(|(suffix, _)| {
                        host.ends_with(suffix.as_str()) && host.len() > suffix.len()
                    })
                    .find_map(|(_, r)| find(r))
            };
            if let Some(route) = by_host.or_else(by_wildcard) {
                return route;
            }
        }
        find(&self.any_host).unwrap_or(&self.fallback)
    }

    /// The configured routes, in matching order: exact hosts, wildcards, any host.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        let mut hosts: Vec<(&String, &Vec<Arc<Route>>)> = self.exact_hosts.iter().collect();
        hosts.sort_by_key(|(h, _)| *h);
        hosts
            .into_iter()
            .flat_map(|(_, r)| r.iter())
            .chain(self.wildcard_hosts.iter().flat_map(|(_, r)| r.iter()))
            .chain(self.any_host.iter())
            .map(Arc::as_ref)
    }

    /// The route named `name`.
    pub fn route_named(&self, name: &str) -> Option<&Route> {
        self.routes().find(|r| r.name == name)
    }

    fn handler_of(&self, name: &str) -> Option<&Handler> {
        self.route_named(name).map(|r| &r.handler)
    }

    /// The upstream groups, by name.
    pub fn groups(&self) -> &BTreeMap<String, Arc<Group>> {
        &self.groups
    }

    /// Starts the groups' background work (health checks, name resolution); groups
    /// taken over from the previous table keep theirs running.
    pub fn start_groups(&self) {
        self.groups.values().for_each(Group::start);
    }

    /// Sets the gauges kept off the request path.
    pub fn record_gauges(&self) {
        self.groups.values().for_each(|g| g.record_gauges());
    }
}

#[cfg(test)]
mod tests {
    use tiergate_config::UpstreamSettings;

    use super::*;

    fn router(routes: Vec<RouteSettings>) -> Router {
        let mut settings = Settings::for_tests();
        settings.routes = routes;
        settings.upstreams = vec![
            UpstreamSettings::new("web", &["127.0.0.1:1"]),
            UpstreamSettings::new("api", &["127.0.0.1:2"]),
        ];
        Router::new(&settings, None).unwrap()
    }

    fn on_host(host: &str, route: RouteSettings) -> RouteSettings {
        RouteSettings {
            host: Some(host.to_owned()),
            ..route
        }
    }

    #[test]
    fn default_paths_match_whole_segments() {
        let router = Router::new(&Settings::for_tests(), None).unwrap();
        let name = |p| router.route(None, p).name.as_str();
        assert_eq!(name("/items"), "items");
        assert_eq!(name("/items/42"), "items");
        assert_eq!(name("/itemsx"), "unmatched");
        assert_eq!(name("/health"), "health");
        assert_eq!(name("/health/x"), "unmatched");
        assert_eq!(name("/livez"), "livez");
        assert_eq!(name("/"), "unmatched");
        assert!(router.route(None, "/items").shed);
        assert!(!router.route(None, "/health").shed);
    }

    #[test]
    fn longest_prefix_wins_and_root_catches_the_rest() {
        let router = router(vec![
            RouteSettings::upstream("site", "/", "web"),
            RouteSettings::upstream("api", "/api", "api"),
            RouteSettings::upstream("api-v2", "/api/v2/", "api"),
        ]);
        let name = |p| router.route(None, p).name.as_str();
        assert_eq!(name("/"), "site");
        assert_eq!(name("/apix"), "site");
        assert_eq!(name("/api"), "api");
        assert_eq!(name("/api/v1/x"), "api");
        assert_eq!(name("/api/v2"), "api-v2");
        assert_eq!(name("/api/v2/x"), "api-v2");
        assert_eq!(name("/readyz"), "readyz", "probes are always served");
    }

    #[test]
    fn exact_hosts_beat_wildcards_beat_any_host() {
        let router = router(vec![
            RouteSettings::upstream("any", "/", "web"),
            on_host("*.example.com", RouteSettings::upstream("wild", "/", "api")),
            on_host(
                "*.eu.example.com",
                RouteSettings::upstream("wild-eu", "/", "api"),
            ),
            on_host(
                "api.example.com",
                RouteSettings::upstream("exact", "/v1", "api"),
            ),
        ]);
        let name = |h, p| router.route(Some(h), p).name.as_str();
        assert_eq!(name("API.Example.com", "/v1/x"), "exact");
        assert_eq!(
            name("api.example.com", "/other"),
            "wild",
            "falls through by path"
        );
        assert_eq!(name("x.eu.example.com", "/"), "wild-eu");
        assert_eq!(name("x.example.com", "/"), "wild");
        assert_eq!(name("example.com", "/"), "any", "a wildcard needs a label");
        assert_eq!(router.route(None, "/").name, "any");
    }

    #[test]
    fn unchanged_groups_are_taken_over_by_a_reload() {
        let mut settings = Settings::for_tests();
        settings.upstreams = vec![
            UpstreamSettings::new("same", &["127.0.0.1:1"]),
            UpstreamSettings::new("changed", &["127.0.0.1:2"]),
        ];
        let old = Router::new(&settings, None).unwrap();
        settings.upstreams[1].targets[0] =
            tiergate_config::TargetSettings::Address("127.0.0.1:3".into());
        let new = Router::new(&settings, Some(&old)).unwrap();
        assert!(Arc::ptr_eq(&old.groups["same"], &new.groups["same"]));
        assert!(!Arc::ptr_eq(&old.groups["changed"], &new.groups["changed"]));
    }
}
