//! Tests of the loader and `EngineHandle`: the real engine library through `dlopen`, and
//! in-process fake entries for every way an entry can be refused.
//!
//! The real-library tests need `libhelexa_engine_cuda.so`, which any build of the
//! `helexa-engine-cuda` crate produces (`cargo build -p helexa-engine-cuda`, or its tests);
//! `HELEXA_TEST_ENGINE=/path/to/lib.so` points them at another backend.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use helexa_engine_abi::json::{Finish, GenerateParams, LoadSpec, ModelFiles, Sampling};
use helexa_engine_abi::{ABI_MAJOR, ABI_MINOR, ErrorKind, Flow, HelexaEngineEntry, HelexaEngineV1};

use super::*;

/// The engine library under test: `HELEXA_TEST_ENGINE`, else the newest of
/// `target/<profile>/libhelexa_engine_cuda.so` and `target/<profile>/deps/libhelexa_engine_cuda.so`
/// (the test binary lives in `target/<profile>/deps/`).
fn engine_library() -> PathBuf {
    if let Some(path) = std::env::var_os("HELEXA_TEST_ENGINE") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    let profile = deps.parent().expect("profile dir");
    let name = format!(
        "{}helexa_engine_cuda{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [profile.join(&name), deps.join(&name)]
        .into_iter()
        .filter_map(|path| {
            let modified = path.metadata().and_then(|m| m.modified()).ok()?;
            Some((modified, path))
        })
        .max()
        .map(|(_, path)| path)
        .unwrap_or_else(|| {
            panic!(
                "{name} not found next to {}: build it first with `cargo build -p helexa-engine-cuda` \
                 (or set HELEXA_TEST_ENGINE)",
                exe.display()
            )
        })
}

fn open_engine() -> EngineHandle {
    let path = engine_library();
    // SAFETY: the helexa engine built from this workspace (or one named by the tester).
    unsafe { EngineHandle::open(&path) }
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// The tiny-qwen3 fixture's load spec, `chat` prompt ids and reference greedy continuation.
fn tiny_qwen3() -> (LoadSpec, Vec<u32>, Vec<u32>) {
    let dir = fixtures().join("tiny-qwen3");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).expect("reference"))
            .expect("reference JSON");
    let ids = |key: &str| -> Vec<u32> {
        serde_json::from_value(reference["prompts"]["chat"][key].clone()).expect(key)
    };
    let spec = LoadSpec {
        id: "tiny-qwen3".into(),
        architecture: "Qwen3ForCausalLM".into(),
        files: ModelFiles {
            config: Some(dir.join("config.json")),
            safetensors: vec![dir.join("model.safetensors")],
            gguf: None,
        },
        dtype: Some("f32".into()),
        devices: None,
        context_length: None,
        prefill_chunk: None,
    };
    (spec, ids("token_ids"), ids("greedy_token_ids"))
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens: u32::try_from(max_tokens).expect("small"),
        stop_ids: Vec::new(),
        sampling: Sampling::default(),
    }
}

#[test]
fn real_engine_reports_cpu_backend_from_any_thread() {
    let engine = open_engine();
    assert_eq!(engine.abi_version(), (ABI_MAJOR, ABI_MINOR));
    let info = engine.info().expect("info");
    assert_eq!(info.backend, "cpu");
    assert!(!info.name.is_empty());
    // The handle is Send + Sync and engine calls are thread-safe.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || engine.info().expect("info").backend)
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("thread"), "cpu");
    }
    let memory = engine.memory().expect("memory");
    assert!(!memory.devices.is_empty());
}

