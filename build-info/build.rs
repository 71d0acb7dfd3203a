//! Bakes the git commit and the build date into `build-info`'s constants.
//!
//! - The commit: `TIERGATE_COMMIT` when set (a Docker build has no `.git`, so the
//!   Dockerfile passes it in), else `git rev-parse --short=12 HEAD` in this checkout, else
//!   `unknown` (a source tarball).
//! - The date: `SOURCE_DATE_EPOCH` when set (reproducible builds), else the day this
//!   script ran, in UTC. It reruns when the commit changes, so the date is that of the
//!   first build of the commit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

fn main() {
    println!("cargo:rerun-if-env-changed=TIERGATE_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());

    let given = std::env::var("TIERGATE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown");
    let commit = given
        .or_else(|| git(&manifest_dir, &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TIERGATE_COMMIT={commit}");

    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|secs| secs.trim().parse().ok())
        .map_or_else(SystemTime::now, |secs| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
        });
    let date = humantime::format_rfc3339_seconds(built).to_string();
    let day = date.get(..10).unwrap_or("unknown");
    println!("cargo:rustc-env=TIERGATE_BUILD_DATE={day}");

    for file in git_files_that_move_with_head(&manifest_dir) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
}

/// What changes when HEAD moves, wherever this checkout keeps it (a worktree's `.git` is a
/// file naming another folder): HEAD itself, the packed refs, and the branch's own file,
/// or the branches' folder while that file does not exist (after a fresh clone, whose
/// refs are all packed, the first commit creates it there). Only paths that exist: cargo
/// reruns for a missing one every time.
fn git_files_that_move_with_head(dir: &Path) -> Vec<PathBuf> {
    let path = |name: &str| {
        git(dir, &["rev-parse", "--git-path", name])
            .map(|path| dir.join(path))
            .filter(|path| path.exists())
    };
    let branch = git(dir, &["symbolic-ref", "-q", "HEAD"])
        .and_then(|branch| path(&branch))
        .or_else(|| path("refs/heads"));
    [path("HEAD"), path("packed-refs"), branch]
        .into_iter()
        .flatten()
        .collect()
}

/// What `git ARGS` prints in `dir`, trimmed; `None` when git is missing, fails, or
/// prints nothing.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}
