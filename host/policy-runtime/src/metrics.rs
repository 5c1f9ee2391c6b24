//! Prometheus metrics of policy calls. Label values are resolved once per plugin at load,
//! so a call only bumps pre-resolved counters (no label hashing on the hot path).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::PolicyKind;

/// How a call ended, as counted in `helexa_policy_calls_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered.
    Ok,
    /// Returned a `policy-error` (other than a client's invalid input to a translator).
    Error,
    /// Trapped (including running out of memory).
    Trap,
    /// Ran past its epoch deadline.
    Timeout,
    /// Answered in place of a failed plugin (counted on the default policy).
    Fallback,
}

/// The metric families, registered once per runtime.
#[derive(Clone)]
pub(crate) struct Metrics {
    calls: IntCounterVec,
    seconds: HistogramVec,
}

impl Metrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let calls = IntCounterVec::new(
            Opts::new(
                "helexa_policy_calls_total",
                "Policy calls by plugin, version, kind and outcome",
            ),
            &["plugin", "version", "kind", "outcome"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "helexa_policy_call_seconds",
                "Duration of policy calls by plugin, kind and outcome",
            )
            .buckets(vec![
                5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                5e-2, 0.1, 0.25,
            ]),
            &["plugin", "kind", "outcome"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(Metrics { calls, seconds })
    }

    pub(crate) fn for_plugin(&self, name: &str, version: &str, kind: PolicyKind) -> PluginMetrics {
        let counter = |outcome: &str| {
            self.calls
                .with_label_values(&[name, version, kind.as_str(), outcome])
        };
        PluginMetrics {
            ok: counter("ok"),
            error: counter("error"),
            trap: counter("trap"),
            timeout: counter("timeout"),
            fallback: counter("fallback"),
            seconds: [
                Outcome::Ok,
                Outcome::Error,
                Outcome::Trap,
                Outcome::Timeout,
                Outcome::Fallback,
            ]
            .map(|o| {
                self.seconds
                    .with_label_values(&[name, kind.as_str(), o.as_str()])
            }),
        }
    }
}

/// One plugin's resolved counters.
pub(crate) struct PluginMetrics {
    ok: IntCounter,
    error: IntCounter,
    trap: IntCounter,
    timeout: IntCounter,
    fallback: IntCounter,
    /// Call durations by outcome (ok, error, trap, timeout, fallback); a fallback is
    /// observed on the default, as the failed call plus the default's answer.
    seconds: [Histogram; 5],
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::Fallback => "fallback",
        }
    }
}

impl PluginMetrics {
    /// Observe a call's duration under its outcome.
    pub(crate) fn observe(&self, outcome: Outcome, seconds: f64) {
        let index = match outcome {
            Outcome::Ok => 0,
            Outcome::Error => 1,
            Outcome::Trap => 2,
            Outcome::Timeout => 3,
            Outcome::Fallback => 4,
        };
        self.seconds[index].observe(seconds);
    }

    pub(crate) fn count(&self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Error => &self.error,
            Outcome::Trap => &self.trap,
            Outcome::Timeout => &self.timeout,
            Outcome::Fallback => &self.fallback,
        }
        .inc();
    }
}
