//! Loading an engine library and making raw, checked calls through its C ABI.
//!
//! This is the only module of the node allowed to use `unsafe` (STYLE.md item 1). It follows clack's
//! host loader: the `Library` lives inside the handle, the entry's ABI version is checked before
//! anything is called, the vtable's `struct_size` and every function pointer are checked before
//! `init`, and `deinit` runs in `Drop`. The library is never `dlclose`d: a CUDA runtime (and a Rust
//! cdylib's thread-local destructors) do not survive being unmapped, so an engine is only replaced
//! by restarting the node.
//!
//! Everything above this module ([`super::EngineHandle`]) is safe code working with byte buffers
//! and closures; the ownership rules applied here are those of `node/engine-abi/README.md`.

use std::any::Any;
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use helexa_engine_abi::{
    ENGINE_V1_INTERFACE, ENGINE_V1_INTERFACE_NUL, ENGINE_V1_MIN_SIZE, ENTRY_SYMBOL,
    ENTRY_SYMBOL_NUL, ErrorKind, Flow, HelexaBuf, HelexaEngine, HelexaEngineEntry, HelexaEngineV1,
    HelexaError, HelexaFlow, HelexaStatus, HelexaTokenSink, check_abi_version, json,
};
use libloading::Library;

use super::{EngineCallError, EngineHandle, EngineLoadError};

impl EngineHandle {
    /// Loads the engine library at `path` and initialises it with default [`json::InitOptions`].
    ///
    /// Checks the ABI version before calling anything, then the interface and every function
    /// pointer, then calls `init`.
    ///
    /// # Safety
    /// Loading runs the library's initialisers and trusts all of its code: `path` must be a helexa
    /// engine library implementing the ABI it declares.
    pub unsafe fn open(path: &Path) -> Result<Self, EngineLoadError> {
        // SAFETY: forwarded to the caller.
        unsafe { Self::open_with(path, &json::InitOptions::default()) }
    }

    /// [`EngineHandle::open`] with explicit init options.
    ///
    /// # Safety
    /// As [`EngineHandle::open`].
    pub unsafe fn open_with(
        path: &Path,
        init: &json::InitOptions,
    ) -> Result<Self, EngineLoadError> {
        let init_json = serde_json::to_vec(init).map_err(EngineLoadError::Options)?;
        // SAFETY: forwarded to the caller.
        let inner = unsafe { LoadedEngine::open(path, &init_json) }?;
        Ok(EngineHandle {
            inner: Arc::new(inner),
        })
    }

    /// Creates an engine from an entry linked into this process (an engine crate used as a
    /// library, or a test fake), with the same checks as [`EngineHandle::open`].
    ///
    /// # Safety
    /// `entry` and everything it points to must implement the ABI it declares.
    pub unsafe fn from_entry(
        entry: &'static HelexaEngineEntry,
        init: &json::InitOptions,
    ) -> Result<Self, EngineLoadError> {
        let init_json = serde_json::to_vec(init).map_err(EngineLoadError::Options)?;
        // SAFETY: forwarded to the caller.
        let inner = unsafe { LoadedEngine::from_static(entry, &init_json) }?;
        Ok(EngineHandle {
            inner: Arc::new(inner),
        })
    }
}

/// The vtable's functions, each checked non-NULL once at load time.
#[derive(Clone, Copy)]
struct V1Fns {
    info: unsafe extern "C" fn(*const HelexaEngine, *mut HelexaBuf) -> *mut HelexaError,
    load_model: unsafe extern "C" fn(
        *const HelexaEngine,
        *const u8,
        usize,
        *mut HelexaBuf,
    ) -> *mut HelexaError,
    unload_model: unsafe extern "C" fn(*const HelexaEngine, u64) -> *mut HelexaError,
    memory_report: unsafe extern "C" fn(*const HelexaEngine, *mut HelexaBuf) -> *mut HelexaError,
    generate: unsafe extern "C" fn(
        *const HelexaEngine,
        u64,
        *const u8,
        usize,
        *const u32,
        usize,
        HelexaTokenSink,
    ) -> *mut HelexaError,
    buf_free: unsafe extern "C" fn(HelexaBuf),
    error_message: unsafe extern "C" fn(*const HelexaError, *mut usize) -> *const u8,
    error_kind: unsafe extern "C" fn(*const HelexaError) -> helexa_engine_abi::HelexaErrorKind,
    error_free: unsafe extern "C" fn(*mut HelexaError),
}

