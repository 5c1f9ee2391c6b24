//! The engine's C ABI exports: `helexa_engine_entry` and the `"helexa.engine.v1"` vtable over
//! [`crate::Engine`].
//!
//! The rules implemented here are written down in `node/engine-abi/README.md` ("API conventions")
//! and in the docs of `helexa_engine_abi`; in short:
//!
//! - every export runs inside [`ffi_boundary!`], which catches panics (the workspace keeps
//!   `panic = "unwind"` in every profile) and turns them into an owned `Internal` error;
//! - fallible calls return NULL on success or an owned [`HelexaError`]; outputs are written only on
//!   success, as owned [`HelexaBuf`]s released with `buf_free`;
//! - `generate` reports its outcome through `sink.on_done` exactly once (a [`DoneGuard`] calls it
//!   on drop if nothing else did), except when the sink itself has NULL callbacks.
//!
//! This is one of the two modules of the workspace allowed to use `unsafe` (the other is
//! `node/src/engine/loader.rs`); every `unsafe` block says why it is sound.

use std::any::Any;
use std::ffi::{CStr, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

use helexa_engine_abi::json::{GenerateParams, GenerateSummary, InitOptions, LoadSpec};
use helexa_engine_abi::{
    ABI_MAJOR, ABI_MINOR, ENGINE_V1_INTERFACE, ErrorKind, Flow, HelexaBuf, HelexaEngine,
    HelexaEngineEntry, HelexaEngineV1, HelexaError, HelexaErrorKind, HelexaFlow, HelexaStatus,
    HelexaTokenSink,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Engine, EngineError};

/// The exported entry point; the only symbol a node looks up.
#[unsafe(no_mangle)]
pub static helexa_engine_entry: HelexaEngineEntry = HelexaEngineEntry {
    abi_major: ABI_MAJOR,
    abi_minor: ABI_MINOR,
    init: Some(init),
    deinit: Some(deinit),
    get_interface: Some(get_interface),
};

/// The `"helexa.engine.v1"` vtable returned by `get_interface`.
static ENGINE_V1: HelexaEngineV1 = HelexaEngineV1 {
    struct_size: size_of::<HelexaEngineV1>(),
    info: Some(info),
    load_model: Some(load_model),
    unload_model: Some(unload_model),
    memory_report: Some(memory_report),
    generate: Some(generate),
    buf_free: Some(buf_free),
    error_message: Some(error_message),
    error_kind: Some(error_kind),
    error_free: Some(error_free),
};

// The ABI promises that every engine function may be called from any thread concurrently, which
// `Engine` guarantees by being `Send + Sync`; fail the build if that ever changes.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};

/// What a `*mut HelexaError` really points to.
struct FfiError {
    kind: ErrorKind,
    /// The message followed by one NUL, so C callers can use it as a C string.
    message_nul: String,
}

impl FfiError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> FfiError {
        let mut message_nul: String = message.into();
        // An interior NUL would truncate the message for C readers; keep it visible instead.
        message_nul = message_nul.replace('\0', "\\0");
        message_nul.push('\0');
        FfiError { kind, message_nul }
    }

    fn bad_input(message: impl Into<String>) -> FfiError {
        FfiError::new(ErrorKind::BadInput, message)
    }

    fn from_panic(export: &str, payload: &(dyn Any + Send)) -> FfiError {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("non-string panic payload");
        FfiError::new(
            ErrorKind::Internal,
            format!("engine panicked in {export}: {what}"),
        )
    }

    fn message(&self) -> &str {
        &self.message_nul[..self.message_nul.len() - 1]
    }

    /// Hands the error to the caller as an owned `HelexaError`.
    fn into_raw(self) -> *mut HelexaError {
        Box::into_raw(Box::new(self)).cast()
    }
}

impl From<EngineError> for FfiError {
    fn from(error: EngineError) -> FfiError {
        FfiError::new(error.kind, error.message)
    }
}

/// Runs the body of an export, catching panics; evaluates to `*mut HelexaError` (NULL on success).
///
/// The body is a block evaluating to `Result<(), FfiError>`; `?` works inside it. The first
/// argument names the export in the message of a caught panic.
macro_rules! ffi_boundary {
    ($export:literal, $body:block) => {
        $crate::ffi::boundary($export, || -> Result<(), FfiError> { $body })
    };
}

