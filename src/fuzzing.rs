//! The properties behind the fuzz targets (`fuzz/`, `scripts/fuzz`), kept in the library
//! so that `tests/fuzz_regressions.rs` replays every kept input without libFuzzer. Each
//! takes arbitrary bytes: an error is a fine answer, a panic (a violated property, an
//! out-of-bounds slice, an overflow) is a finding.
#![doc(hidden)]

use std::path::Path;

use crate::codec::container::{Header, SegmentKind};
use crate::codec::lanes::{run_lanes, ChunkJob, ChunkOutput, JobSource, Taken};
use crate::codec::params::CoderParams;
use crate::codec::tokenizer::TextTokenizer;
use crate::codec::{self, DecompressOptions, Engine, Plan, RegionKind};
use crate::model::{Feed, LanguageModel, ModelError, ModelRuntime};
use crate::store::fsck::{fsck, FsckOptions};
use crate::store::record::{decode_dirent_full, encode_dirent, Inode};
use crate::store::Store;

/// Decoding into memory is capped: a zero segment may claim any length at no cost.
const MAX_DECODE: u64 = 64 << 20;

/// `data` with its header CRC made right (when it has a plausible header length), so
/// mutated headers reach the parser behind the check whether or not the build skips it.
pub fn restamp(data: &[u8]) -> Vec<u8> {
    let mut blob = data.to_vec();
    if blob.len() >= 12 {
        let hl = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
        if (12..=blob.len()).contains(&hl) {
            let crc = crc32fast::hash(&blob[..hl - 4]);
            blob[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
        }
    }
    blob
}

/// `Header::parse`, `Header::read_from` and `Plan`: they agree; a parsed header's regions
/// tile the original and the payload exactly; it writes back to itself; seeks stay in
/// range; decoding its plain regions errors or checks out.
pub fn header_plan(data: &[u8]) {
    let blob = restamp(data);
    let parsed = Header::parse(&blob, Some(blob.len() as u64));
    let read = Header::read_from(&&blob[..]);
    assert_eq!(parsed.is_ok(), read.is_ok(), "parse and read_from disagree");
    let Ok((header, header_len)) = parsed else {
        return;
    };
    assert_eq!(read.ok(), Some((header.clone(), header_len)));
    let plan = Plan::of(&blob).expect("a parsed header makes a plan");
    let (mut out, mut stored) = (0u64, header_len as u64);
    for r in &plan.regions {
        assert_eq!(r.out.start, out, "regions tile the original");
        assert_eq!(r.stored.start, stored, "regions tile the payload");
        assert!(r.out.end >= r.out.start && r.stored.end >= r.stored.start);
        if let RegionKind::Chunk { n_symbols, .. } = r.kind {
            assert!(n_symbols as u64 <= r.out.end - r.out.start);
        }
        out = r.out.end;
        stored = r.stored.end;
    }
    assert_eq!(out, header.original_len);
    assert_eq!(stored, blob.len() as u64);
    let again = header.to_bytes();
    let (back, _) = Header::parse(&again, None).expect("a parsed header writes back");
    assert_eq!(back, header);
    let len = header.original_len;
    for off in [0, len / 3, len / 2, len.saturating_sub(1)] {
        if let Some(d) = header.seek(off, true) {
            assert!(d >= off && d < len, "SEEK_DATA {off} -> {d} of {len}");
        }
        let h = header
            .seek(off, false)
            .expect("there is always a hole at the end");
        assert!(
            h >= off && h <= len.max(off),
            "SEEK_HOLE {off} -> {h} of {len}"
        );
        let zero = header.segments.iter().any(|s| s.kind == SegmentKind::Zero);
        assert!(
            zero || off >= len || h == len,
            "a hole without a zero segment"
        );
    }
    let opts = DecompressOptions {
        max_len: Some(MAX_DECODE),
        ..DecompressOptions::default()
    };
    if let Ok(back) = codec::decompress(&blob, None, &opts, &|_| {}) {
        assert_eq!(back.len() as u64, len);
        assert_eq!(blake3::hash(&back).as_bytes(), &header.checksum);
    }
}

/// The index record decoders: a decoded record encodes to one that decodes the same.
pub fn index_records(data: &[u8]) {
    if let Ok(inode) = Inode::decode(data) {
        let back = Inode::decode(&inode.encode()).expect("an encoded inode decodes");
        assert_eq!(back, inode);
    }
    if let Some((ino, kind, Some(cookie))) = decode_dirent_full(data) {
        assert_eq!(&encode_dirent(ino, kind, cookie)[..], data);
    }
}

/// A model that gives flat logits: the decoder's path (chunk table, range decoder,
/// mixing, tokenizer output) does not depend on the logits' values, and the real model
/// would cost ~10 ms a symbol.
pub(crate) struct FlatModel {
    pub(crate) lanes: usize,
    pub(crate) logits: Vec<f32>,
}

impl LanguageModel for FlatModel {
    fn n_vocab(&self) -> usize {
        self.logits.len()
    }
    fn n_lanes(&self) -> usize {
        self.lanes
    }
    fn reset_lane(&mut self, _lane: usize) -> Result<(), ModelError> {
        Ok(())
    }
    fn step(&mut self, _feeds: &[Feed]) -> Result<(), ModelError> {
        Ok(())
    }
    fn logits(&self, _feed_index: usize) -> &[f32] {
        &self.logits
    }
}

struct Jobs {
    jobs: std::vec::IntoIter<(usize, ChunkJob)>,
    out: Vec<Option<ChunkOutput>>,
}

impl JobSource for Jobs {
    fn next(&mut self, _block: bool, _background_ok: bool) -> Option<Taken> {
        self.jobs.next().map(|(id, job)| Taken::background(id, job))
    }
    fn finished(&mut self, id: usize, output: ChunkOutput) {
        self.out[id] = Some(output);
    }
}

/// The real tokenizer and vocabulary (from the installed GGUF) with flat logits.
pub struct FlatEngine {
    rt: ModelRuntime,
}

impl FlatEngine {
    pub fn load() -> Result<FlatEngine, String> {
        let path = crate::model::find_model(None).map_err(|e| e.to_string())?;
        let rt = ModelRuntime::load(&path).map_err(|e| e.to_string())?;
        Ok(FlatEngine { rt })
    }
}

impl Engine for FlatEngine {
    fn tokenizer(&self) -> &TextTokenizer {
        &self.rt.tokenizer
    }
    fn fingerprint(&self) -> [u8; 32] {
        [0xf; 32]
    }
    fn backend_tag(&self) -> &str {
        "fuzz"
    }
    fn default_params(&self) -> CoderParams {
        self.rt.default_params()
    }
    fn run(
        &self,
        params: &CoderParams,
        jobs: Vec<ChunkJob>,
        _progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<ChunkOutput>, ModelError> {
        let n = jobs.len();
        let mut lm = FlatModel {
            lanes: 4,
            logits: vec![0.0; self.rt.n_vocab()],
        };
        let mut src = Jobs {
            jobs: jobs.into_iter().enumerate().collect::<Vec<_>>().into_iter(),
            out: (0..n).map(|_| None).collect(),
        };
        run_lanes(&mut lm, params, &self.rt.allowed, 4, &mut src)?;
        src.out
            .into_iter()
            .map(|o| o.ok_or_else(|| ModelError::Runtime("lost".into())))
            .collect()
    }
}

/// The NC06 decoder on hostile blobs: without a model, and with the flat engine's
/// identity stamped in so the LLM path is reached. Errors are fine; a success is
/// byte-exact by its checksums.
pub fn nc06_decode(data: &[u8], engine: &FlatEngine) {
    let opts = DecompressOptions {
        max_len: Some(MAX_DECODE),
        ..DecompressOptions::default()
    };
    let blob = restamp(data);
    let _ = codec::decompress(&blob, None, &opts, &|_| {});
    if let Ok((mut h, len)) = Header::parse(&blob, Some(blob.len() as u64)) {
        if h.has_llm_segments() {
            h.model_fingerprint = engine.fingerprint();
            h.backend_tag = engine.backend_tag().to_string();
            let mut b = h.to_bytes();
            b.extend_from_slice(&blob[len..]);
            let _ = codec::decompress(&b, Some(engine), &opts, &|_| {});
        }
    }
}

/// Bytes read off the front of the fuzz input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u64(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | self.u8()? as u64;
        }
        Some(v)
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.u8().unwrap_or(0) as usize).min(max).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }
}

