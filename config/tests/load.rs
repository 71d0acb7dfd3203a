//! Loading settings through the public API: defaults, a TOML file and the environment
//! (a map, never the process's own), layered and validated, with every problem reported
//! at once and no secret in any output.

// A test's helpers panic on what the test itself controls.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tiergate_config::{
    Balance, ConfigError, LogFormat, ProcessEnv, Secret, Settings, TlsVersion, load,
};

const DEV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/dev.toml");
const FARGATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fargate.toml");

/// A file to load (if any) and the variables to load with.
type Case<'a> = (Option<&'a Path>, Vec<(&'a str, String)>);

/// A distinctive password, searched for in every output that must not contain it.
const PASSWORD: &str = "zebra-Quokka-7731";

/// A file under the temp dir with a unique name, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(content: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tiergate-config-test-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
        ));
        std::fs::write(&path, content).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn path_str(&self) -> String {
        self.0.to_str().unwrap().to_owned()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load_env(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    load(None, &env(vars))
}

fn load_file(toml: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let file = TempFile::new(toml);
    load(Some(file.path()), &env(vars))
}

fn problems(result: Result<Settings, ConfigError>) -> Vec<String> {
    match result {
        Ok(settings) => panic!("expected problems, got {settings:?}"),
        Err(e) => e.problems,
    }
}

fn assert_one_problem_containing(result: Result<Settings, ConfigError>, needle: &str) {
    let problems = problems(result);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains(needle), "{problems:#?}");
}

const BLUE_GREEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/blue-green.toml");

#[test]
fn blue_green_example_loads_with_a_token_from_the_environment() {
    let token = "a-token-of-twenty-chars";
    let s = load(
        Some(Path::new(BLUE_GREEN)),
        &env(&[("TIERGATE_ADMIN__TOKEN", token)]),
    )
    .unwrap();
    assert_eq!(s.admin.token.as_ref().map(Secret::expose), Some(token));
    let names: Vec<&str> = s.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["items", "health", "web"]);
    let split = s.routes[2].split.as_ref().unwrap();
    assert_eq!(split.get("blue"), Some(&100));
    assert_eq!(split.get("green"), Some(&0));
    let blue = &s.upstreams[0];
    assert_eq!(blue.targets[1].address(), "127.0.0.1:19002");
    let check = blue.health_check.as_ref().unwrap();
    assert_eq!(
        (check.path.as_str(), check.interval),
        ("/", Duration::from_secs(1))
    );
    assert_eq!(s.upstreams[1].targets[0].address(), "127.0.0.1:19003");
    assert!(!s.to_redacted_toml().contains(token));
}

#[test]
fn routes_default_to_the_app_and_a_file_replaces_them() {
    let s = load_env(&[]).unwrap();
    let names: Vec<&str> = s.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["items", "health"]);
    let s = load_file(
        r#"
[[routes]]
name = "api"
host = "*.example.com"
path = "/api"
rewrite_prefix = "/"
upstream = "api"

[[upstreams]]
name = "api"
targets = ["api.internal:8080", { address = "10.0.0.2:8080", weight = 3 }]
balance = "weighted"
"#,
        &[],
    )
    .unwrap();
    assert_eq!(s.routes.len(), 1);
    assert_eq!(s.upstreams[0].targets[1].weight(), 3);
    assert_eq!(s.upstreams[0].balance, Balance::Weighted);
}

#[test]
fn route_problems_name_the_route_and_are_all_listed() {
    let problems = problems(load_file(
        r#"
[admin]
token = "short"

[[routes]]
name = "Bad Name"
path = "items"
app = true
upstream = "nowhere"

[[routes]]
name = "web"
split = { blue = 0 }
sticky_cookie = "a b"
upgrades = ["websocket", "H2C", "web socket"]

[[upstreams]]
name = "blue"
targets = ["127.0.0.1:0", "host-without-port", "ok.internal:80", "ok.internal:80"]
response_timeout = "2m"
max_connections_per_target = 2000000
"#,
        &[],
    ));
    let all = problems.join("\n");
    for needle in [
        "admin.token: must be at least 16 characters",
        "[0] (Bad Name): name must be",
        "[0] (Bad Name): path must start with /",
        "[0] (Bad Name): needs exactly one of",
        "upstream \"nowhere\" is not the name of any",
        "[1] (web): split weights must have a positive sum",
        "sticky_cookie \"a b\"",
        "[1] (web): upgrades must not allow h2c",
        "[1] (web): upgrades: \"web socket\" is not a protocol name",
        "target \"127.0.0.1:0\": port must not be 0",
        "target \"host-without-port\": must be host:port",
        "target \"ok.internal:80\" is listed twice",
        "response_timeout (2m) must not exceed request_timeout (1m)",
        "max_connections_per_target must be at most 1000000 (0: no limit), got 2000000",
    ] {
        assert!(all.contains(needle), "{needle} not in:\n{all}");
    }
    assert!(!all.contains("short"), "the token leaked:\n{all}");
}

