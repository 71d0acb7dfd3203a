//! Configuration reload without a restart, on SIGHUP and `POST /admin/reload`.
//!
//! The file (and environment) is loaded and validated as at start, and the route table
//! compiled from it; only then is it put in force, atomically. A configuration that
//! fails at any step is refused whole and the running table keeps serving. What a reload
//! changes: `routes`, `upstreams` and `proxy`. Other sections (listeners, database,
//! cache…) take effect at the next start; a reload that changes them says so.

use std::sync::{Arc, Mutex, PoisonError};

use tiergate_config::{ConfigError, Settings};

use crate::router::{Router, RouterError};
use crate::service::Gateway;

/// Where a reload reads the configuration from: the same file and environment as the
/// start.
#[derive(Clone)]
pub struct ConfigSource(Arc<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>);

impl ConfigSource {
    /// A source that calls `load` for each reload.
    pub fn new(load: impl Fn() -> Result<Settings, ConfigError> + Send + Sync + 'static) -> Self {
        Self(Arc::new(load))
    }
}

impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigSource")
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration does not load or validate.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The route table cannot be built from it.
    #[error(transparent)]
    Table(#[from] RouterError),
}

/// What a reload did.
#[derive(Debug, serde::Serialize)]
pub struct Reloaded {
    /// Routes in the new table.
    pub routes: usize,
    /// Upstream groups in the new table.
    pub groups: usize,
    /// Sections that changed but take effect only at the next start.
    pub restart_needed: Vec<String>,
}

/// Reloads the route table of one gateway.
#[derive(Debug)]
pub(crate) struct Reloader {
    source: ConfigSource,
    gateway: Gateway,
    /// The settings last put in force; also serializes reloads.
    running: Mutex<Settings>,
}

/// The sections a reload puts in force.
const RELOADED: [&str; 3] = ["routes", "upstreams", "proxy"];

impl Reloader {
    pub(crate) fn new(source: ConfigSource, gateway: Gateway, running: Settings) -> Self {
        Self {
            source,
            gateway,
            running: Mutex::new(running),
        }
    }

    /// Loads, validates and compiles the configuration, then puts it in force.
    pub(crate) fn reload(&self, why: &str) -> Result<Reloaded, ReloadError> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let result = (self.source.0)()
            .map_err(ReloadError::from)
            .and_then(|settings| {
                let router = Router::new(&settings, Some(&self.gateway.router()))?;
                Ok((settings, router))
            });
        let (settings, router) = match result {
            Ok(ok) => ok,
            Err(error) => {
                tracing::error!(why, %error, "Configuration reload refused; the running routes keep serving.");
                return Err(error);
            }
        };
        let restart_needed = changed_sections(&running, &settings);
        let reloaded = Reloaded {
            routes: router.routes().count(),
            groups: router.groups().len(),
            restart_needed,
        };
        self.gateway.swap_router(router);
        *running = settings;
        tracing::info!(
            why,
            routes = reloaded.routes,
            groups = reloaded.groups,
            restart_needed = ?reloaded.restart_needed,
            "Configuration reloaded."
        );
        Ok(reloaded)
    }
}

/// The top-level sections other than the reloaded ones whose (redacted) values differ.
fn changed_sections(old: &Settings, new: &Settings) -> Vec<String> {
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    new.iter()
        .filter(|(key, value)| !RELOADED.contains(&key.as_str()) && old.get(*key) != Some(value))
        .map(|(key, _)| key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sections_a_reload_cannot_apply_are_reported() {
        let old = Settings::for_tests();
        let mut new = old.clone();
        new.proxy.trusted_hops = 2;
        new.routes.clear();
        assert!(changed_sections(&old, &new).is_empty());
        new.cache.l1_ttl *= 2;
        new.http.max_in_flight += 1;
        assert_eq!(changed_sections(&old, &new), ["cache", "http"]);
    }
}
