//! With the `cuda` feature, compiles each of `KERNELS` to PTX for `src/fused/cuda.rs` (nvcc from
//! `NVCC`, `$CUDA_ROOT/bin` or `PATH`; architecture from `CUDA_COMPUTE_CAP`, as for candle's
//! kernels). Without it there is nothing to build: the CPU engine needs no toolkit.

use std::path::PathBuf;
use std::process::Command;

/// The kernel builds: (source `kernels/<file>.cu`, `<ptx>.ptx` in `OUT_DIR`, extra nvcc flags).
/// `quant_gemv_wide` is the staged GEMV with 16 warps per block (one prologue per 16 warps
/// rather than per 8; see `QG_WARPS` in the kernel).
const KERNELS: [(&str, &str, &[&str]); 5] = [
    ("fused", "fused", &[]),
    ("quant_gemv", "quant_gemv", &[]),
    (
        "quant_gemv",
        "quant_gemv_wide",
        &["-DQG_WARPS=16", "-DQG_MIN_BLOCKS=2"],
    ),
    ("flash_prefill", "flash_prefill", &[]),
    ("sample", "sample", &[]),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| {
        std::env::var("CUDA_ROOT").map_or_else(|_| "nvcc".into(), |r| format!("{r}/bin/nvcc"))
    });
    // PTX for this architecture JIT-compiles on it and on newer GPUs.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim_end_matches('a');
    for (file, name, flags) in KERNELS {
        let src = format!("kernels/{file}.cu");
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{cap}"),
            ])
            .args(flags)
            .arg(&src)
            .arg("-o")
            .arg(out_dir.join(format!("{name}.ptx")))
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc}: {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