/// The function behind [`ffi_boundary!`].
fn boundary(export: &str, body: impl FnOnce() -> Result<(), FfiError>) -> *mut HelexaError {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => ptr::null_mut(),
        Ok(Err(error)) => error.into_raw(),
        Err(payload) => FfiError::from_panic(export, payload.as_ref()).into_raw(),
    }
}

/// Borrows the engine behind a handle.
///
/// # Safety
/// `engine` must be NULL or a pointer returned by `init` and not yet passed to `deinit`.
unsafe fn engine_ref<'a>(engine: *const HelexaEngine) -> Result<&'a Engine, FfiError> {
    // SAFETY: non-NULL handles come from `Box::into_raw(Box<Engine>)` in `init` and stay valid
    // until `deinit` (caller's contract); `Engine: Sync`, so shared references from several
    // threads are fine.
    unsafe { engine.cast::<Engine>().as_ref() }
        .ok_or_else(|| FfiError::bad_input("engine handle is NULL"))
}

/// Borrows a caller-provided byte range; (NULL, 0) is the empty slice.
///
/// # Safety
/// If `len > 0`, `data` must point to `len` readable bytes that stay unchanged during the call.
unsafe fn input_bytes<'a>(data: *const u8, len: usize, what: &str) -> Result<&'a [u8], FfiError> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(FfiError::bad_input(format!(
            "{what}: pointer is NULL but length is {len}"
        )));
    }
    // SAFETY: non-NULL with `len` readable bytes by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// Parses a JSON input; an empty input parses as `default` when one is given.
fn parse_json<T: DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    default: Option<fn() -> T>,
) -> Result<T, FfiError> {
    match (bytes.is_empty(), default) {
        (true, Some(default)) => Ok(default()),
        _ => serde_json::from_slice(bytes)
            .map_err(|error| FfiError::bad_input(format!("invalid {what} JSON: {error}"))),
    }
}

/// Serializes `value` into an owned buffer (released by [`buf_free`]).
fn to_buf(value: &impl Serialize) -> Result<HelexaBuf, FfiError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|error| FfiError::new(ErrorKind::Internal, format!("serialize: {error}")))?;
    let len = bytes.len();
    let ptr = Box::into_raw(bytes.into_boxed_slice()).cast::<u8>();
    Ok(HelexaBuf { ptr, len })
}

/// Writes an output buffer; checked for NULL before any work so a bad `out` costs nothing.
///
/// # Safety
/// `out` must be NULL or valid for one write of a `HelexaBuf`.
unsafe fn write_out(out: *mut HelexaBuf, buf: HelexaBuf) {
    // SAFETY: `out` was checked non-NULL by `check_out` and is writable by the caller's contract.
    unsafe { out.write(buf) };
}

fn check_out(out: *mut HelexaBuf) -> Result<(), FfiError> {
    if out.is_null() {
        Err(FfiError::bad_input("output pointer is NULL"))
    } else {
        Ok(())
    }
}

/// `HelexaEngineEntry::init`.
///
/// # Safety
/// See `HelexaInitFn`: `init_json` is (NULL, 0) or `init_len` readable bytes; `out_engine` is
/// writable.
unsafe extern "C" fn init(
    init_json: *const u8,
    init_len: usize,
    out_engine: *mut *mut HelexaEngine,
) -> *mut HelexaError {
    ffi_boundary!("init", {
        if out_engine.is_null() {
            return Err(FfiError::bad_input("init: out_engine is NULL"));
        }
        // SAFETY: the caller guarantees the input range (see the function's contract).
        let bytes = unsafe { input_bytes(init_json, init_len, "init") }?;
        let options: InitOptions = parse_json(bytes, "InitOptions", Some(InitOptions::default))?;
        let engine = Engine::new(&options)?;
        let handle = Box::into_raw(Box::new(engine)).cast::<HelexaEngine>();
        // SAFETY: `out_engine` is non-NULL (checked above) and writable by the caller's contract.
        unsafe { out_engine.write(handle) };
        Ok(())
    })
}

