//! [`load()`]: built-in defaults < TOML file < environment, then validation.
//!
//! The layers are merged as one TOML tree before anything is typed, so a later layer only
//! has to name the keys it changes. The tree is then deserialized one section at a time and
//! validated; every step records problems and carries on, so one run lists them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use toml::{Table, Value};

use crate::{ConfigError, Settings, Source, validate};

/// Prefix of the variables that set any key: `TIERGATE_SECTION__KEY`.
const PREFIX: &str = "TIERGATE_";

/// Suffix of a variable that names a file holding the value (Docker/Kubernetes secrets).
const FILE_SUFFIX: &str = "_FILE";

/// Percent-encode all but RFC 3986's unreserved characters, which is safe anywhere in a URL.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Loads settings: built-in defaults, then `file` if given, then the environment, then
/// validation. See the crate docs for the variables read.
///
/// # Errors
///
/// A [`ConfigError`] listing every problem found: an unreadable or malformed file, unknown
/// keys, variables that don't parse or name no setting, values of the wrong type and values
/// out of range. No message contains a secret.
pub fn load(file: Option<&Path>, env: &dyn Source) -> Result<Settings, ConfigError> {
    let file = file.map(|path| (path.display().to_string(), std::fs::read_to_string(path)));
    load_layers(file, env)
}

/// As [`load()`], with the file's text at hand instead of its path: `name` is how problems
/// refer to it (`tiergate config check -` reads standard input).
///
/// # Errors
///
/// As [`load()`].
pub fn load_text(name: &str, text: &str, env: &dyn Source) -> Result<Settings, ConfigError> {
    load_layers(Some((name.to_owned(), Ok(text.to_owned()))), env)
}

/// The file (its name and what reading it gave), then the environment.
fn load_layers(
    file: Option<(String, std::io::Result<String>)>,
    env: &dyn Source,
) -> Result<Settings, ConfigError> {
    let mut loader = Loader::new();
    if let Some((shown, text)) = file {
        loader.apply_file(&shown, text);
    }
    // Conventional variables first, so an explicit TIERGATE_ variable wins over them.
    loader.apply_conventional_env(env);
    loader.apply_tiergate_env(env);
    let (settings, failed) = loader.deserialize();
    loader.validate(&settings, &failed);
    if loader.problems.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigError {
            problems: loader.problems,
        })
    }
}

/// What a key path names.
enum Kind<'a> {
    /// A setting, with a value of its type (from the defaults) to direct parsing.
    Setting(&'a Value),
    /// A section (a table of settings).
    Section,
    /// Nothing; carries the keys that would have been valid at the point the path went wrong.
    Unknown(Vec<String>),
}

struct Loader {
    /// The merged tree being built.
    tree: Table,
    /// Built-in defaults, real secrets included. Keys missing here but present in `schema`
    /// are `Option`s.
    defaults: Table,
    /// Every key there is, each with a value of its type.
    schema: Table,
    /// Which file or variable set a key path last, to say so in its problems.
    origins: BTreeMap<String, String>,
    problems: Vec<String>,
}

