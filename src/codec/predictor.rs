//! The ensemble for one chunk: LLM logits + adaptive bias head, token n-grams, a match
//! model, an online mixer, and the quantized CDF the arithmetic coder consumes.
//!
//! Encoder and decoder run exactly the same sequence of `predict` / `update` calls, so
//! all state here must evolve identically on both sides: fixed iteration order, pinned
//! `exp`/`ln` from `libm`, no hashing with random seeds affecting results.

use super::matcher::MatchModel;
use super::mixer::Mixer;
use super::ngram::NGram;
use super::params::CoderParams;
use super::range::{Decoder, Encoder};
use super::tokenizer::Symbol;

const MATCH_BUCKETS: usize = 4;
/// Logits this far below the maximum contribute < e^-40 and are treated as zero.
const LOGIT_RANGE: f32 = 40.0;

pub struct ChunkModel<'a> {
    params: &'a CoderParams,
    /// Tokens that may carry probability mass: producible by the tokenizer, or the escape.
    allowed: &'a [bool],
    n_allowed: usize,
    vocab: usize,
    total: u32,
    /// History ids: token ids, or `vocab + byte` for escaped bytes.
    history: Vec<u32>,
    ngram: NGram,
    matcher: MatchModel,
    bias: Vec<f32>,
    mixer: Mixer,
    q_llm: Vec<f64>,
    p: Vec<f64>,
    freq: Vec<u32>,
    // What the last `predict` used, for `update`.
    llm_used: bool,
    set: usize,
    weights: Vec<f64>,
    match_pred: Option<u32>,
}

