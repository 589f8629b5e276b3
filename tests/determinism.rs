//! Invariant 3 of DESIGN.md: the decoder must see bit-identical probabilities. These
//! tests run past a KV-cache slide (> 2,048 tokens) on the real model.

mod common;

use common::{english, llm_lock, pool};
use nacrithfs::codec::container::Header;
use nacrithfs::codec::{self, CompressOptions, DecompressOptions, Engine};
use nacrithfs::model::invariance::{self, logits_hash};
use nacrithfs::model::{Feed, LanguageModel};
use nacrithfs::pool::LocalPool;

fn tokens_of(text: &[u8]) -> Vec<u32> {
    pool().runtime.feed_tokens(text)
}

/// Logits of one stream fed alone, one token per call, versus the same stream in another
/// lane of a batch whose other lanes join, leave, restart and skip logits around it, and
/// versus the stream fed in prefill runs of several tokens per call. Past two KV slides.
/// (`nacrith gpu-check` runs the same check on a GPU.)
#[test]
fn logits_do_not_depend_on_batch_composition_across_a_kv_slide() {
    let _g = llm_lock();
    let rt = &pool().runtime;
    let params = rt.default_params();
    let text = english(16_000);
    let target = tokens_of(&text);
    let n = invariance::past_two_slides(&params);
    let start = rt.start_token;
    let others = tokens_of(&english(11_000)[3000..]);
    let plan = invariance::Plan {
        target: &target,
        others: &others,
        positions: n,
        lanes: 4,
        max_run: 37,
    };
    let alone = match invariance::check(rt, &params, &plan) {
        Ok(hashes) => hashes,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(alone.len(), n);
    {
        // A run may not cross a slide: the model refuses it (before changing anything)
        // rather than put tokens at other positions than one-token steps would.
        let mut lm = rt.lanes_with_run(1, &params, 64).expect("context");
        lm.reset_lane(0).expect("reset");
        let feed = |p: usize| Feed {
            lane: 0,
            token: if p == 0 { start } else { target[p - 1] },
            want_logits: false,
        };
        let mut fed = 0usize;
        while fed < params.ctx_len as usize - 1 {
            let k = lm.run_room(0).min(params.ctx_len as usize - 1 - fed);
            let feeds: Vec<Feed> = (fed..fed + k).map(feed).collect();
            lm.step(&feeds).expect("step within the context");
            fed += k;
        }
        assert_eq!(lm.run_room(0), 1, "one token left before the slide");
        let err = lm
            .step(&[feed(fed), feed(fed + 1)])
            .expect_err("a run across a slide must be refused");
        assert!(err.to_string().contains("room"), "{err}");
        lm.step(&[feed(fed)])
            .expect("the last token before the slide");
        assert_eq!(lm.run_room(0), 64, "after the slide a run has room again");
        lm.step(&[feed(fed + 1), feed(fed + 2)])
            .expect("a run right after the slide");
    }

    // A full 16-lane batch (the pool's default width), target in lane 11, for the first
    // 300 positions.
    let m = 300;
    let mut lm = rt.lanes(16, &params).expect("context");
    for lane in 0..16 {
        lm.reset_lane(lane).expect("reset");
    }
    for i in 0..m {
        let feeds: Vec<Feed> = (0..16)
            .map(|lane| {
                let token = match (lane, i) {
                    (_, 0) => start,
                    (11, _) => target[i - 1],
                    _ => others[(i - 1 + lane * 97) % others.len()],
                };
                Feed {
                    lane,
                    token,
                    want_logits: true,
                }
            })
            .collect();
        lm.step(&feeds).expect("step");
        assert_eq!(
            logits_hash(lm.logits(11)),
            alone[i],
            "16-lane batch diverged at position {i}"
        );
    }
}

/// A pool of its own (one context with `lanes` lanes, encoding `run` tokens per lane per
/// step, its lanes' ensembles spread over `threads` host threads) on the shared test
/// model's file.
fn private_pool(lanes: usize, run: usize, threads: usize) -> LocalPool {
    let path = &pool().runtime.path;
    let mut runtime = nacrithfs::model::ModelRuntime::load(path).expect("load");
    runtime.encode_run = run;
    runtime.ensemble_threads = threads;
    LocalPool::new(runtime, 1, lanes)
}

/// The codec end to end: a long chunk coded in a 3-lane batch beside shorter chunks
/// decodes on a single-lane pool, and a chunk coded alone decodes in a batch. A short
/// context (512, keep 384) makes the ~1,400-token chunk slide its KV cache four times.
#[test]
fn chunk_coded_in_a_batch_decodes_alone_and_the_reverse() {
    let _g = llm_lock();
    // One-token steps alone against prefill runs of 7 in a batch (its lanes coded on two
    // host threads): runs straddle every slide point (room 128 after each) and still
    // give the same blob.
    let alone = private_pool(1, 1, 1);
    let batched = private_pool(3, 7, 2);
    let mut data = english(6_000);
    data.extend_from_slice(b"\nA short second chunk of text, coded beside the long one.\n");
    data.extend_from_slice(b"And a third, even shorter.\n");
    let mut params = alone.default_params();
    params.set("ctx_keep", "384").expect("param");
    params.set("ctx_len", "512").expect("param");
    let opts = CompressOptions {
        chunk_size: 6_060,
        // One long first chunk: it must run past the KV slide.
        head_chunk: 0,
        params: Some(params),
        ..CompressOptions::default()
    };
    let compress = |engine: &LocalPool| {
        codec::compress(&data, Some(engine as &dyn Engine), &opts, &|_| {}).expect("compress")
    };
    let decompress = |engine: &LocalPool, blob: &[u8]| {
        codec::decompress(
            blob,
            Some(engine as &dyn Engine),
            &DecompressOptions::default(),
            &|_| {},
        )
        .expect("decompress")
    };

    let in_batch = compress(&batched);
    let (h, _) = Header::parse(&in_batch, Some(in_batch.len() as u64)).expect("header");
    let chunks: Vec<_> = h.segments.iter().flat_map(|s| s.chunks.iter()).collect();
    assert!(
        chunks.len() >= 2,
        "expected several chunks, got {}",
        chunks.len()
    );
    assert!(
        chunks[0].n_symbols > 1200,
        "first chunk has only {} tokens",
        chunks[0].n_symbols
    );
    assert!(
        decompress(&alone, &in_batch) == data,
        "batched encode, lone decode differs"
    );

    let by_itself = compress(&alone);
    assert_eq!(
        in_batch, by_itself,
        "the same input must give the same blob however it is batched"
    );
    assert!(
        decompress(&batched, &by_itself) == data,
        "lone encode, batched decode differs"
    );
}

/// The shared pool that every file of a mount uses: chunks of different lengths join and
/// leave one context's lanes mid-stream, an urgent job (a reader's) pauses every other
/// lane mid-stream until it is done, and a cancelled job leaves its lane mid-stream. No
/// stream's probabilities may change: the blob equals the one a single-lane pool makes,
/// and every chunk decodes to its bytes.
#[test]
fn shared_pool_lanes_join_leave_and_pause_without_changing_any_stream() {
    use nacrithfs::codec::lanes::{ChunkOutput, BACKGROUND, CANCELLED, URGENT};
    use nacrithfs::codec::{check_engine, chunk_bytes, chunk_job, Plan, RegionKind};
    use nacrithfs::pool::{Done, Submit};
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::Arc;

    let _g = llm_lock();
    // The shared pool spreads its lanes' ensembles over three host threads (as on a GPU).
    let one_lane = private_pool(1, 1, 1);
    let shared = private_pool(3, nacrithfs::model::llama::DEFAULT_ENCODE_RUN, 3);
    let data = english(6_000);
    let opts = CompressOptions {
        chunk_size: 1_200,
        ..CompressOptions::default()
    };
    let alone = codec::compress(&data, Some(&one_lane as &dyn Engine), &opts, &|_| {})
        .expect("compress alone");
    let blob = codec::compress(&data, Some(&shared as &dyn Engine), &opts, &|_| {})
        .expect("compress shared");
    assert!(
        alone == blob,
        "the shared pool's blob differs from a lone stream's"
    );

    let plan = Plan::of(&blob).expect("plan");
    let params =
        check_engine(&plan.header, &shared, &DecompressOptions::default()).expect("engine");
    assert!(plan.regions.len() >= 4, "{} chunks", plan.regions.len());
    assert!(plan
        .regions
        .iter()
        .all(|r| matches!(r.kind, RegionKind::Chunk { .. })));
    let (tx, rx) = crossbeam_channel::unbounded::<Done>();
    let submit = |tag: u64, region: usize, priority: Arc<AtomicU8>, progress| {
        shared.submit(
            &params,
            Submit {
                tag,
                job: chunk_job(&blob, &plan.regions[region]).expect("chunk job"),
                priority,
                progress,
                reply: tx.clone(),
            },
        )
    };
    // First in line, so a lane is running it when it is cancelled.
    let doomed = Arc::new(AtomicU8::new(BACKGROUND));
    let doomed_coded = Arc::new(AtomicUsize::new(0));
    submit(2000, 0, doomed.clone(), Some(doomed_coded.clone()));
    for i in 0..plan.regions.len() {
        submit(i as u64, i, Arc::new(AtomicU8::new(BACKGROUND)), None);
    }
    // Let the background lanes get going, then cancel one mid-stream and cut in.
    let t = std::time::Instant::now();
    while doomed_coded.load(Ordering::Relaxed) == 0 || t.elapsed().as_secs() < 2 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    doomed.store(CANCELLED, Ordering::Relaxed);
    let coded_at_cancel = doomed_coded.load(Ordering::Relaxed);
    let doomed_len = match &plan.regions[0].kind {
        RegionKind::Chunk { n_symbols, .. } => *n_symbols,
        _ => unreachable!("every region is a chunk"),
    };
    let last = plan.regions.len() - 1;
    submit(1000, last, Arc::new(AtomicU8::new(URGENT)), None);
    let mut order = Vec::new();
    for _ in 0..plan.regions.len() + 2 {
        let done = rx
            .recv_timeout(std::time::Duration::from_secs(600))
            .expect("a chunk job never finished");
        if done.tag == 2000 {
            match done.result {
                Err(e) => assert!(e.to_string().contains("cancelled"), "{e}"),
                // Only a device fast enough to finish it before the cancel (a GPU) may.
                Ok(_) => assert!(
                    coded_at_cancel >= doomed_len,
                    "a job cancelled after {coded_at_cancel} of {doomed_len} symbols ran to its end"
                ),
            }
            order.push(done.tag);
            continue;
        }
        let region = if done.tag == 1000 {
            last
        } else {
            done.tag as usize
        };
        let Ok(ChunkOutput::Decoded(symbols)) = done.result else {
            panic!("chunk {} failed", done.tag);
        };
        let r = &plan.regions[region];
        let bytes = chunk_bytes(shared.tokenizer(), symbols, r)
            .unwrap_or_else(|e| panic!("chunk {} (tag {}): {e}", region, done.tag));
        assert!(
            bytes[..] == data[r.out.start as usize..r.out.end as usize],
            "chunk {region} decoded to different bytes"
        );
        order.push(done.tag);
    }
    println!("finish order (1000 = the urgent one, 2000 = the cancelled one): {order:?}");
}

/// Chunks of a blob coded with other parameters than the pool's (`nacrith --param`, or a
/// hostile blob) run on one private thread, one context at a time, and each is
/// answered: a blob of thousands of such chunks used to start a thread and a context
/// for every one of them at once.
#[test]
fn chunks_with_other_parameters_share_one_private_thread() {
    use nacrithfs::codec::lanes::{ChunkOutput, CANCELLED, URGENT};
    use nacrithfs::codec::{check_engine, chunk_bytes, chunk_job, Plan};
    use nacrithfs::pool::{Done, Submit};
    use std::sync::atomic::AtomicU8;
    use std::sync::Arc;

    let _g = llm_lock();
    let pool = private_pool(1, 1, 1);
    let data = english(2_400);
    let mut params = pool.default_params();
    params.set("ctx_keep", "384").expect("param");
    params.set("ctx_len", "512").expect("param");
    let opts = CompressOptions {
        chunk_size: 300,
        head_chunk: 0,
        params: Some(params),
        ..CompressOptions::default()
    };
    let blob =
        codec::compress(&data, Some(&pool as &dyn Engine), &opts, &|_| {}).expect("compress");
    let plan = Plan::of(&blob).expect("plan");
    let params = check_engine(&plan.header, &pool, &DecompressOptions::default()).expect("engine");
    assert!(plan.regions.len() >= 6, "{} chunks", plan.regions.len());
    let before = pool.private_threads_started();
    let (tx, rx) = crossbeam_channel::unbounded::<Done>();
    for (i, r) in plan.regions.iter().enumerate() {
        pool.submit(
            &params,
            Submit {
                tag: i as u64,
                job: chunk_job(&blob, r).expect("chunk job"),
                priority: Arc::new(AtomicU8::new(URGENT)),
                progress: None,
                reply: tx.clone(),
            },
        );
    }
    let mut done = 0;
    while done < plan.regions.len() {
        let d = rx
            .recv_timeout(std::time::Duration::from_secs(600))
            .expect("a chunk job never finished");
        let Ok(ChunkOutput::Decoded(symbols)) = d.result else {
            panic!("chunk {} failed", d.tag);
        };
        let r = &plan.regions[d.tag as usize];
        let bytes = chunk_bytes(pool.tokenizer(), symbols, r).expect("chunk bytes");
        assert!(
            bytes[..] == data[r.out.start as usize..r.out.end as usize],
            "chunk {} decoded to different bytes",
            d.tag
        );
        done += 1;
    }
    // Jobs given up while they wait (a decode abandoned) are answered "cancelled" and
    // cost the private thread nothing; one still wanted among them is decoded.
    for (i, r) in plan.regions.iter().enumerate() {
        let wanted = i == plan.regions.len() - 1;
        pool.submit(
            &params,
            Submit {
                tag: i as u64,
                job: chunk_job(&blob, r).expect("chunk job"),
                priority: Arc::new(AtomicU8::new(if wanted { URGENT } else { CANCELLED })),
                progress: None,
                reply: tx.clone(),
            },
        );
    }
    for _ in 0..plan.regions.len() {
        let d = rx
            .recv_timeout(std::time::Duration::from_secs(600))
            .expect("a chunk job never answered");
        if d.tag as usize == plan.regions.len() - 1 {
            assert!(
                matches!(d.result, Ok(ChunkOutput::Decoded(_))),
                "the wanted chunk failed"
            );
        } else {
            let err = d.result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                err.contains("cancelled"),
                "a cancelled chunk was run: {:?}",
                err
            );
        }
    }
    // (The compression above may have started the pool's one already.)
    let started = pool.private_threads_started();
    assert!(
        started <= 1 && started - before <= 1,
        "{} private coder threads started for {} chunks",
        started - before,
        plan.regions.len()
    );
}