/// fsck on a backing directory (a copy of `template`, made in `scratch`) damaged as the
/// input says: index entries planted, removed or mutated (inodes, names, cookies,
/// xattrs, queue, graveyard, counters), blob and cache files overwritten, cut, removed
/// or planted. fsck must answer (a report or an error), never panic; after `--repair`
/// succeeds, a second check finds nothing it could have fixed.
pub fn fsck_mutated(data: &[u8], template: &Path, scratch: &Path) {
    let backing = scratch.join("backing");
    let _ = std::fs::remove_dir_all(&backing);
    copy_dir(template, &backing).expect("copying the template volume");
    let mut input = Input(data);
    {
        let Ok(store) = Store::open_existing(&backing) else {
            return;
        };
        let entries = store.raw_entries().unwrap_or_default();
        for _ in 0..8 {
            let Some(op) = input.u8() else { break };
            match op % 7 {
                0 | 1 => {
                    // A key of any kind: prefix, id, maybe a name or second id.
                    let prefix = b"idcxqgmpu"[input.u8().unwrap_or(0) as usize % 9];
                    let mut key = vec![prefix];
                    key.extend_from_slice(&input.u64().unwrap_or(1).to_be_bytes());
                    key.extend_from_slice(&input.bytes(16));
                    if op % 7 == 0 {
                        let _ = store.raw_insert(&key, &input.bytes(96));
                    } else {
                        let _ = store.raw_remove(&key);
                    }
                }
                2 => {
                    // An existing entry's value with bytes flipped, cut or grown.
                    if entries.is_empty() {
                        continue;
                    }
                    let (k, v) = &entries[input.u8().unwrap_or(0) as usize % entries.len()];
                    let mut v = v.clone();
                    let at = input.u8().unwrap_or(0) as usize;
                    let x = input.u8().unwrap_or(0xff);
                    match input.u8().unwrap_or(0) % 3 {
                        0 if !v.is_empty() => {
                            let i = at % v.len();
                            v[i] ^= x;
                        }
                        1 => v.truncate(at % (v.len() + 1)),
                        _ => v.extend_from_slice(&input.bytes(32)),
                    }
                    let _ = store.raw_insert(k, &v);
                }
                3 => {
                    // An existing entry removed.
                    if let Some((k, _)) =
                        entries.get(input.u8().unwrap_or(0) as usize % entries.len().max(1))
                    {
                        let _ = store.raw_remove(k);
                    }
                }
                _ => damage_file(&backing, op % 7, &mut input),
            }
        }
    }
    let check = |repair| {
        fsck(
            &backing,
            FsckOptions {
                repair,
                engine: None,
            },
        )
    };
    let _ = check(false);
    if let Ok(repaired) = check(true) {
        if let Ok(after) = check(false) {
            let left: Vec<_> = after.findings.iter().filter(|f| f.fixable).collect();
            assert!(
                left.is_empty(),
                "after a repair ({:?}) fsck still finds fixable problems: {left:?}",
                repaired.findings
            );
        }
    }
}