impl Loader {
    fn new() -> Self {
        let defaults = Settings::default();
        // Cannot fail: the defaults hold no integer TOML can't represent (a test loads them).
        let mut tree = Table::try_from(&defaults).unwrap_or_default();
        // `Secret` serializes redacted; put the real values back so defaults are usable.
        for (path, secret) in defaults.secrets() {
            insert(
                &mut tree,
                &split(path),
                Value::String(secret.expose().to_owned()),
            );
        }
        let schema = Table::try_from(Settings::every_key()).unwrap_or_default();
        Self {
            defaults: tree.clone(),
            tree,
            schema,
            origins: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    // ---- file -------------------------------------------------------------------------

    fn apply_file(&mut self, shown: &str, text: std::io::Result<String>) {
        let text = match text {
            Ok(text) => text,
            Err(e) => {
                self.problems.push(format!("{shown}: cannot read: {e}"));
                return;
            }
        };
        let table: Table = match toml::from_str(&text) {
            Ok(table) => table,
            Err(e) => {
                // Only the message and position: toml's full Display quotes the source line,
                // which may hold a password.
                let at = e
                    .span()
                    .map(|span| {
                        let (line, column) = line_column(&text, span.start);
                        format!(":{line}:{column}")
                    })
                    .unwrap_or_default();
                let message = e.message().trim_end();
                self.problems.push(format!("{shown}{at}: {message}"));
                return;
            }
        };
        let mut tree = std::mem::take(&mut self.tree);
        self.merge(&mut tree, table, &[], shown);
        self.tree = tree;
    }

    /// Deep-merges `from` into `into` (`file`'s table at key path `at`), dropping and reporting
    /// keys the schema doesn't know, so that deserialization sees only known keys.
    fn merge(&mut self, into: &mut Table, from: Table, at: &[String], file: &str) {
        for (key, value) in from {
            let path = [at, std::slice::from_ref(&key)].concat();
            let dotted = path.join(".");
            match classify(&self.schema, &path) {
                Kind::Unknown(known) => {
                    self.problems.push(format!(
                        "{file}: unknown key `{dotted}`; expected one of: {}",
                        known.join(", ")
                    ));
                }
                Kind::Section => match (into.get_mut(&key), value) {
                    (Some(Value::Table(into)), Value::Table(from)) => {
                        self.merge(into, from, &path, file);
                    }
                    (_, value) => {
                        // Not a table where one belongs: keep it, so deserialization reports
                        // the type error against this key.
                        self.origins.insert(dotted, format!("set in {file}"));
                        into.insert(key, value);
                    }
                },
                Kind::Setting(_) => {
                    self.origins.insert(dotted, format!("set in {file}"));
                    into.insert(key, value);
                }
            }
        }
    }

    // ---- environment --------------------------------------------------------------------

    /// The variables ECS (and most platforms) inject, mapped onto settings. Empty values count
    /// as unset, since a task definition often passes an empty string for "not configured".
    fn apply_conventional_env(&mut self, env: &dyn Source) {
        match self.read_var(env, "DATABASE_URL") {
            Some((url, var)) => self.set_string("database.url", url, &var),
            None => {
                if let Some((host, _)) = self.read_var(env, "DB_HOST") {
                    self.compose_database_url(env, &host);
                }
            }
        }
        if let Some((url, var)) = self.read_var(env, "DATABASE_READER_URL") {
            self.set_string("database.reader_url", url, &var);
        }

        match self.read_var(env, "REDIS_URL") {
            Some((url, var)) => self.set_string("redis.url", url, &var),
            None => {
                if let Some((host, var)) = self.read_var(env, "REDIS_HOST") {
                    let port = match self.read_var(env, "REDIS_PORT") {
                        Some((raw, var)) => self.parse_port(&var, &raw),
                        None => Some(6379),
                    };
                    if let Some(port) = port {
                        let url = format!("redis://{}:{port}", url_host(&host));
                        self.set_string("redis.url", url, &var);
                    }
                }
            }
        }

        if let Some((raw, var)) = self.read_var(env, "PORT") {
            if let Some(port) = self.parse_port(&var, &raw) {
                // Keep the configured IP; a malformed address is reported by deserialization.
                let current = self.tree.get("listen").and_then(|l| l.get("http"));
                if let Some(Ok(addr)) = current
                    .and_then(Value::as_str)
                    .map(str::parse::<SocketAddr>)
                {
                    let addr = SocketAddr::new(addr.ip(), port);
                    self.set_string("listen.http", addr.to_string(), &var);
                }
            }
        }

        if let Some((color, var)) = self.read_var(env, "DEPLOYMENT_COLOR") {
            self.set_string("deployment.color", color, &var);
        }
    }

    /// `postgres://user:password@host:port/name` from `DB_HOST` and friends, as RDS-linked
    /// task definitions provide them. User, password and name are percent-encoded, since RDS
    /// generated passwords routinely contain `@`, `:` and `/`.
    fn compose_database_url(&mut self, env: &dyn Source, host: &str) {
        let port = match self.read_var(env, "DB_PORT") {
            Some((raw, var)) => self.parse_port(&var, &raw),
            None => Some(5432),
        };
        let user = self.read_var(env, "DB_USER").map(|(v, _)| v);
        let password = self.read_var(env, "DB_PASSWORD").map(|(v, _)| v);
        let name = self.read_var(env, "DB_NAME").map(|(v, _)| v);
        let Some(port) = port else { return };

        let user = user.as_deref().unwrap_or("postgres");
        let mut url = format!("postgres://{}", utf8_percent_encode(user, COMPONENT));
        if let Some(password) = &password {
            url.push(':');
            url.extend(utf8_percent_encode(password, COMPONENT));
        }
        let name = name.as_deref().unwrap_or("postgres");
        url.push_str(&format!(
            "@{}:{port}/{}",
            url_host(host),
            utf8_percent_encode(name, COMPONENT)
        ));
        self.set_string("database.url", url, "DB_HOST and the other DB_* variables");
    }

    /// `TIERGATE_SECTION__KEY` (any case) for every key, each also as `…_FILE`.
    fn apply_tiergate_env(&mut self, env: &dyn Source) {
        let mut names: Vec<String> = env
            .names()
            .into_iter()
            .filter(|name| {
                name.get(..PREFIX.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
            })
            .collect();
        names.sort();

        // Group by target first: two variables for one key (NAME and NAME_FILE, or two
        // spellings) is ambiguous, and picking one silently would hide a mistake.
        let mut targets: BTreeMap<Vec<String>, Vec<(String, bool)>> = BTreeMap::new();
        for name in names {
            let rest = &name[PREFIX.len()..];
            if !rest.contains("__") {
                self.check_unnested(&name, rest);
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            let kind = classify(&self.schema, &path);
            if let Kind::Setting(_) = kind {
                targets.entry(path).or_default().push((name, false));
            } else if let Some(base) = file_target(&self.schema, &path) {
                targets.entry(base).or_default().push((name, true));
            } else {
                let dotted = path.join(".");
                self.problems.push(match kind {
                    Kind::Unknown(known) => format!(
                        "{name}: there is no setting `{dotted}`; expected one of: {}",
                        known.join(", ")
                    ),
                    _ => format!(
                        "{name}: `{dotted}` is a section, not a setting; \
                         set its keys as {name}__<KEY>"
                    ),
                });
            }
        }

        for (path, vars) in targets {
            let [(name, is_file)] = vars.as_slice() else {
                let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
                let all = if names.len() == 2 { "both" } else { "all" };
                self.problems.push(format!(
                    "{} are {all} set for `{}`; set only one",
                    names.join(" and "),
                    path.join(".")
                ));
                continue;
            };
            let Some(raw) = env.get(name) else { continue };
            let value = if *is_file {
                match self.read_secret_file(name, &raw) {
                    Some(value) => value,
                    None => continue,
                }
            } else {
                raw
            };
            self.set(&path, value, name);
        }
    }

    /// A `TIERGATE_` variable without `__` sets nothing. Names like `TIERGATE_CONFIG` are left
    /// to the binary; one that is a section's name, or starts with one, is almost surely a
    /// setting missing its key or with a single underscore where `__` belongs, and silently
    /// ignoring it would hide that.
    fn check_unnested(&mut self, name: &str, rest: &str) {
        let lower = rest.to_ascii_lowercase();
        if self.schema.contains_key(&lower) {
            self.problems.push(format!(
                "{name}: `{lower}` is a section, not a setting; set its keys as {name}__<KEY>"
            ));
            return;
        }
        let section = self.schema.keys().find(|section| {
            lower
                .strip_prefix(section.as_str())
                .is_some_and(|after| after.starts_with('_'))
        });
        if let Some(section) = section {
            let key = &rest[section.len() + 1..];
            self.problems.push(format!(
                "{name}: not a setting; did you mean {}{}__{key}? \
                 (a section and its key are separated by `__`)",
                &name[..PREFIX.len()],
                &rest[..section.len()]
            ));
        }
    }

    /// Reads a conventional variable `name`, or the file `name_FILE` points to.
    /// Returns the value and the variable it came from.
    fn read_var(&mut self, env: &dyn Source, name: &str) -> Option<(String, String)> {
        let file_var = format!("{name}{FILE_SUFFIX}");
        let value = env.get(name).filter(|v| !v.is_empty());
        let file = env.get(&file_var).filter(|v| !v.is_empty());
        match (value, file) {
            (Some(_), Some(_)) => {
                self.problems
                    .push(format!("{name} and {file_var} are both set; set only one"));
                None
            }
            (Some(value), None) => Some((value, name.to_owned())),
            (None, Some(path)) => self
                .read_secret_file(&file_var, &path)
                .map(|v| (v, file_var)),
            (None, None) => None,
        }
    }

    /// The content of a secret file, less one trailing newline: `echo` and most editors add
    /// one that nobody means as part of the value. Errors name the variable and path, never
    /// the content.
    fn read_secret_file(&mut self, var: &str, path: &str) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(mut text) => {
                if text.ends_with("\r\n") {
                    text.truncate(text.len() - 2);
                } else if text.ends_with('\n') {
                    text.truncate(text.len() - 1);
                }
                Some(text)
            }
            Err(e) => {
                self.problems
                    .push(format!("{var}: cannot read the file {path:?}: {e}"));
                None
            }
        }
    }

    fn parse_port(&mut self, var: &str, raw: &str) -> Option<u16> {
        match raw.trim().parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => {
                self.problems.push(format!(
                    "{var}: expected a port number (1-65535), got {raw:?}"
                ));
                None
            }
        }
    }

    fn set_string(&mut self, dotted: &str, value: String, origin_var: &str) {
        self.set(&split(dotted), value, origin_var);
    }

    /// Sets a key from a variable's string, typed by the key's default: integer, boolean or
    /// float where the default is one, else the string as is (durations, addresses and enums
    /// parse during deserialization). The type comes from the defaults rather than the merged
    /// tree, so a mistyped file value can't change how the variable is read.
    fn set(&mut self, path: &[String], raw: String, var: &str) {
        let Kind::Setting(example) = classify(&self.schema, path) else {
            return;
        };
        let value = match example {
            Value::Integer(_) => match raw.trim().parse::<i64>() {
                Ok(n) => Value::Integer(n),
                Err(_) => {
                    self.problems
                        .push(format!("{var}: expected an integer, got {raw:?}"));
                    return;
                }
            },
            Value::Boolean(_) => match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => Value::Boolean(true),
                "false" | "0" => Value::Boolean(false),
                _ => {
                    self.problems
                        .push(format!("{var}: expected true, false, 1 or 0, got {raw:?}"));
                    return;
                }
            },
            Value::Float(_) => match raw.trim().parse::<f64>() {
                Ok(x) => Value::Float(x),
                Err(_) => {
                    self.problems
                        .push(format!("{var}: expected a number, got {raw:?}"));
                    return;
                }
            },
            _ => Value::String(raw),
        };
        let dotted = path.join(".");
        // An empty value unsets an optional key, so the environment can undo a file's
        // `reader_url` or `color`.
        let optional = get(&self.defaults, path).is_none();
        if optional && value.as_str() == Some("") {
            remove(&mut self.tree, path);
        } else {
            insert(&mut self.tree, path, value);
        }
        self.origins.insert(dotted, format!("from {var}"));
    }

