//! The documentation kept true: the README stays an introduction that leads to every page
//! of `docs/`, links lead to files in the repository, nothing cites documents kept
//! outside it, and what the pages name (configuration keys, metrics, tests) exists in
//! the code, and the other way round.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::startup::tiergate;

/// The repository's root.
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The README's length limit: past it, the README is becoming a manual again.
const README_MAX_LINES: usize = 300;

fn root() -> PathBuf {
    Path::new(ROOT).to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir`, except build output and git's own.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn markdown_files() -> Vec<PathBuf> {
    files_under(&root())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect()
}

/// The targets of the inline links `[text](target)` in `markdown`, as written.
fn link_targets(markdown: &str) -> Vec<&str> {
    markdown
        .match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &markdown[at + 2..];
            rest.find(')').map(|end| &rest[..end])
        })
        .collect()
}

/// The file a relative link in `from` points to; `None` for a web address or an anchor
/// in the same page.
fn linked_file(from: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split('#').next().unwrap_or("");
    let external = ["http://", "https://", "mailto:"]
        .iter()
        .any(|scheme| target.starts_with(scheme));
    if external || path.is_empty() {
        return None;
    }
    Some(from.parent().unwrap().join(path))
}

/// `path` with `.` and `..` resolved, without touching the file system.
fn normalized(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Mutation checked: with a line added to a 300-line README, or a link to one `docs/`
/// page removed from it, this fails naming the page.
#[test]
fn the_readme_is_short_and_links_every_page_of_docs() {
    let readme_path = root().join("README.md");
    let readme = read(&readme_path);
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; at most {README_MAX_LINES}: move reference material to docs/"
    );
    let linked: BTreeSet<PathBuf> = link_targets(&readme)
        .into_iter()
        .filter_map(|target| linked_file(&readme_path, target))
        .map(|path| normalized(&path))
        .collect();
    let pages = files_under(&root().join("docs"));
    assert!(!pages.is_empty(), "docs/ is empty");
    for page in pages {
        assert!(
            linked.contains(&normalized(&page)),
            "README.md does not link {}",
            page.display()
        );
    }
}

/// Mutation checked: a link to `docs/nope.md` in any Markdown file fails naming the file
/// and the link.
#[test]
fn every_relative_link_leads_to_a_file_in_the_repository() {
    let root = normalized(&root());
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = read(&file);
        for target in link_targets(&text) {
            let Some(path) = linked_file(&file, target) else {
                continue;
            };
            let path = normalized(&path);
            if !path.starts_with(&root) || !path.exists() {
                broken.push(format!("{}: ({target})", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The repository must stand alone: design documents kept outside it cannot be read by
/// someone who clones it. Mutation checked: a comment citing the cache design's file by
/// its old name fails naming the file.
#[test]
fn nothing_cites_documents_outside_the_repository() {
    // Spelled in pieces, so this file does not cite them itself.
    let outside: Vec<String> = ["CACHE", "DESIGN", "STYLE"]
        .iter()
        .map(|name| format!("{name}.md"))
        .chain(std::iter::once(format!("{}/", "shared")))
        .collect();
    let mut citing = Vec::new();
    for file in files_under(&root()) {
        let Ok(text) = std::fs::read(&file) else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        for needle in &outside {
            if text.contains(needle.as_str()) {
                citing.push(format!("{}: {needle}", file.display()));
            }
        }
    }
    assert!(
        citing.is_empty(),
        "cite a page of docs/ instead:\n{}",
        citing.join("\n")
    );
}

/// The `section.key` names in the first column of the tables of `docs/configuration.md`.
fn documented_keys() -> BTreeSet<String> {
    read(&root().join("docs/configuration.md"))
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|cell| cell.split_once('`').map(|(key, _)| key.to_owned()))
        .filter(|key| key.contains('.'))
        .collect()
}

