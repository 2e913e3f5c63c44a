//! The KV tier on disk: full blocks that eviction takes from memory are written to a bounded
//! store of files, and read back on a prefix hit instead of being recomputed. The store outlives
//! the process, so a replica scaled to zero and started again finds its prefixes.
//!
//! Layout under the configured directory:
//!
//! ```text
//! DIR/<layout>/slot-N/lock       held (flock) by the one process using the slot
//!                    /stopping   present while that process saves its cache on the way out
//!                    /secret     the slot's prefix-cache keys (32 bytes, mode 0600)
//!                    /<key>-<route>.kvb   one block: a KV transfer stream of one block
//! ```
//!
//! `<layout>` names the model (a fingerprint of its shape and weights), its KV shape and block
//! size, so blocks of another model are never read. A process takes the first slot no other
//! live process holds: replicas on one machine each get their own store, and a replica started
//! again (after scale-to-zero) gets the one its predecessor left — waiting for it, if the
//! predecessor is still saving its cache (a scale-up right after a scale-down). Block files are named by the
//! block's prefix-cache key, which is keyed by the slot's secret and chained over every token
//! before it: a file can only be found by the exact prompt prefix that made it, and a prompt
//! crafted to collide with another tenant's public routing hash finds nothing. Each file is a
//! KV transfer stream (`kv_transfer`): checksummed, layout-checked, and its tokens and routing
//! hash are checked against the prompt again when it is imported.
//!
//! The engine thread owns the index (which keys are on disk, their order of use, the bytes
//! used) and never touches a file: one I/O thread writes, reads and deletes, in the order the
//! engine asks, so a read always follows the write it depends on. Writes that find the I/O
//! thread behind are dropped (counted), never waited for; reads come back on a channel the
//! engine polls, while other sequences keep decoding.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{
    channel, sync_channel, Receiver, Sender, SyncSender, TryRecvError, TrySendError,
};

use lastmile_protocol::KvEvent;

use crate::error::{EngineError, Result};
use crate::kv::{random_keys, BlockName, NamerKeys};
use crate::kv_transfer::{encode_stream, KvBlock, KvLayout, KvStreamReader};

/// Where the tier lives and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvDiskConfig {
    /// The directory (shared by every process and model; each takes its own slot inside).
    pub dir: PathBuf,
    /// Most bytes of block files this process's slot keeps.
    pub capacity_bytes: u64,
}

/// Jobs the I/O thread has queued at most; a spill that finds the queue full is dropped.
const QUEUE: usize = 64;
/// Slots tried per layout before giving up.
const SLOTS: usize = 64;
/// How long a new process waits for a slot whose holder is saving its cache on the way out.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
const EXTENSION: &str = "kvb";

/// One block on disk, as the index knows it.
struct Entry {
    route: u64,
    tick: u64,
}

/// What the I/O thread is asked to do.
enum Job {
    Write {
        key: u128,
        block: KvBlock,
    },
    Remove {
        key: u128,
        route: u64,
    },
    Read {
        id: u64,
        names: Vec<(u128, u64)>,
    },
    Flush {
        reply: tokio::sync::oneshot::Sender<()>,
    },
}

/// What the I/O thread reports back.
enum Done {
    Read {
        id: u64,
        blocks: Vec<KvBlock>,
        bad: Vec<u128>,
    },
    WriteFailed {
        key: u128,
    },
}

/// Blocks read back for the load `id`, in prompt order (fewer than asked where a file could
/// not be read).
pub(crate) struct Loaded {
    pub(crate) id: u64,
    pub(crate) blocks: Vec<KvBlock>,
}

/// Counters of the tier, read by the engine's stats.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DiskCounts {
    pub(crate) written_bytes: u64,
    pub(crate) read_bytes: u64,
    pub(crate) dropped: u64,
    pub(crate) errors: u64,
}

/// The engine thread's side of the tier: the index, and the queue to the I/O thread.
pub(crate) struct DiskTier {
    slot: PathBuf,
    keys: NamerKeys,
    capacity: u64,
    file_bytes: u64,
    index: HashMap<u128, Entry>,
    lru: BTreeMap<u64, u128>,
    tick: u64,
    next_read: u64,
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    changes: Vec<KvEvent>,
    pub(crate) counts: DiskCounts,
    /// Held for the life of the tier: the flock on the slot.
    _lock: File,
}