/// Damage a file in blobs/ or cache/: overwrite bytes, cut it, remove it, or plant one.
fn damage_file(backing: &Path, op: u8, input: &mut Input) {
    let dir = backing.join(if input.u8().unwrap_or(0) & 1 == 0 {
        "blobs"
    } else {
        "cache"
    });
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let pick = input.u8().unwrap_or(0) as usize;
    match (op, files.get(pick % files.len().max(1))) {
        (4, Some(f)) => {
            let at = input.u64().unwrap_or(0) % 4096;
            let bytes = input.bytes(64);
            if let Ok(file) = std::fs::OpenOptions::new().write(true).open(f) {
                let _ = std::os::unix::fs::FileExt::write_all_at(&file, &bytes, at);
            }
        }
        (5, Some(f)) => {
            let len = input.u64().unwrap_or(0) % 4096;
            if let Ok(file) = std::fs::OpenOptions::new().write(true).open(f) {
                let _ = file.set_len(len);
            }
        }
        (6, Some(f)) if pick & 0x80 != 0 => {
            let _ = std::fs::remove_file(f);
        }
        _ => {
            // A planted file with a name of the store's shapes (or not).
            let name: String = input
                .bytes(24)
                .iter()
                .map(|&b| b"0123456789-.abcdefntmp"[b as usize % 22] as char)
                .collect();
            if !name.is_empty() && name != "." && name != ".." {
                let _ = std::fs::write(dir.join(name), input.bytes(128));
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
            std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
    }
    Ok(())
}
