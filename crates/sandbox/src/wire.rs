//! The framing between the host and the agent inside a sandbox (over the agent's stdin and
//! stdout; over vsock for a microVM). One frame is `len: u32 BE | kind: u8 | id: u32 BE |
//! payload`, `len` counting kind, id and payload. Control messages carry JSON
//! ([`Request`], [`Reply`], [`Exit`]); output and file data carry raw bytes, so a 10 MB file
//! crosses without base64 or a JSON copy.
//!
//! Invariants: no frame is longer than [`MAX_FRAME`] (a reader refuses longer ones: the
//! agent runs next to hostile code, so the host treats what it says as hostile too); an empty
//! [`Kind::FileData`] or [`Kind::FileChunk`] payload ends that transfer.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The largest frame either side accepts (payload plus 5 header bytes).
pub const MAX_FRAME: usize = 16 << 20;
/// How much file or output data one frame carries at most.
pub const CHUNK: usize = 64 * 1024;

/// What a frame holds; the `id` field means a request id or a pid, as each kind says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host → agent: a JSON [`Request`]; `id` is the request id.
    Request = 1,
    /// Host → agent: bytes for a process's stdin; `id` is the pid.
    Stdin = 2,
    /// Host → agent: bytes of a file being written; `id` is the `WriteFile` request id.
    FileData = 3,
    /// Agent → host: the JSON [`Reply`] to request `id`.
    Reply = 10,
    /// Agent → host: stdout bytes of process `id`.
    Stdout = 11,
    /// Agent → host: stderr bytes of process `id`.
    Stderr = 12,
    /// Agent → host: process `id` ended; JSON [`Exit`].
    Exited = 13,
    /// Agent → host: bytes of a file being read for request `id`.
    FileChunk = 14,
    /// Agent → host: a change under the folder watched by request `id`; JSON [`WatchEvent`].
    WatchEvent = 15,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Stdin,
            3 => Self::FileData,
            10 => Self::Reply,
            11 => Self::Stdout,
            12 => Self::Stderr,
            13 => Self::Exited,
            14 => Self::FileChunk,
            15 => Self::WatchEvent,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it holds.
    pub kind: Kind,
    /// A request id or a pid (see [`Kind`]).
    pub id: u32,
    /// JSON or raw bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame whose payload is `value` as JSON.
    pub fn json(kind: Kind, id: u32, value: &impl Serialize) -> Self {
        // Serializing our own plain structs cannot fail.
        let payload = serde_json::to_vec(value).unwrap_or_default();
        Self { kind, id, payload }
    }

    /// The frame as bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.payload.len());
        out.extend_from_slice(&((self.payload.len() + 5) as u32).to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses the 9-byte header: (kind, id, payload length).
    pub fn parse_header(h: &[u8; 9]) -> io::Result<(Kind, u32, usize)> {
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if !(5..=MAX_FRAME).contains(&len) {
            return Err(invalid(format!("frame length {len} out of range")));
        }
        let kind = Kind::from_u8(h[4]).ok_or_else(|| invalid(format!("frame kind {}", h[4])))?;
        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        Ok((kind, id, len - 5))
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Self>> {
        let mut h = [0u8; 9];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let (kind, id, n) = Self::parse_header(&h)?;
        let mut payload = vec![0; n];
        r.read_exact(&mut payload)?;
        Ok(Some(Self { kind, id, payload }))
    }

    /// Writes the frame in one call.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())?;
        w.flush()
    }

    /// The payload parsed as JSON.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> io::Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| invalid(e.to_string()))
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// What the host asks the agent to do.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start a process; replies `{"pid": N}`, then `Stdout`/`Stderr` frames and `Exited`.
    Spawn {
        /// The program.
        cmd: String,
        /// Its arguments.
        args: Vec<String>,
        /// Environment variables on top of the sandbox's own.
        envs: BTreeMap<String, String>,
        /// Working directory (default: the home directory).
        cwd: Option<String>,
        /// Whether stdin stays open for `Stdin` frames (else it is `/dev/null`).
        stdin: bool,
        /// Run it on a terminal of this size (`[cols, rows]`): its output comes as `Stdout`
        /// frames, `Stdin` frames are typed into it.
        #[serde(default)]
        pty: Option<[u16; 2]>,
    },
    /// Resize the terminal of `pid`.
    Resize {
        /// The process.
        pid: u32,
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// Send `signal` to the process group of `pid`.
    Signal {
        /// The process.
        pid: u32,
        /// The signal number.
        signal: i32,
    },
    /// Close the stdin of `pid`.
    CloseStdin {
        /// The process.
        pid: u32,
    },
    /// Describe one path (replies an [`Entry`]).
    Stat {
        /// The path.
        path: String,
    },
    /// List a directory down to `depth` levels (replies `[Entry]`).
    ListDir {
        /// The directory.
        path: String,
        /// 1 = direct children only.
        depth: u32,
    },
    /// Create a directory and its parents (replies an [`Entry`]; `already_exists` if it was).
    MakeDir {
        /// The directory.
        path: String,
    },
    /// Rename `source` to `destination` (replies the new [`Entry`]).
    Move {
        /// From.
        source: String,
        /// To.
        destination: String,
    },
    /// Remove a file or a directory tree.
    Remove {
        /// The path.
        path: String,
    },
    /// Read a file: replies its [`Entry`], then `FileChunk` frames, then an empty one.
    ReadFile {
        /// The path.
        path: String,
    },
    /// Write a file from the `FileData` frames that follow (parents created); replies its
    /// [`Entry`] after the empty frame that ends them.
    WriteFile {
        /// The path.
        path: String,
    },
    /// Watch a folder: replies once the watch holds, then sends `WatchEvent` frames under this
    /// request's id until `Unwatch`.
    Watch {
        /// The folder.
        path: String,
        /// Its subfolders too (those created later included).
        recursive: bool,
    },
    /// Stop the watch made by request `watch`.
    Unwatch {
        /// The `Watch` request's id.
        watch: u32,
    },
}

/// A change seen by a watch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path relative to the watched folder.
    pub name: String,
    /// `create`, `write`, `remove`, `rename` or `chmod`.
    pub op: String,
}

