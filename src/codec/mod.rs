//! Bytes ⇄ NC06 blobs. Pure: the model is reached only through [`Engine`], and the only
//! I/O is the caller's buffers.

pub mod compact;
pub mod container;
pub mod lanes;
pub mod matcher;
pub mod mixer;
pub mod ngram;
pub mod params;
pub mod predictor;
pub mod range;
pub mod segment;
pub mod source;
pub mod tokenizer;

use std::io::{self, Read, Write};
use std::ops::Range;

use container::{ChunkEntry, FormatError, Header, Segment, SegmentKind};
use lanes::{ChunkJob, ChunkOutput};
use params::CoderParams;
use segment::RunKind;
use source::{RangeReader, Source};
use tokenizer::{Symbol, TextTokenizer};

use crate::model::ModelError;

/// Default text chunk size in bytes: chunks are coded independently, so a read decodes
/// only the chunks it needs and many chunks run in lockstep, but each chunk starts with
/// no context. Measured on 32 KB of GPL-3 (scripts/chunk-curve, README): 4 KiB chunks
/// 1.044 bpb, 8 KiB 0.996, 16 KiB 0.966, 32 KiB 0.943; one stream needs 15, 31, 61 and
/// 123 s to code one such chunk, which is what a cold read of it waits for.
pub const DEFAULT_CHUNK_SIZE: usize = 16 * 1024;
/// Default first-chunk size: measured on 32 KB of GPL-3 (scripts/chunk-curve), a 4 KiB
/// head before 16 KiB chunks costs 0.4% in size (0.970 vs 0.966 bpb) and cuts what a
/// cold read of the first page waits for from 61 s to 14 s on one CPU stream.
pub const DEFAULT_HEAD_CHUNK: usize = 4 * 1024;
pub const ZSTD_LEVEL: i32 = 19;
/// Plaintext coded (and, decoding, LLM chunk bytes held) at a time: the memory a file
/// costs is bounded by this, its tokens and a zstd context, whatever the file's size. A
/// window holds ~1,000 chunks of the default size, enough to fill every lane.
pub const WINDOW: usize = 16 << 20;

/// What the codec needs from a model: its identity, its tokenizer, and a way to run many
/// chunk jobs (in lockstep lanes, on however many contexts it has).
pub trait Engine: Sync {
    fn tokenizer(&self) -> &TextTokenizer;
    fn fingerprint(&self) -> [u8; 32];
    fn backend_tag(&self) -> &str;
    /// Parameters for new blobs.
    fn default_params(&self) -> CoderParams;
    /// Run every job; outputs in job order. `progress` receives symbol counts.
    fn run(
        &self,
        params: &CoderParams,
        jobs: Vec<ChunkJob>,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<ChunkOutput>, ModelError>;
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("this blob has LLM-coded text and needs the model to decode: {0}")]
    ModelNeeded(String),
    #[error(
        "blob was coded with model {blob} but the loaded model is {loaded}; pass --model with the GGUF file it was made with"
    )]
    ModelMismatch { blob: String, loaded: String },
    #[error(
        "blob was coded on backend \"{blob}\" but this build is \"{loaded}\"; its logits differ, so decoding would fail. {}",
        backend_needed(blob)
    )]
    BackendMismatch { blob: String, loaded: String },
    #[error("blob is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What it takes to decode a blob of backend `tag` (for [`CodecError::BackendMismatch`]).
pub fn backend_needed(tag: &str) -> String {
    let way = "or, while such a machine is at hand, `nacrithfs recode BACKING --to cpu|cuda` \
               moves a volume's blobs to the backend that will read them later; \
               --force-backend tries anyway (every checksum is still verified)";
    if tag.contains("; cuda ") {
        format!(
            "It needs that GPU model with the same compute capability, a cuda build \
             (scripts/setup --cuda) of the recorded llama.cpp version and that CUDA runtime; {way}"
        )
    } else {
        format!(
            "It needs a build for the recorded CPU level and llama.cpp version \
             (scripts/setup builds for x86-64-v3); {way}"
        )
    }
}

