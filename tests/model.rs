//! Model discovery and refusal, without running the model.

use std::io::Write;

use nacrithfs::model::{discovery, find_model, ModelError, ModelRuntime};

#[test]
fn no_model_anywhere_names_the_setup_command() {
    let err = discovery::find_in(&["/nonexistent/a.gguf".into(), "/nonexistent/b.gguf".into()])
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("scripts/setup"), "{msg}");
    assert!(msg.contains("--model"), "{msg}");
    assert!(msg.contains("/nonexistent/a.gguf"), "{msg}");
}

#[test]
fn explicit_missing_model() {
    let err = find_model(Some(std::path::Path::new("/nonexistent/m.gguf"))).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

fn gguf_with(file_type: u32) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("tmp");
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&2u64.to_le_bytes()); // kv pairs
    let key = |b: &mut Vec<u8>, k: &str| {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
    };
    key(&mut b, "general.file_type");
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&file_type.to_le_bytes());
    key(&mut b, "tokenizer.ggml.model");
    b.extend_from_slice(&8u32.to_le_bytes());
    key(&mut b, "gpt2");
    f.write_all(&b).expect("write");
    f
}

#[test]
fn unquantized_models_are_refused_with_the_reason() {
    for (ft, name) in [(0, "F32"), (1, "F16")] {
        let f = gguf_with(ft);
        let err = ModelRuntime::load(f.path()).err().expect("must refuse");
        assert!(matches!(err, ModelError::Refused { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains("quantized"), "{msg}");
    }
}

#[test]
fn not_a_gguf_file() {
    let mut f = tempfile::NamedTempFile::new().expect("tmp");
    f.write_all(b"this is not a model").expect("write");
    let err = ModelRuntime::load(f.path()).err().expect("must fail");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
}
