//! Routes: which handler answers a request, decided from its path.
//!
//! The table is compiled once from the settings and shared read-only by every
//! connection; matching is a scan of a few path prefixes, longest first. Each route has
//! a bounded `name` for logs and metrics (never the raw path).

use crate::metrics::RouteMetrics;

/// What answers a matched request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The in-process application (`app-core`).
    App,
    /// Liveness: the process runs and answers.
    Livez,
    /// Readiness: the app can serve (database prepared, not draining).
    Readyz,
    /// Nothing matched: a JSON 404.
    NotFound,
}

/// One entry of the table.
#[derive(Debug)]
pub struct Route {
    /// Bounded label for logs and metrics.
    pub name: &'static str,
    /// What answers.
    pub target: Target,
    /// Request metrics, registered once.
    pub metrics: RouteMetrics,
    /// Counts against `http.max_in_flight` (load shedding). Probes and `/health` do not:
    /// shedding the load balancer's health checks under load would pull healthy tasks
    /// out of service and shift their load onto the rest.
    pub shed: bool,
    prefix: &'static str,
    /// Whether only the exact path matches, or also anything below `prefix/`.
    exact: bool,
}

/// The compiled route table.
#[derive(Debug)]
pub struct Router {
    /// Longest prefix first, so the first match is the most specific.
    routes: Vec<Route>,
    fallback: Route,
}

impl Router {
    /// The built-in table: the items API and `/health` to the app, the probes, 404 else.
    pub fn new() -> Self {
        let route = |name, prefix, exact, target| Route {
            name,
            target,
            metrics: RouteMetrics::new(name),
            shed: false,
            prefix,
            exact,
        };
        let mut routes = vec![
            Route {
                shed: true,
                ..route("items", "/items", false, Target::App)
            },
            route("health", "/health", true, Target::App),
            route("livez", "/livez", true, Target::Livez),
            route("readyz", "/readyz", true, Target::Readyz),
        ];
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self {
            routes,
            fallback: route("unmatched", "", false, Target::NotFound),
        }
    }

    /// The route for `path`.
    pub fn route(&self, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| match path.strip_prefix(r.prefix) {
                Some(rest) => rest.is_empty() || (!r.exact && rest.starts_with('/')),
                None => false,
            })
            .unwrap_or(&self.fallback)
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_whole_segments() {
        let router = Router::new();
        let name = |p| router.route(p).name;
        assert_eq!(name("/items"), "items");
        assert_eq!(name("/items/42"), "items");
        assert_eq!(name("/itemsx"), "unmatched");
        assert_eq!(name("/health"), "health");
        assert_eq!(name("/health/x"), "unmatched");
        assert_eq!(name("/livez"), "livez");
        assert_eq!(name("/"), "unmatched");
    }
}
