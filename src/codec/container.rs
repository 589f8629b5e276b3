//! The NC06 container: header, segment table, chunk tables, payload. docs/FORMAT.md
//! documents it byte by byte; keep the two in step.

use super::params::CoderParams;
use super::source::Source;

pub const MAGIC: &[u8; 4] = b"NC06";
pub const VERSION: u16 = 1;
/// Bytes before the backend tag.
const FIXED: usize = 4 + 2 + 2 + 4 + 8 + 32 + 32;
/// The largest LLM chunk this build decodes (the encoder's chunk size is capped at it): a
/// chunk is decoded in memory, so this bounds what one hostile chunk entry can cost.
pub const MAX_CHUNK: u32 = 1 << 24;
/// A bound on one LLM symbol's coded bytes, twice the most it can cost: a token of the
/// floor frequency (1 of 2^24) in a range of over 2^30 narrows it to at least 63, about
/// 26 bits of output, and an escaped byte adds at most 10. A chunk claiming more (plus
/// the coder's final bits) is corrupt, so what a chunk entry makes a reader allocate is
/// bounded by what it decodes.
const MAX_STORED_PER_SYMBOL: u64 = 8;
/// The largest header this build reads: 16 bytes per chunk of at least 1 KiB, so room
/// for the chunk table of a file of over 16 TiB, and a bound on what a hostile header
/// length makes a reader allocate.
pub const MAX_HEADER: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    Stored = 0,
    Zstd = 1,
    Llm = 2,
    /// A run of zero bytes: no payload at all (the file's holes, and long zero runs).
    Zero = 3,
}

impl SegmentKind {
    pub fn name(self) -> &'static str {
        match self {
            SegmentKind::Stored => "stored",
            SegmentKind::Zstd => "zstd",
            SegmentKind::Llm => "llm",
            SegmentKind::Zero => "zero",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEntry {
    pub original_len: u32,
    pub n_symbols: u32,
    pub stored_len: u32,
    pub crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub kind: SegmentKind,
    pub original_len: u64,
    pub stored_len: u64,
    pub crc: u32,
    pub chunks: Vec<ChunkEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub original_len: u64,
    pub checksum: [u8; 32],
    pub model_fingerprint: [u8; 32],
    pub backend_tag: String,
    pub params: Vec<(u16, u32)>,
    pub segments: Vec<Segment>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not an NC06 blob (it starts with {0:02x?}, expected \"NC06\")")]
    NotNc06([u8; 4]),
    #[error("blob is truncated: {0}")]
    Truncated(String),
    #[error("blob header is corrupt: {0}")]
    Corrupt(String),
    #[error("blob format version {0} is newer than this nacrith understands (version {VERSION})")]
    NewerVersion(u16),
}

fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(msg.into())
}

impl Header {
    pub fn has_llm_segments(&self) -> bool {
        self.segments.iter().any(|s| s.kind == SegmentKind::Llm)
    }

    pub fn coder_params(&self) -> Result<CoderParams, FormatError> {
        CoderParams::from_pairs(&self.params).map_err(FormatError::Corrupt)
    }

    /// lseek's SEEK_DATA (`data`) or SEEK_HOLE from `offset` of the original: zero
    /// segments are its holes (and its end is one). None: no data at or after `offset`.
    pub fn seek(&self, offset: u64, data: bool) -> Option<u64> {
        let mut start = 0u64;
        for s in &self.segments {
            let end = start.saturating_add(s.original_len);
            if end > offset && (s.kind == SegmentKind::Zero) != data {
                return Some(start.max(offset));
            }
            start = end;
        }
        (!data).then_some(self.original_len.max(offset))
    }

