//! The filesystem engine: POSIX operations over the [`Store`], the plaintext write-back
//! cache and the compression lifecycle. Errors are raw errno values; the FUSE adapter
//! only translates. Every index change is one atomic batch.
//!
//! Lifecycle of a regular file (persisted in its inode record and the queue):
//! `dirty` (plaintext in the cache, no valid blob) → last close + idle → `queued` →
//! a worker compresses a snapshot → `compressed` (blob committed; the plaintext stays as
//! a clean copy until evicted). Any change makes it dirty again and drops the blob.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;

use super::options::FsOptions;
use crate::pool::LazyPool;
use crate::store::{unix_ms, BlobRef, Inode, Kind, Store, StoreError, Txn, ROOT_INO};

pub type Errno = i32;
pub type FsResult<T> = Result<T, Errno>;

pub const NAME_MAX: usize = 255;
/// Virtual xattrs: read-only views of the lifecycle, never stored, never listed.
pub const XATTR_STATE: &[u8] = b"user.nacrith.state";
pub const XATTR_STORED: &[u8] = b"user.nacrith.stored_size";
/// On the root only: the admin channel used by `nacrithfs flush|evict|status`.
pub const XATTR_STATUS: &[u8] = b"user.nacrith.status";
pub const XATTR_CONTROL: &[u8] = b"user.nacrith.control";
const RESERVED_PREFIX: &[u8] = b"user.nacrith.";
/// A failed compression is retried after this long (the file stays plaintext).
const RETRY_AFTER: Duration = Duration::from_secs(60);

fn store_err(e: StoreError) -> Errno {
    log::error!("index: {e}");
    e.errno()
}