/// `HelexaEngineEntry::deinit`.
///
/// # Safety
/// `engine` is NULL or a handle from `init`, not used by any other thread and never used again.
unsafe extern "C" fn deinit(engine: *mut HelexaEngine) {
    let error = ffi_boundary!("deinit", {
        if !engine.is_null() {
            // SAFETY: the handle came from `Box::into_raw` in `init` and ownership is given back
            // here exactly once (caller's contract).
            drop(unsafe { Box::from_raw(engine.cast::<Engine>()) });
        }
        Ok(())
    });
    if !error.is_null() {
        // Nobody can receive an error from deinit; report the (caught) panic and move on.
        // SAFETY: `error` was just produced by `FfiError::into_raw`.
        let error = unsafe { Box::from_raw(error.cast::<FfiError>()) };
        eprintln!("helexa-engine-cuda: {}", error.message());
    }
}

/// `HelexaEngineEntry::get_interface`.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
unsafe extern "C" fn get_interface(name: *const c_char) -> *const c_void {
    if name.is_null() {
        return ptr::null();
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract; only read during this call.
    let name = unsafe { CStr::from_ptr(name) };
    if name.to_bytes() == ENGINE_V1_INTERFACE.as_bytes() {
        (&raw const ENGINE_V1).cast()
    } else {
        ptr::null()
    }
}

/// `HelexaEngineV1::info`.
///
/// # Safety
/// `engine` is a live handle; `out` is writable.
unsafe extern "C" fn info(engine: *const HelexaEngine, out: *mut HelexaBuf) -> *mut HelexaError {
    ffi_boundary!("info", {
        check_out(out)?;
        // SAFETY: live handle by the caller's contract.
        let engine = unsafe { engine_ref(engine) }?;
        let buf = to_buf(&engine.info())?;
        // SAFETY: checked non-NULL above, writable by the caller's contract.
        unsafe { write_out(out, buf) };
        Ok(())
    })
}

/// `HelexaEngineV1::load_model`.
///
/// # Safety
/// `engine` is a live handle; `spec_json` holds `spec_len` readable bytes; `out` is writable.
unsafe extern "C" fn load_model(
    engine: *const HelexaEngine,
    spec_json: *const u8,
    spec_len: usize,
    out: *mut HelexaBuf,
) -> *mut HelexaError {
    ffi_boundary!("load_model", {
        check_out(out)?;
        // SAFETY: live handle by the caller's contract.
        let engine = unsafe { engine_ref(engine) }?;
        // SAFETY: the caller guarantees the input range.
        let bytes = unsafe { input_bytes(spec_json, spec_len, "load_model") }?;
        let spec: LoadSpec = parse_json(bytes, "LoadSpec", None)?;
        let loaded = engine.load(&spec)?;
        let buf = to_buf(&loaded)?;
        // SAFETY: checked non-NULL above, writable by the caller's contract.
        unsafe { write_out(out, buf) };
        Ok(())
    })
}

/// `HelexaEngineV1::unload_model`.
///
/// # Safety
/// `engine` is a live handle.
unsafe extern "C" fn unload_model(engine: *const HelexaEngine, model: u64) -> *mut HelexaError {
    ffi_boundary!("unload_model", {
        // SAFETY: live handle by the caller's contract.
        let engine = unsafe { engine_ref(engine) }?;
        engine.unload(model)?;
        Ok(())
    })
}

/// `HelexaEngineV1::memory_report`.
///
/// # Safety
/// `engine` is a live handle; `out` is writable.
unsafe extern "C" fn memory_report(
    engine: *const HelexaEngine,
    out: *mut HelexaBuf,
) -> *mut HelexaError {
    ffi_boundary!("memory_report", {
        check_out(out)?;
        // SAFETY: live handle by the caller's contract.
        let engine = unsafe { engine_ref(engine) }?;
        let buf = to_buf(&engine.memory())?;
        // SAFETY: checked non-NULL above, writable by the caller's contract.
        unsafe { write_out(out, buf) };
        Ok(())
    })
}

/// Calls `on_done` exactly once: explicitly through [`DoneGuard::finish`], or with an `Internal`
/// error when dropped unfinished (which only a bug in this module could cause).
struct DoneGuard {
    userdata: *mut c_void,
    on_done: OnDoneFn,
    called: bool,
}

/// The non-NULL form of `HelexaOnDone` (the sink's callback, once checked).
type OnDoneFn = unsafe extern "C" fn(
    userdata: *mut c_void,
    status: HelexaStatus,
    summary_json: *const u8,
    summary_len: usize,
    error: *mut HelexaError,
);

impl DoneGuard {
    fn finish(mut self, outcome: Result<GenerateSummary, FfiError>) {
        self.called = true;
        let outcome = outcome.and_then(|summary| {
            serde_json::to_vec(&summary).map_err(|error| {
                FfiError::new(ErrorKind::Internal, format!("serialize summary: {error}"))
            })
        });
        match outcome {
            // SAFETY: `on_done` is the sink's callback with its own `userdata`; the summary bytes
            // outlive the call, and ownership of nothing is transferred (the error is NULL).
            Ok(summary) => unsafe {
                (self.on_done)(
                    self.userdata,
                    HelexaStatus::OK,
                    summary.as_ptr(),
                    summary.len(),
                    ptr::null_mut(),
                )
            },
            // SAFETY: as above; the owned error is handed to the callee, who frees it.
            Err(error) => unsafe {
                (self.on_done)(
                    self.userdata,
                    HelexaStatus::ERROR,
                    ptr::null(),
                    0,
                    error.into_raw(),
                )
            },
        }
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if !self.called {
            self.called = true;
            let error = FfiError::new(
                ErrorKind::Internal,
                "generate ended without reporting an outcome",
            );
            // SAFETY: the sink's own callback and userdata; the error's ownership passes to it.
            unsafe {
                (self.on_done)(
                    self.userdata,
                    HelexaStatus::ERROR,
                    ptr::null(),
                    0,
                    error.into_raw(),
                )
            };
        }
    }
}

/// `HelexaEngineV1::generate`.
///
/// # Safety
/// `engine` is a live handle; `params_json` holds `params_len` readable bytes; `prompt` holds
/// `prompt_len` readable `u32`s; the sink's callbacks are safe to call with its `userdata` on this
/// thread until `on_done` returns.
unsafe extern "C" fn generate(
    engine: *const HelexaEngine,
    model: u64,
    params_json: *const u8,
    params_len: usize,
    prompt: *const u32,
    prompt_len: usize,
    sink: HelexaTokenSink,
) -> *mut HelexaError {
    let (Some(on_token), Some(on_done)) = (sink.on_token, sink.on_done) else {
        return FfiError::bad_input("generate: sink.on_token and sink.on_done must be non-NULL")
            .into_raw();
    };
    let userdata = sink.userdata;
    let done = DoneGuard {
        userdata,
        on_done,
        called: false,
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<GenerateSummary, FfiError> {
        // SAFETY: live handle by the caller's contract.
        let engine = unsafe { engine_ref(engine) }?;
        // SAFETY: the caller guarantees the input range.
        let bytes = unsafe { input_bytes(params_json, params_len, "generate params") }?;
        let params: GenerateParams = parse_json(bytes, "GenerateParams", None)?;
        let prompt = if prompt_len == 0 {
            &[][..]
        } else if prompt.is_null() {
            return Err(FfiError::bad_input(format!(
                "generate: prompt is NULL but prompt_len is {prompt_len}"
            )));
        } else {
            // SAFETY: non-NULL with `prompt_len` readable, aligned `u32`s by the caller's contract.
            unsafe { std::slice::from_raw_parts(prompt, prompt_len) }
        };
        let mut forward = |token: u32| -> Flow {
            // SAFETY: the sink's callback with its own userdata, on the calling thread, before
            // `on_done` (caller's contract).
            let flow: HelexaFlow = unsafe { on_token(userdata, token) };
            Flow::from_raw(flow)
        };
        Ok(engine.generate(model, &params, prompt, &mut forward)?)
    }));
    done.finish(
        outcome.unwrap_or_else(|payload| Err(FfiError::from_panic("generate", payload.as_ref()))),
    );
    ptr::null_mut()
}

