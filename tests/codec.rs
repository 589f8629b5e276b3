//! The coder on the real model: lossless on every kind of input, compresses English,
//! refuses corrupt or foreign blobs with a clear error.

mod common;

use common::{english, fixture, llm_lock, pool, random_bytes};
use nacrithfs::codec::container::{Header, SegmentKind};
use nacrithfs::codec::{self, CodecError, CompressOptions, DecompressOptions, Engine};

fn engine() -> &'static dyn Engine {
    pool()
}

fn compress(data: &[u8]) -> Vec<u8> {
    codec::compress(data, Some(engine()), &CompressOptions::default(), &|_| {}).expect("compress")
}

fn decompress(blob: &[u8]) -> Result<Vec<u8>, CodecError> {
    codec::decompress(blob, Some(engine()), &DecompressOptions::default(), &|_| {})
}

/// Round-trip and return the blob's header for further checks.
fn roundtrip(name: &str, data: &[u8]) -> Header {
    let blob = compress(data);
    let back = decompress(&blob).unwrap_or_else(|e| panic!("{name}: decompress failed: {e}"));
    assert!(back == data, "{name}: round-trip differs");
    let (header, _) = Header::parse(&blob, Some(blob.len() as u64)).expect("header");
    let kinds: Vec<_> = header.segments.iter().map(|s| s.kind.name()).collect();
    println!(
        "{name:<28} {:>8} -> {:>8} bytes  segments {kinds:?}",
        data.len(),
        blob.len()
    );
    header
}

fn kinds(h: &Header) -> Vec<SegmentKind> {
    h.segments.iter().map(|s| s.kind).collect()
}

#[test]
fn empty_file() {
    let _g = llm_lock();
    let h = roundtrip("empty", b"");
    assert!(h.segments.is_empty());
}

#[test]
fn every_byte_value() {
    let _g = llm_lock();
    let data: Vec<u8> = (0..=255u8).cycle().take(256 * 4).collect();
    roundtrip("every byte value x4", &data);
}

#[test]
fn bytes_missing_from_the_vocabulary_inside_text() {
    let _g = llm_lock();
    // SmolLM2 has no token for these; they must be escaped, not dropped.
    let missing = [
        0x04u8, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5, 0xFF,
    ];
    let mut data = english(1500);
    for (i, b) in missing.iter().enumerate() {
        data.extend_from_slice(format!("byte {i}: ").as_bytes());
        data.push(*b);
        data.push(b' ');
    }
    data.extend_from_slice(&english(3000)[1500..]);
    let tok = engine().tokenizer();
    let symbols = tok.encode(&data);
    let escaped: Vec<u8> = symbols
        .iter()
        .filter_map(|s| match s {
            nacrithfs::codec::tokenizer::Symbol::Escaped(b) => Some(*b),
            _ => None,
        })
        .collect();
    assert_eq!(escaped, missing, "exactly the missing bytes are escaped");
    let h = roundtrip("missing vocabulary bytes", &data);
    assert_eq!(
        kinds(&h),
        vec![SegmentKind::Llm],
        "stray bytes should be escaped inside the text segment"
    );
}

#[test]
fn invalid_utf8() {
    let _g = llm_lock();
    let mut data = b"Caf\xe9 au lait, na\xefve r\xe9sum\xe9 (Latin-1, not UTF-8). ".repeat(8);
    data.extend_from_slice(
        b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc truncated: \xe2\x82",
    );
    roundtrip("invalid utf-8", &data);
}

#[test]
fn special_token_text_is_plain_text() {
    let _g = llm_lock();
    let mut data = english(1500);
    data.extend_from_slice(b"The model marks documents with <|endoftext|> and chats with <|im_start|>user ... <|im_end|>. Literal text, not tokens.\n<|endoftext|><|endoftext|>\n");
    let tok = engine().tokenizer();
    let symbols = tok.encode(&data);
    assert!(
        symbols
            .iter()
            .all(|s| *s != nacrithfs::codec::tokenizer::Symbol::Token(tok.escape_token())),
        "literal <|endoftext|> must not become the special token"
    );
    let h = roundtrip("<|endoftext|> literal", &data);
    assert_eq!(kinds(&h), vec![SegmentKind::Llm]);
}

#[test]
fn crlf_text() {
    let _g = llm_lock();
    let text = String::from_utf8(english(1500)).expect("utf-8");
    let crlf = text.replace('\n', "\r\n");
    let h = roundtrip("CRLF text", crlf.as_bytes());
    assert_eq!(kinds(&h), vec![SegmentKind::Llm]);
}

