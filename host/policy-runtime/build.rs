//! Builds the default policies and the test guests from `policies/` for `wasm32-wasip2`
//! and copies the components into `OUT_DIR`, where `src/lib.rs` embeds them with
//! `include_bytes!`, so a fresh install needs no plugin files.
//!
//! The wasm build is a nested `cargo build` of the same workspace with its own target
//! directory (`<target dir>/policies`): sharing the outer build's directory would wait forever
//! on the lock the outer build holds, and a fixed directory (rather than one under
//! `OUT_DIR`) lets later builds reuse its artifacts.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The packages to build; each produces `<crate_name>.wasm`.
const PACKAGES: &[&str] = &[
    "helexa-policy-router",
    "helexa-policy-evictor",
    "helexa-policy-translator",
    "helexa-guest-infinite-loop",
    "helexa-guest-memory-bomb",
    "helexa-guest-trap",
    "helexa-guest-wrong-version",
    "helexa-guest-huge-output",
    "helexa-guest-pin-node",
];

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "policy";

/// Environment the outer cargo sets for this build script that must not reach the
/// nested build: wrappers (clippy-driver as a rustc wrapper would lint the guests),
/// flags meant for the host target, the outer target dir and jobserver.
const LEAKY_VARS: &[&str] = &[
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];
const LEAKY_PREFIXES: &[&str] = &[
    "CARGO_FEATURE_",
    "CARGO_CFG_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
];

fn main() {
    if let Err(message) = run() {
        // Cargo shows a failed build script's stderr: make it the whole story (what failed,
        // why, how to fix), without a panic backtrace in the way.
        eprintln!("\n{message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let workspace = manifest_dir
        .join("../..")
        .canonicalize()
        .map_err(|e| format!("cannot resolve the workspace root: {e}"))?;
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());

    for path in [
        "policies",
        "wit",
        "Cargo.lock",
        "Cargo.toml",
        "rust-toolchain.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    // Next to the outer build's artifacts (which CI may keep outside the clone), so a warm
    // cache also keeps the wasm build warm.
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let outer_target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let target_dir = outer_target.join("policies");
    let mut command = Command::new(&cargo);
    command
        .current_dir(&workspace)
        .args([
            "build",
            "--locked",
            "--target",
            TARGET,
            "--profile",
            PROFILE,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for package in PACKAGES {
        command.args(["-p", package]);
    }
    for var in LEAKY_VARS {
        command.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if LEAKY_PREFIXES.iter().any(|prefix| key.starts_with(prefix)) {
            command.env_remove(key);
        }
    }

    let output = command.output().map_err(|e| {
        format!("helexa-policy-runtime: could not run `{cargo}` to build the policies: {e}")
    })?;
    if !output.status.success() {
        return Err(format!(
            "helexa-policy-runtime: building the embedded policies for {TARGET} failed \
             ({status}).\n\
             command: {cargo} build --locked --target {TARGET} --profile {PROFILE} --target-dir {target} -p {packages}\n\
             The {TARGET} target is installed by rustup from rust-toolchain.toml \
             (`rustup target add {TARGET}` if your toolchain lacks it).\n\
             --- nested cargo stderr ---\n{stderr}",
            status = output.status,
            target = target_dir.display(),
            packages = PACKAGES.join(" -p "),
            stderr = String::from_utf8_lossy(&output.stderr),
        ));
    }

    let built = target_dir.join(TARGET).join(PROFILE);
    for package in PACKAGES {
        let file = format!("{}.wasm", package.replace('-', "_"));
        copy(&built.join(&file), &out_dir.join(&file))?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::copy(from, to).map(drop).map_err(|e| {
        format!(
            "helexa-policy-runtime: the nested build succeeded but {} is missing ({e}); \
             is the package a `cdylib`?",
            from.display()
        )
    })
}
