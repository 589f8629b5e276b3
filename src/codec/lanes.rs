//! The lockstep driver: one model context advances up to k chunk streams at once,
//! filling a lane with the next job as soon as one ends. A decoding stream advances one
//! symbol per step; an encoding stream may feed a run of its known tokens in one step,
//! which gives the same logits (the model's contract), so the coder sees exactly what
//! the decoder will.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::params::CoderParams;
use super::predictor::ChunkModel;
use super::range::{Decoder, Encoder};
use super::tokenizer::Symbol;
use crate::model::{Feed, LanguageModel, ModelError};

pub enum ChunkJob {
    Encode(Vec<Symbol>),
    Decode { data: Vec<u8>, n_symbols: usize },
}

pub enum ChunkOutput {
    Encoded(Vec<u8>),
    Decoded(Vec<Symbol>),
}

enum Work {
    Enc {
        symbols: Vec<Symbol>,
        enc: Encoder,
    },
    Dec {
        dec: Decoder,
        n: usize,
        out: Vec<Symbol>,
    },
}

/// How urgently a job is wanted. A lane of a lower tier is not stepped while a lane of a
/// higher tier is active in the same context (it keeps its state and resumes later:
/// logits do not depend on which lanes share a step).
pub const BACKGROUND: u8 = 0;
/// Chunks just past what a reader asked for.
pub const READ_AHEAD: u8 = 1;
/// A reader is waiting on this chunk.
pub const URGENT: u8 = 2;
/// Not a tier: the job's owner gave up on it (a failed sibling chunk, a dropped decode).
/// A lane holding it lets it go at the next step; a queue drops it unstarted.
pub const CANCELLED: u8 = u8::MAX;

/// A job handed to a lane. `priority` may be raised by its owner while it runs.
pub struct Taken {
    pub id: usize,
    pub job: ChunkJob,
    pub priority: Arc<AtomicU8>,
}

impl Taken {
    pub fn background(id: usize, job: ChunkJob) -> Taken {
        Taken {
            id,
            job,
            priority: Arc::new(AtomicU8::new(BACKGROUND)),
        }
    }
}

struct Lane<'a> {
    id: usize,
    priority: Arc<AtomicU8>,
    background: bool,
    model: ChunkModel<'a>,
    work: Work,
    done: usize,
}

impl Lane<'_> {
    fn len(&self) -> usize {
        match &self.work {
            Work::Enc { symbols, .. } => symbols.len(),
            Work::Dec { n, .. } => *n,
        }
    }
}

/// Where jobs come from: `block` is true when every lane is idle (so waiting is fine);
/// `background_ok` is false when the lanes background jobs may use are all taken (the
/// rest are kept for reads).
pub trait JobSource {
    fn next(&mut self, block: bool, background_ok: bool) -> Option<Taken>;
    fn finished(&mut self, id: usize, output: ChunkOutput);
    /// A running job was let go (its priority became [`CANCELLED`]).
    fn cancelled(&mut self, _id: usize) {}
    /// Called after every step for each job that just coded `symbols` symbols.
    fn progress(&mut self, _id: usize, _symbols: usize) {}
    /// Checked every step: true abandons the running jobs (run_lanes returns an error).
    fn stop(&self) -> bool {
        false
    }
}