impl<'a> ChunkModel<'a> {
    pub fn new(params: &'a CoderParams, allowed: &'a [bool]) -> ChunkModel<'a> {
        let vocab = params.n_vocab as usize;
        let order = params.ngram_order as usize;
        let n_inputs = order + 2;
        let n_sets = MATCH_BUCKETS * (order + 1) * 2;
        ChunkModel {
            params,
            allowed,
            n_allowed: allowed.iter().filter(|&&a| a).count().max(1),
            vocab,
            total: 1 << params.cdf_bits,
            history: Vec::new(),
            ngram: NGram::new(order),
            matcher: MatchModel::new(params.match_min as usize),
            bias: vec![0.0; vocab],
            mixer: Mixer::new(n_inputs, n_sets, params.mixer_lr, params.mixer_llm_init),
            q_llm: vec![0.0; vocab],
            p: vec![0.0; vocab],
            freq: vec![0; vocab],
            llm_used: false,
            set: 0,
            weights: vec![0.0; n_inputs],
            match_pred: None,
        }
    }

    fn alpha(&self, history_id: u32) -> u32 {
        if (history_id as usize) < self.vocab {
            history_id
        } else {
            self.params.escape_token
        }
    }

    /// Whether the next symbol needs the LLM's logits (the confidence skip). Depends only
    /// on symbols already coded, so encoder and decoder agree.
    pub fn wants_llm(&self) -> bool {
        if self.params.skip_entropy_mbits == 0 {
            return true;
        }
        for k in (1..=self.ngram.order()).rev() {
            if let Some(c) = self.ngram.lookup(&self.history, k) {
                if c.total >= self.params.skip_min_count {
                    return c.entropy_bits() * 1000.0 >= self.params.skip_entropy_mbits as f64;
                }
            }
        }
        true
    }

    /// The token the LLM must be fed before predicting the next symbol.
    pub fn next_feed_token(&self) -> u32 {
        match self.history.last() {
            None => self.params.start_token,
            Some(&h) => self.alpha(h),
        }
    }

    /// The token the LLM is fed after `sym` is coded: what `next_feed_token` will say
    /// then, known in advance by an encoder.
    pub fn feed_token_after(&self, sym: Symbol) -> u32 {
        self.alpha(Self::history_id(self.vocab, sym))
    }

    fn history_id(vocab: usize, sym: Symbol) -> u32 {
        match sym {
            Symbol::Token(t) => t,
            Symbol::Escaped(b) => vocab as u32 + b as u32,
        }
    }

    /// Build the CDF for the next symbol. `logits` is `Some` iff `wants_llm()`.
    pub fn predict(&mut self, logits: Option<&[f32]>) {
        let v = self.vocab;
        self.llm_used = logits.is_some();
        match logits {
            Some(l) => {
                let mut max = f32::NEG_INFINITY;
                for ((&li, &bi), &ok) in l.iter().zip(&self.bias).zip(self.allowed) {
                    if ok {
                        max = max.max(li + bi);
                    }
                }
                let mut sum = 0.0f64;
                let terms = self
                    .q_llm
                    .iter_mut()
                    .zip(l)
                    .zip(&self.bias)
                    .zip(self.allowed);
                for (((q, &li), &bi), &ok) in terms {
                    let z = li + bi - max;
                    *q = if ok && z > -LOGIT_RANGE {
                        libm::expf(z) as f64
                    } else {
                        0.0
                    };
                    sum += *q;
                }
                for q in self.q_llm.iter_mut() {
                    *q /= sum;
                }
            }
            None => {
                let u = 1.0 / self.n_allowed as f64;
                for t in 0..v {
                    self.q_llm[t] = if self.allowed[t] { u } else { 0.0 };
                }
            }
        }

        // Mixer inputs: 0 = LLM, 1..=order = n-gram orders, order+1 = match model.
        // An input with nothing to say (unseen context, no match) defers to the LLM.
        let order = self.ngram.order();
        let mut highest = 0;
        for k in 1..=order {
            if self.ngram.lookup(&self.history, k).is_some() {
                highest = k;
            }
        }
        let matched = self.matcher.predict(&self.history);
        self.match_pred = matched.map(|(h, _)| self.alpha(h));
        let bucket = match matched {
            None => 0,
            Some((_, len)) if len < 8 => 1,
            Some((_, len)) if len < 16 => 2,
            Some(_) => 3,
        };
        self.set = ((bucket * (order + 1)) + highest) * 2 + self.llm_used as usize;
        self.mixer.weights(self.set, &mut self.weights);

        let mut llm_weight = self.weights[0];
        for k in 1..=order {
            if self.ngram.lookup(&self.history, k).is_none() {
                llm_weight += self.weights[k];
            }
        }
        if self.match_pred.is_none() {
            llm_weight += self.weights[order + 1];
        }
        for t in 0..v {
            self.p[t] = llm_weight * self.q_llm[t];
        }
        for k in 1..=order {
            if let Some(c) = self.ngram.lookup(&self.history, k) {
                let w = self.weights[k] / c.total as f64;
                for &(s, n) in &c.entries {
                    self.p[s as usize] += w * n as f64;
                }
            }
        }
        if let Some(s) = self.match_pred {
            self.p[s as usize] += self.weights[order + 1];
        }

        // Quantize: every token keeps a floor of 1; the rounding remainder goes to the
        // most probable token so the total is exactly 2^cdf_bits.
        let spread = (self.total as usize - v) as f64;
        let mut sum: u64 = 0;
        let mut argmax = 0;
        for t in 0..v {
            let f = 1 + (self.p[t] * spread) as u32;
            self.freq[t] = f;
            sum += f as u64;
            if self.p[t] > self.p[argmax] {
                argmax = t;
            }
        }
        let adjusted = self.freq[argmax] as i64 + self.total as i64 - sum as i64;
        self.freq[argmax] = adjusted.max(1) as u32;
    }

    pub fn encode(&self, enc: &mut Encoder, sym: Symbol) {
        let token = match sym {
            Symbol::Token(t) => t,
            Symbol::Escaped(_) => self.params.escape_token,
        };
        let cum: u32 = self.freq[..token as usize].iter().sum();
        enc.encode(cum, self.freq[token as usize], self.total);
        if let Symbol::Escaped(b) = sym {
            enc.encode(b as u32, 1, 256);
        }
    }

    pub fn decode(&self, dec: &mut Decoder) -> Symbol {
        let target = dec.target(self.total);
        let mut cum = 0u32;
        let mut token = self.vocab - 1;
        for (t, &f) in self.freq.iter().enumerate() {
            if cum + f > target {
                token = t;
                break;
            }
            cum += f;
        }
        dec.consume(cum, self.freq[token], self.total);
        if token as u32 == self.params.escape_token {
            let b = dec.target(256);
            dec.consume(b, 1, 256);
            Symbol::Escaped(b as u8)
        } else {
            Symbol::Token(token as u32)
        }
    }

    /// Learn from the symbol just coded.
    pub fn update(&mut self, sym: Symbol) {
        let y = match sym {
            Symbol::Token(t) => t,
            Symbol::Escaped(_) => self.params.escape_token,
        };
        let history_id = Self::history_id(self.vocab, sym);
        let yi = y as usize;
        let order = self.ngram.order();
        let q_llm_y = self.q_llm[yi];
        let mut q_y = vec![q_llm_y; order + 2];
        for (k, q) in q_y.iter_mut().enumerate().take(order + 1).skip(1) {
            if let Some(c) = self.ngram.lookup(&self.history, k) {
                *q = c.count(y) as f64 / c.total as f64;
            }
        }
        if let Some(m) = self.match_pred {
            q_y[order + 1] = (m == y) as u32 as f64;
        }
        let p_y = self.p[yi].max(1e-300);
        self.mixer.update(self.set, &q_y, p_y);

        if self.llm_used && self.params.bias_lr > 0.0 {
            // Gradient of −log softmax(l + b)[y] with respect to b.
            let lr = self.params.bias_lr as f64;
            for t in 0..self.vocab {
                let q = self.q_llm[t];
                if q > 0.0 {
                    self.bias[t] -= (lr * q) as f32;
                }
            }
            self.bias[yi] += lr as f32;
        }

        self.ngram.update(&self.history, y);
        self.history.push(history_id);
        self.matcher.update(&self.history);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Code length in bits of a repetitive token stream under flat logits.
    fn cost(params: &CoderParams) -> f64 {
        let allowed = vec![true; params.n_vocab as usize];
        let logits = vec![0.0f32; params.n_vocab as usize];
        let mut m = ChunkModel::new(params, &allowed);
        let mut bits = 0.0;
        for i in 0..3000u32 {
            let s = Symbol::Token(10 + (i % 37) * 3);
            m.predict(Some(&logits));
            let t = match s {
                Symbol::Token(t) => t as usize,
                Symbol::Escaped(_) => unreachable!(),
            };
            bits -= libm::log2(m.freq[t] as f64 / m.total as f64);
            m.update(s);
        }
        bits
    }

    #[test]
    fn mixer_learns_to_trust_the_predictors_on_repetitive_input() {
        let mut p = CoderParams::new(1024, 0, 1);
        p.mixer_lr = 0.0;
        let frozen = cost(&p);
        p.mixer_lr = 0.5;
        let learning = cost(&p);
        assert!(
            learning < frozen * 0.5,
            "learning {learning:.0} bits vs frozen {frozen:.0} bits"
        );
    }
}