    // ---- typing and validation ----------------------------------------------------------

    /// Deserializes each section on its own, so one bad section doesn't hide the others.
    /// Returns the settings (bad keys replaced by defaults) and the key paths that failed.
    fn deserialize(&mut self) -> (Settings, Vec<String>) {
        let mut tree = std::mem::take(&mut self.tree);
        let mut failed = Vec::new();
        let settings = Settings {
            listen: self.section(&mut tree, "listen", &mut failed),
            tls: self.section(&mut tree, "tls", &mut failed),
            database: self.section(&mut tree, "database", &mut failed),
            redis: self.section(&mut tree, "redis", &mut failed),
            cache: self.section(&mut tree, "cache", &mut failed),
            http: self.section(&mut tree, "http", &mut failed),
            health: self.section(&mut tree, "health", &mut failed),
            deployment: self.section(&mut tree, "deployment", &mut failed),
            log: self.section(&mut tree, "log", &mut failed),
            trace: self.section(&mut tree, "trace", &mut failed),
            shutdown: self.section(&mut tree, "shutdown", &mut failed),
            admin: self.section(&mut tree, "admin", &mut failed),
            proxy: self.section(&mut tree, "proxy", &mut failed),
            runtime: self.section(&mut tree, "runtime", &mut failed),
            fleet: self.section(&mut tree, "fleet", &mut failed),
            routes: self.section(&mut tree, "routes", &mut failed),
            upstreams: self.section(&mut tree, "upstreams", &mut failed),
        };
        (settings, failed)
    }

