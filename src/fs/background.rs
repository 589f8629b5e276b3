//! The threads that do the slow work away from the FUSE threads: the compressors (take
//! due files from the persistent queue, compress, verify, commit the blob durably; many
//! at once, all feeding the one shared worker pool) and the decoder (turns blobs back
//! into cached plaintext, only as far as readers need, and answers every request that
//! was waiting for it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::core::{Companion, Core, GroupMember, Need, NewBlob};
use crate::blobfile;
use crate::codec::lanes::{ChunkOutput, CANCELLED, READ_AHEAD, URGENT};
use crate::codec::params::CoderParams;
use crate::codec::segment;
use crate::codec::source::{FileSource, Source};
use crate::codec::{
    self, CodecError, CompressOptions, DecompressOptions, Engine, Plan, RegionKind,
};
use crate::pool::{Done, LocalPool, Submit, READ_LANES};
use crate::store::{sync_dir, BlobRef};

/// The background threads of one mount.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// After [`Core::shutdown`]: wait for the threads to stop, so no decode or reap is
    /// cut off by the process exit (leaving temp files in the backing directory) and the
    /// last reference to the core (and its read-only temp directory) goes away. The
    /// decoder and the reaper stop within a second, compressors within a model step (the
    /// pool's background jobs are stopped by the shutdown); none is waited for longer
    /// than `patience` (an uncommitted blob is harmless: recovery deletes it at the next
    /// mount, which then scans, the stop not being recorded as clean).
    /// Returns whether every thread stopped.
    pub fn finish(self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut threads = self.threads;
        while !threads.is_empty() && Instant::now() < deadline {
            let (done, running): (Vec<_>, Vec<_>) =
                threads.into_iter().partition(|t| t.is_finished());
            for t in done {
                let name = t.thread().name().unwrap_or("background").to_string();
                if t.join().is_err() {
                    log::error!("thread {name} panicked");
                }
            }
            threads = running;
            std::thread::sleep(Duration::from_millis(20));
        }
        for t in &threads {
            log::info!(
                "not waiting for {} at unmount",
                t.thread().name().unwrap_or("a background thread")
            );
        }
        threads.is_empty()
    }
}

pub fn start(core: Arc<Core>, need_rx: Receiver<Need>) -> std::io::Result<Workers> {
    let mut threads = Vec::new();
    // A read-only mount leaves the blobs as they are; queued files wait for a
    // read-write mount.
    if !core.opts.read_only {
        // One compressor per lane the pool has for background work, so even a corpus of
        // one-chunk files keeps every lane busy; each waits on the pool, not the CPU.
        let compressors = (crate::pool::total_workers(core.opts.workers) * core.opts.batch)
            .clamp(1, MAX_COMPRESSORS);
        let budget = Arc::new(Budget::new(COMPRESS_BUDGET));
        for i in 0..compressors {
            let c = core.clone();
            let b = budget.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("nacrith-compress-{i}"))
                    .spawn(move || compressor(&c, &b))?,
            );
        }
    }
    if !core.opts.read_only {
        let c = core.clone();
        threads.push(
            std::thread::Builder::new()
                .name("nacrith-reaper".into())
                .spawn(move || reaper(&c))?,
        );
        let c = core.clone();
        threads.push(
            std::thread::Builder::new()
                .name("nacrith-compact".into())
                .spawn(move || compactor(&c))?,
        );
    }
    threads.push(
        std::thread::Builder::new()
            .name("nacrith-decode".into())
            .spawn(move || decoder(&core, need_rx))?,
    );
    Ok(Workers { threads })
}

/// Deletes the files in the graveyard once the index that stopped needing them is
/// durable: woken by deletions and superseded blobs, at most every REAP_EVERY.
fn reaper(core: &Core) {
    const REAP_EVERY: Duration = Duration::from_millis(500);
    while core.wait_for_reap(crate::fs::core::GROUP_COMMIT) {
        // The group commit of sizes and times of files being written.
        if let Err(e) = core.sync_metadata() {
            log::error!("committing the sizes of files being written: errno {e}");
        }
        core.reap();
        std::thread::sleep(REAP_EVERY);
    }
}

/// Compacts packs every COMPACT_EVERY (each pass O(packs); see `core/compact.rs`).
fn compactor(core: &Core) {
    const COMPACT_EVERY: Duration = Duration::from_secs(300);
    let mut last = Instant::now();
    while core.wait_for_work(Duration::from_secs(5)) {
        if last.elapsed() < COMPACT_EVERY {
            continue;
        }
        last = Instant::now();
        if let Err(e) = core.compact_packs() {
            log::error!("compaction: errno {e}");
        }
    }
}

const MAX_COMPRESSORS: usize = 64;
/// Bytes of plaintext windows being compressed at once (each costs a few times this in
/// tokens, coded bytes and its verifying decode, plus a zstd context). A compression
/// takes at most one window of it, whatever the file's size.
const COMPRESS_BUDGET: u64 = 4 * codec::WINDOW as u64;

/// A byte budget shared by the compressors.
struct Budget {
    used: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
    cap: u64,
}

impl Budget {
    fn new(cap: u64) -> Budget {
        Budget {
            used: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
            cap,
        }
    }

    /// Take `n` bytes (all of it if `n` exceeds the cap: then only when nothing else runs).
    fn take(&self, n: u64) -> u64 {
        let n = n.min(self.cap);
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used + n > self.cap {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
        n
    }

    fn give(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

/// Bytes of the budget a compression holds, given back when it is dropped.
struct Taken<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.budget.give(self.n);
    }
}

fn compressor(core: &Core, budget: &Budget) {
    loop {
        if core.is_shutting_down() {
            return;
        }
        // Read before the scan: anything queued after it makes the wait below return.
        let seen = core.due_generation();
        match core.next_due() {
            Ok(Ok(ino)) => {
                // A bug in the coder must not stop the queue or lose the file: it stays
                // plaintext and is retried later.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    compress_one(core, budget, ino)
                }));
                if r.is_err() {
                    log::error!("compressing inode {ino} panicked; it stays uncompressed");
                    core.compression_failed(ino);
                }
            }
            Ok(Err(wait)) => {
                if !core.wait_for_due(wait, seen) {
                    return;
                }
            }
            Err(e) => {
                log::error!("compression queue unreadable (errno {e}); retrying in 5 s");
                if !core.wait_for_work(Duration::from_secs(5)) {
                    return;
                }
            }
        }
    }
}

fn compress_one(core: &Core, budget: &Budget, ino: u64) {
    let (path, version, companions) = match core.claim_group(ino) {
        Ok(Some(claimed)) => claimed,
        Ok(None) => return,
        Err(e) => {
            log::error!("claiming inode {ino} for compression: errno {e}; retried later");
            // Queued for later, not due again at once (a compressor would spin on it).
            core.compression_failed(ino);
            return;
        }
    };
    // Let go however this ends, unless the group takes them.
    let mut held = Held {
        core,
        list: companions,
    };
    let start = Instant::now();
    let name = core.describe(ino);
    let fail = |why: String| end_claim(core, ino, version, &name, why);
    // The length is fixed here: bytes appended meanwhile change the version, and the
    // commit is refused; a shrunk file fails the read.
    let src = match FileSource::open(&path) {
        Ok(s) => s,
        Err(e) => return fail(format!("reading its plaintext: {e}")),
    };
    let size = src.len();
    if size > core.opts.compress_max {
        log::warn!(
            "{name} is {size} bytes, over compress_max ({}): it stays uncompressed",
            core.opts.compress_max
        );
        return core.compression_skipped(ino);
    }
    // Given back on every way out, a panic in the coder included (a budget kept by
    // a panicked compression would stop every compressor after a few).
    let _taken = Taken {
        budget,
        n: budget.take(size.min(codec::WINDOW as u64)),
    };
    compress_file(core, ino, version, &name, &src, start, &fail, &mut held);
    core.count_compress_time(start.elapsed());
}