/// `HelexaEngineV1::buf_free`.
///
/// # Safety
/// `buf` is (NULL, 0) or a buffer returned by this engine and not yet freed.
unsafe extern "C" fn buf_free(buf: HelexaBuf) {
    if buf.ptr.is_null() {
        return;
    }
    // SAFETY: the buffer came from `Box<[u8]>::into_raw` in `to_buf` with exactly this length,
    // and is given back once (caller's contract).
    drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(buf.ptr, buf.len)) });
}

/// `HelexaEngineV1::error_message`.
///
/// # Safety
/// `error` is NULL or a live error from this engine; `out_len` is NULL or writable.
unsafe extern "C" fn error_message(error: *const HelexaError, out_len: *mut usize) -> *const u8 {
    // SAFETY: a live error from `FfiError::into_raw` (caller's contract), or NULL.
    let message = match unsafe { error.cast::<FfiError>().as_ref() } {
        Some(error) => error.message_nul.as_str(),
        None => "\0",
    };
    if !out_len.is_null() {
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out_len.write(message.len() - 1) };
    }
    message.as_ptr()
}

/// `HelexaEngineV1::error_kind`.
///
/// # Safety
/// `error` is NULL or a live error from this engine.
unsafe extern "C" fn error_kind(error: *const HelexaError) -> HelexaErrorKind {
    // SAFETY: a live error from `FfiError::into_raw` (caller's contract), or NULL.
    match unsafe { error.cast::<FfiError>().as_ref() } {
        Some(error) => error.kind.to_raw(),
        None => HelexaErrorKind::INTERNAL,
    }
}

