//! Checks that types alone can't express. Each failure names its key path; none quotes a
//! secret.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::{Secret, Settings};

const MIB: u64 = 1024 * 1024;
/// More threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;
/// More connections to one target than this is a typo (`0` is the way to say no limit).
const MAX_CONNECTIONS_PER_TARGET: usize = 1_000_000;

/// One failed check.
#[derive(Debug)]
pub(crate) struct Invalid {
    /// The key the message is about first, then any other key the check read. The loader
    /// skips a check whose keys failed to parse, since it would judge a stand-in default.
    pub(crate) keys: &'static [&'static str],
    pub(crate) message: String,
}

/// Every check that fails, section by section.
pub(crate) fn check(s: &Settings) -> Vec<Invalid> {
    let mut out = Problems(Vec::new());
    secrets(s, &mut out);
    listen(s, &mut out);
    tls(s, &mut out);
    database(s, &mut out);
    redis(s, &mut out);
    cache(s, &mut out);
    http(s, &mut out);
    health(s, &mut out);
    log(s, &mut out);
    trace(s, &mut out);
    deployment(s, &mut out);
    shutdown(s, &mut out);
    runtime(s, &mut out);
    admin(s, &mut out);
    fleet(s, &mut out);
    proxy(s, &mut out);
    out.0
}

/// The failed checks found so far.
struct Problems(Vec<Invalid>);

impl Problems {
    /// Records a failed check about `keys` (the first is the one the message is about).
    fn fail(&mut self, keys: &'static [&'static str], message: String) {
        self.0.push(Invalid { keys, message });
    }
}

/// No secret in the redacted form `tiergate config print` writes: a printed file copied as
/// a configuration must not run with `***` as its password.
fn secrets(s: &Settings, out: &mut Problems) {
    let secrets: [(&'static [&'static str], Option<&Secret>, &str); 4] = [
        (
            &["database.url"],
            Some(&s.database.url),
            "DATABASE_URL, the DB_* variables or TIERGATE_DATABASE__URL",
        ),
        (
            &["database.reader_url"],
            s.database.reader_url.as_ref(),
            "DATABASE_READER_URL or TIERGATE_DATABASE__READER_URL",
        ),
        (
            &["redis.url"],
            Some(&s.redis.url),
            "REDIS_URL or TIERGATE_REDIS__URL",
        ),
        (
            &["admin.token"],
            s.admin.token.as_ref(),
            "TIERGATE_ADMIN__TOKEN",
        ),
    ];
    for (keys, secret, variables) in secrets {
        if secret.is_some_and(Secret::is_redacted) {
            out.fail(
                keys,
                format!(
                    "is the redacted form `tiergate config print` writes, not the secret: \
                     supply it with {variables} (or the same name + _FILE naming a file \
                     that holds it), or write it into the file"
                ),
            );
        }
    }
}

/// The listeners: distinct ports, a redirect only to an HTTPS listener, a connection cap.
fn listen(s: &Settings, out: &mut Problems) {
    if s.listen.admin.port() != 0 && same_port(s.listen.http, s.listen.admin) {
        out.fail(
            &["listen.admin", "listen.http"],
            format!(
                "must not use the port of listen.http ({}): the admin listener serves \
                 /metrics and /admin/*, which must stay off the public port",
                s.listen.http.port()
            ),
        );
    }

    if let Some(https) = s.listen.https {
        if same_port(https, s.listen.http) {
            out.fail(
                &["listen.https", "listen.http"],
                format!(
                    "must not use the port of listen.http ({})",
                    s.listen.http.port()
                ),
            );
        }
        if s.listen.admin.port() != 0 && same_port(https, s.listen.admin) {
            out.fail(
                &["listen.https", "listen.admin"],
                format!(
                    "must not use the port of listen.admin ({})",
                    s.listen.admin.port()
                ),
            );
        }
    }
    if s.listen.redirect_to_https && s.listen.https.is_none() {
        out.fail(
            &["listen.redirect_to_https", "listen.https"],
            "needs listen.https: there is no HTTPS listener to redirect to".to_owned(),
        );
    }
    if s.listen.max_connections < 1 {
        out.fail(
            &["listen.max_connections"],
            "must be at least 1, got 0".to_owned(),
        );
    }
}

