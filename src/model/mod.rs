//! The language model behind a small trait: batched next-token logits for k independent
//! streams ("lanes") advanced in lockstep, one token per lane per step.

pub mod discovery;
pub mod gguf;
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
    /// Feed one token to each listed lane, all in one batch.
    fn step(&mut self, feeds: &[Feed]) -> Result<(), ModelError>;
    /// Logits after the `feed_index`-th feed of the last step (which wanted logits).
    fn logits(&self, feed_index: usize) -> &[f32];
}