fn io_err(e: std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// What the caller wants to happen once a file's plaintext is in the cache.
pub type Waiter = Box<dyn FnOnce(FsResult<()>) + Send>;

/// A waiting operation and the bytes it needs (None: the whole file).
type RangeWaiter = (Option<Range<u64>>, Waiter);

/// A request to the decoder: the plaintext of `ino` is wanted; `range` (the bytes a
/// reader asked for) steers read-ahead, None means the whole file.
#[derive(Debug, Clone)]
pub struct Need {
    pub ino: u64,
    pub range: Option<Range<u64>>,
}

/// A compressed file being decoded region by region into its cache temp file. Reads of
/// decoded regions are served from it before the whole file is there.
pub(crate) struct Partial {
    pub(crate) blob: BlobRef,
    pub(crate) file: Arc<File>,
    /// Each region's byte range in the file, in order, and whether it is decoded.
    pub(crate) regions: Arc<Vec<Range<u64>>>,
    pub(crate) done: Vec<bool>,
    pub(crate) size: u64,
}

impl Partial {
    /// Where the decoded bytes that start at `from` end, looking no further than
    /// `limit`: `from` itself when the region under it is not decoded yet.
    fn decoded_until(&self, from: u64, limit: u64) -> u64 {
        let limit = limit.min(self.size);
        let first = self.regions.partition_point(|r| r.end <= from);
        let done = self.done.get(first..).unwrap_or_default();
        let mut end = from;
        for (r, &done) in self.regions[first..].iter().zip(done) {
            if !done || end >= limit {
                break;
            }
            end = r.end;
        }
        end.min(limit)
    }

    /// Whether bytes `range` (clamped to the file) are all decoded.
    fn covers(&self, range: &Range<u64>) -> bool {
        let (start, end) = (range.start.min(self.size), range.end.min(self.size));
        start >= end || self.decoded_until(start, end) >= end
    }
}

#[derive(Default)]
struct Live {
    /// Open handles, and how many of them can write.
    open: u32,
    writers: u32,
    /// Bumped by every change to the content; a compression commits only if unchanged.
    version: u64,
    /// Operations waiting on this file's plaintext; eviction leaves it alone meanwhile.
    pins: u32,
    file: Option<Arc<File>>,
    last_used: Option<Instant>,
}

#[derive(Default, Debug, Clone)]
pub struct Stats {
    pub compressed_files: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub busy: Duration,
    pub failures: u64,
    /// Compressions dropped because the file changed meanwhile.
    pub superseded: u64,
    pub verify_failures: u64,
    pub decompressions: u64,
    pub decompress_failures: u64,
    /// Symbols the model coded for compression (encode and verifying decode).
    pub symbols_coded: u64,
    /// Regions (chunks, zstd and stored segments) decoded for reads.
    pub regions_decoded: u64,
}

struct Handle {
    ino: u64,
    append: bool,
    /// A read-only handle of a compressed file: its reads are answered with what is
    /// decoded so far (see [`Opened::direct_io`]).
    stream: bool,
}

/// A new handle, and how the kernel should do its I/O.
pub struct Opened {
    pub fh: u64,
    /// I/O goes straight to this daemon instead of through the kernel's page cache:
    /// - write-only handles: through the page cache every write would be copied into the
    ///   mount's pages as well as the cache file's (sequential writes ran at 44% of the
    ///   backing disk's speed); a write-only handle cannot be read or mapped, so it
    ///   loses nothing;
    /// - read-only handles of compressed files: a read asks for what the reader asked
    ///   for, no more. Through the page cache the kernel's read-ahead window comes with
    ///   it (16 KiB for a 4 KiB read at the start), and a cold read would wait for every
    ///   chunk under that window, not just the one under the page. With `stream_reads`
    ///   (`stream`) a read(2) is even answered with the bytes decoded so far, so `cat`
    ///   prints the head chunk while the rest is decoding, where its first 128 KiB read
    ///   would otherwise wait for all of it.
    ///
    /// Only where the kernel has FUSE_DIRECT_IO_ALLOW_MMAP (6.6 on): the same kernels
    /// drop cached pages of a file before a direct write to it, and let MAP_SHARED
    /// map a direct-I/O handle.
    pub direct_io: bool,
}

pub(crate) struct State {
    live: HashMap<u64, Live>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Operations waiting on plaintext: the byte range they need (None: the whole file).
    waiters: HashMap<u64, Vec<RangeWaiter>>,
    /// Files being decoded, for reads that can be served before the whole file is.
    pub(crate) partial: HashMap<u64, Partial>,
    /// Inodes a worker is compressing now.
    pub(crate) compressing: Vec<u64>,
    /// Clean cached copies: ino → size, for the cache cap.
    clean: HashMap<u64, u64>,
    pub(crate) stats: Stats,
    pub(crate) shutting_down: bool,
    /// Since when at least one compression has been running (for busy time).
    busy_since: Option<Instant>,
    /// Blobs whose decoding failed and was logged in this mount: (ino, blob seq).
    reported: std::collections::HashSet<(u64, u64)>,
}

pub struct Core {
    pub store: Store,
    pub opts: FsOptions,
    /// The coder's model, loaded on first use.
    pub engine: Arc<LazyPool>,
    /// Bytes of backing space that cache writes leave free (see `FsOptions::reserve`).
    reserve: u64,
    /// Whether handles may do direct I/O (see [`Opened::direct_io`]); set at FUSE init.
    pub direct_io_ok: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    /// Wakes the compressor (new due work, flush, shutdown).
    pub(crate) wake: Condvar,
    materialize_tx: Sender<Need>,
}

/// A readdir entry: (offset of the next entry, inode, kind, name).
pub type DirEntry = (u64, u64, Kind, Vec<u8>);

pub struct Attr {
    pub ino: u64,
    pub inode: Inode,
}

impl Core {
    /// Open the store, recover from any crash, and return the core plus the receiving end
    /// of the decompression channel for [`super::background::start`].
    pub fn new(
        store: Store,
        engine: Arc<LazyPool>,
        opts: FsOptions,
    ) -> Result<(Arc<Core>, crossbeam_channel::Receiver<Need>), StoreError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let reserve = match opts.reserve {
            Some(r) => r,
            None => {
                backing_space(store.backing()).map_or(0, |(total, _)| (total / 100).min(256 << 20))
            }
        };
        let core = Arc::new(Core {
            store,
            opts,
            reserve,
            direct_io_ok: Default::default(),
            engine,
            state: Mutex::new(State {
                live: HashMap::new(),
                handles: HashMap::new(),
                next_fh: 1,
                waiters: HashMap::new(),
                partial: HashMap::new(),
                compressing: Vec::new(),
                clean: HashMap::new(),
                stats: Stats::default(),
                shutting_down: false,
                busy_since: None,
                reported: Default::default(),
            }),
            wake: Condvar::new(),
            materialize_tx: tx,
        });
        core.recover()?;
        Ok((core, rx))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bring index and files back in line after an unclean stop: the cache file is the
    /// truth for dirty sizes; half-written temp files and unreferenced blobs go; dirty
    /// files are queued again; orphans (unlinked while open) are removed.
    fn recover(&self) -> Result<(), StoreError> {
        let now_ms = unix_ms(SystemTime::now());
        let queue = self.store.queue()?;
        let queued: std::collections::HashSet<u64> = queue.iter().map(|&(i, _)| i).collect();
        let mut blobs = std::collections::HashSet::new();
        let mut cached = std::collections::HashSet::new();
        let mut txn = Txn::default();
        // The idle time of this mount applies to what an earlier mount queued.
        let latest = now_ms + self.opts.idle.as_millis() as u64;
        for &(ino, due) in &queue {
            if due > latest {
                txn.enqueue(ino, latest);
            }
        }
        let mut st = self.lock();
        let mut requeued = 0;
        for r in self.store.inodes() {
            let (ino, mut inode) = match r {
                Ok(x) => x,
                Err(e) => {
                    log::error!("recovery: {e}; run `nacrithfs fsck`");
                    continue;
                }
            };
            if inode.nlink == 0 && ino != ROOT_INO {
                self.store.delete_inode(&mut txn, ino)?;
                continue;
            }
            if inode.kind != Kind::File {
                continue;
            }
            let before = inode.clone();
            if let Some(b) = inode.blob {
                blobs.insert(self.store.blob_path(ino, b.seq));
            }
            if inode.cached {
                match std::fs::metadata(self.store.cache_path(ino)) {
                    Ok(m) => {
                        cached.insert(self.store.cache_path(ino));
                        if inode.dirty {
                            inode.size = m.len();
                        }
                    }
                    Err(_) if !inode.dirty && inode.blob.is_some() => inode.cached = false,
                    Err(e) => log::error!(
                        "recovery: inode {ino} is dirty but its plaintext {} is missing ({e}); run `nacrithfs fsck`",
                        self.store.cache_path(ino).display()
                    ),
                }
            }
            if inode.dirty && !queued.contains(&ino) {
                txn.enqueue(ino, now_ms + self.opts.idle.as_millis() as u64);
                requeued += 1;
            }
            if inode.cached && !inode.dirty {
                st.clean.insert(ino, inode.size);
            }
            if inode != before {
                txn.put_inode(ino, &inode);
            }
        }
        drop(st);
        self.store.commit(txn, true)?;
        // Sweep files the index does not reference (temp files, uncommitted blobs,
        // copies whose eviction or deletion was interrupted).
        let mut swept = 0;
        for (dir, keep) in [
            (self.store.blob_dir(), &blobs),
            (self.store.cache_dir(), &cached),
        ] {
            for e in std::fs::read_dir(&dir)?.flatten() {
                if !keep.contains(&e.path()) {
                    if let Err(err) = std::fs::remove_file(e.path()) {
                        log::warn!("recovery: cannot remove {}: {err}", e.path().display());
                    } else {
                        swept += 1;
                    }
                }
            }
        }
        if requeued + swept > 0 {
            log::info!(
                "recovery: {requeued} dirty files queued again, {swept} stray files removed"
            );
        }
        Ok(())
    }

    pub fn get(&self, ino: u64) -> FsResult<Inode> {
        self.store.get(ino).map_err(store_err)?.ok_or(libc::ENOENT)
    }

    fn put(&self, ino: u64, inode: &Inode) -> FsResult<()> {
        let mut txn = Txn::default();
        txn.put_inode(ino, inode);
        self.store.commit(txn, false).map_err(store_err)
    }

    fn check_name(name: &[u8]) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    fn dir(&self, ino: u64) -> FsResult<Inode> {
        let d = self.get(ino)?;
        if d.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(d)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        self.dir(parent)?;
        let (ino, _) = self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        let inode = self.get(ino).map_err(|e| {
            if e == libc::ENOENT {
                log::error!(
                    "directory {parent}: entry {:?} points to missing inode {ino}; run `nacrithfs fsck`",
                    String::from_utf8_lossy(name)
                );
                libc::EIO
            } else {
                e
            }
        })?;
        Ok(Attr { ino, inode })
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        Ok(Attr {
            ino,
            inode: self.get(ino)?,
        })
    }

    /// Create a node of any kind in `parent`. For regular files the empty plaintext file
    /// is created first, so the index never points at a cache file that does not exist.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
        target: Option<&[u8]>,
    ) -> FsResult<Attr> {
        Self::check_name(name)?;
        let kind = if target.is_some() {
            Kind::Symlink
        } else {
            Kind::from_mode(mode).ok_or(libc::EINVAL)?
        };
        let _st = self.lock();
        let mut pdir = self.dir(parent)?;
        if pdir.nlink == 0 {
            return Err(libc::ENOENT);
        }
        if self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .is_some()
        {
            return Err(libc::EEXIST);
        }
        let now = SystemTime::now();
        let mut perm = (mode & 0o7777 & !umask) as u16;
        if kind == Kind::Symlink {
            perm = 0o777;
        }
        let mut gid = gid;
        if pdir.perm & libc::S_ISGID as u16 != 0 {
            gid = pdir.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID as u16;
            }
        }
        let mut inode = Inode::new(kind, perm, uid, gid, now);
        inode.rdev = rdev;
        if let Some(t) = target {
            inode.target = t.to_vec();
            inode.size = t.len() as u64;
        }
        let mut txn = Txn::default();
        let ino = self.store.alloc_ino(&mut txn);
        if kind == Kind::File {
            File::create(self.store.cache_path(ino)).map_err(io_err)?;
        }
        txn.put_inode(ino, &inode);
        txn.put_dirent(parent, name, ino, kind);
        if kind == Kind::Dir {
            pdir.nlink += 1;
        }
        pdir.mtime = now;
        pdir.ctime = now;
        txn.put_inode(parent, &pdir);
        self.store.commit(txn, false).map_err(store_err)?;
        Ok(Attr { ino, inode })
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let i = self.get(ino)?;
        if i.kind != Kind::Symlink {
            return Err(libc::EINVAL);
        }
        Ok(i.target)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        Self::check_name(newname)?;
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        if inode.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        let mut pdir = self.dir(newparent)?;
        if self
            .store
            .lookup(newparent, newname)
            .map_err(store_err)?
            .is_some()
        {
            return Err(libc::EEXIST);
        }
        if inode.nlink >= u32::MAX - 1 {
            return Err(libc::EMLINK);
        }
        let now = SystemTime::now();
        inode.nlink += 1;
        inode.ctime = now;
        pdir.mtime = now;
        pdir.ctime = now;
        let mut txn = Txn::default();
        txn.put_inode(ino, &inode);
        txn.put_inode(newparent, &pdir);
        txn.put_dirent(newparent, newname, ino, inode.kind);
        self.store.commit(txn, false).map_err(store_err)?;
        Ok(Attr { ino, inode })
    }

    /// unlink (dir=false) or rmdir (dir=true).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let mut st = self.lock();
        let mut pdir = self.dir(parent)?;
        let (ino, _) = self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        let mut inode = self.get(ino)?;
        match (dir, inode.kind == Kind::Dir) {
            (false, true) => return Err(libc::EISDIR),
            (true, false) => return Err(libc::ENOTDIR),
            (true, true) if !self.store.dir_is_empty(ino).map_err(store_err)? => {
                return Err(libc::ENOTEMPTY)
            }
            _ => {}
        }
        let now = SystemTime::now();
        let mut txn = Txn::default();
        txn.del_dirent(parent, name);
        if dir {
            pdir.nlink = pdir.nlink.saturating_sub(1);
            inode.nlink = 0;
        } else {
            inode.nlink = inode.nlink.saturating_sub(1);
        }
        inode.ctime = now;
        pdir.mtime = now;
        pdir.ctime = now;
        txn.put_inode(parent, &pdir);
        let purge = self.drop_link(&mut st, &mut txn, ino, &inode)?;
        self.store.commit(txn, false).map_err(store_err)?;
        if purge {
            self.remove_files(&mut st, ino, &inode);
        }
        Ok(())
    }

    /// Record `inode` after it lost a link; delete it when nothing refers to it any more.
    /// Returns whether its files must be removed once `txn` commits.
    fn drop_link(&self, st: &mut State, txn: &mut Txn, ino: u64, inode: &Inode) -> FsResult<bool> {
        let open = st.live.get(&ino).is_some_and(|l| l.open > 0);
        if inode.nlink == 0 && !open {
            self.store.delete_inode(txn, ino).map_err(store_err)?;
            Ok(true)
        } else {
            txn.put_inode(ino, inode);
            Ok(false)
        }
    }

    fn remove_files(&self, st: &mut State, ino: u64, inode: &Inode) {
        st.live.remove(&ino);
        st.clean.remove(&ino);
        if inode.kind != Kind::File {
            return;
        }
        let _ = std::fs::remove_file(self.store.cache_path(ino));
        if let Some(b) = inode.blob {
            let _ = std::fs::remove_file(self.store.blob_path(ino, b.seq));
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        Self::check_name(newname)?;
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(libc::EINVAL);
        }
        let mut st = self.lock();
        let mut dirs: HashMap<u64, Inode> = HashMap::new();
        dirs.insert(parent, self.dir(parent)?);
        dirs.insert(newparent, self.dir(newparent)?);
        let (src, src_kind) = self
            .store
            .lookup(parent, name)
            .map_err(store_err)?
            .ok_or(libc::ENOENT)?;
        let dst = self.store.lookup(newparent, newname).map_err(store_err)?;
        let now = SystemTime::now();
        let mut txn = Txn::default();
        let mut purge = None;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let (dst, dst_kind) = dst.ok_or(libc::ENOENT)?;
            if parent == newparent && name == newname {
                return Ok(());
            }
            txn.put_dirent(parent, name, dst, dst_kind);
            txn.put_dirent(newparent, newname, src, src_kind);
            if parent != newparent && (src_kind == Kind::Dir) != (dst_kind == Kind::Dir) {
                let (gain, lose) = if src_kind == Kind::Dir {
                    (newparent, parent)
                } else {
                    (parent, newparent)
                };
                if let Some(d) = dirs.get_mut(&gain) {
                    d.nlink += 1;
                }
                if let Some(d) = dirs.get_mut(&lose) {
                    d.nlink = d.nlink.saturating_sub(1);
                }
            }
            for ino in [src, dst] {
                let mut i = self.get(ino)?;
                i.ctime = now;
                txn.put_inode(ino, &i);
            }
        } else {
            if let Some((dst, dst_kind)) = dst {
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(libc::EEXIST);
                }
                if dst == src {
                    // Two links to one inode: POSIX says do nothing.
                    return Ok(());
                }
                match (src_kind == Kind::Dir, dst_kind == Kind::Dir) {
                    (true, false) => return Err(libc::ENOTDIR),
                    (false, true) => return Err(libc::EISDIR),
                    (true, true) if !self.store.dir_is_empty(dst).map_err(store_err)? => {
                        return Err(libc::ENOTEMPTY)
                    }
                    _ => {}
                }
                let mut d = self.get(dst)?;
                if dst_kind == Kind::Dir {
                    d.nlink = 0;
                    if let Some(p) = dirs.get_mut(&newparent) {
                        p.nlink = p.nlink.saturating_sub(1);
                    }
                } else {
                    d.nlink = d.nlink.saturating_sub(1);
                }
                d.ctime = now;
                if self.drop_link(&mut st, &mut txn, dst, &d)? {
                    purge = Some((dst, d));
                }
            }
            txn.del_dirent(parent, name);
            txn.put_dirent(newparent, newname, src, src_kind);
            if src_kind == Kind::Dir && parent != newparent {
                if let Some(p) = dirs.get_mut(&parent) {
                    p.nlink = p.nlink.saturating_sub(1);
                }
                if let Some(p) = dirs.get_mut(&newparent) {
                    p.nlink += 1;
                }
            }
            let mut s = self.get(src)?;
            s.ctime = now;
            txn.put_inode(src, &s);
        }
        for (ino, mut d) in dirs {
            d.mtime = now;
            d.ctime = now;
            txn.put_inode(ino, &d);
        }
        self.store.commit(txn, false).map_err(store_err)?;
        if let Some((ino, inode)) = purge {
            self.remove_files(&mut st, ino, &inode);
        }
        Ok(())
    }

    /// Directory listing after `offset` entries: (offset of next, ino, kind, name).
    pub fn readdir(&self, ino: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        self.dir(ino)?;
        let mut out = Vec::new();
        let mut n = 0u64;
        // The kernel resolves ".." itself; its inode number here is not used.
        for (name, child) in [(&b"."[..], ino), (&b".."[..], ino)] {
            n += 1;
            if n > offset {
                out.push((n, child, Kind::Dir, name.to_vec()));
            }
        }
        // Offsets are positions in name order; skip the first ones without decoding.
        let skip = offset.saturating_sub(2) as usize;
        let entries = self.store.list_dir(ino, skip + max).map_err(store_err)?;
        for (i, (name, child, kind)) in entries.into_iter().enumerate().skip(skip) {
            out.push((3 + i as u64, child, kind, name));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Open a handle. Nothing is decoded here: an open for writing is often an
    /// `O_TRUNC` (the kernel truncates with a SETATTR after the open), and a write that
    /// needs the old bytes decodes them then.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let inode = self.get(ino)?;
        let mode = flags & libc::O_ACCMODE;
        let write = mode != libc::O_RDONLY;
        let direct_ok = self.direct_io_ok.load(std::sync::atomic::Ordering::Relaxed);
        let cold_reader =
            direct_ok && inode.kind == Kind::File && mode == libc::O_RDONLY && !inode.cached;
        let stream = cold_reader && self.opts.stream_reads;
        let mut st = self.lock();
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(
            fh,
            Handle {
                ino,
                append: flags & libc::O_APPEND != 0,
                stream,
            },
        );
        let live = st.live.entry(ino).or_default();
        live.open += 1;
        if write {
            live.writers += 1;
        }
        drop(st);
        Ok(Opened {
            fh,
            direct_io: cold_reader || (direct_ok && mode == libc::O_WRONLY),
        })
    }

    /// Whether reads of handle `fh` may be answered with part of what they asked for.
    pub fn streams(&self, fh: u64) -> bool {
        self.lock().handles.get(&fh).is_some_and(|h| h.stream)
    }

    /// Close a handle; the last close of a dirty file queues it after `idle`.
    pub fn release(&self, fh: u64, writer: bool) -> FsResult<()> {
        let mut st = self.lock();
        let Some(h) = st.handles.remove(&fh) else {
            return Err(libc::EBADF);
        };
        let ino = h.ino;
        let live = st.live.entry(ino).or_default();
        live.open = live.open.saturating_sub(1);
        if writer {
            live.writers = live.writers.saturating_sub(1);
        }
        if live.open > 0 {
            return Ok(());
        }
        live.file = None;
        let inode = match self.get(ino) {
            Ok(i) => i,
            Err(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        if inode.nlink == 0 {
            let mut txn = Txn::default();
            self.store.delete_inode(&mut txn, ino).map_err(store_err)?;
            self.store.commit(txn, false).map_err(store_err)?;
            self.remove_files(&mut st, ino, &inode);
            return Ok(());
        }
        if inode.kind == Kind::File && inode.dirty {
            self.enqueue_locked(ino, self.opts.idle)?;
        }
        Ok(())
    }

    /// A close(2) of some handle (FUSE FLUSH). The kernel sends RELEASE later and
    /// asynchronously, often after the next open, and an mmap keeps its handle until
    /// munmap, so a file that is reopened at once may never reach "no handles": queue
    /// it on every close; the next write takes it off the queue again.
    pub fn closed(&self, ino: u64) -> FsResult<()> {
        let _st = self.lock();
        let inode = self.get(ino)?;
        if inode.kind == Kind::File && inode.dirty {
            self.enqueue_locked(ino, self.opts.idle)?;
        }
        Ok(())
    }

    fn enqueue_locked(&self, ino: u64, delay: Duration) -> FsResult<()> {
        let mut txn = Txn::default();
        txn.enqueue(ino, unix_ms(SystemTime::now() + delay));
        self.store.commit(txn, false).map_err(store_err)?;
        self.wake.notify_all();
        Ok(())
    }

    /// The open cache file of a cached regular file.
    fn cache_file(&self, st: &mut State, ino: u64) -> FsResult<Arc<File>> {
        let live = st.live.entry(ino).or_default();
        live.last_used = Some(Instant::now());
        if let Some(f) = &live.file {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.store.cache_path(ino))
                .map_err(|e| {
                    log::error!("inode {ino}: cannot open its plaintext: {e}");
                    io_err(e)
                })?,
        );
        if live.open > 0 {
            live.file = Some(f.clone());
        }
        Ok(f)
    }

    /// Run `then` once the file's plaintext is in the cache: at once (on this thread) if
    /// it is, else from the decoder when it arrives. The file is not evicted while
    /// `then` waits or runs.
    pub fn with_plain(self: &Arc<Self>, ino: u64, then: Waiter) {
        self.with_range(ino, None, then)
    }

    /// Run `then` once bytes `range` of the file can be read (see [`Core::read`]): a
    /// compressed file is decoded only as far as the range and a read-ahead need.
    pub fn with_range(self: &Arc<Self>, ino: u64, range: Option<Range<u64>>, then: Waiter) {
        let mut st = self.lock();
        let inode = match self.get(ino) {
            Ok(i) => i,
            Err(e) => {
                drop(st);
                return then(Err(e));
            }
        };
        if inode.kind != Kind::File {
            drop(st);
            return then(Err(libc::EINVAL));
        }
        st.live.entry(ino).or_default().pins += 1;
        let ready = inode.cached
            || range.as_ref().is_some_and(|r| {
                st.partial
                    .get(&ino)
                    .is_some_and(|p| Some(p.blob) == inode.blob && p.covers(r))
            });
        if ready {
            drop(st);
            if !inode.cached {
                // Served from the partial decode; let the decoder keep reading ahead.
                let _ = self.materialize_tx.send(Need { ino, range });
            }
            then(Ok(()));
            self.unpin(ino);
            return;
        }
        let core = self.clone();
        st.waiters.entry(ino).or_default().push((
            range.clone(),
            Box::new(move |r| {
                then(r);
                core.unpin(ino);
            }),
        ));
        if self.materialize_tx.send(Need { ino, range }).is_err() {
            let waiters = st.waiters.remove(&ino).unwrap_or_default();
            drop(st);
            for (_, w) in waiters {
                w(Err(libc::EIO));
            }
        }
    }

    /// The byte ranges operations on `ino` are waiting for (None: the whole file).
    pub(crate) fn waiting_ranges(&self, ino: u64) -> Vec<Option<Range<u64>>> {
        let st = self.lock();
        st.waiters
            .get(&ino)
            .map(|l| l.iter().map(|(r, _)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// The decoder started decoding `ino`'s blob into `file` (its cache temp file).
    pub(crate) fn partial_started(
        &self,
        ino: u64,
        blob: BlobRef,
        file: Arc<File>,
        regions: Arc<Vec<Range<u64>>>,
        size: u64,
    ) {
        let n = regions.len();
        self.lock().partial.insert(
            ino,
            Partial {
                blob,
                file,
                regions,
                done: vec![false; n],
                size,
            },
        );
    }

    /// Regions of `ino` were decoded: answer the reads they complete.
    pub(crate) fn partial_progress(&self, ino: u64, blob: BlobRef, done: &[bool]) {
        let mut st = self.lock();
        let State {
            partial, waiters, ..
        } = &mut *st;
        let Some(p) = partial.get_mut(&ino).filter(|p| p.blob == blob) else {
            return;
        };
        p.done.clear();
        p.done.extend_from_slice(done);
        let mut ready = Vec::new();
        if let Some(list) = waiters.get_mut(&ino) {
            let mut i = 0;
            while i < list.len() {
                if list[i].0.as_ref().is_some_and(|r| p.covers(r)) {
                    ready.push(list.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
        }
        drop(st);
        for w in ready {
            w(Ok(()));
        }
    }

    /// The decoder gave up on (or finished with) a partial decode of `ino`.
    pub(crate) fn partial_dropped(&self, ino: u64, blob: BlobRef) {
        let mut st = self.lock();
        if st.partial.get(&ino).is_some_and(|p| p.blob == blob) {
            st.partial.remove(&ino);
        }
    }

    fn unpin(&self, ino: u64) {
        let mut st = self.lock();
        if let Some(l) = st.live.get_mut(&ino) {
            l.pins = l.pins.saturating_sub(1);
        }
    }

    /// Read from a cached file, or from the decoded part of one being decoded (call
    /// inside [`Core::with_range`]). With `short`, a partly decoded range gives its
    /// decoded start. ESTALE: the bytes are not there (any more).
    pub fn read(&self, ino: u64, offset: u64, size: u32, short: bool) -> FsResult<Vec<u8>> {
        let mut size = size as u64;
        let file = {
            let mut st = self.lock();
            let inode = self.get(ino)?;
            if inode.cached {
                self.cache_file(&mut st, ino)?
            } else {
                // The temp file has the file's length; what is read of it is decoded.
                let Some(p) = st.partial.get(&ino).filter(|p| Some(p.blob) == inode.blob) else {
                    return Err(libc::ESTALE);
                };
                if short && offset < p.size && size > 0 {
                    size = p.decoded_until(offset, offset.saturating_add(size)) - offset;
                    if size == 0 {
                        return Err(libc::ESTALE);
                    }
                } else if !p.covers(&(offset..offset.saturating_add(size))) {
                    return Err(libc::ESTALE);
                }
                p.file.clone()
            }
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Mark a file's content changed: dirty, blob dropped, version bumped, and queued
    /// again if nothing has it open (a late mmap write-back).
    fn touch_content(&self, st: &mut State, ino: u64, inode: &mut Inode, txn: &mut Txn) {
        let now = SystemTime::now();
        inode.mtime = now;
        inode.ctime = now;
        // The index stops pointing at the blob in this batch; the caller deletes its
        // file after the commit.
        inode.blob = None;
        inode.dirty = true;
        st.clean.remove(&ino);
        let live = st.live.entry(ino).or_default();
        live.version += 1;
        if live.open == 0 {
            txn.enqueue(ino, unix_ms(now + self.opts.idle));
        } else {
            txn.dequeue(ino);
        }
    }

    fn commit_content(&self, ino: u64, old_blob: Option<BlobRef>, txn: Txn) -> FsResult<()> {
        self.store.commit(txn, false).map_err(store_err)?;
        if let Some(b) = old_blob {
            // Deleting before the index update is durable is safe: recovery treats a
            // missing blob of a cached, dirty file as what it is.
            let _ = std::fs::remove_file(self.store.blob_path(ino, b.seq));
        }
        Ok(())
    }

    /// Write to a cached file (call inside [`Core::with_plain`]).
    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let mut st = self.lock();
        let mut inode = self.get(ino)?;
        if !inode.cached {
            return Err(libc::ESTALE);
        }
        self.check_space(data.len() as u64)?;
        let append = st.handles.get(&fh).is_some_and(|h| h.append);
        let offset = if append { inode.size } else { offset };
        let file = self.cache_file(&mut st, ino)?;
        file.write_all_at(data, offset).map_err(io_err)?;
        let old_blob = inode.blob;
        let mut txn = Txn::default();
        inode.size = inode.size.max(offset + data.len() as u64);
        self.touch_content(&mut st, ino, &mut inode, &mut txn);
        txn.put_inode(ino, &inode);
        self.commit_content(ino, old_blob, txn)?;
        drop(st);
        Ok(data.len() as u32)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Option<SystemTime>>,
        mtime: Option<Option<SystemTime>>,
        ctime: Option<SystemTime>,
    ) -> FsResult<Attr> {
        let mut st = self.lock();
        let mut inode = self.get(ino)?;
        let now = SystemTime::now();
        let mut txn = Txn::default();
        let mut old_blob = None;
        if let Some(size) = size {
            if inode.kind == Kind::Dir {
                return Err(libc::EISDIR);
            }
            if inode.kind != Kind::File {
                return Err(libc::EINVAL);
            }
            if !inode.cached {
                if size != 0 {
                    return Err(libc::ESTALE);
                }
                // Truncation to zero needs no decompression.
                File::create(self.store.cache_path(ino)).map_err(io_err)?;
                inode.cached = true;
            }
            let file = self.cache_file(&mut st, ino)?;
            file.set_len(size).map_err(io_err)?;
            inode.size = size;
            old_blob = inode.blob;
            self.touch_content(&mut st, ino, &mut inode, &mut txn);
        }
        if let Some(m) = mode {
            inode.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            inode.uid = u;
        }
        if let Some(g) = gid {
            inode.gid = g;
        }
        if let Some(a) = atime {
            inode.atime = a.unwrap_or(now);
        }
        if let Some(m) = mtime {
            inode.mtime = m.unwrap_or(now);
        }
        inode.ctime = ctime.unwrap_or(now);
        txn.put_inode(ino, &inode);
        self.commit_content(ino, old_blob, txn)?;
        drop(st);
        Ok(Attr { ino, inode })
    }

    /// fallocate on a cached file: forwarded to the cache file, so holes, punching and
    /// KEEP_SIZE behave as the backing filesystem does.
    pub fn fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        use std::os::fd::AsRawFd;
        let mut st = self.lock();
        let mut inode = self.get(ino)?;
        if !inode.cached {
            return Err(libc::ESTALE);
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
            self.check_space(length)?;
        }
        let file = self.cache_file(&mut st, ino)?;
        // SAFETY: a valid open fd; plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if r != 0 {
            return Err(io_err(std::io::Error::last_os_error()));
        }
        let len = file.metadata().map_err(io_err)?.len();
        let old_blob = inode.blob;
        let mut txn = Txn::default();
        inode.size = len;
        self.touch_content(&mut st, ino, &mut inode, &mut txn);
        txn.put_inode(ino, &inode);
        self.commit_content(ino, old_blob, txn)?;
        drop(st);
        Ok(())
    }

    /// fsync: the plaintext (if any) and the index reach the disk.
    pub fn fsync(&self, ino: u64, datasync: bool) -> FsResult<()> {
        let file = {
            let mut st = self.lock();
            let inode = self.get(ino)?;
            if inode.kind == Kind::File && inode.cached {
                Some(self.cache_file(&mut st, ino)?)
            } else {
                None
            }
        };
        if let Some(f) = file {
            if datasync {
                f.sync_data().map_err(io_err)?;
            } else {
                f.sync_all().map_err(io_err)?;
            }
        }
        self.store.flush().map_err(store_err)
    }

    pub fn fsyncdir(&self) -> FsResult<()> {
        self.store.flush().map_err(store_err)
    }

    /// ENOSPC unless `extra` more bytes leave the reserve free on the backing disk.
    fn check_space(&self, extra: u64) -> FsResult<()> {
        if self.reserve == 0 {
            return Ok(());
        }
        let (_, free) = backing_space(self.store.backing()).map_err(io_err)?;
        if free < self.reserve.saturating_add(extra) {
            return Err(libc::ENOSPC);
        }
        Ok(())
    }

    /// Total and free space of the backing filesystem, plus our inode count.
    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        let path = std::ffi::CString::new(self.store.backing().as_os_str().as_encoded_bytes())
            .map_err(|_| libc::EINVAL)?;
        // SAFETY: zeroed statvfs is a valid out-parameter; path is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return Err(io_err(std::io::Error::last_os_error()));
        }
        Ok(s)
    }

    // ---- xattrs ----

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let inode = self.get(ino)?;
        if name == XATTR_STATE && inode.kind == Kind::File {
            return Ok(self.file_state(ino, &inode)?.as_bytes().to_vec());
        }
        if name == XATTR_STORED && inode.kind == Kind::File {
            return Ok(stored_size(&inode).to_string().into_bytes());
        }
        if name == XATTR_STATUS && ino == ROOT_INO {
            return Ok(self.status()?.into_bytes());
        }
        check_xattr_namespace(name)?;
        self.store
            .xattr_get(ino, name)
            .map_err(store_err)?
            .ok_or(libc::ENODATA)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if ino == ROOT_INO && name == XATTR_CONTROL {
            return match value {
                b"flush" => self.request_flush(),
                b"evict" => self.evict_all().map(|_| ()),
                _ => Err(libc::EINVAL),
            };
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(libc::EPERM);
        }
        check_xattr_namespace(name)?;
        if name.len() > 255 {
            return Err(libc::ERANGE);
        }
        if value.len() > 65536 {
            return Err(libc::E2BIG);
        }
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        let exists = self
            .store
            .xattr_get(ino, name)
            .map_err(store_err)?
            .is_some();
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(libc::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(libc::ENODATA);
        }
        inode.ctime = SystemTime::now();
        let mut txn = Txn::default();
        txn.put_xattr(ino, name, value);
        txn.put_inode(ino, &inode);
        self.store.commit(txn, false).map_err(store_err)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.get(ino)?;
        let mut out = Vec::new();
        for n in self.store.xattr_names(ino).map_err(store_err)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        if name.starts_with(RESERVED_PREFIX) {
            return Err(libc::EPERM);
        }
        check_xattr_namespace(name)?;
        let _st = self.lock();
        let mut inode = self.get(ino)?;
        if self
            .store
            .xattr_get(ino, name)
            .map_err(store_err)?
            .is_none()
        {
            return Err(libc::ENODATA);
        }
        inode.ctime = SystemTime::now();
        let mut txn = Txn::default();
        txn.del_xattr(ino, name);
        txn.put_inode(ino, &inode);
        self.store.commit(txn, false).map_err(store_err)
    }

    // ---- lifecycle and control ----

    pub fn file_state(&self, ino: u64, inode: &Inode) -> FsResult<&'static str> {
        if self.lock().compressing.contains(&ino) {
            return Ok("compressing");
        }
        if !inode.dirty {
            return Ok("compressed");
        }
        let due = self.store.queue_due(ino).map_err(store_err)?;
        Ok(match due {
            Some(d) if d <= unix_ms(SystemTime::now()) => "queued",
            _ => "dirty",
        })
    }

    /// Make every closed dirty file due now. A file still open for writing is left,
    /// unless it is queued: queued means closed since its last write (FUSE FLUSH, which
    /// close(2) waits for, queues it; a write dequeues it). The RELEASE of a handle just
    /// closed is asynchronous and may still be on its way, so `writers` alone would skip
    /// a file that `write; close; nacrithfs flush` has every right to see compressed.
    pub fn request_flush(&self) -> FsResult<()> {
        let st = self.lock();
        let now = unix_ms(SystemTime::now());
        let mut txn = Txn::default();
        for r in self.store.inodes() {
            let (ino, inode) = r.map_err(store_err)?;
            let writing = st.live.get(&ino).is_some_and(|l| l.writers > 0)
                && self.store.queue_due(ino).map_err(store_err)?.is_none();
            if inode.kind == Kind::File && inode.dirty && !writing {
                txn.enqueue(ino, now);
            }
        }
        self.store.commit(txn, false).map_err(store_err)?;
        drop(st);
        self.wake.notify_all();
        Ok(())
    }

    /// Drop every clean plaintext copy that no operation is using. Returns bytes freed.
    pub fn evict_all(&self) -> FsResult<u64> {
        let mut st = self.lock();
        let inos: Vec<u64> = st.clean.keys().copied().collect();
        let mut freed = 0;
        for ino in inos {
            freed += self.evict_locked(&mut st, ino)?;
        }
        Ok(freed)
    }

    fn evict_locked(&self, st: &mut State, ino: u64) -> FsResult<u64> {
        // Open files may go too: their next read or write waits for the decompressor
        // like any other (the kernel's page cache usually answers first).
        if st.live.get(&ino).is_some_and(|l| l.pins > 0) || st.compressing.contains(&ino) {
            return Ok(0);
        }
        let mut inode = self.get(ino)?;
        if inode.kind != Kind::File || !inode.cached || inode.dirty || inode.blob.is_none() {
            st.clean.remove(&ino);
            return Ok(0);
        }
        inode.cached = false;
        self.put(ino, &inode)?;
        st.clean.remove(&ino);
        if let Some(l) = st.live.get_mut(&ino) {
            l.file = None;
        }
        let _ = std::fs::remove_file(self.store.cache_path(ino));
        Ok(inode.size)
    }

    /// Evict least recently used clean copies until the cache is under its cap.
    pub(crate) fn enforce_cache_cap(&self) {
        let mut st = self.lock();
        let mut total: u64 = st.clean.values().sum();
        if total <= self.opts.cache_size {
            return;
        }
        let mut by_age: Vec<(Option<Instant>, u64)> = st
            .clean
            .keys()
            .map(|&ino| (st.live.get(&ino).and_then(|l| l.last_used), ino))
            .collect();
        by_age.sort();
        for (_, ino) in by_age {
            if total <= self.opts.cache_size {
                break;
            }
            match self.evict_locked(&mut st, ino) {
                Ok(n) => total = total.saturating_sub(n),
                Err(e) => log::warn!("evicting inode {ino}: errno {e}"),
            }
        }
    }

    /// Queue length, byte totals and worker throughput, as `key=value` lines.
    pub fn status(&self) -> FsResult<String> {
        let now = unix_ms(SystemTime::now());
        let (compressing, stats) = {
            let st = self.lock();
            let mut stats = st.stats.clone();
            if let Some(t) = st.busy_since {
                stats.busy += t.elapsed();
            }
            (st.compressing.len(), stats)
        };
        let chunk_jobs = self.engine.loaded().map_or(0, |p| p.queued());
        let queue = self.store.queue().map_err(store_err)?;
        let due = queue.iter().filter(|(_, d)| *d <= now).count();
        let (mut files, mut compressed, mut dirty, mut logical, mut stored, mut cache) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for r in self.store.inodes() {
            let (_, i) = r.map_err(store_err)?;
            if i.kind != Kind::File {
                continue;
            }
            files += 1;
            logical += i.size;
            stored += stored_size(&i);
            if i.dirty {
                dirty += 1;
            } else {
                compressed += 1;
            }
            if i.cached {
                cache += i.size;
            }
        }
        let secs = stats.busy.as_secs_f64();
        Ok(format!(
            "files={files}\ncompressed={compressed}\ndirty={dirty}\nqueued={}\ndue={due}\ncompressing={compressing}\n\
             logical_bytes={logical}\nstored_bytes={stored}\ncache_bytes={cache}\n\
             compressed_since_mount={}\nbytes_in={}\nbytes_out={}\nbusy_seconds={secs:.1}\n\
             failures={}\nsuperseded={}\nverify_failures={}\ndecompressions={}\ndecompress_failures={}\n\
             symbols_coded={}\nregions_decoded={}\nchunk_jobs_queued={chunk_jobs}\n",
            queue.len(),
            stats.compressed_files,
            stats.bytes_in,
            stats.bytes_out,
            stats.failures,
            stats.superseded,
            stats.verify_failures,
            stats.decompressions,
            stats.decompress_failures,
            stats.symbols_coded,
            stats.regions_decoded,
        ))
    }

    // ---- background work (called by `background`) ----

    /// The next due queue entry, or how long to wait for one.
    pub(crate) fn next_due(&self) -> FsResult<Result<(u64, u64), Duration>> {
        let st = self.lock();
        let now = unix_ms(SystemTime::now());
        let mut queue = self.store.queue().map_err(store_err)?;
        queue.sort_by_key(|&(ino, due)| (due, ino));
        let mut wait = Duration::from_secs(5);
        for (ino, due) in queue {
            // A file open for writing is still compressed if it has not been written
            // since it was queued (a write takes it off the queue); the version check
            // at commit catches a write that races the compression.
            if st.compressing.contains(&ino) {
                continue;
            }
            if due > now {
                wait = wait.min(Duration::from_millis(due - now));
                break;
            }
            let version = st.live.get(&ino).map_or(0, |l| l.version);
            return Ok(Ok((ino, version)));
        }
        Ok(Err(wait))
    }

    /// Claim `ino` for compression. Returns its plaintext path and size, or None if it
    /// no longer needs compressing (then its queue entry is dropped).
    pub(crate) fn claim(&self, ino: u64) -> FsResult<Option<std::path::PathBuf>> {
        let mut st = self.lock();
        if st.compressing.contains(&ino) {
            // Another compressor took it between next_due and now.
            return Ok(None);
        }
        let inode = match self.get(ino) {
            Ok(i) => Some(i),
            Err(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        match inode {
            Some(i) if i.kind == Kind::File && i.dirty && i.cached => {
                if st.compressing.is_empty() {
                    st.busy_since = Some(Instant::now());
                }
                st.compressing.push(ino);
                Ok(Some(self.store.cache_path(ino)))
            }
            _ => {
                let mut txn = Txn::default();
                txn.dequeue(ino);
                self.store.commit(txn, false).map_err(store_err)?;
                Ok(None)
            }
        }
    }

    /// Switch `ino` to the blob just written durably at `seq`, unless the file changed
    /// since `version`. Returns whether it committed (if not, the caller deletes the blob).
    pub(crate) fn commit_blob(
        &self,
        ino: u64,
        version: u64,
        seq: u64,
        stored_size: u64,
        original: u64,
    ) -> FsResult<bool> {
        let mut st = self.lock();
        Self::compression_ended(&mut st, ino);
        let mut inode = match self.get(ino) {
            Ok(i) => i,
            Err(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        };
        let current = st.live.get(&ino).map_or(0, |l| l.version);
        if current != version || !inode.dirty || !inode.cached || inode.size != original {
            st.stats.superseded += 1;
            return Ok(false);
        }
        let old = inode.blob;
        inode.dirty = false;
        inode.blob = Some(BlobRef { seq, stored_size });
        let mut txn = Txn::default();
        txn.put_inode(ino, &inode);
        txn.dequeue(ino);
        self.store.commit(txn, true).map_err(store_err)?;
        if let Some(b) = old {
            let _ = std::fs::remove_file(self.store.blob_path(ino, b.seq));
        }
        st.clean.insert(ino, inode.size);
        st.stats.compressed_files += 1;
        st.stats.bytes_in += original;
        st.stats.bytes_out += stored_size;
        Ok(true)
    }

    /// A compression failed: keep the plaintext, retry later.
    pub(crate) fn compression_failed(&self, ino: u64) {
        let mut st = self.lock();
        Self::compression_ended(&mut st, ino);
        st.stats.failures += 1;
        let mut txn = Txn::default();
        txn.enqueue(ino, unix_ms(SystemTime::now() + RETRY_AFTER));
        if let Err(e) = self.store.commit(txn, false) {
            log::error!("requeue of inode {ino}: {e}");
        }
    }

    /// Busy time is wall time with at least one compression running (they overlap).
    fn compression_ended(st: &mut State, ino: u64) {
        st.compressing.retain(|&i| i != ino);
        if st.compressing.is_empty() {
            if let Some(t) = st.busy_since.take() {
                st.stats.busy += t.elapsed();
            }
        }
    }

    /// Whether `ino` is still a dirty regular file with its plaintext in the cache.
    pub(crate) fn still_needs_compression(&self, ino: u64) -> bool {
        let _st = self.lock();
        self.get(ino)
            .is_ok_and(|i| i.kind == Kind::File && i.dirty && i.cached)
    }

    /// A claimed compression that is no longer needed: no failure, no retry.
    pub(crate) fn compression_abandoned(&self, ino: u64) {
        let mut st = self.lock();
        Self::compression_ended(&mut st, ino);
    }

    pub(crate) fn count_symbols(&self, n: u64) {
        self.lock().stats.symbols_coded += n;
    }

    pub(crate) fn count_regions(&self, n: u64) {
        self.lock().stats.regions_decoded += n;
    }

    pub(crate) fn count_verify_failure(&self) {
        self.lock().stats.verify_failures += 1;
    }

    /// What the decompressor needs: the blob to read and the expected size, or None if
    /// the plaintext is already there.
    pub(crate) fn blob_of(&self, ino: u64) -> FsResult<Option<(std::path::PathBuf, u64, BlobRef)>> {
        let _st = self.lock();
        let inode = self.get(ino)?;
        if inode.cached {
            return Ok(None);
        }
        let b = inode.blob.ok_or_else(|| {
            log::error!("inode {ino} has neither plaintext nor blob; run `nacrithfs fsck`");
            libc::EIO
        })?;
        Ok(Some((self.store.blob_path(ino, b.seq), inode.size, b)))
    }

    /// The decompressor wrote the plaintext to the temp path (or found it already there,
    /// `blob` None): install it if the file is still as it was, and hand the result to
    /// everyone waiting.
    pub(crate) fn materialized(&self, ino: u64, blob: Option<BlobRef>, result: FsResult<()>) {
        let mut st = self.lock();
        let mut result = result;
        if let (Err(_), Some(blob)) = (result, blob) {
            // A failure on a blob the file no longer uses (truncated or rewritten while it
            // was decoding) is no failure: serve what is there now.
            if let Ok(inode) = self.get(ino) {
                if inode.cached {
                    result = Ok(());
                } else if inode.blob != Some(blob) {
                    result = Err(libc::EAGAIN);
                }
            }
        }
        if let (Ok(()), Some(blob)) = (result, blob) {
            result = (|| {
                let mut inode = self.get(ino)?;
                if inode.cached {
                    let _ = std::fs::remove_file(self.store.cache_tmp_path(ino));
                    return Ok(());
                }
                if inode.blob != Some(blob) {
                    return Err(libc::EAGAIN);
                }
                std::fs::rename(self.store.cache_tmp_path(ino), self.store.cache_path(ino))
                    .map_err(io_err)?;
                inode.cached = true;
                self.put(ino, &inode)?;
                st.clean.insert(ino, inode.size);
                st.stats.decompressions += 1;
                Ok(())
            })();
        } else if result.is_err() {
            st.stats.decompress_failures += 1;
        }
        if let Some(blob) = blob {
            if st.partial.get(&ino).is_some_and(|p| p.blob == blob) {
                st.partial.remove(&ino);
            }
        }
        if result == Err(libc::EAGAIN) {
            // The file changed under us: try again with its new blob.
            let _ = std::fs::remove_file(self.store.cache_tmp_path(ino));
            if self.materialize_tx.send(Need { ino, range: None }).is_ok() {
                return;
            }
            result = Err(libc::EIO);
        }
        let waiters = st.waiters.remove(&ino).unwrap_or_default();
        drop(st);
        for (_, w) in waiters {
            w(result);
        }
        self.enforce_cache_cap();
    }

    /// True the first time decoding this blob fails in this mount (so it is logged once),
    /// and only while the file still depends on it.
    pub(crate) fn first_failure_of(&self, ino: u64, blob: BlobRef) -> bool {
        let mut st = self.lock();
        let current = self
            .get(ino)
            .is_ok_and(|i| !i.cached && i.blob == Some(blob));
        current && st.reported.insert((ino, blob.seq))
    }

    /// One path of `ino` (for log lines), or `inode N` if it has none.
    pub fn describe(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        'up: while cur != ROOT_INO && parts.len() < 64 {
            for r in self.store.dirents().flatten() {
                let (parent, name, child) = r;
                if child == cur {
                    parts.push(String::from_utf8_lossy(&name).into_owned());
                    cur = parent;
                    continue 'up;
                }
            }
            return format!("inode {ino}");
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    pub fn shutdown(&self) {
        self.lock().shutting_down = true;
        self.wake.notify_all();
        if let Err(e) = self.store.flush() {
            log::error!("final index flush: {e}");
        }
    }

    pub(crate) fn wait_for_work(&self, wait: Duration) -> bool {
        let st = self.lock();
        if st.shutting_down {
            return false;
        }
        let (st, _) = self
            .wake
            .wait_timeout(st, wait)
            .unwrap_or_else(|p| p.into_inner());
        !st.shutting_down
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }
}

/// (total, available to unprivileged users) bytes of the filesystem holding `path`.
fn backing_space(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    Ok((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

/// Bytes the file occupies in the backing store: the blob once compressed, else the
/// plaintext.
pub fn stored_size(inode: &Inode) -> u64 {
    match (inode.dirty, inode.blob) {
        (false, Some(b)) => b.stored_size,
        _ => inode.size,
    }
}

fn check_xattr_namespace(name: &[u8]) -> FsResult<()> {
    if name.starts_with(b"user.") || name.starts_with(b"trusted.") || name.starts_with(b"security.")
    {
        Ok(())
    } else {
        Err(libc::EOPNOTSUPP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core over a fresh store; no background worker, and the model is never loaded.
    fn core(dir: &std::path::Path) -> Arc<Core> {
        let store = Store::open(dir).expect("store");
        let engine = Arc::new(LazyPool::new(dir.join("no-model.gguf"), Some(1), 1));
        Core::new(store, engine, FsOptions::default())
            .expect("core")
            .0
    }

    fn state(core: &Core, ino: u64) -> &'static str {
        let inode = core.get(ino).expect("inode");
        core.file_state(ino, &inode).expect("state")
    }

    /// `write; close; nacrithfs flush` compresses the file even when the RELEASE of the
    /// closed handle (asynchronous in the kernel) reaches the daemon after the flush
    /// request; a file written since its last close is left to its writer.
    #[test]
    fn flush_takes_a_closed_file_whose_release_is_still_on_its_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = core(dir.path());
        let ino = core
            .mknod(ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, 0, 0, 0, None)
            .expect("create")
            .ino;
        let fh = core.open(ino, libc::O_WRONLY).expect("open").fh;
        core.write(ino, fh, 0, b"hello").expect("write");
        core.request_flush().expect("flush");
        assert_eq!(
            state(&core, ino),
            "dirty",
            "a file being written was flushed"
        );

        core.closed(ino).expect("close (FUSE FLUSH)");
        core.request_flush().expect("flush");
        assert_eq!(state(&core, ino), "queued", "closed, RELEASE not yet in");

        // Written again through a handle that stays open: the writer has it back.
        core.write(ino, fh, 5, b" again").expect("write");
        core.request_flush().expect("flush");
        assert_eq!(state(&core, ino), "dirty");
        core.release(fh, true).expect("release");
        core.request_flush().expect("flush");
        assert_eq!(state(&core, ino), "queued");
    }
}