/// Files claimed with the one being compressed, for its solid group: let go (still
/// due, for another compressor) unless the group takes them, however the compression
/// ends (a panic in the coder included).
struct Held<'a> {
    core: &'a Core,
    list: Vec<Companion>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for c in self.list.drain(..) {
            self.core.compression_interrupted(c.ino);
        }
    }
}

/// The companions a solid group took: each one's compression is ended by the group
/// (committed, failed, let go); a panic in the coder before that ends them here, as a
/// failure (the compressor's `catch_unwind` ends only the first file's).
struct Joining<'a> {
    core: &'a Core,
    inos: Vec<u64>,
}

impl Joining<'_> {
    /// The group ended every companion's compression.
    fn done(&mut self) {
        self.inos.clear();
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        for &ino in &self.inos {
            self.core.compression_failed(ino);
        }
    }
}

/// End the claim of `ino` (read at `version`) whose compression could not go on.
fn end_claim(core: &Core, ino: u64, version: u64, name: &str, why: String) {
    if core.is_shutting_down() {
        log::info!("compressing {name}: stopped by the unmount ({why}); it stays queued");
        return core.compression_interrupted(ino);
    }
    // The file is read while it is coded, not copied first: a write, truncation or
    // deletion meanwhile makes a short read or a verify mismatch that says nothing
    // about the coder. Such a compression is superseded, as at commit.
    if core.changed_since(ino, version) {
        log::debug!("{name} changed while compressing ({why}); dropped");
        return core.compression_superseded(ino);
    }
    log::error!("compressing {name}: {why}; it stays uncompressed and will be retried");
    core.compression_failed(ino);
}

/// Whether a file of `size` bytes is coded in a solid group: groups are on (they live
/// in packs), and the file is at most half a group.
fn groups_small_files(core: &Core, size: u64) -> bool {
    core.opts.pack && size > 0 && size <= core.opts.group / 2
}

/// The file a compressor claimed, about to be coded.
struct Claimed<'a> {
    ino: u64,
    version: u64,
    name: String,
    src: &'a FileSource,
    content: [u8; 32],
}

/// A file claimed to join a solid group: its plaintext read whole (at most half a
/// group) and hashed.
struct Joined {
    ino: u64,
    version: u64,
    name: String,
    src: FileSource,
    bytes: Vec<u8>,
    content: [u8; 32],
}

impl AsRef<[u8]> for Joined {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Code `first` with other due small files as one solid group: their plaintexts one
/// after the other, coded as one chunk (each file with the ones before it as context:
/// the cold start of a small file is most of its cost), packed as one blob, and every
/// member committed in one index batch (docs/DURABILITY.md, "solid group"). Returns
/// false when no other file joins, `first` is binary (see [`segment::has_text`]), or
/// the group's blob does not pack: `first` is still
/// claimed and the caller codes it on its own. True: `first`'s compression has ended.
/// Every companion's compression is ended on every way out but a panic (the caller's
/// [`Joining`] guard ends them then).
#[allow(clippy::too_many_arguments)]
fn compress_group(
    core: &Core,
    engine: &dyn Engine,
    first: Claimed,
    claimed: Vec<Companion>,
    seq: u64,
    tmp: &std::path::Path,
    start: Instant,
    fail: &dyn Fn(String),
) -> bool {
    let each = core.opts.group / 2;
    // The group's plaintext starts with the first file's (read once: it also steers the
    // choice of the others). Read before the candidates: a binary first file is coded
    // alone, and then none of them needs reading.
    let mut plain = match first.src.read_range(0..first.src.len()) {
        Ok(b) => b,
        Err(e) => {
            for c in &claimed {
                core.compression_interrupted(c.ino);
            }
            fail(format!("reading its plaintext: {e}"));
            return true;
        }
    };
    if !segment::has_text(&plain) {
        // Binary: coded alone it needs no model to be read (see below).
        for c in &claimed {
            core.compression_interrupted(c.ino);
        }
        return false;
    }
    let mut companions = Vec::new();
    for Companion { ino, path, version } in claimed {
        let name = core.describe(ino);
        let read = FileSource::open(&path).and_then(|src| {
            if src.len() > each || src.is_empty() {
                // Not what the index said: a write or truncation under way (its commit
                // would be refused anyway).
                return Ok(None);
            }
            let bytes = src.read_range(0..src.len())?;
            Ok(Some((src, bytes)))
        });
        let (src, bytes) = match read {
            Ok(Some(r)) => r,
            Ok(None) => {
                core.compression_superseded(ino);
                continue;
            }
            Err(e) => {
                end_claim(
                    core,
                    ino,
                    version,
                    &name,
                    format!("reading its plaintext: {e}"),
                );
                continue;
            }
        };
        if !segment::has_text(&bytes) {
            // Binary alone, it needs no model to be read; in a group it would need the
            // model that decodes the others. Let go: still due, coded alone.
            core.compression_interrupted(ino);
            continue;
        }
        let content: [u8; 32] = blake3::hash(&bytes).into();
        if core.opts.dedup {
            // Equal to a stored file: it goes on its own, where it shares that blob
            // (the claim ends, the file stays due; a stale hint only costs it a turn).
            if matches!(core.store.content_hint(&content), Ok(Some(_))) {
                core.compression_interrupted(ino);
                continue;
            }
            // Equal to a file being coded now: it waits for that one's blob.
            if !core.start_coding(ino, &content) {
                continue;
            }
        }
        companions.push(Joined {
            ino,
            version,
            name,
            src,
            bytes,
            content,
        });
    }
    if companions.is_empty() {
        return false;
    }
    // The group: the candidates most like the files in it so far, up to its size; the
    // others are let go (still due: the next compressor groups them).
    let room = core.opts.group.saturating_sub(first.src.len());
    let release = |companions: &[Joined]| {
        for c in companions {
            core.compression_interrupted(c.ino);
        }
    };
    let (companions, others) = pick_similar(&plain, companions, room);
    release(&others);
    if companions.is_empty() {
        return false;
    }
    let fail_all = |why: String| {
        for c in &companions {
            end_claim(core, c.ino, c.version, &c.name, why.clone());
        }
        fail(why);
    };
    // The group's plaintext, and each member's place in it.
    let mut members = vec![GroupMember {
        ino: first.ino,
        version: first.version,
        offset: 0,
        size: plain.len() as u64,
        content: first.content,
    }];
    for c in &companions {
        members.push(GroupMember {
            ino: c.ino,
            version: c.version,
            offset: plain.len() as u64,
            size: c.bytes.len() as u64,
            content: c.content,
        });
        plain.extend_from_slice(&c.bytes);
    }
    let group_len = plain.len() as u64;
    let count = |n: usize| core.count_symbols(n as u64);
    if let Err(e) = code_into_tmp(core, first.ino, &plain, Some(engine), tmp, true) {
        fail_all(e.to_string());
        return true;
    }
    if core.opts.verify {
        // Checked against the copy that was coded: a mismatch is the coder's, whatever
        // the files did meanwhile (their changes are caught at commit).
        if let Err(e) = verify_tmp(core, tmp, &plain, Some(engine), &count) {
            if core.is_shutting_down() {
                fail_all(e.to_string());
                return true;
            }
            log::error!(
                "compressing a group of {} files: the new blob did not decode to the same bytes ({e}); storing it with zstd instead",
                members.len()
            );
            core.count_verify_failure();
            let fallback = code_into_tmp(core, first.ino, &plain, None, tmp, true)
                .and_then(|_| verify_tmp(core, tmp, &plain, None, &|_| {}));
            if let Err(e) = fallback {
                fail_all(format!("the zstd fallback did not verify either: {e}"));
                return true;
            }
        }
    }
    // Held until the commit is done: compaction leaves the pack alone meanwhile.
    let (pending, blob_len) = match core.store.pack_blob(first.ino, tmp) {
        Ok(Some(p)) => p,
        Ok(None) => {
            log::warn!("a group's blob does not pack; its files are coded on their own");
            release(&companions);
            return false;
        }
        Err(e) => {
            fail_all(format!("appending its blob to a pack: {e}"));
            return true;
        }
    };
    let _ = std::fs::remove_file(tmp);
    let slot = pending.slot;
    crate::crash::point("group.after_pack");
    // Every member's plaintext becomes its clean copy: on disk before the index says so.
    let mut dirs = std::collections::BTreeSet::new();
    let mut synced = first.src.file().sync_all();
    dirs.insert(core.store.cache_dir_of(first.ino));
    for c in &companions {
        synced = synced.and_then(|()| c.src.file().sync_all());
        dirs.insert(core.store.cache_dir_of(c.ino));
    }
    for d in &dirs {
        synced = synced.and_then(|()| sync_dir(d));
    }
    if let Err(e) = synced {
        fail_all(format!("syncing the plaintexts of its group: {e}"));
        return true;
    }
    pause_before_commit(&format!(
        "{} at {}",
        core.store.packs().path(slot.pack).display(),
        slot.offset
    ));
    let n = members.len();
    match core.commit_group(&members, seq, blob_len, slot, group_len) {
        Ok(done) => {
            drop(pending);
            log::info!(
                "compressed a group of {n} files ({} and {} more): {group_len} -> {blob_len} bytes ({:.3} bits/byte) in {:.1} s{}",
                first.name,
                n - 1,
                codec::bits_per_byte(blob_len, group_len),
                start.elapsed().as_secs_f64(),
                match n - done.len() {
                    0 => String::new(),
                    k => format!("; {k} changed meanwhile and stay dirty"),
                }
            );
        }
        Err(e) => {
            drop(pending);
            // Every member's compression ended in `commit_group`.
            log::error!(
                "compressing a group of {n} files ({} and {} more): committing: errno {e}; they stay uncompressed and will be retried",
                first.name,
                n - 1
            );
            for m in &members {
                core.compression_failed(m.ino);
            }
        }
    }
    core.enforce_cache_cap();
    true
}

/// The 8-byte shingles of `data`, one in four kept (by a hash of the shingle, so the
/// same ones in every file): what files share, at a quarter of the cost.
fn shingles(data: &[u8]) -> std::collections::HashSet<u64> {
    data.windows(8)
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .filter(|&v| v.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62 == 0)
        .collect()
}

/// Split `candidates` into a solid group (in the order to code them) and the rest:
/// starting from `first`, each next member is the candidate whose shingles are most
/// contained in the group's so far (files with a close neighbour code like the reference
/// method measured in the README: -40% of coded bytes), ties and files with nothing in
/// common in due order, while the members fit `room` bytes.
fn pick_similar<T: AsRef<[u8]>>(first: &[u8], candidates: Vec<T>, room: u64) -> (Vec<T>, Vec<T>) {
    let mut seen = shingles(first);
    let mut left: Vec<(T, std::collections::HashSet<u64>)> = candidates
        .into_iter()
        .map(|c| {
            let s = shingles(c.as_ref());
            (c, s)
        })
        .collect();
    let mut group = Vec::new();
    let mut room = room;
    loop {
        let best = left
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| c.as_ref().len() as u64 <= room)
            .map(|(i, (_, s))| {
                let shared = s.iter().filter(|v| seen.contains(v)).count();
                // Containment as a fraction, compared without floats.
                (i, shared as u128, s.len().max(1) as u128)
            })
            .fold(
                None,
                |best: Option<(usize, u128, u128)>, (i, n, d)| match best {
                    Some((_, bn, bd)) if n * bd <= bn * d => best,
                    _ => Some((i, n, d)),
                },
            );
        let Some((i, _, _)) = best else { break };
        let (c, s) = left.remove(i);
        room -= c.as_ref().len() as u64;
        seen.extend(s);
        group.push(c);
    }
    (group, left.into_iter().map(|(c, _)| c).collect())
}

