//! Hostile input to the NC06 decoder: it must return an error, never panic, and never
//! allocate by what a header claims. Run: `scripts/fuzz` (cargo fuzz run nc06_decode).
//!
//! Every input is decoded twice: as it is without a model (header, zstd and stored
//! segments), and with a stand-in model whose identity is written into the header, so
//! the LLM path (chunk table, range decoder, predictor mixing, tokenizer output) is
//! reached too. The stand-in gives flat logits: the real model's logits would cost
//! ~10 ms a symbol, and the decoder's code path does not depend on their values. The
//! real tokenizer and vocabulary are used (from the installed GGUF).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nacrithfs::codec::container::Header;
use nacrithfs::codec::lanes::{run_lanes, ChunkJob, ChunkOutput, JobSource, Taken};
use nacrithfs::codec::params::CoderParams;
use nacrithfs::codec::tokenizer::TextTokenizer;
use nacrithfs::codec::{decompress, DecompressOptions, Engine};
use nacrithfs::model::{find_model, Feed, LanguageModel, ModelError, ModelRuntime};

struct FlatModel {
    lanes: usize,
    logits: Vec<f32>,
}

impl LanguageModel for FlatModel {
    fn n_vocab(&self) -> usize {
        self.logits.len()
    }
    fn n_lanes(&self) -> usize {
        self.lanes
    }
    fn reset_lane(&mut self, _lane: usize) -> Result<(), ModelError> {
        Ok(())
    }
    fn step(&mut self, _feeds: &[Feed]) -> Result<(), ModelError> {
        Ok(())
    }
    fn logits(&self, _feed_index: usize) -> &[f32] {
        &self.logits
    }
}

struct Jobs {
    jobs: std::vec::IntoIter<(usize, ChunkJob)>,
    out: Vec<Option<ChunkOutput>>,
}

impl JobSource for Jobs {
    fn next(&mut self, _block: bool, _background_ok: bool) -> Option<Taken> {
        self.jobs.next().map(|(id, job)| Taken::background(id, job))
    }
    fn finished(&mut self, id: usize, output: ChunkOutput) {
        self.out[id] = Some(output);
    }
}

struct FuzzEngine {
    rt: ModelRuntime,
}

impl Engine for FuzzEngine {
    fn tokenizer(&self) -> &TextTokenizer {
        &self.rt.tokenizer
    }
    fn fingerprint(&self) -> [u8; 32] {
        [0xfu8; 32]
    }
    fn backend_tag(&self) -> &str {
        "fuzz"
    }
    fn default_params(&self) -> CoderParams {
        self.rt.default_params()
    }
    fn run(
        &self,
        params: &CoderParams,
        jobs: Vec<ChunkJob>,
        _progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<ChunkOutput>, ModelError> {
        let n = jobs.len();
        let mut lm = FlatModel {
            lanes: 4,
            logits: vec![0.0; self.rt.n_vocab()],
        };
        let mut src = Jobs {
            jobs: jobs.into_iter().enumerate().collect::<Vec<_>>().into_iter(),
            out: (0..n).map(|_| None).collect(),
        };
        run_lanes(&mut lm, params, &self.rt.allowed, 4, &mut src)?;
        src.out
            .into_iter()
            .map(|o| o.ok_or_else(|| ModelError::Runtime("lost".into())))
            .collect()
    }
}

fn engine() -> &'static FuzzEngine {
    static E: OnceLock<FuzzEngine> = OnceLock::new();
    E.get_or_init(|| {
        let path = find_model(None).expect("the fuzz target needs the installed model's vocabulary");
        FuzzEngine {
            rt: ModelRuntime::load(&path).expect("load model"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    // A zero segment may claim any length at no cost in the blob: decoding into memory
    // is capped (the daemon and the CLI stream to files instead).
    let opts = DecompressOptions {
        max_len: Some(64 << 20),
        ..DecompressOptions::default()
    };
    let _ = decompress(data, None, &opts, &|_| {});
    // Re-stamp a parseable header with the stand-in's identity to reach the LLM path.
    if let Ok((mut h, len)) = Header::parse(data, Some(data.len() as u64)) {
        if h.has_llm_segments() {
            let e = engine();
            h.model_fingerprint = e.fingerprint();
            h.backend_tag = e.backend_tag().to_string();
            let mut blob = h.to_bytes();
            blob.extend_from_slice(&data[len..]);
            let _ = decompress(&blob, Some(e), &opts, &|_| {});
        }
    }
});
