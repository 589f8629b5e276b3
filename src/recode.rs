//! `nacrithfs recode BACKING --to cpu|cuda`: re-encode every blob of another backend on
//! the backend at hand, so that an archive outlives the hardware that coded it.
//!
//! An LLM blob decodes only where the logits are reproduced bit for bit: on the backend
//! recorded in its header (CPU level and llama.cpp build, or GPU model, compute
//! capability and CUDA runtime). While both backends can run on one machine (a cuda
//! build on a GPU host runs both), this moves a volume's blobs from one to the other.
//!
//! Offline, like fsck: the index's lock refuses a mounted volume. Per file, in this
//! order (docs/DURABILITY.md, "Recode"): the plaintext (the clean copy when its BLAKE3 is
//! the blob's, else the old blob decoded); a new blob coded on the target and verified
//! by decoding it there (zstd if that fails); the new blob named and its directory
//! synced; one durable index batch that points the inode at it and puts the old blob in
//! the graveyard; the old blob deleted; its grave removed. A crash anywhere leaves the
//! old blob or the new one in use and the other reaped by the next mount's recovery, and
//! a rerun carries on where it stopped (blobs already on the target are skipped).
//! Files with equal content get one coding: the others become hard links of that blob.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::blobfile;
use crate::codec::container::Header;
use crate::codec::source::{FileSource, Source};
use crate::codec::{self, CodecError, CompressOptions, DecompressOptions, Engine, FileSink};
use crate::model::llama::{gpus, Device};
use crate::model::{ModelError, ModelRuntime};
use crate::pool::{self, LocalPool};
use crate::store::backends::{self, StoredFile};
use crate::store::{sync_dir, BlobRef, Store, StoreError, Txn};

/// The backend to move blobs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Cuda,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        match s {
            "cpu" => Ok(Target::Cpu),
            "cuda" | "gpu" => Ok(Target::Cuda),
            _ => Err(format!("unknown backend {s:?} (cpu or cuda)")),
        }
    }
}

pub struct Options<'a> {
    pub target: Target,
    pub model: PathBuf,
    /// Decode blobs of a backend not at hand with the target anyway (every checksum is
    /// still verified: a blob whose logits differ fails, and is left as it was).
    pub force_backend: bool,
    /// Count and say what would be done; change nothing.
    pub dry_run: bool,
    /// New blobs as files of their own, never packed (`--nopack`, as `-o nopack`).
    pub nopack: bool,
    /// Workers per device (None: the pool's default).
    pub workers: Option<usize>,
    /// Files (groups of equal files) recoded at once (None: every lane of the pool).
    pub jobs: Option<usize>,
    pub lanes: usize,
    /// Called after every file and periodically while coding.
    pub progress: &'a (dyn Fn(&Progress) + Sync),
}

/// The most files recoded at once unless `--jobs` says otherwise.
pub const DEFAULT_JOBS: usize = 64;

/// Where a run stands: files and plaintext bytes done of those to recode.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Symbols coded (encode, verify and decode all count).
    pub symbols: u64,
}

pub use crate::store::backends::{BackendCount, NO_MODEL};

#[derive(Debug, Default)]
pub struct Report {
    /// The target's backend tag.
    pub target_tag: String,
    pub before: BTreeMap<String, BackendCount>,
    pub after: BTreeMap<String, BackendCount>,
    /// Files given a newly coded blob.
    pub recoded: u64,
    /// Files given a second name of an equal file's new blob (no coding).
    pub linked: u64,
    /// Of `recoded`, those whose plaintext came from their clean copy (no decode).
    pub from_clean_copy: u64,
    /// Of `recoded`, those whose new blob did not verify and was stored with zstd.
    pub zstd_fallback: u64,
    /// Blob bytes of the recoded and linked files, before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Files left as they were, by reason (what their blob needs, or what failed).
    pub left: BTreeMap<String, u64>,
    /// Whether the volume had been stopped cleanly (then it is marked so again).
    pub was_clean: bool,
}

impl Report {
    pub fn files_left(&self) -> u64 {
        self.left.values().sum()
    }

