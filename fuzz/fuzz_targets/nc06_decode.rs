//! Hostile input to the NC06 decoder: it must return an error, never panic, and never
//! allocate by what a header claims. Run: `scripts/fuzz` (cargo fuzz run nc06_decode).
//! The property is `nacrithfs::fuzzing::nc06_decode`: every input is decoded without a
//! model, and with a stand-in model (the real tokenizer, flat logits) whose identity is
//! stamped into the header, so the LLM path is reached too.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nacrithfs::fuzzing::{nc06_decode, FlatEngine};

fn engine() -> &'static FlatEngine {
    static E: OnceLock<FlatEngine> = OnceLock::new();
    E.get_or_init(|| {
        FlatEngine::load()
            .unwrap_or_else(|e| panic!("the fuzz target needs the installed model's vocabulary: {e}"))
    })
}

fuzz_target!(|data: &[u8]| nc06_decode(data, engine()));