#[test]
fn a_malformed_target_says_what_a_target_looks_like() {
    let problems = problems(load_file(
        "[[upstreams]]\nname = \"a\"\ntargets = [42]\n",
        &[],
    ));
    assert!(
        problems[0].contains("a \"host:port\" string or a table"),
        "{problems:#?}"
    );
}

#[test]
fn tls_section_loads_from_a_file_and_the_environment() {
    let s = load_file(
        r#"
[listen]
https = "0.0.0.0:8443"
redirect_to_https = true

[tls]
cert = "/etc/tiergate/default.crt"
key = "/etc/tiergate/default.key"
min_version = "1.3"

[[tls.certificates]]
cert = "/etc/tiergate/api.crt"
key = "/etc/tiergate/api.key"
server_names = ["api.example.com", "*.api.example.com"]
"#,
        &[("TIERGATE_TLS__HANDSHAKE_TIMEOUT", "3s")],
    )
    .unwrap();
    assert_eq!(s.listen.https, Some("0.0.0.0:8443".parse().unwrap()));
    assert_eq!(s.tls.min_version, TlsVersion::V1_3);
    assert_eq!(s.tls.certificates.len(), 1);
    assert_eq!(s.tls.certificates[0].server_names[1], "*.api.example.com");
    assert_eq!(s.tls.handshake_timeout, Duration::from_secs(3));
}

#[test]
fn tls_settings_are_checked_together() {
    let found = problems(load_file(
        r#"
[listen]
redirect_to_https = true
[tls]
cert = "/a.crt"
min_version = "1.1"
[[tls.certificates]]
cert = "/b.crt"
key = "/b.key"
server_names = ["bad name"]
"#,
        &[("DATABASE_URL", "postgres://u@db/x?sslmode=verify-full")],
    ));
    let joined = found.join("\n");
    for needle in [
        "tls.min_version",
        "tls.cert: is set but tls.key is not",
        "\"bad name\" is not a host name",
        "listen.redirect_to_https: needs listen.https",
        "database.ca_file: must be set",
    ] {
        assert!(joined.contains(needle), "{needle} in {found:#?}");
    }
}

/// An sslmode the PostgreSQL pool would refuse at start is a configuration problem,
/// named by key and without the URL (which holds the password).
/// Mutation that fails it: drop the `SSL_MODES` check in `validate::database`.
#[test]
fn an_unknown_sslmode_is_reported() {
    let found = problems(load_env(&[
        (
            "DATABASE_URL",
            "postgres://u:hunter2@db/x?sslmode=verify-ful",
        ),
        (
            "DATABASE_READER_URL",
            "postgres://u:hunter2@db/x?sslmode=require",
        ),
    ]));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("database.url: sslmode must be one of"),
        "{found:#?}"
    );
    assert!(found[0].contains("\"verify-ful\""), "{found:#?}");
    assert!(!found[0].contains("hunter2"), "{found:#?}");
}

#[test]
fn defaults_load_with_an_empty_env() {
    let s = load_env(&[]).unwrap();
    let d = Settings::default();
    assert_eq!(s.listen.http, d.listen.http);
    assert_eq!(s.listen.admin, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(
        s.database.url.expose(),
        "postgres://postgres@127.0.0.1:5432/tiergate"
    );
    assert!(s.database.reader_url.is_none());
    assert_eq!(s.database.reader_max_lag, Duration::from_millis(500));
    assert_eq!(s.database.pool_max_size, 16);
    assert_eq!(s.database.checkout_timeout, Duration::from_millis(1500));
    assert_eq!(s.redis.url.expose(), "redis://127.0.0.1:6379");
    assert_eq!(s.cache.l1_max_bytes, 64 * 1024 * 1024);
    assert_eq!(s.http.max_body_bytes, 65536);
    assert!(!s.health.require_cache);
    assert!(s.deployment.color.is_none());
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.to_redacted_toml(), d.to_redacted_toml());
}

