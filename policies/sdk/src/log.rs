//! Logging into the gateway's log: the one import a policy has.
//!
//! On `wasm32` each function calls the `helexa:policy/log` import (the host prefixes
//! the plugin's name and version, and rate-limits). Natively (unit tests) warnings
//! and errors go to stderr, where the test harness captures them; debug and info
//! lines are dropped.

#[cfg(target_arch = "wasm32")]
fn write(level: crate::bindings::router::helexa::policy::log::Level, message: &str) {
    crate::bindings::router::helexa::policy::log::write(level, message);
}

/// Writes a debug line.
pub fn debug(message: &str) {
    #[cfg(target_arch = "wasm32")]
    write(
        crate::bindings::router::helexa::policy::log::Level::Debug,
        message,
    );
    #[cfg(not(target_arch = "wasm32"))]
    let _ = message;
}

/// Writes an info line.
pub fn info(message: &str) {
    #[cfg(target_arch = "wasm32")]
    write(
        crate::bindings::router::helexa::policy::log::Level::Info,
        message,
    );
    #[cfg(not(target_arch = "wasm32"))]
    let _ = message;
}

/// Writes a warning.
pub fn warn(message: &str) {
    #[cfg(target_arch = "wasm32")]
    write(
        crate::bindings::router::helexa::policy::log::Level::Warn,
        message,
    );
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[policy warn] {message}");
}

/// Writes an error line.
pub fn error(message: &str) {
    #[cfg(target_arch = "wasm32")]
    write(
        crate::bindings::router::helexa::policy::log::Level::Error,
        message,
    );
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[policy error] {message}");
}