/// Run jobs from `source` until it has none left (it returns None while every lane is
/// idle). At most `background_slots` lanes hold background jobs at once.
pub fn run_lanes(
    lm: &mut dyn LanguageModel,
    params: &CoderParams,
    allowed: &[bool],
    background_slots: usize,
    source: &mut dyn JobSource,
) -> Result<(), ModelError> {
    let n_lanes = lm.n_lanes();
    let mut lanes: Vec<Option<Lane>> = (0..n_lanes).map(|_| None).collect();
    let mut feeds = Vec::with_capacity(n_lanes);
    let mut order = Vec::with_capacity(n_lanes);
    let (mut t_model, mut t_coder) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut steps = 0u64;
    loop {
        for lane in lanes.iter_mut() {
            if let Some(l) = lane.take_if(|l| l.priority.load(Ordering::Relaxed) == CANCELLED) {
                source.cancelled(l.id);
            }
        }
        // Take at most one new job per step while lanes are busy: workers sharing a queue
        // then split a handful of long chunks evenly instead of the first one taking all.
        'fill: for slot in 0..n_lanes {
            if lanes[slot].is_some() {
                continue;
            }
            // An empty job is answered at once and the same slot takes the next: every
            // slot skipping one must not end the run with jobs still queued.
            loop {
                let all_idle = lanes.iter().all(|l| l.is_none());
                let busy_background = lanes.iter().flatten().filter(|l| l.background).count();
                let Some(Taken { id, job, priority }) =
                    source.next(all_idle, busy_background < background_slots)
                else {
                    break 'fill;
                };
                let work = match job {
                    ChunkJob::Encode(symbols) => Work::Enc {
                        symbols,
                        enc: Encoder::new(),
                    },
                    ChunkJob::Decode { data, n_symbols } => Work::Dec {
                        dec: Decoder::new(data),
                        n: n_symbols,
                        out: Vec::with_capacity(n_symbols.min(1 << 20)),
                    },
                };
                let lane = Lane {
                    id,
                    background: priority.load(Ordering::Relaxed) == BACKGROUND,
                    priority,
                    model: ChunkModel::new(params, allowed),
                    work,
                    done: 0,
                };
                if lane.len() == 0 {
                    finish(lane, source);
                    continue;
                }
                lm.reset_lane(slot)?;
                lanes[slot] = Some(lane);
                break 'fill;
            }
        }
        feeds.clear();
        order.clear();
        // Only the most urgent tier present advances: a reader's chunk runs at the speed
        // of a single stream even when every other lane is busy with compression.
        let tier = lanes
            .iter()
            .flatten()
            .map(|l| l.priority.load(Ordering::Relaxed))
            .filter(|&p| p != CANCELLED)
            .max()
            .unwrap_or(BACKGROUND);
        // Every lane of the tier gets one token; encoding lanes then take more of theirs
        // (known in advance) while the step has room: a run of k tokens costs one pass
        // over the weights instead of k.
        let mut spare = lm.step_capacity().saturating_sub(
            lanes
                .iter()
                .flatten()
                .filter(|l| l.priority.load(Ordering::Relaxed) >= tier)
                .count(),
        );
        for (slot, lane) in lanes.iter().enumerate() {
            let Some(l) = lane
                .as_ref()
                .filter(|l| l.priority.load(Ordering::Relaxed) >= tier)
            else {
                continue;
            };
            feeds.push(Feed {
                lane: slot,
                token: l.model.next_feed_token(),
                want_logits: matches!(l.work, Work::Enc { .. }) || l.model.wants_llm(),
            });
            order.push(slot);
            if let Work::Enc { symbols, .. } = &l.work {
                let extra = (lm.run_room(slot) - 1)
                    .min(symbols.len() - l.done - 1)
                    .min(spare);
                spare -= extra;
                for sym in &symbols[l.done..l.done + extra] {
                    feeds.push(Feed {
                        lane: slot,
                        token: l.model.feed_token_after(*sym),
                        want_logits: true,
                    });
                    order.push(slot);
                }
            }
        }
        if source.stop() {
            return Err(ModelError::Runtime("the pool is shutting down".into()));
        }
        if feeds.is_empty() {
            log::debug!("lanes: {steps} steps, model {t_model:?}, coder {t_coder:?}");
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        lm.step(&feeds)?;
        let t1 = std::time::Instant::now();
        t_model += t1 - t0;
        steps += 1;
        // Each lane's feeds are consecutive in `order`: one run per lane, coded in order.
        let mut runs: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, &slot) in order.iter().enumerate() {
            match runs.last_mut() {
                Some((s, r)) if *s == slot => r.end = i + 1,
                _ => runs.push((slot, i..i + 1)),
            }
        }
        let logits: Vec<Option<&[f32]>> = feeds
            .iter()
            .enumerate()
            .map(|(i, f)| f.want_logits.then(|| lm.logits(i)))
            .collect();
        let threads = lm.host_threads().min(runs.len()).max(1);
        let mut taken: Vec<(usize, Lane, std::ops::Range<usize>, usize, bool)> = runs
            .into_iter()
            .filter_map(|(slot, r)| Some((slot, lanes[slot].take()?, r, 0, false)))
            .collect();
        if threads == 1 {
            for (_, lane, r, coded, ended) in taken.iter_mut() {
                (*coded, *ended) = code_run(lane, &logits[r.clone()]);
            }
        } else {
            // The ensemble of each lane is independent of the others': on a fast device
            // one host core per lane-step would starve it, so the lanes are spread over
            // the host's cores. Same arithmetic per lane, so the same bits.
            let per = taken.len().div_ceil(threads);
            let logits = &logits;
            std::thread::scope(|s| {
                for group in taken.chunks_mut(per) {
                    s.spawn(move || {
                        for (_, lane, r, coded, ended) in group.iter_mut() {
                            (*coded, *ended) = code_run(lane, &logits[r.clone()]);
                        }
                    });
                }
            });
        }
        for (slot, lane, _, coded, ended) in taken {
            source.progress(lane.id, coded);
            if ended {
                finish(lane, source);
            } else {
                lanes[slot] = Some(lane);
            }
        }
        t_coder += t1.elapsed();
    }
}

