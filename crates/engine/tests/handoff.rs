//! Blocks handed from one engine to another (disaggregated prefill and decode): a prompt
//! computed on one engine, held, read out, sent through the wire format and imported by a
//! second engine gives the second the same greedy tokens as computing it itself, as prefix-cache
//! hits; blocks that are not the prompt's are refused; leases return to zero.

mod common;

use std::sync::atomic::Ordering;

use common::generate as run;
use lastmile_engine::kv_transfer::{encode_block, encode_end, encode_header, KvStreamReader};
use lastmile_engine::{EngineConfig, EngineHandle, LoadedModel};
use lastmile_models::ensure_default_model;

fn engine() -> EngineHandle {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let config = EngineConfig {
        threads: 2,
        kv_cache_tokens: Some(4096),
        ..EngineConfig::default()
    };
    EngineHandle::start(loaded, config).expect("engine")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 200 + (i * 37 + salt) % 9000)
        .collect()
}

#[test]
fn blocks_computed_on_one_engine_serve_another_as_if_it_had_computed_them() {
    let rt = runtime();
    let (prefill, decode) = (engine(), engine());
    let layout = prefill.kv_layout("m");
    assert_eq!(layout, decode.kv_layout("m"), "same model, same layout");
    assert_ne!(layout, decode.kv_layout("other-name"));
    let p = prompt(100, 1);
    // The prefill side computes the prompt, holds its blocks and copies them out.
    run(&prefill, &p, 1);
    let (held, copied) = rt.block_on(prefill.hold_prefix(p.clone())).expect("hold");
    assert_eq!(copied.len(), held.blocks);
    assert_eq!(
        held.blocks,
        100 / 16,
        "every full block of the prompt is cached"
    );
    assert_eq!(
        prefill.stats().kv_blocks_held.load(Ordering::Relaxed),
        held.blocks
    );
    let mut wire = Vec::new();
    encode_header(&layout, 0, &mut wire);
    for b in &copied {
        encode_block(b, &mut wire);
    }
    encode_end(held.blocks as u32, &mut wire);
    prefill.release_prefix(held.lease).expect("release");
    // The decode side reads the stream and imports the blocks.
    let mut reader = KvStreamReader::new(decode.kv_layout("m"));
    let blocks = reader.push(&wire).expect("a valid stream");
    assert_eq!(reader.finish(), Ok(held.blocks));
    let outcome = rt
        .block_on(decode.import_blocks(p.clone(), 0, blocks.clone()))
        .expect("import");
    assert_eq!(outcome.stored, held.blocks, "{outcome:?}");
    assert_eq!(outcome.refused, 0);
    let again = rt
        .block_on(decode.import_blocks(p.clone(), 0, blocks.clone()))
        .expect("import");
    assert_eq!(again.present, held.blocks, "a second import stores nothing");
    // Generating on the decode side reuses every imported block and gives the same tokens.
    let theirs = run(&decode, &p, 24);
    let hits = decode.stats().prefix_hit_tokens.load(Ordering::Relaxed);
    assert_eq!(
        hits as usize,
        held.blocks * 16,
        "the prompt hit the imported blocks"
    );
    assert_eq!(decode.stats().prefill_tokens.load(Ordering::Relaxed), 4);
    let ours = run(&prefill, &p, 24);
    assert_eq!(theirs, ours, "imported KV generates what computed KV does");
    // The lease is gone: nothing held, its blocks back in the cache's care.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while prefill.stats().kv_blocks_held.load(Ordering::Relaxed) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "held blocks never returned"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn blocks_that_are_not_the_prompts_are_refused() {
    let rt = runtime();
    let (prefill, decode) = (engine(), engine());
    let p = prompt(64, 2);
    run(&prefill, &p, 1);
    let (held, blocks) = rt.block_on(prefill.hold_prefix(p.clone())).expect("hold");
    prefill.release_prefix(held.lease).expect("release");
    // Another prompt's blocks (as a hostile or confused peer would send) are not stored.
    let other = prompt(64, 3);
    let outcome = rt
        .block_on(decode.import_blocks(other.clone(), 0, blocks.clone()))
        .expect("import");
    assert_eq!((outcome.stored, outcome.refused), (0, blocks.len()));
    // Nor are the right blocks at the wrong place, or a block whose values were cut.
    let shifted = rt
        .block_on(decode.import_blocks(p.clone(), 1, blocks.clone()))
        .expect("import");
    assert_eq!(shifted.stored, 0);
    let mut cut = blocks.clone();
    cut[1].values.pop();
    let partial = rt
        .block_on(decode.import_blocks(p.clone(), 0, cut))
        .expect("import");
    assert_eq!((partial.stored, partial.refused), (1, blocks.len() - 1));
    assert_eq!(decode.cached_blocks().len(), 1);
}