#[test]
fn process_env_loads_like_any_source() {
    // Whatever this process's environment holds, reading it must not panic.
    let _ = load(None, &ProcessEnv);
}

#[test]
fn file_overrides_defaults_and_keeps_the_rest() {
    let s = load_file(
        r#"
        [database]
        pool_max_size = 4
        checkout_timeout = "2s"
        [cache]
        l2_ttl = "2m"
        [log]
        format = "text"
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(s.database.pool_max_size, 4);
    assert_eq!(s.database.checkout_timeout, Duration::from_secs(2));
    assert_eq!(s.database.statement_timeout, Duration::from_secs(5));
    assert_eq!(s.cache.l2_ttl, Duration::from_secs(120));
    assert_eq!(s.cache.l1_ttl, Duration::from_secs(5));
    assert_eq!(s.log.format, LogFormat::Text);
    assert_eq!(s.listen.http, "0.0.0.0:8080".parse().unwrap());
}

#[test]
fn env_overrides_file() {
    let s = load_file(
        "[database]\npool_max_size = 4\n[listen]\nadmin = \"127.0.0.1:9191\"\n",
        &[("TIERGATE_DATABASE__POOL_MAX_SIZE", "8")],
    )
    .unwrap();
    assert_eq!(s.database.pool_max_size, 8);
    assert_eq!(s.listen.admin, "127.0.0.1:9191".parse().unwrap());
}

#[test]
fn double_underscore_nests_in_any_case() {
    let s = load_env(&[
        ("TIERGATE_LISTEN__ADMIN", "127.0.0.1:9191"),
        ("TIERGATE_DATABASE__POOL_MAX_SIZE", "4"),
        ("TIERGATE_CACHE__L2_TTL", "10s"),
        ("tiergate_health__require_cache", "1"),
        ("Tiergate_Log__Format", "text"),
        (
            "TIERGATE_DATABASE__READER_URL",
            "postgres://r@replica/items",
        ),
        ("TIERGATE_DEPLOYMENT__COLOR", "green"),
    ])
    .unwrap();
    assert_eq!(s.listen.admin, "127.0.0.1:9191".parse().unwrap());
    assert_eq!(s.database.pool_max_size, 4);
    assert_eq!(s.cache.l2_ttl, Duration::from_secs(10));
    assert!(s.health.require_cache);
    assert_eq!(s.log.format, LogFormat::Text);
    assert_eq!(
        s.database.reader_url.as_ref().map(Secret::expose),
        Some("postgres://r@replica/items")
    );
    assert_eq!(s.deployment.color.as_deref(), Some("green"));
}

#[test]
fn empty_env_value_unsets_an_optional_key() {
    let s = load_file(
        "[deployment]\ncolor = \"blue\"\n",
        &[("TIERGATE_DEPLOYMENT__COLOR", "")],
    )
    .unwrap();
    assert!(s.deployment.color.is_none());
}

#[test]
fn port_replaces_the_port_and_keeps_the_ip() {
    let s = load_file("[listen]\nhttp = \"10.1.2.3:8080\"\n", &[("PORT", "3000")]).unwrap();
    assert_eq!(s.listen.http, "10.1.2.3:3000".parse().unwrap());
    let s = load_env(&[("PORT", "3000")]).unwrap();
    assert_eq!(s.listen.http, "0.0.0.0:3000".parse().unwrap());
}

#[test]
fn tiergate_listen_http_beats_port() {
    let s = load_env(&[
        ("PORT", "3000"),
        ("TIERGATE_LISTEN__HTTP", "127.0.0.1:4000"),
    ])
    .unwrap();
    assert_eq!(s.listen.http, "127.0.0.1:4000".parse().unwrap());
}

#[test]
fn bad_port_is_a_problem_naming_the_variable() {
    assert_one_problem_containing(
        load_env(&[("PORT", "http")]),
        "PORT: expected a port number (1-65535), got \"http\"",
    );
}

#[test]
fn db_variables_compose_a_url_with_the_password_percent_encoded() {
    let s = load_env(&[
        ("DB_HOST", "items.cluster-abc.eu-west-1.rds.amazonaws.com"),
        ("DB_PORT", "6543"),
        ("DB_USER", "app"),
        ("DB_PASSWORD", "p@ss:w/rd"),
        ("DB_NAME", "items"),
    ])
    .unwrap();
    assert_eq!(
        s.database.url.expose(),
        "postgres://app:p%40ss%3Aw%2Frd@items.cluster-abc.eu-west-1.rds.amazonaws.com:6543/items"
    );
}

#[test]
fn db_variables_default_port_user_and_name() {
    let s = load_env(&[("DB_HOST", "db.internal")]).unwrap();
    assert_eq!(
        s.database.url.expose(),
        "postgres://postgres@db.internal:5432/postgres"
    );
    let s = load_env(&[("DB_HOST", "::1")]).unwrap();
    assert_eq!(
        s.database.url.expose(),
        "postgres://postgres@[::1]:5432/postgres"
    );
}

#[test]
fn database_url_beats_db_variables() {
    let s = load_env(&[
        ("DATABASE_URL", "postgres://app@writer/items"),
        ("DB_HOST", "other"),
        ("DB_PASSWORD", "x"),
    ])
    .unwrap();
    assert_eq!(s.database.url.expose(), "postgres://app@writer/items");
}

#[test]
fn tiergate_database_url_beats_database_url() {
    let s = load_env(&[
        ("DATABASE_URL", "postgres://app@conventional/items"),
        ("TIERGATE_DATABASE__URL", "postgres://app@explicit/items"),
    ])
    .unwrap();
    assert_eq!(s.database.url.expose(), "postgres://app@explicit/items");
}

#[test]
fn conventional_variables_fill_their_keys() {
    let s = load_env(&[
        ("DATABASE_READER_URL", "postgresql://app@reader/items"),
        ("REDIS_URL", "rediss://:tok@cache:6380"),
        ("DEPLOYMENT_COLOR", "blue"),
    ])
    .unwrap();
    assert_eq!(
        s.database.reader_url.as_ref().map(Secret::expose),
        Some("postgresql://app@reader/items")
    );
    assert_eq!(s.redis.url.expose(), "rediss://:tok@cache:6380");
    assert_eq!(s.deployment.color.as_deref(), Some("blue"));
}

#[test]
fn redis_host_composes_a_url_unless_redis_url_is_set() {
    let s = load_env(&[("REDIS_HOST", "cache.internal")]).unwrap();
    assert_eq!(s.redis.url.expose(), "redis://cache.internal:6379");
    let s = load_env(&[("REDIS_HOST", "cache.internal"), ("REDIS_PORT", "6380")]).unwrap();
    assert_eq!(s.redis.url.expose(), "redis://cache.internal:6380");
    let s = load_env(&[("REDIS_HOST", "ignored"), ("REDIS_URL", "redis://wins:1")]).unwrap();
    assert_eq!(s.redis.url.expose(), "redis://wins:1");
}

#[test]
fn file_variant_reads_the_value_with_one_newline_trimmed() {
    let url = TempFile::new("postgres://app:pw@db/items\n");
    let password = TempFile::new("line1\r\n");
    let prefix = TempFile::new("from-file\n");
    let s = load_env(&[
        ("DATABASE_URL_FILE", &url.path_str()),
        ("REDIS_HOST", "cache"),
        ("TIERGATE_REDIS__KEY_PREFIX_FILE", &prefix.path_str()),
    ])
    .unwrap();
    assert_eq!(s.database.url.expose(), "postgres://app:pw@db/items");
    assert_eq!(s.redis.key_prefix, "from-file");

    let s = load_env(&[
        ("DB_HOST", "db"),
        ("DB_PASSWORD_FILE", &password.path_str()),
    ]);
    assert_eq!(
        s.unwrap().database.url.expose(),
        "postgres://postgres:line1@db:5432/postgres"
    );
}

#[test]
fn name_and_name_file_both_set_is_a_problem() {
    let file = TempFile::new("postgres://a@b/c");
    assert_one_problem_containing(
        load_env(&[
            ("DATABASE_URL", "postgres://a@b/c"),
            ("DATABASE_URL_FILE", &file.path_str()),
        ]),
        "DATABASE_URL and DATABASE_URL_FILE are both set; set only one",
    );
    assert_one_problem_containing(
        load_env(&[
            ("TIERGATE_DATABASE__URL", "postgres://a@b/c"),
            ("TIERGATE_DATABASE__URL_FILE", &file.path_str()),
        ]),
        "TIERGATE_DATABASE__URL and TIERGATE_DATABASE__URL_FILE are both set",
    );
}

#[test]
fn unreadable_file_variant_names_the_variable_and_path() {
    let missing = std::env::temp_dir().join("tiergate-config-test-does-not-exist");
    let missing = missing.to_str().unwrap();
    let problems = problems(load_env(&[("REDIS_URL_FILE", missing)]));
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].starts_with("REDIS_URL_FILE: cannot read the file"));
    assert!(problems[0].contains(missing), "{problems:#?}");
}