/// Code `src` (with the model, or zstd alone) into the new blob's temp file, durably.
/// Returns the blob's length.
/// `one_chunk`: a solid group, coded as one chunk (each file with the ones before it as
/// context), not cut at the mount's chunk size.
fn code_into_tmp(
    core: &Core,
    ino: u64,
    src: &dyn Source,
    engine: Option<&dyn Engine>,
    tmp: &std::path::Path,
    one_chunk: bool,
) -> Result<u64, CodecError> {
    let opts = if one_chunk {
        let whole = usize::try_from(src.len()).unwrap_or(usize::MAX).max(1024);
        CompressOptions {
            chunk_size: whole,
            head_chunk: 0,
            ..CompressOptions::default()
        }
    } else {
        CompressOptions {
            chunk_size: core.opts.chunk_size,
            head_chunk: core.opts.head_chunk,
            ..CompressOptions::default()
        }
    };
    // Symbols coded, for the status (tokens/s); counted as they go, failures included.
    let count = |n: usize| core.count_symbols(n as u64);
    let coding = Instant::now();
    let len = blobfile::write_tmp(
        &core.store.blob_dir_of(ino),
        ino,
        src,
        engine,
        &opts,
        &count,
        tmp,
    );
    core.count_coding_time(coding.elapsed());
    let len = len?;
    crate::crash::point("compress.after_blob_tmp");
    crate::crash::panic_point("compress.after_blob_tmp");
    Ok(len)
}

/// Decode the blob in `tmp` and compare it with `src` byte for byte.
fn verify_tmp(
    core: &Core,
    tmp: &std::path::Path,
    src: &dyn Source,
    engine: Option<&dyn Engine>,
    count: &(dyn Fn(usize) + Sync),
) -> Result<(), CodecError> {
    let coding = Instant::now();
    let checked = blobfile::verify(tmp, src, engine, count);
    core.count_coding_time(coding.elapsed());
    checked
}

