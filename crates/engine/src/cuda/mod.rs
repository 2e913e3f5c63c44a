//! The CUDA side of the engine (the `cuda` cargo feature, never a default): lastmile's own GPU
//! kernels, compiled at run time by NVRTC for the device found, and the probe that finds the
//! devices. Both load the CUDA libraries when first asked (no CUDA library is linked), so a
//! binary built with the feature starts on a machine without a GPU and says so.
//!
//! Parts: the kernels, their launchers ([`Kernels`]) and the probe (this module); the forward
//! pass over them ([`DeviceModel`], `model.rs`): weights uploaded once, the paged KV cache in
//! device memory in the CPU cache's block layout, batched decode and chunked prefill in one
//! launch sequence per step.

mod model;

pub use model::DeviceModel;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::result as driver;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DriverError, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::model::RopeStyle;

/// The kernels' source (CUDA C, no headers).
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");

/// Every kernel the source defines (`extern "C" __global__`), by name.
pub const KERNELS: [&str; 21] = [
    "quantize_q8",
    "rmsnorm_f32",
    "add_rmsnorm_f32",
    "rope_f32",
    "rope_store_f16",
    "swiglu_f32",
    "add_f32",
    "kv_store_f16",
    "attention_decode_f16",
    "gemv_q8_0",
    "gemv_q4_1",
    "gemv_q4_0",
    "gemv_qkv_q8_0",
    "gemv_qkv_q4_1",
    "gemv_qkv_q4_0",
    "gemv_swiglu_q8_0",
    "gemv_swiglu_q4_1",
    "gemv_swiglu_q4_0",
    "gemv_f32",
    "bias_add_f32",
    "gather_rows_f32",
];

/// A weight matrix's layout on the device: the GGUF block formats our kernels multiply as they
/// are, and f32 for every other format (dequantized at upload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFormat {
    /// ggml Q8_0 (34 bytes per 32 weights).
    Q8_0,
    /// ggml Q4_1 (20 bytes per 32 weights).
    Q4_1,
    /// ggml Q4_0 (18 bytes per 32 weights).
    Q4_0,
    /// 32-bit floats.
    F32,
}

/// Tokens each warp of a block-format product multiplies a decoded weight block with
/// (`TOKEN_TILE` in the kernels).
const TOKEN_TILE: usize = 8;

impl DeviceFormat {
    /// Tokens one grid row of its product covers.
    fn tokens_per_grid_row(self) -> usize {
        match self {
            Self::F32 => 1,
            _ => TOKEN_TILE,
        }
    }

    fn kernel(self) -> &'static str {
        match self {
            Self::Q8_0 => "gemv_q8_0",
            Self::Q4_1 => "gemv_q4_1",
            Self::Q4_0 => "gemv_q4_0",
            Self::F32 => "gemv_f32",
        }
    }

    /// The fused Q, K and V product kernel of this format, if it has one.
    pub fn qkv_kernel(self) -> Option<&'static str> {
        match self {
            Self::Q8_0 => Some("gemv_qkv_q8_0"),
            Self::Q4_1 => Some("gemv_qkv_q4_1"),
            Self::Q4_0 => Some("gemv_qkv_q4_0"),
            Self::F32 => None,
        }
    }

    /// The fused feed-forward kernel (two products and SwiGLU) of this format, if it has one.
    pub fn swiglu_kernel(self) -> Option<&'static str> {
        match self {
            Self::Q8_0 => Some("gemv_swiglu_q8_0"),
            Self::Q4_1 => Some("gemv_swiglu_q4_1"),
            Self::Q4_0 => Some("gemv_swiglu_q4_0"),
            Self::F32 => None,
        }
    }
}

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
    /// The model has a feature the CUDA path does not implement yet.
    Unsupported(String),
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
            Self::Unsupported(what) => write!(f, "not supported on CUDA yet: {what}"),
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

fn driver_error(e: DriverError) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// The CUDA devices of this machine.
pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
    // SAFETY: only tries to open the library (no symbol is called).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let e = driver_error;
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
    let ptx = compile(arch)?;
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

