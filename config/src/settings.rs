//! The settings types and their built-in defaults.
//!
//! Every struct is `#[serde(default)]`, so a file or the environment names only what it
//! changes, and `#[serde(deny_unknown_fields)]`, so a misspelt key is an error rather than a
//! silently ignored line. Durations are human strings (`"1500ms"`, `"30s"`, `"2m"`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Secret;
use crate::routes::{AdminSettings, ProxySettings, RouteSettings, UpstreamSettings};

const MIB: u64 = 1024 * 1024;

/// Everything the binary can be configured with; see the crate docs for how it is loaded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Addresses to bind.
    pub listen: ListenSettings,
    /// Certificates and protocol settings of the HTTPS listener.
    pub tls: TlsSettings,
    /// PostgreSQL, the system of record.
    pub database: DatabaseSettings,
    /// Redis, the shared L2 cache and invalidation bus.
    pub redis: RedisSettings,
    /// Cache sizes and lifetimes.
    pub cache: CacheSettings,
    /// Per-request limits.
    pub http: HttpSettings,
    /// How `/health` judges the instance.
    pub health: HealthSettings,
    /// Facts about the deployment this instance belongs to.
    pub deployment: DeploymentSettings,
    /// Log output.
    pub log: LogSettings,
    /// Export of spans over OTLP.
    pub trace: TraceSettings,
    /// What happens between SIGTERM and exit.
    pub shutdown: ShutdownSettings,
    /// Access to the admin API.
    pub admin: AdminSettings,
    /// How requests are forwarded to upstream groups.
    pub proxy: ProxySettings,
    /// The threads that serve.
    pub runtime: RuntimeSettings,
    /// How the fleet's runtime routing state (docs/fleet.md) reaches this task.
    pub fleet: FleetSettings,
    /// The route table, most specific match first (see [`RouteSettings`]). Default:
    /// `/items` and `/health` to the app.
    pub routes: Vec<RouteSettings>,
    /// Upstream groups the routes forward to. Default none.
    pub upstreams: Vec<UpstreamSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: ListenSettings::default(),
            tls: TlsSettings::default(),
            database: DatabaseSettings::default(),
            redis: RedisSettings::default(),
            cache: CacheSettings::default(),
            http: HttpSettings::default(),
            health: HealthSettings::default(),
            deployment: DeploymentSettings::default(),
            log: LogSettings::default(),
            trace: TraceSettings::default(),
            shutdown: ShutdownSettings::default(),
            admin: AdminSettings::default(),
            proxy: ProxySettings::default(),
            runtime: RuntimeSettings::default(),
            fleet: FleetSettings::default(),
            routes: RouteSettings::defaults(),
            upstreams: Vec::new(),
        }
    }
}

/// How the fleet's runtime routing state reaches this task (docs/fleet.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSettings {
    /// How often the task asks PostgreSQL for the latest revision, and refreshes its
    /// heartbeat: the bound on how long a change lost on the Redis bus takes to arrive.
    /// 10ms to 60s. Default 1s.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a task's heartbeat keeps it in the fleet: a task not heard of for this
    /// long is taken for dead (`GET /admin/fleet`, `?wait`). At least twice
    /// `poll_interval`. Default 5s.
    #[serde(with = "humantime_serde")]
    pub task_ttl: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            task_ttl: Duration::from_secs(5),
        }
    }
}

/// The threads that serve.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Threads that run the listeners, the app and the proxy; `0` (default): one per CPU
    /// the process may use, its affinity mask and cgroup quota counted (a 1-vCPU Fargate
    /// task gets one). With one thread the runtime is tokio's single-threaded scheduler,
    /// which spares every request the work-stealing scheduler's bookkeeping.
    pub worker_threads: usize,
}

/// Addresses to bind.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSettings {
    /// Public HTTP listener (the ALB's target). Default `0.0.0.0:8080`.
    pub http: SocketAddr,
    /// Admin listener: `/metrics`, `/livez`, `/readyz`, `/admin/*`. Must never share the
    /// public port. Default `127.0.0.1:9090`.
    pub admin: SocketAddr,
    /// Public HTTPS listener (same routes as `http`), or `None` for none. Without a
    /// configured certificate it serves a self-signed one for `localhost`. Default `None`.
    pub https: Option<SocketAddr>,
    /// Most connections open at once on each listener. At the cap the listener stops
    /// accepting (new connections wait in the kernel's backlog) until one closes.
    /// Default 10000.
    pub max_connections: usize,
    /// With `https` set: answer every request on `http` with a 308 to the same URL over
    /// HTTPS, except the probe paths (`/health`, `/livez`, `/readyz`) a load balancer
    /// checks over plain HTTP. Default `false`.
    pub redirect_to_https: bool,
}

impl Default for ListenSettings {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9090)),
            https: None,
            max_connections: 10_000,
            redirect_to_https: false,
        }
    }
}

