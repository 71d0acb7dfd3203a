//! Checks that types alone can't express. Each failure names its key path; none quotes a
//! secret.

use std::net::SocketAddr;
use std::time::Duration;

use crate::Settings;

const MIB: u64 = 1024 * 1024;

/// One failed check.
#[derive(Debug)]
pub(crate) struct Invalid {
    /// The key the message is about first, then any other key the check read. The loader
    /// skips a check whose keys failed to parse, since it would judge a stand-in default.
    pub(crate) keys: &'static [&'static str],
    pub(crate) message: String,
}

/// Every check that fails, in key order.
pub(crate) fn check(s: &Settings) -> Vec<Invalid> {
    let mut out = Vec::new();
    let mut fail = |keys: &'static [&'static str], message: String| {
        out.push(Invalid { keys, message });
    };

    if s.listen.admin.port() != 0 && same_port(s.listen.http, s.listen.admin) {
        fail(
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
            fail(
                &["listen.https", "listen.http"],
                format!(
                    "must not use the port of listen.http ({})",
                    s.listen.http.port()
                ),
            );
        }
        if s.listen.admin.port() != 0 && same_port(https, s.listen.admin) {
            fail(
                &["listen.https", "listen.admin"],
                format!(
                    "must not use the port of listen.admin ({})",
                    s.listen.admin.port()
                ),
            );
        }
    }
    if s.listen.redirect_to_https && s.listen.https.is_none() {
        fail(
            &["listen.redirect_to_https", "listen.https"],
            "needs listen.https: there is no HTTPS listener to redirect to".to_owned(),
        );
    }
    if s.listen.max_connections < 1 {
        fail(
            &["listen.max_connections"],
            "must be at least 1, got 0".to_owned(),
        );
    }

    let tls = &s.tls;
    match (&tls.cert, &tls.key) {
        (Some(_), None) => fail(
            &["tls.cert", "tls.key"],
            "is set but tls.key is not; set both or neither".to_owned(),
        ),
        (None, Some(_)) => fail(
            &["tls.key", "tls.cert"],
            "is set but tls.cert is not; set both or neither".to_owned(),
        ),
        _ => {}
    }
    for (i, cert) in tls.certificates.iter().enumerate() {
        if cert.server_names.is_empty() {
            fail(
                &["tls.certificates"],
                format!("entry {i} ({}) has no server_names", cert.cert.display()),
            );
        }
        for name in &cert.server_names {
            if !valid_server_name(name) {
                fail(
                    &["tls.certificates"],
                    format!("entry {i}: {name:?} is not a host name or a `*.` wildcard of one"),
                );
            }
        }
    }
    if tls.handshake_timeout.is_zero() {
        fail(
            &["tls.handshake_timeout"],
            "must be more than 0s".to_owned(),
        );
    }

    let db = &s.database;
    if !has_scheme(db.url.expose(), &["postgres", "postgresql"]) {
        fail(
            &["database.url"],
            "must start with postgres:// or postgresql://".to_owned(),
        );
    }
    if let Some(reader) = &db.reader_url {
        if !has_scheme(reader.expose(), &["postgres", "postgresql"]) {
            fail(
                &["database.reader_url"],
                "must start with postgres:// or postgresql://".to_owned(),
            );
        }
    }
    if db.pool_max_size < 1 {
        fail(
            &["database.pool_max_size"],
            format!("must be at least 1, got {}", db.pool_max_size),
        );
    }
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
    if !(min..=max).contains(&db.checkout_timeout) {
        fail(
            &["database.checkout_timeout"],
            format!(
                "must be between 100ms and 10s, got {}",
                human(db.checkout_timeout)
            ),
        );
    }
    let verifies = std::iter::once(db.url.expose())
        .chain(db.reader_url.as_ref().map(|u| u.expose()))
        .any(|url| matches!(sslmode(url), Some("verify-ca" | "verify-full")));
    if verifies && db.ca_file.is_none() {
        fail(
            &["database.ca_file", "database.url"],
            "must be set when a database URL has sslmode=verify-ca or verify-full: \
             it names the CAs to verify the server against (the RDS bundle, say)"
                .to_owned(),
        );
    }
    if db.connect_timeout.is_zero() {
        fail(
            &["database.connect_timeout"],
            "must be more than 0s".to_owned(),
        );
    }

    let redis = &s.redis;
    if !has_scheme(redis.url.expose(), &["redis", "rediss"]) {
        fail(
            &["redis.url"],
            "must start with redis:// or rediss://".to_owned(),
        );
    }
    if redis.key_prefix.is_empty() {
        fail(&["redis.key_prefix"], "must not be empty".to_owned());
    } else if redis.key_prefix.chars().any(char::is_whitespace) {
        fail(
            &["redis.key_prefix"],
            format!("must not contain whitespace, got {:?}", redis.key_prefix),
        );
    }
    if redis.command_timeout.is_zero() {
        fail(
            &["redis.command_timeout"],
            "must be more than 0s".to_owned(),
        );
    }
    if redis.connect_timeout.is_zero() {
        fail(
            &["redis.connect_timeout"],
            "must be more than 0s".to_owned(),
        );
    }

    let cache = &s.cache;
    if cache.l1_max_bytes < MIB {
        fail(
            &["cache.l1_max_bytes"],
            format!("must be at least 1 MiB ({MIB}), got {}", cache.l1_max_bytes),
        );
    }
    if cache.l1_ttl < Duration::from_secs(1) {
        fail(
            &["cache.l1_ttl"],
            format!("must be at least 1s, got {}", human(cache.l1_ttl)),
        );
    }
    if cache.l2_ttl < Duration::from_secs(1) {
        fail(
            &["cache.l2_ttl"],
            format!("must be at least 1s, got {}", human(cache.l2_ttl)),
        );
    }
    if cache.negative_ttl < Duration::from_millis(100) {
        fail(
            &["cache.negative_ttl"],
            format!("must be at least 100ms, got {}", human(cache.negative_ttl)),
        );
    }
    if cache.degraded_l1_ttl < Duration::from_millis(100) {
        fail(
            &["cache.degraded_l1_ttl"],
            format!(
                "must be at least 100ms, got {}",
                human(cache.degraded_l1_ttl)
            ),
        );
    }
    if s.redis.breaker_failures == 0 {
        fail(&["redis.breaker_failures"], "must be at least 1".to_owned());
    }
    if s.redis.breaker_open < Duration::from_millis(100) {
        fail(
            &["redis.breaker_open"],
            format!(
                "must be at least 100ms, got {}",
                human(s.redis.breaker_open)
            ),
        );
    }

    let http = &s.http;
    if !(1..=16 * MIB).contains(&http.max_body_bytes) {
        fail(
            &["http.max_body_bytes"],
            format!(
                "must be between 1 and 16 MiB ({}), got {}",
                16 * MIB,
                http.max_body_bytes
            ),
        );
    }
    if http.request_timeout.is_zero() {
        fail(&["http.request_timeout"], "must be more than 0s".to_owned());
    }
    if http.max_in_flight < 1 {
        fail(
            &["http.max_in_flight"],
            format!("must be at least 1, got {}", http.max_in_flight),
        );
    }
    if http.header_read_timeout.is_zero() {
        fail(
            &["http.header_read_timeout"],
            "must be more than 0s".to_owned(),
        );
    }
    if http.idle_timeout.is_zero() {
        fail(&["http.idle_timeout"], "must be more than 0s".to_owned());
    }
    // hyper's read buffer cannot be smaller than 8 KiB.
    if !(8192..=1024 * 1024).contains(&http.max_header_bytes) {
        fail(
            &["http.max_header_bytes"],
            format!(
                "must be between 8192 and 1 MiB (1048576), got {}",
                http.max_header_bytes
            ),
        );
    }
    if !(1..=1000).contains(&http.max_headers) {
        fail(
            &["http.max_headers"],
            format!("must be between 1 and 1000, got {}", http.max_headers),
        );
    }
    if http.h2_max_concurrent_streams < 1 {
        fail(
            &["http.h2_max_concurrent_streams"],
            "must be at least 1, got 0".to_owned(),
        );
    }
    if http.h2_max_header_list_bytes < 1024 {
        fail(
            &["http.h2_max_header_list_bytes"],
            format!(
                "must be at least 1024, got {}",
                http.h2_max_header_list_bytes
            ),
        );
    }

    if let Some(color) = &s.deployment.color {
        let valid = (1..=32).contains(&color.len())
            && color
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            fail(
                &["deployment.color"],
                format!("must be 1 to 32 characters of a-z, 0-9 and -, got {color:?}"),
            );
        }
    }

    let shutdown = &s.shutdown;
    if shutdown.timeout.is_zero() {
        fail(&["shutdown.timeout"], "must be more than 0s".to_owned());
    } else if shutdown.drain_delay >= shutdown.timeout {
        fail(
            &["shutdown.drain_delay", "shutdown.timeout"],
            format!(
                "must be less than shutdown.timeout ({}), got {}: in-flight requests need \
                 time to finish after the listeners close",
                human(shutdown.timeout),
                human(shutdown.drain_delay)
            ),
        );
    }

    out
}

/// Two listeners collide when they share a port and either address covers the other; an
/// unspecified address (`0.0.0.0`, `[::]`) covers every interface.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

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
