//! Converts the API contract, `docs/openapi.yaml`, to JSON once, at build time: the admin
//! listener serves both forms (`/openapi.yaml`, `/openapi.json`), and a document that does
//! not parse fails the build instead of a request. Also records the compiler's version
//! for `tiergate_build_info`. (The commit is `build-info`'s.)

use std::error::Error;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    // The compiler's version for `tiergate_build_info`: `rustc 1.91.0 (…)` → `1.91.0`.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TIERGATE_RUSTC={version}");

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let source = manifest_dir.join("../docs/openapi.yaml");
    println!("cargo:rerun-if-changed={}", source.display());
    let yaml = std::fs::read_to_string(&source)
        .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
    let document: serde_json::Value = serde_norway::from_str(&yaml)
        .map_err(|e| format!("{} is not valid YAML: {e}", source.display()))?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(
        out_dir.join("openapi.json"),
        serde_json::to_string(&document)?,
    )?;
    Ok(())
}
