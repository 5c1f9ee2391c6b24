//! Unit tests of the ABI description: layout, versions, raw values, JSON wire format.

use std::mem::{align_of, offset_of, size_of};

use serde_json::json;

use super::json::*;
use super::*;

const PTR: usize = size_of::<*const u8>();

#[test]
fn nullable_function_pointers_are_pointer_sized() {
    // `Option<fn>` must be a plain (nullable) C function pointer for the structs to match the header.
    assert_eq!(size_of::<HelexaInitFn>(), PTR);
    assert_eq!(size_of::<HelexaGenerateFn>(), PTR);
    assert_eq!(size_of::<HelexaOnDone>(), PTR);
    assert_eq!(size_of::<HelexaFlow>(), 4);
    assert_eq!(size_of::<HelexaStatus>(), 4);
    assert_eq!(size_of::<HelexaErrorKind>(), 4);
}

#[test]
fn entry_layout_is_stable() {
    // The version fields lead in every major version: the loader reads them first.
    assert_eq!(offset_of!(HelexaEngineEntry, abi_major), 0);
    assert_eq!(offset_of!(HelexaEngineEntry, abi_minor), 4);
    assert_eq!(offset_of!(HelexaEngineEntry, init), 8);
    assert_eq!(offset_of!(HelexaEngineEntry, deinit), 8 + PTR);
    assert_eq!(offset_of!(HelexaEngineEntry, get_interface), 8 + 2 * PTR);
    assert_eq!(
        size_of::<HelexaEngineEntry>(),
        (8 + 3 * PTR).next_multiple_of(PTR)
    );
    assert_eq!(align_of::<HelexaEngineEntry>(), PTR.max(4));
}

#[test]
fn vtable_layout_is_stable() {
    assert_eq!(offset_of!(HelexaEngineV1, struct_size), 0);
    let order = [
        offset_of!(HelexaEngineV1, info),
        offset_of!(HelexaEngineV1, load_model),
        offset_of!(HelexaEngineV1, unload_model),
        offset_of!(HelexaEngineV1, memory_report),
        offset_of!(HelexaEngineV1, generate),
        offset_of!(HelexaEngineV1, buf_free),
        offset_of!(HelexaEngineV1, error_message),
        offset_of!(HelexaEngineV1, error_kind),
        offset_of!(HelexaEngineV1, error_free),
    ];
    for (index, offset) in order.into_iter().enumerate() {
        assert_eq!(offset, size_of::<usize>() + index * PTR, "field #{index}");
    }
    assert_eq!(size_of::<HelexaEngineV1>(), size_of::<usize>() + 9 * PTR);
    assert_eq!(ENGINE_V1_MIN_SIZE, size_of::<HelexaEngineV1>());
}

#[test]
fn sink_and_buf_layout_are_stable() {
    assert_eq!(offset_of!(HelexaTokenSink, userdata), 0);
    assert_eq!(offset_of!(HelexaTokenSink, on_token), PTR);
    assert_eq!(offset_of!(HelexaTokenSink, on_done), 2 * PTR);
    assert_eq!(size_of::<HelexaTokenSink>(), 3 * PTR);
    assert_eq!(offset_of!(HelexaBuf, ptr), 0);
    assert_eq!(offset_of!(HelexaBuf, len), PTR);
    assert_eq!(size_of::<HelexaBuf>(), 2 * PTR);
}

#[test]
fn nul_terminated_names_match() {
    assert_eq!(ENTRY_SYMBOL_NUL, format!("{ENTRY_SYMBOL}\0").as_bytes());
    assert_eq!(
        ENGINE_V1_INTERFACE_NUL,
        format!("{ENGINE_V1_INTERFACE}\0").as_bytes()
    );
}

#[test]
fn version_rule_same_major_and_engine_minor_at_least_nodes() {
    assert!(check_abi_version_against(1, 0, 1, 0).is_ok());
    assert!(check_abi_version_against(1, 3, 1, 2).is_ok());
    assert!(check_abi_version_against(1, 2, 1, 2).is_ok());
    let older_minor = check_abi_version_against(1, 1, 1, 2).unwrap_err();
    assert_eq!(
        older_minor,
        VersionMismatch {
            engine_major: 1,
            engine_minor: 1,
            node_major: 1,
            node_minor: 2
        }
    );
    assert!(check_abi_version_against(2, 0, 1, 0).is_err());
    assert!(check_abi_version_against(0, 9, 1, 0).is_err());
    let message = check_abi_version(ABI_MAJOR + 1, 0).unwrap_err().to_string();
    assert!(
        message.contains(&format!("engine ABI version {}.0", ABI_MAJOR + 1)),
        "{message}"
    );
    assert!(
        message.contains(&format!("node's ABI version {ABI_MAJOR}.{ABI_MINOR}")),
        "{message}"
    );
}

#[test]
fn error_kind_raw_values_round_trip() {
    for (kind, raw) in ErrorKind::ALL.into_iter().zip(1u32..) {
        assert_eq!(kind.to_raw(), HelexaErrorKind(raw));
        assert_eq!(ErrorKind::from_raw(HelexaErrorKind(raw)), kind);
    }
    assert_eq!(
        HelexaErrorKind::DEVICE_FAULT,
        ErrorKind::DeviceFault.to_raw()
    );
    // Unknown kinds from a newer engine (and the invalid 0) degrade to Internal.
    assert_eq!(ErrorKind::from_raw(HelexaErrorKind(0)), ErrorKind::Internal);
    assert_eq!(
        ErrorKind::from_raw(HelexaErrorKind(99)),
        ErrorKind::Internal
    );
    assert_eq!(ErrorKind::DeviceFault.to_string(), "device_fault");
}