/// Mutation checked: with the row of `cache.max_stale` removed from the page, the first
/// half fails; with a row for `cache.nope` added, the second.
#[tokio::test]
async fn every_setting_is_documented_and_every_documented_one_exists() {
    let documented = documented_keys();

    let out = tiergate(&[])
        .args(["config", "print"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let mut section = None;
    for line in printed.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            // `[[routes]]` and `[[upstreams]]` are tables of their own, documented apart.
            section = (!name.starts_with('[')).then(|| name.to_owned());
        } else if let (Some(section), Some((key, _))) = (&section, line.split_once(" = ")) {
            let key = format!("{section}.{key}");
            assert!(
                documented.contains(&key),
                "`{key}` is not documented in docs/configuration.md"
            );
        }
    }

    // Each documented key set at once from the environment: a key the binary does not
    // know is reported as no setting (values it cannot use are reported otherwise).
    let vars: Vec<(String, String)> = documented
        .iter()
        .map(|key| {
            let var = format!("TIERGATE_{}", key.replace('.', "__").to_uppercase());
            (var, "?".to_owned())
        })
        .collect();
    let vars: Vec<(&str, String)> = vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let out = tiergate(&vars)
        .args(["config", "check"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let unknown: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("there is no setting") || line.contains("is a section"))
        .collect();
    assert!(
        unknown.is_empty(),
        "documented in docs/configuration.md but not settings:\n{}",
        unknown.join("\n")
    );
}

/// The `tiergate_…` words in `text`.
fn tiergate_names(text: &str) -> BTreeSet<&str> {
    text.match_indices("tiergate_")
        .filter(|(at, _)| {
            // A word, not the tail of a longer one (`TIERGATE_` variables are upper case).
            !text[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// The server's source code: every file under the crates' `src/` and `migrations/`.
fn source_files() -> Vec<PathBuf> {
    [
        "config/src",
        "app-core/src",
        "app-core/migrations",
        "gateway/src",
    ]
    .iter()
    .flat_map(|dir| files_under(&root().join(dir)))
    .collect()
}

/// Mutation checked: with `tiergate_http_shed_total` renamed in the code, both halves
/// fail (the code's new name is not documented; the documented name is gone).
#[test]
fn every_metric_is_documented_and_every_documented_name_exists() {
    let code: String = source_files().iter().map(|f| read(f)).collect();
    let metrics_page = read(&root().join("docs/operations.md"));

    // Registered metrics are string literals `"tiergate_…"` in the server's code (test
    // support and settings' variable names aside).
    let registered: BTreeSet<String> = source_files()
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "testing.rs"))
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
        .flat_map(|f| {
            let text = read(f);
            tiergate_names(&text)
                .into_iter()
                .filter(|name| text.contains(&format!("\"{name}\"")) && !name.contains("__"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(registered.len() > 20, "found only {registered:?}");
    for metric in &registered {
        assert!(
            metrics_page.contains(&format!("`{metric}`")),
            "{metric} is not listed in docs/operations.md#metrics"
        );
    }

    // The user's documentation; the changelog may name what no longer exists.
    let pages = files_under(&root().join("docs"))
        .into_iter()
        .chain(std::iter::once(root().join("README.md")));
    for page in pages {
        let text = read(&page);
        for name in tiergate_names(&text) {
            assert!(
                code.contains(name),
                "{} names {name}, which is nowhere in the code",
                page.display()
            );
        }
    }
}

/// Mutation checked: with a test in the race table renamed on the page, this fails
/// naming it.
#[test]
fn every_test_the_cache_protocol_names_exists() {
    let page = read(&root().join("docs/cache-protocol.md"));
    let tests: String = ["app-core", "gateway"]
        .iter()
        .flat_map(|dir| files_under(&root().join(dir)))
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
        .map(|f| read(&f))
        .collect();
    // Test names are long snake-case sentences; settings and metrics have dots or a
    // `tiergate_` prefix.
    let named: Vec<&str> = page
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|word| {
            word.matches('_').count() >= 4
                && !word.starts_with("tiergate_")
                && word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(named.len() >= 12, "found only {named:?}");
    for test in named {
        assert!(
            tests.contains(&format!("fn {test}(")),
            "docs/cache-protocol.md names the test {test}, which does not exist"
        );
    }
}

/// The metric names in the first column of the tables under `## Metrics` in
/// `docs/operations.md`.
fn documented_metrics() -> BTreeSet<String> {
    let page = read(&root().join("docs/operations.md"));
    let start = page.find("\n## Metrics").expect("a Metrics section");
    let section = &page[start + 1..];
    let end = section[1..]
        .find("\n## ")
        .map_or(section.len(), |at| at + 1);
    section[..end]
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|cell| cell.split_once('`').map(|(name, _)| name.to_owned()))
        .collect()
}

/// The metric names a Prometheus text declares (`# TYPE name kind`).
fn served_metrics(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// A running instance, with a route to an upstream group, an HTTPS listener and a read
/// replica, after a request of each kind (and a failed TLS handshake): what its `/metrics` serves and what
/// docs/operations.md lists are the same names.
///
/// Mutation checked: with the row of `tiergate_cache_l1_bytes` removed from the page,
/// the first half fails; with a row for `tiergate_nope_total` added, the second.
#[tokio::test]
async fn the_metrics_a_running_instance_serves_are_the_documented_ones() {
    use crate::helpers::{Backends, TestApp};
    use crate::upstream::Upstream;
    use tiergate_config::{RouteSettings, Secret, UpstreamSettings};

    let backends = Backends::new().await;
    let web = Upstream::start("web").await;
    let mut settings = backends.settings();
    settings
        .routes
        .push(RouteSettings::upstream("web", "/web", "web"));
    settings.upstreams = vec![UpstreamSettings::new("web", &[&web.target()])];
    settings.listen.https = Some("127.0.0.1:0".parse().unwrap());
    settings.database.reader_url = Some(Secret::new(backends.db.url.clone()));
    let app = TestApp::start(settings).await;
    let item = app.create("counted").await;
    assert_eq!(
        app.get(&format!("/items/{}", item["id"])).await.status(),
        200
    );
    assert_eq!(app.get("/web/x").await.status(), 200);
    // A handshake that fails: what the TLS listener counts.
    let mut tls = tokio::net::TcpStream::connect(app.https.unwrap())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tls, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut Vec::new()).await;

    let served = served_metrics(&app.metrics().await);
    let documented = documented_metrics();
    let undocumented: Vec<&String> = served.difference(&documented).collect();
    let absent: Vec<&String> = documented.difference(&served).collect();
    app.stop().await;
    assert!(
        undocumented.is_empty(),
        "served but not in docs/operations.md#metrics: {undocumented:?}"
    );
    assert!(
        absent.is_empty(),
        "in docs/operations.md#metrics but not served: {absent:?}"
    );
}
