//! What every Tiergate binary says about its build. `--version` and `/health` both read
//! these constants, so they never disagree.

/// The workspace's version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit built (12 hex digits), or `unknown` when built outside git without
/// `TIERGATE_COMMIT`.
pub const COMMIT: &str = env!("TIERGATE_COMMIT");

/// The UTC date of the build, `YYYY-MM-DD`.
pub const DATE: &str = env!("TIERGATE_BUILD_DATE");

/// What `--version` prints after the binary's name:
/// `0.1.0 (commit 0123456789ab, built 2026-12-07)`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TIERGATE_COMMIT"),
    ", built ",
    env!("TIERGATE_BUILD_DATE"),
    ")"
);
