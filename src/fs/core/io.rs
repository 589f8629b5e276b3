//! File I/O: handles, reads (from the cache or a partial decode), writes, truncation,
//! fallocate, fsync and the free-space reserve.

use super::*;

impl Core {
    /// Open a handle. Nothing is decoded here: an open for writing is often an
    /// `O_TRUNC` (the kernel truncates with a SETATTR after the open), and a write that
    /// needs the old bytes decodes them then.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let mode = flags & libc::O_ACCMODE;
        let write = mode != libc::O_RDONLY;
        let direct_ok = self.direct_io_ok.load(std::sync::atomic::Ordering::Relaxed);
        // The inode is read under the lock that the handle is counted under: an unlink
        // of the last name between the two would delete the inode (nothing had it open)
        // and leave this handle naming nothing.
        let mut st = self.lock();
        let inode = self.get(ino)?;
        let cold_reader =
            direct_ok && inode.kind == Kind::File && mode == libc::O_RDONLY && !inode.cached;
        let stream = cold_reader && self.opts.stream_reads;
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, Handle { ino, stream });
        let live = st.live.entry(ino).or_default();
        live.open += 1;
        if write {
            live.writers += 1;
        }
        drop(st);
        Ok(Opened {
            fh,
            // Not for a setuid or setgid file written: the daemon clears those bits on
            // such a write, and the kernel, which does it for page-cache writes only,
            // would go on showing (and exec honouring, with -o suid) its cached mode.
            direct_io: cold_reader
                || (direct_ok
                    && mode == libc::O_WRONLY
                    && inode.perm & (libc::S_ISUID | libc::S_ISGID) as u16 == 0),
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
        st.tidy_live(ino);
        let inode = match self.get(ino) {
            Ok(i) => i,
            Err(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        if inode.nlink == 0 {
            let mut txn = Txn::default();
            self.store
                .delete_inode(&mut txn, ino, &inode)
                .map_err(store_err)?;
            self.commit(txn, false)?;
            crate::crash::point("release.after_index");
            self.forget(&mut st, ino);
            return Ok(());
        }
        if inode.kind == Kind::File && inode.dirty {
            self.enqueue_locked(ino, self.opts.idle);
            drop(st);
            // The last close: its size and times go to the index now.
            self.sync_metadata_of(ino)?;
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
            self.enqueue_locked(ino, self.opts.idle);
        }
        Ok(())
    }

    /// The open cache file of a cached regular file.
    pub(super) fn cache_file(&self, st: &mut State, ino: u64) -> FsResult<Arc<File>> {
        st.clean.touch(ino);
        let live = st.live.entry(ino).or_default();
        if let Some(f) = &live.file {
            return Ok(f.clone());
        }
        let opened = OpenOptions::new()
            .read(true)
            // A read-only mount may be on read-only media.
            .write(!self.opts.read_only)
            .open(self.store.cache_path(ino));
        let f = match opened {
            Ok(f) => Arc::new(f),
            Err(e) => {
                log::error!("inode {ino}: cannot open its plaintext: {e}");
                if e.kind() == std::io::ErrorKind::NotFound && !self.opts.read_only {
                    // A clean copy gone from under the index (removed by hand): its
                    // blob is the content. Not cached any more, durably: the caller's
                    // retry decodes it (ESTALE), and nothing was changed before this
                    // open (see cache_file_to_change).
                    let mut inode = self.get(ino)?;
                    if inode.cached && !inode.dirty && inode.blob.is_some() {
                        inode.cached = false;
                        let mut txn = Txn::default();
                        txn.put_inode(ino, &inode);
                        self.commit(txn, true)?;
                        st.clean.remove(ino);
                        st.tidy_live(ino);
                        log::warn!("inode {ino}: its clean copy is gone; it is decoded from its blob again");
                        return Err(libc::ESTALE);
                    }
                }
                // (Made above for a caller with no handle, a truncation by path.)
                st.tidy_live(ino);
                return Err(io_err(e));
            }
        };
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
        let partial = st.partial.get(&ino).filter(|p| Some(p.blob) == inode.blob);
        let ready = inode.cached
            || range
                .as_ref()
                .is_some_and(|r| partial.is_some_and(|p| p.covers(r)));
        if ready {
            let whole = partial.is_some_and(|p| p.complete());
            drop(st);
            if !inode.cached && !whole {
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

    /// If `ino` has a whole decoded copy of `blob` that is not its clean copy (a
    /// read-only mount's, kept until unmount), answer the reads waiting on it and say
    /// true: there is nothing left to decode.
    pub(crate) fn serve_complete_partial(&self, ino: u64, blob: BlobRef) -> bool {
        let done = {
            let st = self.lock();
            match st.partial.get(&ino) {
                Some(p) if p.blob == blob && p.complete() => p.done.clone(),
                _ => return false,
            }
        };
        self.partial_progress(ino, blob, &done);
        true
    }

    /// Whether `ino` has a whole decoded copy of `blob` that is not its clean copy (a
    /// read-only mount's).
    pub(crate) fn has_complete_partial(&self, ino: u64, blob: BlobRef) -> bool {
        self.lock()
            .partial
            .get(&ino)
            .is_some_and(|p| p.blob == blob && p.complete())
    }

    /// The decoder gave up on (or finished with) a partial decode of `ino`.
    pub(crate) fn partial_dropped(&self, ino: u64, blob: BlobRef) {
        let mut st = self.lock();
        if st.partial.get(&ino).is_some_and(|p| p.blob == blob) {
            st.partial.remove(&ino);
            st.ro_decoded.remove(ino);
        }
    }

    pub(super) fn unpin(&self, ino: u64) {
        let mut st = self.lock();
        if let Some(l) = st.live.get_mut(&ino) {
            l.pins = l.pins.saturating_sub(1);
        }
        st.tidy_live(ino);
    }

    /// Read from a cached file, or from the decoded part of one being decoded (call
    /// inside [`Core::with_range`]). With `short`, a partly decoded range gives its
    /// decoded start. ESTALE: the bytes are not there (any more).
    pub fn read(&self, ino: u64, offset: u64, size: u32, short: bool) -> FsResult<Vec<u8>> {
        let mut size = size as u64;
        let file = {
            let mut st = self.lock();
            let inode = self.get(ino)?;
            self.accessed(ino, &inode, false);
            if inode.cached {
                self.cache_file(&mut st, ino)?
            } else {
                // The temp file has the file's length; what is read of it is decoded.
                st.ro_decoded.touch(ino);
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

    /// Mark a file's content changed: dirty, blob dropped (to the graveyard), version
    /// bumped, and queued again if nothing has it open (a late mmap write-back).
    pub(super) fn touch_content(&self, st: &mut State, ino: u64, inode: &mut Inode, txn: &mut Txn) {
        let now = SystemTime::now();
        inode.mtime = now;
        inode.ctime = now;
        if let Some(b) = inode.blob.take() {
            txn.bury_blob(ino, &b);
        }
        inode.dirty = true;
        st.clean.remove(ino);
        let version = st.new_version();
        let live = st.live.entry(ino).or_default();
        live.version = version;
        if live.open == 0 {
            txn.enqueue(ino, unix_ms(now + self.opts.idle));
        } else if self.store.queue_due(ino).ok().flatten().is_some() {
            // Written again after a close: the writer has it back (committed with the
            // next batch or the group commit).
            self.defer_queue(ino, None);
        }
        // (A truncation by path: nothing holds the file. The version matters only to a
        // compression, which keeps the entry while it runs.)
        st.tidy_live(ino);
    }

    /// Before the cache file of a file that is not dirty changes (a clean copy, or none
    /// after eviction), the index says durably that it is dirty. Otherwise a crash
    /// could bring back "clean, blob X" over a cache file that no longer matches X
    /// (docs/DURABILITY.md, "write to a clean copy").
    pub(super) fn mark_dirty_first(
        &self,
        st: &mut State,
        ino: u64,
        inode: &mut Inode,
        point: &'static str,
    ) -> FsResult<()> {
        if inode.dirty {
            return Ok(());
        }
        let mut txn = Txn::default();
        self.touch_content(st, ino, inode, &mut txn);
        txn.put_inode(ino, inode);
        self.commit(txn, true)?;
        crate::crash::point(point);
        self.reap_soon();
        Ok(())
    }

    /// The cache file of a cached file whose content is about to change without the
    /// lock (a write, fallocate): marked dirty first (durably, `point` after it), and its
    /// version bumped before the bytes change, so a compression that read the old bytes
    /// cannot commit (its version check fails) while the change is under way.
    /// Also returns the file's size before the change.
    pub(super) fn cache_file_to_change(
        &self,
        ino: u64,
        point: &'static str,
    ) -> FsResult<(Arc<File>, Change<'_>, u64)> {
        let mut st = self.lock();
        let mut inode = self.get(ino)?;
        if !inode.cached {
            return Err(libc::ESTALE);
        }
        // Opened before anything is marked: a cache file that cannot be opened leaves
        // the file as it was (it used to be marked dirty first, its blob buried and
        // reaped, and then the open failed: the content was gone).
        let file = self.cache_file(&mut st, ino)?;
        self.mark_dirty_first(&mut st, ino, &mut inode, point)?;
        let change = Change::begin(self, &mut st, ino);
        Ok((file, change, inode.size))
    }

    pub(super) fn commit_content(&self, txn: Txn) -> FsResult<()> {
        self.commit(txn, false)
    }

    /// Write to a cached file (call inside [`Core::with_plain`]).
    ///
    /// The offset is the kernel's: for `O_APPEND` handles the kernel has already put it
    /// at the end of the file (under the inode lock), and a write-back of mmap'ed pages
    /// through such a handle must land where the pages are, not at the end.
    /// `kill_privs`: the writer may not keep setuid/setgid (see [`Core::kill_privs`]).
    pub fn write(
        &self,
        ino: u64,
        _fh: u64,
        offset: u64,
        data: &[u8],
        kill_privs: bool,
    ) -> FsResult<u32> {
        let end = offset.checked_add(data.len() as u64).ok_or(libc::EFBIG)?;
        // A statvfs of the backing filesystem: outside the lock.
        self.check_space(data.len() as u64)?;
        let (file, mut change, before) =
            self.cache_file_to_change(ino, "write.after_dirty_mark")?;
        // The bytes go to the cache file without the lock: a slow disk write stalls
        // this request only. The kernel orders writes and truncations of one file.
        if let Err(e) = file.write_all_at(data, offset) {
            // Bytes that reached the disk past the file's end before the failure would
            // become part of the file (its size follows the cache file's length at a
            // remount, and at fallocate): cut them off.
            if end > before {
                let _ = file.set_len(before);
            }
            return Err(io_err(e));
        }
        crate::crash::point("write.after_data");
        let mut st = self.lock();
        change.end(&mut st);
        let mut inode = match self.get(ino) {
            Ok(i) => i,
            // Unlinked and released meanwhile: the bytes went to a deleted file.
            Err(libc::ENOENT) => return Ok(data.len() as u32),
            Err(e) => return Err(e),
        };
        let mut txn = Txn::default();
        inode.size = inode.size.max(end);
        self.touch_content(&mut st, ino, &mut inode, &mut txn);
        let perm = inode.perm;
        if kill_privs {
            self.kill_privs(ino, &mut inode, &mut txn)?;
        }
        if txn.is_empty() && inode.perm == perm {
            // The common case, a file already dirty and off the queue: no index write.
            self.defer_meta(ino, &inode);
        } else {
            txn.put_inode(ino, &inode);
            self.commit_content(txn)?;
        }
        drop(st);
        Ok(data.len() as u32)
    }

    /// The kernel's rule for a change of content by a caller without CAP_FSETID: the
    /// setuid bit goes, the setgid bit too if the group may execute, and so does
    /// `security.capability`. The kernel does this itself only for writes through its
    /// page cache; direct-I/O writes and fallocate are left to the daemon.
    pub(super) fn kill_privs(&self, ino: u64, inode: &mut Inode, txn: &mut Txn) -> FsResult<()> {
        if inode.kind != Kind::File {
            return Ok(());
        }
        let mut perm = inode.perm as u32;
        perm &= !libc::S_ISUID;
        if perm & libc::S_IXGRP != 0 {
            perm &= !libc::S_ISGID;
        }
        if perm != inode.perm as u32 {
            inode.perm = perm as u16;
            inode.ctime = SystemTime::now();
        }
        const CAPS: &[u8] = b"security.capability";
        if self
            .store
            .xattr_get(ino, CAPS)
            .map_err(store_err)?
            .is_some()
        {
            txn.del_xattr(ino, CAPS);
            inode.ctime = SystemTime::now();
        }
        Ok(())
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
        // The cache file's new length is set without the lock, as a write's bytes are
        // written: a slow disk stalls this request only. The kernel holds the inode's
        // lock across a setattr, so no write or other truncation of this file runs
        // meanwhile; a compression that read the old bytes cannot commit (the version
        // is bumped first), and a dirty file is never evicted.
        let mut change = None;
        let truncated = match size {
            Some(size) => {
                let file = {
                    // A truncation of an evicted file makes its cache file: not while the
                    // eviction is deleting the old one.
                    let mut st = self.wait_cache_path_free(self.lock(), ino);
                    let mut inode = self.get(ino)?;
                    if inode.kind == Kind::Dir {
                        return Err(libc::EISDIR);
                    }
                    if inode.kind != Kind::File {
                        return Err(libc::EINVAL);
                    }
                    // Truncation of an evicted file to zero needs no decompression.
                    let evicted = !inode.cached;
                    if evicted && size != 0 {
                        return Err(libc::ESTALE);
                    }
                    // The cache file first (made empty for an evicted file, opened),
                    // and only then the index says (durably) dirty: a cache file that
                    // cannot be made or opened leaves the file as it was, its blob
                    // kept. (A crash between the two leaves an empty cache file of a
                    // file that is not cached: recovery's sweep removes it, a decode's
                    // install replaces it.)
                    let plain = self.store.cache_path(ino);
                    let made = if evicted {
                        self.store.make_file_dir(false, ino).map_err(io_err)?;
                        File::create(&plain).map_err(io_err)?;
                        true
                    } else {
                        false
                    };
                    let undo = |st: &mut State| {
                        if made {
                            if let Some(l) = st.live.get_mut(&ino) {
                                l.file = None;
                            }
                            let _ = std::fs::remove_file(&plain);
                        }
                    };
                    let f = match self.cache_file(&mut st, ino) {
                        Ok(f) => f,
                        Err(e) => {
                            undo(&mut st);
                            return Err(e);
                        }
                    };
                    inode.cached = true;
                    let marked = self.mark_dirty_first(
                        &mut st,
                        ino,
                        &mut inode,
                        "truncate.after_dirty_mark",
                    );
                    if let Err(e) = marked {
                        undo(&mut st);
                        return Err(e);
                    }
                    change = Some(Change::begin(self, &mut st, ino));
                    f
                };
                file.set_len(size).map_err(io_err)?;
                crate::crash::point("truncate.after_data");
                Some(size)
            }
            None => None,
        };
        let mut st = self.lock();
        if let Some(c) = change.as_mut() {
            c.end(&mut st);
        }
        let mut inode = self.get(ino)?;
        let now = SystemTime::now();
        let mut txn = Txn::default();
        if let Some(size) = truncated {
            inode.size = size;
            self.touch_content(&mut st, ino, &mut inode, &mut txn);
        }
        if let Some(m) = mode {
            inode.perm = (m & 0o7777) as u16;
            // A chmod is also a change of the access ACL's owner, mask and other
            // entries (the kernel leaves that to the daemon and forgets its copy).
            if let Some(mut a) = self.stored_acl(ino, crate::fs::acl::ACCESS)? {
                a.chmod(inode.perm);
                txn.put_xattr(ino, crate::fs::acl::ACCESS, &a.to_bytes());
            }
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
        self.commit_content(txn)?;
        drop(st);
        Ok(Attr { ino, inode })
    }

    /// fallocate on a cached file: forwarded to the cache file, so holes, punching and
    /// KEEP_SIZE behave as the backing filesystem does.
    pub fn fallocate(
        &self,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
        kill_privs: bool,
    ) -> FsResult<()> {
        use std::os::fd::AsRawFd;
        // A statvfs of the backing filesystem, and the allocation itself: outside the
        // lock, as for a write (the kernel holds the inode's lock across fallocate).
        if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
            self.check_space(length)?;
        }
        let (file, mut change, _) = self.cache_file_to_change(ino, "fallocate.after_dirty_mark")?;
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
        let mut st = self.lock();
        // The length under the lock, as a write's size is taken: read before it, a
        // write that extended the file meanwhile (and recorded its end) would be cut off
        // the size here. (The kernel orders them today; nothing here relies on that.)
        let len = file.metadata().map_err(io_err)?.len();
        change.end(&mut st);
        let mut inode = match self.get(ino) {
            Ok(i) => i,
            // Unlinked and released meanwhile: the change went to a deleted file.
            Err(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut txn = Txn::default();
        inode.size = len;
        self.touch_content(&mut st, ino, &mut inode, &mut txn);
        if kill_privs {
            self.kill_privs(ino, &mut inode, &mut txn)?;
        }
        txn.put_inode(ino, &inode);
        self.commit_content(txn)?;
        drop(st);
        Ok(())
    }

    /// fsync: the plaintext (if any) and the index reach the disk.
    pub fn fsync(&self, ino: u64, datasync: bool) -> FsResult<()> {
        self.sync_metadata_of(ino)?;
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
            // The cache file's own name, created unsynced with the file.
            crate::store::sync_dir(&self.store.cache_dir_of(ino)).map_err(io_err)?;
        }
        self.store.flush().map_err(store_err)
    }

    /// SEEK_DATA / SEEK_HOLE: the holes of the plaintext when it is cached (as the
    /// backing filesystem reports them); of a compressed file without its plaintext, its
    /// blob's zero segments (block-aligned, so a decoded copy reports the same holes).
    /// Other whences are the kernel's.
    pub fn lseek(&self, ino: u64, offset: i64, whence: i32) -> FsResult<i64> {
        use std::os::fd::AsRawFd;
        let mut st = self.lock();
        let inode = self.get(ino)?;
        if inode.kind != Kind::File {
            return Err(libc::EINVAL);
        }
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(libc::EINVAL);
        }
        let size = inode.size as i64;
        if offset < 0 || offset >= size {
            return Err(libc::ENXIO);
        }
        if !inode.cached {
            drop(st);
            return self.seek_in_blob(ino, offset as u64, whence == libc::SEEK_DATA);
        }
        let file = self.cache_file(&mut st, ino)?;
        drop(st);
        // SAFETY: a valid open fd; plain integer arguments.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if r < 0 {
            return Err(io_err(std::io::Error::last_os_error()));
        }
        Ok(r)
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE from `offset` in a compressed file, from its
    /// blob's header (read without the lock). When the blob cannot be read (replaced
    /// meanwhile), everything is data, which POSIX allows.
    fn seek_in_blob(&self, ino: u64, offset: u64, data: bool) -> FsResult<i64> {
        let Some((size, blob)) = self.blob_of(ino)? else {
            // Decoded meanwhile: ask again (the plaintext answers now).
            let whence = if data {
                libc::SEEK_DATA
            } else {
                libc::SEEK_HOLE
            };
            return self.lseek(ino, offset as i64, whence);
        };
        let header = self
            .store
            .open_blob(ino, &blob)
            .ok()
            .and_then(|b| crate::codec::container::Header::read_from(&b).ok())
            .map(|(h, _)| h)
            .filter(|h| h.original_len == size);
        let found = match header {
            Some(h) => h.seek(offset, data),
            None if data => Some(offset),
            None => Some(size),
        };
        found.map(|at| at as i64).ok_or(libc::ENXIO)
    }

    pub fn fsyncdir(&self) -> FsResult<()> {
        self.store.flush().map_err(store_err)
    }

    /// ENOSPC unless `extra` more bytes leave the reserve free on the backing disk.
    pub(super) fn check_space(&self, extra: u64) -> FsResult<()> {
        if self.reserve == 0 {
            return Ok(());
        }
        let (_, free) = backing_space(self.store.backing()).map_err(io_err)?;
        if free < self.reserve.saturating_add(extra) {
            return Err(libc::ENOSPC);
        }
        Ok(())
    }

    /// Total and free space of the backing filesystem, the free space net of the write
    /// reserve (what writes through the mount can really use before `ENOSPC`).
    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        let mut s = crate::store::statvfs(self.store.backing()).map_err(io_err)?;
        // Block counts are in f_frsize units.
        let reserved = self.reserve.div_ceil(s.f_frsize.max(1));
        s.f_bfree = s.f_bfree.saturating_sub(reserved);
        s.f_bavail = s.f_bavail.saturating_sub(reserved);
        Ok(s)
    }
}

/// A change of a file's content under way without the lock (see `Live::changing`):
/// begun under the lock before the bytes change, ended under the lock of the section
/// that records the change, or on drop if that section is never reached (an error).
pub(super) struct Change<'a> {
    core: &'a Core,
    ino: u64,
    open: bool,
}

impl<'a> Change<'a> {
    fn begin(core: &'a Core, st: &mut State, ino: u64) -> Change<'a> {
        let version = st.new_version();
        let live = st.live.entry(ino).or_default();
        live.version = version;
        live.changing += 1;
        Change {
            core,
            ino,
            open: true,
        }
    }

    fn end(&mut self, st: &mut State) {
        if std::mem::take(&mut self.open) {
            let version = st.new_version();
            let mut ended = false;
            if let Some(l) = st.live.get_mut(&self.ino) {
                l.changing = l.changing.saturating_sub(1);
                ended = l.changing == 0;
                // What a compression read before the change ended is not the file's.
                l.version = version;
            }
            st.tidy_live(self.ino);
            // A queued file under change is passed over by the compressors' scan: due
            // again now (a map lookup; a file being written is rarely queued).
            if ended {
                if let Some(d) = self.core.store.with_queue(|q| q.due_of(self.ino)) {
                    self.core.due_at(d);
                }
            }
        }
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        if self.open {
            let mut st = self.core.lock();
            self.end(&mut st);
        }
    }
}
