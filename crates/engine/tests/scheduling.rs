//! The engine end to end through its handle: continuous batching gives every request its solo
//! output, preemption under KV pressure is invisible to clients, and hopeless requests are refused.

use lastmile_engine::{
    EngineConfig, EngineError, EngineHandle, FinishReason, GenerateRequest, GenerationEvent,
    LoadedModel, SamplingParams,
};
use lastmile_models::ensure_default_model;

fn engine(kv_tokens: Option<usize>, max_batch_tokens: usize) -> EngineHandle {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let config = EngineConfig {
        threads: 2,
        kv_cache_tokens: kv_tokens,
        max_batch_tokens,
        ..EngineConfig::default()
    };
    EngineHandle::start(loaded, config).expect("engine")
}

fn request(e: &EngineHandle, text: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: e.tokenizer().encode_prompt(text).expect("encode"),
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        ignore_eos: true,
        logprobs: None,
        prompt_logprobs: None,
        grammar: None,
        speculation: None,
    }
}

fn collect(mut s: lastmile_engine::GenerationStream) -> (Vec<u32>, String, FinishReason) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            GenerationEvent::Finished {
                reason,
                text: t,
                completion_tokens,
                ..
            } => {
                text.push_str(&t);
                assert_eq!(completion_tokens, ids.len());
                return (ids, text, reason);
            }
            GenerationEvent::PromptLogprobs(_) => panic!("not asked for"),
            GenerationEvent::Failed(e) => panic!("failed: {e}"),
        }
    }
    panic!("stream ended without Finished")
}

const PROMPTS: [&str; 4] = [
    "The history of Rome",
    "def quicksort(arr):",
    "Dear diary, today",
    "1, 1, 2, 3, 5, 8,",
];

#[test]
fn preemption_under_kv_pressure_is_invisible() {
    // 6 blocks of 16 = 96 tokens, while the four requests need ~4 x 36: someone must be preempted.
    let tight = engine(Some(96), 512);
    let roomy = engine(None, 512);
    let solo: Vec<_> = PROMPTS
        .iter()
        .map(|p| collect(roomy.submit(request(&roomy, p, 30)).expect("submit")).0)
        .collect();
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| tight.submit(request(&tight, p, 30)).expect("submit"))
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let (ids, _, reason) = collect(s);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(ids, solo[i], "request {i} changed under preemption");
    }
    let st = tight.stats();
    assert!(
        st.preemptions.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the test did not exercise preemption"
    );
    // Counters are published after each step, so give the last step a moment to land.
    let mut used = usize::MAX;
    for _ in 0..100 {
        used = st.kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed);
        if used == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(used, 0, "blocks leaked");
}

#[test]
fn small_chunks_and_joining_mid_batch_keep_outputs() {
    // A 7-token step budget forces chunked prefill and staggered joins.
    let chunky = engine(None, 7);
    let solo: Vec<_> = PROMPTS
        .iter()
        .map(|p| collect(chunky.submit(request(&chunky, p, 12)).expect("submit")).0)
        .collect();
    let mut first = chunky
        .submit(request(&chunky, PROMPTS[0], 12))
        .expect("submit");
    // The others arrive once the first is decoding (its first token is out).
    let head = match first.blocking_next() {
        Some(GenerationEvent::Token { id, .. }) => id,
        other => panic!("expected a first token, got {other:?}"),
    };
    let rest: Vec<_> = PROMPTS[1..]
        .iter()
        .map(|p| chunky.submit(request(&chunky, p, 12)).expect("submit"))
        .collect();
    // Each stream is read on its own thread, noting when its tokens came.
    let timed = |mut s: lastmile_engine::GenerationStream| {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(ev) = s.blocking_next() {
                match ev {
                    GenerationEvent::Token { id, .. } => got.push((id, std::time::Instant::now())),
                    GenerationEvent::Finished { .. } => return got,
                    other => panic!("unexpected {other:?}"),
                }
            }
            panic!("stream ended without Finished")
        })
    };
    let first = timed(first);
    let rest: Vec<_> = rest.into_iter().map(timed).collect();
    let first = first.join().expect("first");
    let rest: Vec<_> = rest.into_iter().map(|t| t.join().expect("rest")).collect();
    let ids = |got: &[(u32, std::time::Instant)]| got.iter().map(|g| g.0).collect::<Vec<_>>();
    let mut first_ids = vec![head];
    first_ids.extend(ids(&first));
    assert_eq!(first_ids, solo[0]);
    for (i, got) in rest.iter().enumerate() {
        assert_eq!(ids(got), solo[i + 1]);
    }
    // They joined mid-batch: a later request had tokens out before the first one's last.
    let first_last = first.last().expect("the first had tokens left").1;
    assert!(
        rest.iter().any(|got| got[0].1 < first_last),
        "no request joined while the first was decoding"
    );
}

#[test]
fn a_request_larger_than_the_cache_fails_cleanly() {
    let tiny = engine(Some(32), 512);
    let refused = tiny.submit(request(&tiny, "Hello there", 100)).err();
    assert!(
        matches!(
            refused,
            Some(EngineError::KvCapacityExceeded { capacity: 32, needed }) if needed > 100
        ),
        "{:?}",
        refused.map(|e| e.to_string())
    );
    // And the engine still serves what fits.
    let (ids, _, _) = collect(
        tiny.submit(request(&tiny, "Hello there", 8))
            .expect("submit"),
    );
    assert_eq!(ids.len(), 8);
}