#[test]
fn every_problem_is_listed_not_just_the_first() {
    let problems = problems(load_file(
        "[database]\npool_size = 3\npool_max_size = 0\n",
        &[("TIERGATE_CACHE__L1_MAX_BYTES", "abc")],
    ));
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].contains("unknown key `database.pool_size`"));
    assert_eq!(
        problems[1],
        "TIERGATE_CACHE__L1_MAX_BYTES: expected an integer, got \"abc\""
    );
    assert!(problems[2].starts_with("database.pool_max_size: must be at least 1"));
}

#[test]
fn every_bad_key_of_one_section_is_listed() {
    let problems = problems(load_file(
        "[listen]\nhttp = \"nope\"\nadmin = 5\n[cache]\nl1_ttl = \"soon\"\n",
        &[],
    ));
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("listen.http: invalid socket address syntax")),
        "{problems:#?}"
    );
    assert!(problems.iter().any(|p| p.starts_with("listen.admin: ")));
    assert!(problems.iter().any(|p| p.starts_with("cache.l1_ttl: ")));
}

#[test]
fn a_problem_names_the_variable_that_set_the_key() {
    assert_one_problem_containing(
        load_env(&[("TIERGATE_DATABASE__CHECKOUT_TIMEOUT", "20s")]),
        "database.checkout_timeout: must be between 100ms and 10s, got 20s \
         (from TIERGATE_DATABASE__CHECKOUT_TIMEOUT)",
    );
    assert_one_problem_containing(
        load_env(&[("TIERGATE_CACHE__L2_TTL", "ten")]),
        "(from TIERGATE_CACHE__L2_TTL)",
    );
}