/// TLS: a certificate with its key, server names that are host names, a handshake deadline.
fn tls(s: &Settings, out: &mut Problems) {
    let tls = &s.tls;
    match (&tls.cert, &tls.key) {
        (Some(_), None) => out.fail(
            &["tls.cert", "tls.key"],
            "is set but tls.key is not; set both or neither".to_owned(),
        ),
        (None, Some(_)) => out.fail(
            &["tls.key", "tls.cert"],
            "is set but tls.cert is not; set both or neither".to_owned(),
        ),
        _ => {}
    }
    for (i, cert) in tls.certificates.iter().enumerate() {
        if cert.server_names.is_empty() {
            out.fail(
                &["tls.certificates"],
                format!("entry {i} ({}) has no server_names", cert.cert.display()),
            );
        }
        for name in &cert.server_names {
            if !valid_server_name(name) {
                out.fail(
                    &["tls.certificates"],
                    format!("entry {i}: {name:?} is not a host name or a `*.` wildcard of one"),
                );
            }
        }
    }
    if tls.handshake_timeout.is_zero() {
        out.fail(
            &["tls.handshake_timeout"],
            "must be more than 0s".to_owned(),
        );
    }
}

/// PostgreSQL: URL schemes, pool size and timeouts, a CA file when a URL verifies the server.
fn database(s: &Settings, out: &mut Problems) {
    let db = &s.database;
    if !has_scheme(db.url.expose(), &["postgres", "postgresql"]) {
        out.fail(
            &["database.url"],
            "must start with postgres:// or postgresql://".to_owned(),
        );
    }
    if let Some(reader) = &db.reader_url {
        if !has_scheme(reader.expose(), &["postgres", "postgresql"]) {
            out.fail(
                &["database.reader_url"],
                "must start with postgres:// or postgresql://".to_owned(),
            );
        }
    }
    let (min, max) = (Duration::from_millis(1), Duration::from_secs(60));
    if !(min..=max).contains(&db.reader_max_lag) {
        out.fail(
            &["database.reader_max_lag"],
            format!(
                "must be between 1ms and 1m, got {}",
                human(db.reader_max_lag)
            ),
        );
    }
    if db.pool_max_size < 1 {
        out.fail(
            &["database.pool_max_size"],
            format!("must be at least 1, got {}", db.pool_max_size),
        );
    }
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
    if !(min..=max).contains(&db.checkout_timeout) {
        out.fail(
            &["database.checkout_timeout"],
            format!(
                "must be between 100ms and 10s, got {}",
                human(db.checkout_timeout)
            ),
        );
    }
    // The pool refuses any other mode at start; `config check` should say so first.
    let urls: [(&'static [&'static str], _); 2] = [
        (&["database.url"], Some(&db.url)),
        (&["database.reader_url"], db.reader_url.as_ref()),
    ];
    for (key, url) in urls {
        let Some(mode) = url.and_then(|u| sslmode(u.expose())) else {
            continue;
        };
        if !SSL_MODES.contains(&mode) {
            out.fail(
                key,
                format!(
                    "sslmode must be one of {}, got {mode:?}",
                    SSL_MODES.join(", ")
                ),
            );
        }
    }
    let verifies = std::iter::once(db.url.expose())
        .chain(db.reader_url.as_ref().map(|u| u.expose()))
        .any(|url| matches!(sslmode(url), Some("verify-ca" | "verify-full")));
    if verifies && db.ca_file.is_none() {
        out.fail(
            &["database.ca_file", "database.url"],
            "must be set when a database URL has sslmode=verify-ca or verify-full: \
             it names the CAs to verify the server against (the RDS bundle, say)"
                .to_owned(),
        );
    }
    if db.connect_timeout.is_zero() {
        out.fail(
            &["database.connect_timeout"],
            "must be more than 0s".to_owned(),
        );
    }
}

