//! With the `cuda` feature, compiles `kernels/fused.cu` to PTX for `src/fused/cuda.rs` (nvcc from
//! `NVCC`, `$CUDA_ROOT/bin` or `PATH`; architecture from `CUDA_COMPUTE_CAP`, as for candle's
//! kernels). Without it there is nothing to build: the CPU engine needs no toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/fused.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fused.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| {
        std::env::var("CUDA_ROOT").map_or_else(|_| "nvcc".into(), |r| format!("{r}/bin/nvcc"))
    });
    // PTX for this architecture JIT-compiles on it and on newer GPUs.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim_end_matches('a');
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
        ])
        .arg("kernels/fused.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc}: {e}"));
    assert!(status.success(), "{nvcc} failed on kernels/fused.cu");
}
