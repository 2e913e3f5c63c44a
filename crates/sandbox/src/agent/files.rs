//! The agent's file operations: paths resolved against the sandbox user's home, entries with
//! their owners and modes, folder listings (bounded by `MAX_LIST`), file reads streamed back in
//! chunks, uploads written as they arrive, and inotify folder watches. Everything runs as the
//! sandbox's code would, inside its namespaces: the agent touches nothing the code could not.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Outbox, Users};
use crate::wire::{Entry, Failure, Frame, Kind, WatchEvent, CHUNK};

/// Most entries one `ListDir` answers (the rest is refused, not truncated silently).
const MAX_LIST: usize = 50_000;

/// Creates folder `path` with its parents and returns its entry; `already_exists` if anything
/// is there.
pub(super) fn make_dir(path: &str, users: &Users) -> Result<serde_json::Value, Failure> {
    let p = resolve(path);
    if fs::symlink_metadata(&p).is_ok() {
        Err(Failure {
            code: "already_exists".into(),
            message: format!("{} already exists", p.display()),
        })
    } else {
        fs::create_dir_all(&p)
            .map_err(|e| Failure::io(path, &e))
            .and_then(|()| entry(&p, users))
            .map(|e| serde_json::to_value(e).unwrap_or_default())
    }
}

/// Renames `source` to `destination` (making its parent folders) and returns the moved entry.
pub(super) fn move_entry(
    source: &str,
    destination: &str,
    users: &Users,
) -> Result<serde_json::Value, Failure> {
    let (s, d) = (resolve(source), resolve(destination));
    if let Some(parent) = d.parent() {
        let _ = fs::create_dir_all(parent);
    }
    fs::rename(&s, &d)
        .map_err(|e| Failure::io(source, &e))
        .and_then(|()| entry(&d, users))
        .map(|e| serde_json::to_value(e).unwrap_or_default())
}

/// Removes `path`: a folder with everything in it, or a single file or link.
pub(super) fn remove_entry(path: &str) -> Result<serde_json::Value, Failure> {
    let p = resolve(path);
    let r = match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
        Ok(_) => fs::remove_file(&p),
        Err(e) => Err(e),
    };
    r.map(|()| serde_json::Value::Null)
        .map_err(|e| Failure::io(path, &e))
}

/// Opens file `path` for reading, with its resolved path; `invalid_argument` for a folder.
pub(super) fn open_file(path: &str) -> Result<(File, PathBuf), Failure> {
    let p = resolve(path);
    match File::open(&p).and_then(|f| f.metadata().map(|m| (f, m))) {
        Ok((_, m)) if m.is_dir() => Err(Failure {
            code: "invalid_argument".into(),
            message: format!("{path} is a directory"),
        }),
        Ok((f, _)) => Ok((f, p)),
        Err(e) => Err(Failure::io(path, &e)),
    }
}

pub(super) fn stream_file(mut f: File, id: u32, out: &Outbox) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.send(&Frame {
                kind: Kind::FileChunk,
                id,
                payload: buf[..n].to_vec(),
            }),
        }
    }
    out.send(&Frame {
        kind: Kind::FileChunk,
        id,
        payload: Vec::new(),
    });
}

/// A file being written from `FileData` frames; the first error sticks and is the reply.
pub(super) struct Upload {
    path: PathBuf,
    file: Result<File, Failure>,
}

impl Upload {
    pub(super) fn open(path: &str) -> Self {
        let p = resolve(path);
        let file = (|| {
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent)?;
            }
            File::create(&p)
        })()
        .map_err(|e| Failure::io(path, &e));
        Self { path: p, file }
    }

    pub(super) fn write(&mut self, data: &[u8]) {
        if let Ok(f) = &mut self.file {
            if let Err(e) = f.write_all(data) {
                self.file = Err(Failure::io(&self.path.to_string_lossy(), &e));
            }
        }
    }

    pub(super) fn finish(self, users: &Users) -> Result<serde_json::Value, Failure> {
        let f = self.file?;
        f.sync_data().ok();
        entry(&self.path, users).map(|e| serde_json::to_value(e).unwrap_or_default())
    }
}

pub(super) fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Relative paths are relative to the home directory, as in E2B.
pub(super) fn resolve(path: &str) -> PathBuf {
    if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home().join(path)
    }
}

