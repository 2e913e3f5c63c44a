//! Replays every committed fuzzing input (`fuzz/corpus/<target>/*`) through its target: what a
//! fuzzing run once found stays fixed, and the seeds (valid requests, real files) keep passing.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_input_passes_its_target() {
    for (name, target) in lastmile_fuzz::TARGETS {
        let files = corpus(name);
        assert!(!files.is_empty(), "{name}: an empty corpus replays nothing");
        let started = std::time::Instant::now();
        for f in &files {
            let data = std::fs::read(f).expect("a corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} panicked", f.display());
        }
        eprintln!(
            "{name}: {} inputs replayed in {:.1} s",
            files.len(),
            started.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn the_request_seeds_are_requests_the_worker_runs() {
    // Fuzzing starts from these: a seed the worker refuses would start it from a rejection.
    for (target, path) in [
        ("chat", "/v1/chat/completions"),
        ("completions", "/v1/completions"),
        ("messages", ""),
    ] {
        for f in corpus(target) {
            if !f
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            {
                continue;
            }
            let data = std::fs::read(&f).expect("a seed");
            let (path, body) = match path {
                "" if data[0] % 2 == 1 => ("/v1/messages/count_tokens", &data[1..]),
                "" => ("/v1/messages", &data[1..]),
                p => (p, &data[..]),
            };
            assert_eq!(
                lastmile_fuzz::prepare(path, body),
                Ok(()),
                "{}",
                f.display()
            );
        }
    }
}
