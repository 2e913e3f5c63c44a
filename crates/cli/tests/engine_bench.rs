//! `lastmile engine-bench` on the default model: its JSON report, and `--kernels`, which caps
//! the kernels' instruction-set tier so that one machine can measure what a CPU without
//! AVX-512 would see.

mod common;

use std::process::Command;

use common::BIN;
use serde_json::Value;

/// `engine-bench ARGS --json` (a short run); its report.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(["engine-bench", "--threads", "1", "--prompt-tokens", "32"])
        .args(["--gen-tokens", "8", "--repeats", "1", "--json"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run engine-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a report");
    serde_json::from_str(last).expect("JSON report")
}

#[test]
fn kernels_can_be_capped_at_a_lower_tier() {
    let scalar = bench(&["--kernels", "scalar"]);
    assert_eq!(scalar["kernels"], "scalar", "{scalar}");
    assert!(scalar["decode_tok_s_median"].as_f64().expect("decode") > 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        let avx2 = bench(&["--kernels", "avx2"]);
        assert_eq!(avx2["kernels"], "avx2", "{avx2}");
        // AVX-VNNI where the CPU has it, else the plain AVX2 kernels under that cap.
        let vnni = bench(&["--kernels", "avx-vnni"]);
        let want = if std::arch::is_x86_feature_detected!("avxvnni") {
            "avx2+avx-vnni"
        } else {
            "avx2"
        };
        assert_eq!(vnni["kernels"], want, "{vnni}");
        let auto = bench(&[]);
        assert!(auto["decode_limit_tok_s"].as_f64().expect("limit") > 0.0);
        // One read-rate measurement per round, and the decode's share of its own round's limit.
        let rounds = auto["mem_read_gb_s_rounds"].as_array().expect("rounds");
        assert_eq!(
            rounds.len(),
            auto["decode_tok_s"].as_array().expect("tg").len()
        );
        let share = auto["decode_share_of_limit"].as_f64().expect("share");
        // Past the memory's limit only where the weights fit in the L3 cache (as on a CPU with
        // a few hundred MiB of it); a share in percent instead of a fraction fails either way.
        let weights = auto["weight_bytes_per_token"].as_f64().expect("bytes");
        let in_l3 = auto["l3_bytes"].as_f64().is_some_and(|l3| l3 >= weights);
        let most = if in_l3 { 10.0 } else { 2.0 };
        assert!(share > 0.0 && share < most, "{auto}");
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            assert_ne!(auto["kernels"], "avx2", "auto takes the best tier: {auto}");
        }
    }
}

#[test]
fn an_unknown_tier_is_a_usage_error_naming_the_choices() {
    let out = Command::new(BIN)
        .args(["engine-bench", "--kernels", "sse2"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("auto, avx512, avx-vnni, avx2, scalar"),
        "{stderr}"
    );
    // `bench --tier` chooses both sides of a comparison the same way.
    let out = Command::new(BIN)
        .args(["bench", "--compare", "llama-cpp", "--tier", "sse2"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("native, avx512, avx-vnni, avx2"),
        "{stderr}"
    );
}

#[test]
fn a_comparison_at_a_tier_without_its_anchor_build_says_how_to_build_it() {
    let home = std::env::temp_dir().join(format!("lastmile-tier-{}", std::process::id()));
    let models = home.join("models");
    std::fs::create_dir_all(&models).expect("home");
    // The default model, from the real cache, so that no download is needed.
    let model = lastmile_models::ensure_default_model().expect("model");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--compare",
            "llama-cpp",
            "--tier",
            "avx2",
            "--requests",
            "1",
        ])
        .arg("--gguf")
        .arg(&model)
        .env("LASTMILE_HOME", &home)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("anchor/build-avx2/bin/llama-server")
            && stderr.contains("LASTMILE_ANCHOR_TIER"),
        "{stderr}"
    );
}