#[allow(clippy::too_many_arguments)]
fn compress_file(
    core: &Core,
    ino: u64,
    version: u64,
    name: &str,
    src: &FileSource,
    start: Instant,
    fail: &dyn Fn(String),
    held: &mut Held,
) {
    // Without the model nothing is compressed (not even with zstd): a text file stored
    // with zstd now would stay that way, so it waits as plaintext for the model.
    let pool = match core.engine.get() {
        Ok(p) => p,
        Err(e) => return fail(format!("the model is unavailable: {e}")),
    };
    let engine: &dyn Engine = &*pool;
    let count = |n: usize| core.count_symbols(n as u64);
    let content = match blobfile::blake3_of(src) {
        Ok(h) => h,
        Err(e) => return fail(format!("reading its plaintext: {e}")),
    };
    if core.opts.dedup && !core.start_coding(ino, &content) {
        log::debug!("{name} is equal to a file being compressed now: it waits to share its blob");
        return;
    }
    let seq = match core.store.alloc_blob_seq() {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let blob_path = core.store.blob_path(ino, seq);
    let tmp = blob_path.with_extension("tmp");
    // Removed on every way out but a commit, a panic in the coder included.
    let mut leftovers = Leftovers {
        tmp: &tmp,
        blob: Some(&blob_path),
    };
    if let Err(e) = core.store.make_file_dir(true, ino) {
        return fail(format!(
            "making the directory of {}: {e}",
            blob_path.display()
        ));
    }
    let shared = if core.opts.dedup {
        share_equal_blob(core, engine, &content, src.len(), &tmp)
    } else {
        None
    };
    if shared.is_none() && !held.list.is_empty() && groups_small_files(core, src.len()) {
        let claimed = std::mem::take(&mut held.list);
        let first = Claimed {
            ino,
            version,
            name: name.to_string(),
            src,
            content,
        };
        let mut joining = Joining {
            core,
            inos: claimed.iter().map(|c| c.ino).collect(),
        };
        let handled = compress_group(core, engine, first, claimed, seq, &tmp, start, fail);
        joining.done();
        if handled {
            return;
        }
    }
    let mut blob_len = match shared {
        Some(s) => s.len,
        None => match code_into_tmp(core, ino, src, Some(engine), &tmp, false) {
            Ok(n) => n,
            Err(e) => return fail(e.to_string()),
        },
    };
    // A shared blob was verified when it was first written; it is the same file.
    if core.opts.verify && shared.is_none() {
        if let Err(e) = verify_tmp(core, &tmp, src, Some(engine), &count) {
            // (An unmount stops the verifying decode: no verify failure, nothing stored.)
            if core.changed_since(ino, version) || core.is_shutting_down() {
                return fail(e.to_string());
            }
            // Invariant: never replace plaintext with a blob that did not decode back.
            log::error!(
                "compressing {name}: the new blob did not decode to the same bytes ({e}); storing it with zstd instead"
            );
            core.count_verify_failure();
            blob_len = match code_into_tmp(core, ino, src, None, &tmp, false) {
                Ok(n) => n,
                Err(e) => return fail(e.to_string()),
            };
            if let Err(e) = verify_tmp(core, &tmp, src, None, &|_| {}) {
                return fail(format!("the zstd fallback did not verify either: {e}"));
            }
        }
    }
    // Where the blob goes: the slot it shares, a pack (small blobs), or its own file.
    let mut pack = shared.and_then(|s| s.pack);
    // Held until the commit is done: compaction leaves the pack alone meanwhile.
    let mut _pending = None;
    if shared.is_none() && core.opts.pack && blob_len <= crate::store::pack::PACK_MAX_BLOB {
        match core.store.pack_blob(ino, &tmp) {
            Ok(Some((p, len))) => {
                let _ = std::fs::remove_file(&tmp);
                pack = Some(p.slot);
                _pending = Some(p);
                blob_len = len;
            }
            Ok(None) => {}
            Err(e) => return fail(format!("appending its blob to a pack: {e}")),
        }
    }
    let blob_place = match pack {
        Some(slot) => format!(
            "{} at {}",
            core.store.packs().path(slot.pack).display(),
            slot.offset
        ),
        None => blob_path.display().to_string(),
    };
    if pack.is_none() {
        if let Err(e) = publish_blob(&tmp, &blob_path) {
            return fail(format!("writing {}: {e}", blob_path.display()));
        }
    }
    // The plaintext becomes the clean copy: it must be on disk before the index says
    // so (a write after this point changes the version, and the commit is refused).
    let plain = core.store.cache_path(ino);
    let synced = src
        .file()
        .sync_all()
        .and_then(|()| sync_dir(&core.store.cache_dir_of(ino)));
    if let Err(e) = synced {
        return fail(format!("syncing {}: {e}", plain.display()));
    }
    crate::crash::point("compress.after_plain_sync");
    pause_before_commit(&blob_place);
    let took = start.elapsed();
    let size = src.len();
    let blob = NewBlob {
        seq,
        stored_size: blob_len,
        original: size,
        content,
        shared: shared.is_some(),
        pack,
        member: shared.and_then(|s| s.member),
    };
    match core.commit_blob(ino, version, &blob) {
        Ok(true) => {
            // The index refers to it now: it stays.
            leftovers.blob = None;
            if let Some(Shared { owner, .. }) = shared {
                crate::crash::point("dedup.after_commit");
                log::info!(
                    "compressed {name}: {size} bytes, equal to a file already stored (inode {owner}): shares its {blob_len}-byte blob"
                );
            } else {
                log::info!(
                    "compressed {name}: {size} -> {blob_len} bytes ({:.3} bits/byte) in {:.1} s",
                    codec::bits_per_byte(blob_len, size),
                    took.as_secs_f64()
                );
            }
        }
        Ok(false) => log::debug!("{name} changed while compressing; blob dropped"),
        Err(e) => {
            // Not through `fail`: `commit_blob` has ended the compression, which may
            // have dropped the file's in-memory state, and `changed_since` would then
            // call an unchanged file changed (superseded, due again at once, the error
            // hidden) instead of failed (retried after RETRY_AFTER, logged).
            log::error!(
                "compressing {name}: committing the blob: errno {e}; it stays uncompressed and will be retried"
            );
            core.compression_failed(ino);
        }
    }
    core.enforce_cache_cap();
}

/// The files a compression made that nothing refers to yet: its temp blob, and its blob
/// file until the commit names it. Removed when the compression ends however it ends (a
/// panic in the coder included, which used to leave them until the next unclean mount's
/// recovery); a crash leaves them to that recovery (docs/DURABILITY.md).
struct Leftovers<'a> {
    tmp: &'a std::path::Path,
    blob: Option<&'a std::path::Path>,
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.tmp);
        if let Some(b) = self.blob {
            let _ = std::fs::remove_file(b);
        }
    }
}

/// A blob another file already stores with the same content.
#[derive(Clone, Copy)]
struct Shared {
    len: u64,
    /// The inode whose blob it was.
    owner: u64,
    /// Its slot when packed (shared by reference); None: `tmp` is a hard link to it.
    pack: Option<crate::store::PackSlot>,
    /// A member of a solid group: the range shared.
    member: Option<crate::store::Member>,
}

