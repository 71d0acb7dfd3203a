//! The Tiergate server: listeners, the request path, the admin endpoints.
//!
//! It hosts the items application (`app-core`) in process and knows nothing of items:
//! only that a route can target "the app".
//!
//! # Layout
//! - [`listener`]: accept loops, hyper connections, connection limits and timeouts,
//!   draining.
//! - [`tls`]: certificates for the HTTPS listener, SNI, hot reload.
//! - [`router`]: the route table (host + path → app, upstream group, split or
//!   redirect, with a bounded route name).
//! - [`path`]: request paths normalised before routing (dot segments, escapes).
//! - [`service`]: the request path as named steps (id, normalise, route, answer,
//!   record).
//! - `shed`: the in-flight bounds of the app and of each upstream group.
//! - [`error`]: the gateway's errors by the side that failed, and the one place where
//!   they become responses.
//! - [`response`]: the body type every listener serves, and the JSON answers the
//!   gateway makes itself.
//! - [`proxy`]: upstream groups, balancing, health, splits, forwarding.
//! - [`reload`]: configuration reload on SIGHUP and through the admin API.
//! - [`control`]: the fleet commands of the CLI (`tiergate split …`, `tiergate fleet`).
//! - [`admin`]: `/metrics`, `/livez`, `/readyz` and `/admin/*` on the admin listener.
//! - [`metrics`]: the Prometheus recorder and per-route handles.
//! - [`access_log`]: the access lines, rendered on the request path and written by a
//!   thread of their own.
//! - [`otlp`]: the optional export of spans to an OpenTelemetry collector.
//! - [`shutdown`]: signal handling.
//! - [`healthcheck`]: the `tiergate healthcheck` probe client.
//! - `trace`: W3C trace context, continued or started, passed upstream.

pub mod access_log;
pub mod admin;
pub mod control;
pub mod error;
pub mod healthcheck;
pub mod listener;
pub mod metrics;
pub mod otlp;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod response;
pub mod router;
pub mod service;
mod shed;
pub mod shutdown;
mod timer;
pub mod tls;
mod trace;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use app_core::App;
use app_core::health::BuildInfo;
use futures_util::FutureExt;
use futures_util::future::Either;
use metrics_exporter_prometheus::PrometheusHandle;
use tiergate_config::Settings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::error::GatewayError;
use crate::listener::{Drain, DrainControl, Limits, Peer, Phase, Transport};
use crate::otlp::SpanExport;
use crate::reload::{ConfigSource, Reloader};
use crate::response::ResponseBody;
use crate::router::Router;
use crate::service::Gateway;
use crate::tls::CertStore;

/// What `/health` reports about this build.
pub const BUILD: BuildInfo = BuildInfo {
    version: build_info::VERSION,
    commit: build_info::COMMIT,
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
    https: Option<Https>,
    limits: Limits,
    /// The HTTPS port to send plain requests to (`listen.redirect_to_https`).
    redirect_to: Option<u16>,
    gateway: Gateway,
    app: App,
    metrics: PrometheusHandle,
    /// Written until every connection is done, then closed.
    access_log: Option<AccessLog>,
    /// Spans exported until every connection is done, then flushed.
    spans: Option<SpanExport>,
    /// As started: the shutdown budget, the admin token, and what a reload compares
    /// against.
    settings: Settings,
    config_source: ConfigSource,
}

/// The HTTPS listener and what it serves with.
#[derive(Debug)]
struct Https {
    listener: TcpListener,
    store: Arc<CertStore>,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    reload_interval: Duration,
}