#[test]
fn wrong_type_in_a_section_place_is_reported_once() {
    assert_one_problem_containing(load_file("listen = 5\n", &[]), "listen: invalid type");
}

#[test]
fn unknown_env_path_is_a_problem() {
    assert_one_problem_containing(
        load_env(&[("TIERGATE_DATABASE__POOL_SIZE", "4")]),
        "TIERGATE_DATABASE__POOL_SIZE: there is no setting `database.pool_size`",
    );
    assert_one_problem_containing(
        load_env(&[("TIERGATE_NOPE__X", "4")]),
        "TIERGATE_NOPE__X: there is no setting `nope.x`",
    );
    assert_one_problem_containing(
        load_env(&[("TIERGATE_DATABASE__URL__X", "4")]),
        "TIERGATE_DATABASE__URL__X: there is no setting `database.url.x`",
    );
}

#[test]
fn env_naming_a_section_is_a_problem() {
    assert_one_problem_containing(
        load_env(&[("TIERGATE_CACHE__", "x")]),
        "TIERGATE_CACHE__: there is no setting `cache.`",
    );
}

#[test]
fn single_underscore_after_a_section_gets_a_hint() {
    assert_one_problem_containing(
        load_env(&[("TIERGATE_DATABASE_URL", "postgres://a@b/c")]),
        "did you mean TIERGATE_DATABASE__URL?",
    );
}