#[test]
fn five_thousand_spaces() {
    let _g = llm_lock();
    let mut data = b"Before the gap.".to_vec();
    data.extend(std::iter::repeat_n(b' ', 5000));
    data.extend_from_slice(b"After the gap.\n");
    data.extend(std::iter::repeat_n(b'\t', 300));
    data.extend(std::iter::repeat_n(b'\n', 300));
    roundtrip("5000 spaces", &data);
}

#[test]
fn cjk_and_emoji() {
    let _g = llm_lock();
    let data = "漢字とひらがなとカタカナ。中文文本压缩测试。한국어 텍스트. Emoji: 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇫🇷🇯🇵, math 𝔸𝔹ℂ, old italic 𐌀𐌁.\n".repeat(6);
    roundtrip("CJK and emoji", data.as_bytes());
}

#[test]
fn jpeg_and_pdf() {
    let _g = llm_lock();
    let jpeg = fixture("sample.jpg");
    let h = roundtrip("JPEG", &jpeg);
    assert!(!h.has_llm_segments() || h.segments.len() > 1);
    let pdf = fixture("sample.pdf");
    roundtrip("PDF", &pdf);
}

#[test]
fn one_megabyte_of_random_bytes() {
    let _g = llm_lock();
    let data = random_bytes(1 << 20, 42);
    let blob = compress(&data);
    // Incompressible: stored, within a small header of the input, and no model needed.
    assert!(
        blob.len() < data.len() + 200,
        "blob {} for {} random bytes",
        blob.len(),
        data.len()
    );
    let back = codec::decompress(&blob, None, &DecompressOptions::default(), &|_| {})
        .expect("decompress without model");
    assert!(back == data);
}

#[test]
fn english_prose_compresses_well_under_1_5_bits_per_byte() {
    let _g = llm_lock();
    let data = english(20_000);
    let blob = compress(&data);
    let back = decompress(&blob).expect("decompress");
    assert!(back == data, "round-trip differs");
    let bpb = blob.len() as f64 * 8.0 / data.len() as f64;
    let xz = {
        let mut child = std::process::Command::new("xz")
            .args(["-9e", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("xz (installed by scripts/setup)");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&data)
            .expect("write");
        child.wait_with_output().expect("xz output").stdout.len()
    };
    println!(
        "20 KB English: nacrith {} bytes = {bpb:.3} bpb; xz -9e {} bytes = {:.3} bpb",
        blob.len(),
        xz,
        xz as f64 * 8.0 / data.len() as f64
    );
    assert!(bpb < 1.5, "{bpb:.3} bits per byte");
    assert!(
        blob.len() < xz,
        "nacrith should beat xz -9e on English prose"
    );
}

#[test]
fn corrupting_any_sampled_byte_fails_cleanly() {
    let _g = llm_lock();
    let data = english(600);
    let blob = compress(&data);
    let (header, header_len) = Header::parse(&blob, Some(blob.len() as u64)).expect("header");
    assert!(header.has_llm_segments());
    // Every header byte, and a spread of payload bytes (each of those costs a decode).
    let mut positions: Vec<usize> = (0..header_len).collect();
    positions.extend((header_len..blob.len()).step_by(((blob.len() - header_len) / 12).max(1)));
    positions.push(blob.len() - 1);
    for pos in positions {
        let mut bad = blob.clone();
        bad[pos] ^= 0x5A;
        match decompress(&bad) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(out) => panic!(
                "corruption at byte {pos} decoded to {} bytes without an error",
                out.len()
            ),
        }
    }
    // Truncation anywhere is an error too.
    for cut in [0, 3, header_len - 1, header_len, blob.len() - 1] {
        assert!(
            decompress(&blob[..cut]).is_err(),
            "truncated at {cut} accepted"
        );
    }
}

