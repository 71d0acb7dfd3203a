//! The Tiergate server: listeners, the request path, the admin endpoints.
//!
//! It hosts the items application (`app-core`) in process and knows nothing of items:
//! only that a route can target "the app".
//!
//! # Layout
//! - [`listener`]: accept loops, hyper connections, draining.
//! - [`router`]: the route table (path → target, with a bounded route name).
//! - [`service`]: the request path as named steps (id, route, answer, record).
//! - [`admin`]: `/metrics`, `/livez`, `/readyz` on the admin listener.
//! - [`metrics`]: the Prometheus recorder and per-route handles.
//! - [`shutdown`]: signal handling.
//! - [`healthcheck`]: the `tiergate healthcheck` probe client.

pub mod admin;
pub mod healthcheck;
pub mod listener;
pub mod metrics;
pub mod router;
pub mod service;
pub mod shutdown;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use app_core::App;
use app_core::health::BuildInfo;
use metrics_exporter_prometheus::PrometheusHandle;
use tiergate_config::{Settings, ShutdownSettings};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::listener::{DrainControl, Phase};

use crate::router::Router;
use crate::service::Gateway;

/// What `/health` reports about this build.
pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("TIERGATE_COMMIT"),
};

/// Longest wait for Redis to say goodbye at exit: a dead Redis must not eat the time
/// left before the orchestrator's SIGKILL.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// A bound, not yet running server. Binding comes first so a port conflict fails at
/// once, before any backend is contacted; tests bind port 0 and read the addresses.
#[derive(Debug)]
pub struct Server {
    http: TcpListener,
    admin: TcpListener,
    gateway: Gateway,
    app: App,
    metrics: PrometheusHandle,
    shutdown: ShutdownSettings,
}

impl Server {
    /// Binds the public and admin listeners and builds the app (no backend contacted).
    ///
    /// # Errors
    /// A port cannot be bound, or a backend URL does not parse.
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let metrics = metrics::install()?;
        let http = TcpListener::bind(settings.listen.http)
            .await
            .with_context(|| format!("cannot listen on {} (listen.http)", settings.listen.http))?;
        let admin = TcpListener::bind(settings.listen.admin)
            .await
            .with_context(|| {
                format!("cannot listen on {} (listen.admin)", settings.listen.admin)
            })?;
        let app = App::new(settings, BUILD)?;
        let gateway = Gateway::new(Router::new(), app.clone(), &settings.http);
        Ok(Self {
            http,
            admin,
            gateway,
            app,
            metrics,
            shutdown: settings.shutdown.clone(),
        })
    }

    /// The bound public address.
    ///
    /// # Errors
    /// The OS cannot tell (practically never).
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// The bound admin address.
    ///
    /// # Errors
    /// The OS cannot tell (practically never).
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` resolves, then shuts down as `shutdown.*` says: readiness
    /// turns 503 at once; for `drain_delay` both listeners keep serving but send every
    /// client elsewhere (`Connection: close`, GOAWAY); then they close and in-flight
    /// requests finish until `timeout` (counted from the signal); then Redis is closed.
    ///
    /// # Errors
    /// Never at present; the signature leaves room for fatal serving errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            http,
            admin,
            gateway,
            app,
            metrics,
            shutdown: limits,
        } = self;
        tracing::info!(
            http = %http.local_addr()?,
            admin = %admin.local_addr()?,
            version = BUILD.version,
            commit = BUILD.commit,
            "Listening."
        );
        app.start();
        let (control, drain) = DrainControl::new();

        let public = tokio::spawn(listener::serve(
            "http",
            http,
            move |req| {
                let gateway = gateway.clone();
                async move { gateway.handle(req).await }
            },
            drain.clone(),
        ));
        let admin_app = app.clone();
        let admin = tokio::spawn(listener::serve(
            "admin",
            admin,
            move |req| {
                let rsp = admin::handle(&req, &admin_app, &metrics);
                async move { rsp }
            },
            drain,
        ));

        shutdown.await;
        let deadline = Instant::now() + limits.timeout;
        app.begin_shutdown();
        control.enter(Phase::Draining);
        tracing::info!(
            drain_delay_ms = limits.drain_delay.as_millis(),
            timeout_ms = limits.timeout.as_millis(),
            "Draining: readiness is 503; still serving, with Connection: close."
        );
        tokio::time::sleep(limits.drain_delay).await;
        control.enter(Phase::Closing { deadline });
        let _ = tokio::join!(public, admin);
        if tokio::time::timeout(CLOSE_LIMIT, app.close())
            .await
            .is_err()
        {
            tracing::warn!("Redis did not close in time; exiting anyway.");
        }
        tracing::info!("Stopped.");
        Ok(())
    }
}
