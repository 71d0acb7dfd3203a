//! Bakes the git commit into the binary for `/health`: `TIERGATE_COMMIT` when set at build
//! time (the Dockerfile passes it in, having no `.git`), else `git rev-parse`, else
//! `unknown`; and the compiler's version for `tiergate_build_info`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TIERGATE_COMMIT");
    let given = std::env::var("TIERGATE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown");
    let commit = given
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|out| out.status.success())
                .and_then(|out| String::from_utf8(out.stdout).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TIERGATE_COMMIT={commit}");
    // The compiler's version for `tiergate_build_info`: `rustc 1.91.0 (…)` → `1.91.0`.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TIERGATE_RUSTC={version}");
    // Rebuild when HEAD moves (best effort: these paths exist only in a checkout).
    for path in ["../.git/HEAD", "../.git/refs/heads"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