impl DiskTier {
    /// Opens (or creates) this process's slot for blocks of `layout`, indexes the blocks a
    /// previous process left there (least recently written first, trimmed to the capacity),
    /// and starts the I/O thread.
    pub(crate) fn open(config: &KvDiskConfig, layout: KvLayout) -> Result<Self> {
        let io_err = |what: String| move |e| EngineError::io(what, e);
        let root = config.dir.join(layout_dir(&layout));
        std::fs::create_dir_all(&root).map_err(io_err(format!(
            "creating the KV disk directory {}",
            root.display()
        )))?;
        let (slot, lock) = take_slot(&root)?;
        let (keys, fresh) = slot_keys(&slot)?;
        let file_bytes = layout.stream_bytes(1) as u64;
        let mut found = scan(&slot, file_bytes, fresh)?;
        found.sort_by_key(|f| f.2);
        let (jobs, job_rx) = sync_channel(QUEUE);
        // Unbounded: the I/O thread never waits on the engine (which may be waiting on it, in a
        // persist); reads in flight are bounded by the job queue.
        let (done_tx, done) = channel();
        let io_slot = slot.clone();
        std::thread::Builder::new()
            .name("lastmile-kv-disk".into())
            .spawn(move || io_thread(io_slot, layout, job_rx, done_tx))
            .map_err(io_err("spawning the KV disk thread".into()))?;
        let mut tier = Self {
            slot,
            keys,
            capacity: config.capacity_bytes,
            file_bytes,
            index: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            next_read: 0,
            jobs,
            done,
            changes: Vec::new(),
            counts: DiskCounts::default(),
            _lock: lock,
        };
        for (key, route, _) in found {
            if tier.make_room() {
                tier.insert(key, route);
            } else {
                let _ = std::fs::remove_file(tier.slot.join(file_name(key, route)));
            }
        }
        Ok(tier)
    }

    /// The prefix-cache keys blocks in this store are named under.
    pub(crate) fn keys(&self) -> NamerKeys {
        self.keys
    }

    /// The slot directory in use.
    pub(crate) fn slot(&self) -> &Path {
        &self.slot
    }

    /// Blocks on disk.
    pub(crate) fn blocks(&self) -> usize {
        self.index.len()
    }

