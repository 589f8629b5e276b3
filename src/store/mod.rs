//! Durable state of a backing directory: the index (inodes, directory entries, xattrs,
//! the compression queue), the NC06 blob files and the plaintext cache files.
//!
//! ```text
//! BACKING/nacrithfs.format   "nacrithfs 3" (or "nacrithfs 3 flat"): marks an initialized
//!                            backing directory; formats 1 and 2 are moved to 3 at open
//! BACKING/index.fjall/       the index: fjall, one keyspace, keys by prefix (docs/FORMAT.md)
//! BACKING/blobs/<xx>/<ino>-<seq>.nc06
//! BACKING/cache/<xx>/<ino>   plaintext of a regular file (dirty, or a clean copy)
//!                            <xx>: the inode number's low byte, two hex digits; a
//!                            volume made as format 1 keeps both flat (no <xx>/)
//! BACKING/lost+found/        files recovery or fsck could not account for (never deleted)
//! ```
//!
//! Multi-key changes go through one [`index::Batch`], so each is atomic across a crash;
//! `commit(.., durable=true)` also flushes the index (a batch is handed to the operating
//! system when applied, so it survives a killed daemon; only a flush makes it survive a
//! power cut). Files that no index state needs any more are listed in the graveyard (`g`
//! keys) in the batch that stops needing them, and deleted only after a flush
//! (docs/DURABILITY.md).

pub mod backends;
pub mod fsck;
pub mod index;
mod legacy;
pub mod pack;
pub mod perms;
mod rebuild;
pub mod record;
pub mod tally;
pub mod watchdog;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use pack::{PackInfo, PackSlot};
pub use record::{BlobRef, Inode, Kind, Member};