/// Redis: URL scheme, key prefix, timeouts, and the circuit breaker in front of it.
fn redis(s: &Settings, out: &mut Problems) {
    let redis = &s.redis;
    if !has_scheme(
        redis.url.expose(),
        &["redis", "rediss", "redis-cluster", "rediss-cluster"],
    ) {
        out.fail(
            &["redis.url"],
            "must start with redis://, rediss://, redis-cluster:// or rediss-cluster://".to_owned(),
        );
    }
    if redis.key_prefix.is_empty() {
        out.fail(&["redis.key_prefix"], "must not be empty".to_owned());
    } else if redis.key_prefix.chars().any(char::is_whitespace) {
        out.fail(
            &["redis.key_prefix"],
            format!("must not contain whitespace, got {:?}", redis.key_prefix),
        );
    }
    if redis.command_timeout.is_zero() {
        out.fail(
            &["redis.command_timeout"],
            "must be more than 0s".to_owned(),
        );
    }
    if redis.connect_timeout.is_zero() {
        out.fail(
            &["redis.connect_timeout"],
            "must be more than 0s".to_owned(),
        );
    }

    if redis.breaker_failures == 0 {
        out.fail(&["redis.breaker_failures"], "must be at least 1".to_owned());
    }
    if redis.breaker_open < Duration::from_millis(100) {
        out.fail(
            &["redis.breaker_open"],
            format!("must be at least 100ms, got {}", human(redis.breaker_open)),
        );
    }
}

/// The cache tiers' size and lifetimes.
fn cache(s: &Settings, out: &mut Problems) {
    let cache = &s.cache;
    if cache.l1_max_bytes < MIB {
        out.fail(
            &["cache.l1_max_bytes"],
            format!("must be at least 1 MiB ({MIB}), got {}", cache.l1_max_bytes),
        );
    }
    if cache.l1_ttl < Duration::from_secs(1) {
        out.fail(
            &["cache.l1_ttl"],
            format!("must be at least 1s, got {}", human(cache.l1_ttl)),
        );
    }
    if cache.l2_ttl < Duration::from_secs(1) {
        out.fail(
            &["cache.l2_ttl"],
            format!("must be at least 1s, got {}", human(cache.l2_ttl)),
        );
    }
    if cache.negative_ttl < Duration::from_millis(100) {
        out.fail(
            &["cache.negative_ttl"],
            format!("must be at least 100ms, got {}", human(cache.negative_ttl)),
        );
    }
    if cache.degraded_l1_ttl < Duration::from_millis(100) {
        out.fail(
            &["cache.degraded_l1_ttl"],
            format!(
                "must be at least 100ms, got {}",
                human(cache.degraded_l1_ttl)
            ),
        );
    }
}

/// `/health`: a result reused long enough to matter, short enough to be news.
fn health(s: &Settings, out: &mut Problems) {
    let max_age = s.health.max_age;
    if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&max_age) {
        out.fail(
            &["health.max_age"],
            format!("must be 10ms to 1m, got {}", human(max_age)),
        );
    }
}

/// Logs: a sample is a share.
fn log(s: &Settings, out: &mut Problems) {
    let sample = s.log.access_sample;
    if !(0.0..=1.0).contains(&sample) {
        out.fail(
            &["log.access_sample"],
            format!("must be 0 to 1 (a share of the requests), got {sample}"),
        );
    }
}