fn compile(arch: &'static str) -> Result<Ptx, CudaError> {
    // SAFETY: only tries to open the library (no symbol is called).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    let options = CompileOptions {
        arch: Some(arch),
        name: Some("lastmile_kernels.cu".into()),
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(KERNELS_SOURCE, options).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            CudaError::Compile(log.to_string_lossy().into_owned())
        }
        other => CudaError::Compile(format!("{other:?}")),
    })
}

/// A file of the kernels' PTX, compiled on another machine (`compile_kernels`), to load instead
/// of compiling them here: for a GPU machine without NVRTC. The driver assembles it for the
/// device (PTX for sm_90 runs on sm_90 and later).
pub const PTX_ENV: &str = "LASTMILE_CUDA_PTX";

/// The PTX with its ISA version line lowered to 7.8 (what `sm_90` needs at least).
fn lower_ptx_version(ptx: &str) -> String {
    ptx.lines()
        .map(|l| {
            if l.starts_with(".version ") {
                ".version 7.8"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;

/// The most blocks a grid's y dimension takes.
const MAX_GRID_Y: usize = 65_535;

fn blocks_for(n: usize, per_block: u32) -> u32 {
    n.div_ceil(per_block as usize) as u32
}

/// Launches what `b` was given.
fn run(mut b: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<(), CudaError> {
    // SAFETY: every launcher passes its kernel's parameters in order, with the types the kernel
    // declares, and sizes the grid to the buffers it was given.
    unsafe { b.launch(cfg) }.map_err(driver_error)?;
    Ok(())
}

/// Calls `launch(t0, n)` over consecutive windows of a product's `tokens`, each as many as one
/// launch takes at `per_y` tokens a grid row (the grid's y stops at 65,535).
fn token_windows(
    tokens: usize,
    per_y: usize,
    mut launch: impl FnMut(usize, usize) -> Result<(), CudaError>,
) -> Result<(), CudaError> {
    let mut t0 = 0;
    while t0 < tokens {
        let n = (tokens - t0).min(MAX_GRID_Y * per_y);
        launch(t0, n)?;
        t0 += n;
    }
    Ok(())
}

/// The grid of a product over `rows` weight rows (a warp each, 8 a block) and `n` tokens
/// (`per_y` a grid row).
fn product_grid(rows: usize, n: usize, per_y: usize) -> LaunchConfig {
    grid(blocks_for(rows, 8), n.div_ceil(per_y) as u32, 256)
}

fn grid(x: u32, y: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Activations quantized to 8 bits per block of 32, as the CPU engine's `Q8Acts`: the values,
/// each block's scale `d`, and `s = d * sum(q)`.
pub struct Q8Buf {
    q: CudaSlice<i8>,
    d: CudaSlice<f32>,
    s: CudaSlice<f32>,
}

impl Q8Buf {
    /// Room for `values` activations (a multiple of 32).
    pub fn new(stream: &Arc<CudaStream>, values: usize) -> Result<Self, CudaError> {
        let blocks = values.div_ceil(32).max(1);
        Ok(Self {
            q: stream
                .alloc_zeros::<i8>(blocks * 32)
                .map_err(driver_error)?,
            d: stream.alloc_zeros::<f32>(blocks).map_err(driver_error)?,
            s: stream.alloc_zeros::<f32>(blocks).map_err(driver_error)?,
        })
    }

    /// Its values, scales and scaled sums, copied to the host (for checks).
    #[allow(clippy::type_complexity)]
    pub fn download(
        &self,
        stream: &Arc<CudaStream>,
    ) -> Result<(Vec<i8>, Vec<f32>, Vec<f32>), CudaError> {
        let e = driver_error;
        Ok((
            stream.clone_dtoh(&self.q).map_err(e)?,
            stream.clone_dtoh(&self.d).map_err(e)?,
            stream.clone_dtoh(&self.s).map_err(e)?,
        ))
    }

    /// The rows `t0..t0 + n` of `cols` values (for the launches a long batch is split into).
    #[allow(clippy::type_complexity)]
    fn window(
        &self,
        t0: usize,
        n: usize,
        cols: usize,
    ) -> (CudaView<'_, i8>, CudaView<'_, f32>, CudaView<'_, f32>) {
        let (v, b) = (
            t0 * cols..(t0 + n) * cols,
            t0 * cols / 32..(t0 + n) * cols / 32,
        );
        // Widths that are not whole blocks have no block-format product (f32 only).
        let b = b.start.min(self.d.len())..b.end.min(self.d.len());
        let v = v.start.min(self.q.len())..v.end.min(self.q.len());
        (self.q.slice(v), self.d.slice(b.clone()), self.s.slice(b))
    }
}

/// The kernels loaded on one device, and launchers that take their arguments typed. Buffers are
/// the stream's; launches are queued on it (read results back with the stream's copies).
pub struct Kernels {
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    /// The device they run on.
    pub device: DeviceInfo,
}

/// A sequence's place in a decode attention launch.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// KV heads (query heads share them in groups).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

impl Kernels {
    /// Compiles the kernels for device `ordinal`'s architecture (or reads them from the file
    /// [`PTX_ENV`] names) and loads them there.
    pub fn load(ordinal: usize) -> Result<Self, CudaError> {
        let device = devices()?
            .into_iter()
            .find(|d| d.ordinal == ordinal)
            .ok_or(CudaError::NoDevice)?;
        let ptx = match std::env::var_os(PTX_ENV) {
            // Compiled elsewhere (a device check carries PTX instead of NVRTC's 30 MB).
            Some(path) => Ptx::from_src(std::fs::read_to_string(&path).map_err(|e| {
                CudaError::Compile(format!("{PTX_ENV}={}: {e}", path.to_string_lossy()))
            })?),
            None => compile(Box::leak(device.arch().into_boxed_str()))?,
        };
        let ctx = CudaContext::new(ordinal).map_err(driver_error)?;
        // SAFETY: called before any buffer of this context exists, and every buffer is used on
        // the one stream made below only (so no use needs an event to order it against another
        // stream's).
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default stream, which cannot be captured into a
        // graph (`DeviceModel` replays each step shape's launches as one graph).
        let stream = ctx.new_stream().map_err(driver_error)?;
        let module = match ctx.load_module(ptx.clone()) {
            Ok(m) => m,
            // NVRTC 13 writes PTX ISA 9.0, which a CUDA 12 driver refuses; the kernels use
            // nothing newer than ISA 7.8 (sm_90's minimum), so say that instead and retry.
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
                let older = lower_ptx_version(&ptx.to_src());
                ctx.load_module(Ptx::from_src(older))
                    .map_err(driver_error)?
            }
            Err(e) => return Err(driver_error(e)),
        };
        let functions = KERNELS
            .iter()
            .map(|&k| Ok((k, module.load_function(k).map_err(driver_error)?)))
            .collect::<Result<_, CudaError>>()?;
        Ok(Self {
            stream,
            functions,
            device,
        })
    }

    /// The stream the launches are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A launch of kernel `name`, to give its arguments to.
    fn kernel(&self, name: &str) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.functions[name])
    }

    /// RMSNorm of `rows` rows of `width`: `out = x / sqrt(mean(x^2) + eps) * w`.
    pub fn rmsnorm(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let width = w.len() as i32;
        let mut b = self.kernel("rmsnorm_f32");
        b.arg(out).arg(x).arg(w).arg(&width).arg(&eps);
        run(b, grid(rows as u32, 1, THREADS))
    }

    /// The residual add and the next RMSNorm over `rows` rows, in one launch: `x += y`, then
    /// `out = x / sqrt(mean(x^2) + eps) * w`, and `out` quantized into `xq` as
    /// [`Kernels::quantize`] does, if given (and the width is whole blocks of 32).
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm(
        &self,
        (x, y): (&mut CudaSlice<f32>, &CudaSlice<f32>),
        out: &mut CudaSlice<f32>,
        xq: Option<&mut Q8Buf>,
        w: &CudaSlice<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let width = w.len() as i32;
        // A null pointer for "no quantized copy".
        let null = 0u64;
        let mut b = self.kernel("add_rmsnorm_f32");
        b.arg(x).arg(y).arg(out).arg(w).arg(&width).arg(&eps);
        match xq.filter(|_| width % 32 == 0) {
            Some(q) => {
                b.arg(&mut q.q).arg(&mut q.d).arg(&mut q.s);
            }
            None => {
                b.arg(&null).arg(&null).arg(&null);
            }
        }
        run(b, grid(rows as u32, 1, THREADS))
    }

    /// Rotary embedding, in place, of `x` (`[tokens, heads * head_dim]`) by each token's
    /// `cos`/`sin` rows (`[tokens, head_dim / 2]`).
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        (tokens, heads, head_dim): (usize, usize, usize),
        style: RopeStyle,
    ) -> Result<(), CudaError> {
        let (h, d, neox) = (
            heads as i32,
            head_dim as i32,
            i32::from(style == RopeStyle::Neox),
        );
        let cfg = grid(tokens as u32, heads as u32, (head_dim / 2).max(1) as u32);
        let mut b = self.kernel("rope_f32");
        b.arg(x).arg(cos).arg(sin).arg(&h).arg(&d).arg(&neox);
        run(b, cfg)
    }

    /// Rotary embedding of `q` (`[tokens, heads * head_dim]`) and `k` (`[tokens, kv_heads *
    /// head_dim]`) in place, and `k` and `v` stored at each token's slot of one layer's cache
    /// (as [`Kernels::kv_store`]), in one launch: a token per entry of `slots`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_store(
        &self,
        (q, k, v): (&mut CudaSlice<f32>, &mut CudaSlice<f32>, &CudaSlice<f32>),
        (cos, sin): (&CudaSlice<f32>, &CudaSlice<f32>),
        (k_cache, v_cache): (&mut CudaSlice<u16>, &mut CudaSlice<u16>),
        slots: &CudaView<'_, u32>,
        shape: AttentionShape,
        style: RopeStyle,
    ) -> Result<(), CudaError> {
        let ints = [
            shape.heads as i32,
            shape.kv_heads as i32,
            shape.head_dim as i32,
            i32::from(style == RopeStyle::Neox),
            shape.block_size as i32,
        ];
        let cfg = grid(
            slots.len() as u32,
            (shape.heads + shape.kv_heads) as u32,
            (shape.head_dim / 2).max(1) as u32,
        );
        let mut b = self.kernel("rope_store_f16");
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(cos)
            .arg(sin)
            .arg(k_cache)
            .arg(v_cache)
            .arg(slots);
        for i in &ints {
            b.arg(i);
        }
        run(b, cfg)
    }

    /// `gate = silu(gate) * up` over the first `n` values.
    pub fn swiglu(
        &self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let mut b = self.kernel("swiglu_f32");
        b.arg(gate).arg(up).arg(&n);
        run(b, grid(blocks_for(n, THREADS), 1, THREADS))
    }

    /// `x += y` over the first `n` values.
    pub fn add(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let mut b = self.kernel("add_f32");
        b.arg(x).arg(y).arg(&n);
        run(b, grid(blocks_for(n, THREADS), 1, THREADS))
    }

    /// Stores each token's key and value (`[tokens, kv_dim]` f32) at its slot of one layer's
    /// cache (f16 bits, the CPU cache's layout): one token per entry of `slots`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store(
        &self,
        k_cache: &mut CudaSlice<u16>,
        v_cache: &mut CudaSlice<u16>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        slots: &CudaView<'_, u32>,
        kv_dim: usize,
        block_size: usize,
    ) -> Result<(), CudaError> {
        let (dim, bs) = (kv_dim as i32, block_size as i32);
        let cfg = grid(slots.len() as u32, 1, kv_dim.min(256) as u32);
        let mut b = self.kernel("kv_store_f16");
        b.arg(k_cache)
            .arg(v_cache)
            .arg(k)
            .arg(v)
            .arg(slots)
            .arg(&dim)
            .arg(&bs);
        run(b, cfg)
    }

    /// Decode attention: one query token per sequence (`q`, `[seqs, heads * head_dim]`, a
    /// sequence per entry of `lens`) over its `lens[s]` cached positions, through the block
    /// tables (`tables`, sequence `s`'s from `table_at[s]`), into `out`; `scores` is scratch of
    /// `seqs * heads * score_stride` floats, `score_stride` at least the longest `lens[s]`.
    /// With `out_q` (and a head size of whole blocks of 32), `out` is also quantized there as
    /// [`Kernels::quantize`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        out: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        (k_cache, v_cache): (&CudaSlice<u16>, &CudaSlice<u16>),
        (tables, table_at, lens): (&CudaSlice<u32>, &CudaSlice<u32>, &CudaView<'_, u32>),
        scores: &mut CudaSlice<f32>,
        shape: AttentionShape,
        score_stride: usize,
        out_q: Option<&mut Q8Buf>,
    ) -> Result<(), CudaError> {
        let seqs = lens.len();
        let ints = [
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            shape.block_size,
            score_stride,
        ]
        .map(|v| v as i32);
        let cfg = grid(seqs as u32, shape.heads as u32, 128);
        let mut b = self.kernel("attention_decode_f16");
        b.arg(out)
            .arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(tables)
            .arg(table_at)
            .arg(lens)
            .arg(scores);
        for v in &ints {
            b.arg(v);
        }
        let null = 0u64;
        match out_q.filter(|_| shape.head_dim.is_multiple_of(32)) {
            Some(q) => {
                b.arg(&mut q.q).arg(&mut q.d).arg(&mut q.s);
            }
            None => {
                b.arg(&null).arg(&null).arg(&null);
            }
        }
        run(b, cfg)
    }

    /// Quantizes the first `values` of `x` (a multiple of 32) to 8 bits per block of 32 into
    /// `out`, exactly as the CPU engine quantizes the activations of its products.
    pub fn quantize(
        &self,
        out: &mut Q8Buf,
        x: &CudaSlice<f32>,
        values: usize,
    ) -> Result<(), CudaError> {
        let blocks = values / 32;
        let nb = blocks as i32;
        let mut b = self.kernel("quantize_q8");
        b.arg(x)
            .arg(&mut out.q)
            .arg(&mut out.d)
            .arg(&mut out.s)
            .arg(&nb);
        run(b, grid(blocks_for(blocks, 8), 1, 256))
    }

    /// `y = W x` for `tokens` inputs (`x`: `[tokens, cols]`; `y`: `[tokens, rows]`), `W` in
    /// `format` (its bytes: the GGUF layout for the block formats, which read `x` as `xq`,
    /// quantized by [`Kernels::quantize`]; f32 reads `x`).
    pub fn matmul(
        &self,
        y: &mut CudaSlice<f32>,
        w: &CudaSlice<u8>,
        (x, xq): (&CudaSlice<f32>, &Q8Buf),
        (rows, cols, tokens): (usize, usize, usize),
        format: DeviceFormat,
    ) -> Result<(), CudaError> {
        let (r, c) = (rows as i32, cols as i32);
        // Tokens per grid row: a tile for the block formats, one for f32.
        let per_y = format.tokens_per_grid_row();
        token_windows(tokens, per_y, |t0, n| {
            let mut yv = y.slice_mut(t0 * rows..(t0 + n) * rows);
            let nt = n as i32;
            let mut b = self.kernel(format.kernel());
            b.arg(&mut yv).arg(w);
            let xv = x.slice(t0 * cols..(t0 + n) * cols);
            let q = xq.window(t0, n, cols);
            if format == DeviceFormat::F32 {
                b.arg(&xv);
            } else {
                b.arg(&q.0).arg(&q.1).arg(&q.2);
            }
            b.arg(&r).arg(&c).arg(&nt);
            run(b, product_grid(rows, n, per_y))
        })
    }

    /// The Q, K and V products in one launch: `q = Wq x` (`q_rows` rows), `k = Wk x`, `v = Wv
    /// x` (`kv_rows` each), all `cols` wide in `format`, which must have a fused kernel
    /// ([`DeviceFormat::qkv_kernel`]); `x` quantized by [`Kernels::quantize`].
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_qkv(
        &self,
        (q, k, v): (
            &mut CudaSlice<f32>,
            &mut CudaSlice<f32>,
            &mut CudaSlice<f32>,
        ),
        (wq, wk, wv): (&CudaSlice<u8>, &CudaSlice<u8>, &CudaSlice<u8>),
        xq: &Q8Buf,
        (q_rows, kv_rows, cols, tokens): (usize, usize, usize, usize),
        format: DeviceFormat,
    ) -> Result<(), CudaError> {
        let name = format.qkv_kernel().ok_or_else(|| {
            CudaError::Unsupported(format!("a fused Q/K/V product over {format:?}"))
        })?;
        let (qr, kr, c) = (q_rows as i32, kv_rows as i32, cols as i32);
        token_windows(tokens, TOKEN_TILE, |t0, n| {
            let mut qv = q.slice_mut(t0 * q_rows..(t0 + n) * q_rows);
            let mut kv = k.slice_mut(t0 * kv_rows..(t0 + n) * kv_rows);
            let mut vv = v.slice_mut(t0 * kv_rows..(t0 + n) * kv_rows);
            let x = xq.window(t0, n, cols);
            let nt = n as i32;
            let mut b = self.kernel(name);
            b.arg(&mut qv).arg(&mut kv).arg(&mut vv);
            b.arg(wq).arg(wk).arg(wv).arg(&x.0).arg(&x.1).arg(&x.2);
            b.arg(&qr).arg(&kr).arg(&c).arg(&nt);
            run(b, product_grid(q_rows + 2 * kv_rows, n, TOKEN_TILE))
        })
    }

    /// `out = silu(G x) * (U x)` for `tokens` inputs (`out`: `[tokens, rows]`), `G` and `U`
    /// both `rows` x `cols` in `format`, which must have a fused kernel
    /// ([`DeviceFormat::swiglu_kernel`]); `x` quantized by [`Kernels::quantize`].
    pub fn matmul_swiglu(
        &self,
        out: &mut CudaSlice<f32>,
        (gate, up): (&CudaSlice<u8>, &CudaSlice<u8>),
        xq: &Q8Buf,
        (rows, cols, tokens): (usize, usize, usize),
        format: DeviceFormat,
    ) -> Result<(), CudaError> {
        let name = format.swiglu_kernel().ok_or_else(|| {
            CudaError::Unsupported(format!("a fused feed-forward product over {format:?}"))
        })?;
        let (r, c) = (rows as i32, cols as i32);
        token_windows(tokens, TOKEN_TILE, |t0, n| {
            let mut ov = out.slice_mut(t0 * rows..(t0 + n) * rows);
            let x = xq.window(t0, n, cols);
            let nt = n as i32;
            let mut b = self.kernel(name);
            b.arg(&mut ov)
                .arg(gate)
                .arg(up)
                .arg(&x.0)
                .arg(&x.1)
                .arg(&x.2);
            b.arg(&r).arg(&c).arg(&nt);
            run(b, product_grid(rows, n, TOKEN_TILE))
        })
    }

    /// `x[t] += bias` for the first `rows` rows of `x` (`bias.len()` wide).
    pub fn bias_add(
        &self,
        x: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), CudaError> {
        let width = bias.len() as i32;
        let mut b = self.kernel("bias_add_f32");
        b.arg(x).arg(bias).arg(&width);
        run(b, grid(rows as u32, 1, THREADS))
    }

    /// `out[j] = x[rows[j]]`, rows of `width`.
    pub fn gather_rows(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rows: &CudaView<'_, u32>,
        width: usize,
    ) -> Result<(), CudaError> {
        let w = width as i32;
        let mut b = self.kernel("gather_rows_f32");
        b.arg(out).arg(x).arg(rows).arg(&w);
        run(b, grid(rows.len() as u32, 1, THREADS))
    }
}