    pub fn stored_payload_len(&self) -> u64 {
        // `parse` refused headers whose sum overflows; a built header is ours.
        self.segments
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.stored_len))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256 + self.segments.len() * 32);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // header length, patched below
        b.extend_from_slice(&self.original_len.to_le_bytes());
        b.extend_from_slice(&self.checksum);
        b.extend_from_slice(&self.model_fingerprint);
        let tag = self.backend_tag.as_bytes();
        let tag = &tag[..tag.len().min(u16::MAX as usize)];
        b.extend_from_slice(&(tag.len() as u16).to_le_bytes());
        b.extend_from_slice(tag);
        b.extend_from_slice(&(self.params.len() as u16).to_le_bytes());
        for (id, v) in &self.params {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for s in &self.segments {
            b.push(s.kind as u8);
            b.extend_from_slice(&s.original_len.to_le_bytes());
            b.extend_from_slice(&s.stored_len.to_le_bytes());
            b.extend_from_slice(&s.crc.to_le_bytes());
            if s.kind == SegmentKind::Llm {
                b.extend_from_slice(&(s.chunks.len() as u32).to_le_bytes());
                for c in &s.chunks {
                    for v in [c.original_len, c.n_symbols, c.stored_len, c.crc] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let total = (b.len() + 4) as u32;
        b[8..12].copy_from_slice(&total.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Read and parse the header of the blob in `src` (checked against its length),
    /// reading only the header's bytes.
    pub fn read_from(src: &dyn Source) -> Result<(Header, usize), FormatError> {
        let io = |e: std::io::Error| FormatError::Truncated(format!("reading the header: {e}"));
        let mut start = [0u8; 12];
        let n = src.len().min(12) as usize;
        src.read_exact_at(&mut start[..n], 0).map_err(io)?;
        if n < 12 {
            // Too short for a header: let the parser say what it is.
            return Header::parse(&start[..n], Some(src.len()));
        }
        if &start[..4] != MAGIC {
            // Not a blob: say so without reading what its bytes 8..12 would announce
            // (up to 4 GiB of some other file).
            return Header::parse(&start, Some(src.len()));
        }
        let header_len = u32::from_le_bytes([start[8], start[9], start[10], start[11]]) as u64;
        if header_len > MAX_HEADER {
            return Err(corrupt(format!(
                "header length {header_len} is over the {MAX_HEADER} this build reads"
            )));
        }
        // A length past the end is reported by the parser as truncation.
        let want = header_len.clamp(12, src.len());
        let mut data = vec![0u8; want as usize];
        src.read_exact_at(&mut data, 0).map_err(io)?;
        Header::parse(&data, Some(src.len()))
    }

    /// Parse and validate a header. `blob_len` is the whole blob's length, when known, to
    /// detect truncation and trailing bytes. Returns the header and its length.
    pub fn parse(data: &[u8], blob_len: Option<u64>) -> Result<(Header, usize), FormatError> {
        if data.len() < 4 {
            return Err(FormatError::Truncated(format!("{} bytes", data.len())));
        }
        let magic: [u8; 4] = [data[0], data[1], data[2], data[3]];
        if &magic != MAGIC {
            return Err(FormatError::NotNc06(magic));
        }
        if data.len() < FIXED + 2 {
            return Err(FormatError::Truncated("header cut short".into()));
        }
        let version = u16::from_le_bytes([data[4], data[5]]);
        let header_len = u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize;
        if header_len < FIXED + 2 + 2 + 4 + 4 {
            return Err(corrupt(format!("header length {header_len} is too small")));
        }
        if header_len > data.len() {
            return Err(FormatError::Truncated(format!(
                "header claims {header_len} bytes, only {} present",
                data.len()
            )));
        }
        let stored_crc = u32::from_le_bytes([
            data[header_len - 4],
            data[header_len - 3],
            data[header_len - 2],
            data[header_len - 1],
        ]);
        // Fuzzing skips this check so mutated headers reach the parser behind it.
        if crc32fast::hash(&data[..header_len - 4]) != stored_crc && !cfg!(fuzzing) {
            if version > VERSION {
                return Err(FormatError::NewerVersion(version));
            }
            return Err(corrupt("header checksum mismatch"));
        }
        if version != VERSION {
            return Err(FormatError::NewerVersion(version));
        }
        let mut r = Cursor {
            data: &data[..header_len - 4],
            pos: 12,
        };
        let original_len = r.u64()?;
        let checksum = r.array32()?;
        let model_fingerprint = r.array32()?;
        let tag_len = r.u16()? as usize;
        let backend_tag = String::from_utf8(r.take(tag_len)?.to_vec())
            .map_err(|_| corrupt("backend tag is not UTF-8"))?;
        let n_params = r.u16()? as usize;
        let mut params = Vec::with_capacity(n_params);
        for _ in 0..n_params {
            params.push((r.u16()?, r.u32()?));
        }
        let n_segments = r.u32()? as usize;
        // Each segment takes at least 21 header bytes: bound allocations by what is there.
        if n_segments > r.remaining() / 21 {
            return Err(corrupt("segment count exceeds header size"));
        }
        let mut segments = Vec::with_capacity(n_segments);
        // Every sum of untrusted lengths is checked: later code slices by them.
        let (mut sum_original, mut sum_stored) = (0u64, 0u64);
        for _ in 0..n_segments {
            let kind = segment_kind(r.u8()?)?;
            let original_len = r.u64()?;
            let stored_len = r.u64()?;
            let crc = r.u32()?;
            let mut chunks = Vec::new();
            if kind == SegmentKind::Llm {
                let n = r.u32()? as usize;
                if n > r.remaining() / 16 || n == 0 {
                    return Err(corrupt("chunk count does not fit the header"));
                }
                let (mut so, mut ss) = (0u64, 0u64);
                for _ in 0..n {
                    let c = ChunkEntry {
                        original_len: r.u32()?,
                        n_symbols: r.u32()?,
                        stored_len: r.u32()?,
                        crc: r.u32()?,
                    };
                    if c.original_len > MAX_CHUNK {
                        return Err(corrupt(format!(
                            "a chunk of {} bytes, over the {MAX_CHUNK} this build decodes",
                            c.original_len
                        )));
                    }
                    // Every symbol yields at least one byte, and no chunk is empty (the
                    // encoder never makes one; empty jobs would only tie up the lanes).
                    if c.n_symbols > c.original_len || c.n_symbols == 0 {
                        return Err(corrupt("chunk symbol count is impossible"));
                    }
                    // A symbol never costs the coder more than ~34 bits (a token of the
                    // floor frequency, 2^-24, in a range of over 2^30, plus an escaped
                    // byte): a chunk claiming more stored bytes than twice that is not
                    // read into memory.
                    if c.stored_len as u64 > MAX_STORED_PER_SYMBOL * c.n_symbols as u64 + 16 {
                        return Err(corrupt(format!(
                            "a chunk of {} symbols claims {} stored bytes",
                            c.n_symbols, c.stored_len
                        )));
                    }
                    // At most 2^28 chunks of u32 lengths: these sums cannot overflow.
                    so += c.original_len as u64;
                    ss += c.stored_len as u64;
                    chunks.push(c);
                }
                if so != original_len || ss != stored_len {
                    return Err(corrupt("chunk table does not add up to its segment"));
                }
            }
            if kind == SegmentKind::Stored && stored_len != original_len {
                return Err(corrupt("stored segment with differing lengths"));
            }
            if kind == SegmentKind::Zero && (stored_len != 0 || crc != 0) {
                return Err(corrupt("zero segment with a payload or checksum"));
            }
            sum_original = sum_original
                .checked_add(original_len)
                .ok_or_else(|| corrupt("segment lengths overflow"))?;
            sum_stored = sum_stored
                .checked_add(stored_len)
                .ok_or_else(|| corrupt("stored lengths overflow"))?;
            segments.push(Segment {
                kind,
                original_len,
                stored_len,
                crc,
                chunks,
            });
        }
        if r.remaining() != 0 {
            return Err(corrupt("unexpected bytes at the end of the header"));
        }
        if sum_original != original_len {
            return Err(corrupt("segments do not add up to the original length"));
        }
        let header = Header {
            original_len,
            checksum,
            model_fingerprint,
            backend_tag,
            params,
            segments,
        };
        let expected = (header_len as u64)
            .checked_add(sum_stored)
            .ok_or_else(|| corrupt("stored lengths overflow"))?;
        if let Some(len) = blob_len {
            if len < expected {
                return Err(FormatError::Truncated(format!(
                    "{len} bytes, the header describes {expected}"
                )));
            }
            if len > expected {
                return Err(corrupt(format!(
                    "{} unexpected bytes after the payload",
                    len - expected
                )));
            }
        }
        Ok((header, header_len))
    }
}

/// Reads header fields in order (shared with the compact headers of `compact.rs`).
pub(crate) struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

/// A segment kind byte.
pub(crate) fn segment_kind(k: u8) -> Result<SegmentKind, FormatError> {
    Ok(match k {
        0 => SegmentKind::Stored,
        1 => SegmentKind::Zstd,
        2 => SegmentKind::Llm,
        3 => SegmentKind::Zero,
        k => return Err(corrupt(format!("unknown segment kind {k}"))),
    })
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8], pos: usize) -> Cursor<'a> {
        Cursor { data, pos }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    /// An unsigned LEB128 number (at most 10 bytes, at most 2^64 - 1).
    pub(crate) fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = (b & 0x7f) as u64;
            if i == 9 && bits > 1 {
                return Err(corrupt("varint over 2^64"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint over 10 bytes"))
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(corrupt("header fields run past its end"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn array32(&mut self) -> Result<[u8; 32], FormatError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            original_len: 30,
            checksum: [7; 32],
            model_fingerprint: [9; 32],
            backend_tag: "test backend".into(),
            params: vec![(1, 2048), (2, 1536)],
            segments: vec![
                Segment {
                    kind: SegmentKind::Llm,
                    original_len: 20,
                    stored_len: 6,
                    crc: 1,
                    chunks: vec![
                        ChunkEntry {
                            original_len: 12,
                            n_symbols: 3,
                            stored_len: 4,
                            crc: 5,
                        },
                        ChunkEntry {
                            original_len: 8,
                            n_symbols: 2,
                            stored_len: 2,
                            crc: 6,
                        },
                    ],
                },
                Segment {
                    kind: SegmentKind::Stored,
                    original_len: 10,
                    stored_len: 10,
                    crc: 3,
                    chunks: vec![],
                },
            ],
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let bytes = h.to_bytes();
        let (back, len) = Header::parse(&bytes, Some(bytes.len() as u64 + 16)).expect("parse");
        assert_eq!(back, h);
        assert_eq!(len, bytes.len());
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let h = sample();
        let bytes = h.to_bytes();
        let total = Some(bytes.len() as u64 + 16);
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                assert!(
                    Header::parse(&b, total).is_err(),
                    "flip {flip:#x} at {i} not detected"
                );
            }
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_detected() {
        let bytes = sample().to_bytes();
        for cut in 0..bytes.len() {
            assert!(Header::parse(&bytes[..cut], None).is_err());
        }
        let n = bytes.len() as u64;
        assert!(matches!(
            Header::parse(&bytes, Some(n + 15)),
            Err(FormatError::Truncated(_))
        ));
        assert!(Header::parse(&bytes, Some(n + 17)).is_err());
    }

    /// Lengths chosen so that a plain sum wraps around to a small, plausible number.
    #[test]
    fn lengths_that_overflow_when_summed_are_refused() {
        let seg = |stored_len| Segment {
            kind: SegmentKind::Zstd,
            original_len: 1,
            stored_len,
            crc: 0,
            chunks: vec![],
        };
        let h = Header {
            original_len: 2,
            segments: vec![seg(u64::MAX), seg(17)],
            ..sample()
        };
        let bytes = h.to_bytes();
        for blob_len in [None, Some(bytes.len() as u64 + 16)] {
            let err = Header::parse(&bytes, blob_len).expect_err("wrapping lengths");
            assert!(err.to_string().contains("overflow"), "{err}");
        }
    }

    /// A header whose LLM chunk table is `chunks` (one segment, nothing else).
    fn with_chunks(chunks: Vec<ChunkEntry>) -> Vec<u8> {
        let original_len = chunks.iter().map(|c| c.original_len as u64).sum();
        let stored_len = chunks.iter().map(|c| c.stored_len as u64).sum();
        Header {
            original_len,
            segments: vec![Segment {
                kind: SegmentKind::Llm,
                original_len,
                stored_len,
                crc: 0,
                chunks,
            }],
            ..sample()
        }
        .to_bytes()
    }

    fn chunk(original_len: u32, n_symbols: u32, stored_len: u32) -> ChunkEntry {
        ChunkEntry {
            original_len,
            n_symbols,
            stored_len,
            crc: 0,
        }
    }

    /// Empty chunks (the encoder never makes one) are refused: a hostile blob of
    /// millions of them made the lanes finish jobs without feeding the model, and a
    /// shared worker rebuild its context again and again.
    #[test]
    fn an_empty_chunk_is_refused() {
        let bytes = with_chunks(vec![chunk(12, 3, 4), chunk(0, 0, 0)]);
        let stored = 4;
        let err = Header::parse(&bytes, Some(bytes.len() as u64 + stored)).expect_err("empty");
        assert!(err.to_string().contains("symbol count"), "{err}");
    }

    /// A chunk entry claiming far more stored bytes than its symbols can cost is refused
    /// before a reader allocates them (a sparse 4 GiB blob costs an attacker nothing).
    #[test]
    fn a_chunk_claiming_more_bytes_than_its_symbols_can_cost_is_refused() {
        let huge = with_chunks(vec![chunk(1, 1, u32::MAX)]);
        let err = Header::parse(&huge, Some(huge.len() as u64 + u32::MAX as u64))
            .expect_err("4 GiB for one symbol");
        assert!(err.to_string().contains("claims"), "{err}");
        // The bound itself, and the most a real chunk needs, still pass.
        for (n, stored) in [(1, 24), (3, 4), (1000, 8016)] {
            let ok = with_chunks(vec![chunk(n, n, stored)]);
            Header::parse(&ok, Some(ok.len() as u64 + stored as u64)).expect("within the bound");
        }
        let over = with_chunks(vec![chunk(1000, 1000, 8017)]);
        assert!(Header::parse(&over, Some(over.len() as u64 + 8017)).is_err());
    }

    #[test]
    fn foreign_data_says_so() {
        let err = Header::parse(b"\x1f\x8b\x08\x00gzip data here", None).unwrap_err();
        assert!(err.to_string().contains("not an NC06 blob"));
    }

    /// A 4 GiB file that is not a blob, whose bytes 8..12 would announce a header of
    /// 4 GiB: refused from its first 12 bytes, nothing more read or allocated.
    #[test]
    fn foreign_data_is_not_read_whole() {
        struct Huge;
        impl Source for Huge {
            fn len(&self) -> u64 {
                4 << 30
            }
            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
                assert!(
                    offset == 0 && buf.len() <= 12,
                    "read {} at {offset}",
                    buf.len()
                );
                buf.fill(0xff);
                buf[..4].copy_from_slice(b"ZIP!");
                Ok(())
            }
        }
        let err = Header::read_from(&Huge).unwrap_err();
        assert!(err.to_string().contains("not an NC06 blob"), "{err}");
    }
}