/// Span export: a plain-HTTP URL without credentials (they would be printed), a share,
/// a name, a bounded queue.
fn trace(s: &Settings, out: &mut Problems) {
    let trace = &s.trace;
    if let Some(endpoint) = &trace.otlp_endpoint
        && let Err(why) = otlp_endpoint(endpoint)
    {
        out.fail(&["trace.otlp_endpoint"], why);
    }
    let ratio = trace.sample_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        out.fail(
            &["trace.sample_ratio"],
            format!("must be 0 to 1 (a share of the traces), got {ratio}"),
        );
    }
    let name = &trace.service_name;
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        out.fail(
            &["trace.service_name"],
            format!("must be 1 to 128 characters, none a control character, got {name:?}"),
        );
    }
    if !(1..=1_000_000).contains(&trace.queue_spans) {
        out.fail(
            &["trace.queue_spans"],
            format!("must be 1 to 1000000, got {}", trace.queue_spans),
        );
    }
    let timeout = trace.export_timeout;
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timeout) {
        out.fail(
            &["trace.export_timeout"],
            format!("must be 100ms to 1m, got {}", human(timeout)),
        );
    }
}

/// Why `endpoint` cannot be the collector's URL, if it cannot.
fn otlp_endpoint(endpoint: &str) -> Result<(), String> {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(if endpoint.starts_with("https://") {
            format!(
                "must be a plain http:// URL (a collector beside the task); https is not supported, got {endpoint:?}"
            )
        } else {
            format!(
                "must be an http:// URL such as http://127.0.0.1:4318/v1/traces, got {endpoint:?}"
            )
        });
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must not hold credentials (user:password@): they would be printed".to_owned());
    }
    if authority.is_empty()
        || endpoint
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "must name a host and hold no spaces, got {endpoint:?}"
        ));
    }
    Ok(())
}

/// The public HTTP limits: body, head and header sizes, timeouts, requests in flight.
fn http(s: &Settings, out: &mut Problems) {
    let http = &s.http;
    if !(1..=16 * MIB).contains(&http.max_body_bytes) {
        out.fail(
            &["http.max_body_bytes"],
            format!(
                "must be between 1 and 16 MiB ({}), got {}",
                16 * MIB,
                http.max_body_bytes
            ),
        );
    }
    if http.request_timeout.is_zero() {
        out.fail(&["http.request_timeout"], "must be more than 0s".to_owned());
    }
    if http.max_in_flight < 1 {
        out.fail(
            &["http.max_in_flight"],
            format!("must be at least 1, got {}", http.max_in_flight),
        );
    }
    if http.body_read_timeout.is_zero() {
        out.fail(
            &["http.body_read_timeout"],
            "must be more than 0s".to_owned(),
        );
    }
    if http.header_read_timeout.is_zero() {
        out.fail(
            &["http.header_read_timeout"],
            "must be more than 0s".to_owned(),
        );
    }
    if http.idle_timeout.is_zero() {
        out.fail(&["http.idle_timeout"], "must be more than 0s".to_owned());
    }
    // hyper's read buffer cannot be smaller than 8 KiB.
    if !(8192..=1024 * 1024).contains(&http.max_header_bytes) {
        out.fail(
            &["http.max_header_bytes"],
            format!(
                "must be between 8192 and 1 MiB (1048576), got {}",
                http.max_header_bytes
            ),
        );
    }
    if !(1..=1000).contains(&http.max_headers) {
        out.fail(
            &["http.max_headers"],
            format!("must be between 1 and 1000, got {}", http.max_headers),
        );
    }
    if http.h2_max_concurrent_streams < 1 {
        out.fail(
            &["http.h2_max_concurrent_streams"],
            "must be at least 1, got 0".to_owned(),
        );
    }
    if http.h2_max_header_list_bytes < 1024 {
        out.fail(
            &["http.h2_max_header_list_bytes"],
            format!(
                "must be at least 1024, got {}",
                http.h2_max_header_list_bytes
            ),
        );
    }
}

/// The deployment's color (blue/green): a short label of safe characters.
fn deployment(s: &Settings, out: &mut Problems) {
    if let Some(color) = &s.deployment.color {
        let valid = (1..=32).contains(&color.len())
            && color
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            out.fail(
                &["deployment.color"],
                format!("must be 1 to 32 characters of a-z, 0-9 and -, got {color:?}"),
            );
        }
    }
}