/// Certificates and protocol settings of the HTTPS listener (`listen.https`).
///
/// `cert` + `key` is the default certificate, served when the client's SNI names none of
/// `certificates` (or sends no SNI). Without `cert`, the first of `certificates` is the
/// default. With neither, a self-signed certificate for `localhost` is made at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM file with the default certificate chain, leaf first. Default `None`.
    pub cert: Option<PathBuf>,
    /// PEM file with the default certificate's private key (PKCS#8, PKCS#1 or SEC1).
    /// Default `None`.
    pub key: Option<PathBuf>,
    /// More certificates, chosen by the client's SNI. Default none.
    pub certificates: Vec<CertificateSettings>,
    /// Oldest TLS version accepted: `"1.2"` or `"1.3"`. Default `"1.2"`.
    pub min_version: TlsVersion,
    /// Limit for a TLS handshake, from accept to the first byte of HTTP. Default 10s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often the certificate files are checked for changes (`0s`: only on SIGHUP).
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            certificates: Vec::new(),
            min_version: TlsVersion::V1_2,
            handshake_timeout: Duration::from_secs(10),
            reload_interval: Duration::from_secs(1),
        }
    }
}

/// One certificate chosen by SNI.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSettings {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with its private key.
    pub key: PathBuf,
    /// Host names it serves: exact (`api.example.com`) or one leading wildcard label
    /// (`*.example.com`). Each must be covered by the certificate.
    pub server_names: Vec<String>,
}

/// A TLS protocol version, written `"1.2"` or `"1.3"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// PostgreSQL connection pool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Writer endpoint, `postgres://` or `postgresql://`.
    /// Default `postgres://postgres@127.0.0.1:5432/tiergate`.
    pub url: Secret,
    /// Reader endpoint (an RDS/Aurora replica) for cache-miss reads; `None` sends reads to
    /// the writer. Default `None`.
    pub reader_url: Option<Secret>,
    /// How far the reader may be behind the writer and still answer reads. A miss waits
    /// at most this long for the reader to replay what the writer had committed when the
    /// read began, then reads the writer; while the measured lag is above it, reads go
    /// to the writer at once. 1ms to 1m. Default 500ms.
    #[serde(with = "humantime_serde")]
    pub reader_max_lag: Duration,
    /// Connections per pool (each of writer and reader). Default 16.
    pub pool_max_size: u32,
    /// How long a request waits for a pooled connection before it gets a 503. Kept short
    /// (100ms..=10s) so a saturated pool sheds load instead of queueing for bb8's 30 s.
    /// Default 1500ms.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// TCP + TLS + startup handshake limit for one new connection. Default 5s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// PostgreSQL `statement_timeout` set on every connection. Default 5s.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Apply pending migrations at start. Default `true`.
    pub migrate_on_start: bool,
    /// PEM bundle of the CAs that sign the server's certificate (the RDS bundle), for
    /// `sslmode=verify-ca` and `verify-full` in the URLs. Default `None`.
    pub ca_file: Option<PathBuf>,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/tiergate"),
            reader_url: None,
            reader_max_lag: Duration::from_millis(500),
            pool_max_size: 16,
            checkout_timeout: Duration::from_millis(1500),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            migrate_on_start: true,
            ca_file: None,
        }
    }
}

/// Redis connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS). Default `redis://127.0.0.1:6379`.
    pub url: Secret,
    /// Prefix of every key this deployment writes, so several deployments (or tests) can
    /// share one Redis. Non-empty, no whitespace. Default `tiergate`.
    pub key_prefix: String,
    /// Limit for one command; past it the lookup counts as a cache miss. Default 250ms.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Limit for establishing a connection. Default 2s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Consecutive failed commands that open the circuit breaker: Redis is then skipped
    /// (no timeouts piling up) until a probe succeeds. At least 1. Default 5.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe is let through. Default 5s.
    #[serde(with = "humantime_serde")]
    pub breaker_open: Duration,
    /// PEM bundle of the CAs trusted for `rediss://`; `None` trusts the system's roots.
    /// Default `None`.
    pub ca_file: Option<PathBuf>,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("redis://127.0.0.1:6379"),
            key_prefix: "tiergate".to_owned(),
            command_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(2),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(5),
            ca_file: None,
        }
    }
}