/// A live engine instance and the library it came from.
pub(super) struct LoadedEngine {
    engine: NonNull<HelexaEngine>,
    fns: V1Fns,
    deinit: unsafe extern "C" fn(*mut HelexaEngine),
    abi: (u32, u32),
    /// Where the engine came from (a file, or `<in-process>`), for messages.
    origin: PathBuf,
    /// Keeps the code behind every function pointer mapped; never closed (see the module docs).
    _library: Option<ManuallyDrop<Library>>,
}

// SAFETY: the ABI requires every engine function to be callable from any thread, concurrently
// (README "Threading"); the engine pointer is only ever passed back to those functions, and the
// function pointers point into a library that is never unloaded.
unsafe impl Send for LoadedEngine {}
// SAFETY: as for `Send`: shared use only calls the thread-safe engine functions.
unsafe impl Sync for LoadedEngine {}

impl LoadedEngine {
    /// Opens the library at `path`, checks its entry and creates an engine.
    ///
    /// # Safety
    /// Loading runs the library's initialisers, and everything it exports is trusted to follow the
    /// helexa engine ABI: `path` must be a helexa engine library.
    pub(super) unsafe fn open(path: &Path, init_json: &[u8]) -> Result<Self, EngineLoadError> {
        // SAFETY: running the library's initialisers is what the caller vouched for.
        let library = unsafe { Library::new(path) }.map_err(|source| EngineLoadError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the symbol is a static `HelexaEngineEntry` (caller's contract); what `get`
        // yields for a data symbol is its address, read as a pointer.
        let entry: *const HelexaEngineEntry =
            match unsafe { library.get::<*const HelexaEngineEntry>(ENTRY_SYMBOL_NUL) } {
                Ok(symbol) => *symbol,
                Err(source) => {
                    return Err(EngineLoadError::MissingEntry {
                        path: path.to_path_buf(),
                        symbol: ENTRY_SYMBOL,
                        source,
                    });
                }
            };
        let Some(entry) = NonNull::new(entry.cast_mut()) else {
            return Err(EngineLoadError::Invalid {
                path: path.to_path_buf(),
                reason: format!("symbol `{ENTRY_SYMBOL}` is NULL"),
            });
        };
        // SAFETY: `entry` points to the library's static entry, mapped as long as `library` is
        // (which is forever: it is never closed).
        unsafe { Self::from_entry_ptr(entry, init_json, path, Some(library)) }
    }

    /// Creates an engine from an entry that is already in this process (linked in, or a fake).
    ///
    /// # Safety
    /// `entry` and everything it points to follow the helexa engine ABI.
    pub(super) unsafe fn from_static(
        entry: &'static HelexaEngineEntry,
        init_json: &[u8],
    ) -> Result<Self, EngineLoadError> {
        // SAFETY: a `'static` reference is valid forever; ABI conformance is the caller's promise.
        unsafe {
            Self::from_entry_ptr(
                NonNull::from(entry),
                init_json,
                Path::new("<in-process>"),
                None,
            )
        }
    }

    /// The checks and `init`, shared by both ways of obtaining an entry.
    ///
    /// # Safety
    /// `entry` stays valid while `library` (if any) is loaded, and follows the ABI.
    unsafe fn from_entry_ptr(
        entry: NonNull<HelexaEngineEntry>,
        init_json: &[u8],
        path: &Path,
        library: Option<Library>,
    ) -> Result<Self, EngineLoadError> {
        let invalid = |reason: String| EngineLoadError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        // The version fields come first in every major version of the entry, so they are read
        // alone, before trusting the rest of the struct's layout.
        let entry = entry.as_ptr();
        // SAFETY: `entry` points to a readable entry whose first two fields are the version `u32`s.
        let (major, minor) = unsafe { ((*entry).abi_major, (*entry).abi_minor) };
        check_abi_version(major, minor).map_err(|mismatch| EngineLoadError::AbiVersion {
            path: path.to_path_buf(),
            symbol: ENTRY_SYMBOL,
            mismatch,
        })?;
        // SAFETY: same major version, so the entry has the layout of `HelexaEngineEntry`.
        let entry = unsafe { *entry };
        let missing = |name: &str| invalid(format!("`{ENTRY_SYMBOL}.{name}` is NULL"));
        let init = entry.init.ok_or_else(|| missing("init"))?;
        let deinit = entry.deinit.ok_or_else(|| missing("deinit"))?;
        let get_interface = entry
            .get_interface
            .ok_or_else(|| missing("get_interface"))?;

        // SAFETY: `get_interface` takes a NUL-terminated name, which the constant is; it may be
        // called before `init`.
        let vtable = unsafe { get_interface(ENGINE_V1_INTERFACE_NUL.as_ptr().cast()) };
        if vtable.is_null() {
            return Err(invalid(format!(
                "the engine does not implement interface `{ENGINE_V1_INTERFACE}`"
            )));
        }
        let vtable = vtable.cast::<HelexaEngineV1>();
        // SAFETY: the vtable starts with `struct_size` in every version; read it alone first.
        let struct_size = unsafe { (*vtable).struct_size };
        if struct_size < ENGINE_V1_MIN_SIZE {
            return Err(invalid(format!(
                "`{ENGINE_V1_INTERFACE}` vtable is {struct_size} bytes, this node needs at least \
                 {ENGINE_V1_MIN_SIZE}"
            )));
        }
        // SAFETY: the vtable is at least as large as the fields read, and lives as long as the
        // library.
        let vtable = unsafe { *vtable };
        let missing = |name: &str| invalid(format!("`{ENGINE_V1_INTERFACE}.{name}` is NULL"));
        let fns = V1Fns {
            info: vtable.info.ok_or_else(|| missing("info"))?,
            load_model: vtable.load_model.ok_or_else(|| missing("load_model"))?,
            unload_model: vtable.unload_model.ok_or_else(|| missing("unload_model"))?,
            memory_report: vtable
                .memory_report
                .ok_or_else(|| missing("memory_report"))?,
            generate: vtable.generate.ok_or_else(|| missing("generate"))?,
            buf_free: vtable.buf_free.ok_or_else(|| missing("buf_free"))?,
            error_message: vtable
                .error_message
                .ok_or_else(|| missing("error_message"))?,
            error_kind: vtable.error_kind.ok_or_else(|| missing("error_kind"))?,
            error_free: vtable.error_free.ok_or_else(|| missing("error_free"))?,
        };

        let mut engine: *mut HelexaEngine = ptr::null_mut();
        // SAFETY: the JSON slice is valid for the call; `engine` is a writable out-pointer.
        let error = unsafe { init(init_json.as_ptr(), init_json.len(), &raw mut engine) };
        if !error.is_null() {
            // SAFETY: `error` is an owned error of this engine.
            let error = unsafe { take_error(&fns, error) };
            return Err(EngineLoadError::Init {
                path: path.to_path_buf(),
                source: error,
            });
        }
        let engine = NonNull::new(engine)
            .ok_or_else(|| invalid("`init` succeeded but returned a NULL engine".to_owned()))?;
        Ok(LoadedEngine {
            engine,
            fns,
            deinit,
            abi: (major, minor),
            origin: path.to_path_buf(),
            _library: library.map(ManuallyDrop::new),
        })
    }

    /// The ABI version the engine declared.
    pub(super) fn abi(&self) -> (u32, u32) {
        self.abi
    }

    /// The library path (or `<in-process>`).
    pub(super) fn origin(&self) -> &Path {
        &self.origin
    }

    /// `info`: the engine's JSON answer.
    pub(super) fn info(&self) -> Result<Vec<u8>, EngineCallError> {
        // SAFETY: live engine; `out` is a valid out-pointer (see `call_out`).
        self.call_out(|out| unsafe { (self.fns.info)(self.engine.as_ptr(), out) })
    }

    /// `load_model` with a JSON `LoadSpec`.
    pub(super) fn load_model(&self, spec_json: &[u8]) -> Result<Vec<u8>, EngineCallError> {
        self.call_out(|out| {
            // SAFETY: live engine; the slice is valid for the call; `out` is a valid out-pointer.
            unsafe {
                (self.fns.load_model)(
                    self.engine.as_ptr(),
                    spec_json.as_ptr(),
                    spec_json.len(),
                    out,
                )
            }
        })
    }

    /// `unload_model`.
    pub(super) fn unload_model(&self, model: u64) -> Result<(), EngineCallError> {
        // SAFETY: live engine.
        let error = unsafe { (self.fns.unload_model)(self.engine.as_ptr(), model) };
        // SAFETY: NULL or an owned error of this engine.
        unsafe { self.check(error) }
    }

    /// `memory_report`: the engine's JSON answer.
    pub(super) fn memory_report(&self) -> Result<Vec<u8>, EngineCallError> {
        // SAFETY: live engine; `out` is a valid out-pointer (see `call_out`).
        self.call_out(|out| unsafe { (self.fns.memory_report)(self.engine.as_ptr(), out) })
    }

    /// `generate`: blocks until the engine reports the outcome; returns the summary JSON.
    ///
    /// A panic in `on_token` is caught at the callback (it must not unwind into the engine),
    /// answered with `Cancel`, and resumed here once the engine has returned.
    pub(super) fn generate(
        &self,
        model: u64,
        params_json: &[u8],
        prompt: &[u32],
        on_token: &mut (dyn FnMut(u32) -> Flow + Send),
    ) -> Result<Vec<u8>, EngineCallError> {
        let state = Box::new(SinkState {
            on_token,
            fns: self.fns,
            cancelled: false,
            panic: None,
            done_calls: 0,
            outcome: None,
        });
        let userdata = Box::into_raw(state);
        let sink = HelexaTokenSink {
            userdata: userdata.cast::<c_void>(),
            on_token: Some(sink_on_token),
            on_done: Some(sink_on_done),
        };
        // SAFETY: live engine; params and prompt slices are valid for the call; the sink's
        // userdata is the boxed state, which the trampolines expect and which outlives the call.
        let error = unsafe {
            (self.fns.generate)(
                self.engine.as_ptr(),
                model,
                params_json.as_ptr(),
                params_json.len(),
                prompt.as_ptr(),
                prompt.len(),
                sink,
            )
        };
        // SAFETY: `generate` has returned, and with it the engine's claim on `userdata` (callbacks
        // only run before it returns), so the box is ours again.
        let state = unsafe { Box::from_raw(userdata) };
        // SAFETY: NULL or an owned error of this engine.
        let refused = unsafe { self.check(error) };
        if let Some(payload) = state.panic {
            resume_unwind(payload);
        }
        refused?;
        if state.done_calls > 1 {
            tracing::error!(
                calls = state.done_calls,
                engine = %self.origin.display(),
                "engine called on_done more than once; only the first outcome was used"
            );
        }
        state.outcome.unwrap_or_else(|| {
            Err(EngineCallError {
                kind: ErrorKind::Internal,
                message: "engine returned from generate without calling on_done".to_owned(),
            })
        })
    }

    /// Runs a call writing an owned buffer; copies the buffer out and frees it.
    fn call_out(
        &self,
        call: impl FnOnce(*mut HelexaBuf) -> *mut HelexaError,
    ) -> Result<Vec<u8>, EngineCallError> {
        let mut buf = HelexaBuf::EMPTY;
        let error = call(&raw mut buf);
        // SAFETY: NULL or an owned error of this engine.
        unsafe { self.check(error) }?;
        // SAFETY: on success `buf` is an owned buffer of this engine (or still empty).
        Ok(unsafe { take_buf(&self.fns, buf) })
    }

    /// Turns a returned error pointer into a `Result`, freeing the error.
    ///
    /// # Safety
    /// `error` is NULL or an owned error of this engine.
    unsafe fn check(&self, error: *mut HelexaError) -> Result<(), EngineCallError> {
        if error.is_null() {
            Ok(())
        } else {
            // SAFETY: non-NULL owned error, by the caller's contract.
            Err(unsafe { take_error(&self.fns, error) })
        }
    }
}

impl Drop for LoadedEngine {
    fn drop(&mut self) {
        // SAFETY: the engine came from `init`, and this is the last owner (the handle's `Arc` is
        // dropping), so no other call can be in flight.
        unsafe { (self.deinit)(self.engine.as_ptr()) };
    }
}

/// Copies an owned engine buffer into a `Vec` and frees it.
///
/// # Safety
/// `buf` is (NULL, 0) or an owned buffer of the engine whose functions are `fns`.
unsafe fn take_buf(fns: &V1Fns, buf: HelexaBuf) -> Vec<u8> {
    if buf.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: an owned buffer of `buf.len` readable bytes (caller's contract).
    let bytes = unsafe { std::slice::from_raw_parts(buf.ptr, buf.len) }.to_vec();
    // SAFETY: freed exactly once, with the same engine's `buf_free`.
    unsafe { (fns.buf_free)(buf) };
    bytes
}

/// Reads an owned engine error into an [`EngineCallError`] and frees it.
///
/// # Safety
/// `error` is a non-NULL owned error of the engine whose functions are `fns`.
unsafe fn take_error(fns: &V1Fns, error: *mut HelexaError) -> EngineCallError {
    // SAFETY: a live error of this engine.
    let kind = ErrorKind::from_raw(unsafe { (fns.error_kind)(error) });
    let mut len = 0usize;
    // SAFETY: a live error; `len` is a writable out-pointer.
    let message = unsafe { (fns.error_message)(error, &raw mut len) };
    let message = if message.is_null() {
        String::new()
    } else {
        // SAFETY: `len` readable bytes, borrowed until `error_free` below.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(message, len) }).into_owned()
    };
    // SAFETY: freed exactly once, with the same engine's `error_free`.
    unsafe { (fns.error_free)(error) };
    EngineCallError { kind, message }
}

/// The userdata of one `generate` call.
struct SinkState<'a> {
    on_token: &'a mut (dyn FnMut(u32) -> Flow + Send),
    fns: V1Fns,
    /// Set once `on_token` answered `Cancel`; later tokens are not shown to the closure.
    cancelled: bool,
    /// A panic of `on_token`, resumed after `generate` returns.
    panic: Option<Box<dyn Any + Send>>,
    done_calls: u32,
    outcome: Option<Result<Vec<u8>, EngineCallError>>,
}

/// `on_token` trampoline: forwards to the closure, catching its panics.
///
/// # Safety
/// `userdata` is the `SinkState` of the running `generate` call, not otherwise borrowed.
unsafe extern "C" fn sink_on_token(userdata: *mut c_void, token_id: u32) -> HelexaFlow {
    // SAFETY: the engine passes back our userdata, on the thread blocked in `generate`, so this is
    // the only live reference to the state.
    let state = unsafe { &mut *userdata.cast::<SinkState<'_>>() };
    if state.cancelled || state.panic.is_some() {
        return HelexaFlow::CANCEL;
    }
    match catch_unwind(AssertUnwindSafe(|| (state.on_token)(token_id))) {
        Ok(Flow::Continue) => HelexaFlow::CONTINUE,
        Ok(Flow::Cancel) => {
            state.cancelled = true;
            HelexaFlow::CANCEL
        }
        Err(payload) => {
            state.panic = Some(payload);
            HelexaFlow::CANCEL
        }
    }
}

/// `on_done` trampoline: records the first outcome; takes ownership of `error`.
///
/// # Safety
/// As [`sink_on_token`]; `summary_json` holds `summary_len` readable bytes or is NULL; `error` is
/// NULL or an owned error of the engine.
unsafe extern "C" fn sink_on_done(
    userdata: *mut c_void,
    status: HelexaStatus,
    summary_json: *const u8,
    summary_len: usize,
    error: *mut HelexaError,
) {
    // SAFETY: as in `sink_on_token`.
    let state = unsafe { &mut *userdata.cast::<SinkState<'_>>() };
    state.done_calls += 1;
    let outcome = if !error.is_null() {
        // SAFETY: ownership of the error is ours (ABI rule); freed once, here.
        Err(unsafe { take_error(&state.fns, error) })
    } else if status != HelexaStatus::OK {
        Err(EngineCallError {
            kind: ErrorKind::Internal,
            message: format!("engine reported status {} without an error", status.0),
        })
    } else if summary_json.is_null() {
        Ok(Vec::new())
    } else {
        // SAFETY: borrowed summary bytes, valid during this call (ABI rule); copied.
        Ok(unsafe { std::slice::from_raw_parts(summary_json, summary_len) }.to_vec())
    };
    if state.outcome.is_none() {
        state.outcome = Some(outcome);
    }
}

#[cfg(test)]
mod tests;