/// Shutdown: a drain that leaves time for requests in flight.
fn shutdown(s: &Settings, out: &mut Problems) {
    let shutdown = &s.shutdown;
    if shutdown.timeout.is_zero() {
        out.fail(&["shutdown.timeout"], "must be more than 0s".to_owned());
    } else if shutdown.drain_delay >= shutdown.timeout {
        out.fail(
            &["shutdown.drain_delay", "shutdown.timeout"],
            format!(
                "must be less than shutdown.timeout ({}), got {}: in-flight requests need \
                 time to finish after the listeners close",
                human(shutdown.timeout),
                human(shutdown.drain_delay)
            ),
        );
    }
}

/// The runtime's worker threads.
fn runtime(s: &Settings, out: &mut Problems) {
    if s.runtime.worker_threads > MAX_WORKER_THREADS {
        out.fail(
            &["runtime.worker_threads"],
            format!(
                "must be at most {MAX_WORKER_THREADS} (0: one per CPU), got {}",
                s.runtime.worker_threads
            ),
        );
    }
}

/// The admin token, long enough to guard the routing of all traffic, and present
/// whenever the admin listener is reachable from beyond this host.
fn admin(s: &Settings, out: &mut Problems) {
    if s.admin.token.is_none() && !s.listen.admin.ip().is_loopback() {
        out.fail(
            &["listen.admin", "admin.token"],
            format!(
                "binds {}, beyond loopback: set admin.token (TIERGATE_ADMIN__TOKEN_FILE), \
                 which every /admin/* endpoint then requires",
                s.listen.admin
            ),
        );
    }
    // A redacted token has its own problem (see `secrets`).
    if let Some(token) = s.admin.token.as_ref().filter(|t| !t.is_redacted()) {
        if token.expose().chars().count() < 16 {
            out.fail(
                &["admin.token"],
                "must be at least 16 characters: it guards the routing of all traffic".to_owned(),
            );
        }
    }
}

/// The fleet's poll and heartbeat: often enough to repair a lost change soon, rarely
/// enough not to load PostgreSQL, and a task is not declared dead between two beats.
fn fleet(s: &Settings, out: &mut Problems) {
    let fleet = &s.fleet;
    let range = Duration::from_millis(10)..=Duration::from_secs(60);
    if !range.contains(&fleet.poll_interval) {
        out.fail(
            &["fleet.poll_interval"],
            format!("must be 10ms to 60s, got {}", human(fleet.poll_interval)),
        );
    } else if fleet.task_ttl < fleet.poll_interval * 2 {
        out.fail(
            &["fleet.task_ttl", "fleet.poll_interval"],
            format!(
                "must be at least twice fleet.poll_interval ({}), got {}: a live task would \
                 drop out of the fleet between two heartbeats",
                human(fleet.poll_interval),
                human(fleet.task_ttl)
            ),
        );
    }
}

/// The proxy's retries, and the route table and upstream groups.
fn proxy(s: &Settings, out: &mut Problems) {
    if s.proxy.max_attempts < 1 {
        out.fail(
            &["proxy.max_attempts"],
            "must be at least 1, got 0".to_owned(),
        );
    }
    for message in check_routes(s) {
        out.fail(&["routes"], message);
    }
    for message in check_upstreams(s) {
        out.fail(&["upstreams"], message);
    }
}

