//! The check behind invariant 3 of DESIGN.md: a stream's logits must not depend on what
//! shares its steps. One stream is fed alone, one token per call; then the same stream
//! in one lane of a batch whose other lanes join, leave, restart, slide and skip logits
//! around it; then fed in prefill runs of several tokens per call beside other lanes.
//! Every position's logits must be bit-identical across the three. Run on the CPU by
//! `tests/determinism.rs` and on a GPU by `nacrith gpu-check`.

use super::llama::ModelRuntime;
use super::{Feed, LanguageModel, ModelError};
use crate::codec::params::CoderParams;

/// What to compare.
pub struct Plan<'a> {
    /// The stream's tokens (fed after the start token); at least `positions` of them.
    pub target: &'a [u32],
    /// Tokens the other lanes are fed (cycled).
    pub others: &'a [u32],
    /// Positions compared. Past `2 * ctx_len - ctx_keep` the check crosses two KV slides.
    pub positions: usize,
    /// Lanes of the batched run (the target and `lanes - 1` others), at least 3.
    pub lanes: usize,
    /// Longest prefill run fed to the target in one call.
    pub max_run: usize,
}

/// Where a stream's logits first differed.
#[derive(Debug, thiserror::Error)]
pub enum Divergence {
    #[error("{phase}: logits diverged at position {position} of {positions}{detail}")]
    Logits {
        phase: &'static str,
        position: usize,
        positions: usize,
        detail: String,
    },
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("the target has {have} tokens, the plan compares {need} positions")]
    TooShort { have: usize, need: usize },
}

