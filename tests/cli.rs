//! The `nacrith` binary as a user runs it: files and pipes, info, and one-line errors
//! with a non-zero exit for corrupt, truncated, foreign blobs and a missing model.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{english, llm_lock};

fn nacrith(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nacrith"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nacrith");
    if let Some(data) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(data)
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure, got success");
    let err = stderr(o);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error should be one line: {err:?}"
    );
    assert!(err.starts_with("nacrith: error: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(!err.contains("panicked"), "{err:?}");
}

#[test]
fn compress_info_decompress_through_files_and_pipes() {
    let _g = llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.txt");
    let data = english(1200);
    std::fs::write(&input, &data).expect("write");
    let blob = dir.path().join("in.nc06");

    let o = nacrith(
        &[
            "compress",
            input.to_str().unwrap(),
            "-o",
            blob.to_str().unwrap(),
            "--threads",
            "1",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("bits/byte"), "{}", stderr(&o));

    let o = nacrith(&["info", blob.to_str().unwrap(), "--chunks"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let info = String::from_utf8_lossy(&o.stdout);
    for field in [
        "NC06",
        "original      1200 bytes",
        "bits/byte",
        "backend",
        "cpu x86-64",
        "llm",
        "chunk 0",
    ] {
        assert!(info.contains(field), "info lacks {field:?}:\n{info}");
    }

    // stdin -> stdout both ways.
    let o = nacrith(
        &["decompress", "-", "-o", "-"],
        Some(&std::fs::read(&blob).unwrap()),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout == data);
    let o = nacrith(&["compress", "-", "-o", "-"], Some(&data));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        o.stdout,
        std::fs::read(&blob).unwrap(),
        "same input, same blob"
    );
}

#[test]
fn corrupt_truncated_and_foreign_blobs_fail_with_one_line() {
    let _g = llm_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, english(400)).expect("write");
    let blob_path = dir.path().join("in.nc06");
    let o = nacrith(
        &[
            "compress",
            input.to_str().unwrap(),
            "-o",
            blob_path.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let blob = std::fs::read(&blob_path).unwrap();
    let out = dir.path().join("out.txt");
    let out_s = out.to_str().unwrap();

    // One byte flipped in the payload.
    let mut bad = blob.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x10;
    let o = nacrith(&["decompress", "-", "-o", out_s], Some(&bad));
    assert_one_line_error(&o, "corrupt");
    assert!(
        !out.exists(),
        "no output file may be left after a failed decode"
    );

    // One byte flipped in the header.
    let mut bad = blob.clone();
    bad[30] ^= 0x01;
    assert_one_line_error(
        &nacrith(&["decompress", "-", "-o", out_s], Some(&bad)),
        "header checksum",
    );
    assert_one_line_error(&nacrith(&["info", "-"], Some(&bad)), "header checksum");

    // Truncated.
    assert_one_line_error(
        &nacrith(
            &["decompress", "-", "-o", out_s],
            Some(&blob[..blob.len() - 5]),
        ),
        "truncated",
    );

    // Foreign.
    assert_one_line_error(
        &nacrith(
            &["decompress", "-", "-o", out_s],
            Some(b"\x1f\x8b\x08\x00 a gzip file"),
        ),
        "not an NC06 blob",
    );
    assert_one_line_error(&nacrith(&["info", "-"], Some(b"")), "truncated");

    // A zero run claiming more bytes than any file holds: refused at once (it used to
    // be hashed, zero by zero, before the output's length was ever set).
    use nacrithfs::codec::container::{Header, Segment, SegmentKind};
    let huge = Header {
        original_len: u64::MAX,
        checksum: [0; 32],
        model_fingerprint: [0; 32],
        backend_tag: String::new(),
        params: vec![],
        segments: vec![Segment {
            kind: SegmentKind::Zero,
            original_len: u64::MAX,
            stored_len: 0,
            crc: 0,
            chunks: vec![],
        }],
    }
    .to_bytes();
    assert_one_line_error(
        &nacrith(&["decompress", "-", "-o", out_s], Some(&huge)),
        "bytes, which",
    );
    assert!(!out.exists(), "no output file after a refused blob");
}

#[test]
fn missing_model_is_a_clear_error() {
    let o = nacrith(
        &[
            "compress",
            "-",
            "-o",
            "-",
            "--model",
            "/nonexistent/model.gguf",
        ],
        Some(b"text"),
    );
    assert_one_line_error(&o, "/nonexistent/model.gguf does not exist");
}