/// The route table's problems, each naming the route by index and name.
fn check_routes(s: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let groups: HashSet<&str> = s.upstreams.iter().map(|u| u.name.as_str()).collect();
    let mut seen_names = HashSet::new();
    let mut seen_matches = HashSet::new();
    for (i, route) in s.routes.iter().enumerate() {
        let mut fail = |message: String| out.push(format!("[{i}] ({}): {message}", route.name));
        if !valid_label(&route.name) {
            fail("name must be 1 to 64 of a-z, 0-9, - and _".to_owned());
        } else if !seen_names.insert(route.name.as_str()) {
            fail("name is used by an earlier route".to_owned());
        }
        if let Some(host) = &route.host {
            if !valid_server_name(host) {
                fail(format!(
                    "host {host:?} is not a host name or a `*.` wildcard of one (no port)"
                ));
            }
        }
        if !route.path.starts_with('/') {
            fail(format!("path must start with /, got {:?}", route.path));
        } else if !seen_matches.insert((
            route.host.as_deref().map(str::to_ascii_lowercase),
            route.path.trim_end_matches('/').to_owned(),
            route.exact,
        )) {
            fail("an earlier route matches the same host and path".to_owned());
        }
        let targets = [
            route.app,
            route.upstream.is_some(),
            route.split.is_some(),
            route.redirect.is_some(),
        ];
        if targets.iter().filter(|t| **t).count() != 1 {
            fail("needs exactly one of app = true, upstream, split and redirect".to_owned());
        }
        if let Some(group) = &route.upstream {
            if !groups.contains(group.as_str()) {
                fail(format!(
                    "upstream {group:?} is not the name of any [[upstreams]]"
                ));
            }
        }
        if let Some(split) = &route.split {
            for group in split.keys().filter(|g| !groups.contains(g.as_str())) {
                fail(format!(
                    "split names {group:?}, which is not the name of any [[upstreams]]"
                ));
            }
            if split.values().map(|w| u64::from(*w)).sum::<u64>() == 0 {
                fail("split weights must have a positive sum".to_owned());
            }
        }
        if let Some(cookie) = &route.sticky_cookie {
            if route.split.is_none() {
                fail("sticky_cookie needs a split".to_owned());
            }
            if cookie.is_empty()
                || !cookie
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                fail(format!(
                    "sticky_cookie {cookie:?} must be 1 or more of A-Z, a-z, 0-9, -, _ and ."
                ));
            }
        }
        if let Some(url) = &route.redirect {
            if !has_scheme(url, &["http", "https"]) || url.chars().any(char::is_whitespace) {
                fail(format!(
                    "redirect must be an http:// or https:// URL, got {url:?}"
                ));
            }
        }
        if let Some(prefix) = &route.rewrite_prefix {
            if !prefix.starts_with('/') {
                fail(format!("rewrite_prefix must start with /, got {prefix:?}"));
            }
            if route.upstream.is_none() && route.split.is_none() {
                fail("rewrite_prefix applies only to upstream and split routes".to_owned());
            }
        }
        for protocol in &route.upgrades {
            if protocol.eq_ignore_ascii_case("h2c") {
                fail(
                    "upgrades must not allow h2c: its tunnel would bypass routing and headers"
                        .to_owned(),
                );
            } else if !is_token(protocol) {
                fail(format!(
                    "upgrades: {protocol:?} is not a protocol name (1 or more of A-Z, a-z, 0-9 and !#$%&'*+-.^_`|~)"
                ));
            }
        }
    }
    out
}