    /// Add the counts of `part` (one group's outcome).
    fn absorb(&mut self, part: Report) {
        self.recoded += part.recoded;
        self.linked += part.linked;
        self.from_clean_copy += part.from_clean_copy;
        self.zstd_fallback += part.zstd_fallback;
        self.bytes_before += part.bytes_before;
        self.bytes_after += part.bytes_after;
        for (why, n) in part.left {
            *self.left.entry(why).or_default() += n;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecodeError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("{0}")]
    Setup(String),
}

/// A file whose LLM blob is of another backend (its header without the segment table:
/// only its checksum, length, model and backend are used).
type Candidate = StoredFile;

/// The engines a run may use: the target (loaded at once: its tag decides what is
/// foreign) and the other backend of this build (loaded when a blob of its tag comes).
struct Engines<'o> {
    opts: &'o Options<'o>,
    target: LocalPool,
    other: OnceLock<Option<LocalPool>>,
}

impl Engines<'_> {
    fn load(opts: &Options<'_>) -> Result<LocalPool, RecodeError> {
        match opts.target {
            Target::Cpu => {
                let runtime = ModelRuntime::load_on(&opts.model, &Device::Cpu)?;
                let workers = opts.workers.unwrap_or_else(pool::default_workers);
                Ok(LocalPool::new(runtime, workers, opts.lanes))
            }
            Target::Cuda => {
                if !cfg!(feature = "cuda") {
                    return Err(RecodeError::Setup(
                        "this nacrithfs is not a cuda build: build one with `scripts/setup --cuda` \
                         and run it on a machine with the GPU"
                            .into(),
                    ));
                }
                if gpus()?.is_empty() {
                    return Err(RecodeError::Setup(
                        "no usable GPU here (none present, driver too old, CUDA_VISIBLE_DEVICES \
                         empty, or NACRITH_CPU_ONLY set): --to cuda needs one"
                            .into(),
                    ));
                }
                Ok(pool::load(&opts.model, opts.workers, opts.lanes)?)
            }
        }
    }

    /// The other backend of this build: the CPU when the target is the GPU; the GPU
    /// when the target is the CPU and one is here.
    fn other(&self) -> Option<&LocalPool> {
        self.other
            .get_or_init(|| {
                let loaded = match self.opts.target {
                    Target::Cuda => ModelRuntime::load_on(&self.opts.model, &Device::Cpu)
                        .map(|r| Some(LocalPool::new(r, pool::default_workers(), self.opts.lanes))),
                    Target::Cpu => match gpus() {
                        Ok(g) if !g.is_empty() => {
                            pool::load(&self.opts.model, self.opts.workers, self.opts.lanes)
                                .map(Some)
                        }
                        _ => Ok(None),
                    },
                };
                loaded.unwrap_or_else(|e| {
                    log::warn!("recode: the other backend cannot be loaded: {e}");
                    None
                })
            })
            .as_ref()
    }

    /// An engine that decodes `header`'s blob, with the options to do it; else why not.
    fn decoder(&self, header: &Header) -> Result<(&dyn Engine, DecompressOptions), String> {
        let strict = DecompressOptions::default();
        let target: &dyn Engine = &self.target;
        let mismatch = match codec::check_engine(header, target, &strict) {
            Ok(_) => return Ok((target, strict)),
            Err(e) => e,
        };
        if let CodecError::ModelMismatch { .. } = mismatch {
            return Err(mismatch.to_string());
        }
        if let Some(other) = self.other() {
            if codec::check_engine(header, other, &strict).is_ok() {
                return Ok((other, strict));
            }
        }
        if self.opts.force_backend {
            let forced = DecompressOptions {
                force_backend: true,
                ..DecompressOptions::default()
            };
            return Ok((target, forced));
        }
        Err(format!(
            "coded on backend \"{}\", which is not here. {}",
            header.backend_tag,
            codec::backend_needed(&header.backend_tag)
        ))
    }
}