/// Code one lane's symbols for the logits of its feeds of the last step (None where no
/// logits were asked for). Returns how many it coded and whether the job ended.
fn code_run(lane: &mut Lane, logits: &[Option<&[f32]>]) -> (usize, bool) {
    for (n, l) in logits.iter().enumerate() {
        // An encoding run asked for every token's logits; whether the coder uses them
        // is decided here, from the symbols coded so far, as the decoder decides it.
        let l = l.filter(|_| lane.model.wants_llm());
        lane.model.predict(l);
        let sym = match &mut lane.work {
            Work::Enc { symbols, enc } => {
                let s = symbols[lane.done];
                lane.model.encode(enc, s);
                s
            }
            Work::Dec { dec, out, .. } => {
                let s = lane.model.decode(dec);
                out.push(s);
                s
            }
        };
        lane.model.update(sym);
        lane.done += 1;
        // A valid stream ends within a few bits of its data; reading far past it means
        // corruption. Stop early: the short output fails the chunk's length check.
        let overran = matches!(&lane.work, Work::Dec { dec, .. } if dec.overran());
        if lane.done == lane.len() || overran {
            return (n + 1, true);
        }
    }
    (logits.len(), false)
}

fn finish(lane: Lane, source: &mut dyn JobSource) {
    let out = match lane.work {
        Work::Enc { enc, .. } => ChunkOutput::Encoded(enc.finish()),
        Work::Dec { out, .. } => ChunkOutput::Decoded(out),
    };
    source.finished(lane.id, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    // Flat logits: which jobs run, not what they code, is under test.
    use crate::fuzzing::FlatModel as Flat;

    struct Queue {
        jobs: std::collections::VecDeque<(usize, ChunkJob)>,
        done: Vec<bool>,
    }

    impl JobSource for Queue {
        fn next(&mut self, _block: bool, _background_ok: bool) -> Option<Taken> {
            self.jobs
                .pop_front()
                .map(|(id, job)| Taken::background(id, job))
        }
        fn finished(&mut self, id: usize, _output: ChunkOutput) {
            self.done[id] = true;
        }
    }

    /// As many empty jobs in a row as there are lanes, then a real one: every job is
    /// answered before the run ends. (Each slot used to skip past its empty job, so the
    /// step found no lane busy and the run ended with the real job still queued.)
    #[test]
    fn empty_jobs_never_end_a_run_with_jobs_queued() {
        let vocab = 300;
        let params = CoderParams::new(vocab as u32, 0, 1);
        let allowed = vec![true; vocab];
        let mut lm = Flat {
            lanes: 2,
            logits: vec![0.0; vocab],
        };
        let mut jobs: std::collections::VecDeque<(usize, ChunkJob)> = (0..3)
            .map(|id| (id, ChunkJob::Encode(Vec::new())))
            .collect();
        jobs.push_back((
            3,
            ChunkJob::Encode(vec![Symbol::Token(5), Symbol::Token(7)]),
        ));
        let mut queue = Queue {
            jobs,
            done: vec![false; 4],
        };
        run_lanes(&mut lm, &params, &allowed, 2, &mut queue).expect("run");
        assert_eq!(queue.done, [true; 4], "jobs left unanswered");
    }
}