#[test]
fn real_engine_generates_reference_greedy_tokens_and_cancels() {
    let engine = open_engine();
    let (spec, prompt, reference) = tiny_qwen3();
    let loaded = engine.load_model(&spec).expect("load tiny-qwen3");
    assert_eq!(loaded.vocab_size, 2048);

    let mut tokens = Vec::new();
    let summary = engine
        .generate(loaded.handle, &greedy(reference.len()), &prompt, |id| {
            tokens.push(id);
            Flow::Continue
        })
        .expect("generate");
    assert_eq!(
        tokens, reference,
        "greedy continuation of the `chat` prompt"
    );
    assert_eq!(summary.finish, Finish::Length);
    assert_eq!(summary.generated_tokens as usize, reference.len());
    assert_eq!(summary.prompt_tokens as usize, prompt.len());

    // Cancel after 3 tokens: the closure is not called again and the summary says Cancelled.
    let mut calls = 0;
    let summary = engine
        .generate(loaded.handle, &greedy(reference.len()), &prompt, |id| {
            calls += 1;
            assert_eq!(id, reference[calls - 1]);
            if calls == 3 {
                Flow::Cancel
            } else {
                Flow::Continue
            }
        })
        .expect("generate");
    assert_eq!(calls, 3);
    assert_eq!(summary.finish, Finish::Cancelled);
    assert_eq!(summary.generated_tokens, 3);

    // A stop id ends generation on that token and is reported.
    let stop = reference[4];
    let mut params = greedy(reference.len());
    params.stop_ids = vec![stop];
    let mut tokens = Vec::new();
    let summary = engine
        .generate(loaded.handle, &params, &prompt, |id| {
            tokens.push(id);
            Flow::Continue
        })
        .expect("generate");
    let first_stop = reference
        .iter()
        .position(|&id| id == stop)
        .expect("stop in reference");
    assert_eq!(tokens, reference[..=first_stop]);
    assert_eq!(
        (summary.finish, summary.stop_id),
        (Finish::Stop, Some(stop))
    );

    engine.unload_model(loaded.handle).expect("unload");
    let error = engine
        .unload_model(loaded.handle)
        .expect_err("second unload");
    assert_eq!(error.kind, ErrorKind::NotFound);
}

#[test]
fn real_engine_reports_bad_handles_and_inputs() {
    let engine = open_engine();
    let mut called = false;
    let error = engine
        .generate(987_654_321, &greedy(4), &[1, 2, 3], |_| {
            called = true;
            Flow::Continue
        })
        .expect_err("unknown model");
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
    assert!(!called);

    let error = engine.unload_model(987_654_321).expect_err("unknown model");
    assert_eq!(error.kind, ErrorKind::NotFound);

    let (mut spec, _, _) = tiny_qwen3();
    spec.files.safetensors = vec![fixtures().join("tiny-qwen3/does-not-exist.safetensors")];
    let error = engine.load_model(&spec).expect_err("missing weights");
    assert!(
        matches!(error.kind, ErrorKind::NotFound | ErrorKind::BadInput),
        "{error}"
    );
}

#[test]
fn panic_in_on_token_cancels_and_resumes_after_generate() {
    let engine = open_engine();
    let (spec, prompt, reference) = tiny_qwen3();
    let loaded = engine.load_model(&spec).expect("load");
    let mut calls = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.generate(loaded.handle, &greedy(8), &prompt, |_| {
            calls += 1;
            panic!("sink exploded");
        })
    }));
    let payload = result.expect_err("the closure's panic is resumed");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"sink exploded"));
    assert_eq!(calls, 1, "no token is shown to the closure after its panic");
    // The engine is still usable afterwards.
    let mut tokens = Vec::new();
    engine
        .generate(loaded.handle, &greedy(2), &prompt, |id| {
            tokens.push(id);
            Flow::Continue
        })
        .expect("generate after panic");
    assert_eq!(tokens, reference[..2]);
}