    /// Bytes of block files on disk.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.index.len() as u64 * self.file_bytes
    }

    /// Whether the block of prefix-cache key `key` is on disk.
    pub(crate) fn contains(&self, key: u128) -> bool {
        self.index.contains_key(&key)
    }

    /// How many of `names`, from the first, are on disk.
    pub(crate) fn run(&self, names: &[BlockName]) -> usize {
        names.iter().take_while(|n| self.contains(n.key)).count()
    }

    /// Marks `key` as just used (last to be evicted).
    pub(crate) fn touch(&mut self, key: u128) {
        if let Some(e) = self.index.get_mut(&key) {
            self.lru.remove(&e.tick);
            self.tick += 1;
            e.tick = self.tick;
            self.lru.insert(self.tick, key);
        }
    }

    /// Saves a block eviction took (or one the engine persists): `values` copies its keys and
    /// values out of the cache, and is called only if the block will be written. With `wait`,
    /// waits for room in the I/O thread's queue; without, a full queue drops the block. Returns
    /// whether a write was queued.
    pub(crate) fn spill(
        &mut self,
        name: BlockName,
        tokens: Vec<u32>,
        values: impl FnOnce() -> Vec<u16>,
        wait: bool,
    ) -> bool {
        if self.contains(name.key) {
            self.touch(name.key);
            return false;
        }
        if self.file_bytes > self.capacity {
            return false;
        }
        let job = Job::Write {
            key: name.key,
            block: KvBlock {
                route: name.route,
                tokens,
                values: values(),
            },
        };
        let sent = if wait {
            self.jobs.send(job).is_ok()
        } else {
            match self.jobs.try_send(job) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    self.counts.dropped += 1;
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        };
        let queued = sent && self.make_room();
        if queued {
            self.insert(name.key, name.route);
            self.counts.written_bytes += self.file_bytes;
        }
        queued
    }

    /// Asks for the blocks `names` (all on disk) to be read back; `None` if the I/O thread's
    /// queue is full (the caller computes them instead).
    pub(crate) fn read(&mut self, names: &[BlockName]) -> Option<u64> {
        self.next_read += 1;
        let id = self.next_read;
        let wanted = names.iter().map(|n| (n.key, n.route)).collect();
        self.jobs.try_send(Job::Read { id, names: wanted }).ok()?;
        for n in names {
            self.touch(n.key);
        }
        Some(id)
    }

    /// Loads that finished since the last call (blocks that failed to read are dropped from
    /// the index, as are blocks whose write failed).
    pub(crate) fn poll(&mut self) -> Vec<Loaded> {
        let mut out = Vec::new();
        loop {
            match self.done.try_recv() {
                Ok(Done::Read { id, blocks, bad }) => {
                    self.counts.read_bytes += blocks.len() as u64 * self.file_bytes;
                    for key in bad {
                        self.counts.errors += 1;
                        self.forget(key);
                    }
                    out.push(Loaded { id, blocks });
                }
                Ok(Done::WriteFailed { key }) => {
                    self.counts.errors += 1;
                    self.forget(key);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }

    /// Marks the slot as being handed over: this process is saving its cache and will exit, so a
    /// process that starts meanwhile waits for the slot instead of taking an empty one.
    pub(crate) fn mark_stopping(&self) {
        let _ = File::create(self.slot.join("stopping"));
    }

    /// Replies on `reply` once every job asked for so far is done.
    pub(crate) fn flush(&mut self, reply: tokio::sync::oneshot::Sender<()>) {
        let _ = self.jobs.send(Job::Flush { reply });
    }

    /// Routing hashes that entered (`Stored`) or left (`Removed`) the tier since the last call.
    pub(crate) fn take_changes(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.changes)
    }

    /// Evicts least recently used blocks until one more fits; false if none can.
    fn make_room(&mut self) -> bool {
        if self.file_bytes > self.capacity {
            return false;
        }
        while self.used_bytes() + self.file_bytes > self.capacity {
            let Some((_, key)) = self.lru.pop_first() else {
                return false;
            };
            if let Some(e) = self.index.remove(&key) {
                self.changes.push(KvEvent::Removed { hash: e.route });
                let _ = self.jobs.send(Job::Remove {
                    key,
                    route: e.route,
                });
            }
        }
        true
    }

    fn insert(&mut self, key: u128, route: u64) {
        self.tick += 1;
        self.index.insert(
            key,
            Entry {
                route,
                tick: self.tick,
            },
        );
        self.lru.insert(self.tick, key);
        self.changes.push(KvEvent::Stored {
            hash: route,
            parent: None,
        });
    }

    /// Drops `key` from the index (its file is gone or unreadable; the I/O thread deletes it).
    fn forget(&mut self, key: u128) {
        if let Some(e) = self.index.remove(&key) {
            self.lru.remove(&e.tick);
            self.changes.push(KvEvent::Removed { hash: e.route });
        }
    }
}

/// The directory name of a layout's blocks.
fn layout_dir(layout: &KvLayout) -> String {
    format!(
        "{:016x}-{}x{}x{}",
        layout.model, layout.layers, layout.kv_dim, layout.block_size
    )
}

fn file_name(key: u128, route: u64) -> String {
    format!("{key:032x}-{route:016x}.{EXTENSION}")
}

/// The key and routing hash a block file's name gives.
fn parse_name(name: &str) -> Option<(u128, u64)> {
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    let (key, route) = stem.split_once('-')?;
    if key.len() != 32 || route.len() != 16 {
        return None;
    }
    Some((
        u128::from_str_radix(key, 16).ok()?,
        u64::from_str_radix(route, 16).ok()?,
    ))
}

/// Takes the first slot under `root` that no live process holds (an exclusive flock on its
/// `lock` file, released by the kernel when the process ends, however it ends); a slot whose
/// holder is on its way out (`stopping`) is waited for, up to [`HANDOVER_WAIT`].
fn take_slot(root: &Path) -> Result<(PathBuf, File)> {
    for n in 0..SLOTS {
        let slot = root.join(format!("slot-{n}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&slot)
            .map_err(|e| EngineError::io(format!("creating {}", slot.display()), e))?;
        let lock_path = slot.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| EngineError::io(format!("opening {}", lock_path.display()), e))?;
        // SAFETY: `flock` on a descriptor this function owns; no memory is passed.
        let try_lock =
            || unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        let mut locked = try_lock();
        if !locked && slot.join("stopping").exists() {
            let deadline = std::time::Instant::now() + HANDOVER_WAIT;
            tracing::info!(
                "KV disk slot {} is being handed over; waiting",
                slot.display()
            );
            while !locked && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
                locked = try_lock();
            }
        }
        if locked {
            let _ = std::fs::remove_file(slot.join("stopping"));
            return Ok((slot, lock));
        }
    }
    Err(EngineError::io(
        format!(
            "every KV disk slot under {} is held by another process",
            root.display()
        ),
        std::io::Error::from(std::io::ErrorKind::WouldBlock),
    ))
}

/// The slot's keys, from its `secret` file, or fresh ones written there (then `true`: the
/// slot's block files, if any, were named under other keys and are of no use).
fn slot_keys(slot: &Path) -> Result<(NamerKeys, bool)> {
    let path = slot.join("secret");
    let mut bytes = Vec::new();
    let read = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes));
    if read.is_ok() && bytes.len() == 32 {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        return Ok((std::array::from_fn(word), false));
    }
    let keys = random_keys();
    let tmp = slot.join("secret.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        for k in keys {
            f.write_all(&k.to_le_bytes())?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| EngineError::io(format!("writing {}", path.display()), e))?;
    Ok((keys, true))
}