/// Deduplication: if the content hint for `content` names a file whose blob still exists, holds
/// this plaintext (its header's length and BLAKE3) and decodes with this model and
/// backend, share it: a blob file gets a second name, `tmp` (a hard link: the backing
/// filesystem counts the references, and the blocks are freed with the last name); a
/// packed blob is referred to by its slot (the index counts the references, checked
/// again at commit). None (code the file) on any doubt.
fn share_equal_blob(
    core: &Core,
    engine: &dyn Engine,
    content: &[u8; 32],
    size: u64,
    tmp: &std::path::Path,
) -> Option<Shared> {
    // The file the hint names, as the index has it now (deleted or not compressed any
    // more: nothing to share; rewritten since: its header's BLAKE3 differs, below).
    let owner = core.store.content_hint(content).ok()??;
    let owner_inode = core.store.get(owner).ok()??;
    let blob_ref = owner_inode.blob?;
    if let Some(m) = blob_ref.member {
        // A member's range holds this plaintext if its length and the BLAKE3's second
        // half (in its record) are this file's, the first half being the hint's key.
        // Its length is the file's size only while the file is clean.
        if owner_inode.dirty
            || owner_inode.size != size
            || m.tail != crate::store::Member::tail_of(content)
            || m.offset
                .checked_add(size)
                .is_none_or(|end| end > m.group_len)
        {
            return None;
        }
    }
    if let Some(slot) = blob_ref.pack {
        // A packed blob nobody refers to any more (its file deleted or rewritten since
        // the read above) cannot be shared: the commit would refuse it. Coded instead,
        // the file's blob becomes the hint. (Gone after this check: the commit refuses
        // it and the file is due again at once.)
        if core.store.slot_refs(slot).ok()?.is_empty() {
            return None;
        }
    }
    let blob = core.store.open_blob(owner, &blob_ref).ok()?;
    let (header, _) = codec::container::Header::read_from(&blob).ok()?;
    let holds = match blob_ref.member {
        Some(m) => header.original_len == m.group_len,
        None => header.original_len == size && header.checksum == *content,
    };
    if !holds {
        return None;
    }
    if header.has_llm_segments()
        && codec::check_engine(&header, engine, &DecompressOptions::default()).is_err()
    {
        return None;
    }
    if let Some(slot) = blob_ref.pack {
        return Some(Shared {
            len: blob_ref.stored_size,
            owner,
            pack: Some(slot),
            member: blob_ref.member,
        });
    }
    // The blob's name may go (its file deleted) before the link: then there is nothing
    // to share and the file is coded.
    let path = core.store.blob_path(owner, blob_ref.seq);
    if let Err(e) = std::fs::hard_link(&path, tmp) {
        log::debug!("sharing {}: {e}", path.display());
        return None;
    }
    crate::crash::point("dedup.after_link");
    Some(Shared {
        len: blob.len(),
        owner,
        pack: None,
        member: None,
    })
}

/// A verified blob's temp file takes its name, durably: rename, fsync of blobs/ (each
/// step a crash point). Until the index commits it, recovery deletes it as a blob
/// nothing refers to of a live inode.
fn publish_blob(tmp: &std::path::Path, path: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    crate::crash::point("compress.after_blob_rename");
    sync_dir(path.parent().unwrap_or(path))?;
    crate::crash::point("compress.after_blob_dir_sync");
    Ok(())
}

