//! Device discipline: per-device worker threads own their models, injected device faults poison
//! exactly the models of that device, recovery by unload + reload, cancel and concurrency.

use std::sync::mpsc;

use helexa_engine_abi::json::{Finish, InitOptions, LoadSpec};
use helexa_engine_abi::{ErrorKind, Flow};
use helexa_engine_cuda::{Engine, EngineOptions, FaultInjection};

use crate::common::*;

const QWEN3: &str = "Qwen3ForCausalLM";

fn prompt(name: &str) -> Vec<u32> {
    reference("tiny-qwen3").prompts[name].token_ids.clone()
}

/// A CPU engine with two pseudo-devices (0 and 1), each with its own worker thread.
fn two_device_engine(inject: Option<FaultInjection>) -> Engine {
    Engine::with_options(
        &InitOptions::default(),
        EngineOptions {
            inject_fault: inject,
            cpu_devices: Some(2),
        },
    )
    .expect("cpu engine")
}

fn spec_on(id: &str, device: u32) -> LoadSpec {
    let mut spec = safetensors_spec("tiny-qwen3", QWEN3);
    spec.id = id.to_owned();
    spec.devices = Some(vec![device]);
    spec
}

fn expected(n: usize) -> Vec<u32> {
    reference("tiny-qwen3").prompts["think"].greedy_token_ids[..n].to_vec()
}

#[test]
fn each_device_worker_owns_its_models() {
    let engine = two_device_engine(None);
    let a = engine.load(&spec_on("a", 0)).expect("load").handle;
    let b = engine.load(&spec_on("b", 1)).expect("load").handle;
    assert_eq!(engine.model_thread_name(a).unwrap(), "helexa-dev-cpu:0");
    assert_eq!(engine.model_thread_name(b).unwrap(), "helexa-dev-cpu:1");
    assert_eq!(engine.info().devices.len(), 2);
    assert_eq!(
        engine.load(&spec_on("c", 2)).expect_err("no device 2").kind,
        ErrorKind::BadInput
    );
}

#[test]
fn injected_fault_poisons_its_device_only_and_reload_recovers() {
    // Fires once: after 2 tokens of a generate on a model whose id contains "victim".
    let engine = two_device_engine(Some(FaultInjection::new(2, Some("victim".into()))));
    let victim = engine.load(&spec_on("victim", 0)).expect("load").handle;
    let neighbour = engine.load(&spec_on("neighbour", 0)).expect("load").handle;
    let elsewhere = engine.load(&spec_on("elsewhere", 1)).expect("load").handle;
    let ids = prompt("think");

    // Models that do not match the substring are not faulted.
    assert_eq!(run(&engine, elsewhere, &greedy(4), &ids).0, expected(4));

    let mut streamed = Vec::new();
    let e = engine
        .generate(victim, &greedy(6), &ids, &mut |t| {
            streamed.push(t);
            Flow::Continue
        })
        .expect_err("injected fault");
    assert_eq!(e.kind, ErrorKind::DeviceFault);
    assert!(
        e.message.contains("HELEXA_ENGINE_INJECT_FAULT"),
        "{}",
        e.message
    );
    assert_eq!(streamed, expected(2), "the fault fires after 2 tokens");

    // Every model of device 0 is poisoned, naming the cause; device 1 keeps serving.
    let e = engine
        .generate(neighbour, &greedy(2), &ids, &mut |_| Flow::Continue)
        .expect_err("poisoned");
    assert_eq!(e.kind, ErrorKind::DeviceFault);
    assert!(e.message.contains("CUDA_ERROR_INJECTED"), "{}", e.message);
    assert_eq!(run(&engine, elsewhere, &greedy(4), &ids).0, expected(4));
    let faults = engine.device_faults();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].0, 0);
    assert!(engine.info().devices[0].name.contains("faulted"));

    // Loads on the faulted device are refused until its models are gone.
    assert_eq!(
        engine
            .load(&spec_on("victim", 0))
            .expect_err("faulted")
            .kind,
        ErrorKind::DeviceFault
    );
    engine.unload(victim).expect("unload poisoned");
    engine.unload(neighbour).expect("unload poisoned");
    assert!(engine.device_faults().is_empty(), "device re-created");
    let victim = engine.load(&spec_on("victim", 0)).expect("reload").handle;
    // The injection fired once per engine life: the reloaded model serves.
    assert_eq!(run(&engine, victim, &greedy(6), &ids).0, expected(6));
}