#[test]
fn blob_from_another_model_or_backend_says_so() {
    let _g = llm_lock();
    let data = english(1500);
    let blob = compress(&data);
    let (header, header_len) = Header::parse(&blob, Some(blob.len() as u64)).expect("header");
    assert!(
        header.has_llm_segments(),
        "input too small: the blob fell back to zstd"
    );
    let payload = &blob[header_len..];

    let mut other_model = header.clone();
    other_model.model_fingerprint[0] ^= 1;
    let mut b = other_model.to_bytes();
    b.extend_from_slice(payload);
    let err = decompress(&b).expect_err("another model's blob must be refused");
    assert!(matches!(err, CodecError::ModelMismatch { .. }), "{err}");
    assert!(err.to_string().contains("--model"), "{err}");

    let mut other_backend = header.clone();
    other_backend.backend_tag =
        "llama-cpp-sys-2 0.1.160; cpu x86-64-v4; weights Q4_1; threads 1; attention plain".into();
    let mut b = other_backend.to_bytes();
    b.extend_from_slice(payload);
    let err = decompress(&b).expect_err("another backend's blob must be refused");
    assert!(matches!(err, CodecError::BackendMismatch { .. }), "{err}");
    // Forcing it on this same machine decodes (the logits are in fact ours).
    let forced = codec::decompress(
        &b,
        Some(engine()),
        &DecompressOptions {
            force_backend: true,
            ..DecompressOptions::default()
        },
        &|_| {},
    )
    .expect("forced decode");
    assert!(forced == data);
}

#[test]
fn tokenizer_matches_llama_cpp_on_real_text() {
    let runtime = &pool().runtime;
    let mut samples: Vec<String> = vec![
        String::from_utf8(english(8000)).expect("utf-8"),
        "Numbers 1234567 and 3.14159, dates 2026-11-24, code fn main() { println!(\"hi\"); }"
            .into(),
        "Mixed    spacing\t\ttabs\n\n\nnewlines   and trailing spaces   \n".into(),
        "Ünïcödé, 漢字, emoji 😀, Ελληνικά, русский текст.".into(),
    ];
    samples.push(samples[0].replace('\n', "\r\n"));
    for s in &samples {
        let ours = runtime.tokenizer.bpe_ids(s).expect("tokenize");
        let theirs = runtime.llama_tokenize(s);
        assert_eq!(
            ours.len(),
            theirs.len(),
            "token counts differ on {:?}...",
            &s[..s.len().min(40)]
        );
        assert_eq!(ours, theirs);
        // And the symbols reproduce the text exactly.
        let mut back = Vec::new();
        for sym in runtime.tokenizer.encode(s.as_bytes()) {
            assert!(runtime.tokenizer.decode_into(sym, &mut back));
        }
        assert_eq!(back, s.as_bytes());
    }
}

/// A file longer than one window is coded window by window (here 4 KiB windows, so the
/// streaming path runs on a small text): text in every window goes through the model,
/// the zero run between is a zero segment, and it decodes into memory and, streamed,
/// into a file with a hole, byte-exact.
#[test]
fn text_across_windows_and_a_hole_streams_through_the_model() {
    let _g = llm_lock();
    let text = english(5_000);
    let mut data = text[..4_500].to_vec();
    data.resize(4_500 + 80_000, 0);
    data.extend_from_slice(&text[4_500..]);
    let opts = CompressOptions {
        window: 4096,
        chunk_size: 1024,
        head_chunk: 0,
        ..CompressOptions::default()
    };
    let blob = codec::compress(&data, Some(engine()), &opts, &|_| {}).expect("compress");
    let (header, _) = Header::parse(&blob, Some(blob.len() as u64)).expect("header");
    let k = kinds(&header);
    let llm = k.iter().filter(|&&k| k == SegmentKind::Llm).count();
    assert!(
        llm >= 2,
        "text across a window boundary goes to the model: {k:?}"
    );
    assert_eq!(
        k.iter().filter(|&&k| k == SegmentKind::Zero).count(),
        1,
        "one zero segment across windows: {k:?}"
    );
    // Under 3 bits a byte, the headers of every window's segments included.
    assert!(blob.len() < text.len() * 3 / 8, "{} bytes", blob.len());
    assert!(decompress(&blob).expect("decompress") == data);
    let f = tempfile::tempfile().expect("tempfile");
    let mut sink = codec::FileSink::new(&f);
    let opts = DecompressOptions::default();
    codec::decode_to(&&blob[..], Some(engine()), &opts, &|_| {}, &mut sink).expect("decode_to");
    sink.finish().expect("finish");
    let mut back = vec![0u8; data.len()];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).expect("read");
    assert!(back == data);
    let blocks = std::os::unix::fs::MetadataExt::blocks(&f.metadata().expect("stat"));
    assert!(
        blocks * 512 < 60_000,
        "the zero run is a hole: {blocks} blocks"
    );
}
