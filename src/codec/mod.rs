//! Bytes ⇄ NC06 blobs. Pure: the model is reached only through [`Engine`], and the only
//! I/O is the caller's buffers.

pub mod container;
pub mod lanes;
pub mod matcher;
pub mod mixer;
pub mod ngram;
pub mod params;
pub mod predictor;
pub mod range;
pub mod segment;
pub mod tokenizer;

use std::ops::Range;

use container::{ChunkEntry, FormatError, Header, Segment, SegmentKind};
use lanes::{ChunkJob, ChunkOutput};
use params::CoderParams;
use segment::RunKind;
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
        "blob was coded on backend \"{blob}\" but this build is \"{loaded}\"; its logits differ, so decoding would fail (build nacrith for the recorded CPU level, or pass --force-backend to try anyway: checksums are still verified)"
    )]
    BackendMismatch { blob: String, loaded: String },
    #[error("blob is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("zstd: {0}")]
    Zstd(String),
}

#[derive(Debug, Clone)]
pub struct CompressOptions {
    pub chunk_size: usize,
    /// Target size of a file's first chunk when the file starts with text (0: same as
    /// `chunk_size`): a cold read of the start waits for this chunk only.
    pub head_chunk: usize,
    pub zstd_level: i32,
    pub params: Option<CoderParams>,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            head_chunk: DEFAULT_HEAD_CHUNK,
            zstd_level: ZSTD_LEVEL,
            params: None,
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

fn assemble(mut header: Header, parts: Vec<(Segment, Vec<u8>)>) -> Vec<u8> {
    header.segments = parts.iter().map(|(s, _)| s.clone()).collect();
    let mut out = header.to_bytes();
    for (_, payload) in parts {
        out.extend_from_slice(&payload);
    }
    out
}

/// Compress `data` into an NC06 blob. Without an engine every run goes to zstd.
pub fn compress(
    data: &[u8],
    engine: Option<&dyn Engine>,
    opts: &CompressOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<u8>, CodecError> {
    let header = Header {
        original_len: data.len() as u64,
        checksum: *blake3::hash(data).as_bytes(),
        model_fingerprint: [0; 32],
        backend_tag: String::new(),
        params: Vec::new(),
        segments: Vec::new(),
    };
    let runs = segment::segment(data);
    let (hybrid, has_llm) = match engine.filter(|_| runs.iter().any(|(k, _)| *k == RunKind::Text)) {
        Some(engine) => hybrid_blob(data, &runs, engine, header.clone(), opts, progress)?,
        None => {
            let parts = runs
                .iter()
                .map(|(_, r)| binary_segment(&data[r.clone()], opts.zstd_level))
                .collect::<Result<Vec<_>, _>>()?;
            (assemble(header.clone(), parts), false)
        }
    };
    if runs.len() <= 1 && !has_llm {
        // Already zstd (or stored) of the whole file.
        return Ok(hybrid);
    }
    // Whole-file guarantee: never larger than zstd alone plus our header.
    let whole = assemble(header, vec![binary_segment(data, opts.zstd_level)?]);
    Ok(if whole.len() < hybrid.len() {
        whole
    } else {
        hybrid
    })
}

/// Text runs through the LLM coder (each kept only if it beats zstd), binary runs to zstd.
/// Returns the blob and whether any segment is LLM-coded.
fn hybrid_blob(
    data: &[u8],
    runs: &[(RunKind, Range<usize>)],
    engine: &dyn Engine,
    mut header: Header,
    opts: &CompressOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(Vec<u8>, bool), CodecError> {
    let params = opts
        .params
        .clone()
        .unwrap_or_else(|| engine.default_params());
    // Tokenize every text chunk of every text run; all chunks go to the engine at once.
    let tok = engine.tokenizer();
    let mut jobs = Vec::new();
    let mut text_chunks: Vec<Vec<(Range<usize>, u32)>> = Vec::new();
    for (kind, r) in runs {
        let mut chunks = Vec::new();
        if *kind == RunKind::Text {
            let head = if r.start == 0 && opts.head_chunk > 0 {
                opts.head_chunk.min(opts.chunk_size)
            } else {
                opts.chunk_size
            };
            for c in segment::chunk_text_with_head(&data[r.clone()], head, opts.chunk_size) {
                let abs = r.start + c.start..r.start + c.end;
                let symbols: Vec<Symbol> = tok.encode(&data[abs.clone()]);
                chunks.push((abs, symbols.len() as u32));
                jobs.push(ChunkJob::Encode(symbols));
            }
        }
        text_chunks.push(chunks);
    }
    let mut outputs = engine.run(&params, jobs, progress)?.into_iter();

    let mut parts = Vec::with_capacity(runs.len());
    for ((kind, r), chunks) in runs.iter().zip(text_chunks) {
        let bytes = &data[r.clone()];
        if *kind == RunKind::Binary {
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
    // Record the model identity only when a segment needs it, so decoding the rest
    // needs no model.
    let has_llm = parts.iter().any(|(s, _)| s.kind == SegmentKind::Llm);
    if has_llm {
        header.model_fingerprint = engine.fingerprint();
        header.backend_tag = engine.backend_tag().to_string();
        header.params = params.to_pairs();
    }
    Ok((assemble(header, parts), has_llm))
}

#[derive(Debug, Clone, Default)]
pub struct DecompressOptions {
    /// Decode even if the blob's backend tag differs from ours (checksums still verified).
    pub force_backend: bool,
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

/// Append the zstd frame `stored` to `out`, refusing to produce more than `expected`
/// bytes. Streams rather than allocating `expected` up front: the header's length is
/// not trusted until the data proves it.
fn zstd_into(stored: &[u8], expected: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    let start = out.len();
    zstd::stream::read::Decoder::with_buffer(stored)?
        .take(expected.saturating_add(1))
        .read_to_end(out)?;
    if (out.len() - start) as u64 != expected {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "decodes to {}{} bytes, the header says {expected}",
                out.len() - start,
                if (out.len() - start) as u64 > expected {
                    "+"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(())
}

/// One independently decodable piece of a blob: a stored or zstd segment, or one chunk
/// of an LLM segment. A read decodes only the regions that cover it.
#[derive(Debug, Clone)]
pub struct Region {
    /// Where its bytes go in the original.
    pub out: Range<u64>,
    /// Where its coded bytes are in the blob.
    pub stored: Range<usize>,
    pub segment: usize,
    pub kind: RegionKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RegionKind {
    Stored,
    Zstd,
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
        let (header, header_len) = Header::parse(blob, Some(blob.len() as u64))?;
        let mut regions = Vec::new();
        let (mut stored, mut out) = (header_len, 0u64);
        for (si, seg) in header.segments.iter().enumerate() {
            match seg.kind {
                SegmentKind::Stored | SegmentKind::Zstd => {
                    let len = seg.stored_len as usize;
                    regions.push(Region {
                        out: out..out + seg.original_len,
                        stored: stored..stored + len,
                        segment: si,
                        kind: if seg.kind == SegmentKind::Zstd {
                            RegionKind::Zstd
                        } else {
                            RegionKind::Stored
                        },
                    });
                    stored += len;
                    out += seg.original_len;
                }
                SegmentKind::Llm => {
                    for (ci, c) in seg.chunks.iter().enumerate() {
                        let len = c.stored_len as usize;
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
                }
            }
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

/// Decode a stored or zstd region (no model needed), checked against its segment's CRC
/// (such a region is a whole segment).
pub fn decode_plain_region(
    header: &Header,
    blob: &[u8],
    region: &Region,
) -> Result<Vec<u8>, CodecError> {
    let stored = &blob[region.stored.clone()];
    let expected = region.out.end - region.out.start;
    let mut out = Vec::new();
    match region.kind {
        RegionKind::Stored => out.extend_from_slice(stored),
        RegionKind::Zstd => zstd_into(stored, expected, &mut out)
            .map_err(|e| CodecError::Corrupt(format!("segment {}: zstd: {e}", region.segment)))?,
        RegionKind::Chunk { .. } => {
            return Err(CodecError::ModelNeeded(
                "an LLM chunk cannot be decoded without the model".into(),
            ))
        }
    }
    let crc = header.segments.get(region.segment).map(|s| s.crc);
    if crc != Some(crc32fast::hash(&out)) {
        return Err(CodecError::Corrupt(format!(
            "segment {}: checksum mismatch",
            region.segment
        )));
    }
    Ok(out)
}

/// The model job that decodes an LLM chunk region.
pub fn chunk_job(blob: &[u8], region: &Region) -> ChunkJob {
    let n_symbols = match region.kind {
        RegionKind::Chunk { n_symbols, .. } => n_symbols,
        _ => 0,
    };
    ChunkJob::Decode {
        data: blob[region.stored.clone()].to_vec(),
        n_symbols,
    }
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

/// The checks on a fully assembled original: every segment's CRC and the whole-file
/// BLAKE3.
pub fn verify_assembled(header: &Header, plain: &[u8]) -> Result<(), CodecError> {
    if plain.len() as u64 != header.original_len {
        return Err(CodecError::Corrupt(format!(
            "decodes to {} bytes, the header says {}",
            plain.len(),
            header.original_len
        )));
    }
    let mut at = 0usize;
    for (si, seg) in header.segments.iter().enumerate() {
        let got = &plain[at..at + seg.original_len as usize];
        at += seg.original_len as usize;
        if crc32fast::hash(got) != seg.crc {
            return Err(CodecError::Corrupt(format!(
                "segment {si}: checksum mismatch"
            )));
        }
    }
    if blake3::hash(plain).as_bytes() != &header.checksum {
        return Err(CodecError::Corrupt("whole-file checksum mismatch".into()));
    }
    Ok(())
}

/// Decompress a whole blob, verifying every chunk and the whole-file checksum.
pub fn decompress(
    blob: &[u8],
    engine: Option<&dyn Engine>,
    opts: &DecompressOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<u8>, CodecError> {
    let plan = Plan::of(blob)?;
    let header = &plan.header;
    let mut llm = None;
    if header.has_llm_segments() {
        let engine = engine.ok_or_else(|| CodecError::ModelNeeded("no model loaded".into()))?;
        llm = Some((engine, check_engine(header, engine, opts)?));
    }
    let jobs: Vec<ChunkJob> = plan
        .regions
        .iter()
        .filter(|r| matches!(r.kind, RegionKind::Chunk { .. }))
        .map(|r| chunk_job(blob, r))
        .collect();
    let mut decoded = match (&llm, jobs.is_empty()) {
        (Some((engine, params)), false) => engine.run(params, jobs, progress)?.into_iter(),
        _ => Vec::new().into_iter(),
    };
    // Never trust a claimed length for an up-front allocation beyond what can be real:
    // grow as regions actually decode.
    let mut out = Vec::with_capacity(
        (header.original_len as usize)
            .min(blob.len().saturating_mul(64))
            .min(1 << 30),
    );
    for region in &plan.regions {
        match region.kind {
            RegionKind::Chunk { .. } => {
                let Some((engine, _)) = &llm else {
                    return Err(CodecError::ModelNeeded("no model loaded".into()));
                };
                let Some(ChunkOutput::Decoded(symbols)) = decoded.next() else {
                    return Err(CodecError::Corrupt("decoder lost a chunk".into()));
                };
                out.extend_from_slice(&chunk_bytes(engine.tokenizer(), symbols, region)?);
            }
            _ => out.extend_from_slice(&decode_plain_region(header, blob, region)?),
        }
    }
    verify_assembled(header, &out)?;
    Ok(out)
}