/// Re-encode on `opts.target` every blob of `backing` coded on another backend.
pub fn recode(backing: &Path, opts: &Options<'_>) -> Result<Report, RecodeError> {
    let store = Store::open_existing(backing).map_err(|e| match e {
        StoreError::Setup(s) if s.contains("in use") => {
            RecodeError::Setup(format!("{s}: unmount it first (recode runs offline)"))
        }
        e => RecodeError::Store(e),
    })?;
    let target = Engines::load(opts)?;
    let engines = Engines {
        opts,
        target,
        other: OnceLock::new(),
    };
    let target_tag = engines.target.backend_tag().to_string();
    let target_model = engines.target.fingerprint();
    // Equal content is coded once: grouped by the headers' BLAKE3 and length.
    // A blob of equal content already on the target (a rerun after a crash, or files
    // compressed there) is linked rather than coded again. Only what the grouping and
    // the engine check need is kept per file, not the blob's chunk table: a huge
    // file's is megabytes, and a volume holds millions of files.
    let mut groups: BTreeMap<([u8; 32], u64), Vec<Candidate>> = BTreeMap::new();
    let mut on_target: HashMap<([u8; 32], u64), (u64, BlobRef)> = HashMap::new();
    let before = backends::census(&store, |mut c| {
        if !c.header.has_llm_segments() {
            return;
        }
        let key = (c.header.checksum, c.header.original_len);
        if c.header.backend_tag == target_tag {
            // Shared with equal files only if it is also the target's model: a blob of
            // another model (a volume that holds two) would make their reads need a
            // model that is not loaded. (Such a blob is on the target already: left.)
            if c.header.model_fingerprint == target_model {
                on_target.insert(key, (c.ino, c.blob));
            }
        } else {
            c.header.segments = Vec::new();
            groups.entry(key).or_default().push(c);
        }
    })?;
    let mut report = Report {
        target_tag: target_tag.clone(),
        before,
        ..Report::default()
    };
    let progress = Progress {
        files_total: groups.values().map(|g| g.len() as u64).sum(),
        // (The files' sizes: a solid group's members share one header's length.)
        bytes_total: groups.values().flatten().map(|c| c.inode.size).sum(),
        ..Progress::default()
    };
    if opts.dry_run {
        for group in groups.values() {
            for c in group {
                // A clean copy serves as the plaintext if its BLAKE3 is the blob's
                // (checked in a real run); the dry run takes that on trust.
                match engines.decoder(&c.header) {
                    Err(why) if !c.inode.cached => *report.left.entry(why).or_default() += 1,
                    _ => report.recoded += 1,
                }
            }
        }
        report.after = report.before.clone();
        return Ok(report);
    }
    report.was_clean = store.take_clean_stop()?;
    (opts.progress)(&progress);
    // Symbols coded go to the progress callback at most once a second mid-file (a large
    // file takes hours on a CPU), and after every file.
    let shared = Mutex::new((progress, Instant::now()));
    let symbols = AtomicU64::new(0);
    let count = |n: usize| {
        let total = symbols.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if let Ok(mut g) = shared.try_lock() {
            if g.1.elapsed() >= Duration::from_secs(1) {
                g.0.symbols = total;
                g.1 = Instant::now();
                (opts.progress)(&g.0);
            }
        }
    };
    // Many groups at once, so that the pool's lanes fill as a mount's compressors fill
    // them (most files are one chunk: one lane each). Each group's steps keep their
    // order; groups are independent (different inodes, sequence numbers allocated
    // atomically, index commits serialized by the store).
    // At most DEFAULT_JOBS by default: a large file holds a window of up to 16 MiB
    // while it is coded.
    let jobs = opts
        .jobs
        .unwrap_or((engines.target.workers * engines.target.lanes).min(DEFAULT_JOBS));
    let work = Mutex::new(groups.into_iter());
    let total = Mutex::new(report);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, 256) {
            s.spawn(|| loop {
                let next = work.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some((key, group)) = next else {
                    return;
                };
                let n = group.len() as u64;
                let len: u64 = group.iter().map(|c| c.inode.size).sum();
                let existing = on_target.get(&key).copied();
                let mut part = Report::default();
                recode_group(&store, &engines, group, existing, &count, &mut part);
                total.lock().unwrap_or_else(|p| p.into_inner()).absorb(part);
                let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
                g.0.files_done += n;
                g.0.bytes_done += len;
                g.0.symbols = symbols.load(Ordering::Relaxed);
                (opts.progress)(&g.0);
            });
        }
    });
    let mut report = total.into_inner().unwrap_or_else(|p| p.into_inner());
    store.flush()?;
    if report.was_clean {
        store.mark_clean_stop()?;
    }
    report.after = backends::census(&store, |_| {})?;
    Ok(report)
}

