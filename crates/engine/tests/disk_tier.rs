//! The KV tier on disk with the real model: blocks the prefix cache evicts are saved and come
//! back on a prefix hit with the same greedy tokens as computing them; a new engine on the same
//! directory (a replica started again) finds what the last one persisted, and announces it in
//! its snapshot; two engines at once get separate slots; a damaged file is recomputed, never
//! used; the store stays within its bound.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use common::generate as run;
use lastmile_engine::kv_disk::KvDiskConfig;
use lastmile_engine::{EngineConfig, EngineHandle, LoadedModel};
use lastmile_models::ensure_default_model;

/// An engine with a small pool (40 blocks of 16 tokens) over the disk tier at `dir`.
fn engine(dir: &Path, capacity_bytes: u64) -> EngineHandle {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let config = EngineConfig {
        threads: 2,
        kv_cache_tokens: Some(640),
        kv_disk: Some(KvDiskConfig {
            dir: dir.to_path_buf(),
            capacity_bytes,
        }),
        ..EngineConfig::default()
    };
    EngineHandle::start(loaded, config).expect("engine")
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 200 + (i * 37 + salt) % 9000)
        .collect()
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lastmile-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Waits until no process holds the first slot's lock (an engine whose last handle was dropped
/// lets go of it when its thread ends).
fn wait_for_slot(dir: &Path) {
    use std::os::unix::io::AsRawFd;
    let Some(layout) = std::fs::read_dir(dir).ok().and_then(|mut d| d.next()) else {
        return;
    };
    let lock = layout.expect("entry").path().join("slot-0").join("lock");
    let f = std::fs::File::open(&lock).expect("lock file");
    for _ in 0..500 {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the first engine never let go of its slot");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn counter(e: &EngineHandle, f: impl Fn(&lastmile_engine::EngineStats) -> u64) -> u64 {
    f(e.stats())
}

/// The block files under `dir` (every slot).
fn block_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "kvb") {
                out.push(p);
            }
        }
    }
    out
}

const GIB: u64 = 1 << 30;