impl Server {
    /// Binds the public, HTTPS (when set) and admin listeners, loads the certificates and
    /// builds the app (no backend contacted).
    ///
    /// # Errors
    /// A port cannot be bound, a certificate cannot be loaded, or a backend URL does not
    /// parse.
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
        let https = match settings.listen.https {
            Some(addr) => {
                let store = Arc::new(CertStore::load(&settings.tls).context("tls")?);
                let config = tls::server_config(store.clone(), settings.tls.min_version)?;
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (listen.https)"))?;
                Some(Https {
                    listener,
                    store,
                    config,
                    handshake_timeout: settings.tls.handshake_timeout,
                    reload_interval: settings.tls.reload_interval,
                })
            }
            None => None,
        };
        let redirect_to = match &https {
            Some(https) if settings.listen.redirect_to_https => {
                Some(https.listener.local_addr()?.port())
            }
            _ => None,
        };
        let app = App::new(settings, BUILD)?;
        let router = Router::new(settings, None)?;
        // Decided once: the log filter (`RUST_LOG`) is set before the server starts.
        let access_log = tracing::enabled!(target: "access", tracing::Level::INFO)
            .then(|| AccessLog::stdout(settings.log.access_sample))
            .transpose()
            .context("cannot start the access log's writer")?;
        let spans = SpanExport::start(&settings.trace).context("trace.otlp_endpoint")?;
        let gateway = Gateway::new(
            router,
            app.clone(),
            &settings.http,
            access_log.clone(),
            spans.clone(),
        );
        let fixed = settings.clone();
        Ok(Self {
            http,
            admin,
            https,
            limits: Limits::new(settings),
            redirect_to,
            gateway,
            app,
            metrics,
            access_log,
            spans,
            settings: settings.clone(),
            config_source: ConfigSource::new(move || Ok(fixed.clone())),
        })
    }

    /// Where reloads (SIGHUP, `POST /admin/reload`) read the configuration; without
    /// one, a reload puts the start-up settings in force again.
    #[must_use]
    pub fn with_config_source(mut self, source: ConfigSource) -> Self {
        self.config_source = source;
        self
    }

    /// The gateway serving the public listeners (its route table, for tests).
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// The bound public address.
    ///
    /// # Errors
    /// The OS cannot tell (practically never).
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// The bound HTTPS address, when `listen.https` is set.
    ///
    /// # Errors
    /// The OS cannot tell (practically never).
    pub fn https_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.https
            .as_ref()
            .map(|h| h.listener.local_addr())
            .transpose()
    }

    /// The HTTPS listener's certificates, when `listen.https` is set.
    pub fn cert_store(&self) -> Option<Arc<CertStore>> {
        self.https.as_ref().map(|h| h.store.clone())
    }

    /// The bound admin address.
    ///
    /// # Errors
    /// The OS cannot tell (practically never).
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` resolves, then shuts down as `shutdown.*` says: readiness
    /// turns 503 at once; for `drain_delay` every listener keeps serving but sends every
    /// client elsewhere (`Connection: close`, GOAWAY); then they close and in-flight
    /// requests finish until `timeout` (counted from the signal); then Redis is closed.
    ///
    /// # Errors
    /// Never at present; the signature leaves room for fatal serving errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            http,
            admin,
            https,
            limits,
            redirect_to,
            gateway,
            app,
            metrics,
            access_log,
            spans,
            settings,
            config_source,
        } = self;
        let https_addr = https
            .as_ref()
            .map(|h| h.listener.local_addr())
            .transpose()?;
        tracing::info!(
            http = %http.local_addr()?,
            https = https_addr.map(|a| a.to_string()),
            admin = %admin.local_addr()?,
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            version = BUILD.version,
            commit = BUILD.commit,
            "Listening."
        );
        gateway.start();
        let budget = settings.shutdown.clone();
        let reloader = Arc::new(Reloader::new(
            config_source,
            gateway.clone(),
            settings.clone(),
        ));
        let hangup = tokio::spawn(reload_on_hangup(reloader.clone())?);
        let admin_service = Arc::new(Admin {
            app: app.clone(),
            gateway: gateway.clone(),
            metrics,
            token: Admin::token_digest(settings.admin.token.as_ref()),
            guard_reads: !settings.listen.admin.ip().is_loopback(),
            reloader,
        });
        let (control, drain) = DrainControl::new();
        let tunnels = gateway.tunnels().clone();

        // `Gateway::handle` starts on the request at once and returns a future that owns
        // what it needs: no async layer around it here.
        let https_gateway = gateway.clone();
        let https_handler = move |req, peer| https_gateway.handle(req, peer);
        let plain_handler = move |req: http::Request<hyper::body::Incoming>, peer| {
            match redirect_to.and_then(|port| service::redirect_to_https(&req, port)) {
                // Boxed, so the future hyper moves around stays the gateway's size.
                Some(answer) => {
                    let rsp = Box::new(answer.unwrap_or_else(GatewayError::into_response));
                    Either::Left(std::future::ready(rsp).map(|rsp| *rsp))
                }
                None => Either::Right(gateway.handle(req, peer)),
            }
        };
        let secure = https
            .map(|https| https.serve(limits.clone(), https_handler, drain.clone()))
            .transpose()?;
        let public = tokio::spawn(listener::serve(
            "http",
            http,
            Transport::Plain,
            limits.clone(),
            plain_handler,
            drain.clone(),
        ));
        let admin = tokio::spawn(listener::serve(
            "admin",
            admin,
            Transport::Plain,
            limits,
            move |req, _peer| {
                let admin = admin_service.clone();
                async move { admin.handle(req).await }
            },
            drain,
        ));

        shutdown.await;
        let deadline = Instant::now() + budget.timeout;
        app.begin_shutdown();
        control.enter(Phase::Draining);
        tracing::info!(
            drain_delay_ms = budget.drain_delay.as_millis(),
            timeout_ms = budget.timeout.as_millis(),
            "Draining: readiness is 503; still serving, with Connection: close."
        );
        tokio::time::sleep(budget.drain_delay).await;
        control.enter(Phase::Closing { deadline });
        let _ = tokio::join!(public, admin);
        if let Some((serve, watcher)) = secure {
            let _ = serve.await;
            watcher.abort();
        }
        tunnels.close_by(deadline).await;
        hangup.abort();
        // Every request has its answer: its line is in a shard, or dropped and counted.
        if let Some(log) = access_log {
            let _ = tokio::task::spawn_blocking(move || log.close()).await;
        }
        // The last spans, if the collector takes them soon: exit is not held up for it.
        if let Some(spans) = spans {
            let _ = tokio::time::timeout(CLOSE_LIMIT, spans.close()).await;
        }
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

impl Https {
    /// Serves the HTTPS listener with `handler`, and watches its certificate files for
    /// changes; returns both tasks.
    ///
    /// # Errors
    /// The certificate watcher cannot start.
    fn serve<H, Fut>(
        self,
        limits: Limits,
        handler: H,
        drain: Drain,
    ) -> std::io::Result<(JoinHandle<()>, JoinHandle<()>)>
    where
        H: Fn(http::Request<hyper::body::Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = http::Response<ResponseBody>> + Send + 'static,
    {
        let watcher = tokio::spawn(tls::watch(self.store, self.reload_interval)?);
        let serve = tokio::spawn(listener::serve(
            "https",
            self.listener,
            Transport::Tls {
                acceptor: tokio_rustls::TlsAcceptor::from(self.config),
                handshake_timeout: self.handshake_timeout,
            },
            limits,
            handler,
            drain,
        ));
        Ok((serve, watcher))
    }
}

/// Reloads the configuration on every SIGHUP. Installed whether or not there is anything
/// to reload: SIGHUP's default action would end the process.
///
/// # Errors
/// The SIGHUP handler cannot be installed.
fn reload_on_hangup(
    reloader: Arc<Reloader>,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(async move {
        while hangup.recv().await.is_some() {
            // Refusals are logged by the reloader.
            let _ = reloader.reload("SIGHUP");
        }
    })
}