/// Cache sizes and lifetimes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Bound of the in-process L1 cache, in bytes of cached JSON (at least 1 MiB): items
    /// and list pages together, pages taking at most a quarter. Default 64 MiB.
    pub l1_max_bytes: u64,
    /// Lifetime of an L1 entry (at least 1s). Default 5s.
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    /// Lifetime of an L2 (Redis) entry (at least 1s), ±10 % jitter. Default 30s.
    #[serde(with = "humantime_serde")]
    pub l2_ttl: Duration,
    /// Lifetime of "no such id" in Redis (L1 keeps it a fifth of `l1_ttl`). Default 5s.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Age after which an L1 hit is still served but refreshed once in the background,
    /// so hot keys never all expire at once; `0s` turns it off. Capped at `l1_ttl`.
    /// Default 4s.
    #[serde(with = "humantime_serde")]
    pub refresh_after: Duration,
    /// How long past `l1_ttl` an entry may still be served while PostgreSQL is down.
    /// Default 60s.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
    /// L1 lifetime of entries filled while invalidations may be lost (the subscriber is
    /// reconnecting): staleness stays short until the channel is healthy. At least
    /// 100ms, capped at `l1_ttl`. Default 2s.
    #[serde(with = "humantime_serde")]
    pub degraded_l1_ttl: Duration,
    /// Reads of a key written (anywhere) this recently go to the writer, not the reader
    /// replica, which may lag. Default 5s.
    #[serde(with = "humantime_serde")]
    pub recent_write_window: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            l1_max_bytes: 64 * MIB,
            l1_ttl: Duration::from_secs(5),
            l2_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            refresh_after: Duration::from_secs(4),
            max_stale: Duration::from_secs(60),
            degraded_l1_ttl: Duration::from_secs(2),
            recent_write_window: Duration::from_secs(5),
        }
    }
}

/// Per-request limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Largest request body accepted; larger ones get 413. 1 byte to 16 MiB. Default 65536.
    pub max_body_bytes: u64,
    /// Deadline for a whole request. Default 30s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests the app works on at once; one more gets 503 with `Retry-After` at once
    /// instead of queueing behind the others (load shedding). A request counts from the
    /// moment its body is in, not while it arrives. Proxied requests count against their
    /// group's own `max_in_flight`, probes and `/health` against nothing. At least 1.
    /// Default 1024.
    pub max_in_flight: u32,
    /// Limit for receiving a whole request body for the app, from its head to its last
    /// byte; past it the client gets 408 and the connection closes. The body is read
    /// before the request takes its place under `max_in_flight`, so a slow sender holds
    /// only its own connection. More than 0s. Default 10s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Limit for receiving a request head, from its first byte to its blank line (against
    /// slowloris). It never runs while a keep-alive connection is idle. Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may sit idle between requests. Longer than the
    /// ALB's 60 s idle timeout, so the ALB always closes first. Default 75s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest HTTP/1.1 request head (request line and headers); larger gets 431.
    /// 8 KiB to 1 MiB. Default 16384.
    pub max_header_bytes: usize,
    /// Most header lines in an HTTP/1.1 request; more gets 431. Default 100.
    pub max_headers: usize,
    /// HTTP/2: most concurrent streams per connection. Default 200.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: largest header list (decoded) per request. Default 16384.
    pub h2_max_header_list_bytes: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 65536,
            request_timeout: Duration::from_secs(30),
            max_in_flight: 1024,
            body_read_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_header_bytes: 16384,
            max_headers: 100,
            h2_max_concurrent_streams: 200,
            h2_max_header_list_bytes: 16384,
        }
    }
}

/// What happens between the first SIGTERM (or SIGINT) and exit.
///
/// Timeline from the signal: readiness turns 503 at once; for `drain_delay` the listeners
/// keep serving, but every HTTP/1.1 response says `Connection: close` and HTTP/2
/// connections get GOAWAY, so clients and the load balancer move to other tasks; then the
/// listeners close and in-flight requests finish; at `timeout` whatever is left is dropped.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// How long to keep accepting after the signal, for the load balancer to notice the
    /// failing readiness and stop routing here. Less than `timeout`. Default 5s.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// The whole budget from the signal to exit: past it, open connections are dropped.
    /// Keep it under the orchestrator's kill deadline (Fargate `stopTimeout`, 30 s by
    /// default). Default 25s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(25),
        }
    }
}

/// How `/health` judges the instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Answer 503 when Redis is down. Default `false`: the app still serves from L1 and
    /// PostgreSQL, and pulling every task out of the load balancer because the cache blinked
    /// would turn a cache outage into a full outage.
    pub require_cache: bool,
    /// How old the probes of PostgreSQL and Redis behind a `/health` answer may be: within
    /// it every request is answered from the last result, and one request at a time
    /// refreshes it, so no rate of `/health` requests becomes database load. 10ms to 1m.
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            require_cache: false,
            max_age: Duration::from_secs(1),
        }
    }
}

/// Facts about the deployment this instance belongs to.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentSettings {
    /// Blue/green label reported by `/health` and in logs: 1 to 32 of `a-z`, `0-9`, `-`.
    /// Default `None`.
    pub color: Option<String>,
}

