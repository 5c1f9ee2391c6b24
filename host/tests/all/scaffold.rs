//! `helexa plugin new`: each kind's scaffold builds for `wasm32-wasip2` on its own (no path
//! into this repository), implements the world it claims, instantiates in the policy
//! runtime and makes the decisions its template promises.
//!
//! The nested `cargo build --offline` uses `<target dir>/plugin-scaffold` so that only the
//! first run compiles wit-bindgen and serde for wasm (~35 s on a 2-core machine); later
//! runs build the three small crates in a few seconds. `--offline` works because the
//! workspace already depends on the same crates, so the registry cache holds them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use helexa::cli::scaffold::scaffold;
use helexa_policy_runtime::{
    Catalogue, CatalogueEntry, Decision, FailPolicy, Fleet, Health, LatencyStats, ModelState, Node,
    PluginOptions, PolicyKind, PolicyRuntime, RequestInfo, ResidentModel, RuntimeConfig, Surface,
};

/// Environment of the outer `cargo test` that must not reach the nested build (the same
/// list as `host/policy-runtime/build.rs`): wrappers, host-target flags, the target dir.
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

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("plugin-scaffold")
}

/// `cargo build --offline --target wasm32-wasip2 --release` in `dir`; the component's bytes.
fn build(dir: &Path, crate_name: &str) -> Vec<u8> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let target = target_dir();
    let mut command = Command::new(cargo);
    command
        .current_dir(dir)
        .args([
            "build",
            "--offline",
            "--target",
            "wasm32-wasip2",
            "--release",
        ])
        .arg("--target-dir")
        .arg(&target);
    for var in LEAKY_VARS {
        command.env_remove(var);
    }
    let output = command.output().expect("run cargo");
    assert!(
        output.status.success(),
        "building the scaffold in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let wasm = target.join(format!("wasm32-wasip2/release/{crate_name}.wasm"));
    std::fs::read(&wasm).unwrap_or_else(|e| panic!("{}: {e}", wasm.display()))
}

fn entry(id: &str) -> CatalogueEntry {
    CatalogueEntry {
        id: id.into(),
        aliases: vec![format!("{id}-alias")],
        vram_mb: 1000,
        min_devices: 1,
        min_device_vram_mb: 0,
        pinned_on: vec![],
        residency_priority: None,
        context_length: 4096,
    }
}

fn resident(id: &str, idle_ms: u64, in_flight: u32) -> ResidentModel {
    ResidentModel {
        id: id.into(),
        state: ModelState::Ready,
        vram_mb: 1000,
        devices: vec![0],
        idle_ms,
        in_flight,
        queue_depth: 0,
        residency_priority: 100,
    }
}

fn node(name: &str, models: Vec<ResidentModel>) -> Node {
    Node {
        name: name.into(),
        health: Health::Healthy,
        labels: vec![],
        devices: vec![],
        models,
        latency: LatencyStats::default(),
    }
}

#[test]
fn every_kind_scaffolds_builds_and_runs_in_the_runtime() {
    let parent = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let runtime = PolicyRuntime::new(RuntimeConfig::default(), &registry).unwrap();
    // Failures must show, not be papered over by the default policy.
    let options = PluginOptions {
        on_failure: FailPolicy::Reject,
        ..PluginOptions::default()
    };
    let defaults = runtime.default_set().unwrap();

    for (kind, policy_kind) in [
        ("router", PolicyKind::Router),
        ("evictor", PolicyKind::Evictor),
        ("translator", PolicyKind::Translator),
    ] {
        let name = format!("my-{kind}");
        let dir = scaffold(kind, &name, parent.path()).unwrap();
        let bytes = build(&dir, &format!("my_{kind}"));
        let info = runtime.inspect(&name, &bytes, Some(policy_kind)).unwrap();
        assert_eq!(info.kind, policy_kind);
        assert_eq!(info.wit_version, "0.1.0");
        let plugin = runtime
            .load_plugin_with(policy_kind, &name, "0.1.0", &bytes, "{}", &options)
            .unwrap();
        let set = defaults.with(plugin);
        match policy_kind {
            PolicyKind::Router => {
                let catalogue = Arc::new(Catalogue {
                    version: 1,
                    entries: vec![entry("m")],
                });
                let fleet = Arc::new(Fleet {
                    version: 1,
                    nodes: vec![
                        node("busy", vec![resident("m", 0, 3)]),
                        node("idle", vec![resident("m", 0, 0)]),
                    ],
                });
                let request = RequestInfo {
                    model: "m-alias".into(),
                    surface: Surface::OpenaiChat,
                    prompt_tokens_estimate: 10,
                    max_output_tokens: None,
                    stream: false,
                    caller: None,
                    headers: vec![],
                };
                match set.route(&request, &catalogue, &fleet) {
                    Decision::Serve(plan) => {
                        assert_eq!(plan.node, "idle");
                        assert_eq!(plan.fallbacks, ["busy"]);
                    }
                    other => panic!("expected serve, got {other:?}"),
                }
                // Not loaded anywhere: the template rejects rather than loading (the
                // default router would answer with a load plan).
                let empty = Arc::new(Fleet {
                    version: 2,
                    nodes: vec![],
                });
                match set.route(&request, &catalogue, &empty) {
                    Decision::Reject(rejection) => {
                        assert_eq!(rejection.status, 503);
                        assert!(rejection.message.contains("never loads"), "{rejection:?}");
                    }
                    other => panic!("expected the template's 503, got {other:?}"),
                }
            }
            PolicyKind::Evictor => {
                let on = node(
                    "a",
                    vec![
                        resident("recent", 10, 0),
                        resident("oldest", 900, 0),
                        resident("busy", 5000, 1),
                    ],
                );
                assert_eq!(
                    set.choose_victims(&on, 1500, &entry("new")),
                    ["oldest", "recent"]
                );
            }
            PolicyKind::Translator => {
                let body = r#"{"model":"m","messages":[]}"#;
                assert_eq!(
                    set.request_to_chat(Surface::OpenaiChat, body).unwrap(),
                    body
                );
                assert!(
                    set.request_to_chat(Surface::AnthropicMessages, body)
                        .is_err()
                );
            }
        }
    }
}
