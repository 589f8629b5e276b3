//! The language model behind a small trait: batched next-token logits for k independent
//! streams ("lanes") advanced in lockstep. A decoding lane takes one token per step; an
//! encoding lane, whose tokens are all known, may take a run of several (prefill).

pub mod discovery;
pub mod gguf;
pub mod invariance;
pub mod llama;

pub use discovery::{find_model, DEFAULT_MODEL_FILE};
pub use llama::ModelRuntime;

/// One token fed to one lane in a lockstep step.
#[derive(Debug, Clone, Copy)]
pub struct Feed {
    pub lane: usize,
    pub token: u32,
    pub want_logits: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    NotFound(String),
    #[error("model {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("model {path} is refused: {msg}")]
    Refused { path: String, msg: String },
    #[error("llama.cpp: {0}")]
    Runtime(String),
}

/// k lanes over one model context. A lane's KV cache slides by itself when full (the
/// same way on every run, so encoder and decoder see identical logits).
pub trait LanguageModel {
    fn n_vocab(&self) -> usize;
    fn n_lanes(&self) -> usize;
    /// Forget a lane's context; its next token goes at position 0.
    fn reset_lane(&mut self, lane: usize) -> Result<(), ModelError>;
    /// Feed the listed tokens, all in one batch. A lane may appear several times: its
    /// tokens go at consecutive positions in the order listed, at most
    /// [`run_room`](Self::run_room) of them, and the step holds at most
    /// [`step_capacity`](Self::step_capacity) feeds. The logits of each token are the
    /// bit-identical logits of feeding it alone.
    fn step(&mut self, feeds: &[Feed]) -> Result<(), ModelError>;
    /// Most feeds one step takes.
    fn step_capacity(&self) -> usize {
        self.n_lanes()
    }
    /// Host threads the coder may spread the lanes' ensemble work over after a step
    /// (1: the calling thread does it all, as on CPU where every core runs a context).
    fn host_threads(&self) -> usize {
        1
    }
    /// Most tokens the lane may take in its next step: its context slides only between
    /// steps, at the position one-token steps would slide it.
    fn run_room(&self, _lane: usize) -> usize {
        1
    }
    /// Logits after the `feed_index`-th feed of the last step (which wanted logits).
    fn logits(&self, feed_index: usize) -> &[f32];
}