/// Log output.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// Line format of the logs other than the access lines (which are always JSON).
    /// Default [`LogFormat::Json`].
    pub format: LogFormat,
    /// Share of the successful requests (status below 400) that get an access line, 0
    /// to 1; failed requests always get theirs. Default 1.
    pub access_sample: f64,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            access_sample: 1.0,
        }
    }
}

/// Export of spans over OTLP/HTTP (protobuf): each sampled request's span, with its
/// cache lookups, PostgreSQL query and upstream attempts below it. Off by default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSettings {
    /// Where spans are sent: the collector's whole traces URL, `http://` (plain HTTP:
    /// a collector beside the task), e.g. `http://127.0.0.1:4318/v1/traces`. Default
    /// unset: no span is made or exported.
    pub otlp_endpoint: Option<String>,
    /// Share of the traces started here that are exported, 0 to 1, decided by trace id;
    /// a continued trace follows its caller's sampled flag. Default 1.
    pub sample_ratio: f64,
    /// The `service.name` of the exported spans. Default `tiergate`.
    pub service_name: String,
    /// Spans waiting for export at most; more are dropped and counted. 1 to 1,000,000.
    /// Default 4096.
    pub queue_spans: usize,
    /// Longest wait for the collector to take one batch; a batch it did not take in time
    /// is dropped and counted. 100ms to 1m. Default 5s.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "tiergate".to_owned(),
            queue_spans: 4096,
            export_timeout: Duration::from_secs(5),
        }
    }
}

/// Log line format, written in lowercase (`"json"`, `"text"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for CloudWatch and other collectors.
    #[default]
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

impl Settings {
    /// Defaults suited to tests: both listeners on `127.0.0.1:0` (the OS picks free ports),
    /// text logs, no migrations unless the test asks for them, and no drain delay (a test
    /// of draining sets its own).
    pub fn for_tests() -> Self {
        let mut settings = Self::default();
        settings.shutdown.drain_delay = Duration::ZERO;
        settings.listen.http = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.listen.admin = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.database.migrate_on_start = false;
        settings.log.format = LogFormat::Text;
        settings
    }

    /// The effective settings as TOML, for `tiergate config print`: durations as human
    /// strings, secrets redacted (see [`Secret::redacted`]). The output loads back as a file,
    /// except that redacted secrets must be supplied again.
    pub fn to_redacted_toml(&self) -> String {
        // Secrets redact themselves in `Serialize`, so plain serialization is safe. It fails
        // only for values TOML cannot hold (a u64 above i64::MAX set in code).
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# the settings cannot be written as TOML: {e}\n"))
    }

    /// The secrets in these settings with their key paths, for code that must handle every
    /// secret (the loader uses it to keep real values out of its redacted defaults).
    pub(crate) fn secrets(&self) -> Vec<(&'static str, &Secret)> {
        let mut out = vec![("database.url", &self.database.url)];
        if let Some(reader) = &self.database.reader_url {
            out.push(("database.reader_url", reader));
        }
        out.push(("redis.url", &self.redis.url));
        if let Some(token) = &self.admin.token {
            out.push(("admin.token", token));
        }
        out
    }

    /// Defaults with every `Option` set, so that serializing it lists every key there is.
    /// A new `Option` field must be set here too, or the loader will call its key unknown.
    pub(crate) fn every_key() -> Self {
        let mut settings = Self::default();
        settings.database.reader_url = Some(Secret::new(""));
        settings.database.ca_file = Some(PathBuf::new());
        settings.redis.ca_file = Some(PathBuf::new());
        settings.listen.https = Some(settings.listen.http);
        settings.tls.cert = Some(PathBuf::new());
        settings.tls.key = Some(PathBuf::new());
        settings.deployment.color = Some(String::new());
        settings.trace.otlp_endpoint = Some(String::new());
        settings.admin.token = Some(Secret::new(""));
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_toml_writes_durations_as_human_strings() {
        let text = Settings::default().to_redacted_toml();
        assert!(text.contains("checkout_timeout = \"1s 500ms\""), "{text}");
        assert!(text.contains("l2_ttl = \"30s\""), "{text}");
        assert!(text.contains("format = \"json\""), "{text}");
        assert!(!text.contains("reader_url"), "{text}");
    }

    #[test]
    fn redacted_toml_loads_back_to_the_same_settings() {
        let text = Settings::default().to_redacted_toml();
        let back: Settings = toml::from_str(&text).unwrap();
        assert_eq!(back.to_redacted_toml(), text);
    }

    #[test]
    fn every_key_sets_every_option() {
        // Catches an Option field added without updating `every_key`: TOML leaves a None out,
        // JSON writes `null`, so any null here is an Option the loader would not know.
        let json = serde_json::to_string(&Settings::every_key()).unwrap();
        assert!(!json.contains("null"), "{json}");
        assert_eq!(Settings::every_key().secrets().len(), 4);
    }
}
