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

/// `config print | config check -`: the printed secrets are redacted, so the copy is
/// refused, naming each secret, until the real ones are supplied (here through the
/// environment, which beats the file).
///
/// Mutation: drop the `secrets` check from `validate`, and the first check passes with
/// `***` as a password.
#[tokio::test]
async fn printed_config_is_refused_until_its_secrets_are_supplied() {
    use tokio::io::AsyncWriteExt as _;

    let secrets = [
        (
            "DATABASE_URL",
            "postgres://app:hunter2-db@db.internal:5432/shop".to_owned(),
        ),
        (
            "REDIS_URL",
            "rediss://:hunter2-redis@cache.internal:6379".to_owned(),
        ),
        (
            "TIERGATE_ADMIN__TOKEN",
            "hunter2-admin-token-0123".to_owned(),
        ),
    ];
    let out = tiergate(&secrets)
        .args(["config", "print"])
        .output()
        .await
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(!printed.contains("hunter2"), "secret leaked:\n{printed}");

    let check = |vars: &[(&str, String)]| {
        let mut cmd = tiergate(vars);
        cmd.args(["config", "check", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let mut stdin = child.stdin.take().expect("stdin");
        let printed = printed.clone();
        async move {
            stdin.write_all(printed.as_bytes()).await.expect("write");
            drop(stdin);
            child.wait_with_output().await.expect("wait")
        }
    };

    let refused = check(&[]).await;
    assert_eq!(refused.status.code(), Some(78), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    for (key, variable) in [
        ("database.url", "DATABASE_URL"),
        ("redis.url", "REDIS_URL"),
        ("admin.token", "TIERGATE_ADMIN__TOKEN"),
    ] {
        let line = stderr
            .lines()
            .find(|line| line.contains(&format!("- {key}: ")))
            .unwrap_or_else(|| panic!("{key} not named in:\n{stderr}"));
        assert!(
            line.contains("redacted") && line.contains(variable) && line.contains("standard input"),
            "{line}"
        );
    }
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("  - ")).count(),
        3,
        "only the secrets are refused:\n{stderr}"
    );

    let accepted = check(&secrets).await;
    assert_eq!(accepted.status.code(), Some(0), "{accepted:?}");

    // A file works as standard input does.
    let mut file = tempfile();
    file.1.write_all(printed.as_bytes()).unwrap();
    let out = tiergate(&[])
        .args(["config", "check", &file.0])
        .output()
        .await
        .expect("run");
    let _ = std::fs::remove_file(&file.0);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url"));
}