    fn section<T: DeserializeOwned + Default>(
        &mut self,
        tree: &mut Table,
        name: &str,
        failed: &mut Vec<String>,
    ) -> T {
        let Some(mut value) = tree.remove(name) else {
            return T::default();
        };
        // serde stops at the first error. Report it, drop that key so it falls back to its
        // default, and go again until the section parses: every bad key gets reported. Each
        // round removes a key, so this ends.
        loop {
            let err = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(parsed) => return parsed,
                Err(err) => err,
            };
            let mut path = vec![name.to_owned()];
            path.extend(err.path().iter().filter_map(|segment| match segment {
                Segment::Map { key } => Some(key.clone()),
                Segment::Seq { index } => Some(index.to_string()),
                Segment::Enum { variant } => Some(variant.clone()),
                Segment::Unknown => None,
            }));
            let dotted = path.join(".");
            self.problem_at(&dotted, err.inner().message());
            failed.push(dotted);
            let removed = match &mut value {
                Value::Table(table) => remove(table, &path[1..]),
                _ => false,
            };
            if !removed {
                return T::default();
            }
        }
    }

    fn validate(&mut self, settings: &Settings, failed: &[String]) {
        let broken = |key: &str| {
            failed
                .iter()
                .any(|f| key == f || key.starts_with(&format!("{f}.")))
        };
        for invalid in validate::check(settings) {
            // A key that failed to parse holds a stand-in default; judging it would add a
            // second, misleading problem.
            if invalid.keys.iter().any(|key| broken(key)) {
                continue;
            }
            let key = invalid.keys.first().copied().unwrap_or_default();
            self.problem_at(key, &invalid.message);
        }
    }

    /// Records a problem about a key, naming the file or variable that set it.
    fn problem_at(&mut self, dotted: &str, message: &str) {
        // The key's own origin, else that of a key above it (a file that set a whole
        // section wrongly) or below it (a section that failed as a whole).
        let origin = self.origins.get(dotted).or_else(|| {
            self.origins
                .iter()
                .find(|(path, _)| {
                    path.starts_with(&format!("{dotted}."))
                        || dotted.starts_with(&format!("{path}."))
                })
                .map(|(_, origin)| origin)
        });
        match origin {
            Some(origin) => self
                .problems
                .push(format!("{dotted}: {message} ({origin})")),
            None => self.problems.push(format!("{dotted}: {message}")),
        }
    }
}

