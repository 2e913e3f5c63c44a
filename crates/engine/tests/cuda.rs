//! The CUDA path on a machine without a GPU (`--features cuda`, with NVRTC on the library path:
//! `eval "$(scripts/cuda/toolchain.sh --env)"`): every kernel of ours compiles through NVRTC for
//! the lent GPUs' architecture (sm_90) and the PTX assembles with `ptxas`, so the GPU code cannot
//! rot between the sessions that have a GPU; and the device probe reports a missing driver as
//! "no CUDA device", an error, never a panic. On a machine with a GPU, the probe lists it and the
//! kernels compile for its own architecture.
#![cfg(feature = "cuda")]

use lastmile_engine::cuda::{compile_kernels, devices, CudaError, KERNELS};

#[test]
fn every_kernel_compiles_for_sm_90_and_assembles() {
    let ptx = compile_kernels("sm_90").unwrap_or_else(|e| panic!("{e}"));
    for k in KERNELS {
        assert!(ptx.contains(&format!(".entry {k}(")), "{k} in the PTX");
    }
    // ptxas, where the toolchain put it on the path (the CI's does): the PTX is valid for the
    // architecture, not only well-formed text.
    let dir = std::env::temp_dir().join(format!("lastmile-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (src, out) = (dir.join("kernels.ptx"), dir.join("kernels.cubin"));
    std::fs::write(&src, &ptx).expect("write");
    match std::process::Command::new("ptxas")
        .args(["-arch=sm_90", "-O3", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
    {
        Ok(o) => {
            assert!(
                o.status.success(),
                "ptxas: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(std::fs::metadata(&out).expect("cubin").len() > 1000);
        }
        Err(e) if std::env::var_os("LASTMILE_REQUIRE_PTXAS").is_some() => {
            panic!("ptxas: {e}")
        }
        Err(_) => eprintln!("ptxas not on the path: PTX checked by NVRTC only"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_probe_says_what_there_is_and_never_panics() {
    match devices() {
        Ok(list) => {
            assert!(!list.is_empty());
            for d in &list {
                assert!(d.memory_bytes > 0 && d.compute_capability.0 >= 5, "{d:?}");
                // Compiled for the device's own architecture too.
                let arch: &'static str = Box::leak(d.arch().into_boxed_str());
                compile_kernels(arch).unwrap_or_else(|e| panic!("{}: {e}", d.name));
            }
        }
        Err(e) => {
            assert!(
                matches!(e, CudaError::NoDriver | CudaError::NoDevice),
                "{e}"
            );
            assert!(e.to_string().starts_with("no CUDA device"), "{e}");
        }
    }
}
