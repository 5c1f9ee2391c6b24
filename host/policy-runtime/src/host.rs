//! What a guest's store holds: its memory limiter and its log sink (the `log` import).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// Lines a plugin may log per second; the rest are dropped and counted, so a guest that
/// logs in a loop cannot flood the gateway's log.
const LOG_LINES_PER_SECOND: u32 = 100;
/// Longest log line kept (bytes); longer lines are cut.
const LOG_LINE_MAX: usize = 2048;

/// Severity of a guest log line (version-independent mirror of WIT `log.level`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum GuestLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// Store data of every policy instance.
pub(crate) struct HostState {
    limiter: Limiter,
    log: std::sync::Arc<LogSink>,
}

impl HostState {
    pub(crate) fn new(max_memory_bytes: usize, log: std::sync::Arc<LogSink>) -> Self {
        HostState {
            limiter: Limiter {
                inner: StoreLimitsBuilder::new()
                    .memory_size(max_memory_bytes)
                    // A failed `memory.grow` would otherwise return -1 to the guest, whose
                    // allocator then aborts anyway; trapping makes it one clear fault.
                    .trap_on_grow_failure(true)
                    .build(),
                memory_bytes: 0,
            },
            log,
        }
    }

    pub(crate) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limiter
    }

    /// Current size of the instance's linear memories, in bytes (they never shrink).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.limiter.memory_bytes
    }

    pub(crate) fn log(&self, level: GuestLevel, message: &str) {
        self.log.write(level, message);
    }
}

/// [`StoreLimits`] plus a record of how large the memories have grown, which decides
/// when a pooled instance is recycled.
struct Limiter {
    inner: StoreLimits,
    memory_bytes: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory_bytes = self
                .memory_bytes
                .saturating_sub(current)
                .saturating_add(desired);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The `log` import of one plugin: prefixes its name and version, rate-limits.
pub(crate) struct LogSink {
    label: String,
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    lines: u32,
    dropped: u64,
}

impl LogSink {
    /// `label` is `policy "<name>" v<version>`.
    pub(crate) fn new(label: String) -> Self {
        LogSink {
            label,
            window: Mutex::new(Window {
                start: Instant::now(),
                lines: 0,
                dropped: 0,
            }),
        }
    }

    fn write(&self, level: GuestLevel, message: &str) {
        let dropped_before = {
            let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let mut dropped_before = 0;
            if now.duration_since(window.start) >= Duration::from_secs(1) {
                dropped_before = std::mem::take(&mut window.dropped);
                window.start = now;
                window.lines = 0;
            }
            if window.lines >= LOG_LINES_PER_SECOND {
                window.dropped += 1;
                return;
            }
            window.lines += 1;
            dropped_before
        };
        let label = &self.label;
        if dropped_before > 0 {
            tracing::warn!(target: "helexa::policy", "{label}: {dropped_before} log lines dropped (over {LOG_LINES_PER_SECOND}/s)");
        }
        let message = truncate(message, LOG_LINE_MAX);
        match level {
            GuestLevel::Debug => tracing::debug!(target: "helexa::policy", "{label}: {message}"),
            GuestLevel::Info => tracing::info!(target: "helexa::policy", "{label}: {message}"),
            GuestLevel::Warn => tracing::warn!(target: "helexa::policy", "{label}: {message}"),
            GuestLevel::Error => tracing::error!(target: "helexa::policy", "{label}: {message}"),
        }
    }
}

/// Cut `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn rate_limit_drops_lines_over_the_budget() {
        let sink = LogSink::new("policy \"t\" v1".into());
        for _ in 0..(LOG_LINES_PER_SECOND + 25) {
            sink.write(GuestLevel::Debug, "x");
        }
        let window = sink.window.lock().unwrap();
        assert_eq!(window.lines, LOG_LINES_PER_SECOND);
        assert_eq!(window.dropped, 25);
    }
}