#[test]
fn cancel_stops_promptly_and_reports_what_was_delivered() {
    let engine = two_device_engine(None);
    let model = engine.load(&spec_on("m", 0)).expect("load").handle;
    let ids = prompt("think");
    let mut seen = Vec::new();
    // No stop ids, so the token cancelled on cannot end generation as `Stop`.
    let mut params = greedy(64);
    params.stop_ids.clear();
    let summary = engine
        .generate(model, &params, &ids, &mut |t| {
            seen.push(t);
            if seen.len() == 3 {
                Flow::Cancel
            } else {
                Flow::Continue
            }
        })
        .expect("generate");
    assert_eq!(summary.finish, Finish::Cancelled);
    assert_eq!(summary.generated_tokens, 3);
    assert_eq!(seen, expected(3));
    // The worker stopped within one step: the KV cache holds at most prompt + 4 tokens, which
    // the next request on the same prompt reuses.
    let (_, next) = run(&engine, model, &greedy(1), &ids);
    assert_eq!(next.reused_prompt_tokens as usize, ids.len() - 1);
}

#[test]
fn generates_on_two_devices_concurrently() {
    let engine = two_device_engine(None);
    let a = engine.load(&spec_on("a", 0)).expect("load").handle;
    let b = engine.load(&spec_on("b", 1)).expect("load").handle;
    let ids = prompt("think");
    // Each caller waits, inside its first `on_token`, for the other's first token: both
    // generates are in flight at once and both complete with the reference continuation.
    let (to_b, from_a) = mpsc::channel::<()>();
    let (to_a, from_b) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let engine = &engine;
        let ids = &ids;
        let ta = s.spawn(move || {
            let mut n = 0;
            let mut out = Vec::new();
            engine
                .generate(a, &greedy(4), ids, &mut |t| {
                    out.push(t);
                    n += 1;
                    if n == 1 {
                        to_b.send(()).unwrap();
                        from_b.recv().unwrap();
                    }
                    Flow::Continue
                })
                .expect("generate a");
            out
        });
        let tb = s.spawn(move || {
            let mut n = 0;
            let mut out = Vec::new();
            engine
                .generate(b, &greedy(4), ids, &mut |t| {
                    out.push(t);
                    n += 1;
                    if n == 1 {
                        to_a.send(()).unwrap();
                        from_a.recv().unwrap();
                    }
                    Flow::Continue
                })
                .expect("generate b");
            out
        });
        assert_eq!(ta.join().unwrap(), expected(4));
        assert_eq!(tb.join().unwrap(), expected(4));
    });
}

#[test]
fn concurrent_generates_on_one_device_are_serialised_and_complete() {
    let engine = two_device_engine(None);
    let a = engine.load(&spec_on("a", 0)).expect("load").handle;
    let b = engine.load(&spec_on("b", 0)).expect("load").handle;
    let ids = prompt("think");
    std::thread::scope(|s| {
        let runs = [a, b].map(|m| {
            let (engine, ids) = (&engine, &ids);
            s.spawn(move || run(engine, m, &greedy(5), ids).0)
        });
        for r in runs {
            assert_eq!(r.join().unwrap(), expected(5));
        }
    });
}

#[test]
fn fault_injection_switch_parses() {
    let f = FaultInjection::parse("3:qwen").unwrap();
    assert_eq!(
        (f.after_tokens, f.model_substring.as_deref()),
        (3, Some("qwen"))
    );
    let f = FaultInjection::parse("0").unwrap();
    assert_eq!((f.after_tokens, f.model_substring), (0, None));
    assert_eq!(
        FaultInjection::parse("soon").unwrap_err().kind,
        ErrorKind::BadInput
    );
}
