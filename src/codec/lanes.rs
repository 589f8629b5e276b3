//! The lockstep driver: one model context advances up to k chunk streams at once, one
//! symbol per stream per step, filling a lane with the next job as soon as one ends.
//! Encoding and decoding run the same loop, so both sides make identical model calls.

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

struct Lane<'a> {
    id: usize,
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

/// Where jobs come from: `block` is true when every lane is idle (so waiting is fine).
pub trait JobSource {
    fn next(&mut self, block: bool) -> Option<(usize, ChunkJob)>;
    fn finished(&mut self, id: usize, output: ChunkOutput);
    /// Called after every step with the number of symbols just coded.
    fn progress(&mut self, _symbols: usize) {}
}

pub fn run_lanes(
    lm: &mut dyn LanguageModel,
    params: &CoderParams,
    allowed: &[bool],
    source: &mut dyn JobSource,
) -> Result<(), ModelError> {
    let n_lanes = lm.n_lanes();
    let mut lanes: Vec<Option<Lane>> = (0..n_lanes).map(|_| None).collect();
    let mut feeds = Vec::with_capacity(n_lanes);
    let mut order = Vec::with_capacity(n_lanes);
    let (mut t_model, mut t_coder) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut steps = 0u64;
    loop {
        // Take at most one new job per step while lanes are busy: workers sharing a queue
        // then split a handful of long chunks evenly instead of the first one taking all.
        for slot in 0..n_lanes {
            if lanes[slot].is_some() {
                continue;
            }
            let all_idle = lanes.iter().all(|l| l.is_none());
            let Some((id, job)) = source.next(all_idle) else {
                break;
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
            break;
        }
        feeds.clear();
        order.clear();
        for (slot, lane) in lanes.iter().enumerate() {
            if let Some(l) = lane {
                feeds.push(Feed {
                    lane: slot,
                    token: l.model.next_feed_token(),
                    want_logits: l.model.wants_llm(),
                });
                order.push(slot);
            }
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
        for (i, &slot) in order.iter().enumerate() {
            let Some(lane) = lanes[slot].as_mut() else {
                continue;
            };
            let logits = if feeds[i].want_logits {
                Some(lm.logits(i))
            } else {
                None
            };
            lane.model.predict(logits);
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
                if let Some(l) = lanes[slot].take() {
                    finish(l, source);
                }
            }
        }
        t_coder += t1.elapsed();
        source.progress(feeds.len());
    }
}

fn finish(lane: Lane, source: &mut dyn JobSource) {
    let out = match lane.work {
        Work::Enc { enc, .. } => ChunkOutput::Encoded(enc.finish()),
        Work::Dec { out, .. } => ChunkOutput::Decoded(out),
    };
    source.finished(lane.id, out);
}