#[test]
fn a_section_name_alone_is_a_problem_not_ignored() {
    assert_one_problem_containing(
        load_env(&[("TIERGATE_ROUTES", "x")]),
        "TIERGATE_ROUTES: `routes` is a section, not a setting",
    );
}

#[test]
fn variables_without_a_section_are_left_to_the_binary() {
    load_env(&[
        ("TIERGATE_CONFIG", "/etc/tiergate.toml"),
        ("TIERGATE_ENV", "prod"),
    ])
    .unwrap();
}

#[test]
fn bad_boolean_is_a_problem_naming_the_variable() {
    assert_one_problem_containing(
        load_env(&[("TIERGATE_HEALTH__REQUIRE_CACHE", "yes please")]),
        "TIERGATE_HEALTH__REQUIRE_CACHE: expected true, false, 1 or 0, got \"yes please\"",
    );
}

#[test]
fn toml_syntax_error_names_the_file_and_line() {
    let file = TempFile::new("[listen]\nhttp = \"0.0.0.0:8080\"\nadmin = \n");
    let problems = problems(load(Some(file.path()), &env(&[])));
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with(&format!("{}:3:", file.path().display())),
        "{problems:#?}"
    );
}

#[test]
fn missing_file_is_a_problem() {
    let path = std::env::temp_dir().join("tiergate-config-test-no-such-file.toml");
    assert_one_problem_containing(load(Some(&path), &env(&[])), "cannot read");
}

#[test]
fn validation_reports_each_rule_with_its_key() {
    let problems = problems(load_file(
        r#"
        [listen]
        http = "0.0.0.0:9090"
        admin = "127.0.0.1:9090"
        [database]
        url = "mysql://db/items"
        reader_url = "http://db/items"
        reader_max_lag = "0s"
        checkout_timeout = "50ms"
        [redis]
        url = "memcached://x"
        key_prefix = "has space"
        [cache]
        l1_max_bytes = 1000
        l1_ttl = "500ms"
        l2_ttl = "0s"
        [http]
        max_body_bytes = 0
        [deployment]
        color = "Blue!"
        "#,
        &[],
    ));
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "listen.admin",
            "database.url",
            "database.reader_url",
            "database.reader_max_lag",
            "database.checkout_timeout",
            "redis.url",
            "redis.key_prefix",
            "cache.l1_max_bytes",
            "cache.l1_ttl",
            "cache.l2_ttl",
            "http.max_body_bytes",
            "deployment.color",
        ],
        "{problems:#?}"
    );
}

#[test]
fn drain_delay_must_leave_time_within_the_shutdown_timeout() {
    let problems = problems(load_file(
        "[shutdown]\ndrain_delay = \"30s\"\ntimeout = \"25s\"\n[http]\nmax_in_flight = 0\n",
        &[],
    ));
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with("http.max_in_flight: must be at least 1"));
    assert!(
        problems[1].starts_with("shutdown.drain_delay: must be less than shutdown.timeout (25s)"),
        "{problems:#?}"
    );
    let s = load_file("[shutdown]\ndrain_delay = \"0s\"\n", &[]).unwrap();
    assert_eq!(s.shutdown.timeout, std::time::Duration::from_secs(25));
}

#[test]
fn worker_threads_default_to_one_per_cpu_and_are_bounded() {
    assert_eq!(load_env(&[]).unwrap().runtime.worker_threads, 0);
    let s = load_env(&[("TIERGATE_RUNTIME__WORKER_THREADS", "1")]).unwrap();
    assert_eq!(s.runtime.worker_threads, 1);
    let problems = problems(load_env(&[("TIERGATE_RUNTIME__WORKER_THREADS", "5000")]));
    assert_eq!(
        problems,
        [
            "runtime.worker_threads: must be at most 1024 (0: one per CPU), got 5000 \
          (from TIERGATE_RUNTIME__WORKER_THREADS)"
        ]
    );
}

#[test]
fn listeners_on_distinct_ports_or_port_zero_are_fine() {
    load_file(
        "[listen]\nhttp = \"127.0.0.1:8080\"\nadmin = \"127.0.0.2:8080\"\n",
        &[],
    )
    .unwrap();
    Settings::for_tests().validate().unwrap();
}