pub const ROOT_INO: u64 = 1;
const FORMAT_MARKER: &str = "nacrithfs.format";
/// Format 4: the index in fjall ([`INDEX_DIR`]); blob and cache files in
/// subdirectories of 4096 consecutive inode numbers each (`<ino / 4096, hex>/`), each
/// made when its first file is, so a small volume pays for one or two directories and
/// a big one has no directory of the backing filesystem with more than 4096 files.
const FORMAT_LINE: &str = "nacrithfs 4\n";
/// Format 3: as 4, but the subdirectories are the inode number's low byte (`<xx>/`),
/// all 256 of each made at every read-write mount.
const FORMAT_LINE_MOD: &str = "nacrithfs 3\n";
/// Format 3 with blob and cache files flat: a volume made as format 1, moved to fjall.
const FORMAT_LINE_FLAT: &str = "nacrithfs 3 flat\n";
/// Formats 2 (subdirectories) and 1 (flat): the index in sled. Moved to format 3 by the
/// first read-write open ([`legacy`]).
const FORMAT_LINE_SLED: &str = "nacrithfs 2\n";
const FORMAT_LINE_SLED_FLAT: &str = "nacrithfs 1\n";
/// The index of format 3, and where it is built while an older index is moved.
const INDEX_DIR: &str = "index.fjall";
const INDEX_TMP_DIR: &str = "index.fjall.tmp";
/// Subdirectories of blobs/ and cache/ in formats 2 and 3.
const FANOUT: u64 = 256;
/// Inode numbers per subdirectory in format 4 (2^12).
const RANGE_SHIFT: u32 = 12;
/// Where a daemonized nacrithfs logs.
pub const LOG_FILE: &str = "nacrithfs.log";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("index: {0}")]
    Index(#[from] fjall::Error),
    #[error("format-2 index (sled): {0}")]
    Legacy(#[from] sled::Error),
    #[error("index record for {what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
    #[error("{0}")]
    Setup(String),
}

impl StoreError {
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            StoreError::Index(fjall::Error::Io(e))
            | StoreError::Index(fjall::Error::Storage(fjall::LsmError::Io(e)))
            | StoreError::Legacy(sled::Error::Io(e)) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A content hint's value (layout 6): the inode whose current blob held the plaintext,
/// its u64 in little-endian without its trailing zero bytes (1 to 8 bytes).
pub fn decode_content_hint(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 8 {
        return None;
    }
    let mut b = [0u8; 8];
    b[..v.len()].copy_from_slice(v);
    Some(u64::from_le_bytes(b))
}

fn encode_content_hint(ino: u64) -> Vec<u8> {
    let b = ino.to_le_bytes();
    let n = 8 - (ino.leading_zeros() / 8) as usize;
    b[..n.max(1)].to_vec()
}

/// A content hint of layouts 5 and before: the blob's inode and sequence (16 bytes),
/// then for a packed blob its pack, offset and length (40 bytes in all). Only its inode
/// is kept when the index moves to layout 6.
fn decode_old_content_hint(v: &[u8]) -> Option<u64> {
    match v.len() {
        16 | 40 => Some(u64::from_le_bytes(v[..8].try_into().ok()?)),
        _ => None,
    }
}

fn profile_key(id: u32) -> [u8; 5] {
    let mut k = [b'P'; 5];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn pack_key(id: u64) -> [u8; 9] {
    let mut k = [b'k'; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// A reference to a packed blob: pack, offset, referencing inode (value: the blob's
/// length, u64 LE). The references of one blob are adjacent, those of one pack too.
fn ref_key(slot: PackSlot, ino: u64) -> [u8; 25] {
    let mut k = [b'R'; 25];
    k[1..9].copy_from_slice(&slot.pack.to_be_bytes());
    k[9..17].copy_from_slice(&slot.offset.to_be_bytes());
    k[17..].copy_from_slice(&ino.to_be_bytes());
    k
}

/// A reference key as read: (slot, inode).
pub fn parse_ref_key(k: &[u8]) -> Option<(PackSlot, u64)> {
    if k.len() != 25 || k[0] != b'R' {
        return None;
    }
    Some((
        PackSlot {
            pack: u64::from_be_bytes(k[1..9].try_into().ok()?),
            offset: u64::from_be_bytes(k[9..17].try_into().ok()?),
        },
        u64::from_be_bytes(k[17..].try_into().ok()?),
    ))
}

/// Graveyard "inode" of packs: `g PACK_GRAVE <pack id>` deletes that pack file.
pub const PACK_GRAVE: u64 = u64::MAX;

fn inode_key(ino: u64) -> [u8; 9] {
    let mut k = [b'i'; 9];
    k[1..].copy_from_slice(&ino.to_be_bytes());
    k
}

fn dirent_prefix(parent: u64) -> [u8; 9] {
    let mut k = [b'd'; 9];
    k[1..].copy_from_slice(&parent.to_be_bytes());
    k
}

fn dirent_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = dirent_prefix(parent).to_vec();
    k.extend_from_slice(name);
    k
}

fn xattr_prefix(ino: u64) -> [u8; 9] {
    let mut k = [b'x'; 9];
    k[1..].copy_from_slice(&ino.to_be_bytes());
    k
}

fn xattr_key(ino: u64, name: &[u8]) -> Vec<u8> {
    let mut k = xattr_prefix(ino).to_vec();
    k.extend_from_slice(name);
    k
}

fn queue_key(ino: u64) -> [u8; 9] {
    let mut k = [b'q'; 9];
    k[1..].copy_from_slice(&ino.to_be_bytes());
    k
}

/// A directory entry's readdir cookie → its name: readdir walks these in cookie order,
/// so an offset stays valid whatever is created or removed between two calls.
fn cookie_key(parent: u64, cookie: u64) -> [u8; 17] {
    let mut k = [b'c'; 17];
    k[1..9].copy_from_slice(&parent.to_be_bytes());
    k[9..].copy_from_slice(&cookie.to_be_bytes());
    k
}

/// An inode's parent directory and its name there (the newest name given to it), so a
/// path is found by walking up: O(depth), not a scan of every entry. Advisory: once
/// that name is gone (a hard link removed) it is stale, and readers check it. Layouts
/// 3-6; read from an older index opened read-only, rewritten as up entries otherwise.
fn parent_key(ino: u64) -> [u8; 9] {
    let mut k = [b'p'; 9];
    k[1..].copy_from_slice(&ino.to_be_bytes());
    k
}

/// An inode's up entry (layout 7, in place of [`parent_key`]): the directory and the
/// readdir cookie of the name it was last given ([`record::encode_up`]); the name is
/// read from that cookie's entry, which goes when the name goes, so a stale up entry
/// finds no entry naming the inode. Two varints instead of a u64 and the whole name.
fn up_key(ino: u64) -> [u8; 9] {
    let mut k = [b'u'; 9];
    k[1..].copy_from_slice(&ino.to_be_bytes());
    k
}

/// A parent entry's value as layouts 3-6 wrote it (tests make old indexes with it).
#[cfg(test)]
fn encode_parent(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut v = parent.to_le_bytes().to_vec();
    v.extend_from_slice(name);
    v
}

/// A file to delete once the index that no longer needs it is durable: the plaintext
/// cache file of a deleted inode (`tag` 0) or blob `<ino>-<tag>`.
fn grave_key(ino: u64, tag: u64) -> [u8; 17] {
    let mut k = [b'g'; 17];
    k[1..9].copy_from_slice(&ino.to_be_bytes());
    k[9..].copy_from_slice(&tag.to_be_bytes());
    k
}

/// Bytes of the BLAKE3 a content hint is keyed by. A hint is advisory and its user
/// checks the named blob's header (length and the whole BLAKE3) before sharing it, so
/// two contents with the same first 16 bytes only cost one of them its deduplication.
pub const HINT_KEY_HASH: usize = 16;

/// A content hint (layout 6): the BLAKE3 of a plaintext → the inode whose blob held it
/// when it was committed, so an equal file shares that blob instead of being coded again.
/// Advisory: the inode may be gone or rewritten since, and a user of the hint checks its
/// blob's header before sharing it.
fn content_key(hash: &[u8; 32]) -> [u8; 1 + HINT_KEY_HASH] {
    let mut k = [b'h'; 1 + HINT_KEY_HASH];
    k[1..].copy_from_slice(&hash[..HINT_KEY_HASH]);
    k
}

/// Graveyard tag of an inode's cache file (blob sequence numbers start at 1).
pub const GRAVE_CACHE: u64 = 0;

const NEXT_INO_KEY: &[u8] = b"mnext_ino";
const NEXT_BLOB_KEY: &[u8] = b"mnext_blob";
const NEXT_COOKIE_KEY: &[u8] = b"mnext_cookie";
/// Index layout: absent = 1 (no readdir cookies); 2 = every entry has a cookie;
/// 3 = every inode with a name has a parent entry ('p'); 4 = a cookie's value holds
/// the entry (child, kind, name), not only the name; 5 = blobs may be in packs (inode
/// blob marker 2; keys 'P', 'k', 'R'); 6 = content hints keyed by 16 bytes of the
/// BLAKE3 and naming an inode (1-8 bytes), not a blob (33-byte keys, 16- or 40-byte
/// values: about a third of a small file's index bytes), and inode records of version
/// 2 (varints: ~35 bytes for a packed file instead of 114; version 1 still decodes);
/// 7 = up entries ('u': directory and cookie, two varints) in place of parent entries
/// ('p': directory and the whole name, a third copy of it); 8 = inode records may name
/// a member of a solid group (blob marker 3: several small files coded as one blob).
const LAYOUT_KEY: &[u8] = b"mlayout";
/// Present while clean copies made by layout 1 (never fsynced) are still to be checked
/// against their blobs' size and BLAKE3 (by the next read-write recovery).
const CHECK_CLEAN_KEY: &[u8] = b"mcheck_clean";
/// Present from a clean stop (every thread done, everything committed and flushed) until
/// the next read-write mount, which removes it durably before anything else and then
/// skips the scan of the backing files (see `Core::recover`).
const CLEAN_STOP_KEY: &[u8] = b"mclean_stop";
/// Every key this index keeps under 'm' (fsck reports any other as malformed).
const META_KEYS: &[&[u8]] = &[
    NEXT_INO_KEY,
    NEXT_BLOB_KEY,
    NEXT_COOKIE_KEY,
    LAYOUT_KEY,
    CHECK_CLEAN_KEY,
    CLEAN_STOP_KEY,
];
const LAYOUT: u64 = 8;
/// The first layout with readdir cookies.
const LAYOUT_COOKIES: u64 = 2;
/// The first layout whose cookie values hold the entry (child, kind, name), not just
/// its name: a listing reads no directory entry keys.
const LAYOUT_COOKIE_ENTRIES: u64 = 4;
/// The first layout whose content hints name an inode by 16 bytes of the BLAKE3.
const LAYOUT_HINT_INODES: u64 = 6;
/// The first layout with up entries ('u') instead of parent entries ('p').
const LAYOUT_UP_ENTRIES: u64 = 7;
/// Keys rewritten per batch when an index moves to layout 6 (content hints) or 7
/// (parent entries).
const MIGRATION_BATCH: usize = 10_000;
/// Cookies 1 and 2 are `.` and `..`.
const FIRST_COOKIE: u64 = 3;

fn ino_from(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

/// The second number of a `prefix + u64 + u64` key (a cookie, a graveyard tag).
fn second_u64(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(9..17)?.try_into().ok()?))
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct Store {
    db: index::Index,
    backing: PathBuf,
    next_ino: AtomicU64,
    next_blob: AtomicU64,
    next_cookie: AtomicU64,
    /// How blob and cache files are spread over subdirectories.
    sharding: Sharding,
    /// Format 4: the subdirectories known to exist durably (made or found, and their
    /// parent synced, by this process).
    made_shards: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    /// Every directory entry has a readdir cookie (layout 2). False only for an old
    /// volume opened read-only, which cannot be migrated.
    cookies: bool,
    /// The index's layout (below [`LAYOUT`] only for an old index opened read-only).
    layout: u64,
    /// Read-only: the copy of the index and decoded temp files go to this private
    /// directory outside the backing directory (removed when the store is dropped), so
    /// a read-only mount writes nothing there.
    ro_tmp: Option<PathBuf>,
    /// Read-only: a shared lock on the real index, held for the mount's life.
    _ro_lock: Option<File>,
    /// The blob counter as last stored (it only ever grows; see `alloc_blob_seq`).
    stored_next_blob: std::sync::Mutex<u64>,
    /// Totals and the queue by due time, kept by [`Store::commit`].
    tally: std::sync::Mutex<tally::Tally>,
    /// Index calls in flight, for the daemon's watchdog.
    watch: watchdog::Watch,
    /// Batches committed since the store was opened.
    commits: AtomicU64,
    /// The index's disk use as last measured, and when (see `index_disk_bytes`).
    index_disk: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// Pack files: profiles, open writers.
    packs: pack::Packs,
    /// Serializes the allocation of profile ids.
    profile_lock: std::sync::Mutex<()>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(d) = &self.ro_tmp {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// One directory entry as readdir returns it.
pub struct ListedEntry {
    pub cookie: u64,
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

/// One atomic change to the index.
#[derive(Default)]
pub struct Txn {
    batch: index::Batch,
    /// How many changes were asked for (a delete of an absent key counts).
    ops: usize,
    /// The inode and queue changes, in order, for the in-memory tallies.
    changes: Vec<Change>,
}

enum Change {
    /// The inode's totals and its packed blob (slot, length), if any; None: deleted.
    Inode(u64, Option<(tally::Totals, Option<(PackSlot, u64)>)>),
    Queue(u64, Option<u64>),
}

fn packed_of(inode: &Inode) -> Option<(PackSlot, u64)> {
    inode
        .blob
        .and_then(|b| b.pack.map(|slot| (slot, b.stored_size)))
}

impl Txn {
    /// The inodes this batch touches: (records written or deleted, queue entries set or
    /// removed).
    pub fn touched(&self) -> (Vec<u64>, Vec<u64>) {
        let (mut records, mut queued) = (Vec::new(), Vec::new());
        for c in &self.changes {
            match c {
                Change::Inode(ino, _) => records.push(*ino),
                Change::Queue(ino, _) => queued.push(*ino),
            }
        }
        (records, queued)
    }

    /// The earliest time (unix ms) a queue entry this batch sets is due.
    pub fn earliest_due(&self) -> Option<u64> {
        self.changes
            .iter()
            .filter_map(|c| match c {
                Change::Queue(_, due) => *due,
                Change::Inode(..) => None,
            })
            .min()
    }

    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    pub fn put_inode(&mut self, ino: u64, inode: &Inode) {
        self.ops += 1;
        self.batch.insert(inode_key(ino), inode.encode());
        self.changes.push(Change::Inode(
            ino,
            Some((tally::Totals::of(inode), packed_of(inode))),
        ));
    }
    pub fn del_inode(&mut self, ino: u64) {
        self.ops += 1;
        self.batch.remove(inode_key(ino));
        self.batch.remove(up_key(ino));
        self.changes.push(Change::Inode(ino, None));
    }
    /// An entry with its readdir cookie (see [`Store::put_name`], which picks it).
    pub fn put_dirent(&mut self, parent: u64, name: &[u8], ino: u64, kind: Kind, cookie: u64) {
        self.ops += 1;
        self.batch.insert(
            dirent_key(parent, name),
            &record::encode_dirent(ino, kind, cookie)[..],
        );
        self.batch.insert(
            cookie_key(parent, cookie),
            record::encode_cookie(ino, kind, name),
        );
        self.batch
            .insert(up_key(ino), record::encode_up(parent, cookie));
    }
    pub fn del_dirent(&mut self, parent: u64, name: &[u8], cookie: Option<u64>) {
        self.ops += 1;
        self.batch.remove(dirent_key(parent, name));
        if let Some(c) = cookie {
            self.batch.remove(cookie_key(parent, c));
        }
    }
    /// Blob `<ino>-<seq>` is to be deleted once this batch is durable. A packed blob
    /// needs nothing: the inode record's change drops its reference (see
    /// [`Store::commit`]), and its bytes go with its pack's compaction.
    pub fn bury_blob(&mut self, ino: u64, blob: &BlobRef) {
        if blob.pack.is_none() {
            self.ops += 1;
            self.batch.insert(grave_key(ino, blob.seq), &[][..]);
        }
    }
    /// Pack file `id` is to be deleted once this batch is durable.
    pub fn bury_pack(&mut self, id: u64) {
        self.ops += 1;
        self.batch.insert(grave_key(PACK_GRAVE, id), &[][..]);
        self.batch.remove(pack_key(id));
    }
    /// Pack `id` never got its file (a crash between its entry and its rename) and
    /// holds nothing: its entry goes.
    pub fn forget_pack(&mut self, id: u64) {
        self.ops += 1;
        self.batch.remove(pack_key(id));
    }
    /// The blob `ino` has now holds the plaintext whose BLAKE3 is `hash` (see
    /// [`content_key`]).
    pub fn put_content_hint(&mut self, hash: &[u8; 32], ino: u64) {
        self.ops += 1;
        self.batch
            .insert(content_key(hash), encode_content_hint(ino));
    }
    /// Remove the content hint whose key is `key` (as [`Store::content_hints`] gives it).
    pub fn del_content_hint_key(&mut self, key: &[u8]) {
        self.ops += 1;
        let mut k = vec![b'h'];
        k.extend_from_slice(key);
        self.batch.remove(k);
    }
    /// The cache file of deleted inode `ino` is to be deleted once this batch is durable.
    pub fn bury_cache(&mut self, ino: u64) {
        self.ops += 1;
        self.batch.insert(grave_key(ino, GRAVE_CACHE), &[][..]);
    }
    pub fn unbury(&mut self, ino: u64, tag: u64) {
        self.ops += 1;
        self.batch.remove(grave_key(ino, tag));
    }
    pub fn put_xattr(&mut self, ino: u64, name: &[u8], value: &[u8]) {
        self.ops += 1;
        self.batch.insert(xattr_key(ino, name), value);
    }
    pub fn del_xattr(&mut self, ino: u64, name: &[u8]) {
        self.ops += 1;
        self.batch.remove(xattr_key(ino, name));
    }
    /// Persistently queue `ino` for compression at `due_ms` (Unix milliseconds).
    pub fn enqueue(&mut self, ino: u64, due_ms: u64) {
        self.ops += 1;
        self.batch.insert(queue_key(ino), due_ms.to_le_bytes());
        self.changes.push(Change::Queue(ino, Some(due_ms)));
    }
    pub fn dequeue(&mut self, ino: u64) {
        self.ops += 1;
        self.batch.remove(queue_key(ino));
        self.changes.push(Change::Queue(ino, None));
    }
}

/// How long an open waits for the index's lock.
///
/// The lock is an `flock` on an open file: a child process forked by any thread
/// of this process between our close and its `exec` briefly holds a copy of the
/// descriptor, and with it the lock. A daemon that is really running keeps it,
/// and after the wait that becomes a clear error.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn in_use(backing: &Path) -> StoreError {
    StoreError::Setup(format!(
        "{} is in use by another nacrithfs daemon (its index is locked)",
        backing.display()
    ))
}

/// `BACKING/index.lock` (empty): an index rebuild (`rebuild.rs`) holds it exclusively
/// from closing the old index until the old one is deleted; whoever opens or locks the
/// real index holds it shared during each attempt. So no process opens or locks an
/// index directory whose name is about to change: a mount that opened the old index in
/// that gap would write into, or delete as a leftover, the index that takes its place.
/// Made by read-write opens; a read-only opener that finds none takes none (no rebuild
/// has run since then with a daemon of this version, and its own lock is checked to be
/// the current index's, see [`flock_shared`]).
pub(super) const REBUILD_LOCK: &str = "index.lock";

/// The rebuild lock, as [`try_rebuild_lock`] found it.
pub(super) enum RebuildLock {
    Held(#[allow(dead_code)] File),
    /// No such file (a shared taker that may not make it).
    Absent,
    /// Held the other way by another process.
    Busy,
}

/// Take the rebuild lock without waiting: exclusive (a rebuild) or shared (an opener);
/// `create`: make the file if it is not there (read-write openers and rebuilds).
pub(super) fn try_rebuild_lock(
    backing: &Path,
    exclusive: bool,
    create: bool,
) -> io::Result<RebuildLock> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = backing.join(REBUILD_LOCK);
    let file = if create {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
    } else {
        File::open(&path)
    };
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(RebuildLock::Absent),
        Err(e) => return Err(e),
    };
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: a valid fd; flock has no memory effects.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(RebuildLock::Busy),
            _ => Err(e),
        };
    }
    Ok(RebuildLock::Held(file))
}

/// The rebuild lock, exclusive, waiting for at most [`LOCK_WAIT`] (openers hold it
/// shared only for an attempt).
pub(super) fn rebuild_lock_exclusive(backing: &Path) -> Result<File> {
    let started = std::time::Instant::now();
    loop {
        match try_rebuild_lock(backing, true, true)? {
            RebuildLock::Held(f) => return Ok(f),
            RebuildLock::Absent | RebuildLock::Busy => {}
        }
        if started.elapsed() >= LOCK_WAIT {
            return Err(StoreError::Setup(format!(
                "{}: its rebuild lock {REBUILD_LOCK} stays taken",
                backing.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether an attempt on the real index takes the rebuild lock shared: not at all (a
/// private copy, a sled index), or making its file if need be (read-write) or not.
#[derive(Clone, Copy)]
enum Shared {
    No,
    Create,
    IfPresent,
}

/// Call `attempt` until it returns something, or fails for another reason than the
/// lock being held (`Ok(None)`), for at most [`LOCK_WAIT`]; then the volume is in use.
/// Each attempt holds the rebuild lock shared as `shared` says (a rebuild holding it
/// counts as the lock being held).
fn wait_for_lock<T>(
    backing: &Path,
    shared: Shared,
    mut attempt: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let started = std::time::Instant::now();
    loop {
        let outer = match shared {
            Shared::No => RebuildLock::Absent,
            Shared::Create => try_rebuild_lock(backing, false, true)?,
            Shared::IfPresent => try_rebuild_lock(backing, false, false)?,
        };
        if !matches!(outer, RebuildLock::Busy) {
            let got = attempt();
            drop(outer);
            if let Some(t) = got? {
                return Ok(t);
            }
        }
        if started.elapsed() >= LOCK_WAIT {
            return Err(in_use(backing));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Take a shared `flock` on `path` (a file the read-write opener locks exclusively),
/// waiting a little for it.
fn flock_shared(path: &Path, backing: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    wait_for_lock(backing, Shared::IfPresent, || {
        let lock = File::open(path)?;
        // SAFETY: a valid fd; flock has no memory effects.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(e.into()),
            };
        }
        // A read-write open that rebuilds the index closes it (its lock released) and
        // puts a new index directory, with a new lock file, in its place: a lock taken
        // on the old file meanwhile would exclude nobody. Only the file at the path
        // counts; else wait for that one.
        Ok(still_at(&lock, path)?.then_some(lock))
    })
}

/// Whether the open `file` is still the one `path` names.
fn still_at(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (held, named) = (file.metadata()?, std::fs::metadata(path)?);
    Ok(held.dev() == named.dev() && held.ino() == named.ino())
}

/// After a clean stop, with the daemon's index closed: rebuild the index of `backing`
/// if the rule of `rebuild.rs` says so, so that a volume left unmounted keeps no
/// journal of its last session (cold storage: most volumes spend their life so).
/// Returns whether it was rebuilt. Errors only cost the space: the stop is recorded.
pub fn rebuild_index_after_stop(backing: &Path) -> Result<bool> {
    let dir = backing.join(INDEX_DIR);
    if !dir.is_dir() {
        return Ok(false);
    }
    let db = open_index(&dir, backing)?;
    // (Left by a rebuild whose removal failed; nothing refers to it.)
    let tmp = backing.join(INDEX_TMP_DIR);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
        sync_dir(backing)?;
    }
    let (_db, rebuilt) = rebuild::maybe_at(db, backing, rebuild::At::Stop)?;
    Ok(rebuilt)
}

/// Open the fjall index in `dir`, waiting a little for its lock.
fn open_index(dir: &Path, backing: &Path) -> Result<index::Index> {
    // The real index: under the rebuild lock; a private copy elsewhere: not.
    let shared = if dir == backing.join(INDEX_DIR) {
        Shared::Create
    } else {
        Shared::No
    };
    wait_for_lock(backing, shared, || match index::Index::open(dir) {
        Ok(db) => Ok(Some(db)),
        Err(fjall::Error::Locked) => Ok(None),
        Err(e) => Err(StoreError::Index(e)),
    })
}

/// For a read-only mount: under a shared lock on the real index (which keeps read-write
/// daemons and fsck out for as long as the mount lasts), a private fjall copy of it in
/// a new directory outside the backing directory, so that nothing there is opened for
/// writing (it may be on read-only media; both engines write when they open). An index
/// of format 1 or 2 (sled) is copied key by key, as the move to format 3 would.
fn copy_index_for_reading(backing: &Path, sled: bool) -> Result<(PathBuf, File, index::Index)> {
    use std::os::unix::fs::DirBuilderExt;
    let lock = if sled {
        legacy::lock_shared(backing)?
    } else {
        flock_shared(&backing.join(INDEX_DIR).join("lock"), backing)?
    };
    let dir = std::env::temp_dir().join(format!(
        "nacrithfs-ro-{}-{}",
        std::process::id(),
        unix_ms(SystemTime::now())
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let copied = (|| -> Result<index::Index> {
        if sled {
            let from = dir.join(legacy::SLED_DIR);
            copy_tree(&backing.join(legacy::SLED_DIR), &from)?;
            let old = legacy::open_sled(&from, backing)?;
            let index = open_index(&dir.join(INDEX_DIR), backing)?;
            legacy::copy_into(&old, &index)?;
            drop(old);
            std::fs::remove_dir_all(&from)?;
            Ok(index)
        } else {
            // fjall's lock file is copied too; the copy's is not held by anyone.
            copy_tree(&backing.join(INDEX_DIR), &dir.join(INDEX_DIR))?;
            // (A rebuild's exchange between the lock and the copy: what was copied may
            // be the new index, open for writing.)
            if !still_at(&lock, &backing.join(INDEX_DIR).join("lock"))? {
                return Err(StoreError::Setup(
                    "the index was replaced while it was copied (a read-write mount rebuilding it); try again".into(),
                ));
            }
            open_index(&dir.join(INDEX_DIR), backing)
        }
    })();
    match copied {
        Ok(index) => Ok((dir, lock, index)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(StoreError::Setup(format!(
                "copying the index of {} for reading into {}: {e}",
                backing.display(),
                dir.display()
            )))
        }
    }
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// What the format marker says.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    /// No marker, empty directory: to be made format 4.
    Fresh,
    /// The index in sled (format 1 flat, 2 with subdirectories).
    Sled { sharding: Sharding },
    /// The index in fjall (formats 3 and 4).
    Fjall { sharding: Sharding },
}

/// How blob and cache files are spread over subdirectories of blobs/ and cache/.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sharding {
    /// All in blobs/ and cache/ themselves (format 1; "nacrithfs 3 flat").
    Flat,
    /// `<ino mod 256, 2 hex digits>/`, all made at every read-write mount (formats 2, 3).
    Mod256,
    /// `<ino / 4096, at least 6 hex digits>/`, each made on first use (format 4).
    Range,
}

fn read_format(backing: &Path, read_only: bool) -> Result<Format> {
    let marker = backing.join(FORMAT_MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(s) if s == FORMAT_LINE => Ok(Format::Fjall {
            sharding: Sharding::Range,
        }),
        Ok(s) if s == FORMAT_LINE_MOD => Ok(Format::Fjall {
            sharding: Sharding::Mod256,
        }),
        Ok(s) if s == FORMAT_LINE_FLAT => Ok(Format::Fjall {
            sharding: Sharding::Flat,
        }),
        Ok(s) if s == FORMAT_LINE_SLED => Ok(Format::Sled {
            sharding: Sharding::Mod256,
        }),
        Ok(s) if s == FORMAT_LINE_SLED_FLAT => Ok(Format::Sled {
            sharding: Sharding::Flat,
        }),
        Ok(s) => Err(StoreError::Setup(format!(
            "{} says {:?}: this version reads formats \"nacrithfs 1\" to \"nacrithfs 4\"",
            marker.display(),
            s.trim()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound && read_only => {
            Err(StoreError::Setup(format!(
                "{} is not a nacrithfs backing directory (no {FORMAT_MARKER}); a read-only mount cannot create one",
                backing.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // The daemon's log may already be there: it is opened before the store. So
            // may what a first initialization cut off before its marker (written last)
            // left: empty blobs/, cache/ and packs/, and an index that holds no file's
            // data (none is stored while those are empty); it is begun again.
            let empty = |p: &Path| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none());
            for e in std::fs::read_dir(backing)? {
                let e = e?;
                let name = e.file_name();
                let begun = name == LOG_FILE
                    || name == INDEX_DIR
                    || name == REBUILD_LOCK
                    // (the marker's temp file: see write_durably)
                    || name == "nacrithfs.tmp"
                    || ((name == "blobs" || name == "cache" || name == pack::PACK_DIR)
                        && empty(&e.path()));
                if !begun {
                    return Err(StoreError::Setup(format!(
                        "{} is not empty and is not a nacrithfs backing directory (no {FORMAT_MARKER}); use an empty directory",
                        backing.display()
                    )));
                }
            }
            Ok(Format::Fresh)
        }
        Err(e) => Err(e.into()),
    }
}

/// The coding profiles the index holds ('P').
fn load_profiles(db: &index::Index) -> Result<pack::ProfileTable> {
    let mut t = pack::ProfileTable::default();
    for r in db.scan_prefix(b"P") {
        let (k, v) = r?;
        let id = k
            .get(1..5)
            .filter(|_| k.len() == 5)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes);
        let profile = crate::codec::compact::Profile::decode(&v);
        match (id, profile) {
            (Some(id), Ok(p)) => t.insert(id, p),
            // One bad value must not keep the volume from opening (fsck --repair
            // included): the packs of that profile give EIO until fsck --repair
            // restores it from their headers, and its number is not given out again.
            (Some(id), Err(e)) => {
                log::error!(
                    "index: coding profile {id} does not decode ({e}); its packs cannot be read: run `nacrithfs fsck --repair`"
                );
                t.unreadable.insert(id);
            }
            (None, _) => {} // fsck reports a malformed key
        }
    }
    Ok(t)
}

/// How [`Store::open_mode`] opens a volume.
#[derive(Clone, Copy, PartialEq)]
enum OpenMode {
    /// A mount, fsck --repair, recode: migrations, rebuild, recovery as needed.
    ReadWrite,
    /// A read-only mount: a private copy of the index, used as it is.
    ReadOnly,
    /// fsck without --repair: a private copy, brought to the current layout.
    Check,
}

impl Store {
    /// Open (initializing an empty directory) the backing directory.
    pub fn open(backing: &Path) -> Result<Store> {
        Store::open_mode(backing, OpenMode::ReadWrite)
    }

    /// Open for a read-only mount: nothing is migrated in the backing directory (an old
    /// volume lists its directories by position, as it always did).
    pub fn open_read_only(backing: &Path) -> Result<Store> {
        Store::open_mode(backing, OpenMode::ReadOnly)
    }

    /// Open for a check (fsck without --repair): as [`Store::open_read_only`], except
    /// that the private copy of an older index is brought to the current layout, so
    /// that the check sees the keys a read-write open would.
    pub fn open_for_check(backing: &Path) -> Result<Store> {
        Store::open_mode(backing, OpenMode::Check)
    }

    fn open_mode(backing: &Path, mode: OpenMode) -> Result<Store> {
        let read_only = mode != OpenMode::ReadWrite;
        let meta = std::fs::metadata(backing).map_err(|e| {
            StoreError::Setup(format!("backing directory {}: {e}", backing.display()))
        })?;
        if !meta.is_dir() {
            return Err(StoreError::Setup(format!(
                "backing directory {} is not a directory",
                backing.display()
            )));
        }
        tally::set_alloc_unit(block_size(backing));
        let mut format = read_format(backing, read_only)?;
        if let (Format::Sled { sharding }, false) = (format, read_only) {
            // The files stay where they are: format 3 with the same subdirectories.
            let line = if sharding == Sharding::Mod256 {
                FORMAT_LINE_MOD
            } else {
                FORMAT_LINE_FLAT
            };
            legacy::migrate_in_place(backing, line)?;
            format = read_format(backing, read_only)?;
        }
        let fresh = format == Format::Fresh;
        let sharding = match format {
            Format::Fresh => Sharding::Range,
            Format::Sled { sharding } | Format::Fjall { sharding } => sharding,
        };
        if !read_only {
            use std::os::unix::fs::DirBuilderExt;
            let mut mkdir = std::fs::DirBuilder::new();
            mkdir.recursive(true).mode(0o700);
            mkdir.create(backing.join(pack::PACK_DIR))?;
            for top in ["blobs", "cache"] {
                mkdir.create(backing.join(top))?;
                if sharding == Sharding::Mod256 {
                    for i in 0..FANOUT {
                        mkdir.create(backing.join(top).join(shard_name(i)))?;
                    }
                }
            }
        }
        let (db, ro_tmp, ro_lock) = if read_only {
            let sled = matches!(format, Format::Sled { .. });
            let (dir, lock, db) = copy_index_for_reading(backing, sled)?;
            (db, Some(dir), Some(lock))
        } else {
            let db = open_index(&backing.join(INDEX_DIR), backing)?;
            // Left by a move to format 3 cut off after its marker was written (the
            // index above holds its lock, so no other daemon is using them).
            for leftover in [legacy::SLED_DIR, INDEX_TMP_DIR] {
                let path = backing.join(leftover);
                if !fresh && path.exists() {
                    log::info!(
                        "index: removing {}, left by the move to format 3 or an index rebuild",
                        path.display()
                    );
                    std::fs::remove_dir_all(&path)?;
                    sync_dir(backing)?;
                }
            }
            let db = if fresh {
                db
            } else {
                rebuild::maybe(db, backing)?
            };
            (db, None, None)
        };
        let read_counter = |key: &[u8], default: u64| -> Result<u64> {
            Ok(match db.get(key)? {
                Some(v) if v.len() == 8 => u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8])),
                Some(_) => {
                    return Err(StoreError::Corrupt {
                        what: String::from_utf8_lossy(key).into_owned(),
                        why: "bad length".into(),
                    })
                }
                None => default,
            })
        };
        // A fresh volume's index may have been begun by an initialization cut off
        // before its marker: then its layout is what it says, not assumed.
        let begun = fresh && db.get(LAYOUT_KEY)?.is_some();
        let layout = if fresh && !begun {
            LAYOUT
        } else {
            read_counter(LAYOUT_KEY, 1)?
        };
        let next_blob = read_counter(NEXT_BLOB_KEY, 1)?;
        let mut store = Store {
            next_ino: AtomicU64::new(read_counter(NEXT_INO_KEY, ROOT_INO + 1)?),
            next_blob: AtomicU64::new(next_blob),
            stored_next_blob: std::sync::Mutex::new(next_blob),
            next_cookie: AtomicU64::new(read_counter(NEXT_COOKIE_KEY, FIRST_COOKIE)?),
            cookies: layout >= LAYOUT_COOKIES,
            layout,
            sharding,
            made_shards: Default::default(),
            ro_tmp,
            _ro_lock: ro_lock,
            tally: Default::default(),
            watch: Default::default(),
            commits: AtomicU64::new(0),
            index_disk: Default::default(),
            packs: pack::Packs::new(backing, load_profiles(&db)?),
            profile_lock: Default::default(),
            db,
            backing: backing.to_path_buf(),
        };
        if layout > LAYOUT {
            return Err(StoreError::Setup(format!(
                "the index of {} has layout {layout}; this version reads up to {LAYOUT}",
                backing.display()
            )));
        }
        if fresh && !begun {
            store.db.insert(LAYOUT_KEY, LAYOUT.to_le_bytes())?;
        } else if layout < LAYOUT && mode != OpenMode::ReadOnly {
            // (a check: the private copy in ro_tmp, nothing in the backing directory)
            store.migrate(layout)?;
        }
        store.init_tally()?;
        if store.get(ROOT_INO)?.is_none() {
            // SAFETY: getuid/getgid cannot fail.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            let root = Inode::new(Kind::Dir, 0o755, uid, gid, SystemTime::now());
            let mut txn = Txn::default();
            txn.put_inode(ROOT_INO, &root);
            store.commit(txn, true)?;
        }
        if fresh {
            crate::crash::point("init.after_index");
            write_durably(&backing.join(FORMAT_MARKER), FORMAT_LINE.as_bytes())?;
        }
        Ok(store)
    }

    /// Batches committed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Index calls in flight (see [`watchdog`]).
    pub fn watch(&self) -> &watchdog::Watch {
        &self.watch
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The directory of blobs/ or cache/ (`top`) that holds inode `ino`'s files.
    fn shard(&self, top: &str, ino: u64) -> PathBuf {
        let dir = self.backing.join(top);
        match self.sharding {
            Sharding::Flat => dir,
            Sharding::Mod256 => dir.join(shard_name(ino % FANOUT)),
            Sharding::Range => dir.join(format!("{:06x}", ino >> RANGE_SHIFT)),
        }
    }

    /// How blob and cache files are spread over subdirectories.
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// Make sure inode `ino`'s directory in blobs/ (`blobs`) or cache/ exists durably
    /// before a file is created in it: in format 4 it is made on first use, and its
    /// parent synced before any file in it can be relied on (docs/DURABILITY.md,
    /// "subdirectories"). Once per directory and process; a no-op in older formats,
    /// which made theirs at the mount.
    pub fn make_file_dir(&self, blobs: bool, ino: u64) -> io::Result<()> {
        if self.sharding != Sharding::Range || self.ro_tmp.is_some() {
            return Ok(());
        }
        let dir = self.shard(if blobs { "blobs" } else { "cache" }, ino);
        // Held across the mkdir and the sync: a second caller must not find the
        // directory made but its name not yet durable.
        let mut made = self.made_shards.lock().unwrap_or_else(|p| p.into_inner());
        if made.contains(&dir) {
            return Ok(());
        }
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        crate::crash::point("shard.after_mkdir");
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        made.insert(dir);
        Ok(())
    }

    pub fn cache_path(&self, ino: u64) -> PathBuf {
        self.cache_dir_of(ino).join(ino.to_string())
    }

    pub fn cache_tmp_path(&self, ino: u64) -> PathBuf {
        match &self.ro_tmp {
            Some(d) => d.join(format!("{ino}.tmp")),
            None => self.cache_dir_of(ino).join(format!("{ino}.tmp")),
        }
    }

    pub fn blob_path(&self, ino: u64, seq: u64) -> PathBuf {
        self.blob_dir_of(ino).join(format!("{ino}-{seq}.nc06"))
    }

    /// The directory of inode `ino`'s blobs (fsync it after a rename there).
    pub fn blob_dir_of(&self, ino: u64) -> PathBuf {
        self.shard("blobs", ino)
    }

    /// The directory of inode `ino`'s cache file.
    pub fn cache_dir_of(&self, ino: u64) -> PathBuf {
        self.shard("cache", ino)
    }

    /// Every directory that can hold files of blobs/ (`blobs`) or cache/: the top one
    /// (where a volume with subdirectories keeps none) and its subdirectories (in
    /// format 4 those that exist; the top one alone if it cannot be listed, which its
    /// own listing then reports).
    pub fn file_dirs(&self, blobs: bool) -> Vec<PathBuf> {
        let top = self.backing.join(if blobs { "blobs" } else { "cache" });
        let mut dirs = vec![top.clone()];
        match self.sharding {
            Sharding::Flat => {}
            Sharding::Mod256 => dirs.extend((0..FANOUT).map(|i| top.join(shard_name(i)))),
            Sharding::Range => {
                if let Ok(entries) = std::fs::read_dir(&top) {
                    let mut subs: Vec<PathBuf> = entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .filter(|p| self.is_shard_dir(p))
                        .collect();
                    subs.sort();
                    dirs.extend(subs);
                }
            }
        }
        dirs
    }

    /// Whether `path` is named as one of the subdirectories [`Store::file_dirs`] lists.
    pub fn is_shard_dir(&self, path: &Path) -> bool {
        let Some(n) = path.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        let hex = |n: &str| {
            n.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        match self.sharding {
            Sharding::Flat => false,
            Sharding::Mod256 => n.len() == 2 && hex(n),
            // As [`Store::shard`] names them: at least 6 digits, no leading zero beyond.
            Sharding::Range => {
                n.len() >= 6 && n.len() <= 16 && hex(n) && (n.len() == 6 || !n.starts_with('0'))
            }
        }
    }

    /// Allocate an inode number; `txn` persists the counter with the new inode.
    pub fn alloc_ino(&self, txn: &mut Txn) -> u64 {
        let ino = self.next_ino.fetch_add(1, Ordering::SeqCst);
        txn.batch.insert(NEXT_INO_KEY, (ino + 1).to_le_bytes());
        ino
    }

    /// Allocate a readdir cookie; `txn` persists the counter with the entry.
    pub fn alloc_cookie(&self, txn: &mut Txn) -> u64 {
        let c = self.next_cookie.fetch_add(1, Ordering::SeqCst);
        txn.batch.insert(NEXT_COOKIE_KEY, (c + 1).to_le_bytes());
        c
    }

    /// The readdir cookie of an existing entry.
    pub fn dirent_cookie(&self, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        let _w = self.watch.enter("lookup");
        Ok(self
            .db
            .get(dirent_key(parent, name))?
            .and_then(|v| record::decode_dirent_full(&v))
            .and_then(|(_, _, c)| c))
    }

    /// Point `parent/name` at `ino`. A name that exists keeps its cookie (it stays in
    /// its place for a listing in progress); a new name gets the next cookie.
    pub fn put_name(
        &self,
        txn: &mut Txn,
        parent: u64,
        name: &[u8],
        ino: u64,
        kind: Kind,
    ) -> Result<()> {
        let cookie = self.dirent_cookie(parent, name)?;
        self.put_name_with(txn, parent, name, ino, kind, cookie);
        Ok(())
    }

    /// [`Store::put_name`] where the caller has just read the name's cookie
    /// ([`Store::lookup_full`]; None: the name is new, or has none, and gets the next).
    pub fn put_name_with(
        &self,
        txn: &mut Txn,
        parent: u64,
        name: &[u8],
        ino: u64,
        kind: Kind,
        cookie: Option<u64>,
    ) {
        let cookie = match cookie {
            Some(c) => c,
            None => self.alloc_cookie(txn),
        };
        txn.put_dirent(parent, name, ino, kind, cookie);
    }

    /// Record a clean stop, durably (the daemon's last index write). Everything the
    /// backing filesystem holds reaches the disk first (`syncfs`): plaintexts written
    /// without an fsync, unlinks of reaped and evicted files. The next mount trusts it
    /// without looking; before, a power cut soon after a clean unmount could leave a
    /// dirty file's plaintext shorter than the size the index had for it.
    pub fn mark_clean_stop(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let _w = self.watch.enter("flush");
        let dir = File::open(&self.backing)?;
        // SAFETY: a valid descriptor, open for the call's duration.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        crate::crash::point("stop.after_syncfs");
        self.db.insert(CLEAN_STOP_KEY, [])?;
        // The memtable written out too: the next open replays no journal.
        self.checked(self.db.checkpoint())
    }

    /// Whether the last stop was clean; the record is removed durably either way, so a
    /// crash of this mount is never taken for a clean stop.
    pub fn take_clean_stop(&self) -> Result<bool> {
        let _w = self.watch.enter("commit");
        if self.db.get(CLEAN_STOP_KEY)?.is_none() {
            return Ok(false);
        }
        self.db.remove(CLEAN_STOP_KEY)?;
        self.db.flush()?;
        Ok(true)
    }

    /// Whether clean copies made before layout 2 still need checking (see
    /// [`CHECK_CLEAN_KEY`]).
    pub fn clean_copies_unverified(&self) -> Result<bool> {
        Ok(self.db.get(CHECK_CLEAN_KEY)?.is_some())
    }

    /// In the batch that records the check's results.
    pub fn clean_copies_verified(&self, txn: &mut Txn) {
        txn.batch.remove(CHECK_CLEAN_KEY);
    }

    /// Bring an older index to this layout: its content hints first (layout 6, in
    /// batches: they are advisory, and one rewritten twice after a crash is the same
    /// key), then in one batch the readdir cookies for entries without one (layout 1, in
    /// name order), parent entries for every named inode (layout 2), the entry in every
    /// cookie's value (layout 3), and the layout.
    fn migrate(&mut self, from: u64) -> Result<()> {
        let hints = if from < LAYOUT_HINT_INODES {
            self.migrate_content_hints()?
        } else {
            0
        };
        // Layouts 4-6 in batches; below 4, the one batch further down removes the
        // parent entries (layout 3) and gives every named inode its up entry (a batch
        // of up entries committed alone would point at layout-3 cookie values, which
        // hold only the name, and a read-only open in between would misread them).
        let ups = if (LAYOUT_COOKIE_ENTRIES..LAYOUT_UP_ENTRIES).contains(&from) {
            self.migrate_parent_entries()?
        } else {
            0
        };
        let mut txn = Txn::default();
        if from >= LAYOUT_COOKIE_ENTRIES {
            // Layouts 5 to 8 only add keys or record forms, or change the hints and
            // parent entries (done above).
            txn.batch.insert(LAYOUT_KEY, LAYOUT.to_le_bytes());
            self.commit(txn, true)?;
            self.layout = LAYOUT;
            log::info!(
                "index: layout {from} -> {LAYOUT} ({hints} content hints and {ups} parent entries rewritten)"
            );
            return Ok(());
        }
        let (mut cookies, mut parents) = (0u64, 0u64);
        for k in self.db.scan_prefix(b"p").keys() {
            txn.batch.remove(&k?[..]);
        }
        for r in self.db.scan_prefix(b"d") {
            let (k, v) = r?;
            let (Some(parent), Some((ino, kind, cookie))) =
                (ino_from(&k), record::decode_dirent_full(&v))
            else {
                continue; // fsck reports it
            };
            match cookie {
                None => {
                    let c = self.alloc_cookie(&mut txn);
                    txn.put_dirent(parent, &k[9..], ino, kind, c);
                    cookies += 1;
                }
                Some(c) => {
                    txn.batch.insert(up_key(ino), record::encode_up(parent, c));
                    txn.batch.insert(
                        cookie_key(parent, c),
                        record::encode_cookie(ino, kind, &k[9..]),
                    );
                }
            }
            parents += 1;
        }
        txn.batch.insert(LAYOUT_KEY, LAYOUT.to_le_bytes());
        if from < LAYOUT_COOKIES {
            // Layout 1 made plaintext the clean copy without an fsync: after a power cut
            // one may be short or zero-filled. The next recovery checks each against its
            // blob.
            txn.batch.insert(CHECK_CLEAN_KEY, &[][..]);
        }
        self.commit(txn, true)?;
        self.cookies = true;
        self.layout = LAYOUT;
        log::info!(
            "index: layout {from} -> {LAYOUT}: {cookies} directory entries given readdir cookies, {parents} parent entries"
        );
        Ok(())
    }

    /// Rewrite every content hint of layout 5 or before (a 33-byte key, a blob as its
    /// value) as a layout-6 hint (16 bytes of the hash, the blob's inode). Returns how
    /// many. Each batch removes the old keys it rewrites, so a crash in between leaves
    /// only old keys still to do; a malformed one is left for fsck.
    fn migrate_content_hints(&mut self) -> Result<u64> {
        let (mut done, mut n) = (0u64, 0usize);
        let mut txn = Txn::default();
        // The scan reads a snapshot: the keys written meanwhile are not met again.
        for r in self.db.scan_prefix(b"h") {
            let (k, v) = r?;
            let Some(ino) = decode_old_content_hint(&v).filter(|_| k.len() == 33) else {
                continue;
            };
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&k[1..]);
            txn.batch.remove(&k[..]);
            txn.put_content_hint(&hash, ino);
            n += 1;
            if n == MIGRATION_BATCH {
                self.commit(std::mem::take(&mut txn), false)?;
                done += n as u64;
                n = 0;
            }
        }
        if n > 0 {
            self.commit(txn, false)?;
            done += n as u64;
        }
        Ok(done)
    }

    /// Rewrite every parent entry of layouts 3-6 (directory and name) as an up entry
    /// (directory and the name's cookie), in batches that each remove the parent
    /// entries they rewrite: a crash in between leaves only parent entries still to
    /// do. A parent entry whose name is gone (a removed hard link) or has no cookie is
    /// only removed; a malformed one is left for fsck. Returns how many were rewritten.
    fn migrate_parent_entries(&mut self) -> Result<u64> {
        let (mut done, mut n) = (0u64, 0usize);
        let mut txn = Txn::default();
        // The scan reads a snapshot: the keys written meanwhile are not met again.
        for r in self.db.scan_prefix(b"p") {
            let (k, v) = r?;
            let (Some(ino), Some(parent)) = (
                ino_from(&k).filter(|_| k.len() == 9),
                v.get(..8)
                    .and_then(|p| Some(u64::from_le_bytes(p.try_into().ok()?))),
            ) else {
                continue;
            };
            txn.batch.remove(&k[..]);
            let entry = self.db.get(dirent_key(parent, &v[8..]))?;
            if let Some((child, _, Some(cookie))) =
                entry.as_deref().and_then(record::decode_dirent_full)
            {
                if child == ino {
                    txn.batch
                        .insert(up_key(ino), record::encode_up(parent, cookie));
                    done += 1;
                }
            }
            n += 1;
            if n == MIGRATION_BATCH {
                self.commit(std::mem::take(&mut txn), false)?;
                crate::crash::point("layout7.after_batch");
                n = 0;
            }
        }
        if n > 0 {
            self.commit(txn, false)?;
            crate::crash::point("layout7.after_batch");
        }
        Ok(done)
    }

    /// The directory, name and kind of the name `ino` was last given, checked to name
    /// it now: None for the root, an inode without a name, one whose recorded name was
    /// removed since (a hard link), or an index older than layout 3 opened read-only.
    /// From layout 7 the name is the one its up entry's cookie names; an older index
    /// opened read-only gives its parent entry's name (or, if its move to layout 7 was
    /// cut off, its up entry's).
    pub fn parent_of(&self, ino: u64) -> Result<Option<(u64, Vec<u8>, Kind)>> {
        let _w = self.watch.enter("get");
        if self.layout < LAYOUT_UP_ENTRIES {
            let old = self.db.get(parent_key(ino))?.and_then(|v| {
                let parent = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
                Some((parent, v[8..].to_vec()))
            });
            if let Some((parent, name)) = old {
                return Ok(match self.lookup(parent, &name)? {
                    Some((child, kind)) if child == ino => Some((parent, name, kind)),
                    _ => None,
                });
            }
        }
        let Some((parent, cookie)) = self
            .db
            .get(up_key(ino))?
            .and_then(|v| record::decode_up(&v))
        else {
            return Ok(None);
        };
        Ok(self
            .db
            .get(cookie_key(parent, cookie))?
            .and_then(|v| match record::decode_cookie(&v) {
                Some((child, kind, name)) if child == ino => Some((parent, name.to_vec(), kind)),
                _ => None,
            }))
    }

    /// Up to `max` entries of a directory whose cookie is above `after`, in cookie
    /// order. An old volume opened read-only has no cookies: its entries are numbered
    /// by position in name order, as before.
    pub fn list_after(&self, parent: u64, after: u64, max: usize) -> Result<Vec<ListedEntry>> {
        let _w = self.watch.enter("readdir");
        let mut out = Vec::new();
        if !self.cookies {
            let skip = after.saturating_sub(FIRST_COOKIE - 1) as usize;
            for (i, (name, ino, kind)) in self.list_dir(parent, skip + max)?.into_iter().enumerate()
            {
                if i >= skip {
                    let cookie = FIRST_COOKIE + i as u64;
                    out.push(ListedEntry {
                        cookie,
                        name,
                        ino,
                        kind,
                    });
                }
            }
            return Ok(out);
        }
        let from = cookie_key(parent, after.saturating_add(1).max(FIRST_COOKIE));
        let to = cookie_key(parent, u64::MAX);
        for r in self.db.range(&from, &to) {
            let (k, v) = r?;
            let Some(cookie) = second_u64(&k) else {
                continue;
            };
            let entry = if self.layout >= LAYOUT_COOKIE_ENTRIES {
                // Written in the same batch as the entry, always: no need to read it.
                // (fsck checks that the two agree.)
                match record::decode_cookie(&v) {
                    Some((ino, kind, name)) => (ino, kind, name.to_vec()),
                    None => continue, // fsck reports it
                }
            } else {
                // An old index opened read-only: the value is the name; the entry is
                // the truth, and a cookie whose entry is gone or moved on is skipped.
                let Some((ino, kind, Some(c))) = self
                    .db
                    .get(dirent_key(parent, &v))?
                    .and_then(|d| record::decode_dirent_full(&d))
                else {
                    continue;
                };
                if c != cookie {
                    continue;
                }
                (ino, kind, v.to_vec())
            };
            out.push(ListedEntry {
                cookie,
                name: entry.2,
                ino: entry.0,
                kind: entry.1,
            });
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Every graveyard entry: (inode, tag), tag [`GRAVE_CACHE`] or a blob sequence.
    pub fn graveyard(&self) -> Result<Vec<(u64, u64)>> {
        let _w = self.watch.enter("graveyard");
        let mut out = Vec::new();
        for r in self.db.scan_prefix(b"g") {
            let (k, _) = r?;
            let (Some(ino), Some(tag)) = (ino_from(&k), second_u64(&k)) else {
                continue;
            };
            if k.len() == 17 {
                out.push((ino, tag));
            }
        }
        Ok(out)
    }

    /// The path a graveyard entry names.
    pub fn grave_path(&self, ino: u64, tag: u64) -> PathBuf {
        if ino == PACK_GRAVE {
            self.packs.path(tag)
        } else if tag == GRAVE_CACHE {
            self.cache_path(ino)
        } else {
            self.blob_path(ino, tag)
        }
    }

    /// Allocate a blob sequence number, persisted at once so a crash never reuses it.
    pub fn alloc_blob_seq(&self) -> Result<u64> {
        let _w = self.watch.enter("alloc");
        let seq = self.next_blob.fetch_add(1, Ordering::SeqCst);
        // Compressors allocate concurrently: the stored counter only ever grows (a
        // plain insert from a slower thread could set it back, and after a crash a
        // sequence number would be handed out twice).
        let mut stored = self
            .stored_next_blob
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if seq + 1 > *stored {
            self.db.insert(NEXT_BLOB_KEY, (seq + 1).to_le_bytes())?;
            *stored = seq + 1;
        }
        Ok(seq)
    }

    pub fn commit(&self, mut txn: Txn, durable: bool) -> Result<()> {
        let _w = self.watch.enter("commit");
        {
            // Under the tally's lock, so that the old values read here are the ones
            // this batch replaces (commits are serialized; applying is in memory).
            let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
            let mut totals = tally.totals;
            type Now = (tally::Totals, Option<(PackSlot, u64)>);
            let mut seen: HashMap<u64, Now> = HashMap::new();
            // Packed blobs whose references change: slot -> (length, inode -> now refers).
            let mut refs: BTreeMap<PackSlot, (u64, BTreeMap<u64, bool>)> = BTreeMap::new();
            for c in &txn.changes {
                if let Change::Inode(ino, new) = c {
                    let old = match seen.get(ino) {
                        Some(t) => *t,
                        None => self.state_of(*ino)?,
                    };
                    let new: Now = new.unwrap_or_default();
                    totals.replace(&old.0, &new.0);
                    if old.1 != new.1 {
                        for (side, refers) in [(old.1, false), (new.1, true)] {
                            if let Some((slot, len)) = side {
                                refs.entry(slot)
                                    .or_insert((len, BTreeMap::new()))
                                    .1
                                    .insert(*ino, refers);
                            }
                        }
                    }
                    seen.insert(*ino, new);
                }
            }
            if !refs.is_empty() {
                self.account_refs(&mut txn.batch, refs)?;
            }
            self.checked(self.db.apply(txn.batch))?;
            self.commits.fetch_add(1, Ordering::Relaxed);
            tally.totals = totals;
            for c in txn.changes {
                match c {
                    Change::Queue(ino, due) => tally.set_due(ino, due),
                    Change::Inode(ino, now) => tally.set_inode(ino, now.map(|n| n.0).as_ref()),
                }
            }
        }
        if durable {
            self.flush_index()?;
        }
        Ok(())
    }

    /// Add to `batch` the reference keys of packed blobs whose referrers change, and
    /// the live counts of their packs: a blob counts as live while any inode refers to
    /// it (equal files share one). Called under the tally's lock (commits serialized).
    fn account_refs(
        &self,
        batch: &mut index::Batch,
        refs: BTreeMap<PackSlot, (u64, BTreeMap<u64, bool>)>,
    ) -> Result<()> {
        let mut infos: HashMap<u64, PackInfo> = HashMap::new();
        for (slot, (len, changes)) in refs {
            let mut holders: std::collections::BTreeSet<u64> =
                self.slot_refs(slot)?.into_iter().collect();
            let before = !holders.is_empty();
            for (ino, refers) in changes {
                if refers {
                    holders.insert(ino);
                    batch.insert(ref_key(slot, ino), len.to_le_bytes());
                } else {
                    holders.remove(&ino);
                    batch.remove(ref_key(slot, ino));
                }
            }
            let after = !holders.is_empty();
            if before == after {
                continue;
            }
            let info = match infos.entry(slot.pack) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let info = self.pack_info(slot.pack)?.unwrap_or_else(|| {
                        log::warn!(
                            "index: pack {} has no pack entry; counting it from here (fsck checks it)",
                            pack::pack_name(slot.pack)
                        );
                        // Its profile from its own header (0, unknown, if unreadable:
                        // fsck reports it), so that the entry made here is the one
                        // fsck would make.
                        let profile = crate::codec::source::FileSource::open(
                            &self.packs.path(slot.pack),
                        )
                        .ok()
                        .and_then(|f| pack::read_header(&f).ok())
                        .filter(|(id, ..)| *id == slot.pack)
                        .map_or(0, |(_, profile, ..)| profile);
                        PackInfo {
                            profile,
                            ..Default::default()
                        }
                    });
                    e.insert(info)
                }
            };
            // (Saturating: the lengths and counts come from the index.)
            let bytes = len.saturating_add(pack::RECORD_HEADER);
            if after {
                info.live_bytes = info.live_bytes.saturating_add(bytes);
                info.live_blobs = info.live_blobs.saturating_add(1);
            } else {
                info.live_bytes = info.live_bytes.saturating_sub(bytes);
                info.live_blobs = info.live_blobs.saturating_sub(1);
            }
        }
        for (id, info) in infos {
            batch.insert(pack_key(id), info.encode());
        }
        Ok(())
    }

    /// The inodes referring to the packed blob at `slot`.
    pub fn slot_refs(&self, slot: PackSlot) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for r in self.db.scan_prefix(&ref_key(slot, 0)[..17]).keys() {
            if let Some((_, ino)) = parse_ref_key(&r?) {
                out.push(ino);
            }
        }
        Ok(out)
    }

    /// Every reference into pack `id`: (slot, inode, length), in slot order.
    pub fn pack_refs(&self, id: u64) -> Result<Vec<(PackSlot, u64, u64)>> {
        let mut out = Vec::new();
        for r in self.db.scan_prefix(
            &ref_key(
                PackSlot {
                    pack: id,
                    offset: 0,
                },
                0,
            )[..9],
        ) {
            let (k, v) = r?;
            if let (Some((slot, ino)), Ok(len)) = (parse_ref_key(&k), <[u8; 8]>::try_from(&v[..])) {
                out.push((slot, ino, u64::from_le_bytes(len)));
            }
        }
        Ok(out)
    }

    /// Every reference to a packed blob (for fsck): (slot, inode, length or None if the
    /// value is malformed).
    pub fn all_refs(&self) -> impl Iterator<Item = Result<(PackSlot, u64, Option<u64>)>> + '_ {
        self.db.scan_prefix(b"R").filter_map(|r| match r {
            Err(e) => Some(Err(e.into())),
            Ok((k, v)) => parse_ref_key(&k).map(|(slot, ino)| {
                Ok((
                    slot,
                    ino,
                    <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_le_bytes),
                ))
            }),
        })
    }

    pub fn pack_info(&self, id: u64) -> Result<Option<PackInfo>> {
        Ok(self
            .db
            .get(pack_key(id))?
            .and_then(|v| PackInfo::decode(&v)))
    }

    /// Every pack the index knows, with its counts: O(packs), a pack holding MiB.
    pub fn pack_infos(&self) -> Result<Vec<(u64, Option<PackInfo>)>> {
        let mut out = Vec::new();
        for r in self.db.scan_prefix(b"k") {
            let (k, v) = r?;
            if let Some(id) = ino_from(&k).filter(|_| k.len() == 9) {
                out.push((id, PackInfo::decode(&v)));
            }
        }
        Ok(out)
    }

    /// Pack files: how many, what they occupy on disk (blocks), and the bytes of them
    /// still referenced. O(packs): one stat each.
    pub fn pack_usage(&self) -> Result<(u64, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let (mut n, mut disk, mut live) = (0, 0, 0);
        for (id, info) in self.pack_infos()? {
            if let Ok(m) = std::fs::metadata(self.packs.path(id)) {
                n += 1;
                disk += m.blocks() * 512;
            }
            live += info.map_or(0, |i| i.live_bytes);
        }
        Ok((n, disk, live))
    }

    pub fn packs(&self) -> &pack::Packs {
        &self.packs
    }

    /// Open a file's blob for reading (a packed one as the version-1 blob it was made
    /// from).
    pub fn open_blob(&self, ino: u64, blob: &BlobRef) -> io::Result<pack::BlobSource> {
        match blob.pack {
            None => Ok(pack::BlobSource::File(
                crate::codec::source::FileSource::open(&self.blob_path(ino, blob.seq))?,
            )),
            Some(slot) => Ok(pack::BlobSource::Packed(
                self.packs.open(slot, blob.stored_size)?,
            )),
        }
    }

    /// Where a blob is, for messages.
    pub fn blob_display(&self, ino: u64, blob: &BlobRef) -> String {
        match blob.pack {
            None => self.blob_path(ino, blob.seq).display().to_string(),
            Some(slot) => format!(
                "{} at {} ({} bytes)",
                self.packs.path(slot.pack).display(),
                slot.offset,
                blob.stored_size
            ),
        }
    }

    /// Append the verified blob in `tmp` (made for `ino`) to a pack, if it is small
    /// enough and its header packs losslessly. Returns its slot and packed length; the
    /// pack is durable, the index not yet changed (the caller commits the reference).
    pub fn pack_blob(&self, ino: u64, tmp: &Path) -> Result<Option<(pack::Pending<'_>, u64)>> {
        use crate::codec::source::Source;
        let src = crate::codec::source::FileSource::open(tmp)?;
        if src.len() > pack::PACK_MAX_BLOB {
            return Ok(None);
        }
        let bad = |e: crate::codec::container::FormatError| {
            StoreError::Io(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        };
        let (header, header_len) = crate::codec::container::Header::read_from(&src).map_err(bad)?;
        let profile = crate::codec::compact::Profile::of(&header);
        let profile_id = self.profile_id_for(&profile)?;
        let Some(bytes) = pack::compact_blob(&src, &header, header_len, profile_id).map_err(bad)?
        else {
            log::warn!("a blob's header does not pack losslessly; it keeps a file of its own");
            return Ok(None);
        };
        let pending = self
            .packs
            .append(profile_id, ino, &bytes, &|| self.new_pack(profile_id))?;
        Ok(Some((pending, bytes.len() as u64)))
    }

    /// The id of `profile`, recorded durably in the index first if new.
    fn profile_id_for(&self, profile: &crate::codec::compact::Profile) -> Result<u32> {
        if let Some(id) = self.packs.profile_id(profile) {
            return Ok(id);
        }
        let _g = self.profile_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = self.packs.profile_id(profile) {
            return Ok(id);
        }
        let id = self
            .packs
            .next_profile_id()
            .ok_or_else(|| StoreError::Corrupt {
                what: "coding profiles".into(),
                why: "every profile id is taken".into(),
            })?;
        let _w = self.watch.enter("profile");
        self.checked(self.db.insert(profile_key(id), profile.encode()))?;
        self.checked(self.db.flush())?;
        self.packs.add_profile(id, profile.clone());
        Ok(id)
    }

    /// A new pack of `profile`: its id allocated and its entry in the index, durably,
    /// before the file is made (so every pack file is known to the index).
    pub fn new_pack(&self, profile: u32) -> io::Result<u64> {
        let to_io = |e: StoreError| io::Error::other(e.to_string());
        let id = self.alloc_blob_seq().map_err(to_io)?;
        // Never over a pack in use (a blob counter set back by damage; fsck sets it
        // past every pack id).
        if self
            .db
            .get(pack_key(id))
            .map_err(|e| to_io(e.into()))?
            .is_some()
        {
            return Err(io::Error::other(format!(
                "pack number {id} is already in use: the blob counter is behind; run `nacrithfs fsck --repair`"
            )));
        }
        // Nor over a pack file the index does not know (checked before its entry is
        // written: an entry with no references would make compaction bury that file).
        let path = self.packs.path(id);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
            Ok(_) => {
                let why = "the blob counter is behind; run `nacrithfs fsck --repair`";
                return Err(io::Error::other(format!(
                    "{} is already there: {why}",
                    path.display()
                )));
            }
        }
        let info = PackInfo {
            profile,
            ..Default::default()
        };
        let _w = self.watch.enter("pack");
        {
            let _t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
            self.checked(self.db.insert(pack_key(id), info.encode()))
                .map_err(to_io)?;
        }
        self.checked(self.db.flush()).map_err(to_io)?;
        Ok(id)
    }

    /// An index write's result; one the index refused because an earlier write to disk
    /// failed (fjall then refuses all) marks the index failed for the daemon's watchdog.
    fn checked<T>(&self, r: fjall::Result<T>) -> Result<T> {
        if let Err(fjall::Error::Poisoned) = &r {
            self.watch.set_failed();
        }
        Ok(r?)
    }

    /// What inode `ino` adds to the totals now, and its packed blob (nothing if absent
    /// or unreadable).
    fn state_of(&self, ino: u64) -> Result<(tally::Totals, Option<(PackSlot, u64)>)> {
        Ok(self
            .db
            .get(inode_key(ino))?
            .and_then(|v| Inode::decode(&v).ok())
            .map(|i| (tally::Totals::of(&i), packed_of(&i)))
            .unwrap_or_default())
    }

    /// Count everything once (at open).
    fn init_tally(&self) -> Result<()> {
        let mut t = tally::Tally::default();
        for r in self.db.scan_prefix(b"i") {
            let (k, v) = r?;
            if k.len() != 9 {
                continue;
            }
            if let (Some(ino), Ok(i)) = (ino_from(&k), Inode::decode(&v)) {
                let new = tally::Totals::of(&i);
                t.totals.replace(&tally::Totals::default(), &new);
                t.set_inode(ino, Some(&new));
                if i.kind == Kind::File && i.cached && !i.dirty {
                    t.clean_at_open.push((ino, i.size));
                }
                if i.nlink == 0 && ino != ROOT_INO {
                    t.unlinked_at_open.push(ino);
                }
            }
        }
        for (ino, due) in self.queue()? {
            t.set_due(ino, Some(due));
        }
        *self.tally.lock().unwrap_or_else(|p| p.into_inner()) = t;
        Ok(())
    }

    /// What the count at open found: clean cached copies (ino, size) and inodes with no
    /// link left (see [`tally::Tally::clean_at_open`]); empty after the first call.
    pub fn take_open_scan(&self) -> (Vec<(u64, u64)>, Vec<u64>) {
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        (
            std::mem::take(&mut t.clean_at_open),
            std::mem::take(&mut t.unlinked_at_open),
        )
    }

    /// Blocks the index's files occupy on disk, in bytes (fjall's own figure counts the
    /// journal's preallocated length). A walk of the index directory (tens of files,
    /// whatever the volume's size), done at most every 10 seconds.
    pub fn index_disk_bytes(&self) -> u64 {
        let mut last = self.index_disk.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, bytes)) = *last {
            if at.elapsed() < std::time::Duration::from_secs(10) {
                return bytes;
            }
        }
        let bytes = [INDEX_DIR, "index"]
            .iter()
            .map(|d| self.backing.join(d))
            .find(|p| p.is_dir())
            .map_or(0, |d| disk_usage(&d));
        *last = Some((std::time::Instant::now(), bytes));
        bytes
    }

    /// The volume's totals, as of the last commit.
    pub fn totals(&self) -> tally::Totals {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).totals
    }

    /// Read the in-memory queue index: `f` gets it under its lock.
    pub fn with_queue<T>(&self, f: impl FnOnce(&tally::Tally) -> T) -> T {
        f(&self.tally.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Park or unpark queue entries in the in-memory index (nothing durable changes).
    pub fn with_queue_mut<T>(&self, f: impl FnOnce(&mut tally::Tally) -> T) -> T {
        f(&mut self.tally.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn flush(&self) -> Result<()> {
        let _w = self.watch.enter("flush");
        self.flush_index()
    }

    /// A failed flush poisons fjall (every later write and flush is refused), so it
    /// marks the index failed at once: the daemon's watchdog stops it (exit 70), and
    /// the next mount's journal replay says what was durable.
    fn flush_index(&self) -> Result<()> {
        #[cfg(test)]
        if tests::FAIL_FLUSH.with(|f| f.get()) {
            self.watch.set_failed();
            return Err(io::Error::from_raw_os_error(libc::EIO).into());
        }
        let r = self.checked(self.db.flush());
        if r.is_err() {
            self.watch.set_failed();
        }
        r
    }

    /// The inode the content hint for `hash` names, if any (an index of layout 6; older
    /// ones are only opened read-only without migrating, and have none to give).
    pub fn content_hint(&self, hash: &[u8; 32]) -> Result<Option<u64>> {
        let _w = self.watch.enter("content_hint");
        if self.layout < LAYOUT_HINT_INODES {
            return Ok(None);
        }
        match self.db.get(content_key(hash))? {
            Some(v) => decode_content_hint(&v)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt {
                    what: format!("content hint {}", crate::codec::hex(&hash[..8])),
                    why: format!("{} bytes, expected 1 to 8", v.len()),
                }),
            None => Ok(None),
        }
    }

    /// The inode a content hint's value (as [`Store::content_hints`] gives it) names,
    /// in this index's layout.
    pub fn hint_owner(&self, v: &[u8]) -> Option<u64> {
        if self.layout < LAYOUT_HINT_INODES {
            decode_old_content_hint(v)
        } else {
            decode_content_hint(v)
        }
    }

    /// Whether a content hint's key and value have the shape this index's layout
    /// writes (for fsck).
    pub fn content_hint_well_formed(&self, key: &[u8], v: &[u8]) -> bool {
        if self.layout < LAYOUT_HINT_INODES {
            key.len() == 33 && decode_old_content_hint(v).is_some()
        } else {
            key.len() == 1 + HINT_KEY_HASH && decode_content_hint(v).is_some()
        }
    }

    /// Every content hint: (its key without the kind byte, its value as stored), for fsck.
    pub fn content_hints(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + '_ {
        self.db.scan_prefix(b"h").map(|r| {
            r.map(|(k, v)| (k[1..].to_vec(), v.to_vec()))
                .map_err(Into::into)
        })
    }

    pub fn get(&self, ino: u64) -> Result<Option<Inode>> {
        let _w = self.watch.enter("get");
        match self.db.get(inode_key(ino))? {
            Some(v) => Inode::decode(&v)
                .map(Some)
                .map_err(|why| StoreError::Corrupt {
                    what: format!("inode {ino}"),
                    why,
                }),
            None => Ok(None),
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<(u64, Kind)>> {
        Ok(self
            .lookup_full(parent, name)?
            .map(|(ino, kind, _)| (ino, kind)))
    }

    /// [`Store::lookup`] with the entry's readdir cookie (None: an entry of an index
    /// layout before cookies), for a caller that then removes or replaces the entry
    /// without reading it again.
    pub fn lookup_full(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<(u64, Kind, Option<u64>)>> {
        let _w = self.watch.enter("lookup");
        match self.db.get(dirent_key(parent, name))? {
            Some(v) => {
                record::decode_dirent_full(&v)
                    .map(Some)
                    .ok_or_else(|| StoreError::Corrupt {
                        what: format!(
                            "entry {:?} of directory {parent}",
                            String::from_utf8_lossy(name)
                        ),
                        why: "bad dirent".into(),
                    })
            }
            None => Ok(None),
        }
    }

    /// The first `limit` entries of a directory, in name order.
    pub fn list_dir(&self, parent: u64, limit: usize) -> Result<Vec<(Vec<u8>, u64, Kind)>> {
        let _w = self.watch.enter("readdir");
        let mut out = Vec::new();
        for r in self.db.scan_prefix(dirent_prefix(parent)) {
            let (k, v) = r?;
            let name = k[9..].to_vec();
            let Some((ino, kind)) = record::decode_dirent(&v) else {
                log::error!(
                    "directory {parent}: entry {:?} is corrupt; skipped",
                    String::from_utf8_lossy(&name)
                );
                continue;
            };
            out.push((name, ino, kind));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn dir_is_empty(&self, ino: u64) -> Result<bool> {
        let _w = self.watch.enter("readdir");
        Ok(self
            .db
            .scan_prefix(dirent_prefix(ino))
            .next()
            .transpose()?
            .is_none())
    }

    pub fn xattr_get(&self, ino: u64, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let _w = self.watch.enter("xattr");
        Ok(self.db.get(xattr_key(ino, name))?.map(|v| v.to_vec()))
    }

    pub fn xattr_names(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        let _w = self.watch.enter("xattr");
        self.db
            .scan_prefix(xattr_prefix(ino))
            .map(|r| r.map(|(k, _)| k[9..].to_vec()).map_err(Into::into))
            .collect()
    }

    /// The names of an inode's extended attributes with their values' lengths.
    pub fn xattr_sizes(&self, ino: u64) -> Result<Vec<(Vec<u8>, usize)>> {
        let _w = self.watch.enter("xattr");
        self.db
            .scan_prefix(xattr_prefix(ino))
            .map(|r| {
                r.map(|(k, v)| (k[9..].to_vec(), v.len()))
                    .map_err(Into::into)
            })
            .collect()
    }

    /// Everything keyed by one inode besides its dirents: record, xattrs, queue entry;
    /// its files go to the graveyard (deleted once this batch is durable).
    pub fn delete_inode(&self, txn: &mut Txn, ino: u64, inode: &Inode) -> Result<()> {
        txn.del_inode(ino);
        txn.dequeue(ino);
        if inode.kind == Kind::File {
            txn.bury_cache(ino);
            if let Some(b) = inode.blob {
                txn.bury_blob(ino, &b);
            }
        }
        for name in self.xattr_names(ino)? {
            txn.del_xattr(ino, &name);
        }
        Ok(())
    }

    /// When `ino` is due for compression (None: not queued), from the in-memory queue
    /// index that every commit keeps equal to the index's.
    pub fn queue_due(&self, ino: u64) -> Result<Option<u64>> {
        Ok(self.with_queue(|q| q.due_of(ino)))
    }

    /// Change the in-memory queue index only: the caller commits the same change later
    /// (a group commit) or accepts losing it in a crash (recovery requeues dirty files).
    pub fn set_due_in_memory(&self, ino: u64, due: Option<u64>) {
        self.tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_due(ino, due);
    }

    /// The dirty regular files, from the in-memory tally.
    pub fn dirty_files(&self) -> Vec<u64> {
        self.with_queue(|q| q.dirty_files().collect())
    }

    /// Every queued inode with its due time.
    pub fn queue(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for r in self.db.scan_prefix(b"q") {
            let (k, v) = r?;
            if k.len() != 9 || v.len() != 8 {
                continue; // not an entry this index writes: fsck reports it
            }
            let (Some(ino), Some(due)) = (
                ino_from(&k),
                v.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes),
            ) else {
                continue;
            };
            out.push((ino, due));
        }
        Ok(out)
    }

    /// Every inode record (for mount-time recovery, status and fsck).
    pub fn inodes(&self) -> impl Iterator<Item = Result<(u64, Inode)>> + '_ {
        self.db.scan_prefix(b"i").map(|r| {
            let (k, v) = r?;
            let ino = ino_from(&k)
                .filter(|_| k.len() == 9)
                .ok_or_else(|| StoreError::Corrupt {
                    what: "inode key".into(),
                    why: format!("{} bytes long", k.len()),
                })?;
            let inode = Inode::decode(&v).map_err(|why| StoreError::Corrupt {
                what: format!("inode {ino}"),
                why,
            })?;
            Ok((ino, inode))
        })
    }

    /// Every directory entry: (parent, name, child).
    pub fn dirents(&self) -> impl Iterator<Item = Result<(u64, Vec<u8>, u64)>> + '_ {
        self.db.scan_prefix(b"d").map(|r| {
            let (k, v) = r?;
            let parent = ino_from(&k).unwrap_or(0);
            let child = record::decode_dirent(&v).map_or(0, |(c, _)| c);
            Ok((parent, k.get(9..).unwrap_or(&[]).to_vec(), child))
        })
    }
}

/// A format-2 subdirectory's name: two lowercase hex digits.
fn shard_name(i: u64) -> String {
    format!("{i:02x}")
}

/// `<ino>-<seq>.nc06` → (ino, seq).
pub fn parse_blob_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".nc06")?;
    let (ino, seq) = stem.split_once('-')?;
    Some((ino.parse().ok()?, seq.parse().ok()?))
}

/// Move a file nothing accounts for into `BACKING/lost+found/`, named after its path in
/// the backing directory with `-` for `/` (`blobs-99-999.nc06`, `cache-3f-575`; numbered
/// if taken), durably. Returns where it went.
pub fn rescue(backing: &Path, path: &Path) -> io::Result<PathBuf> {
    let dir = backing.join(fsck::LOST_FOUND);
    std::fs::create_dir_all(&dir)?;
    let flat = match path.strip_prefix(backing) {
        Ok(rel) => rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("-"),
        // Not under the backing directory (a read-only copy, say): its last two parts.
        Err(_) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{parent}-{name}")
        }
    };
    let mut target = dir.join(&flat);
    let mut n = 1;
    while target.exists() {
        target = dir.join(format!("{flat}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &target)?;
    sync_dir(&dir)?;
    Ok(target)
}

/// fsync a directory, so a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `path` durably: temp file, fsync, rename, fsync the directory.
pub fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// statvfs(3) of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// The block size of the filesystem holding `path` (4096 if it cannot be read).
fn block_size(path: &Path) -> u64 {
    statvfs(path).map_or(4096, |s| s.f_bsize)
}

/// Bytes the files under `dir` occupy (their blocks, as `du` counts them).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Makes every index flush on this thread fail with EIO (after a commit's batch
        /// is applied: what a journal fsync failing looks like).
        pub(crate) static FAIL_FLUSH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A new pack never takes the number of a pack file already there (a blob counter
    /// set back), and then writes no pack entry for it: an entry with no references
    /// made compaction bury that file, which the index had never accounted for.
    #[test]
    fn a_new_pack_refuses_a_number_whose_file_exists_before_writing_its_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let next = store.alloc_blob_seq().expect("seq") + 1;
        let path = store.packs().path(next);
        std::fs::create_dir_all(path.parent().expect("packs/")).expect("packs/");
        std::fs::write(&path, b"a pack the index does not know").expect("stray pack");
        let made = store.new_pack(0);
        assert!(made.is_err(), "made pack {made:?} over {}", path.display());
        assert_eq!(store.pack_info(next).expect("index"), None);
        assert!(path.exists());
    }

    /// A shared lock counts only on the lock file the path names when it is taken. An
    /// index rebuild releases the old index's lock and then puts a new index (a new lock
    /// file, locked again by the read-write daemon) in its place; a read-only opener
    /// waiting on the old file got that one, and held a lock that excluded nobody.
    #[test]
    fn a_shared_lock_is_taken_on_the_file_the_path_names_now() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let ex = |f: &File| {
            // SAFETY: a valid fd.
            assert_eq!(
                unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
                0
            );
        };
        let old = File::create(&path).expect("old lock file");
        ex(&old);
        let waiter = {
            let (path, backing) = (path.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || flock_shared(&path, &backing).map(|_| ()))
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        // The rebuild's order: the new index in place (locked), the old lock released.
        let new_tmp = dir.path().join("lock.new");
        let new = File::create(&new_tmp).expect("new lock file");
        ex(&new);
        std::fs::rename(&new_tmp, &path).expect("replace");
        drop(old);
        let got = waiter.join().expect("waiter");
        assert!(
            got.is_err(),
            "a shared lock on the replaced file was taken while the new one is held"
        );
        drop(new);
        assert!(flock_shared(&path, dir.path()).is_ok());
    }

    #[test]
    fn a_second_open_of_a_backing_directory_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path()).expect("first open");
        let err = match Store::open(dir.path()) {
            Ok(_) => panic!("a second open of the same index succeeded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("in use by another nacrithfs daemon"), "{err}");
        drop(first);
        Store::open(dir.path()).expect("open again once the first is closed");
    }

    /// Layout 6 keys a content hint by 16 bytes of the hash and names an inode in 1-8
    /// bytes; an index of layout 5 (33-byte keys, 16- or 40-byte values) has its hints
    /// rewritten at the next read-write open, each naming the same inode as before.
    #[test]
    fn content_hints_name_inodes_and_old_ones_are_rewritten() {
        for ino in [1u64, 0x7f, 0x80, 0x1_0000, u64::MAX] {
            let v = encode_content_hint(ino);
            assert!(!v.is_empty() && v.len() <= 8, "{ino}: {v:?}");
            assert_eq!(decode_content_hint(&v), Some(ino));
        }
        assert_eq!(decode_content_hint(&[]), None);
        assert_eq!(decode_content_hint(&[0; 9]), None);

        let dir = tempfile::tempdir().expect("tempdir");
        let hash = |i: u8| -> [u8; 32] { std::array::from_fn(|j| i.wrapping_mul(31) ^ j as u8) };
        {
            let store = Store::open(dir.path()).expect("open");
            let mut t = Txn::default();
            t.put_content_hint(&hash(0), 42);
            store.commit(t, true).expect("commit");
            assert_eq!(store.content_hint(&hash(0)).expect("read"), Some(42));
            assert_eq!(store.content_hint(&hash(1)).expect("read"), None);
            // Make it look like layout 5: old-shaped hints, the old layout number.
            let mut t = Txn::default();
            t.batch.remove(content_key(&hash(0)));
            for i in 0..3u8 {
                let mut k = vec![b'h'];
                k.extend_from_slice(&hash(i));
                let mut v = (100 + u64::from(i)).to_le_bytes().to_vec();
                v.extend_from_slice(&7u64.to_le_bytes());
                if i == 2 {
                    v.extend_from_slice(&[0; 24]); // a packed blob's (pack, offset, length)
                }
                t.batch.insert(k, v);
            }
            t.batch.insert(LAYOUT_KEY, 5u64.to_le_bytes());
            store.commit(t, true).expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.layout, LAYOUT);
        for i in 0..3u8 {
            assert_eq!(
                store.content_hint(&hash(i)).expect("read"),
                Some(100 + u64::from(i))
            );
        }
        let keys: Vec<(Vec<u8>, Vec<u8>)> =
            store.content_hints().collect::<Result<_>>().expect("scan");
        assert_eq!(keys.len(), 3, "old keys left: {keys:?}");
        assert!(keys
            .iter()
            .all(|(k, v)| store.content_hint_well_formed(&[&[b'h'][..], k].concat(), v)));
    }

    /// Layout 7: a name's up entry gives the directory and the name through its cookie;
    /// a layout-6 index's parent entries (a copy of the name) are rewritten at the
    /// next read-write open, a stale one (its name gone or given to another inode)
    /// dropped.
    #[test]
    fn up_entries_name_through_the_cookie_and_parent_entries_are_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, sub) = (100u64, 101u64, 102u64);
        {
            let store = Store::open(dir.path()).expect("open");
            let mut t = Txn::default();
            store
                .put_name(&mut t, ROOT_INO, b"sub", sub, Kind::Dir)
                .expect("name");
            store
                .put_name(&mut t, sub, b"a.txt", a, Kind::File)
                .expect("name");
            store
                .put_name(&mut t, ROOT_INO, b"b.txt", b, Kind::File)
                .expect("name");
            store.commit(t, true).expect("commit");
            assert_eq!(
                store.parent_of(a).expect("up"),
                Some((sub, b"a.txt".to_vec(), Kind::File))
            );
            assert_eq!(
                store.parent_of(sub).expect("up"),
                Some((ROOT_INO, b"sub".to_vec(), Kind::Dir))
            );
            // The name removed: its up entry finds no cookie naming the inode.
            let mut t = Txn::default();
            let (_, _, cookie) = store
                .lookup_full(ROOT_INO, b"b.txt")
                .expect("lookup")
                .expect("b");
            t.del_dirent(ROOT_INO, b"b.txt", cookie);
            store.commit(t, true).expect("commit");
            assert_eq!(store.parent_of(b).expect("up"), None);
            // Make it look like layout 6: parent entries with the names, one of them
            // stale (b's name is gone), one malformed (left for fsck).
            let mut t = Txn::default();
            for ino in [a, b, sub] {
                t.batch.remove(up_key(ino));
            }
            t.batch.insert(parent_key(a), encode_parent(sub, b"a.txt"));
            t.batch
                .insert(parent_key(sub), encode_parent(ROOT_INO, b"sub"));
            t.batch
                .insert(parent_key(b), encode_parent(ROOT_INO, b"b.txt"));
            t.batch.insert(parent_key(7), vec![1, 2, 3]);
            t.batch.insert(LAYOUT_KEY, 6u64.to_le_bytes());
            store.commit(t, true).expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.layout, LAYOUT);
        assert_eq!(
            store.parent_of(a).expect("up"),
            Some((sub, b"a.txt".to_vec(), Kind::File))
        );
        assert_eq!(
            store.parent_of(sub).expect("up"),
            Some((ROOT_INO, b"sub".to_vec(), Kind::Dir))
        );
        assert_eq!(store.parent_of(b).expect("up"), None);
        let keys = |prefix: &[u8]| -> Vec<Vec<u8>> {
            store
                .db
                .scan_prefix(prefix)
                .keys()
                .map(|k| k.expect("scan").to_vec())
                .collect()
        };
        assert_eq!(
            keys(b"p"),
            vec![parent_key(7).to_vec()],
            "parent entries left"
        );
        assert_eq!(keys(b"u"), vec![up_key(a).to_vec(), up_key(sub).to_vec()]);
    }

    /// The totals and the queue index that every commit keeps equal what a fresh count
    /// of the index finds, through creates, rewrites, compression, deletion, requeues,
    /// and an inode changed twice in one batch.
    #[test]
    fn commit_keeps_the_tallies_equal_to_a_recount() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let file = |size: u64, dirty: bool, cached: bool, blob: Option<u64>| {
            let mut i = Inode::new(Kind::File, 0o644, 0, 0, SystemTime::now());
            i.size = size;
            i.dirty = dirty;
            i.cached = cached;
            i.blob = blob.map(|stored_size| BlobRef::file(1, stored_size));
            i
        };
        let mut t = Txn::default();
        for ino in 10..20 {
            t.put_inode(ino, &file(1000 + ino, true, true, None));
            t.enqueue(ino, 5_000 + ino);
        }
        let dir_inode = Inode::new(Kind::Dir, 0o755, 0, 0, SystemTime::now());
        t.put_inode(30, &dir_inode);
        store.commit(t, false).expect("commit");
        let mut t = Txn::default();
        // 12 compressed and evicted, 13 compressed with a clean copy, 14 deleted,
        // 15 changed twice in one batch, 16 requeued earlier.
        t.put_inode(12, &file(1012, false, false, Some(100)));
        t.dequeue(12);
        t.put_inode(13, &file(1013, false, true, Some(90)));
        t.dequeue(13);
        t.del_inode(14);
        t.dequeue(14);
        t.put_inode(15, &file(1, true, true, None));
        t.put_inode(15, &file(7, true, true, None));
        t.enqueue(16, 10);
        store.commit(t, true).expect("commit");
        let kept = store.totals();
        let (queued, due, first) =
            store.with_queue(|q| (q.queued(), q.due(5_012), q.in_due_order().next()));
        assert_eq!((queued, first), (7, Some((16, 10))));
        assert_eq!(due, 3, "16 (10), 10 (5010), 11 (5011)");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen: counts from a scan");
        assert_eq!(store.totals(), kept);
        assert_eq!(
            kept,
            tally::Totals {
                files: 9,
                dirty: 7,
                dirty_bytes: (1010..1020).sum::<u64>() - 1014 - 1015 + 7 - 1012 - 1013,
                logical: (1010..1020).sum::<u64>() - 1014 - 1015 + 7,
                stored: (1010..1020).sum::<u64>() - 1014 - 1015 + 7 - 1012 - 1013 + 100 + 90,
                cached: (1010..1020).sum::<u64>() - 1014 - 1015 + 7 - 1012,
                // Every file and blob here fits one block; 13 has a clean copy.
                stored_disk: 9 * tally::on_disk(1),
                clean_disk: tally::on_disk(1),
            }
        );
        assert_eq!(store.with_queue(|q| q.queued()), 7);
    }

    /// Every commit keeps the references to packed blobs and each pack's live counts
    /// equal to what the inode records say: packing, sharing, rewriting, deleting.
    /// Format 4: no subdirectory until a file needs one; then the one of its 4096
    /// inode numbers, in cache/ or blobs/ only, listed by `file_dirs`.
    #[test]
    fn subdirectories_are_made_on_first_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.sharding(), Sharding::Range);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FORMAT_MARKER)).expect("marker"),
            FORMAT_LINE
        );
        let listed = |top: &str| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path().join(top))
                .expect("list")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert!(listed("cache").is_empty() && listed("blobs").is_empty());
        for ino in [2, 4095, 4096, 5000, (1 << 36) + 7] {
            store.make_file_dir(false, ino).expect("make");
            store
                .make_file_dir(false, ino)
                .expect("again: nothing to do");
        }
        assert_eq!(listed("cache"), ["000000", "000001", "1000000"]);
        assert!(listed("blobs").is_empty());
        assert_eq!(store.cache_path(5000), dir.path().join("cache/000001/5000"));
        assert_eq!(
            store.blob_path(4095, 9),
            dir.path().join("blobs/000000/4095-9.nc06")
        );
        let dirs = store.file_dirs(false);
        assert_eq!(dirs.len(), 4, "{dirs:?}");
        assert!(dirs[1..].iter().all(|d| store.is_shard_dir(d)));
        for odd in ["00000", "0000001", "00000g", "stray"] {
            assert!(!store.is_shard_dir(Path::new(odd)), "{odd}");
        }
        // Made again by hand after removal: found, not an error, in a new process.
        drop(store);
        std::fs::remove_dir(dir.path().join("cache/000001")).expect("rmdir");
        let store = Store::open(dir.path()).expect("reopen");
        store.make_file_dir(false, 4097).expect("remake");
        std::fs::write(store.cache_path(4097), b"x").expect("a file in it");
    }

    #[test]
    fn commits_count_references_to_packed_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let pack = store.new_pack(1).expect("pack");
        let slot = |offset| PackSlot { pack, offset };
        let packed = |seq: u64, offset: u64, len: u64| {
            let mut i = Inode::new(Kind::File, 0o644, 0, 0, SystemTime::now());
            i.size = 10_000;
            i.dirty = false;
            i.blob = Some(BlobRef {
                seq,
                stored_size: len,
                pack: Some(slot(offset)),
                member: None,
            });
            i
        };
        let info = || store.pack_info(pack).expect("info").expect("entry");
        let mut t = Txn::default();
        t.put_inode(10, &packed(1, 100, 300));
        t.put_inode(11, &packed(2, 416, 500));
        // Equal content: a second inode refers to the first blob.
        t.put_inode(12, &packed(3, 100, 300));
        store.commit(t, false).expect("commit");
        let i = info();
        assert_eq!((i.live_blobs, i.live_bytes), (2, 300 + 500 + 32), "{i:?}");
        assert_eq!(store.slot_refs(slot(100)).expect("refs"), vec![10, 12]);
        // One sharer goes: the blob is still live.
        let mut t = Txn::default();
        t.del_inode(10);
        store.commit(t, false).expect("commit");
        assert_eq!(info().live_blobs, 2);
        // The other is rewritten (no blob) and inode 11 moves to another slot.
        let mut t = Txn::default();
        let mut dirty = packed(3, 100, 300);
        dirty.blob = None;
        dirty.dirty = true;
        t.put_inode(12, &dirty);
        t.put_inode(11, &packed(2, 1000, 500));
        store.commit(t, false).expect("commit");
        let i = info();
        assert_eq!((i.live_blobs, i.live_bytes), (1, 516), "{i:?}");
        assert!(store.slot_refs(slot(100)).expect("refs").is_empty());
        assert_eq!(store.pack_refs(pack).expect("refs").len(), 1);
        let mut t = Txn::default();
        t.del_inode(11);
        store.commit(t, false).expect("commit");
        let i = info();
        assert_eq!((i.live_blobs, i.live_bytes), (0, 0), "{i:?}");
        assert_eq!(store.all_refs().count(), 0);
    }
}
