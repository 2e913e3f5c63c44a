//! Throughput of the AVX2 instructions the packed integer kernels are made of, alone and in the
//! mixes the kernels issue, in core cycles (calibrated by a chain of dependent scalar adds, one
//! a cycle). It tells which execution ports a product waits on: on a CPU where `vpsignb`,
//! `vpmaddubsw` and `vpmaddwd` share two ports, Q8_0's 32 multiply-adds per token and k-row (a
//! sign, a `vpmaddubsw`, a `vpmaddwd` and an add) cannot take fewer than 1.5 cycles, and the sign
//! done by `vpxor` + `vpsubb` instead (off those two ports) costs more in all. A tool for
//! kernel work, not a benchmark of record.
//!
//!     cargo run --release -p lastmile-engine --example simd_ports

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::time::Instant;

    const ITERS: u64 = 50_000_000;

    /// Runs `$body` (asm text using ymm0..ymm11 as twelve independent chains, ymm15 as a
    /// constant operand and `{m}` as a pointer to readable memory) `ITERS` times; seconds.
    macro_rules! timed {
        ($body:expr) => {{
            #[repr(align(64))]
            struct Lines([u32; 128]);
            let mem = Lines([0u32; 128]);
            let t0 = Instant::now();
            // SAFETY: the body reads at most 384 bytes from `mem` and writes only the vector
            // registers declared clobbered; the counter register is the loop's own.
            unsafe {
                asm!(
                    "vpxor ymm15, ymm15, ymm15 /* {m} */",
                    "2:",
                    $body,
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) ITERS => _,
                    m = in(reg) mem.0.as_ptr(),
                    out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                    out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                    out("ymm12") _, out("ymm13") _, out("ymm15") _,
                    options(nostack, readonly),
                );
            }
            t0.elapsed().as_secs_f64()
        }};
    }

    /// Twelve copies of an instruction, one per chain.
    macro_rules! twelve {
        ($op:literal) => {
            concat!(
                $op,
                " ymm0, ymm0, ymm15\n",
                $op,
                " ymm1, ymm1, ymm15\n",
                $op,
                " ymm2, ymm2, ymm15\n",
                $op,
                " ymm3, ymm3, ymm15\n",
                $op,
                " ymm4, ymm4, ymm15\n",
                $op,
                " ymm5, ymm5, ymm15\n",
                $op,
                " ymm6, ymm6, ymm15\n",
                $op,
                " ymm7, ymm7, ymm15\n",
                $op,
                " ymm8, ymm8, ymm15\n",
                $op,
                " ymm9, ymm9, ymm15\n",
                $op,
                " ymm10, ymm10, ymm15\n",
                $op,
                " ymm11, ymm11, ymm15\n"
            )
        };
    }

    /// Twelve broadcasts of a dword from memory.
    macro_rules! broadcasts {
        () => {
            concat!(
                "vpbroadcastd ymm0, dword ptr [{m}]\n",
                "vpbroadcastd ymm1, dword ptr [{m} + 4]\n",
                "vpbroadcastd ymm2, dword ptr [{m} + 8]\n",
                "vpbroadcastd ymm3, dword ptr [{m} + 12]\n",
                "vpbroadcastd ymm4, dword ptr [{m} + 16]\n",
                "vpbroadcastd ymm5, dword ptr [{m} + 20]\n",
                "vpbroadcastd ymm6, dword ptr [{m} + 24]\n",
                "vpbroadcastd ymm7, dword ptr [{m} + 28]\n",
                "vpbroadcastd ymm8, dword ptr [{m} + 32]\n",
                "vpbroadcastd ymm9, dword ptr [{m} + 36]\n",
                "vpbroadcastd ymm10, dword ptr [{m} + 40]\n",
                "vpbroadcastd ymm11, dword ptr [{m} + 44]\n",
            )
        };
    }

    /// Twelve whole-register loads from memory (what a pre-broadcast activation buffer takes).
    macro_rules! loads {
        () => {
            concat!(
                "vmovdqu ymm0, ymmword ptr [{m}]\n",
                "vmovdqu ymm1, ymmword ptr [{m} + 32]\n",
                "vmovdqu ymm2, ymmword ptr [{m} + 64]\n",
                "vmovdqu ymm3, ymmword ptr [{m} + 96]\n",
                "vmovdqu ymm4, ymmword ptr [{m} + 128]\n",
                "vmovdqu ymm5, ymmword ptr [{m} + 160]\n",
                "vmovdqu ymm6, ymmword ptr [{m} + 192]\n",
                "vmovdqu ymm7, ymmword ptr [{m} + 224]\n",
                "vmovdqu ymm8, ymmword ptr [{m} + 256]\n",
                "vmovdqu ymm9, ymmword ptr [{m} + 288]\n",
                "vmovdqu ymm10, ymmword ptr [{m} + 320]\n",
                "vmovdqu ymm11, ymmword ptr [{m} + 352]\n",
            )
        };
    }

    /// Two sign-extending loads of 16 weight bytes into i16 (an i16 Q8_0 k-pair of two row
    /// groups) and six broadcasts of a token's i16 activation pair: what a 16-row x 6-token i16
    /// tile loads a k-pair.
    macro_rules! i16_tile_loads {
        () => {
            concat!(
                "vpmovsxbw ymm12, xmmword ptr [{m}]\n",
                "vpmovsxbw ymm13, xmmword ptr [{m} + 16]\n",
                "vpbroadcastd ymm0, dword ptr [{m} + 32]\n",
                "vpbroadcastd ymm1, dword ptr [{m} + 36]\n",
                "vpbroadcastd ymm2, dword ptr [{m} + 40]\n",
                "vpbroadcastd ymm3, dword ptr [{m} + 44]\n",
                "vpbroadcastd ymm4, dword ptr [{m} + 48]\n",
                "vpbroadcastd ymm5, dword ptr [{m} + 52]\n",
            )
        };
    }

    /// Core cycles a second: four dependent adds an iteration, one a cycle.
    fn clock() -> f64 {
        let n = 200_000_000u64;
        let t0 = Instant::now();
        // SAFETY: register arithmetic only.
        unsafe {
            asm!(
                "2:",
                "add {x}, 1",
                "add {x}, 1",
                "add {x}, 1",
                "add {x}, 1",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) 0u64 => _,
                n = inout(reg) n => _,
                options(nostack, nomem),
            );
        }
        (4 * n) as f64 / t0.elapsed().as_secs_f64()
    }

    pub fn main() {
        if !(is_x86_feature_detected!("avx2")) {
            eprintln!("this CPU has no AVX2");
            std::process::exit(1);
        }
        let hz = clock();
        println!("core clock ~{:.2} GHz", hz / 1e9);
        let report = |name: &str, secs: f64, per: f64| {
            let cycles = secs * hz / ITERS as f64;
            println!("{name:<44} {cycles:6.2} cycles / 12 chains ({per:.2} a cycle)");
        };
        let rows: [(&str, f64, f64); 19] = [
            ("vpaddd", timed!(twelve!("vpaddd")), 12.0),
            ("vpsignb", timed!(twelve!("vpsignb")), 12.0),
            ("vpmaddubsw", timed!(twelve!("vpmaddubsw")), 12.0),
            ("vpmaddwd", timed!(twelve!("vpmaddwd")), 12.0),
            ("vpbroadcastd from memory", timed!(broadcasts!()), 12.0),
            (
                "vpmaddubsw + vpmaddwd",
                timed!(concat!(twelve!("vpmaddubsw"), twelve!("vpmaddwd"))),
                24.0,
            ),
            (
                "Q8_0: vpsignb + vpmaddubsw + vpmaddwd + vpaddd",
                timed!(concat!(
                    twelve!("vpsignb"),
                    twelve!("vpmaddubsw"),
                    twelve!("vpmaddwd"),
                    twelve!("vpaddd")
                )),
                48.0,
            ),
            (
                "Q4: vpmaddubsw + vpaddw",
                timed!(concat!(twelve!("vpmaddubsw"), twelve!("vpaddw"))),
                24.0,
            ),
            ("vpxor", timed!(twelve!("vpxor")), 12.0),
            ("vpsubb", timed!(twelve!("vpsubb")), 12.0),
            (
                "Q8_0 by xor: vpxor + vpsubb + vpmaddubsw + vpmaddwd + vpaddd",
                timed!(concat!(
                    twelve!("vpxor"),
                    twelve!("vpsubb"),
                    twelve!("vpmaddubsw"),
                    twelve!("vpmaddwd"),
                    twelve!("vpaddd")
                )),
                60.0,
            ),
            (
                "vpxor + vpsubb + vpmaddubsw + vpmaddwd",
                timed!(concat!(
                    twelve!("vpxor"),
                    twelve!("vpsubb"),
                    twelve!("vpmaddubsw"),
                    twelve!("vpmaddwd")
                )),
                48.0,
            ),
            ("vmovdqu from memory", timed!(loads!()), 12.0),
            (
                "Q8_0 + its activations by vpbroadcastd",
                timed!(concat!(
                    broadcasts!(),
                    twelve!("vpsignb"),
                    twelve!("vpmaddubsw"),
                    twelve!("vpmaddwd"),
                    twelve!("vpaddd")
                )),
                60.0,
            ),
            (
                "Q8_0 + its activations by vmovdqu",
                timed!(concat!(
                    loads!(),
                    twelve!("vpsignb"),
                    twelve!("vpmaddubsw"),
                    twelve!("vpmaddwd"),
                    twelve!("vpaddd")
                )),
                60.0,
            ),
            (
                "vpmovsxbw from memory",
                timed!(concat!(
                    "vpmovsxbw ymm0, xmmword ptr [{m}]\n",
                    "vpmovsxbw ymm1, xmmword ptr [{m} + 16]\n",
                    "vpmovsxbw ymm2, xmmword ptr [{m} + 32]\n",
                    "vpmovsxbw ymm3, xmmword ptr [{m} + 48]\n",
                    "vpmovsxbw ymm4, xmmword ptr [{m} + 64]\n",
                    "vpmovsxbw ymm5, xmmword ptr [{m} + 80]\n",
                    "vpmovsxbw ymm6, xmmword ptr [{m} + 96]\n",
                    "vpmovsxbw ymm7, xmmword ptr [{m} + 112]\n",
                    "vpmovsxbw ymm8, xmmword ptr [{m} + 128]\n",
                    "vpmovsxbw ymm9, xmmword ptr [{m} + 144]\n",
                    "vpmovsxbw ymm10, xmmword ptr [{m} + 160]\n",
                    "vpmovsxbw ymm11, xmmword ptr [{m} + 176]\n",
                )),
                12.0,
            ),
            (
                "Q8_0 by i16: vpmaddwd + vpaddd (16 MACs)",
                timed!(concat!(twelve!("vpmaddwd"), twelve!("vpaddd"))),
                24.0,
            ),
            (
                "Q8_0 by i16 + tile loads (16 MACs)",
                timed!(concat!(
                    i16_tile_loads!(),
                    twelve!("vpmaddwd"),
                    twelve!("vpaddd")
                )),
                32.0,
            ),
            (
                "vpmaddubsw + vpand",
                timed!(concat!(twelve!("vpmaddubsw"), twelve!("vpand"))),
                24.0,
            ),
        ];
        for (name, secs, ops) in rows {
            let cycles = secs * hz / ITERS as f64;
            report(name, secs, ops / cycles);
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("simd_ports measures x86-64 instructions");
}