/// FNV-1a over the logits' bits: equal hashes for bit-identical logits.
pub fn logits_hash(l: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in l {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Positions a check must cover to cross two KV slides (the refilled cells of the
/// second are scattered: where a run's tokens land matters).
pub fn past_two_slides(params: &CoderParams) -> usize {
    2 * params.ctx_len as usize - params.ctx_keep as usize + 100
}

/// Run all three phases; Ok holds the logits hashes of the stream alone.
pub fn check(rt: &ModelRuntime, params: &CoderParams, plan: &Plan) -> Result<Vec<u64>, Divergence> {
    if plan.target.len() < plan.positions {
        return Err(Divergence::TooShort {
            have: plan.target.len(),
            need: plan.positions,
        });
    }
    let alone = alone(rt, params, plan)?;
    batched(rt, params, plan, &alone)?;
    prefill(rt, params, plan, &alone)?;
    Ok(alone)
}

fn target_token(rt: &ModelRuntime, plan: &Plan, i: usize) -> u32 {
    if i == 0 {
        rt.start_token
    } else {
        plan.target[i - 1]
    }
}

fn other_token(rt: &ModelRuntime, plan: &Plan, pos: usize, lane: usize) -> u32 {
    if pos == 0 || plan.others.is_empty() {
        rt.start_token
    } else {
        plan.others[(pos - 1 + lane * 50) % plan.others.len()]
    }
}

/// The stream alone, one token per call.
pub fn alone(rt: &ModelRuntime, params: &CoderParams, plan: &Plan) -> Result<Vec<u64>, Divergence> {
    let mut lm = rt.lanes(1, params)?;
    lm.reset_lane(0)?;
    let mut hashes = Vec::with_capacity(plan.positions);
    for i in 0..plan.positions {
        lm.step(&[Feed {
            lane: 0,
            token: target_token(rt, plan, i),
            want_logits: true,
        }])?;
        hashes.push(logits_hash(lm.logits(0)));
    }
    Ok(hashes)
}

/// The stream in the middle lane of `plan.lanes`, one token per call. Lane 1 (or 0 when
/// the target is 1) idles for a stretch, then runs without a restart long enough to
/// slide itself; the others restart after lengths that differ per lane and grow per run,
/// a third of them idle in windows (so the batch size keeps changing), and every other
/// one asks for logits only on even steps.
fn batched(
    rt: &ModelRuntime,
    params: &CoderParams,
    plan: &Plan,
    alone: &[u64],
) -> Result<(), Divergence> {
    let lanes = plan.lanes.max(3);
    let target = lanes / 2;
    let long = if target == 1 { 0 } else { 1 };
    let mut lm = rt.lanes(lanes, params)?;
    for lane in 0..lanes {
        lm.reset_lane(lane)?;
    }
    let mut pos = vec![0usize; lanes];
    let mut runs = vec![0usize; lanes];
    for (i, &expected) in alone.iter().enumerate().take(plan.positions) {
        let mut feeds = Vec::with_capacity(lanes);
        let mut target_index = 0;
        for lane in 0..lanes {
            if lane == target {
                target_index = feeds.len();
                feeds.push(Feed {
                    lane,
                    token: target_token(rt, plan, i),
                    want_logits: true,
                });
                continue;
            }
            if lane == long && (300..700).contains(&i) {
                continue;
            }
            if lane != long && lane % 3 == 2 && (i / 50 + lane) % 4 == 0 {
                continue;
            }
            let limit = if lane == long {
                usize::MAX
            } else {
                97 + 151 * lane + 13 * runs[lane]
            };
            if pos[lane] == limit {
                lm.reset_lane(lane)?;
                pos[lane] = 0;
                runs[lane] += 1;
            }
            feeds.push(Feed {
                lane,
                token: other_token(rt, plan, pos[lane], lane),
                want_logits: lane % 2 == 0 || i % 2 == 0,
            });
            pos[lane] += 1;
        }
        lm.step(&feeds)?;
        if logits_hash(lm.logits(target_index)) != expected {
            return Err(Divergence::Logits {
                phase: "batched one-token steps",
                position: i,
                positions: plan.positions,
                detail: format!(" (target in lane {target} of {lanes})"),
            });
        }
    }
    Ok(())
}

/// The stream in lane 1 of 3, fed in runs of 1 to `plan.max_run` tokens per call (cut at
/// each slide, as the encoder cuts them), beside a lane taking one token per step
/// (asking for logits one step in three) and a lane taking runs of 5.
fn prefill(
    rt: &ModelRuntime,
    params: &CoderParams,
    plan: &Plan,
    alone: &[u64],
) -> Result<(), Divergence> {
    let max = plan.max_run.max(1);
    let mut lm = rt.lanes_with_run(3, params, max)?;
    for lane in 0..3 {
        lm.reset_lane(lane)?;
    }
    let runs = [1usize, max, 2, 16, 5, 30, 9, max, 3];
    let (mut i, mut step, mut pos0, mut pos2) = (0usize, 0usize, 0usize, 0usize);
    while i < plan.positions {
        let k = runs[step % runs.len()]
            .min(max)
            .min(lm.run_room(1))
            .min(plan.positions - i);
        let mut feeds = vec![Feed {
            lane: 0,
            token: other_token(rt, plan, pos0, 0),
            want_logits: step % 3 == 0,
        }];
        pos0 += 1;
        let first = feeds.len();
        for j in i..i + k {
            feeds.push(Feed {
                lane: 1,
                token: target_token(rt, plan, j),
                want_logits: true,
            });
        }
        for _ in 0..5.min(lm.run_room(2)) {
            feeds.push(Feed {
                lane: 2,
                token: other_token(rt, plan, pos2, 2),
                want_logits: true,
            });
            pos2 += 1;
        }
        lm.step(&feeds)?;
        for j in 0..k {
            if logits_hash(lm.logits(first + j)) != alone[i + j] {
                return Err(Divergence::Logits {
                    phase: "prefill runs",
                    position: i + j,
                    positions: plan.positions,
                    detail: format!(" (a run of {k} from {i})"),
                });
            }
        }
        i += k;
        step += 1;
    }
    Ok(())
}
