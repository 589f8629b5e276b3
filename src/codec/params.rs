//! Every number that changes the coder's arithmetic. All of them are written into each
//! blob's header, and the decoder uses the header's values, never its own defaults.

use std::fmt;

/// The longest model context a blob may ask for (the model's own is 8192); KV memory
/// grows with it.
pub const MAX_CTX_LEN: u32 = 8192;
/// The context this build codes with (see [`CoderParams::new`]).
pub const DEFAULT_CTX_LEN: u32 = 2048;

#[derive(Debug, Clone, PartialEq)]
pub struct CoderParams {
    /// LLM context per stream (tokens); when full, keep the last `ctx_keep` and shift the KV cache.
    pub ctx_len: u32,
    pub ctx_keep: u32,
    /// log2 of the CDF total.
    pub cdf_bits: u32,
    pub n_vocab: u32,
    /// Token fed first to every stream.
    pub start_token: u32,
    /// Token that stands for "one raw byte follows" (never produced by the tokenizer).
    pub escape_token: u32,
    /// Highest token n-gram order (1..=6).
    pub ngram_order: u32,
    /// Confidence skip: the LLM is not consulted when the n-gram's entropy is below this
    /// (milli-bits) in a context seen at least `skip_min_count` times. 0 disables.
    pub skip_entropy_mbits: u32,
    pub skip_min_count: u32,
    /// Shortest repeat (tokens) the match model follows.
    pub match_min: u32,
    /// Learning rate of the adaptive log-space bias over the vocabulary.
    pub bias_lr: f32,
    /// Learning rate of the mixer's weights.
    pub mixer_lr: f32,
    /// Initial mixer weight (log-space) of the LLM against the other components.
    pub mixer_llm_init: f32,
}

impl CoderParams {
    /// Defaults chosen by measurement with `examples/tune.rs` (24 KB of GPL-3, one chunk):
    /// LLM alone 0.8793 bpb; with bias_lr 0.05 and mixer_lr 0.005, 0.8747. The confidence
    /// skip at 1.5 bits cost +4.5% size for 3% of tokens skipped, so it is off.
    pub fn new(n_vocab: u32, start_token: u32, escape_token: u32) -> CoderParams {
        CoderParams {
            ctx_len: DEFAULT_CTX_LEN,
            ctx_keep: 1536,
            cdf_bits: 24,
            n_vocab,
            start_token,
            escape_token,
            ngram_order: 4,
            skip_entropy_mbits: 0,
            skip_min_count: 4,
            match_min: 4,
            bias_lr: 0.05,
            mixer_lr: 0.005,
            mixer_llm_init: 4.0,
        }
    }

    // Stable ids for the header's parameter list (docs/FORMAT.md). Never reuse an id.
    const IDS: [(u16, &'static str); 13] = [
        (1, "ctx_len"),
        (2, "ctx_keep"),
        (3, "cdf_bits"),
        (4, "n_vocab"),
        (5, "start_token"),
        (6, "escape_token"),
        (7, "ngram_order"),
        (8, "skip_entropy_mbits"),
        (9, "skip_min_count"),
        (10, "match_min"),
        (11, "bias_lr"),
        (12, "mixer_lr"),
        (13, "mixer_llm_init"),
    ];

    pub fn to_pairs(&self) -> Vec<(u16, u32)> {
        vec![
            (1, self.ctx_len),
            (2, self.ctx_keep),
            (3, self.cdf_bits),
            (4, self.n_vocab),
            (5, self.start_token),
            (6, self.escape_token),
            (7, self.ngram_order),
            (8, self.skip_entropy_mbits),
            (9, self.skip_min_count),
            (10, self.match_min),
            (11, self.bias_lr.to_bits()),
            (12, self.mixer_lr.to_bits()),
            (13, self.mixer_llm_init.to_bits()),
        ]
    }

    pub fn from_pairs(pairs: &[(u16, u32)]) -> Result<CoderParams, String> {
        let get = |id: u16| -> Result<u32, String> {
            pairs
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, v)| *v)
                .ok_or_else(|| format!("coder parameter {id} missing"))
        };
        if let Some((id, _)) = pairs
            .iter()
            .find(|(id, _)| !Self::IDS.iter().any(|(k, _)| k == id))
        {
            return Err(format!(
                "unknown coder parameter {id}: the blob was made by a newer nacrith"
            ));
        }
        let p = CoderParams {
            ctx_len: get(1)?,
            ctx_keep: get(2)?,
            cdf_bits: get(3)?,
            n_vocab: get(4)?,
            start_token: get(5)?,
            escape_token: get(6)?,
            ngram_order: get(7)?,
            skip_entropy_mbits: get(8)?,
            skip_min_count: get(9)?,
            match_min: get(10)?,
            bias_lr: f32::from_bits(get(11)?),
            mixer_lr: f32::from_bits(get(12)?),
            mixer_llm_init: f32::from_bits(get(13)?),
        };
        p.validate()?;
        Ok(p)
    }

    /// Anything a header or `--param` asks for must lie in these ranges: a blob cannot
    /// make the decoder allocate more than this build would for its own blobs.
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.cdf_bits == 24
            && self.n_vocab >= 256
            && self.n_vocab < (1 << 20)
            && self.start_token < self.n_vocab
            && self.escape_token < self.n_vocab
            && (1..=6).contains(&self.ngram_order)
            && self.ctx_keep >= 16
            && self.ctx_keep < self.ctx_len
            && self.ctx_len <= MAX_CTX_LEN
            && (1..=64).contains(&self.match_min)
            && [self.bias_lr, self.mixer_lr, self.mixer_llm_init]
                .iter()
                .all(|v| v.is_finite() && v.abs() < 100.0);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "coder parameters out of the ranges this build supports (ctx_len up to {MAX_CTX_LEN}, ngram_order 1-6, match_min 1-64, rates finite and under 100): {self}"
            ))
        }
    }

    /// Set one parameter by name (for experiments: `--param name=value`).
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let int = || value.parse::<u32>().map_err(|e| format!("{name}: {e}"));
        let float = || value.parse::<f32>().map_err(|e| format!("{name}: {e}"));
        match name {
            "ngram_order" => self.ngram_order = int()?,
            "skip_entropy_mbits" => self.skip_entropy_mbits = int()?,
            "skip_min_count" => self.skip_min_count = int()?,
            "match_min" => self.match_min = int()?,
            "ctx_len" => self.ctx_len = int()?,
            "ctx_keep" => self.ctx_keep = int()?,
            "bias_lr" => self.bias_lr = float()?,
            "mixer_lr" => self.mixer_lr = float()?,
            "mixer_llm_init" => self.mixer_llm_init = float()?,
            _ => return Err(format!("unknown or fixed parameter {name:?}")),
        }
        self.validate()
    }
}

impl fmt::Display for CoderParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ctx {}/{} cdf 2^{} vocab {} start {} esc {} ngram {} skip {}mb/{} match {} bias_lr {} mixer_lr {} llm_init {}",
            self.ctx_len,
            self.ctx_keep,
            self.cdf_bits,
            self.n_vocab,
            self.start_token,
            self.escape_token,
            self.ngram_order,
            self.skip_entropy_mbits,
            self.skip_min_count,
            self.match_min,
            self.bias_lr,
            self.mixer_lr,
            self.mixer_llm_init
        )
    }
}