/// The block files in `slot` as (key, routing hash, modified time); deletes leftovers of
/// interrupted writes, files of the wrong size, and (with `stale`) every block file.
fn scan(
    slot: &Path,
    file_bytes: u64,
    stale: bool,
) -> Result<Vec<(u128, u64, std::time::SystemTime)>> {
    let entries = std::fs::read_dir(slot)
        .map_err(|e| EngineError::io(format!("reading {}", slot.display()), e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let path = entry.path();
        if name.ends_with(".tmp") && name != "secret.tmp" {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Some((key, route)) = parse_name(name) else {
            continue;
        };
        let meta = entry.metadata().ok();
        let modified = meta.as_ref().and_then(|m| m.modified().ok());
        match (meta, modified) {
            (Some(m), Some(t)) if !stale && m.is_file() && m.len() == file_bytes => {
                out.push((key, route, t))
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(out)
}

/// The I/O thread: runs jobs in order until the tier is dropped.
fn io_thread(slot: PathBuf, layout: KvLayout, jobs: Receiver<Job>, done: Sender<Done>) {
    let file_bytes = layout.stream_bytes(1) as u64;
    for job in jobs {
        match job {
            Job::Write { key, block } => {
                let path = slot.join(file_name(key, block.route));
                if let Err(e) = write_block(&path, &layout, &block) {
                    tracing::warn!("KV disk tier: writing {}: {e}", path.display());
                    let _ = done.send(Done::WriteFailed { key });
                }
            }
            Job::Remove { key, route } => {
                let _ = std::fs::remove_file(slot.join(file_name(key, route)));
            }
            Job::Read { id, names } => {
                let started = std::time::Instant::now();
                let mut blocks = Vec::with_capacity(names.len());
                let mut bad = Vec::new();
                for (key, route) in names {
                    let path = slot.join(file_name(key, route));
                    match read_block(&path, &layout, file_bytes, route) {
                        Ok(b) => blocks.push(b),
                        Err(why) => {
                            tracing::warn!("KV disk tier: {}: {why}", path.display());
                            let _ = std::fs::remove_file(&path);
                            bad.push(key);
                            break;
                        }
                    }
                }
                tracing::debug!(
                    blocks = blocks.len(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "KV disk tier: read"
                );
                if done.send(Done::Read { id, blocks, bad }).is_err() {
                    return;
                }
            }
            Job::Flush { reply } => {
                let _ = reply.send(());
            }
        }
    }
}

/// Writes one block's file (to a temporary name, then renamed: a reader never sees half a
/// file, and an interrupted write leaves only a `.tmp` that the next start deletes).
fn write_block(path: &Path, layout: &KvLayout, block: &KvBlock) -> std::io::Result<()> {
    let bytes = encode_stream(layout, 0, std::slice::from_ref(block));
    let tmp = path.with_extension("tmp");
    // Never through a link someone planted in the directory.
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?
        .write_all(&bytes)?;
    std::fs::rename(&tmp, path)
}

/// Reads one block's file back, checking its size, layout, checksums and routing hash.
fn read_block(
    path: &Path,
    layout: &KvLayout,
    file_bytes: u64,
    route: u64,
) -> std::result::Result<KvBlock, String> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len != file_bytes {
        return Err(format!("{len} bytes, expected {file_bytes}"));
    }
    let mut bytes = Vec::with_capacity(file_bytes as usize);
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    let mut reader = KvStreamReader::new(*layout);
    let mut blocks = reader.push(&bytes).map_err(|e| e.to_string())?;
    reader.finish().map_err(|e| e.to_string())?;
    match (blocks.pop(), blocks.is_empty()) {
        (Some(b), true) if b.route == route => Ok(b),
        _ => Err("not the one block its name says".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            model: 7,
            layers: 2,
            kv_dim: 4,
            block_size: 4,
        }
    }

    fn name(n: u64) -> BlockName {
        BlockName {
            route: n,
            key: u128::from(n) << 64 | 0xfeed,
        }
    }

    fn values(n: u64) -> Vec<u16> {
        (0..layout().block_values() as u16)
            .map(|i| i ^ n as u16)
            .collect()
    }

    fn scratch(tag: &str) -> KvDiskConfig {
        let dir =
            std::env::temp_dir().join(format!("lastmile-kv-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        KvDiskConfig {
            dir,
            capacity_bytes: 1 << 20,
        }
    }

    /// Waits for the read `id` to come back.
    fn wait_read(tier: &mut DiskTier, id: u64) -> Vec<KvBlock> {
        for _ in 0..500 {
            if let Some(l) = tier.poll().into_iter().find(|l| l.id == id) {
                return l.blocks;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("read {id} never came back");
    }

    fn flush(tier: &mut DiskTier) {
        let (reply, done) = tokio::sync::oneshot::channel();
        tier.flush(reply);
        done.blocking_recv().expect("flushed");
    }

    #[test]
    fn blocks_written_come_back_and_outlive_the_tier() {
        let config = scratch("roundtrip");
        let mut tier = DiskTier::open(&config, layout()).expect("open");
        for n in 1..=3 {
            tier.spill(name(n), vec![n as u32; 4], || values(n), true);
        }
        let id = tier.read(&[name(1), name(2), name(3)]).expect("queued");
        let blocks = wait_read(&mut tier, id);
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[1].values, values(2));
        assert_eq!(blocks[2].tokens, vec![3; 4]);
        let keys = tier.keys();
        drop(tier);
        let tier = DiskTier::open(&config, layout()).expect("reopen");
        assert_eq!(tier.keys(), keys, "the slot's keys are kept");
        assert_eq!(tier.blocks(), 3);
        assert_eq!(tier.run(&[name(1), name(2), name(9), name(3)]), 2);
        // Another model's layout has its own directory: nothing of this one is found.
        let mut other = layout();
        other.model = 8;
        assert_eq!(DiskTier::open(&config, other).expect("open").blocks(), 0);
        drop(tier);
        let _ = std::fs::remove_dir_all(&config.dir);
    }

    #[test]
    fn the_bound_drops_the_least_recently_used_first() {
        let mut config = scratch("bound");
        config.capacity_bytes = 2 * layout().stream_bytes(1) as u64;
        let mut tier = DiskTier::open(&config, layout()).expect("open");
        tier.spill(name(1), vec![1; 4], || values(1), true);
        tier.spill(name(2), vec![2; 4], || values(2), true);
        tier.touch(name(1).key);
        tier.spill(name(3), vec![3; 4], || values(3), true);
        assert!(tier.contains(name(1).key) && tier.contains(name(3).key));
        assert!(!tier.contains(name(2).key), "the least recently used went");
        flush(&mut tier);
        let files = std::fs::read_dir(tier.slot()).expect("slot").flatten();
        let blocks = files.filter(|e| e.path().extension().is_some_and(|x| x == EXTENSION));
        assert_eq!(blocks.count(), 2, "its file too");
        drop(tier);
        let _ = std::fs::remove_dir_all(&config.dir);
    }

    #[test]
    fn links_planted_in_the_directory_are_never_followed() {
        let config = scratch("links");
        let tier = DiskTier::open(&config, layout()).expect("open");
        let slot = tier.slot().to_path_buf();
        drop(tier);
        let precious = config.dir.join("precious");
        std::fs::write(&precious, b"keep me").expect("write");
        // A link dressed as a block file: not indexed, and removed (the target stays).
        let planted = slot.join(file_name(name(5).key, 5));
        std::os::unix::fs::symlink(&precious, &planted).expect("link");
        let mut tier = DiskTier::open(&config, layout()).expect("reopen");
        assert!(!tier.contains(name(5).key));
        assert!(
            std::fs::symlink_metadata(&planted).is_err(),
            "the link is gone"
        );
        // A link where a block's temporary file will be written: the write fails, the target
        // is untouched, and the block is not indexed.
        let tmp = slot.join(file_name(name(6).key, 6)).with_extension("tmp");
        std::os::unix::fs::symlink(&precious, &tmp).expect("link");
        tier.spill(name(6), vec![6; 4], || values(6), true);
        flush(&mut tier);
        tier.poll();
        assert!(!tier.contains(name(6).key));
        assert_eq!(tier.counts.errors, 1);
        assert_eq!(std::fs::read(&precious).expect("read"), b"keep me");
        drop(tier);
        let _ = std::fs::remove_dir_all(&config.dir);
    }
}