/// Fault injection for the crash test: with NACRITHFS_FAULT_PAUSE_BEFORE_COMMIT_MS set,
/// wait that long between writing a blob durably and committing it to the index, so a
/// kill lands exactly mid-commit. Never set in normal use.
fn pause_before_commit(blob: &str) {
    static PAUSE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("NACRITHFS_FAULT_PAUSE_BEFORE_COMMIT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(ms) = *pause {
        log::warn!("fault injection: {blob} is written, pausing {ms} ms before committing it");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Members installed with the one a group was decoded for (each an fsync, a rename and
/// an index write on the decoder's thread).
const MAX_SIBLINGS: usize = 32;

/// Where a member of a solid group has its group decoded (a temp file like the file's
/// own, removed once the member is out of it, and by recovery and fsck as any temp).
fn group_tmp_path(core: &Core, ino: u64) -> PathBuf {
    core.store.cache_tmp_path(ino).with_extension("group.tmp")
}

/// Regions decoded past the last one a reader asked for. Sequential readers find the
/// next chunks decoded (or decoding) when they get there; a reader that only wants the
/// first page does not pay for the whole book.
const READ_AHEAD_REGIONS: usize = 4;
/// A partial decode nobody has touched for this long is dropped (its temp file too).
const PARTIAL_IDLE: Duration = Duration::from_secs(120);

enum RegionState {
    Missing,
    Running(Arc<AtomicU8>),
    Done,
}

/// One file being decoded into its cache temp file, region by region (a member of a
/// solid group: its group, into a temp file of the group's, see [`group_tmp_path`]).
struct Decoding {
    blob: BlobRef,
    /// The file's length (a member's range in its group).
    size: u64,
    /// Other members of the group waiting for this decode (see [`Decoder::ride`]).
    riders: Vec<u64>,
    path: PathBuf,
    /// The blob, read a region at a time (never whole: it can be as large as the file).
    data: crate::store::pack::BlobSource,
    plan: Plan,
    pool: Option<(Arc<LocalPool>, CoderParams)>,
    file: Arc<std::fs::File>,
    state: Vec<RegionState>,
    remaining: usize,
    /// LLM chunks handed to the pool and not answered yet (at most the pool's lanes for
    /// a reader's regions: see [`Decoder::start_urgent`]).
    running: usize,
    /// Regions before this one are started or done for a whole-file wait.
    cursor: usize,
    last_used: Instant,
}

impl Decoding {
    fn done_flags(&self) -> Vec<bool> {
        self.state
            .iter()
            .map(|s| matches!(s, RegionState::Done))
            .collect()
    }
}

/// The decoder: owns every decode in progress. Requests ([`Need`]) say which bytes are
/// wanted; LLM chunks go to the shared pool (reader's chunks urgent, read-ahead below
/// them, both above background compression); stored and zstd regions are decoded here.
/// When every region is in, the whole file is verified and installed as the clean copy.
struct Decoder<'a> {
    core: &'a Core,
    decodings: HashMap<u64, Decoding>,
    /// Pool job tag -> (inode, blob seq, region).
    tags: HashMap<u64, (u64, u64, usize)>,
    next_tag: u64,
    done_tx: Sender<Done>,
    /// Members of a solid group whose reads wait on a decode of their group started for
    /// another member (its riders), dropped before it finished: they are asked for again
    /// (see [`Decoder::ride`]).
    requeue: Vec<u64>,
}

fn decoder(core: &Core, rx: Receiver<Need>) {
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let mut d = Decoder {
        core,
        decodings: HashMap::new(),
        tags: HashMap::new(),
        next_tag: 0,
        done_tx,
        requeue: Vec::new(),
    };
    loop {
        // Checked every turn: chunk answers can keep the select busy past any timeout.
        if core.is_shutting_down() {
            return d.drop_all();
        }
        crossbeam_channel::select! {
            recv(rx) -> need => match need {
                Ok(need) => d.guarded(need.ino, |d| d.need(need)),
                Err(_) => return d.drop_all(),
            },
            recv(done_rx) -> done => {
                if let Ok(done) = done {
                    if let Some(&(ino, _, _)) = d.tags.get(&done.tag) {
                        d.guarded(ino, |d| d.chunk_done(done));
                    }
                }
            },
            // Short: the unmount waits for this thread to see the shutdown.
            default(Duration::from_millis(100)) => {
                d.expire();
                d.drain_requeue();
            }
        }
    }
}

impl Decoder<'_> {
    /// Run `f`; a panic in it fails that file's decode, not the decoder. Then the
    /// riders of decodes dropped meanwhile are asked for again.
    fn guarded(&mut self, ino: u64, f: impl FnOnce(&mut Self)) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if r.is_err() {
            let blob = self.decodings.get(&ino).map(|d| d.blob);
            self.fail(ino, blob, libc::EIO, "the decoder panicked".into());
        }
        self.drain_requeue();
    }

    /// Ask again for the riders of decodes that were dropped or finished without them.
    fn drain_requeue(&mut self) {
        while let Some(rider) = self.requeue.pop() {
            // (Installed and answered with its carrier, or nobody waits any more.)
            if self.core.waiting_ranges(rider).is_empty() {
                continue;
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.need(Need {
                    ino: rider,
                    range: None,
                })
            }));
            if r.is_err() {
                let blob = self.decodings.get(&rider).map(|d| d.blob);
                self.fail(rider, blob, libc::EIO, "the decoder panicked".into());
            }
        }
    }

    /// A read of `ino`, a member of a solid group whose group is being decoded for
    /// another member now: it waits for that decode (which installs it with the other
    /// members) instead of decoding the group again. Returns whether it rides one.
    fn ride(&mut self, ino: u64, blob: BlobRef) -> bool {
        let (Some(slot), Some(m)) = (blob.pack, blob.member) else {
            return false;
        };
        let carrier = self.decodings.values_mut().find(|d| {
            d.blob.pack == Some(slot) && d.blob.member.is_some_and(|o| o.group_len == m.group_len)
        });
        match carrier {
            Some(d) => {
                if !d.riders.contains(&ino) {
                    d.riders.push(ino);
                }
                true
            }
            None => false,
        }
    }

    /// Give up on `ino`'s decode: one log line per bad blob, EIO (or `errno`) to every
    /// waiting operation, the temp file removed.
    fn fail(&mut self, ino: u64, blob: Option<BlobRef>, errno: i32, why: String) {
        self.drop_decoding(ino);
        if let Some(blob) = blob {
            // Readers retry (the kernel and cat both do): one line per bad blob.
            if self.core.first_failure_of(ino, blob) {
                log::error!("cannot read {}: {why}", self.core.describe(ino));
            } else {
                log::debug!("cannot read inode {ino} (again): {why}");
            }
        }
        self.core.materialized(ino, blob, Err(errno));
    }

    /// At unmount: no decode outlives the mount, and none leaves its temp file behind.
    fn drop_all(&mut self) {
        let inos: Vec<u64> = self.decodings.keys().copied().collect();
        for ino in inos {
            self.drop_decoding(ino);
        }
    }

    fn drop_decoding(&mut self, ino: u64) {
        if let Some(d) = self.decodings.remove(&ino) {
            self.requeue.extend(d.riders.iter().copied());
            // Late answers of its jobs ("cancelled", mostly) must not reach a new decode
            // of the same blob.
            self.tags.retain(|_, &mut (i, _, _)| i != ino);
            for s in &d.state {
                if let RegionState::Running(p) = s {
                    // Nobody wants it now (its output would go to a removed temp file):
                    // the lane goes back to whoever needs it.
                    p.store(CANCELLED, Ordering::Relaxed);
                }
            }
            self.core.partial_dropped(ino, d.blob);
            let _ = std::fs::remove_file(self.core.store.cache_tmp_path(ino));
            if d.blob.member.is_some() {
                let _ = std::fs::remove_file(group_tmp_path(self.core, ino));
            }
        }
    }

    fn need(&mut self, need: Need) {
        let ino = need.ino;
        let (size, blob) = match self.core.blob_of(ino) {
            Ok(Some(b)) => b,
            Ok(None) => {
                // Already plaintext (truncated, rewritten, or decoded meanwhile).
                self.drop_decoding(ino);
                return self.core.materialized(ino, None, Ok(()));
            }
            Err(e) => {
                self.drop_decoding(ino);
                // A read-ahead hint for a file deleted since is nobody's failure.
                if !self.core.waiting_ranges(ino).is_empty() {
                    self.core.materialized(ino, None, Err(e));
                }
                return;
            }
        };
        if self.decodings.get(&ino).is_some_and(|d| d.blob != blob) {
            self.drop_decoding(ino);
        }
        if !self.decodings.contains_key(&ino) && self.core.serve_complete_partial(ino, blob) {
            // A read-only mount's finished decode serves its reads; decoding it again
            // would only replace the copy under them.
            return;
        }
        if !self.decodings.contains_key(&ino) && self.ride(ino, blob) {
            return;
        }
        if !self.decodings.contains_key(&ino) {
            match self.start(ino, size, blob) {
                Ok(d) => {
                    // A member's reads wait for its whole group (one chunk): its decoded
                    // regions are the group's, not the file's.
                    if blob.member.is_none() {
                        self.core.partial_started(
                            ino,
                            blob,
                            d.file.clone(),
                            Arc::new(d.plan.regions.iter().map(|r| r.out.clone()).collect()),
                            size,
                        );
                    }
                    self.decodings.insert(ino, d);
                }
                Err((errno, why)) => return self.fail(ino, Some(blob), errno, why),
            }
        }
        let n = self.decodings.get(&ino).map_or(0, |d| d.plan.regions.len());
        if let Err((errno, why)) = self.start_urgent(ino) {
            return self.fail(ino, Some(blob), errno, why);
        }
        let ahead = match need.range {
            Some(r) if blob.member.is_none() => {
                let c = self.covering(ino, r);
                c.end..(c.end + READ_AHEAD_REGIONS).min(n)
            }
            _ => 0..0,
        };
        for i in ahead {
            if let Err((errno, why)) = self.start_region(ino, i, READ_AHEAD) {
                return self.fail(ino, Some(blob), errno, why);
            }
        }
        self.progressed(ino);
    }

    /// Start (or raise to urgent) the regions readers of `ino` wait for, in file order.
    /// LLM chunks are handed to the pool only while fewer than its lanes are running
    /// for this decode; the rest follow as those finish ([`Decoder::chunk_done`]). A
    /// write to a large compressed file waits for the whole file: handing over all its
    /// chunks at once put every chunk's coded bytes in the pool's queue (memory growing
    /// with the file) and queued a cold read of any other file behind all of them.
    fn start_urgent(&mut self, ino: u64) -> Result<(), (i32, String)> {
        let Some(d) = self.decodings.get(&ino) else {
            return Ok(());
        };
        let n = d.plan.regions.len();
        let window = d
            .pool
            .as_ref()
            .map_or(usize::MAX, |(p, _)| p.workers * (p.lanes + READ_LANES));
        // Reads of a range first, then whole-file waits, each in file order (a member's
        // reads all wait for its whole group).
        let member = d.blob.member.is_some();
        let waiting = self.core.waiting_ranges(ino);
        let whole = member || waiting.iter().any(|r| r.is_none());
        let mut urgent: Vec<usize> = waiting
            .into_iter()
            .flatten()
            .filter(|_| !member)
            .flat_map(|r| self.covering(ino, r))
            .collect();
        urgent.sort_unstable();
        urgent.dedup();
        let waits = |d: &Decoding, i: usize| {
            matches!(d.state[i], RegionState::Missing)
                && matches!(d.plan.regions[i].kind, RegionKind::Chunk { .. })
                && d.running >= window
        };
        for i in urgent {
            match self.decodings.get(&ino) {
                Some(d) if !waits(d, i) => self.start_region(ino, i, URGENT)?,
                Some(_) => {}
                None => return Ok(()),
            }
        }
        // The whole file: on from the first region not yet started (a cursor, so that
        // each finished chunk costs O(1) here, not a walk over the file's regions).
        if !whole {
            return Ok(());
        }
        loop {
            let Some(d) = self.decodings.get(&ino) else {
                return Ok(());
            };
            let i = d.cursor;
            if i >= n || waits(d, i) {
                return Ok(());
            }
            self.start_region(ino, i, URGENT)?;
            if let Some(d) = self.decodings.get_mut(&ino) {
                d.cursor = i + 1;
            }
        }
    }

    fn covering(&self, ino: u64, r: std::ops::Range<u64>) -> std::ops::Range<usize> {
        self.decodings
            .get(&ino)
            .map_or(0..0, |d| d.plan.covering(r))
    }

    /// Read and parse the blob, load the model if it needs it, make the temp file.
    fn start(&self, ino: u64, size: u64, blob: BlobRef) -> Result<Decoding, (i32, String)> {
        let fail = |why: String| (libc::EIO, why);
        let path = self.core.store.blob_display(ino, &blob);
        let data = self
            .core
            .store
            .open_blob(ino, &blob)
            .map_err(|e| fail(format!("{path}: {e}")))?;
        let plan = Plan::read_from(&data).map_err(|e| fail(format!("{path}: {e}")))?;
        // What the blob decodes to: the file, or a member's whole group.
        let whole = match blob.member {
            Some(m) => {
                if m.offset
                    .checked_add(size)
                    .is_none_or(|end| end > m.group_len)
                {
                    return Err(fail(format!(
                        "the index puts its {size} bytes at {} of a {}-byte group",
                        m.offset, m.group_len
                    )));
                }
                m.group_len
            }
            None => size,
        };
        if plan.header.original_len != whole {
            return Err(fail(format!(
                "{} holds {} bytes but the index says {whole}",
                path, plan.header.original_len
            )));
        }
        // Only blobs with LLM segments need the model: zstd-only files stay readable
        // without it.
        let pool = if plan.header.has_llm_segments() {
            let pool = self.core.engine.get().map_err(|e| {
                fail(format!(
                    "{} needs the model, which is unavailable: {e}",
                    path
                ))
            })?;
            let params = codec::check_engine(&plan.header, &*pool, &DecompressOptions::default())
                .map_err(|e| fail(format!("{}: {e}", path)))?;
            Some((pool, params))
        } else {
            None
        };
        let tmp = match blob.member {
            Some(_) => group_tmp_path(self.core, ino),
            None => self.core.store.cache_tmp_path(ino),
        };
        // A new file, never the old one truncated: a reader may still hold an earlier
        // decode's file (by its handle) and must not see it shrink under it.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err((
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("removing {}: {e}", tmp.display()),
                ));
            }
            _ => {}
        }
        let file = self
            .core
            .store
            .make_file_dir(false, ino)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
            })
            .and_then(|f| {
                // Made by us just now and of no use: not left for fsck to find.
                f.set_len(whole).map(|()| f).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
            })
            .map_err(|e| {
                (
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("creating {}: {e}", tmp.display()),
                )
            })?;
        let n = plan.regions.len();
        Ok(Decoding {
            blob,
            size,
            riders: Vec::new(),
            path: path.into(),
            data,
            plan,
            pool,
            file: Arc::new(file),
            state: (0..n).map(|_| RegionState::Missing).collect(),
            remaining: n,
            running: 0,
            cursor: 0,
            last_used: Instant::now(),
        })
    }

    /// Make sure region `i` of `ino` is decoded or on its way, at least at `priority`.
    fn start_region(&mut self, ino: u64, i: usize, priority: u8) -> Result<(), (i32, String)> {
        let Some(d) = self.decodings.get_mut(&ino) else {
            return Ok(());
        };
        d.last_used = Instant::now();
        match &d.state[i] {
            RegionState::Done => Ok(()),
            RegionState::Running(p) => {
                p.fetch_max(priority, Ordering::Relaxed);
                Ok(())
            }
            RegionState::Missing => {
                let region = &d.plan.regions[i];
                if !matches!(region.kind, RegionKind::Chunk { .. }) {
                    return Self::write_plain_region(self.core, d, i);
                }
                let Some((pool, params)) = &d.pool else {
                    return Err((libc::EIO, "LLM chunk without a model".into()));
                };
                let tag = self.next_tag;
                self.next_tag += 1;
                self.tags.insert(tag, (ino, d.blob.seq, i));
                let p = Arc::new(AtomicU8::new(priority));
                pool.submit(
                    params,
                    Submit {
                        tag,
                        job: codec::chunk_job(&d.data, region)
                            .map_err(|e| (libc::EIO, format!("{}: {e}", d.path.display())))?,
                        priority: p.clone(),
                        progress: None,
                        reply: self.done_tx.clone(),
                    },
                );
                d.state[i] = RegionState::Running(p);
                d.running += 1;
                Ok(())
            }
        }
    }

    /// Decode a stored, zstd or zero region straight into the temp file, in pieces (a
    /// zero region is left as the hole the temp file already has there).
    fn write_plain_region(core: &Core, d: &mut Decoding, i: usize) -> Result<(), (i32, String)> {
        use std::os::unix::fs::FileExt;
        let region = &d.plan.regions[i];
        if region.kind != RegionKind::Zero {
            let mut at = region.out.start;
            let file = &d.file;
            let mut write_err = None;
            let r = codec::decode_plain_region(&d.plan.header, &d.data, region, &mut |b| {
                file.write_all_at(b, at).inspect_err(|e| {
                    write_err = Some(e.raw_os_error().unwrap_or(libc::EIO));
                })?;
                at += b.len() as u64;
                Ok(())
            });
            if let Err(e) = r {
                return Err(match write_err {
                    Some(errno) => (errno, format!("writing its plaintext: {e}")),
                    None => (libc::EIO, format!("{}: {e}", d.path.display())),
                });
            }
        }
        d.state[i] = RegionState::Done;
        d.remaining -= 1;
        core.count_regions(1);
        Ok(())
    }

    fn write_region(
        core: &Core,
        d: &mut Decoding,
        i: usize,
        bytes: &[u8],
    ) -> Result<(), (i32, String)> {
        use std::os::unix::fs::FileExt;
        d.file
            .write_all_at(bytes, d.plan.regions[i].out.start)
            .map_err(|e| {
                (
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("writing its plaintext: {e}"),
                )
            })?;
        if matches!(d.state[i], RegionState::Running(_)) {
            d.running -= 1;
        }
        d.state[i] = RegionState::Done;
        d.remaining -= 1;
        core.count_regions(1);
        Ok(())
    }

    fn chunk_done(&mut self, done: Done) {
        let Some((ino, seq, i)) = self.tags.remove(&done.tag) else {
            return;
        };
        let Some(d) = self.decodings.get_mut(&ino).filter(|d| d.blob.seq == seq) else {
            return; // a decode given up meanwhile
        };
        let blob = d.blob;
        let r = match (done.result, &d.pool) {
            (Ok(ChunkOutput::Decoded(symbols)), Some((pool, _))) => {
                codec::chunk_bytes(pool.tokenizer(), symbols, &d.plan.regions[i])
                    .map_err(|e| (libc::EIO, format!("{}: {e}", d.path.display())))
                    .and_then(|bytes| Self::write_region(self.core, d, i, &bytes))
            }
            (Ok(_), _) => Err((libc::EIO, "the pool returned the wrong output".into())),
            (Err(e), _) => Err((libc::EIO, format!("{}: {e}", d.path.display()))),
        };
        if let Err((errno, why)) = r {
            return self.fail(ino, Some(blob), errno, why);
        }
        // A lane of this decode is free: the next region its readers wait for.
        if let Err((errno, why)) = self.start_urgent(ino) {
            return self.fail(ino, Some(blob), errno, why);
        }
        self.progressed(ino);
    }

    /// Tell the core what is decoded now; install the file when it is complete.
    fn progressed(&mut self, ino: u64) {
        let Some(d) = self.decodings.get(&ino) else {
            return;
        };
        let blob = d.blob;
        if blob.member.is_none() {
            self.core.partial_progress(ino, blob, &d.done_flags());
        }
        if d.remaining > 0 {
            return;
        }
        let Some(mut d) = self.decodings.remove(&ino) else {
            return;
        };
        // Its riders are asked for again once this is done, however it ends (a panic in
        // the install included): those installed with it are answered by then, the
        // others get their own decode.
        self.requeue.extend(d.riders.iter().copied());
        // Every chunk passed its CRC; the whole file (or group) must also pass its BLAKE3
        // before it becomes the clean copy.
        let tmp = match blob.member {
            Some(_) => group_tmp_path(self.core, ino),
            None => self.core.store.cache_tmp_path(ino),
        };
        let check = d
            .file
            .sync_all()
            .map_err(|e| {
                (
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("syncing {}: {e}", tmp.display()),
                )
            })
            .and_then(|()| {
                // Streamed: the file can be far larger than memory.
                use std::os::unix::fs::FileExt;
                let mut v = codec::Verifier::new(&d.plan.header);
                let mut buf = vec![0u8; 1 << 20];
                let mut at = 0u64;
                loop {
                    let n = d
                        .file
                        .read_at(&mut buf, at)
                        .map_err(|e| (libc::EIO, format!("reading {}: {e}", tmp.display())))?;
                    if n == 0 {
                        break;
                    }
                    at += n as u64;
                    v.update(&buf[..n])
                        .map_err(|e| (libc::EIO, format!("{}: {e}", d.path.display())))?;
                }
                v.finish()
                    .map_err(|e| (libc::EIO, format!("{}: {e}", d.path.display())))
            });
        let check = check.and_then(|()| match blob.member {
            Some(_) => self.install_member(ino, d.size, blob, &d),
            None => Ok(()),
        });
        match check {
            Ok(()) => {
                if blob.member.is_some() {
                    // Before the reader is answered: what it does next (an evict, a
                    // read of another member) then finds the siblings installed, not
                    // being installed.
                    self.install_siblings(ino, &d);
                    let _ = std::fs::remove_file(group_tmp_path(self.core, ino));
                }
                self.core.materialized(ino, Some(blob), Ok(()));
            }
            Err((errno, why)) => {
                // (Its riders are in the requeue already.)
                d.riders.clear();
                self.decodings.insert(ino, d);
                self.fail(ino, Some(blob), errno, why);
            }
        }
    }

    /// A member's group is decoded and checked: its range becomes the file's temp file
    /// (checked against the BLAKE3 tail in its record), handed to the core as a decode
    /// that is complete (a read-only mount serves it from there), and the group's temp
    /// file goes.
    fn install_member(
        &self,
        ino: u64,
        size: u64,
        blob: BlobRef,
        d: &Decoding,
    ) -> Result<(), (i32, String)> {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let io = |what: String| {
            move |e: std::io::Error| {
                (
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("{what}: {e}"),
                )
            }
        };
        let Some(m) = blob.member.filter(|m| {
            m.offset
                .checked_add(size)
                .is_some_and(|end| end <= m.group_len)
        }) else {
            return Err((libc::EIO, "not a range of its group".into()));
        };
        let len = usize::try_from(size).map_err(|_| (libc::EIO, "member too large".to_string()))?;
        let mut bytes = vec![0u8; len];
        d.file
            .read_exact_at(&mut bytes, m.offset)
            .map_err(io(format!(
                "reading the decoded group of {}",
                d.path.display()
            )))?;
        let hash: [u8; 32] = blake3::hash(&bytes).into();
        if crate::store::Member::tail_of(&hash) != m.tail {
            return Err((
                libc::EIO,
                format!(
                    "{}: the group decoded, but bytes {}..{} are not the file the index names",
                    d.path.display(),
                    m.offset,
                    m.offset + size
                ),
            ));
        }
        let tmp = self.core.store.cache_tmp_path(ino);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("removing {}", tmp.display()))(e));
            }
            _ => {}
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()).map(|()| f))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io(format!("writing {}", tmp.display()))(e)
            })?;
        self.core.partial_started(
            ino,
            blob,
            Arc::new(file),
            Arc::new(std::iter::once(0..size).collect()),
            size,
        );
        self.core.partial_progress(ino, blob, &[true]);
        Ok(())
    }

    /// The group `d` decoded for one member holds the others too: up to
    /// [`MAX_SIBLINGS`] members of the same group whose files have no copy (and no
    /// decode of their own under way) get their ranges installed as well, so that
    /// reading a group's files one after the other decodes it once, not once per file
    /// (readers of several members at once may still each decode it). Best effort: a
    /// member that cannot be installed is decoded when it is read.
    fn install_siblings(&self, ino: u64, d: &Decoding) {
        let (Some(slot), Some(m)) = (d.blob.pack, d.blob.member) else {
            return;
        };
        let Ok(refs) = self.core.store.slot_refs(slot) else {
            return;
        };
        // Riders first (their readers wait), then others up to the cap.
        let mut order: Vec<u64> = d.riders.clone();
        order.extend(refs.into_iter().filter(|r| !d.riders.contains(r)));
        let cap = d.riders.len().max(MAX_SIBLINGS);
        for other in order.into_iter().take(cap) {
            if other == ino || self.decodings.contains_key(&other) {
                continue;
            }
            let Ok(Some((size, blob))) = self.core.blob_of(other) else {
                continue; // cached, gone, or unreadable: nothing to do here
            };
            let same_group =
                blob.pack == Some(slot) && blob.member.is_some_and(|o| o.group_len == m.group_len);
            if !same_group || self.core.has_complete_partial(other, blob) {
                continue;
            }
            match self.install_member(other, size, blob, d) {
                Ok(()) => self.core.materialized(other, Some(blob), Ok(())),
                Err((_, why)) => {
                    self.core.partial_dropped(other, blob);
                    log::debug!("inode {other}: not installed with its group ({why})");
                }
            }
        }
    }

    /// Drop partial decodes nobody uses any more: idle ones with nothing running, and
    /// ones whose file moved on (rewritten, truncated, deleted).
    fn expire(&mut self) {
        let stale: Vec<u64> = self
            .decodings
            .iter()
            .filter(|(&ino, d)| {
                let moved_on = !matches!(self.core.blob_of(ino), Ok(Some((_, b))) if b == d.blob);
                let idle = d.last_used.elapsed() > PARTIAL_IDLE
                    && !d.state.iter().any(|s| matches!(s, RegionState::Running(_)))
                    && self.core.waiting_ranges(ino).is_empty();
                moved_on || idle
            })
            .map(|(&ino, _)| ino)
            .collect();
        for ino in stale {
            self.drop_decoding(ino);
            // Anyone still waiting gets what the file holds now.
            if !self.core.waiting_ranges(ino).is_empty() {
                self.need(Need { ino, range: None });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pick_similar;

    /// A group takes the candidates most like its files first (a near-copy before an
    /// unrelated text), in due order when nothing is shared, and only what fits.
    #[test]
    fn a_group_takes_the_most_similar_candidates_that_fit() {
        let first = b"The licence grants you the right to copy, modify and distribute this software, provided that the notice above is kept in every copy.".to_vec();
        let unrelated = b"def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n".to_vec();
        let mut near = first.clone();
        near.extend_from_slice(b" Written by someone else in another year.");
        let big = vec![b'x'; 5000];
        let candidates = vec![unrelated.clone(), big.clone(), near.clone()];
        let (group, rest) = pick_similar(&first, candidates.clone(), 1000);
        assert_eq!(group, vec![near.clone(), unrelated.clone()]);
        assert_eq!(rest, vec![big.clone()]);
        let room = near.len() as u64;
        let (group, rest) = pick_similar(&first, candidates, room);
        assert_eq!(group, vec![near]);
        assert_eq!(rest, vec![unrelated.clone(), big]);
        // Nothing shared: due order.
        let (group, _) = pick_similar(
            b"zzzz",
            vec![unrelated.clone(), b"qqqqqqqqqqqqq".to_vec()],
            1000,
        );
        assert_eq!(group[0], unrelated);
    }
}