pub(super) fn entry(p: &Path, users: &Users) -> Result<Entry, Failure> {
    let m = fs::symlink_metadata(p).map_err(|e| Failure::io(&p.to_string_lossy(), &e))?;
    let ft = m.file_type();
    let (kind, target) = if ft.is_symlink() {
        ("symlink", fs::read_link(p).ok())
    } else if ft.is_dir() {
        ("dir", None)
    } else {
        ("file", None)
    };
    Ok(Entry {
        name: p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind: kind.into(),
        path: p.to_string_lossy().into_owned(),
        size: m.len(),
        mode: m.permissions().mode(),
        owner: users.user(m.uid()),
        group: users.group(m.gid()),
        mtime_s: m.mtime(),
        mtime_ns: m.mtime_nsec().clamp(0, 999_999_999) as u32,
        symlink_target: target.map(|t| t.to_string_lossy().into_owned()),
    })
}

pub(super) fn list(dir: &Path, depth: u32, users: &Users) -> Result<Vec<Entry>, Failure> {
    let meta = fs::metadata(dir).map_err(|e| Failure::io(&dir.to_string_lossy(), &e))?;
    if !meta.is_dir() {
        return Err(Failure {
            code: "invalid_argument".into(),
            message: format!("{} is not a directory", dir.display()),
        });
    }
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 1)];
    while let Some((d, level)) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            let Ok(e) = entry(&p, users) else { continue };
            if e.kind == "dir" && level < depth {
                stack.push((p.clone(), level + 1));
            }
            out.push(e);
            if out.len() > MAX_LIST {
                return Err(Failure {
                    code: "resource_exhausted".into(),
                    message: format!("more than {MAX_LIST} entries; list with a smaller depth"),
                });
            }
        }
    }
    Ok(out)
}

/// A folder watch over inotify: one thread, polling its descriptor so that `Unwatch` (a flag)
/// ends it within 200 ms; new subfolders are added when watching recursively.
pub(super) struct Watch {
    fd: std::os::fd::OwnedFd,
    dirs: HashMap<i32, PathBuf>,
    root: PathBuf,
    recursive: bool,
    pub(super) stop: Arc<std::sync::atomic::AtomicBool>,
}

const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB;

impl Watch {
    pub(super) fn start(root: &Path, recursive: bool) -> io::Result<Self> {
        if !fs::metadata(root)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        // SAFETY: inotify_init1 has no preconditions; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nobody else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut w = Self {
            fd,
            dirs: HashMap::new(),
            root: root.to_path_buf(),
            recursive,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        w.add(root)?;
        Ok(w)
    }

    /// Watches `dir` (and, recursively, its subfolders).
    pub(super) fn add(&mut self, dir: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_path_buf());
        if self.recursive {
            for e in fs::read_dir(dir)?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = self.add(&e.path());
                }
            }
        }
        Ok(())
    }

    pub(super) fn emit(&self, path: &Path, op: &str, id: u32, out: &Outbox) {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let e = WatchEvent {
            name: rel.to_string_lossy().into_owned(),
            op: op.into(),
        };
        out.send(&Frame::json(Kind::WatchEvent, id, &e));
    }

    /// `create` events for everything under `dir` (a folder that was just made or moved in).
    pub(super) fn emit_tree(&self, dir: &Path, id: u32, out: &Outbox) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            self.emit(&p, "create", id, out);
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                self.emit_tree(&p, id, out);
            }
        }
    }

    pub(super) fn run(mut self, id: u32, out: &Outbox) {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 64 * 1024];
        while !self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: reading into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let mut at = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name_bytes = &buf[at + header..at + header + ev.len as usize];
                at += header + ev.len as usize;
                let name_end = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len());
                let name = String::from_utf8_lossy(&name_bytes[..name_end]).into_owned();
                let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                    continue;
                };
                let full = dir.join(&name);
                let new_dir = self.recursive
                    && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
                    && ev.mask & libc::IN_ISDIR != 0;
                if new_dir {
                    let _ = self.add(&full);
                }
                let op = if ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                    "create"
                } else if ev.mask & libc::IN_MODIFY != 0 {
                    "write"
                } else if ev.mask & libc::IN_DELETE != 0 {
                    "remove"
                } else if ev.mask & libc::IN_MOVED_FROM != 0 {
                    "rename"
                } else if ev.mask & libc::IN_ATTRIB != 0 {
                    "chmod"
                } else {
                    continue;
                };
                self.emit(&full, op, id, out);
                if new_dir {
                    // Whatever appeared in the new folder before its watch held.
                    self.emit_tree(&full, id, out);
                }
            }
        }
    }
}