#[test]
fn evicted_blocks_come_back_from_disk_with_the_same_tokens() {
    let dir = scratch_dir("evict");
    let e = engine(&dir, GIB);
    let a = prompt(320, 1);
    let first = run(&e, &a, 8);
    // Two other prompts of 320 tokens take the 40-block pool: A's blocks are evicted.
    run(&e, &prompt(320, 2), 8);
    run(&e, &prompt(320, 3), 8);
    let spilled = e.stats().kv_disk_blocks.load(Ordering::Relaxed);
    assert!(
        spilled >= 19,
        "A's 20 blocks were saved as they were evicted: {spilled}"
    );
    let prefill_before = counter(&e, |s| s.prefill_tokens.load(Ordering::Relaxed));
    let again = run(&e, &a, 8);
    assert_eq!(
        again, first,
        "blocks read from disk give the same greedy tokens"
    );
    let hits = counter(&e, |s| s.kv_disk_hit_blocks.load(Ordering::Relaxed));
    assert_eq!(
        hits, 19,
        "every full block but the last token's came from disk"
    );
    let computed = counter(&e, |s| s.prefill_tokens.load(Ordering::Relaxed)) - prefill_before;
    assert!(
        computed <= 16,
        "only the tail was computed: {computed} tokens"
    );
    assert!(counter(&e, |s| s.kv_disk_read_bytes.load(Ordering::Relaxed)) > 0);
    assert_eq!(counter(&e, |s| s.kv_disk_errors.load(Ordering::Relaxed)), 0);
    drop(e);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_replica_started_again_finds_what_its_predecessor_persisted() {
    let dir = scratch_dir("restart");
    let rt = runtime();
    let a = prompt(400, 7);
    let (first, routes) = {
        let e = engine(&dir, GIB);
        let first = run(&e, &a, 8);
        // Nothing was evicted: persisting writes the cached blocks.
        let written = rt.block_on(e.persist_kv()).expect("persist");
        assert!(written >= 24, "the prompt's blocks were written: {written}");
        assert_eq!(rt.block_on(e.persist_kv()).expect("persist again"), 0);
        let mut routes = e.cached_blocks();
        routes.sort_unstable();
        (first, routes)
    };
    // The engine thread ends when its last handle is dropped; the slot's lock goes with it.
    wait_for_slot(&dir);
    let e = engine(&dir, GIB);
    let mut found = e.cached_blocks();
    found.sort_unstable();
    assert!(
        routes.iter().all(|r| found.contains(r)),
        "the new engine's snapshot announces the blocks on disk"
    );
    let prefill_before = counter(&e, |s| s.prefill_tokens.load(Ordering::Relaxed));
    assert_eq!(run(&e, &a, 8), first, "same tokens from blocks read back");
    let computed = counter(&e, |s| s.prefill_tokens.load(Ordering::Relaxed)) - prefill_before;
    assert!(
        computed <= 16,
        "only the tail was computed: {computed} tokens"
    );
    assert_eq!(
        counter(&e, |s| s.kv_disk_hit_blocks.load(Ordering::Relaxed)),
        24
    );
    drop(e);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_replica_started_while_its_predecessor_stops_waits_for_its_slot() {
    let dir = scratch_dir("handover");
    let rt = runtime();
    let a = prompt(200, 5);
    let e = engine(&dir, GIB);
    let first = run(&e, &a, 8);
    rt.block_on(e.persist_kv()).expect("persist");
    let routes = e.cached_blocks();
    // The old replica is still exiting when the new one starts: the new one waits for its slot
    // instead of taking an empty one.
    let exiting = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(800));
        drop(e);
    });
    let next = engine(&dir, GIB);
    exiting.join().expect("old replica");
    let found = next.cached_blocks();
    assert!(
        routes.iter().all(|r| found.contains(r)),
        "the same slot, found"
    );
    assert_eq!(run(&next, &a, 8), first);
    assert_eq!(
        counter(&next, |s| s.kv_disk_hit_blocks.load(Ordering::Relaxed)),
        12
    );
    drop(next);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_block_file_is_recomputed_never_used() {
    let dir = scratch_dir("damaged");
    let rt = runtime();
    let a = prompt(200, 11);
    let first = {
        let e = engine(&dir, GIB);
        let first = run(&e, &a, 8);
        rt.block_on(e.persist_kv()).expect("persist");
        first
    };
    wait_for_slot(&dir);
    // Flip one byte in the middle of every block file: its checksum no longer holds.
    let files = block_files(&dir);
    assert!(files.len() >= 12, "{} files", files.len());
    for f in &files {
        let mut bytes = std::fs::read(f).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(f, bytes).expect("write");
    }
    let e = engine(&dir, GIB);
    assert_eq!(run(&e, &a, 8), first, "recomputed, same tokens");
    assert_eq!(
        counter(&e, |s| s.kv_disk_hit_blocks.load(Ordering::Relaxed)),
        0
    );
    assert!(counter(&e, |s| s.kv_disk_errors.load(Ordering::Relaxed)) >= 1);
    drop(e);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn engines_at_once_take_separate_slots_and_the_store_keeps_its_bound() {
    let dir = scratch_dir("slots");
    let rt = runtime();
    // Room for 10 block files of this model (about 0.4 MB each) and no more.
    let one = {
        let probe = engine(&dir, GIB);
        run(&probe, &prompt(40, 3), 1);
        rt.block_on(probe.persist_kv()).expect("persist");
        let files = block_files(&dir);
        std::fs::metadata(&files[0]).expect("file").len()
    };
    wait_for_slot(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let (x, y) = (engine(&dir, 10 * one), engine(&dir, 10 * one));
    for (i, e) in [&x, &y].into_iter().enumerate() {
        run(e, &prompt(320, 20 + i as u32), 2);
        rt.block_on(e.persist_kv()).expect("persist");
        assert_eq!(e.stats().kv_disk_blocks.load(Ordering::Relaxed), 10);
    }
    let mut slots: Vec<PathBuf> = block_files(&dir)
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    slots.sort();
    slots.dedup();
    assert_eq!(slots.len(), 2, "one slot per live engine: {slots:?}");
    assert_eq!(block_files(&dir).len(), 20, "each slot within its bound");
    drop((x, y));
    let _ = std::fs::remove_dir_all(&dir);
}
