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

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 20_000) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

fn close(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let scale = cpu.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= 1e-3 * scale,
            "{what}[{i}]: GPU {g}, CPU {c} (scale {scale})"
        );
    }
}

/// The kernels against the CPU engine's own functions and layouts, on the first device; on a
/// machine without one, the loader's answer must be that there is none.
#[test]
fn the_kernels_compute_what_the_cpu_engine_computes() {
    use lastmile_engine::cuda::{AttentionShape, Kernels};
    use lastmile_engine::kernels::{QKind, QMatrix, WeightBytes};
    use lastmile_engine::kv::KvCache;
    use lastmile_engine::model::{ops, RopeStyle};

    let k = match Kernels::load(0) {
        Ok(k) => k,
        Err(e) => {
            assert!(
                matches!(e, CudaError::NoDriver | CudaError::NoDevice),
                "{e}"
            );
            eprintln!("{e}: the kernels were only compiled");
            return;
        }
    };
    let s = k.stream().clone();
    let up = |v: &[f32]| s.clone_htod(v).expect("upload");
    let down = |v: &cudarc::driver::CudaSlice<f32>| s.clone_dtoh(v).expect("download");

    // RMSNorm, three rows of 576.
    let (x, w) = (values(3 * 576, 1), values(576, 2));
    let mut out = s.alloc_zeros::<f32>(3 * 576).expect("alloc");
    k.rmsnorm(&mut out, &up(&x), &up(&w), 3, 1e-5)
        .expect("rmsnorm");
    let mut want = vec![0.0; 3 * 576];
    for r in 0..3 {
        let at = r * 576..(r + 1) * 576;
        ops::rmsnorm(&mut want[at.clone()], &x[at], &w, 1e-5);
    }
    close(&down(&out), &want, "rmsnorm");

    // RoPE, both pairings: 2 tokens x 3 heads x 64.
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let (q, cos, sin) = (values(2 * 3 * 64, 3), values(2 * 32, 4), values(2 * 32, 5));
        let mut dq = up(&q);
        k.rope(&mut dq, &up(&cos), &up(&sin), (2, 3, 64), style)
            .expect("rope");
        let mut want = q.clone();
        for t in 0..2 {
            for h in 0..3 {
                let at = (t * 3 + h) * 64;
                let (c, sn) = (&cos[t * 32..(t + 1) * 32], &sin[t * 32..(t + 1) * 32]);
                ops::rope(&mut want[at..at + 64], c, sn, style);
            }
        }
        close(&down(&dq), &want, "rope");
    }

    // SwiGLU and the residual add over 1,000 values.
    let (g, u) = (values(1000, 6), values(1000, 7));
    let mut dg = up(&g);
    k.swiglu(&mut dg, &up(&u), 1000).expect("swiglu");
    let mut want = g.clone();
    ops::swiglu(&mut want, &u);
    close(&down(&dg), &want, "swiglu");
    let mut dx = up(&g);
    k.add(&mut dx, &up(&u), 1000).expect("add");
    let want: Vec<f32> = g.iter().zip(&u).map(|(a, b)| a + b).collect();
    close(&down(&dx), &want, "add");

    // GEMV over GGUF Q8_0 and Q4_1 rows (40 x 128, 2 tokens), against the CPU's dequantization.
    for (kind, block_bytes) in [(QKind::Q8_0, 34usize), (QKind::Q4_1, 20usize)] {
        let (rows, cols) = (40, 128);
        let mut bytes = Vec::new();
        let noise = values(rows * cols, 8);
        for (b, chunk) in noise.chunks(32).enumerate() {
            let mut block = vec![0u8; block_bytes];
            let d = half::f16::from_f32(0.01 + (b % 7) as f32 * 0.003).to_bits();
            block[..2].copy_from_slice(&d.to_le_bytes());
            if kind == QKind::Q4_1 {
                let m = half::f16::from_f32(-0.05).to_bits();
                block[2..4].copy_from_slice(&m.to_le_bytes());
            }
            let start = if kind == QKind::Q4_1 { 4 } else { 2 };
            for (j, v) in block[start..].iter_mut().enumerate() {
                *v = ((chunk[j % 32] + 1.0) * 127.0) as u8;
            }
            bytes.extend(block);
        }
        let x = values(2 * cols, 9);
        let m = QMatrix::new(
            kind,
            rows,
            cols,
            WeightBytes::Owned(std::sync::Arc::new(bytes.clone())),
        )
        .expect("matrix");
        let mut want = vec![0.0f32; 2 * rows];
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut row);
            for t in 0..2 {
                want[t * rows + r] = row.iter().zip(&x[t * cols..]).map(|(a, b)| a * b).sum();
            }
        }
        let mut y = s.alloc_zeros::<f32>(2 * rows).expect("alloc");
        let dw = s.clone_htod(&bytes).expect("upload");
        k.gemv(&mut y, &dw, &up(&x), (rows, cols, 2), kind == QKind::Q4_1)
            .expect("gemv");
        close(&down(&y), &want, &format!("gemv {kind:?}"));
    }

    // The paged cache and decode attention: 2 sequences (37 and 20 positions) over scattered
    // blocks of 16, 6 query heads on 2 KV heads of 64.
    let (heads, kv_heads, hd, bs) = (6usize, 2usize, 64usize, 16usize);
    let kv_dim = kv_heads * hd;
    let tables: [Vec<u32>; 2] = [vec![5, 2, 7], vec![0, 3]];
    let lens = [37usize, 20];
    let mut cpu = KvCache::new(1, 8, bs, kv_dim);
    let mut slots = Vec::new();
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for (si, table) in tables.iter().enumerate() {
        for p in 0..lens[si] {
            let (kk, vv) = (
                values(kv_dim, 100 + (si * 64 + p) as u32),
                values(kv_dim, 900 + (si * 64 + p) as u32),
            );
            let slot = cpu.slot(table, p);
            cpu.write(0, slot, &kk, &vv);
            slots.push(slot as u32);
            ks.extend(kk);
            vs.extend(vv);
        }
    }
    let mut kc = s.alloc_zeros::<u16>(8 * bs * kv_dim).expect("alloc");
    let mut vc = s.alloc_zeros::<u16>(8 * bs * kv_dim).expect("alloc");
    let dslots = s.clone_htod(&slots).expect("upload");
    k.kv_store(&mut kc, &mut vc, &up(&ks), &up(&vs), &dslots, kv_dim, bs)
        .expect("kv store");
    let (ck, cv) = cpu.layer(0);
    assert_eq!(
        s.clone_dtoh(&kc).expect("keys"),
        ck,
        "keys in the CPU cache's layout"
    );
    assert_eq!(
        s.clone_dtoh(&vc).expect("values"),
        cv,
        "values in the CPU cache's layout"
    );
    let q = values(2 * heads * hd, 11);
    let mut want = vec![0.0f32; 2 * heads * hd];
    let f = |b: u16| half::f16::from_bits(b).to_f32();
    for (si, table) in tables.iter().enumerate() {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let qh = &q[(si * heads + h) * hd..][..hd];
            let scores: Vec<f32> = (0..lens[si])
                .map(|p| {
                    let (b, j) = (table[p / bs] as usize, p % bs);
                    (0..hd)
                        .map(|d| qh[d] * f(ck[(b * kv_dim + kvh * hd + d) * bs + j]))
                        .sum::<f32>()
                        / (hd as f32).sqrt()
                })
                .collect();
            let top = scores.iter().fold(f32::MIN, |m, v| m.max(*v));
            let e: Vec<f32> = scores.iter().map(|v| (v - top).exp()).collect();
            let total: f32 = e.iter().sum();
            for d in 0..hd {
                want[(si * heads + h) * hd + d] = (0..lens[si])
                    .map(|p| e[p] / total * f(cv[cpu.slot(table, p) * kv_dim + kvh * hd + d]))
                    .sum();
            }
        }
    }
    let flat: Vec<u32> = tables.concat();
    let (dt, dat, dl) = (
        s.clone_htod(&flat).expect("upload"),
        s.clone_htod(&[0u32, tables[0].len() as u32])
            .expect("upload"),
        s.clone_htod(&lens.map(|l| l as u32)).expect("upload"),
    );
    let mut out = s.alloc_zeros::<f32>(2 * heads * hd).expect("alloc");
    let mut scores = s.alloc_zeros::<f32>(2 * heads * 37).expect("alloc");
    let shape = AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        block_size: bs,
    };
    k.attention_decode(
        &mut out,
        &up(&q),
        (&kc, &vc),
        (&dt, &dat, &dl),
        &mut scores,
        shape,
        37,
    )
    .expect("attention");
    close(&down(&out), &want, "attention");
}