/// `HelexaEngineV1::error_free`.
///
/// # Safety
/// `error` is NULL or an error from this engine, freed once.
unsafe extern "C" fn error_free(error: *mut HelexaError) {
    if !error.is_null() {
        // SAFETY: produced by `FfiError::into_raw` and given back once (caller's contract).
        drop(unsafe { Box::from_raw(error.cast::<FfiError>()) });
    }
}

#[cfg(test)]
mod tests {
    //! The exports exercised in-process through the static entry, exactly as a C caller would.
    //! (The node's tests load the same exports through `dlopen`.)

    use std::path::PathBuf;

    use helexa_engine_abi::json::{
        EngineInfo, Finish, LoadedModel, MemoryReport, ModelFiles, Sampling,
    };

    use super::*;

    fn v1() -> &'static HelexaEngineV1 {
        let get_interface = helexa_engine_entry.get_interface.unwrap();
        // SAFETY: a NUL-terminated name; the vtable is a static of this crate.
        let vtable = unsafe { get_interface(c"helexa.engine.v1".as_ptr()) };
        assert!(!vtable.is_null());
        // SAFETY: `get_interface` returns `&ENGINE_V1` for this name.
        unsafe { &*vtable.cast::<HelexaEngineV1>() }
    }

    /// An engine created through `init`, destroyed through `deinit`.
    struct TestEngine(*mut HelexaEngine);

    impl TestEngine {
        fn new() -> TestEngine {
            let mut engine = ptr::null_mut();
            // SAFETY: (NULL, 0) is the empty input; `engine` is writable.
            let error = unsafe { (helexa_engine_entry.init.unwrap())(ptr::null(), 0, &mut engine) };
            assert!(error.is_null(), "{:?}", take(error));
            TestEngine(engine)
        }
    }

    impl Drop for TestEngine {
        fn drop(&mut self) {
            // SAFETY: created by `init`, no call in flight.
            unsafe { (helexa_engine_entry.deinit.unwrap())(self.0) };
        }
    }

    /// Reads and frees an error (None for NULL).
    fn take(error: *mut HelexaError) -> Option<(ErrorKind, String)> {
        if error.is_null() {
            return None;
        }
        let v1 = v1();
        let mut len = 0;
        // SAFETY: a live error of this engine; read before it is freed.
        let (kind, message) = unsafe {
            let kind = ErrorKind::from_raw((v1.error_kind.unwrap())(error));
            let message = (v1.error_message.unwrap())(error, &mut len);
            assert_eq!(*message.add(len), 0, "message is NUL-terminated");
            let message = std::slice::from_raw_parts(message, len);
            (kind, String::from_utf8(message.to_vec()).unwrap())
        };
        // SAFETY: freed once.
        unsafe { (v1.error_free.unwrap())(error) };
        Some((kind, message))
    }

    /// Reads and frees an output buffer as JSON.
    fn take_json<T: DeserializeOwned>(buf: HelexaBuf) -> T {
        // SAFETY: an owned buffer of this engine; freed once after reading.
        unsafe {
            let value = serde_json::from_slice(std::slice::from_raw_parts(buf.ptr, buf.len));
            (v1().buf_free.unwrap())(buf);
            value.unwrap()
        }
    }

    #[derive(Default)]
    struct Recorder {
        tokens: Vec<u32>,
        cancel_after: Option<usize>,
        done: Vec<Result<GenerateSummary, (ErrorKind, String)>>,
    }

    unsafe extern "C" fn on_token(userdata: *mut c_void, token: u32) -> HelexaFlow {
        // SAFETY: userdata is the `Recorder` of `run_generate`, only used on this thread.
        let recorder = unsafe { &mut *userdata.cast::<Recorder>() };
        recorder.tokens.push(token);
        match recorder.cancel_after {
            Some(n) if recorder.tokens.len() >= n => HelexaFlow::CANCEL,
            _ => HelexaFlow::CONTINUE,
        }
    }

    unsafe extern "C" fn on_done(
        userdata: *mut c_void,
        status: HelexaStatus,
        summary: *const u8,
        summary_len: usize,
        error: *mut HelexaError,
    ) {
        // SAFETY: as in `on_token`.
        let recorder = unsafe { &mut *userdata.cast::<Recorder>() };
        let outcome = if status == HelexaStatus::OK {
            assert!(error.is_null());
            // SAFETY: borrowed summary bytes for the duration of the call.
            let bytes = unsafe { std::slice::from_raw_parts(summary, summary_len) };
            Ok(serde_json::from_slice(bytes).unwrap())
        } else {
            assert_eq!(status, HelexaStatus::ERROR);
            Err(take(error).expect("an error with status ERROR"))
        };
        recorder.done.push(outcome);
    }

    fn run_generate(
        engine: &TestEngine,
        model: u64,
        params: &str,
        prompt: &[u32],
        recorder: &mut Recorder,
    ) -> *mut HelexaError {
        let sink = HelexaTokenSink {
            userdata: ptr::from_mut(recorder).cast(),
            on_token: Some(on_token),
            on_done: Some(on_done),
        };
        // SAFETY: live engine, valid slices, a sink whose userdata outlives the call.
        unsafe {
            (v1().generate.unwrap())(
                engine.0,
                model,
                params.as_ptr(),
                params.len(),
                prompt.as_ptr(),
                prompt.len(),
                sink,
            )
        }
    }

    #[test]
    fn entry_and_interface() {
        assert_eq!(
            (helexa_engine_entry.abi_major, helexa_engine_entry.abi_minor),
            (ABI_MAJOR, ABI_MINOR)
        );
        assert_eq!(v1().struct_size, size_of::<HelexaEngineV1>());
        let get_interface = helexa_engine_entry.get_interface.unwrap();
        // SAFETY: NUL-terminated name or NULL.
        unsafe {
            assert!(get_interface(c"helexa.engine.v2".as_ptr()).is_null());
            assert!(get_interface(ptr::null()).is_null());
        }
    }

    #[test]
    fn info_reports_the_cpu_backend() {
        let engine = TestEngine::new();
        let mut out = HelexaBuf::EMPTY;
        // SAFETY: live engine, writable out.
        let error = unsafe { (v1().info.unwrap())(engine.0, &mut out) };
        assert_eq!(take(error), None);
        let info: EngineInfo = take_json(out);
        assert_eq!(info.backend, "cpu");
        assert!(!info.devices.is_empty());
    }

    #[test]
    fn bad_inputs_are_errors_and_outputs_stay_untouched() {
        let mut engine = ptr::null_mut();
        let bad = b"{not json";
        // SAFETY: valid slice, writable out.
        let error =
            unsafe { (helexa_engine_entry.init.unwrap())(bad.as_ptr(), bad.len(), &mut engine) };
        let (kind, message) = take(error).unwrap();
        assert_eq!(kind, ErrorKind::BadInput);
        assert!(message.contains("invalid InitOptions JSON"), "{message}");
        assert!(engine.is_null(), "out_engine is written only on success");

        let engine = TestEngine::new();
        let sentinel = HelexaBuf {
            ptr: ptr::dangling_mut(),
            len: 12345,
        };
        let mut out = sentinel;
        let spec = br#"{"id": "x"}"#;
        // SAFETY: live engine, valid slice, writable out.
        let error =
            unsafe { (v1().load_model.unwrap())(engine.0, spec.as_ptr(), spec.len(), &mut out) };
        assert_eq!(take(error).unwrap().0, ErrorKind::BadInput);
        assert_eq!(out, sentinel);
        // SAFETY: NULL pointer with a length is refused before being read; NULL out is refused.
        unsafe {
            let error = (v1().load_model.unwrap())(engine.0, ptr::null(), 3, &mut out);
            assert_eq!(take(error).unwrap().0, ErrorKind::BadInput);
            let error = (v1().info.unwrap())(engine.0, ptr::null_mut());
            assert_eq!(take(error).unwrap().0, ErrorKind::BadInput);
            let error = (v1().info.unwrap())(ptr::null(), &mut out);
            assert_eq!(take(error).unwrap().0, ErrorKind::BadInput);
        }
        // SAFETY: live engine.
        let error = unsafe { (v1().unload_model.unwrap())(engine.0, 987_654) };
        assert_eq!(take(error).unwrap().0, ErrorKind::NotFound);
        // SAFETY: the empty buffer and NULL error are no-ops; a NULL error has an empty message.
        unsafe {
            (v1().buf_free.unwrap())(HelexaBuf::EMPTY);
            (v1().error_free.unwrap())(ptr::null_mut());
            let mut len = 99;
            let message = (v1().error_message.unwrap())(ptr::null(), &mut len);
            assert_eq!((len, *message), (0, 0));
            assert_eq!(
                (v1().error_kind.unwrap())(ptr::null()),
                HelexaErrorKind::INTERNAL
            );
        }
    }

    #[test]
    fn generate_failures_go_through_on_done_exactly_once() {
        let engine = TestEngine::new();
        let params = r#"{"max_tokens": 4}"#;
        let mut recorder = Recorder::default();
        let error = run_generate(&engine, 424_242, params, &[1, 2, 3], &mut recorder);
        assert!(error.is_null());
        assert!(recorder.tokens.is_empty());
        assert_eq!(recorder.done.len(), 1);
        assert_eq!(
            recorder.done[0].as_ref().unwrap_err().0,
            ErrorKind::NotFound
        );

        let mut recorder = Recorder::default();
        let error = run_generate(&engine, 424_242, "{bad", &[1], &mut recorder);
        assert!(error.is_null());
        assert_eq!(recorder.done.len(), 1);
        let (kind, message) = recorder.done[0].as_ref().unwrap_err();
        assert_eq!(*kind, ErrorKind::BadInput);
        assert!(message.contains("GenerateParams"), "{message}");

        // A sink without callbacks cannot be told anything: refused through the return value.
        let sink = HelexaTokenSink {
            userdata: ptr::null_mut(),
            on_token: None,
            on_done: None,
        };
        // SAFETY: live engine, valid slices; the sink's callbacks are never called.
        let error = unsafe {
            (v1().generate.unwrap())(
                engine.0,
                1,
                params.as_ptr(),
                params.len(),
                ptr::null(),
                0,
                sink,
            )
        };
        assert_eq!(take(error).unwrap().0, ErrorKind::BadInput);
    }

    #[test]
    fn ffi_boundary_turns_panics_into_internal_errors() {
        let error = ffi_boundary!("test_export", {
            let values: Vec<u32> = Vec::new();
            // Index out of bounds: a genuine panic, not an `Err`.
            let _ = values[usize::from(values.is_empty())];
            Ok(())
        });
        let (kind, message) = take(error).unwrap();
        assert_eq!(kind, ErrorKind::Internal);
        assert!(
            message.contains("engine panicked in test_export"),
            "{message}"
        );
        assert!(message.contains("index out of bounds"), "{message}");

        let error = ffi_boundary!("test_export", { panic!("custom {}", 42) });
        assert!(take(error).unwrap().1.contains("custom 42"));

        assert!(ffi_boundary!("test_export", { Ok(()) }).is_null());
        let error = ffi_boundary!("test_export", {
            Err(FfiError::new(ErrorKind::OutOfMemory, "no room\0here"))
        });
        assert_eq!(
            take(error),
            Some((ErrorKind::OutOfMemory, "no room\\0here".to_owned()))
        );
    }

    #[test]
    fn done_guard_reports_when_dropped_unfinished() {
        let mut recorder = Recorder::default();
        drop(DoneGuard {
            userdata: ptr::from_mut(&mut recorder).cast(),
            on_done,
            called: false,
        });
        assert_eq!(recorder.done.len(), 1);
        assert_eq!(
            recorder.done[0].as_ref().unwrap_err().0,
            ErrorKind::Internal
        );
    }

    fn tiny_qwen3() -> (LoadSpec, Vec<u32>, Vec<u32>) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-qwen3");
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let ids = |key: &str| -> Vec<u32> {
            serde_json::from_value(reference["prompts"]["chat"][key].clone()).unwrap()
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

    #[test]
    fn generates_the_reference_greedy_continuation_and_cancels() {
        let engine = TestEngine::new();
        let (spec, prompt, greedy) = tiny_qwen3();
        let spec = serde_json::to_vec(&spec).unwrap();
        let mut out = HelexaBuf::EMPTY;
        // SAFETY: live engine, valid slice, writable out.
        let error =
            unsafe { (v1().load_model.unwrap())(engine.0, spec.as_ptr(), spec.len(), &mut out) };
        assert_eq!(take(error), None);
        let loaded: LoadedModel = take_json(out);

        let params = serde_json::to_string(&GenerateParams {
            max_tokens: u32::try_from(greedy.len()).unwrap(),
            stop_ids: Vec::new(),
            sampling: Sampling::default(),
        })
        .unwrap();
        let mut recorder = Recorder::default();
        assert!(run_generate(&engine, loaded.handle, &params, &prompt, &mut recorder).is_null());
        assert_eq!(recorder.tokens, greedy);
        assert_eq!(recorder.done.len(), 1);
        let summary = recorder.done[0].as_ref().unwrap();
        assert_eq!(summary.finish, Finish::Length);
        assert_eq!(summary.generated_tokens as usize, greedy.len());

        let mut recorder = Recorder {
            cancel_after: Some(3),
            ..Recorder::default()
        };
        assert!(run_generate(&engine, loaded.handle, &params, &prompt, &mut recorder).is_null());
        assert_eq!(recorder.tokens, greedy[..3]);
        assert_eq!(recorder.done.len(), 1);
        assert_eq!(recorder.done[0].as_ref().unwrap().finish, Finish::Cancelled);

        let mut out = HelexaBuf::EMPTY;
        // SAFETY: live engine, writable out.
        let error = unsafe { (v1().memory_report.unwrap())(engine.0, &mut out) };
        assert_eq!(take(error), None);
        let report: MemoryReport = take_json(out);
        assert!(report.models.iter().any(|m| m.handle == loaded.handle));
        // SAFETY: live engine.
        let error = unsafe { (v1().unload_model.unwrap())(engine.0, loaded.handle) };
        assert_eq!(take(error), None);
    }

    #[test]
    fn device_fault_poisons_the_device_not_the_process() {
        let engine = TestEngine::new();
        let (spec, prompt, greedy) = tiny_qwen3();
        let spec = serde_json::to_vec(&spec).unwrap();
        let load = || {
            let mut out = HelexaBuf::EMPTY;
            // SAFETY: live engine, valid slice, writable out.
            let error = unsafe {
                (v1().load_model.unwrap())(engine.0, spec.as_ptr(), spec.len(), &mut out)
            };
            assert_eq!(take(error), None);
            take_json::<LoadedModel>(out).handle
        };
        let (faulty, healthy) = (load(), load());
        // SAFETY: the handle is a live `Box<Engine>` from `init`; only shared access is needed.
        let inner = unsafe { &*engine.0.cast::<Engine>() };
        inner.inject_device_fault(faulty, "xid 79").unwrap();

        let params = r#"{"max_tokens": 2}"#;
        for attempt in 0..2 {
            let mut recorder = Recorder::default();
            assert!(run_generate(&engine, faulty, params, &prompt, &mut recorder).is_null());
            assert_eq!(recorder.done.len(), 1, "attempt {attempt}");
            let (kind, message) = recorder.done[0].as_ref().unwrap_err();
            assert_eq!(
                *kind,
                ErrorKind::DeviceFault,
                "attempt {attempt}: {message}"
            );
        }
        // The other model shares the faulted device, so it is poisoned too.
        let mut recorder = Recorder::default();
        assert!(run_generate(&engine, healthy, params, &prompt, &mut recorder).is_null());
        assert_eq!(
            recorder.done[0].as_ref().unwrap_err().0,
            ErrorKind::DeviceFault
        );
        // Poisoned models can be unloaded; then the device is re-created and serves again.
        for handle in [faulty, healthy] {
            // SAFETY: live engine.
            let error = unsafe { (v1().unload_model.unwrap())(engine.0, handle) };
            assert_eq!(take(error), None);
        }
        let fresh = load();
        let mut recorder = Recorder::default();
        assert!(run_generate(&engine, fresh, params, &prompt, &mut recorder).is_null());
        assert_eq!(recorder.tokens, greedy[..2]);
    }
}
