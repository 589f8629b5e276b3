//! Shared helpers for integration tests: the real model, real text.
#![allow(dead_code)]

pub mod mount;

use std::sync::{Mutex, MutexGuard, OnceLock};

use nacrithfs::model::{find_model, ModelRuntime};
use nacrithfs::pool::LocalPool;

/// The installed default model, loaded once per test binary. Fails (never skips) when it
/// is missing, with the reason.
pub fn pool() -> &'static LocalPool {
    static POOL: OnceLock<LocalPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let path =
            find_model(None).unwrap_or_else(|e| panic!("these tests need the real model: {e}"));
        let runtime = ModelRuntime::load(&path)
            .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
        LocalPool::new(runtime, 2, 16)
    })
}

/// LLM tests share two cores: run them one at a time so each gets the whole machine.
pub fn llm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// English prose: the GPL-3 text that every Debian system ships (package base-files).
pub fn english(len: usize) -> Vec<u8> {
    let path = "/usr/share/common-licenses/GPL-3";
    let text = std::fs::read(path).unwrap_or_else(|e| {
        panic!("English test text {path} is missing ({e}); install Debian's base-files")
    });
    assert!(text.len() >= len, "{path} is shorter than {len} bytes");
    let mut cut = len;
    while cut < text.len() && (text[cut] & 0xC0) == 0x80 {
        cut += 1;
    }
    text[..cut].to_vec()
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// Deterministic pseudo-random bytes (xorshift), no extra crates.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A copy of the real model in `dir`, for a test that takes it away from a mount
/// (`-o model=` the copy); panics saying the test needs the model.
pub fn model_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let real = find_model(None).unwrap_or_else(|e| panic!("this test needs the real model: {e}"));
    let model = dir.join("model.gguf");
    std::fs::copy(&real, &model).expect("copy model");
    model
}
