//! The synthesizer's outputs, read back with candle's own readers (the ones the engine uses): the
//! bf16 checkpoint holds the generator's values exactly, the GGUF files dequantize close to them,
//! tensor types follow llama.cpp's Q4_K_M rule, and the output depends only on (shape, seed).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device};
use helexa_model_synth::format::use_more_bits;
use helexa_model_synth::values::tensor_values;
use helexa_model_synth::{Format, Shape, synthesize, synthesize_with};

const SEED: u64 = 7;

fn tiny() -> Shape {
    Shape::preset("tiny").unwrap()
}

/// Root-mean-square of `a - b` divided by the RMS of `b`.
fn relative_rms_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut err, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        err += f64::from(x - y).powi(2);
        norm += f64::from(*y).powi(2);
    }
    (err / norm).sqrt()
}

fn read_gguf(path: &Path) -> (gguf_file::Content, BufReader<File>) {
    let mut reader = BufReader::new(File::open(path).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    (content, reader)
}

#[test]
fn bf16_checkpoint_holds_the_generator_values_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let shape = tiny();
    let out = synthesize(&shape, SEED, Format::Bf16, dir.path()).unwrap();
    assert_eq!(out.files, [Path::new("model.safetensors")]);
    let tensors =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let specs = shape.tensors();
    assert_eq!(tensors.len(), specs.len());
    for t in &specs {
        let got = &tensors[&t.hf_name];
        assert_eq!(got.dtype(), DType::BF16, "{}", t.hf_name);
        assert_eq!(got.dims(), t.dims.as_slice(), "{}", t.hf_name);
        let got: Vec<f32> = got
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, tensor_values(SEED, t), "{}", t.hf_name);
    }
    // Normal(0, 0.02): the sample statistics of the largest matrix say the generator is right.
    let embed = tensor_values(SEED, &specs[0]);
    let n = embed.len() as f64;
    let mean = embed.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let std = (embed
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(mean.abs() < 1e-4, "mean {mean}");
    assert!((std - 0.02).abs() < 2e-4, "std {std}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["tie_word_embeddings"], false);
}

#[test]
fn gguf_files_dequantize_close_to_the_bf16_values_with_llama_cpp_types() {
    let shape = tiny();
    let specs = shape.tensors();
    // Bounds on the relative RMS error per block type, for normal(0, 0.02) weights. Measured on
    // this model: Q8_0 ≤ 0.0055, Q6_K ≤ 0.019, Q4_K ≤ 0.076 (each about 2^-bits × the block's
    // max/RMS ratio); the bounds leave ~40 % margin. Norms (f32) are exact.
    let bound = |d: GgmlDType| match d {
        GgmlDType::F32 => 0.0,
        GgmlDType::Q8_0 => 0.008,
        GgmlDType::Q6K => 0.027,
        GgmlDType::Q4K => 0.105,
        other => panic!("unexpected type {other:?}"),
    };
    for (format, file_type) in [(Format::Q8_0, 7), (Format::Q4KM, 15)] {
        let dir = tempfile::tempdir().unwrap();
        let out = synthesize(&shape, SEED, format, dir.path()).unwrap();
        let path = dir.path().join(&out.files[0]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), out.bytes);
        let (content, mut reader) = read_gguf(&path);
        let meta = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("{k}"));
        assert_eq!(meta("general.architecture").to_string().unwrap(), "qwen3");
        assert_eq!(meta("general.file_type").to_u32().unwrap(), file_type);
        assert_eq!(meta("qwen3.block_count").to_u32().unwrap(), 4);
        assert_eq!(meta("qwen3.embedding_length").to_u32().unwrap(), 256);
        assert_eq!(meta("qwen3.feed_forward_length").to_u32().unwrap(), 512);
        assert_eq!(meta("qwen3.attention.head_count").to_u32().unwrap(), 4);
        assert_eq!(meta("qwen3.attention.head_count_kv").to_u32().unwrap(), 2);
        assert_eq!(meta("qwen3.attention.key_length").to_u32().unwrap(), 64);
        assert_eq!(meta("qwen3.rope.freq_base").to_f32().unwrap(), 1e6);
        assert_eq!(content.tensor_infos.len(), specs.len());

        let mut types = HashMap::new();
        for t in &specs {
            let info = &content.tensor_infos[&t.gguf_name];
            assert_eq!(info.shape.dims(), t.dims.as_slice(), "{}", t.gguf_name);
            types.insert(t.gguf_name.clone(), info.ggml_dtype);
            let q = content
                .tensor(&mut reader, &t.gguf_name, &Device::Cpu)
                .unwrap();
            let got: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = relative_rms_error(&got, &tensor_values(SEED, t));
            assert!(
                err <= bound(info.ggml_dtype),
                "{format} {} ({:?}): relative RMS error {err}",
                t.gguf_name,
                info.ggml_dtype
            );
        }

        // The type of every tensor.
        for t in &specs {
            let expected = if t.dims.len() == 1 {
                GgmlDType::F32
            } else if format == Format::Q8_0 {
                GgmlDType::Q8_0
            } else if t.gguf_name == "output.weight" {
                GgmlDType::Q6K
            } else {
                let more = t.layer.is_some_and(|l| use_more_bits(l, 4))
                    && (t.gguf_name.ends_with("attn_v.weight")
                        || t.gguf_name.ends_with("ffn_down.weight"));
                if more { GgmlDType::Q6K } else { GgmlDType::Q4K }
            };
            assert_eq!(types[&t.gguf_name], expected, "{format} {}", t.gguf_name);
        }
        if format == Format::Q4KM {
            // Spelled out for the 4-layer model, as llama.cpp quantized the tiny fixture.
            for (name, d) in [
                ("token_embd.weight", GgmlDType::Q4K),
                ("blk.1.attn_v.weight", GgmlDType::Q4K),
                ("blk.2.attn_v.weight", GgmlDType::Q6K),
                ("blk.3.ffn_down.weight", GgmlDType::Q6K),
                ("blk.0.ffn_down.weight", GgmlDType::Q4K),
                ("blk.3.attn_q.weight", GgmlDType::Q4K),
            ] {
                assert_eq!(types[name], d, "{name}");
            }
        }
    }
}

#[test]
fn output_depends_on_seed_and_shape_only_and_is_reused() {
    let shape = tiny().with_layers(1).unwrap();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let one = synthesize_with(&shape, SEED, Format::Q4KM, a.path(), 1).unwrap();
    let many = synthesize_with(&shape, SEED, Format::Q4KM, b.path(), 3).unwrap();
    assert!(!one.reused && !many.reused);
    let read = |d: &Path| std::fs::read(d.join(&one.files[0])).unwrap();
    assert!(
        read(a.path()) == read(b.path()),
        "bytes differ by thread count"
    );

    let again = synthesize(&shape, SEED, Format::Q4KM, a.path()).unwrap();
    assert!(again.reused);
    // A different seed is a different model: the manifest does not match, so it is rewritten.
    let other = synthesize(&shape, SEED + 1, Format::Q4KM, a.path()).unwrap();
    assert!(!other.reused);
    assert!(read(a.path()) != read(b.path()));
}

#[test]
fn bad_requests_are_errors() {
    assert!(Shape::preset("qwen9").is_err());
    assert!(tiny().with_layers(0).is_err());
    assert!("q5_k".parse::<Format>().is_err());
    // Q4_K needs rows of whole 256-element blocks.
    let mut shape = tiny();
    shape.hidden_size = 320;
    let dir = tempfile::tempdir().unwrap();
    let err = synthesize(&shape, SEED, Format::Q4KM, dir.path()).unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
}