// ---- tree helpers ---------------------------------------------------------------------------

fn split(dotted: &str) -> Vec<String> {
    dotted.split('.').map(str::to_owned).collect()
}

fn classify<'a>(schema: &'a Table, path: &[String]) -> Kind<'a> {
    let mut table = schema;
    for (i, segment) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        match table.get(segment) {
            Some(Value::Table(inner)) if !last => table = inner,
            Some(Value::Table(_)) => return Kind::Section,
            Some(value) if last => return Kind::Setting(value),
            _ => return Kind::Unknown(table.keys().cloned().collect()),
        }
    }
    Kind::Section
}

/// For `…_file` paths: the setting the file variant stands for, if there is one.
fn file_target(schema: &Table, path: &[String]) -> Option<Vec<String>> {
    let (last, parents) = path.split_last()?;
    let base = last.strip_suffix(&FILE_SUFFIX.to_ascii_lowercase())?;
    let target = [parents, &[base.to_owned()]].concat();
    matches!(classify(schema, &target), Kind::Setting(_)).then_some(target)
}

fn get<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut table = table;
    for segment in parents {
        table = table.get(segment)?.as_table()?;
    }
    table.get(last)
}

/// Sets `path`, creating sections as needed. Does nothing where a file put a non-table in a
/// section's place: that error is reported when the section is deserialized.
fn insert(table: &mut Table, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut table = table;
    for segment in parents {
        let entry = table
            .entry(segment.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(inner) => table = inner,
            _ => return,
        }
    }
    table.insert(last.clone(), value);
}

/// Removes `path`; false if there was nothing to remove.
fn remove(table: &mut Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut table = table;
    for segment in parents {
        match table.get_mut(segment) {
            Some(Value::Table(inner)) => table = inner,
            _ => return false,
        }
    }
    table.remove(last).is_some()
}

/// Brackets a bare IPv6 address for use in a URL.
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
