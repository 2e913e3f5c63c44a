//! The batched forward pass computes the same thing however work is split: a prompt prefilled at
//! once, in chunks, or token by token; and a sequence alone or batched with others.

mod common;

use lastmile_engine::kv::KvCache;
use lastmile_engine::model::{BatchSeq, Scratch};
use lastmile_engine::parallel::ThreadPool;

fn last_logits(chunks: &[&[u32]], pool: &ThreadPool) -> Vec<f32> {
    let m = common::default_model();
    let cfg = &m.model.config;
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut kv = KvCache::new(cfg.layers, total.div_ceil(16), 16, cfg.kv_dim());
    // A scattered block table, to exercise the paging.
    let blocks: Vec<u32> = (0..total.div_ceil(16) as u32).rev().collect();
    let mut s = Scratch::default();
    let mut fed = 0;
    for c in chunks {
        let b = [BatchSeq {
            start: 0,
            len: c.len(),
            pos0: fed,
            blocks: &blocks,
            logit_rows: 1,
        }];
        m.model.forward(c, &b, &mut kv, &mut s, pool);
        fed += c.len();
    }
    s.logits[..cfg.vocab].to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prompt() -> Vec<u32> {
    common::default_model()
        .tokenizer
        .encode("<|im_start|>user\nWrite a short poem about the sea and the stars, please.<|im_end|>\n<|im_start|>assistant\n")
        .expect("encode")
}

#[test]
fn prefill_chunked_and_token_by_token_agree() {
    let pool = ThreadPool::new(2);
    let p = prompt();
    let whole = last_logits(&[&p], &pool);
    let (a, b) = p.split_at(p.len() / 3);
    let chunked = last_logits(&[a, b], &pool);
    let singles: Vec<&[u32]> = p.chunks(1).collect();
    let one_by_one = last_logits(&singles, &pool);
    assert!(
        max_diff(&whole, &chunked) < 1e-3,
        "chunked differs by {}",
        max_diff(&whole, &chunked)
    );
    assert!(
        max_diff(&whole, &one_by_one) < 1e-3,
        "token-by-token differs by {}",
        max_diff(&whole, &one_by_one)
    );
}

#[test]
fn a_sequence_batched_with_others_gets_its_solo_logits() {
    let m = common::default_model();
    let cfg = &m.model.config;
    let pool = ThreadPool::new(2);
    let p1 = prompt();
    let p2 = m
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog. 12345")
        .expect("encode");
    let solo1 = last_logits(&[&p1], &pool);
    let solo2 = last_logits(&[&p2], &pool);
    let n1 = p1.len().div_ceil(16);
    let n2 = p2.len().div_ceil(16);
    let mut kv = KvCache::new(cfg.layers, n1 + n2, 16, cfg.kv_dim());
    let t1: Vec<u32> = (0..n1 as u32).collect();
    let t2: Vec<u32> = (n1 as u32..(n1 + n2) as u32).collect();
    let mut tokens = p1.clone();
    tokens.extend_from_slice(&p2);
    let b = [
        BatchSeq {
            start: 0,
            len: p1.len(),
            pos0: 0,
            blocks: &t1,
            logit_rows: 1,
        },
        BatchSeq {
            start: p1.len(),
            len: p2.len(),
            pos0: 0,
            blocks: &t2,
            logit_rows: 1,
        },
    ];
    let mut s = Scratch::default();
    assert_eq!(m.model.forward(&tokens, &b, &mut kv, &mut s, &pool), 2);
    let v = cfg.vocab;
    assert!(max_diff(&s.logits[..v], &solo1) < 1e-3);
    assert!(max_diff(&s.logits[v..2 * v], &solo2) < 1e-3);
}
