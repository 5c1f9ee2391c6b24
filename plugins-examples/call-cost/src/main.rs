//! Validates policy components and measures their call cost through the same runtime the
//! gateway uses (`helexa-policy-runtime`: pooled instances, epoch deadline, metrics).
//!
//! ```text
//! cargo run -p helexa-example-call-cost -- [--calls N] router=a.wasm evictor=b.wasm ...
//! ```
//!
//! For each component: checks its world and WIT version (`inspect`), loads it with fail
//! policy `reject` (so a failing call shows instead of the default answering) and
//! settings `{}`, and times `route` (a 16-node fleet resident in the instance, the
//! common case) or `choose_victims` (8 residents) the way
//! `host/policy-runtime/benches/policy_call.rs` times the defaults, which it also prints
//! for comparison. Exits non-zero when a component is refused or a call fails.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use helexa_policy_runtime::bench_inputs::*;
use helexa_policy_runtime::*;

const WARMUP: usize = 1_000;

fn main() -> anyhow::Result<()> {
    let mut calls = 20_000;
    let mut components = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--calls" {
            calls = args
                .next()
                .context("--calls needs a number")?
                .parse()
                .context("--calls needs a number")?;
            continue;
        }
        let (kind, path) = arg
            .split_once('=')
            .with_context(|| format!("{arg:?}: expected KIND=PATH (router=x.wasm)"))?;
        let kind = match kind {
            "router" => PolicyKind::Router,
            "evictor" => PolicyKind::Evictor,
            other => bail!("{other:?}: only router and evictor calls are measured"),
        };
        components.push((kind, path.to_owned()));
    }
    if components.is_empty() {
        bail!("usage: helexa-example-call-cost [--calls N] router=a.wasm evictor=b.wasm ...");
    }

    let registry = prometheus::Registry::new();
    let runtime = PolicyRuntime::new(RuntimeConfig::default(), &registry)?;
    let defaults = runtime.default_set()?;
    let fixture = Fixture::new();
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "component", "size", "p50", "p99"
    );
    measure_set(
        "default router (embedded)",
        PolicyKind::Router,
        &defaults,
        &fixture,
        calls,
        0,
    )?;
    measure_set(
        "default evictor (embedded)",
        PolicyKind::Evictor,
        &defaults,
        &fixture,
        calls,
        0,
    )?;

    // The deadline is wall time: on a loaded machine (CI, parallel builds) a descheduled
    // thread can miss the default 20 ms through no fault of the policy. This tool measures
    // cost and correctness, not deadline adherence, so it allows a generous one.
    let options = PluginOptions {
        on_failure: FailPolicy::Reject,
        deadline: Some(std::time::Duration::from_secs(1)),
        ..PluginOptions::default()
    };
    for (kind, path) in components {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
        let name = std::path::Path::new(&path)
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or("plugin")
            .replace('_', "-");
        let started = Instant::now();
        let info = runtime
            .inspect(&name, &bytes, Some(kind))
            .with_context(|| format!("{path} is not a valid {} component", kind.interface()))?;
        let plugin = runtime
            .load_plugin_with(kind, &name, "0.0.0", &bytes, "{}", &options)
            .with_context(|| format!("{path} did not instantiate"))?;
        println!(
            "{name}: world {} WIT {}, compiled and instantiated in {:.0} ms",
            kind.interface(),
            info.wit_version,
            started.elapsed().as_secs_f64() * 1e3
        );
        let set = defaults.with(plugin);
        if let Err(error) = measure_set(&name, kind, &set, &fixture, calls, bytes.len()) {
            // Say how the calls failed (trap, timeout, error) from the runtime's counters.
            for family in registry.gather() {
                if family.name() != "helexa_policy_calls_total" {
                    continue;
                }
                for metric in family.get_metric() {
                    let labels: Vec<String> = metric
                        .get_label()
                        .iter()
                        .map(|label| format!("{}={}", label.name(), label.value()))
                        .collect();
                    if labels.iter().any(|l| *l == format!("plugin={name}"))
                        && !labels.iter().any(|l| l == "outcome=ok")
                    {
                        eprintln!(
                            "{name}: {} calls with {}",
                            metric.get_counter().get_value(),
                            labels.join(",")
                        );
                    }
                }
            }
            return Err(error);
        }
    }
    Ok(())
}

/// The benchmark's inputs (`bench_inputs`, as `policy_call.rs` uses them).
struct Fixture {
    catalogue: Arc<Catalogue>,
    fleet: Arc<Fleet>,
    request: RequestInfo,
    node: Node,
    incoming: CatalogueEntry,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            catalogue: Arc::new(catalogue()),
            fleet: Arc::new(fleet(1)),
            request: RequestInfo {
                model: "model-3".into(),
                surface: Surface::OpenaiChat,
                prompt_tokens_estimate: 1200,
                max_output_tokens: Some(512),
                stream: true,
                caller: Some("bench".into()),
                headers: vec![("x-helexa-tier".into(), "gold".into())],
            },
            node: node(0, 8),
            incoming: entry(99),
        }
    }
}

fn measure_set(
    name: &str,
    kind: PolicyKind,
    set: &PolicySet,
    fixture: &Fixture,
    calls: usize,
    size: usize,
) -> anyhow::Result<()> {
    let samples = match kind {
        PolicyKind::Router => {
            let decision = set.route(&fixture.request, &fixture.catalogue, &fixture.fleet);
            if !matches!(decision, Decision::Serve(_)) {
                bail!("{name}: expected a serve decision for a ready model, got {decision:?}");
            }
            time_calls(WARMUP, calls, || {
                std::hint::black_box(set.route(
                    &fixture.request,
                    &fixture.catalogue,
                    &fixture.fleet,
                ));
            })
        }
        _ => {
            let victims = set.choose_victims(&fixture.node, 30_000, &fixture.incoming);
            if victims.is_empty() {
                bail!("{name}: expected victims on a node of idle residents");
            }
            time_calls(WARMUP, calls, || {
                std::hint::black_box(set.choose_victims(&fixture.node, 30_000, &fixture.incoming));
            })
        }
    };
    let status = set.plugin(kind).status();
    let size = if size == 0 {
        "-".to_owned()
    } else {
        format!("{} KiB", size / 1024)
    };
    println!(
        "{name:<44} {size:>10} {:>7.2} µs {:>7.2} µs  ({} calls, {} errors)",
        quantile(&samples, 0.5),
        quantile(&samples, 0.99),
        samples.len(),
        status.errors
    );
    if status.errors > 0 {
        bail!("{name}: {} calls failed", status.errors);
    }
    Ok(())
}
