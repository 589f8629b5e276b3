//! Every input kept in tests/fuzz-corpus/ (the seeds and what the fuzz runs found,
//! minimized by `scripts/fuzz`) replayed through the properties the fuzz targets check
//! (src/fuzzing.rs), so a finding stays fixed without libFuzzer.

use std::path::{Path, PathBuf};

use nacrithfs::fuzzing;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the kept corpus {} is missing: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

/// Run `check` on every input of `target`; name every input that panics.
fn replay(target: &str, check: impl Fn(&[u8])) {
    let inputs = corpus(target);
    let mut failed = Vec::new();
    for (path, data) in &inputs {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(data)));
        if r.is_err() {
            failed.push(path.display().to_string());
        }
    }
    println!("{target}: {} inputs replayed", inputs.len());
    assert!(failed.is_empty(), "{target}: these inputs fail: {failed:?}");
}

#[test]
fn header_plan_corpus() {
    replay("header_plan", fuzzing::header_plan);
}

#[test]
fn index_records_corpus() {
    replay("index_records", fuzzing::index_records);
}

#[test]
fn nc06_decode_corpus() {
    let engine = fuzzing::FlatEngine::load()
        .unwrap_or_else(|e| panic!("replaying nc06_decode needs the installed model: {e}"));
    replay("nc06_decode", |d| fuzzing::nc06_decode(d, &engine));
}

#[test]
fn fsck_mutated_corpus() {
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
    let scratch = tempfile::tempdir().expect("tempdir");
    replay("fsck_mutated", |d| {
        fuzzing::fsck_mutated(d, &template, scratch.path())
    });
}