#[test]
fn flow_raw_values() {
    assert_eq!(Flow::Continue.to_raw(), HelexaFlow::CONTINUE);
    assert_eq!(Flow::Cancel.to_raw(), HelexaFlow::CANCEL);
    assert_eq!(Flow::from_raw(HelexaFlow(0)), Flow::Continue);
    assert_eq!(Flow::from_raw(HelexaFlow(1)), Flow::Cancel);
    // Anything but CONTINUE is read as cancel: stopping is the safe reading of garbage.
    assert_eq!(Flow::from_raw(HelexaFlow(7)), Flow::Cancel);
}

fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, value, "{text}");
}

fn device() -> DeviceInfo {
    DeviceInfo {
        index: 0,
        name: "NVIDIA H200".into(),
        vram_total_mb: 143_771,
        vram_free_mb: 140_000,
        compute_capability: Some("9.0".into()),
    }
}

#[test]
fn json_types_round_trip() {
    round_trip(&InitOptions {
        devices: Some(vec![0, 1]),
    });
    round_trip(&EngineInfo {
        backend: "cuda".into(),
        name: "helexa-engine-cuda".into(),
        version: "0.1.0".into(),
        devices: vec![device()],
    });
    round_trip(&LoadSpec {
        id: "Qwen/Qwen3-0.6B".into(),
        architecture: "Qwen3ForCausalLM".into(),
        files: ModelFiles {
            config: Some("/m/config.json".into()),
            safetensors: vec!["/m/a.safetensors".into(), "/m/b.safetensors".into()],
            gguf: None,
        },
        dtype: Some("bf16".into()),
        devices: Some(vec![0]),
        context_length: Some(8192),
        prefill_chunk: Some(512),
    });
    round_trip(&LoadedModel {
        handle: 7,
        vram_mb: 1500,
        devices: vec![0],
        context_length: 8192,
        dtype: "bf16".into(),
        quant: "none".into(),
        vocab_size: 151_936,
    });
    round_trip(&MemoryReport {
        devices: vec![device()],
        models: vec![ModelMemory {
            handle: 7,
            vram_mb: 1500,
        }],
    });
    round_trip(&GenerateParams {
        max_tokens: 64,
        stop_ids: vec![2, 151_645],
        sampling: Sampling {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.8,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            seed: Some(42),
        },
    });
    for finish in [Finish::Stop, Finish::Length, Finish::Cancelled] {
        round_trip(&GenerateSummary {
            prompt_tokens: 43,
            reused_prompt_tokens: 40,
            generated_tokens: 3,
            finish,
            stop_id: (finish == Finish::Stop).then_some(2),
            decode_timing: (finish == Finish::Length).then_some(DecodeTiming {
                steps: 2,
                queued_us: 4_500,
                total_us: 5_100,
            }),
        });
    }
}

#[test]
fn json_wire_format_is_pinned() {
    // The field names and enum spellings are the ABI: other backends produce them by hand.
    let summary = GenerateSummary {
        prompt_tokens: 5,
        reused_prompt_tokens: 0,
        generated_tokens: 3,
        finish: Finish::Cancelled,
        stop_id: None,
        decode_timing: None,
    };
    assert_eq!(
        serde_json::to_value(&summary).unwrap(),
        json!({"prompt_tokens": 5, "reused_prompt_tokens": 0, "generated_tokens": 3,
               "finish": "cancelled", "stop_id": null})
    );
    let timed = GenerateSummary {
        decode_timing: Some(DecodeTiming {
            steps: 2,
            queued_us: 10,
            total_us: 30,
        }),
        ..summary
    };
    assert_eq!(
        serde_json::to_value(&timed).unwrap()["decode_timing"],
        json!({"steps": 2, "queued_us": 10, "total_us": 30})
    );
    let device = serde_json::to_value(device()).unwrap();
    assert_eq!(
        device,
        json!({"index": 0, "name": "NVIDIA H200", "vram_total_mb": 143771,
               "vram_free_mb": 140000, "compute_capability": "9.0"})
    );
}

#[test]
fn json_defaults_and_unknown_fields() {
    // Missing sampling = greedy with every step disabled; unknown fields are ignored (a newer
    // node may send fields an older engine of the same major does not know).
    let params: GenerateParams =
        serde_json::from_value(json!({"max_tokens": 8, "future_field": true})).unwrap();
    assert_eq!(params.max_tokens, 8);
    assert!(params.stop_ids.is_empty());
    assert_eq!(params.sampling, Sampling::default());
    assert_eq!(params.sampling.temperature, 0.0);
    assert_eq!(params.sampling.top_p, 1.0);
    assert_eq!(params.sampling.repetition_penalty, 1.0);

    let partial: Sampling = serde_json::from_value(json!({"temperature": 0.6})).unwrap();
    assert_eq!(partial.temperature, 0.6);
    assert_eq!(partial.top_k, 0);

    let init: InitOptions = serde_json::from_value(json!({})).unwrap();
    assert_eq!(init, InitOptions::default());

    let spec: LoadSpec = serde_json::from_value(json!({
        "id": "tiny", "architecture": "Qwen3ForCausalLM", "files": {"gguf": "/m/model.gguf"}
    }))
    .unwrap();
    assert_eq!(spec.files.gguf.as_deref(), Some("/m/model.gguf".as_ref()));
    assert!(spec.files.safetensors.is_empty());
    assert_eq!(spec.dtype, None);

    // Required fields stay required.
    assert!(serde_json::from_value::<GenerateParams>(json!({"stop_ids": []})).is_err());
    assert!(serde_json::from_value::<GenerateSummary>(json!({"finish": "halted"})).is_err());
}
