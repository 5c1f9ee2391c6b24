//! `helexa-node synth` and `helexa-node bench` end to end: the real binary synthesizes the tiny
//! preset in every format, then the CPU engine library loads each one through the ABI and
//! generates; the JSON report must hold every figure with consistent ceilings.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn node(args: &[&str], dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_helexa-node"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("HELEXA_NODE_CONFIG")
        .output()
        .expect("run helexa-node");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helexa-node {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn synth_then_bench_every_format_on_the_cpu_engine() {
    let dir = tempfile::tempdir().unwrap();
    let engine = crate::engine_library();
    let engine = engine.to_str().unwrap();
    let stdout = node(
        &[
            "bench",
            "--engine",
            engine,
            "--synth",
            "tiny",
            "--layers",
            "2",
            "--formats",
            "bf16,q8_0,q4_k_m",
            "--workdir",
            "models",
            "--prefill",
            "16,40",
            "--decode-context",
            "0,24",
            "--decode-tokens",
            "6",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
            "bench.json",
        ],
        dir.path(),
    );
    assert!(stdout.contains("backend cpu"), "{stdout}");
    for figure in [
        "load",
        "prefill 40 (tok/s)",
        "decode 6 @24 (tok/s)",
        "host queuing",
    ] {
        assert!(stdout.contains(figure), "no {figure:?} in\n{stdout}");
    }

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("bench.json")).unwrap())
            .unwrap();
    assert_eq!(report["engine"]["backend"], "cpu");
    assert_eq!(report["ceilings"]["mem_bandwidth"], 4.40e12);
    assert_eq!(report["repeats"], 2);
    let models = report["models"].as_array().unwrap();
    let quants: Vec<&str> = models
        .iter()
        .map(|m| m["quant"].as_str().unwrap())
        .collect();
    assert_eq!(quants, ["none", "q8_0", "q4_k_m"]);
    let mut decode_bytes = Vec::new();
    for m in models {
        let label = m["label"].as_str().unwrap();
        assert!(m["load"]["seconds"].as_f64().unwrap() > 0.0, "{label}");
        assert_eq!(m["parameters"], 2_229_760, "{label}");
        let prefill = m["prefill"].as_array().unwrap();
        assert_eq!(prefill.len(), 2);
        assert_eq!(prefill[1]["tokens"], 40);
        let decode = m["decode"].as_array().unwrap();
        assert_eq!(decode.len(), 2);
        for f in prefill.iter().chain(decode) {
            let runs = f["runs_s"].as_array().unwrap();
            assert_eq!(runs.len(), 2, "{label}: {f}");
            let median = f["median_tok_s"].as_f64().unwrap();
            let best = f["best_tok_s"].as_f64().unwrap();
            let ceiling = f["ceiling_tok_s"].as_f64().unwrap();
            assert!(median > 0.0 && best >= median, "{label}: {f}");
            assert!((f["ratio"].as_f64().unwrap() - median / ceiling).abs() < 1e-9);
        }
        // Each decode figure records the greedy tokens of its first timed run (the timed 6 and
        // the first, from the prefill); prefill figures record none.
        // And the prompt they followed (its context's length; a one-token prompt at 0).
        for f in decode {
            let tokens = f["greedy_tokens"].as_array().unwrap();
            assert_eq!(tokens.len(), 7, "{label}: {f}");
            assert!(tokens.iter().all(Value::is_u64), "{label}: {f}");
            let prompt = f["greedy_prompt"].as_array().unwrap();
            let context = f["context"].as_u64().unwrap().max(1);
            assert_eq!(prompt.len() as u64, context, "{label}: {f}");
        }
        assert!(prefill.iter().all(|f| f.get("greedy_tokens").is_none()));
        // The engine times its decode steps: the host's queuing is part of each step (on the
        // CPU engine nearly all of it, as the work runs where it is queued).
        for f in decode {
            let queued = f["host_queue_ms"].as_f64().unwrap();
            let step = f["step_ms"].as_f64().unwrap();
            assert!(queued > 0.0 && queued <= step, "{label}: {f}");
        }
        assert!(prefill.iter().all(|f| f.get("step_ms").is_none()));
        // More context reads more KV cache per token.
        assert!(decode[1]["per_token"].as_f64() > decode[0]["per_token"].as_f64());
        decode_bytes.push(decode[0]["per_token"].as_f64().unwrap());
    }
    // The CPU engine computes in f32: 4 bytes per dense weight, fewer for the quantized files.
    assert!(decode_bytes[0] > decode_bytes[1] && decode_bytes[1] > decode_bytes[2]);

    // A second run reuses the synthesized files.
    let again = Command::new(env!("CARGO_BIN_EXE_helexa-node"))
        .args([
            "synth",
            "--preset",
            "tiny",
            "--layers",
            "2",
            "--formats",
            "q8_0",
        ])
        .args(["--out", "models"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("reusing"));
}

#[test]
fn bench_refuses_a_missing_model_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_helexa-node"))
        .args(["bench", "--engine"])
        .arg(crate::engine_library())
        .args(["--model", "no-such-model"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-model"), "{stderr}");
}
