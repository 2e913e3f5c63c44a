//! The CUDA side of the engine (the `cuda` cargo feature, never a default): lastmile's own GPU
//! kernels, compiled at run time by NVRTC for the device found, and the probe that finds the
//! devices. Both load the CUDA libraries when first asked (no CUDA library is linked), so a
//! binary built with the feature starts on a machine without a GPU and says so.
//!
//! Status: kernels and probe (this module). The forward pass over them — weights uploaded once,
//! the paged KV cache in device memory, batched decode and chunked prefill — is the next step.

use std::fmt;

use cudarc::driver::result as driver;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

/// The kernels' source (CUDA C, no headers).
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");

/// Every kernel the source defines (`extern "C" __global__`), by name.
pub const KERNELS: [&str; 8] = [
    "rmsnorm_f32",
    "rope_f32",
    "swiglu_f32",
    "add_f32",
    "kv_store_f16",
    "attention_decode_f16",
    "gemv_q8_0",
    "gemv_q4_1",
];

/// Why CUDA cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaError {
    /// The driver library (`libcuda.so`) is not installed: no GPU, or no driver for it.
    NoDriver,
    /// The driver is installed and found no device.
    NoDevice,
    /// NVRTC (`libnvrtc.so`) is not on the library path.
    NoNvrtc,
    /// A driver call failed.
    Driver(String),
    /// NVRTC refused the kernels (its log).
    Compile(String),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDriver => {
                f.write_str("no CUDA device: the CUDA driver library (libcuda.so) is not installed")
            }
            Self::NoDevice => f.write_str("no CUDA device: the driver found none"),
            Self::NoNvrtc => f.write_str(
                "NVRTC (libnvrtc.so) is not on the library path: install the CUDA 13 runtime \
                 compiler (scripts/cuda/toolchain.sh fetches it)",
            ),
            Self::Driver(e) => write!(f, "CUDA driver: {e}"),
            Self::Compile(log) => write!(f, "compiling lastmile's CUDA kernels: {log}"),
        }
    }
}

impl std::error::Error for CudaError {}

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its ordinal (`cuda:N`).
    pub ordinal: usize,
    /// Its name, as the driver gives it.
    pub name: String,
    /// Its memory, in bytes.
    pub memory_bytes: usize,
    /// Its compute capability (major, minor): (9, 0) for an H100 or H200.
    pub compute_capability: (i32, i32),
}

impl DeviceInfo {
    /// The NVRTC architecture of the device (`sm_90` for compute capability 9.0).
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// The CUDA devices of this machine.
pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
    // SAFETY: only tries to open the library (no symbol is called).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let e = |e: cudarc::driver::DriverError| CudaError::Driver(format!("{e:?}"));
    driver::init().map_err(e)?;
    let count = driver::device::get_count().map_err(e)?;
    if count <= 0 {
        return Err(CudaError::NoDevice);
    }
    (0..count)
        .map(|ordinal| {
            let dev = driver::device::get(ordinal).map_err(e)?;
            let attr = |a| {
                // SAFETY: `dev` came from `device::get`.
                unsafe { driver::device::get_attribute(dev, a) }.map_err(e)
            };
            Ok(DeviceInfo {
                ordinal: ordinal as usize,
                name: driver::device::get_name(dev).map_err(e)?,
                // SAFETY: `dev` came from `device::get`.
                memory_bytes: unsafe { driver::device::total_mem(dev) }.map_err(e)?,
                compute_capability: (
                    attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                    attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                ),
            })
        })
        .collect()
}

/// Compiles the kernels to PTX for `arch` (e.g. `sm_90`), checking every kernel is in it.
pub fn compile_kernels(arch: &'static str) -> Result<String, CudaError> {
    // SAFETY: only tries to open the library (no symbol is called).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    let options = CompileOptions {
        arch: Some(arch),
        name: Some("lastmile_kernels.cu".into()),
        ..CompileOptions::default()
    };
    let ptx = compile_ptx_with_opts(KERNELS_SOURCE, options).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            CudaError::Compile(log.to_string_lossy().into_owned())
        }
        other => CudaError::Compile(format!("{other:?}")),
    })?;
    let src = ptx.to_src();
    if let Some(missing) = KERNELS
        .iter()
        .find(|k| !src.contains(&format!(".entry {k}(")))
    {
        return Err(CudaError::Compile(format!(
            "kernel `{missing}` is not in the PTX"
        )));
    }
    Ok(src)
}
