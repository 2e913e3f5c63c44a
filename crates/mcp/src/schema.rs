//! The tools' arguments and results: their JSON schemas (with descriptions a model reads) are
//! what `tools/list` shows.

use std::collections::BTreeMap;

use rmcp::schemars;
use serde::{Deserialize, Serialize};

/// `chat`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ChatArgs {
    /// A served model id (default: the first `list_models` gives).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation: `[{"role": "system"|"user"|"assistant", "content": "..."}]`.
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate (default 256).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (default the model's).
    #[serde(default)]
    pub temperature: Option<f32>,
}

/// One message of a conversation.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// A model's answer.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ChatAnswer {
    /// The model that answered.
    pub model: String,
    /// Its text.
    pub content: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Prompt tokens charged to the caller's key.
    pub prompt_tokens: u64,
    /// Generated tokens charged to the caller's key.
    pub completion_tokens: u64,
}

/// The served models.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ModelIds {
    /// Their ids, for `chat`.
    pub models: Vec<String>,
}

/// `sandbox_create`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CreateArgs {
    /// Template id or alias (default `base`; `code-interpreter` for Python with a persistent
    /// interpreter).
    #[serde(default)]
    pub template: Option<String>,
    /// Lifetime in seconds (default: the server's, 300 unless configured).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Labels to find it by.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A sandbox made.
#[derive(Serialize, schemars::JsonSchema)]
pub struct Created {
    /// Its id, for the other tools.
    pub sandbox_id: String,
    /// Its template.
    pub template: String,
    /// When it ends, seconds since the epoch (extend it with `sandbox_set_timeout`).
    pub end_at_unix_s: u64,
}

/// A sandbox by id.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SandboxArgs {
    /// The sandbox (from `sandbox_create`).
    pub sandbox_id: String,
}

/// `sandbox_set_timeout`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TimeoutArgs {
    /// The sandbox.
    pub sandbox_id: String,
    /// Seconds it lives from now.
    pub timeout_s: u64,
}

/// `run_command`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CommandArgs {
    /// The sandbox.
    pub sandbox_id: String,
    /// A bash command line (run with `bash -l -c`).
    pub command: String,
    /// Working directory (default `/home/user`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Seconds before it is killed (default 60; ignored in the background).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Start it and return its pid at once, leaving it running (a server, a long job); end it
    /// with `kill_process` or the sandbox.
    #[serde(default)]
    pub background: bool,
}

/// How a command ended (or, in the background, which process runs it).
#[derive(Serialize, schemars::JsonSchema)]
pub struct CommandResult {
    /// Its standard output (the first MiB).
    pub stdout: String,
    /// Its standard error (the first MiB).
    pub stderr: String,
    /// Its exit code (-1 when a signal ended it).
    pub exit_code: i32,
    /// Set when it was killed for running past its timeout.
    pub timed_out: bool,
    /// The process, for a command left running in the background (it has no output or exit
    /// code yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// `kill_process`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct KillArgs {
    /// The sandbox.
    pub sandbox_id: String,
    /// The process (from `run_command` with `background`).
    pub pid: u32,
}

/// `run_code`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CodeArgs {
    /// The sandbox; without one a new `code-interpreter` sandbox is made (its id is in the
    /// result: pass it on to keep its files).
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// The source, run as a script (`print` what you want back).
    pub code: String,
    /// `python` (default), `bash` or `javascript` (where the sandbox has Node.js).
    #[serde(default)]
    pub language: Option<String>,
    /// Seconds before it is killed (default 60).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// How code ran.
#[derive(Serialize, schemars::JsonSchema)]
pub struct CodeResult {
    /// The sandbox it ran in.
    pub sandbox_id: String,
    /// Standard output.
    pub stdout: String,
    /// Standard error (a traceback on an exception).
    pub stderr: String,
    /// The interpreter's exit code (0: no uncaught exception).
    pub exit_code: i32,
    /// Set when it was killed for running past its timeout.
    pub timed_out: bool,
}

/// A file by path.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct FileArgs {
    /// The sandbox.
    pub sandbox_id: String,
    /// Absolute path, or relative to `/home/user`.
    pub path: String,
}

/// A file's text.
#[derive(Serialize, schemars::JsonSchema)]
pub struct FileText {
    /// The path read.
    pub path: String,
    /// Its content (UTF-8; invalid bytes replaced).
    pub content: String,
}

/// `write_file`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct WriteArgs {
    /// The sandbox.
    pub sandbox_id: String,
    /// Absolute path, or relative to `/home/user` (parents are made).
    pub path: String,
    /// The text to write.
    pub content: String,
}

/// `list_files`'s arguments.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ListArgs {
    /// The sandbox.
    pub sandbox_id: String,
    /// The folder (default `/home/user`).
    #[serde(default)]
    pub path: Option<String>,
    /// Levels to descend (default 1: its entries only).
    #[serde(default)]
    pub depth: Option<u32>,
}

/// A file or folder.
#[derive(Serialize, schemars::JsonSchema)]
pub struct FileEntry {
    /// Absolute path.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
}

/// A listing.
#[derive(Serialize, schemars::JsonSchema)]
pub struct Listing {
    /// The entries, in path order.
    pub entries: Vec<FileEntry>,
}