#[derive(Debug, Clone)]
pub struct CompressOptions {
    pub chunk_size: usize,
    /// Target size of a file's first chunk when the file starts with text (0: same as
    /// `chunk_size`): a cold read of the start waits for this chunk only.
    pub head_chunk: usize,
    pub zstd_level: i32,
    pub params: Option<CoderParams>,
    /// Plaintext coded at a time ([`WINDOW`]; smaller only in tests).
    pub window: usize,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            head_chunk: DEFAULT_HEAD_CHUNK,
            zstd_level: ZSTD_LEVEL,
            params: None,
            window: WINDOW,
        }
    }
}

/// Stored size in bits per original byte (0 for an empty original).
pub fn bits_per_byte(stored: u64, original: u64) -> f64 {
    if original == 0 {
        0.0
    } else {
        stored as f64 * 8.0 / original as f64
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn binary_segment(data: &[u8], level: i32) -> Result<(Segment, Vec<u8>), CodecError> {
    let packed = zstd::bulk::compress(data, level).map_err(|e| CodecError::Zstd(e.to_string()))?;
    let (kind, stored) = if packed.len() < data.len() {
        (SegmentKind::Zstd, packed)
    } else {
        (SegmentKind::Stored, data.to_vec())
    };
    Ok((
        Segment {
            kind,
            original_len: data.len() as u64,
            stored_len: stored.len() as u64,
            crc: crc32fast::hash(data),
            chunks: Vec::new(),
        },
        stored,
    ))
}

fn zero_segment(len: u64) -> Segment {
    Segment {
        kind: SegmentKind::Zero,
        original_len: len,
        stored_len: 0,
        crc: 0,
        chunks: Vec::new(),
    }
}

/// Compress `src` into an NC06 header and payload, one [`WINDOW`] of plaintext at a time:
/// the payload (what follows the header) is written to `payload` as it is made, and the
/// header, known only at the end, is returned. Without an engine every run goes to zstd.
/// Memory is bounded by the window, its tokens and the zstd context, not by the file.
pub fn compress_to(
    src: &dyn Source,
    engine: Option<&dyn Engine>,
    opts: &CompressOptions,
    progress: &(dyn Fn(usize) + Sync),
    payload: &mut dyn Write,
) -> Result<Header, CodecError> {
    let len = src.len();
    let llm = engine.map(|e| {
        let params = opts.params.clone().unwrap_or_else(|| e.default_params());
        (e, params)
    });
    let mut hasher = blake3::Hasher::new();
    let mut segments: Vec<Segment> = Vec::new();
    let mut at = 0u64;
    while at < len {
        let step = opts.window.clamp(1, WINDOW) as u64;
        let mut window = src.read_range(at..len.min(at.saturating_add(step)))?;
        if at + (window.len() as u64) < len {
            window.truncate(segment::window_cut(&window, at));
        }
        hasher.update(&window);
        let llm = llm.as_ref().map(|(e, p)| (*e, p));
        for (seg, bytes) in code_window(&window, at, llm, opts, progress)? {
            payload.write_all(&bytes)?;
            match segments.last_mut() {
                // A hole that spans windows is one segment.
                Some(last) if last.kind == SegmentKind::Zero && seg.kind == SegmentKind::Zero => {
                    last.original_len += seg.original_len
                }
                _ => segments.push(seg),
            }
        }
        at += window.len() as u64;
    }
    let mut header = Header {
        original_len: len,
        checksum: *hasher.finalize().as_bytes(),
        model_fingerprint: [0; 32],
        backend_tag: String::new(),
        params: Vec::new(),
        segments,
    };
    // Record the model identity only when a segment needs it, so decoding the rest
    // needs no model.
    if let Some((engine, params)) = llm.filter(|_| header.has_llm_segments()) {
        header.model_fingerprint = engine.fingerprint();
        header.backend_tag = engine.backend_tag().to_string();
        header.params = params.to_pairs();
    }
    Ok(header)
}

/// The whole-file guarantee, for inputs of one window: a blob never larger than zstd of
/// the whole input plus its header. Returns that blob's header and payload when it is
/// smaller than `header` with `payload_len` bytes of payload. (A larger file keeps its
/// per-window segments, each never larger than zstd of its bytes, so that a read of any
/// part decodes a window at most.)
pub fn whole_zstd_if_smaller(
    src: &dyn Source,
    header: &Header,
    payload_len: u64,
    opts: &CompressOptions,
) -> Result<Option<(Header, Vec<u8>)>, CodecError> {
    let one_window = src.len() <= opts.window.clamp(1, WINDOW) as u64;
    if !one_window || (header.segments.len() <= 1 && !header.has_llm_segments()) {
        return Ok(None);
    }
    let data = src.read_range(0..src.len())?;
    let (seg, payload) = binary_segment(&data, opts.zstd_level)?;
    let whole = Header {
        original_len: header.original_len,
        checksum: header.checksum,
        model_fingerprint: [0; 32],
        backend_tag: String::new(),
        params: Vec::new(),
        segments: vec![seg],
    };
    let whole_len = (whole.to_bytes().len() + payload.len()) as u64;
    let smaller = whole_len < header.to_bytes().len() as u64 + payload_len;
    Ok(smaller.then_some((whole, payload)))
}

/// Compress `data` into an NC06 blob in memory. Without an engine every run goes to zstd.
pub fn compress(
    data: &[u8],
    engine: Option<&dyn Engine>,
    opts: &CompressOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<u8>, CodecError> {
    let mut payload = Vec::new();
    let header = compress_to(&data, engine, opts, progress, &mut payload)?;
    let (header, payload) = whole_zstd_if_smaller(&data, &header, payload.len() as u64, opts)?
        .unwrap_or((header, payload));
    let mut out = header.to_bytes();
    out.extend_from_slice(&payload);
    Ok(out)
}

/// One window's segments: zero runs as nothing, text runs through the LLM coder (each
/// kept only if it beats zstd), binary runs (and text without an engine) to zstd.
/// `base` is the window's offset in the file.
fn code_window(
    data: &[u8],
    base: u64,
    llm: Option<(&dyn Engine, &CoderParams)>,
    opts: &CompressOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<(Segment, Vec<u8>)>, CodecError> {
    let runs = segment::segment_at(data, base);
    let llm = llm.filter(|_| runs.iter().any(|(k, _)| *k == RunKind::Text));
    // Tokenize every text chunk of every text run; all chunks go to the engine at once.
    let mut jobs = Vec::new();
    let mut text_chunks: Vec<Vec<(Range<usize>, u32)>> = Vec::new();
    for (kind, r) in &runs {
        let mut chunks = Vec::new();
        if let (RunKind::Text, Some((engine, _))) = (kind, llm) {
            let head = if base + r.start as u64 == 0 && opts.head_chunk > 0 {
                opts.head_chunk.min(opts.chunk_size)
            } else {
                opts.chunk_size
            };
            for c in segment::chunk_text_with_head(&data[r.clone()], head, opts.chunk_size) {
                let abs = r.start + c.start..r.start + c.end;
                let symbols: Vec<Symbol> = engine.tokenizer().encode(&data[abs.clone()]);
                chunks.push((abs, symbols.len() as u32));
                jobs.push(ChunkJob::Encode(symbols));
            }
        }
        text_chunks.push(chunks);
    }
    let mut outputs = match llm {
        Some((engine, params)) if !jobs.is_empty() => engine.run(params, jobs, progress)?,
        _ => Vec::new(),
    }
    .into_iter();

    let mut parts = Vec::with_capacity(runs.len());
    for ((kind, r), chunks) in runs.iter().zip(text_chunks) {
        let bytes = &data[r.clone()];
        if *kind == RunKind::Zero {
            parts.push((zero_segment(bytes.len() as u64), Vec::new()));
            continue;
        }
        if chunks.is_empty() {
            parts.push(binary_segment(bytes, opts.zstd_level)?);
            continue;
        }
        let mut entries = Vec::with_capacity(chunks.len());
        let mut payload = Vec::new();
        for (range, n_symbols) in chunks {
            let Some(ChunkOutput::Encoded(coded)) = outputs.next() else {
                return Err(CodecError::Model(ModelError::Runtime(
                    "engine returned the wrong kind of output".into(),
                )));
            };
            entries.push(ChunkEntry {
                original_len: range.len() as u32,
                n_symbols,
                stored_len: coded.len() as u32,
                crc: crc32fast::hash(&data[range]),
            });
            payload.extend_from_slice(&coded);
        }
        // Never worse than the classical codec on the same run.
        let fallback = binary_segment(bytes, opts.zstd_level)?;
        if fallback.1.len() <= payload.len() {
            parts.push(fallback);
        } else {
            let seg = Segment {
                kind: SegmentKind::Llm,
                original_len: bytes.len() as u64,
                stored_len: payload.len() as u64,
                crc: crc32fast::hash(bytes),
                chunks: entries,
            };
            parts.push((seg, payload));
        }
    }
    Ok(parts)
}

#[derive(Debug, Clone, Default)]
pub struct DecompressOptions {
    /// Decode even if the blob's backend tag differs from ours (checksums still verified).
    pub force_backend: bool,
    /// For decoding into memory: refuse blobs that claim more bytes than this.
    pub max_len: Option<u64>,
}

/// Check that `engine` can reproduce the logits this blob was coded with.
pub fn check_engine(
    header: &Header,
    engine: &dyn Engine,
    opts: &DecompressOptions,
) -> Result<CoderParams, CodecError> {
    if header.model_fingerprint != engine.fingerprint() {
        return Err(CodecError::ModelMismatch {
            blob: hex(&header.model_fingerprint[..8]),
            loaded: hex(&engine.fingerprint()[..8]),
        });
    }
    if header.backend_tag != engine.backend_tag() && !opts.force_backend {
        return Err(CodecError::BackendMismatch {
            blob: header.backend_tag.clone(),
            loaded: engine.backend_tag().to_string(),
        });
    }
    let params = header.coder_params()?;
    let ours = engine.default_params();
    if params.n_vocab != ours.n_vocab {
        return Err(CodecError::Corrupt(format!(
            "blob says vocabulary {} but the model has {}",
            params.n_vocab, ours.n_vocab
        )));
    }
    Ok(params)
}

/// One independently decodable piece of a blob: a stored, zstd or zero segment, or one
/// chunk of an LLM segment. A read decodes only the regions that cover it.
#[derive(Debug, Clone)]
pub struct Region {
    /// Where its bytes go in the original.
    pub out: Range<u64>,
    /// Where its coded bytes are in the blob.
    pub stored: Range<u64>,
    pub segment: usize,
    pub kind: RegionKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RegionKind {
    Stored,
    Zstd,
    Zero,
    Chunk {
        index: usize,
        n_symbols: usize,
        crc: u32,
    },
}

/// A parsed blob: its header and its regions in file order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub header: Header,
    pub regions: Vec<Region>,
}

impl Plan {
    /// Parse `blob`'s header (checked against the blob's length) and lay out its regions.
    pub fn of(blob: &[u8]) -> Result<Plan, CodecError> {
        Plan::read_from(&blob)
    }

    /// Like [`Plan::of`], reading only the header from `blob`.
    pub fn read_from(blob: &dyn Source) -> Result<Plan, CodecError> {
        let (header, header_len) = Header::read_from(blob)?;
        let mut regions = Vec::new();
        // `Header::parse` checked that these sums fit (and match the blob's length).
        let (mut stored, mut out) = (header_len as u64, 0u64);
        for (si, seg) in header.segments.iter().enumerate() {
            let kind = match seg.kind {
                SegmentKind::Stored => RegionKind::Stored,
                SegmentKind::Zstd => RegionKind::Zstd,
                SegmentKind::Zero => RegionKind::Zero,
                SegmentKind::Llm => {
                    for (ci, c) in seg.chunks.iter().enumerate() {
                        let len = c.stored_len as u64;
                        regions.push(Region {
                            out: out..out + c.original_len as u64,
                            stored: stored..stored + len,
                            segment: si,
                            kind: RegionKind::Chunk {
                                index: ci,
                                n_symbols: c.n_symbols as usize,
                                crc: c.crc,
                            },
                        });
                        stored += len;
                        out += c.original_len as u64;
                    }
                    continue;
                }
            };
            regions.push(Region {
                out: out..out + seg.original_len,
                stored: stored..stored + seg.stored_len,
                segment: si,
                kind,
            });
            stored += seg.stored_len;
            out += seg.original_len;
        }
        Ok(Plan { header, regions })
    }

    /// The regions that hold bytes `range` of the original.
    pub fn covering(&self, range: Range<u64>) -> Range<usize> {
        let first = self.regions.partition_point(|r| r.out.end <= range.start);
        let end = self.regions.partition_point(|r| r.out.start < range.end);
        first..end.max(first)
    }
}

/// Zeros to hand out for zero regions without allocating per byte.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Call `emit` with `n` zero bytes, in pieces.
pub fn emit_zeros(mut n: u64, emit: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        emit(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Bytes streamed through at a time when decoding stored and zstd regions.
const PIECE: usize = 256 * 1024;

/// Decode a stored, zstd or zero region (no model needed), streaming its bytes to `emit`
/// in pieces, and check it against its segment's CRC (such a region is a whole segment).
/// A failure may come after some bytes were emitted: callers keep them provisional.
pub fn decode_plain_region(
    header: &Header,
    blob: &dyn Source,
    region: &Region,
    emit: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<(), CodecError> {
    let expected = region.out.end - region.out.start;
    let si = region.segment;
    let mut crc = crc32fast::Hasher::new();
    let mut produced = 0u64;
    let mut piece = |bytes: &[u8], produced: &mut u64| -> io::Result<()> {
        crc.update(bytes);
        *produced += bytes.len() as u64;
        emit(bytes)
    };
    let mut buf = vec![0u8; PIECE.min(expected as usize)];
    match region.kind {
        RegionKind::Zero => return Ok(emit_zeros(expected, emit)?),
        RegionKind::Stored => {
            let mut at = region.stored.start;
            while at < region.stored.end {
                let n = (region.stored.end - at).min(buf.len() as u64) as usize;
                blob.read_exact_at(&mut buf[..n], at)?;
                piece(&buf[..n], &mut produced)?;
                at += n as u64;
            }
        }
        RegionKind::Zstd => {
            let zerr = |e: io::Error| CodecError::Corrupt(format!("segment {si}: zstd: {e}"));
            let mut dec =
                zstd::stream::read::Decoder::new(RangeReader::new(blob, region.stored.clone()))
                    .map_err(zerr)?;
            let mut probe = [0u8; 1];
            loop {
                // Never produce more than the header says: at the stated length, one more
                // byte would be corruption.
                let room = expected - produced;
                let want = if room == 0 {
                    &mut probe[..]
                } else {
                    &mut buf[..room.min(PIECE as u64) as usize]
                };
                let n = dec.read(want).map_err(zerr)?;
                if n == 0 {
                    break;
                }
                if room == 0 {
                    return Err(CodecError::Corrupt(format!(
                        "segment {si}: zstd: decodes to more than the {expected} bytes the header says"
                    )));
                }
                let chunk = &buf[..n];
                piece(chunk, &mut produced)?;
            }
            if produced != expected {
                return Err(CodecError::Corrupt(format!(
                    "segment {si}: zstd: decodes to {produced} bytes, the header says {expected}"
                )));
            }
        }
        RegionKind::Chunk { .. } => {
            return Err(CodecError::ModelNeeded(
                "an LLM chunk cannot be decoded without the model".into(),
            ))
        }
    }
    if header.segments.get(si).map(|s| s.crc) != Some(crc.finalize()) {
        return Err(CodecError::Corrupt(format!(
            "segment {si}: checksum mismatch"
        )));
    }
    Ok(())
}

/// The model job that decodes an LLM chunk region (its coded bytes read from `blob`).
pub fn chunk_job(blob: &dyn Source, region: &Region) -> Result<ChunkJob, CodecError> {
    let n_symbols = match region.kind {
        RegionKind::Chunk { n_symbols, .. } => n_symbols,
        _ => 0,
    };
    Ok(ChunkJob::Decode {
        data: blob.read_range(region.stored.clone())?,
        n_symbols,
    })
}

/// Turn a decoded chunk's symbols into its bytes, checking its length and CRC.
pub fn chunk_bytes(
    tok: &TextTokenizer,
    symbols: Vec<Symbol>,
    region: &Region,
) -> Result<Vec<u8>, CodecError> {
    let (ci, crc) = match region.kind {
        RegionKind::Chunk { index, crc, .. } => (index, crc),
        _ => return Err(CodecError::Corrupt("not an LLM chunk".into())),
    };
    let si = region.segment;
    let len = (region.out.end - region.out.start) as usize;
    let mut out = Vec::with_capacity(len);
    for s in symbols {
        if !tok.decode_into(s, &mut out) || out.len() > len {
            return Err(CodecError::Corrupt(format!(
                "segment {si} chunk {ci}: decoded stream is invalid (corrupt data, or logits differ from the encoder's)"
            )));
        }
    }
    if out.len() != len || crc32fast::hash(&out) != crc {
        return Err(CodecError::Corrupt(format!(
            "segment {si} chunk {ci}: checksum mismatch (corrupt data, or logits differ from the encoder's)"
        )));
    }
    Ok(out)
}

/// The checks on a whole decoded original, fed in file order in pieces of any size:
/// every segment's CRC (zero segments: that they are zeros), the length, the BLAKE3.
pub struct Verifier<'h> {
    header: &'h Header,
    whole: blake3::Hasher,
    segment: usize,
    in_segment: u64,
    crc: crc32fast::Hasher,
    total: u64,
}

impl<'h> Verifier<'h> {
    pub fn new(header: &'h Header) -> Verifier<'h> {
        let mut v = Verifier {
            header,
            whole: blake3::Hasher::new(),
            segment: 0,
            in_segment: 0,
            crc: crc32fast::Hasher::new(),
            total: 0,
        };
        v.skip_empty_segments();
        v
    }

    fn skip_empty_segments(&mut self) {
        while self
            .header
            .segments
            .get(self.segment)
            .is_some_and(|s| s.original_len == 0)
        {
            self.segment += 1;
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) -> Result<(), CodecError> {
        self.whole.update(bytes);
        while !bytes.is_empty() {
            let Some(seg) = self.header.segments.get(self.segment) else {
                return Err(CodecError::Corrupt(format!(
                    "decodes to more than the {} bytes the header says",
                    self.header.original_len
                )));
            };
            let n = (seg.original_len - self.in_segment).min(bytes.len() as u64) as usize;
            let (now, rest) = bytes.split_at(n);
            if seg.kind == SegmentKind::Zero {
                if now.iter().any(|&b| b != 0) {
                    return Err(CodecError::Corrupt(format!(
                        "segment {}: a zero segment decoded to other bytes",
                        self.segment
                    )));
                }
            } else {
                self.crc.update(now);
            }
            self.in_segment += n as u64;
            self.total += n as u64;
            bytes = rest;
            if self.in_segment == seg.original_len {
                let crc = std::mem::take(&mut self.crc).finalize();
                if seg.kind != SegmentKind::Zero && crc != seg.crc {
                    return Err(CodecError::Corrupt(format!(
                        "segment {}: checksum mismatch",
                        self.segment
                    )));
                }
                self.segment += 1;
                self.in_segment = 0;
                self.skip_empty_segments();
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Result<(), CodecError> {
        if self.total != self.header.original_len {
            return Err(CodecError::Corrupt(format!(
                "decodes to {} bytes, the header says {}",
                self.total, self.header.original_len
            )));
        }
        if self.whole.finalize().as_bytes() != &self.header.checksum {
            return Err(CodecError::Corrupt("whole-file checksum mismatch".into()));
        }
        Ok(())
    }
}

/// Where a streaming decode puts the original, in file order.
pub trait Sink {
    fn bytes(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// `n` zero bytes (a file sink leaves a hole).
    fn zeros(&mut self, n: u64) -> io::Result<()>;
}

impl Sink for Vec<u8> {
    fn bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        let len = usize::try_from(n)
            .ok()
            .and_then(|n| self.len().checked_add(n))
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "too large"))?;
        self.resize(len, 0);
        Ok(())
    }
}

/// A file written in order with `pwrite`, zero runs left as holes.
pub struct FileSink<'f> {
    file: &'f std::fs::File,
    at: u64,
}

impl<'f> FileSink<'f> {
    pub fn new(file: &'f std::fs::File) -> FileSink<'f> {
        FileSink { file, at: 0 }
    }

    /// Give the file its full length (a trailing hole included).
    pub fn finish(self) -> io::Result<()> {
        self.file.set_len(self.at)
    }
}

impl Sink for FileSink<'_> {
    fn bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self.file, bytes, self.at)?;
        self.at += bytes.len() as u64;
        Ok(())
    }
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        self.at = self
            .at
            .checked_add(n)
            .ok_or_else(|| io::Error::other("too large"))?;
        Ok(())
    }
}

/// Decoding only to check a blob: the bytes go nowhere.
pub struct NullSink;

impl Sink for NullSink {
    fn bytes(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn zeros(&mut self, _: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A stream (a pipe, stdout): zero runs are written out.
pub struct WriteSink<W: Write>(pub W);

impl<W: Write> Sink for WriteSink<W> {
    fn bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        emit_zeros(n, &mut |z| self.0.write_all(z))
    }
}

/// Decode `blob` in file order into `sink`, a window of LLM chunks at a time, verifying
/// every chunk, every segment and the whole file (the last check comes after the last
/// bytes reached the sink: a sink's output counts only when this returns `Ok`).
pub fn decode_to(
    blob: &dyn Source,
    engine: Option<&dyn Engine>,
    opts: &DecompressOptions,
    progress: &(dyn Fn(usize) + Sync),
    sink: &mut dyn Sink,
) -> Result<Header, CodecError> {
    let plan = Plan::read_from(blob)?;
    decode_plan_to(&plan, blob, engine, opts, progress, sink)?;
    Ok(plan.header)
}

fn decode_plan_to(
    plan: &Plan,
    blob: &dyn Source,
    engine: Option<&dyn Engine>,
    opts: &DecompressOptions,
    progress: &(dyn Fn(usize) + Sync),
    sink: &mut dyn Sink,
) -> Result<(), CodecError> {
    let header = &plan.header;
    let mut llm = None;
    if header.has_llm_segments() {
        let engine = engine.ok_or_else(|| CodecError::ModelNeeded("no model loaded".into()))?;
        llm = Some((engine, check_engine(header, engine, opts)?));
    }
    let mut verify = Verifier::new(header);
    let regions = &plan.regions;
    let mut i = 0;
    while i < regions.len() {
        // A batch: regions up to a window of LLM chunk bytes (the rest stream).
        let mut end = i;
        let mut window = 0u64;
        while end < regions.len() {
            let r = &regions[end];
            if matches!(r.kind, RegionKind::Chunk { .. }) {
                let n = r.out.end - r.out.start;
                if window > 0 && window + n > WINDOW as u64 {
                    break;
                }
                window += n;
            }
            end += 1;
        }
        let jobs = regions[i..end]
            .iter()
            .filter(|r| matches!(r.kind, RegionKind::Chunk { .. }))
            .map(|r| chunk_job(blob, r))
            .collect::<Result<Vec<_>, _>>()?;
        let mut decoded = match (&llm, jobs.is_empty()) {
            (Some((engine, params)), false) => engine.run(params, jobs, progress)?.into_iter(),
            _ => Vec::new().into_iter(),
        };
        for region in &regions[i..end] {
            match region.kind {
                RegionKind::Chunk { .. } => {
                    let Some((engine, _)) = &llm else {
                        return Err(CodecError::ModelNeeded("no model loaded".into()));
                    };
                    let Some(ChunkOutput::Decoded(symbols)) = decoded.next() else {
                        return Err(CodecError::Corrupt("decoder lost a chunk".into()));
                    };
                    let bytes = chunk_bytes(engine.tokenizer(), symbols, region)?;
                    verify.update(&bytes)?;
                    sink.bytes(&bytes)?;
                }
                RegionKind::Zero => {
                    let n = region.out.end - region.out.start;
                    emit_zeros(n, &mut |z| verify.update(z).map_err(io::Error::other))?;
                    sink.zeros(n)?;
                }
                _ => {
                    let mut failed = None;
                    let r = decode_plain_region(header, blob, region, &mut |b| {
                        if let Err(e) = verify.update(b) {
                            failed = Some(e);
                            return Err(io::Error::other("verification failed"));
                        }
                        sink.bytes(b)
                    });
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    r?;
                }
            }
        }
        i = end;
    }
    verify.finish()
}

/// Decompress a whole blob into memory, verifying every chunk and the whole-file checksum.
pub fn decompress(
    blob: &[u8],
    engine: Option<&dyn Engine>,
    opts: &DecompressOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<u8>, CodecError> {
    let plan = Plan::of(blob)?;
    let len = plan.header.original_len;
    if let Some(max) = opts.max_len.filter(|&max| len > max) {
        return Err(CodecError::Corrupt(format!(
            "it holds {len} bytes, over the {max} allowed in memory here"
        )));
    }
    // Never trust a claimed length for an up-front allocation beyond what can be real:
    // grow as regions actually decode.
    let mut out = Vec::with_capacity(
        (len as usize)
            .min(blob.len().saturating_mul(64))
            .min(1 << 30),
    );
    decode_plan_to(&plan, &blob, engine, opts, progress, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
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

    /// Text, noise and long zero runs, over many windows.
    fn mixed() -> Vec<u8> {
        let mut data = Vec::new();
        for i in 0..6u64 {
            for l in 0..700 {
                data.extend_from_slice(format!("line {l} of part {i}, plain text.\n").as_bytes());
            }
            data.extend_from_slice(&noise(20_000, i + 7));
            data.resize(data.len() + 200_000, 0);
        }
        data
    }

    /// `blob` decoded (without a model) into a new temp file through a [`FileSink`].
    fn decode_to_file(blob: &[u8]) -> std::fs::File {
        let f = tempfile::tempfile().expect("tempfile");
        let mut sink = FileSink::new(&f);
        let opts = DecompressOptions::default();
        decode_to(&blob, None, &opts, &|_| {}, &mut sink).expect("decode_to");
        sink.finish().expect("finish");
        f
    }

    fn first_hole(f: &std::fs::File) -> i64 {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) }
    }

    #[test]
    fn many_windows_with_zero_runs_round_trip_and_decode_to_holes() {
        let data = mixed();
        let opts = CompressOptions {
            window: 64 * 1024,
            zstd_level: 3,
            ..CompressOptions::default()
        };
        let blob = compress(&data, None, &opts, &|_| {}).expect("compress");
        let plan = Plan::of(&blob).expect("plan");
        let zeros: u64 = plan
            .header
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Zero)
            .map(|s| s.original_len)
            .sum();
        // Each 200,000-byte run loses at most a block at either end to alignment.
        assert!(
            zeros >= 6 * (200_000 - 8192),
            "{zeros} bytes in zero segments"
        );
        assert!(
            plan.header.segments.len() > 12,
            "one segment or more per window"
        );
        assert!(blob.len() < data.len() / 4, "{} bytes", blob.len());
        let back = decompress(&blob, None, &DecompressOptions::default(), &|_| {});
        assert!(back.expect("decompress") == data);

        // Streamed into a file: the same bytes, with the zero runs left as holes.
        let f = decode_to_file(&blob);
        let mut back = vec![0u8; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).expect("read");
        assert!(back == data);
        let hole = first_hole(&f);
        assert!(
            hole > 0 && (hole as usize) < 40_000 + 20_000 + 200_000,
            "first hole at {hole}"
        );
    }

    #[test]
    fn a_sparse_file_codes_to_a_tiny_blob_a_window_at_a_time() {
        let f = tempfile::tempfile().expect("tempfile");
        let len: u64 = 3 << 30;
        f.set_len(len).expect("set_len");
        let text = b"an island of text in a sea of zeros\n".repeat(100);
        for at in [0u64, 1 << 30, len - text.len() as u64] {
            std::os::unix::fs::FileExt::write_all_at(&f, &text, at).expect("write");
        }
        let src = source::FileSource::new(f).expect("source");
        let opts = CompressOptions {
            zstd_level: 3,
            ..CompressOptions::default()
        };
        let mut payload = Vec::new();
        let header = compress_to(&src, None, &opts, &|_| {}, &mut payload).expect("compress");
        let kinds: Vec<_> = header.segments.iter().map(|s| s.kind).collect();
        assert!(
            kinds.iter().filter(|&&k| k == SegmentKind::Zero).count() == 2,
            "{kinds:?}"
        );
        let mut blob = header.to_bytes();
        blob.extend_from_slice(&payload);
        assert!(blob.len() < 16 << 10, "{} bytes", blob.len());
        // Decoded to a file: three islands, holes between.
        let out = decode_to_file(&blob);
        assert_eq!(out.metadata().expect("stat").len(), len);
        let blocks = std::os::unix::fs::MetadataExt::blocks(&out.metadata().expect("stat"));
        assert!(blocks < 1024, "{blocks} blocks allocated");
        let mut island = vec![0u8; text.len()];
        std::os::unix::fs::FileExt::read_exact_at(&out, &mut island, 1 << 30).expect("read");
        assert!(island == text);
    }

    #[test]
    fn blobs_claiming_more_than_memory_allows_are_refused() {
        let header = Header {
            original_len: 1 << 50,
            checksum: [0; 32],
            model_fingerprint: [0; 32],
            backend_tag: String::new(),
            params: Vec::new(),
            segments: vec![zero_segment(1 << 50)],
        };
        let blob = header.to_bytes();
        let opts = DecompressOptions {
            max_len: Some(1 << 20),
            ..DecompressOptions::default()
        };
        let err = decompress(&blob, None, &opts, &|_| {}).expect_err("refused");
        assert!(err.to_string().contains("over the 1048576"), "{err}");
    }
}