/// Why a request failed, in words a client can act on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// `not_found`, `already_exists`, `invalid_argument`, `permission_denied`,
    /// `resource_exhausted` or `internal`: Connect's code names.
    pub code: String,
    /// What happened.
    pub message: String,
}

impl Failure {
    /// A failure from an I/O error on `path`.
    pub fn io(path: &str, e: &io::Error) -> Self {
        let code = match e.kind() {
            io::ErrorKind::NotFound => "not_found",
            io::ErrorKind::AlreadyExists => "already_exists",
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                "permission_denied"
            }
            io::ErrorKind::InvalidInput
            | io::ErrorKind::NotADirectory
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::DirectoryNotEmpty => "invalid_argument",
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => "resource_exhausted",
            _ => "internal",
        };
        Self {
            code: code.into(),
            message: format!("{path}: {e}"),
        }
    }
}

/// The agent's answer to one request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Done; what it returns.
    Ok(serde_json::Value),
    /// Failed.
    Err(Failure),
}

/// How a process ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or -1 when a signal ended it.
    pub exit_code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
}

impl Exit {
    /// Go-style status text, as E2B's daemon reports it (`exit status 1`, `signal: killed`).
    pub fn status(&self) -> String {
        match self.signal {
            Some(9) => "signal: killed".into(),
            Some(15) => "signal: terminated".into(),
            Some(s) => format!("signal: {s}"),
            None => format!("exit status {}", self.exit_code),
        }
    }
}

/// One file system entry as the agent sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// The last path component.
    pub name: String,
    /// `file`, `dir` or `symlink` (the link itself, not what it points to).
    pub kind: String,
    /// The absolute path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Mode bits (permissions and type).
    pub mode: u32,
    /// Owner's user name (or uid).
    pub owner: String,
    /// Group name (or gid).
    pub group: String,
    /// Modification time, seconds since the epoch.
    pub mtime_s: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_ns: u32,
    /// Where a symlink points.
    pub symlink_target: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_oversize() {
        let f = Frame::json(Kind::Request, 7, &Request::Stat { path: "/x".into() });
        let bytes = f.encode();
        let back = Frame::read_from(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(back, f);
        assert_eq!(
            back.parse::<Request>().unwrap(),
            Request::Stat { path: "/x".into() }
        );
        // A clean end of stream is None, a torn frame an error.
        assert!(Frame::read_from(&mut &[][..]).unwrap().is_none());
        assert!(Frame::read_from(&mut &bytes[..bytes.len() - 1]).is_err());
        // A header claiming 2 GiB is refused before anything is allocated.
        let mut huge = (u32::MAX / 2).to_be_bytes().to_vec();
        huge.extend_from_slice(&[11, 0, 0, 0, 1]);
        assert!(Frame::read_from(&mut &huge[..]).is_err());
        // Unknown kinds are refused.
        let mut odd = 5u32.to_be_bytes().to_vec();
        odd.extend_from_slice(&[99, 0, 0, 0, 1]);
        assert!(Frame::read_from(&mut &odd[..]).is_err());
    }

    #[test]
    fn exit_status_reads_like_envd() {
        let e = Exit {
            exit_code: 3,
            signal: None,
        };
        assert_eq!(e.status(), "exit status 3");
        let k = Exit {
            exit_code: -1,
            signal: Some(9),
        };
        assert_eq!(k.status(), "signal: killed");
    }
}
