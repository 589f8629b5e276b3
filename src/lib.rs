//! nacrithfs: a FUSE transparent compressed filesystem for cold storage of text, and the
//! Nacrith coder (an LLM-driven arithmetic coder) behind it.
//!
//! * [`codec`]: bytes ⇄ NC06 blobs (pure; reaches the model only through a trait)
//! * [`model`]: the language model (llama.cpp), model discovery and identity
//! * [`pool`]: workers, one single-threaded model context each, many lanes per context
//! * [`store`]: the backing directory: sled index, blob files, plaintext cache
//! * [`fs`]: the filesystem engine and its FUSE adapter
//! * [`blobfile`]: a blob file written durably and checked by decoding it
//! * [`recode`]: `nacrithfs recode`, a volume's blobs moved to the backend at hand
//! * [`admin`]: the client side of `nacrithfs flush|evict|status|metrics`
//! * [`crash`]: named crash points for the crash-consistency harness
//! * [`selfcheck`]: `nacrith gpu-check`, a device's invariance and speed in one run

pub mod admin;
pub mod blobfile;
pub mod codec;
pub mod crash;
pub mod fs;
pub mod fuzzing;
pub mod model;
pub mod pool;
pub mod recode;
pub mod selfcheck;
pub mod store;
