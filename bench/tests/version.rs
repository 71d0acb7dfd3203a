//! `--version` of the bench binaries: their own names, the commit and the build date, as
//! every Tiergate binary prints them.

// A test panics on what it controls.
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// Mutation: drop `name = "loadgen"` (clap then says `bench`), or the long version, and
/// this fails.
#[test]
fn bench_binaries_name_themselves_the_commit_and_the_date() {
    for (name, binary) in [
        ("loadgen", env!("CARGO_BIN_EXE_loadgen")),
        ("limit-server", env!("CARGO_BIN_EXE_limit-server")),
    ] {
        let out = Command::new(binary).arg("--version").output().unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        let line = String::from_utf8(out.stdout).unwrap();
        let expected = format!(
            "{name} {} (commit {}, built {})\n",
            env!("CARGO_PKG_VERSION"),
            build_info::COMMIT,
            build_info::DATE
        );
        assert_eq!(line, expected);
        assert_ne!(build_info::COMMIT, "", "{line}");
    }
}