/// The plaintext of a group, verified against the headers' BLAKE3: a member's clean
/// copy, else a member's blob decoded into an unnamed file. Returns it and whether it
/// was a clean copy; else why no member could give it.
fn plaintext(
    store: &Store,
    engines: &Engines<'_>,
    group: &[Candidate],
    count: &(dyn Fn(usize) + Sync),
) -> Result<(FileSource, bool), String> {
    let want = (&group[0].header.checksum, group[0].header.original_len);
    for c in group.iter().filter(|c| c.inode.cached) {
        let Ok(src) = FileSource::open(&store.cache_path(c.ino)) else {
            continue;
        };
        if src.len() == want.1 && blobfile::blake3_of(&src).ok().as_ref() == Some(want.0) {
            return Ok((src, true));
        }
    }
    let mut why = String::new();
    for c in group {
        let (engine, dopts) = match engines.decoder(&c.header) {
            Ok(x) => x,
            Err(e) => {
                why = e;
                continue;
            }
        };
        let decoded = (|| -> Result<FileSource, CodecError> {
            let blob = store.open_blob(c.ino, &c.blob)?;
            store.make_file_dir(true, c.ino)?;
            let file = blobfile::spool_file(&store.blob_dir_of(c.ino), c.ino)?;
            let mut sink = FileSink::new(&file);
            // decode_to checks the CRCs and the BLAKE3 of the whole.
            codec::decode_to(&blob, Some(engine), &dopts, count, &mut sink)?;
            sink.finish()?;
            Ok(FileSource::new(file)?)
        })();
        match decoded {
            Ok(src) => return Ok((src, false)),
            Err(e) => why = format!("its blob did not decode here: {e}"),
        }
    }
    Err(why)
}