#[test]
fn a_secret_never_appears_in_output_or_problems() {
    let url = format!("postgres://app:{PASSWORD}@db.internal:5432/items");
    let redis = format!("rediss://:{PASSWORD}@cache.internal:6379");
    let s = load_env(&[("DATABASE_URL", &url), ("REDIS_URL", &redis)]).unwrap();
    assert_eq!(s.database.url.expose(), url);
    for shown in [
        format!("{s:?}"),
        format!("{:#?}", s),
        s.database.url.to_string(),
        s.to_redacted_toml(),
        serde_json::to_string(&s).unwrap(),
    ] {
        assert!(!shown.contains(PASSWORD), "{shown}");
    }
    let toml = s.to_redacted_toml();
    assert!(
        toml.contains("postgres://app:***@db.internal:5432/items"),
        "{toml}"
    );

    // Now make every path that can fail see the secret.
    let secret_file = TempFile::new(&format!("mysql://app:{PASSWORD}@db/items\n"));
    let bad_toml = TempFile::new(&format!(
        "[database]\nurl = \"postgres://app:{PASSWORD}@db/items\nnope = 1\n"
    ));
    let cases: Vec<Case<'_>> = vec![
        (
            None,
            vec![
                ("DATABASE_URL", format!("mysql://app:{PASSWORD}@db/items")),
                ("DATABASE_READER_URL", PASSWORD.to_owned()),
                ("REDIS_URL", format!("http://:{PASSWORD}@cache")),
                ("TIERGATE_DATABASE__PASSWORD", PASSWORD.to_owned()),
                ("TIERGATE_DATABASE_PASSWORD", PASSWORD.to_owned()),
                ("DB_PASSWORD", PASSWORD.to_owned()),
            ],
        ),
        (
            None,
            vec![
                ("DATABASE_URL_FILE", secret_file.path_str()),
                ("TIERGATE_DATABASE__READER_URL_FILE", secret_file.path_str()),
                ("REDIS_URL", PASSWORD.to_owned()),
                ("REDIS_URL_FILE", secret_file.path_str()),
            ],
        ),
        (Some(bad_toml.path()), vec![]),
    ];
    for (file, vars) in cases {
        let vars: HashMap<String, String> =
            vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let err = load(file, &vars).unwrap_err();
        assert!(!err.problems.is_empty());
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(PASSWORD), "{shown}");
        }
    }
}

#[test]
fn config_error_lists_one_problem_per_line() {
    let err = ConfigError {
        problems: vec!["a: bad".to_owned(), "b: worse".to_owned()],
    };
    assert_eq!(
        err.to_string(),
        "invalid configuration:\n  - a: bad\n  - b: worse"
    );
}

#[test]
fn redacted_toml_loads_back_as_a_file() {
    let s = load_file(
        "[deployment]\ncolor = \"blue\"\n[database]\nreader_url = \"postgres://r@h/d\"\n",
        &[],
    )
    .unwrap();
    let printed = s.to_redacted_toml();
    let again = load_file(&printed, &[]).unwrap();
    assert_eq!(again.to_redacted_toml(), printed);
}

#[test]
fn dev_example_loads() {
    let s = load(Some(Path::new(DEV)), &env(&[])).unwrap();
    assert_eq!(s.log.format, LogFormat::Text);
    assert_eq!(s.listen.admin, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(
        s.database.url.expose(),
        "postgres://postgres@127.0.0.1:5432/tiergate"
    );
    assert!(s.cache.l2_ttl < Settings::default().cache.l2_ttl);
}

#[test]
fn fargate_example_loads_with_secrets_from_the_environment() {
    let s = load(Some(Path::new(FARGATE)), &env(&[])).unwrap();
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.listen.http, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(s.listen.admin, "127.0.0.1:9090".parse().unwrap());

    let text = std::fs::read_to_string(FARGATE).unwrap();
    let uncommented: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !uncommented.contains("url"),
        "no URL (secret) set in the file"
    );

    let s = load(
        Some(Path::new(FARGATE)),
        &env(&[
            ("DATABASE_URL", "postgres://app:pw@writer:5432/items"),
            ("REDIS_URL", "rediss://:tok@cache:6379"),
            ("DEPLOYMENT_COLOR", "green"),
            ("PORT", "8081"),
        ]),
    )
    .unwrap();
    assert_eq!(
        s.database.url.expose(),
        "postgres://app:pw@writer:5432/items"
    );
    assert_eq!(s.redis.url.expose(), "rediss://:tok@cache:6379");
    assert_eq!(s.deployment.color.as_deref(), Some("green"));
    assert_eq!(s.listen.http, "0.0.0.0:8081".parse().unwrap());
}

