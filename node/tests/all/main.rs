//! Integration tests of helexa-node (one binary, DESIGN.md §8).
//!
//! Fixtures come from `fixtures/` at the repository root (copied from the lead's
//! `shared/fixtures`: tiny trained models with transformers references, and chat-template
//! renderings by transformers' jinja2).

mod api;
mod bench;
mod config;
mod detok;
mod e2e;
mod hub;
mod recovery;
mod templates;

use std::path::PathBuf;

/// `fixtures/` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A parsed JSON fixture file.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The CPU engine cdylib cargo built for the `helexa-engine-cuda` dev-dependency, next to this
/// test binary (in `deps/` or the profile directory).
pub fn engine_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    let profile = deps.parent().expect("profile dir").to_path_buf();
    [deps, profile]
        .into_iter()
        .map(|d| d.join("libhelexa_engine_cuda.so"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "libhelexa_engine_cuda.so not found next to {}; build it with `cargo build -p helexa-engine-cuda`",
                exe.display()
            )
        })
}
