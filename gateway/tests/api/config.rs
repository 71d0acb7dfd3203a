//! The configuration as the binary sees it: exit 78 with every problem, redaction.

use std::io::Write;

use crate::startup::tiergate;

#[tokio::test]
async fn invalid_config_exits_78_naming_every_problem() {
    let mut file = tempfile();
    writeln!(file.1, "[cache]\nl1_ttl = \"soon\"\n[listen]\nport = 1").unwrap();
    let out = tiergate(&[
        ("TIERGATE_DATABASE__POOL_MAX_SIZE", "0".into()),
        ("TIERGATE_LISTEN__ADMIN", "not-an-address".into()),
        ("REDIS_URL", "http://127.0.0.1:6379".into()),
    ])
    .args(["--config", &file.0, "config", "check"])
    .output()
    .await
    .expect("run tiergate");
    let _ = std::fs::remove_file(&file.0);

    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "cache.l1_ttl",
        "listen.port",
        "database.pool_max_size",
        "listen.admin",
        "redis.url",
    ] {
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
}

#[tokio::test]
async fn serve_with_invalid_config_exits_78_before_binding() {
    let out = tiergate(&[("TIERGATE_DATABASE__POOL_MAX_SIZE", "many".into())])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TIERGATE_DATABASE__POOL_MAX_SIZE"));
}

#[tokio::test]
async fn config_print_shows_settings_without_secrets() {
    let out = tiergate(&[
        (
            "DATABASE_URL",
            "postgres://app:hunter2-secret@db.internal:5432/shop".into(),
        ),
        ("PORT", "8181".into()),
    ])
    .args(["config", "print"])
    .output()
    .await
    .expect("run");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("hunter2"), "secret leaked:\n{stdout}");
    assert!(
        stdout.contains("db.internal"),
        "the host is shown:\n{stdout}"
    );
    assert!(stdout.contains("0.0.0.0:8181"), "PORT applied:\n{stdout}");
}

#[tokio::test]
async fn config_check_accepts_the_examples() {
    for example in ["dev.toml", "fargate.toml", "blue-green.toml"] {
        let path = format!(
            "{}/../config/examples/{example}",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = tiergate(&[])
            .args(["--config", &path, "config", "check"])
            .output()
            .await
            .expect("run");
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn tempfile() -> (String, std::fs::File) {
    let path = std::env::temp_dir().join(format!("tiergate-test-{:016x}.toml", fastrand::u64(..)));
    let file = std::fs::File::create(&path).expect("create temp file");
    (path.to_string_lossy().into_owned(), file)
}

#[tokio::test]
async fn config_check_loads_the_tls_certificates() {
    let ca = crate::tls::TestCa::new();
    let good = ca.issue("good", &["localhost"]);
    let check = |cert: &std::path::Path, key: &std::path::Path| {
        tiergate(&[
            ("TIERGATE_LISTEN__HTTPS", "127.0.0.1:0".into()),
            ("TIERGATE_TLS__CERT", cert.display().to_string()),
            ("TIERGATE_TLS__KEY", key.display().to_string()),
        ])
        .args(["config", "check"])
        .output()
    };
    let out = check(&good.cert, &good.key).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A key that belongs to another certificate.
    let other = ca.issue("other", &["localhost"]);
    let out = check(&good.cert, &other.key).await.unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls: ") && stderr.contains("other.key"),
        "{stderr}"
    );
}