/// Recode one group of equal files: code the first, link the rest to its new blob; or,
/// with `existing` (a blob of this content on the target: its inode and blob), link
/// them all to that.
fn recode_group(
    store: &Store,
    engines: &Engines<'_>,
    group: Vec<Candidate>,
    existing: Option<(u64, BlobRef)>,
    count: &(dyn Fn(usize) + Sync),
    report: &mut Report,
) {
    let leave = |why: String, n: u64, report: &mut Report| {
        log::debug!("recode: {n} file(s) left as they were: {why}");
        *report.left.entry(why).or_default() += n;
    };
    // Members of a solid group (several files' plaintexts in one blob: these candidates
    // share the group's header) keep their range of the same plaintext in the new blob,
    // which must be packed: a blob file has no ranges.
    let has_members = group.iter().any(|c| c.blob.member.is_some());
    let mut group = group;
    group.sort_by_key(|c| c.blob.member.is_some());
    if let Some((ino, blob)) = existing.filter(|(_, b)| b.pack.is_some() || !has_members) {
        let path = store.blob_path(ino, blob.seq);
        for c in &group {
            let new = |seq| BlobRef {
                seq,
                member: c.blob.member,
                ..blob
            };
            let done = match blob.pack {
                // A packed blob is shared by referring to its slot (the index counts).
                Some(_) => store
                    .alloc_blob_seq()
                    .map_err(|e| e.to_string())
                    .and_then(|seq| switch_blob(store, c, new(seq))),
                None => link_blob(store, c, &path, blob.stored_size),
            };
            match done {
                Ok(()) => {
                    report.linked += 1;
                    report.bytes_before += c.blob.share(c.inode.size);
                    report.bytes_after += new(0).share(c.inode.size);
                }
                Err(e) => leave(format!("switching to its new blob failed: {e}"), 1, report),
            }
        }
        return;
    }
    let (src, from_cache) = match plaintext(store, engines, &group, count) {
        Ok(x) => x,
        Err(why) => return leave(why, group.len() as u64, report),
    };
    let first = &group[0];
    // (A group is coded as one chunk, as the daemon coded it, and packed even with
    // --nopack.)
    let (new_blob, zstd) = match code_new_blob(
        store,
        engines,
        first.ino,
        &src,
        count,
        has_members || !engines.opts.nopack,
        has_members,
    ) {
        Ok(x) => x,
        Err(e) => {
            return leave(
                format!("coding a new blob failed: {e}"),
                group.len() as u64,
                report,
            )
        }
    };
    let new_len = new_blob.stored_size;
    for (i, c) in group.iter().enumerate() {
        let with_range = |seq| BlobRef {
            seq,
            member: c.blob.member,
            ..new_blob
        };
        let done = if c.blob.member.is_some() && new_blob.pack.is_none() {
            if i == 0 {
                // Nobody else can use it either (the members come last).
                let _ = std::fs::remove_file(store.blob_path(first.ino, new_blob.seq));
            }
            Err("its solid group's new blob could not be packed".to_string())
        } else if i == 0 {
            switch_blob(store, c, with_range(new_blob.seq))
        } else if new_blob.pack.is_some() {
            // Equal files (and a group's members) share a packed blob by its slot.
            store
                .alloc_blob_seq()
                .map_err(|e| e.to_string())
                .and_then(|seq| switch_blob(store, c, with_range(seq)))
        } else {
            link_blob(store, c, &store.blob_path(first.ino, new_blob.seq), new_len)
        };
        match done {
            Ok(()) => {
                report.bytes_before += c.blob.share(c.inode.size);
                report.bytes_after += with_range(0).share(c.inode.size);
                if i == 0 {
                    report.recoded += 1;
                    report.from_clean_copy += from_cache as u64;
                    report.zstd_fallback += zstd as u64;
                } else {
                    report.linked += 1;
                }
            }
            Err(e) => leave(format!("switching to its new blob failed: {e}"), 1, report),
        }
    }
}

/// Code `src` on the target into a new blob of `ino`, verified by decoding it (zstd if
/// the model's blob does not decode back), then appended to a pack (a small one) or
/// named and its directory synced. Returns it and whether it fell back to zstd.
fn code_new_blob(
    store: &Store,
    engines: &Engines<'_>,
    ino: u64,
    src: &FileSource,
    count: &(dyn Fn(usize) + Sync),
    pack: bool,
    one_chunk: bool,
) -> Result<(BlobRef, bool), CodecError> {
    let seq = store
        .alloc_blob_seq()
        .map_err(|e| CodecError::Io(std::io::Error::other(e.to_string())))?;
    let path = store.blob_path(ino, seq);
    let tmp = path.with_extension("tmp");
    let dir = store.blob_dir_of(ino);
    let copts = if one_chunk {
        CompressOptions {
            chunk_size: usize::try_from(src.len()).unwrap_or(usize::MAX).max(1024),
            head_chunk: 0,
            ..CompressOptions::default()
        }
    } else {
        CompressOptions::default()
    };
    let target: &dyn Engine = &engines.target;
    let coded = (|| -> Result<(u64, bool), CodecError> {
        store.make_file_dir(true, ino)?;
        let len = blobfile::write_tmp(&dir, ino, src, Some(target), &copts, count, &tmp)?;
        match blobfile::verify(&tmp, src, Some(target), count) {
            Ok(()) => Ok((len, false)),
            Err(e) => {
                log::error!(
                    "recode: inode {ino}: the new blob did not decode to the same bytes ({e}); storing it with zstd instead"
                );
                let len = blobfile::write_tmp(&dir, ino, src, None, &copts, &|_| {}, &tmp)?;
                blobfile::verify(&tmp, src, None, &|_| {})?;
                Ok((len, true))
            }
        }
    })();
    let (len, zstd) = match coded {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if pack && len <= crate::store::pack::PACK_MAX_BLOB {
        let packed = store.pack_blob(ino, &tmp);
        match packed {
            Ok(Some((p, plen))) => {
                let _ = std::fs::remove_file(&tmp);
                crate::crash::point("recode.after_blob");
                // Offline: no compaction runs meanwhile, nothing to hold.
                return Ok((
                    BlobRef {
                        seq,
                        stored_size: plen,
                        pack: Some(p.slot),
                        member: None,
                    },
                    zstd,
                ));
            }
            Ok(None) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(CodecError::Io(std::io::Error::other(e.to_string())));
            }
        }
    }
    if let Err(e) = std::fs::rename(&tmp, &path).and_then(|()| sync_dir(&dir)) {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    crate::crash::point("recode.after_blob");
    Ok((BlobRef::file(seq, len), zstd))
}

/// Give `c` a second name of the new blob at `new` (a hard link: no coding, no space),
/// then switch to it.
fn link_blob(store: &Store, c: &Candidate, new: &Path, len: u64) -> Result<(), String> {
    let seq = store.alloc_blob_seq().map_err(|e| e.to_string())?;
    let path = store.blob_path(c.ino, seq);
    let tmp = path.with_extension("tmp");
    let linked = store
        .make_file_dir(true, c.ino)
        .and_then(|()| std::fs::hard_link(new, &tmp))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .and_then(|()| sync_dir(&store.blob_dir_of(c.ino)));
    if let Err(e) = linked {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&path);
        return Err(format!("linking {}: {e}", path.display()));
    }
    crate::crash::point("recode.after_link");
    switch_blob(store, c, BlobRef::file(seq, len))
}