/// The upstream groups' problems, each naming the group by index and name.
fn check_upstreams(s: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, group) in s.upstreams.iter().enumerate() {
        let mut fail = |message: String| out.push(format!("[{i}] ({}): {message}", group.name));
        if !valid_label(&group.name) {
            fail("name must be 1 to 64 of a-z, 0-9, - and _".to_owned());
        } else if !seen.insert(group.name.as_str()) {
            fail("name is used by an earlier group".to_owned());
        }
        if group.targets.is_empty() {
            fail("targets must list at least one host:port".to_owned());
        }
        let mut addresses = HashSet::new();
        for target in &group.targets {
            let address = target.address();
            if let Err(why) = check_address(address) {
                fail(format!("target {address:?}: {why}"));
            } else if !addresses.insert(address) {
                fail(format!("target {address:?} is listed twice"));
            }
            if target.weight() == 0 {
                fail(format!("target {address:?}: weight must be at least 1"));
            }
        }
        for (key, value) in [
            ("connect_timeout", group.connect_timeout),
            ("response_timeout", group.response_timeout),
            ("request_timeout", group.request_timeout),
            ("idle_timeout", group.idle_timeout),
        ] {
            if value.is_zero() {
                fail(format!("{key} must be more than 0s"));
            }
        }
        if group.max_connections_per_target > MAX_CONNECTIONS_PER_TARGET {
            fail(format!(
                "max_connections_per_target must be at most {MAX_CONNECTIONS_PER_TARGET} \
                 (0: no limit), got {}",
                group.max_connections_per_target
            ));
        }
        if group.max_in_flight < 1 {
            fail(format!(
                "max_in_flight must be at least 1, got {}",
                group.max_in_flight
            ));
        }
        if group.response_timeout > group.request_timeout {
            fail(format!(
                "response_timeout ({}) must not exceed request_timeout ({})",
                human(group.response_timeout),
                human(group.request_timeout)
            ));
        }
        if let Some(check) = &group.health_check {
            if !check.path.starts_with('/') {
                fail(format!(
                    "health_check.path must start with /, got {:?}",
                    check.path
                ));
            }
            if check.interval < Duration::from_millis(100) {
                fail(format!(
                    "health_check.interval must be at least 100ms, got {}",
                    human(check.interval)
                ));
            }
            if check.timeout.is_zero() || check.timeout > check.interval {
                fail(format!(
                    "health_check.timeout must be more than 0s and at most the interval ({}), got {}",
                    human(check.interval),
                    human(check.timeout)
                ));
            }
            if check.healthy_threshold < 1 || check.unhealthy_threshold < 1 {
                fail("health_check thresholds must be at least 1".to_owned());
            }
        }
        let outlier = &group.outlier;
        if outlier.consecutive_failures > 0
            && (outlier.base_ejection.is_zero() || outlier.base_ejection > outlier.max_ejection)
        {
            fail(format!(
                "outlier.base_ejection must be more than 0s and at most outlier.max_ejection ({}), got {}",
                human(outlier.max_ejection),
                human(outlier.base_ejection)
            ));
        }
    }
    out
}

/// `host:port` with a non-zero port and a host that is a name, an IPv4 address or a
/// bracketed IPv6 address.
fn check_address(address: &str) -> Result<(), &'static str> {
    if address.parse::<SocketAddr>().is_ok() {
        return if address.ends_with(":0") {
            Err("port must not be 0")
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("must be host:port");
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err("port must be 1 to 65535"),
        Ok(_) => {}
    }
    if host.starts_with('*') || !valid_server_name(host) {
        return Err("host must be a DNS name or an IP address");
    }
    Ok(())
}

/// A name for routes and groups: bounded, and safe as a metric label and in a URL.
fn valid_label(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

/// An RFC 9110 token: what an `Upgrade` protocol name is made of.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Two listeners collide when they share a port and either address covers the other; an
/// unspecified address (`0.0.0.0`, `[::]`) covers every interface.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The `sslmode` values Tiergate's PostgreSQL client knows (libpq's, less `allow`).
const SSL_MODES: [&str; 5] = ["disable", "prefer", "require", "verify-ca", "verify-full"];

/// The `sslmode` query parameter of a PostgreSQL URL, if any. Only the mode is returned,
/// never anything else from the URL.
pub(crate) fn sslmode(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("sslmode="))
}

/// A DNS name, or `*.` followed by one: what the SNI map can match.
fn valid_server_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Compares only the scheme, so a failure never has to quote the value. Case-sensitive, as
/// the clients' own URL parsers are.
fn has_scheme(url: &str, schemes: &[&str]) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| schemes.contains(&scheme))
}

fn human(d: Duration) -> humantime_serde::re::humantime::FormattedDuration {
    humantime_serde::re::humantime::format_duration(d)
}
