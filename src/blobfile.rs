//! A blob file written and checked: the payload spooled to an unnamed file, then the
//! header and payload into the blob's temp file, fsynced; and the check that a blob on
//! disk decodes back to its plaintext. Shared by the compressors of a mount
//! (`fs/background.rs`) and `nacrithfs recode`; each adds its own crash points and
//! counters around these.

use std::io::{Seek, Write};
use std::path::Path;

use crate::codec::source::{FileSource, Source};
use crate::codec::{self, CodecError, CompressOptions, DecompressOptions, Engine};

/// An unnamed file in `dir` for the payload while its header is still unknown: nothing
/// is left behind by a crash. Where O_TMPFILE is not supported, a `.tmp` name (which
/// recovery removes) is unlinked at once.
pub fn spool_file(dir: &std::path::Path, ino: u64) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let anon = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match anon {
        Ok(f) => Ok(f),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)
            ) =>
        {
            let path = dir.join(format!("{ino}-spool.tmp"));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

/// Checks decoded bytes against the plaintext they came from, in file order.
struct CompareSink<'a> {
    src: &'a dyn Source,
    at: u64,
    buf: Vec<u8>,
}

impl CompareSink<'_> {
    fn check(
        &mut self,
        n: usize,
        expect: impl Fn(&[u8], &[u8]) -> bool,
        got: &[u8],
    ) -> std::io::Result<()> {
        self.buf.resize(n, 0);
        self.src.read_exact_at(&mut self.buf, self.at)?;
        if !expect(&self.buf, got) {
            return Err(std::io::Error::other(format!(
                "decodes to other bytes than the plaintext near offset {}",
                self.at
            )));
        }
        self.at += n as u64;
        Ok(())
    }
}

impl codec::Sink for CompareSink<'_> {
    fn bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.check(bytes.len(), |a, b| a == b, bytes)
    }
    fn zeros(&mut self, mut n: u64) -> std::io::Result<()> {
        while n > 0 {
            let k = n.min(1 << 20) as usize;
            self.check(k, |a, _| a.iter().all(|&b| b == 0), &[])?;
            n -= k as u64;
        }
        Ok(())
    }
}

/// Code `src` (with the model, or zstd alone when `engine` is None) into `tmp`: the
/// payload spools in `spool_dir` (same filesystem), then the header and payload go to
/// `tmp`, which is fsynced. Returns the blob's length.
pub fn write_tmp(
    spool_dir: &Path,
    ino: u64,
    src: &dyn Source,
    engine: Option<&dyn Engine>,
    opts: &CompressOptions,
    count: &(dyn Fn(usize) + Sync),
    tmp: &Path,
) -> Result<u64, CodecError> {
    let mut spool = spool_file(spool_dir, ino)?;
    let header = {
        let mut w = std::io::BufWriter::new(&mut spool);
        let h = codec::compress_to(src, engine, opts, count, &mut w)?;
        w.flush()?;
        h
    };
    let payload_len = spool.stream_position()?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(tmp)?);
    let len = match codec::whole_zstd_if_smaller(src, &header, payload_len, opts)? {
        Some((whole, payload)) => {
            let h = whole.to_bytes();
            out.write_all(&h)?;
            out.write_all(&payload)?;
            (h.len() + payload.len()) as u64
        }
        None => {
            let h = header.to_bytes();
            out.write_all(&h)?;
            spool.rewind()?;
            std::io::copy(&mut spool, &mut out)?;
            h.len() as u64 + payload_len
        }
    };
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(len)
}

/// Decode the blob at `path` and compare it with `src` byte for byte.
pub fn verify(
    path: &Path,
    src: &dyn Source,
    engine: Option<&dyn Engine>,
    count: &(dyn Fn(usize) + Sync),
) -> Result<(), CodecError> {
    let blob = FileSource::open(path)?;
    let mut sink = CompareSink {
        src,
        at: 0,
        buf: Vec::new(),
    };
    codec::decode_to(
        &blob,
        engine,
        &DecompressOptions::default(),
        count,
        &mut sink,
    )?;
    if sink.at != src.len() {
        return Err(CodecError::Corrupt(
            "decodes to fewer bytes than the plaintext".into(),
        ));
    }
    Ok(())
}

/// BLAKE3 of a whole source (a blob header's checksum), streamed.
pub fn blake3_of(src: &dyn Source) -> std::io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < src.len() {
        let n = (src.len() - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(*hasher.finalize().as_bytes())
}