/// Point `c`'s inode at blob `new` (already durable) in one durable batch that also puts
/// its old blob in the graveyard; then delete the old blob and its grave. (A packed old
/// blob needs neither: the batch drops its reference, compaction its bytes.)
fn switch_blob(store: &Store, c: &Candidate, new: BlobRef) -> Result<(), String> {
    let new_path = store.blob_path(c.ino, new.seq);
    let drop_new = |why: String| {
        if new.pack.is_none() {
            let _ = std::fs::remove_file(&new_path);
        }
        Err(why)
    };
    // The index is ours alone (offline), but nothing is switched on a stale read.
    let mut inode = match store.get(c.ino) {
        Ok(Some(i)) if !i.dirty && i.blob == Some(c.blob) => i,
        Ok(_) => return drop_new("the file changed meanwhile".into()),
        Err(e) => return drop_new(e.to_string()),
    };
    inode.blob = Some(new);
    let mut txn = Txn::default();
    txn.put_inode(c.ino, &inode);
    txn.bury_blob(c.ino, &c.blob);
    // (A member's hint, keyed by its own content, names it already: the header's
    // BLAKE3 is its group's.)
    if c.blob.member.is_none() {
        txn.put_content_hint(&c.header.checksum, c.ino);
    }
    // Not applied: nothing names the new blob. Applied but not flushed: the index names
    // it (and may have it on disk), so both blobs stay (a later mount's reaper deletes
    // the old one once the switch is durable; its recovery the new one if it never is).
    if let Err(e) = store.commit(txn, false) {
        return drop_new(e.to_string());
    }
    if let Err(e) = store.flush() {
        return Err(format!(
            "the index flush after the switch failed ({e}); both blobs kept"
        ));
    }
    crate::crash::point("recode.after_commit");
    if c.blob.pack.is_some() {
        return Ok(());
    }
    let old = store.blob_path(c.ino, c.blob.seq);
    match std::fs::remove_file(&old) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // The grave stays: the next mount's reaper deletes it.
        Err(e) => {
            log::warn!("recode: cannot remove {}: {e}", old.display());
            return Ok(());
        }
    }
    crate::crash::point("recode.after_unlink");
    let mut txn = Txn::default();
    txn.unbury(c.ino, c.blob.seq);
    store.commit(txn, false).map_err(|e| e.to_string())
}