/// An engine that runs one sequence and lets two wait, with a long request running (the stream
/// returned; dropping it cancels the request).
fn busy_engine() -> (EngineHandle, lastmile_engine::GenerationStream) {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let config = EngineConfig {
        threads: 2,
        max_running: 1,
        max_waiting: 2,
        ..EngineConfig::default()
    };
    let e = EngineHandle::start(loaded, config).expect("engine");
    let held = e
        .submit(request(&e, "Once upon a time", 200))
        .expect("fits");
    while e.stats().running.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    (e, held)
}

#[test]
fn a_full_queue_refuses_new_requests_as_overloaded() {
    // One runs, two wait; the queue is then full.
    let (e, running) = busy_engine();
    let mut held = vec![running];
    held.extend((0..2).map(|_| {
        e.submit(request(&e, "Once upon a time", 200))
            .expect("fits")
    }));
    let refused = (0..3)
        .filter(|_| {
            matches!(
                e.submit(request(&e, "Hello", 4)),
                Err(lastmile_engine::EngineError::QueueFull { limit: 2 })
            )
        })
        .count();
    assert_eq!(
        refused, 3,
        "requests beyond the queue bound must be refused"
    );
    drop(held); // cancelling frees the queue
    let mut ok = false;
    for _ in 0..200 {
        if let Ok(s) = e.submit(request(&e, "Hello", 4)) {
            assert_eq!(collect(s).0.len(), 4);
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ok, "the engine accepts work again once the queue drains");
}

#[test]
fn submissions_racing_for_the_last_places_are_refused_only_as_overloaded() {
    let (e, held) = busy_engine();
    // Eight threads submit at once for the two waiting places. A refusal may come from
    // `submit` or, for one that slipped past its check, from the engine's queue as a failed
    // stream: both must say "overloaded" (a 503 to clients), never anything else.
    let outcomes: Vec<Result<Option<usize>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| match e.submit(request(&e, "Hello", 4)) {
                    Err(EngineError::QueueFull { limit: 2 }) => Ok(None),
                    Err(other) => Err(format!("submit: {other:?}")),
                    Ok(mut s) => {
                        let mut tokens = 0;
                        while let Some(ev) = s.blocking_next() {
                            match ev {
                                GenerationEvent::Token { .. } => tokens += 1,
                                GenerationEvent::Finished { .. } => return Ok(Some(tokens)),
                                GenerationEvent::Failed(f) => {
                                    return match &*f {
                                        EngineError::QueueFull { limit: 2 } => Ok(None),
                                        other => Err(format!("stream: {other:?}")),
                                    }
                                }
                                GenerationEvent::PromptLogprobs(_) => {}
                            }
                        }
                        Err("stream ended without an end".into())
                    }
                })
            })
            .collect();
        // The long request must not hold the waiting ones forever.
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(held);
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for o in &outcomes {
        assert!(o.is_ok(), "{outcomes:?}");
    }
    let served = outcomes.iter().filter(|o| matches!(o, Ok(Some(4)))).count();
    let refused = outcomes.iter().filter(|o| matches!(o, Ok(None))).count();
    assert_eq!(served + refused, 8, "{outcomes:?}");
    assert!((1..=6).contains(&refused), "{outcomes:?}");
}

/// Twelve sequences sampled in the same steps (sampling is spread over the compute threads from
/// eight on) each get their solo output: greedy and seeded-sampled ones, with log probabilities,
/// ids, text and finish alike.
#[test]
fn many_sequences_sampled_in_one_step_get_their_solo_outputs() {
    let e = engine(None, 512);
    let make = |i: usize| {
        let mut r = request(&e, PROMPTS[i % PROMPTS.len()], 10 + i % 3);
        if i % 2 == 1 {
            r.sampling = SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                seed: Some(7 + i as u64),
                ..SamplingParams::default()
            };
        }
        if i.is_multiple_of(3) {
            r.logprobs = Some(2);
        }
        r
    };
    // Every event of a stream, as text (ids, text, log probabilities, the finish).
    let events = |mut s: lastmile_engine::GenerationStream| {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(ev) = s.blocking_next() {
                let done = matches!(
                    ev,
                    GenerationEvent::Finished { .. } | GenerationEvent::Failed(_)
                );
                got.push(format!("{ev:?}"));
                if done {
                    break;
                }
            }
            got
        })
    };
    let solo: Vec<Vec<String>> = (0..12)
        .map(|i| {
            events(e.submit(make(i)).expect("submit"))
                .join()
                .expect("solo")
        })
        .collect();
    let together: Vec<_> = (0..12)
        .map(|i| e.submit(make(i)).expect("submit"))
        .collect();
    let together: Vec<Vec<String>> = together
        .into_iter()
        .map(events)
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("together"))
        .collect();
    for (i, (alone, batched)) in solo.iter().zip(&together).enumerate() {
        assert!(
            alone.last().is_some_and(|l| l.starts_with("Finished")),
            "{alone:?}"
        );
        assert_eq!(alone, batched, "request {i}");
    }
}