#[test]
fn health_results_live_a_second_by_default_and_at_most_a_minute() {
    let s = load_env(&[]).unwrap();
    assert_eq!(s.health.max_age, std::time::Duration::from_secs(1));
    let s = load_env(&[("TIERGATE_HEALTH__MAX_AGE", "250ms")]).unwrap();
    assert_eq!(s.health.max_age, std::time::Duration::from_millis(250));
    for bad in ["0s", "5ms", "2m"] {
        assert_one_problem_containing(
            load_env(&[("TIERGATE_HEALTH__MAX_AGE", bad)]),
            "health.max_age: must be 10ms to 1m",
        );
    }
}

#[test]
fn the_access_sample_is_a_share() {
    assert_eq!(load_env(&[]).unwrap().log.access_sample, 1.0);
    let s = load_env(&[("TIERGATE_LOG__ACCESS_SAMPLE", "0.25")]).unwrap();
    assert_eq!(s.log.access_sample, 0.25);
    for bad in ["-0.1", "1.5", "NaN"] {
        assert_one_problem_containing(
            load_env(&[("TIERGATE_LOG__ACCESS_SAMPLE", bad)]),
            "log.access_sample: must be 0 to 1",
        );
    }
}

#[test]
fn span_export_is_off_by_default_and_its_settings_are_checked() {
    let s = load_env(&[]).unwrap();
    assert_eq!(s.trace.otlp_endpoint, None);
    let s = load_file(
        "[trace]\notlp_endpoint = \"http://collector:4318/v1/traces\"\nsample_ratio = 0.5\n",
        &[("TIERGATE_TRACE__SERVICE_NAME", "items-eu")],
    )
    .unwrap();
    assert_eq!(
        s.trace.otlp_endpoint.as_deref(),
        Some("http://collector:4318/v1/traces")
    );
    assert_eq!(s.trace.sample_ratio, 0.5);
    assert_eq!(s.trace.service_name, "items-eu");
    // The environment unsets what a file set.
    let off = load_file(
        "[trace]\notlp_endpoint = \"http://collector:4318/v1/traces\"\n",
        &[("TIERGATE_TRACE__OTLP_ENDPOINT", "")],
    )
    .unwrap();
    assert_eq!(off.trace.otlp_endpoint, None);
    let bad = [
        (
            "TIERGATE_TRACE__OTLP_ENDPOINT",
            "https://c:4318/v1/traces",
            "trace.otlp_endpoint: must be a plain http:// URL",
        ),
        (
            "TIERGATE_TRACE__OTLP_ENDPOINT",
            "collector:4318",
            "trace.otlp_endpoint: must be an http:// URL",
        ),
        (
            "TIERGATE_TRACE__OTLP_ENDPOINT",
            "http:///v1/traces",
            "trace.otlp_endpoint: must name a host",
        ),
        (
            "TIERGATE_TRACE__SAMPLE_RATIO",
            "1.5",
            "trace.sample_ratio: must be 0 to 1",
        ),
        (
            "TIERGATE_TRACE__SERVICE_NAME",
            "",
            "trace.service_name: must be 1 to 128 characters",
        ),
        (
            "TIERGATE_TRACE__QUEUE_SPANS",
            "0",
            "trace.queue_spans: must be 1 to 1000000",
        ),
        (
            "TIERGATE_TRACE__EXPORT_TIMEOUT",
            "10ms",
            "trace.export_timeout: must be 100ms to 1m",
        ),
    ];
    for (var, value, message) in bad {
        assert_one_problem_containing(load_env(&[(var, value)]), message);
    }
    // Credentials in the URL are refused without being repeated.
    let problems = problems(load_env(&[(
        "TIERGATE_TRACE__OTLP_ENDPOINT",
        "http://user:hunter2@c:4318/v1/traces",
    )]));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("must not hold credentials"),
        "{problems:?}"
    );
    assert!(!problems[0].contains("hunter2"), "{problems:?}");
}
