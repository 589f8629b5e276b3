//! The index's key-value engine: fjall 3 (an LSM tree behind a write-ahead journal), in
//! `BACKING/index.fjall/`, one keyspace named `index`, keys by prefix (docs/FORMAT.md).
//!
//! Why fjall (format 3) and not sled (formats 1 and 2): under sled, a rename or unlink
//! in a volume of 10^5 files cost 5x what it cost at 10^4 (its segment cleaner), and the
//! daemon once hung for good inside sled under a storm of small writes (spacejam/sled#1412).
//! bench/index-engines measures the index's write pattern on both.
//!
//! What the store relies on:
//! * a [`Batch`] is applied atomically: after a crash, all of it or none of it;
//! * every applied batch is handed to the operating system at once (fjall's default
//!   `manual_journal_persist = false`), so a killed daemon loses none; a power cut may
//!   lose the batches since the last [`Index::flush`], never part of one, never a later
//!   one without an earlier one (the journal is replayed in order);
//! * [`Index::flush`] returns once every batch applied before it is on stable storage.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub use fjall::Slice;

/// The keyspace that holds everything.
const KEYSPACE: &str = "index";
/// See [`Index::open`].
const MEMTABLE_BYTES: u64 = 16 << 20;

/// The block cache of every index opened after [`set_cache_bytes`]; 0: [`default_cache_bytes`].
static CACHE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Set the block cache of the indexes this process opens from now on (the mount option
/// `index_cache=`); 0 restores the default.
pub fn set_cache_bytes(bytes: u64) {
    CACHE_BYTES.store(bytes, Ordering::Relaxed);
}

/// The block cache of an index: a sixteenth of the machine's memory, at least 32 MiB
/// (fjall's default) and at most 1 GiB. Why not fjall's 32 MiB: at 10^6 files the index
/// is ~120 MB on disk; with 32 MiB the filter and data blocks of its deeper levels were
/// read, checksummed and decompressed again on nearly every lookup, and renames and
/// unlinks crawled (perf: `_copy_to_iter`, `xxh3_128_long`). The cache holds only what is
/// read, so a small volume never uses it all.
pub fn default_cache_bytes() -> u64 {
    const MIN: u64 = 32 << 20;
    const MAX: u64 = 1 << 30;
    // SAFETY: sysinfo fills the struct it is given and has no other effect.
    let total = unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut si) == 0 {
            (si.totalram as u64).saturating_mul(si.mem_unit.max(1) as u64)
        } else {
            0
        }
    };
    (total / 16).clamp(MIN, MAX)
}

/// The block cache the next [`Index::open`] gets.
pub fn cache_bytes() -> u64 {
    match CACHE_BYTES.load(Ordering::Relaxed) {
        0 => default_cache_bytes(),
        n => n,
    }
}

pub struct Index {
    db: fjall::Database,
    tree: fjall::Keyspace,
}

/// Changes applied together by [`Index::apply`].
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops
            .push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((key.as_ref().to_vec(), None));
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Key-value pairs in key order.
pub struct Entries(fjall::Iter);

impl Iterator for Entries {
    type Item = fjall::Result<(Slice, Slice)>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|g| g.into_inner())
    }
}

impl Entries {
    pub fn keys(self) -> impl Iterator<Item = fjall::Result<Slice>> {
        self.0.map(|g| g.key())
    }
}

impl Index {
    /// Open (creating if absent) the index in `dir`. Fails with [`fjall::Error::Locked`]
    /// while another process has it open.
    pub fn open(dir: &Path) -> fjall::Result<Index> {
        // Mode 700 whatever the umask: the index names every file and holds its xattrs.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let db = fjall::Database::builder(dir)
            .cache_size(cache_bytes())
            .open()?;
        // A smaller memtable than fjall's 64 MiB: after a crash, the open replays the
        // journal since the last memtable written out, so this bounds that time (at
        // 10^5 files, 64 MiB of journal took seconds). Stored in the index when it is
        // created.
        // lz4 at every level (fjall's default leaves levels 0 and 1 uncompressed, which
        // is all a small volume's index has): the keys are small and repetitive.
        let tree = db.keyspace(KEYSPACE, || {
            fjall::KeyspaceCreateOptions::default()
                .max_memtable_size(MEMTABLE_BYTES)
                .data_block_compression_policy(fjall::config::CompressionPolicy::all(
                    fjall::CompressionType::Lz4,
                ))
        })?;
        Ok(Index { db, tree })
    }

    /// Write the memtable out and make everything durable, so that the next open has no
    /// journal to replay (a clean stop; the end of a copy).
    pub fn checkpoint(&self) -> fjall::Result<()> {
        self.flush()?;
        self.tree.rotate_memtable_and_wait()?;
        self.flush()
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> fjall::Result<Option<Slice>> {
        self.tree.get(key)
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> fjall::Result<()> {
        self.tree.insert(key.as_ref(), value.as_ref())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> fjall::Result<()> {
        self.tree.remove(key.as_ref())
    }

    /// Apply every change of `batch` atomically.
    pub fn apply(&self, batch: Batch) -> fjall::Result<()> {
        let mut b = self.db.batch();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(&self.tree, k, v),
                None => b.remove(&self.tree, k),
            }
        }
        b.commit()
    }

    /// Write `entries` (in key order, into an empty index) straight into tables, past
    /// the journal; then [`Index::checkpoint`]. Returns how many.
    pub fn load_sorted(&self, entries: Entries) -> fjall::Result<u64> {
        let mut ingest = self.tree.start_ingestion()?;
        let mut n = 0u64;
        for r in entries {
            let (k, v) = r?;
            ingest.write(k, v)?;
            n += 1;
        }
        ingest.finish()?;
        // Ingested tables are a new run of level 0, which every open of the index then
        // queues for compaction: the next mount would rewrite them, and on a full disk
        // that compaction fails and poisons the index (the mount fails). Compacted
        // here, while the copy has room, nothing is left for an open to do.
        self.tree.major_compact()?;
        self.checkpoint()?;
        Ok(n)
    }

    /// Make everything applied so far durable (fsync of the journal).
    pub fn flush(&self) -> fjall::Result<()> {
        self.db.persist(fjall::PersistMode::SyncAll)
    }

    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Entries {
        Entries(self.tree.prefix(prefix))
    }

    /// Keys from `from` to `to`, both included.
    pub fn range(&self, from: &[u8], to: &[u8]) -> Entries {
        Entries(self.tree.range(from..=to))
    }

    pub fn iter(&self) -> Entries {
        Entries(self.tree.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_cache_is_a_share_of_memory_within_bounds_unless_set() {
        let d = default_cache_bytes();
        assert!((32 << 20..=1 << 30).contains(&d), "{d}");
        // This machine's memory, as /proc/meminfo says it (the test's independent
        // reading of what sysinfo returns).
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("MemTotal in /proc/meminfo");
        assert_eq!(d, (kib * 1024 / 16).clamp(32 << 20, 1 << 30));
        assert_eq!(cache_bytes(), d);
        set_cache_bytes(8 << 20);
        assert_eq!(cache_bytes(), 8 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = Index::open(dir.path()).expect("open with a set cache");
        idx.insert(b"k", b"v").expect("insert");
        assert_eq!(idx.get(b"k").expect("get").as_deref(), Some(&b"v"[..]));
        set_cache_bytes(0);
        assert_eq!(cache_bytes(), d);
    }
}