#[test]
fn missing_library_and_missing_symbol_are_named() {
    let missing = Path::new("/nonexistent/libnot_an_engine.so");
    // SAFETY: the file does not exist, so nothing is loaded.
    let error = unsafe { EngineHandle::open(missing) }.expect_err("missing file");
    assert!(matches!(error, EngineLoadError::Open { .. }));
    assert!(
        error
            .to_string()
            .contains("/nonexistent/libnot_an_engine.so"),
        "{error}"
    );

    // The C library is loadable but is not an engine.
    // SAFETY: libc is already loaded in this process; re-opening it runs no new initialisers.
    let error = unsafe { EngineHandle::open(Path::new("libc.so.6")) }.expect_err("not an engine");
    assert!(
        matches!(error, EngineLoadError::MissingEntry { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("libc.so.6") && message.contains("helexa_engine_entry"),
        "{message}"
    );
}

// In-process fake entries for the refusal paths; `init` counts its calls so the tests can prove
// that a refused entry is never initialised.

static FAKE_INIT_CALLS: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn fake_init(
    _json: *const u8,
    _len: usize,
    _out: *mut *mut HelexaEngine,
) -> *mut HelexaError {
    FAKE_INIT_CALLS.fetch_add(1, Ordering::SeqCst);
    ptr::null_mut()
}

unsafe extern "C" fn fake_deinit(_engine: *mut HelexaEngine) {}

unsafe extern "C" fn no_interface(_name: *const std::ffi::c_char) -> *const c_void {
    ptr::null()
}

static SHORT_VTABLE: HelexaEngineV1 = HelexaEngineV1 {
    struct_size: size_of::<usize>(),
    info: None,
    load_model: None,
    unload_model: None,
    memory_report: None,
    generate: None,
    buf_free: None,
    error_message: None,
    error_kind: None,
    error_free: None,
};

static NULL_FNS_VTABLE: HelexaEngineV1 = HelexaEngineV1 {
    struct_size: size_of::<HelexaEngineV1>(),
    ..SHORT_VTABLE
};

unsafe extern "C" fn short_interface(_name: *const std::ffi::c_char) -> *const c_void {
    (&raw const SHORT_VTABLE).cast()
}

unsafe extern "C" fn null_fns_interface(_name: *const std::ffi::c_char) -> *const c_void {
    (&raw const NULL_FNS_VTABLE).cast()
}

const FAKE: HelexaEngineEntry = HelexaEngineEntry {
    abi_major: ABI_MAJOR,
    abi_minor: ABI_MINOR,
    init: Some(fake_init),
    deinit: Some(fake_deinit),
    get_interface: Some(no_interface),
};

static WRONG_MAJOR: HelexaEngineEntry = HelexaEngineEntry {
    abi_major: ABI_MAJOR + 1,
    abi_minor: 0,
    ..FAKE
};
static NULL_INIT: HelexaEngineEntry = HelexaEngineEntry { init: None, ..FAKE };
static NO_INTERFACE: HelexaEngineEntry = FAKE;
static SHORT: HelexaEngineEntry = HelexaEngineEntry {
    get_interface: Some(short_interface),
    ..FAKE
};
static NULL_FNS: HelexaEngineEntry = HelexaEngineEntry {
    get_interface: Some(null_fns_interface),
    ..FAKE
};

fn refuse(entry: &'static HelexaEngineEntry) -> String {
    let before = FAKE_INIT_CALLS.load(Ordering::SeqCst);
    // SAFETY: the fakes follow the ABI as far as the loader gets before refusing them.
    let error = unsafe { EngineHandle::from_entry(entry, &json::InitOptions::default()) }
        .expect_err("refused");
    assert_eq!(
        FAKE_INIT_CALLS.load(Ordering::SeqCst),
        before,
        "init must not run"
    );
    error.to_string()
}

#[test]
fn version_mismatch_is_refused_before_init_with_both_versions() {
    let message = refuse(&WRONG_MAJOR);
    for needle in [
        "<in-process>",
        "helexa_engine_entry",
        &format!("engine ABI version {}.0", ABI_MAJOR + 1),
        &format!("node's ABI version {ABI_MAJOR}.{ABI_MINOR}"),
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from {message:?}"
        );
    }
}

#[test]
fn broken_entries_and_vtables_are_refused_before_init() {
    assert!(refuse(&NULL_INIT).contains("`helexa_engine_entry.init` is NULL"));
    assert!(refuse(&NO_INTERFACE).contains("does not implement interface `helexa.engine.v1`"));
    let message = refuse(&SHORT);
    assert!(
        message.contains(&format!("vtable is {} bytes", size_of::<usize>())),
        "{message}"
    );
    assert!(refuse(&NULL_FNS).contains("`helexa.engine.v1.info` is NULL"));
}
