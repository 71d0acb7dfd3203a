//! The command line around the server: `--version`, shell completions, the man page.

use crate::startup::tiergate;

async fn stdout_of(args: &[&str]) -> String {
    let out = tiergate(&[])
        .args(args)
        .output()
        .await
        .expect("run tiergate");
    assert!(out.status.success(), "tiergate {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// What git says HEAD is in this checkout, or `None` outside git.
fn git_head() -> Option<String> {
    let out = std::process::Command::new("git")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Mutation: print clap's plain `version` again, or bake a commit other than HEAD's, and
/// this fails.
#[tokio::test]
async fn version_names_the_commit_and_the_build_date() {
    let line = stdout_of(&["--version"]).await;
    let expected_start = format!("tiergate {} (commit ", env!("CARGO_PKG_VERSION"));
    let rest = line
        .trim_end()
        .strip_prefix(&expected_start)
        .unwrap_or_else(|| panic!("{line:?}"));
    let (commit, built) = rest.split_once(", built ").expect("a build date");
    assert_eq!(commit, gateway::BUILD.commit, "the commit /health reports");
    // Built in a checkout without TIERGATE_COMMIT (the test run), the commit is HEAD's.
    if std::env::var_os("TIERGATE_COMMIT").is_none() {
        if let Some(head) = git_head() {
            assert_eq!(commit, head, "{line:?}");
        }
    }
    let date = built.strip_suffix(')').expect("closing parenthesis");
    let digits: Vec<bool> = date.chars().map(|c| c.is_ascii_digit()).collect();
    assert_eq!(date.len(), 10, "{date:?}");
    assert!(
        digits
            .iter()
            .enumerate()
            .all(|(i, d)| *d == !matches!(i, 4 | 7)),
        "YYYY-MM-DD: {date:?}"
    );
}

/// Mutation: leave a subcommand out of the definitions the generators read, and this
/// fails.
#[tokio::test]
async fn completions_and_the_man_page_name_every_subcommand() {
    let subcommands = [
        "serve",
        "migrate",
        "healthcheck",
        "config",
        "completions",
        "man",
    ];
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]).await;
        for subcommand in subcommands {
            assert!(script.contains(subcommand), "{shell}: no {subcommand}");
        }
    }
    let page = stdout_of(&["man"]).await;
    assert!(page.starts_with(".ie \\n(.g .ds Aq"), "roff: {page:.80}");
    assert!(page.contains(".TH tiergate 1"), "{page:.200}");
    for subcommand in subcommands {
        assert!(page.contains(subcommand), "man page: no {subcommand}");
    }
    // No configuration is read for these: a broken one does not stop them.
    let out = tiergate(&[("TIERGATE_DATABASE__POOL_MAX_SIZE", "many".into())])
        .args(["completions", "bash"])
        .output()
        .await
        .expect("run tiergate");
    assert!(out.status.success(), "{out:?}");
    let unknown = tiergate(&[])
        .args(["completions", "cmd.exe"])
        .output()
        .await
        .expect("run tiergate");
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("possible values"));
}
