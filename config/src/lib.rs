//! Typed, layered settings for Tiergate.
//!
//! [`load()`] builds [`Settings`] from three layers, each overriding the one before:
//!
//! 1. **Built-in defaults** ([`Settings::default`]): a local PostgreSQL and Redis, the public
//!    listener on `0.0.0.0:8080`, the admin listener on `127.0.0.1:9090`.
//! 2. **A TOML file** (optional; `tiergate --config FILE`). It names only what it changes;
//!    an unknown key is an error. See `config/examples/` for documented files.
//! 3. **The environment**, read through a [`Source`] so tests never touch the process's own:
//!    - conventional variables as ECS injects them: `DATABASE_URL`, `DATABASE_READER_URL`,
//!      `REDIS_URL`, `REDIS_HOST` + `REDIS_PORT`, `PORT`, `DEPLOYMENT_COLOR`, and
//!      `DB_HOST` + `DB_PORT`/`DB_USER`/`DB_PASSWORD`/`DB_NAME` (composed into a URL);
//!    - then `TIERGATE_` + key path with `__` for nesting, in any case, for every key:
//!      `TIERGATE_LISTEN__ADMIN=127.0.0.1:9191`, `TIERGATE_CACHE__L2_TTL=10s`. These win over
//!      the conventional ones. Names without `__` (`TIERGATE_CONFIG`) are left to the binary.
//!
//!    Every variable may instead be given as `NAME_FILE`, the path of a file holding the
//!    value (one trailing newline trimmed), which is how secrets are mounted as files.
//!
//! The merged result is typed section by section and then validated. Every problem found
//! along the way, across all layers, is collected into one [`ConfigError`], so a bad
//! deployment fails once with the full list rather than once per fix.
//!
//! Secrets ([`Secret`]) never appear in `Debug`, `Display`, serialized output
//! ([`Settings::to_redacted_toml`]) or any problem message.
//!
//! # Layout
//!
//! - `settings.rs`: [`Settings`] and its sections, with their defaults.
//! - `routes.rs`: the reverse proxy's routes, upstream groups and admin access.
//! - `secret.rs`: [`Secret`] and its redaction.
//! - `source.rs`: [`Source`], [`ProcessEnv`].
//! - `load.rs`: [`load()`]: merging the layers, reading variables, typing.
//! - `validate.rs`: range and format checks, one function per settings section.
//!
//! Unit tests sit next to the code; `tests/load.rs` loads settings through the public API
//! only (files, variables, layering, every problem at once, no secret in any output).

mod load;
mod routes;
mod secret;
mod settings;
mod source;
mod validate;

use std::fmt;

pub use load::{load, load_text};
pub use routes::{
    AdminSettings, Balance, HealthCheckSettings, HostHeader, OutlierSettings, ProxySettings,
    RouteSettings, TargetSettings, UpstreamProtocol, UpstreamSettings,
};
pub use secret::Secret;
pub use settings::{
    CacheSettings, CertificateSettings, DatabaseSettings, DeploymentSettings, FleetSettings,
    HealthSettings, HttpSettings, ListenSettings, LogFormat, LogSettings, RedisSettings,
    RuntimeSettings, Settings, ShutdownSettings, TlsSettings, TlsVersion, TraceSettings,
};
pub use source::{ProcessEnv, Source};

/// The configuration is invalid; `problems` lists every reason, one line each, each naming
/// the key, file or variable at fault. No problem contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:{}", ProblemLines(.problems))]
pub struct ConfigError {
    /// One human-readable line per problem, in the order found: file, environment, types,
    /// ranges.
    pub problems: Vec<String>,
}

impl ConfigError {
    /// Exit status for a configuration error: `EX_CONFIG` from BSD `sysexits.h`. A distinct
    /// status lets a deployment circuit breaker tell "bad config" from a crash.
    pub const EXIT_CODE: u8 = 78;
}

/// Renders problems as `\n  - problem` lines under the error's heading.
struct ProblemLines<'a>(&'a [String]);

impl fmt::Display for ProblemLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl Settings {
    /// Checks ranges and formats, as [`load()`] does after typing. For settings built in code.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] listing every check that failed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems: Vec<String> = validate::check(self)
            .into_iter()
            .map(|invalid| {
                let key = invalid.keys.first().copied().unwrap_or_default();
                format!("{key}: {}", invalid.message)
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}
