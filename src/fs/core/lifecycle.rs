//! The compression lifecycle: the queue, claiming a file, committing its blob.

use super::*;

/// The due time of a file `nacrithfs flush` asked for: before any wall-clock time.
const FLUSH_DUE: u64 = 0;
/// Queue entries looked at for the companions of a solid group (under the state lock,
/// each an index read).
const GROUP_SCAN: usize = 64;
/// Plaintext claimed as candidates for a solid group, in group sizes: the group takes
/// the candidates most like its first file, up to one group size.
const GROUP_CANDIDATES: u64 = 4;

/// A file claimed to be coded in a solid group with the one a compressor claimed: its
/// plaintext and the content version read at its claim.
pub(crate) struct Companion {
    pub ino: u64,
    pub path: std::path::PathBuf,
    pub version: u64,
}

/// A claim: the plaintext's path, the content version, and the files claimed with it.
pub(crate) type Claimed = (std::path::PathBuf, u64, Vec<Companion>);

/// A file of a solid group being committed (see [`Core::commit_group`]).
pub(crate) struct GroupMember {
    pub ino: u64,
    /// The content version read at its claim.
    pub version: u64,
    /// Its first byte in the group's plaintext, its length, and its BLAKE3.
    pub offset: u64,
    pub size: u64,
    pub content: [u8; 32],
}

impl Core {
    /// Queue `ino` (a dirty file) to be compressed after `delay`: in memory now, in the
    /// index at the next group commit (see [`Unsynced`]).
    pub(super) fn enqueue_locked(&self, ino: u64, delay: Duration) {
        self.defer_queue(ino, Some(unix_ms(SystemTime::now() + delay)));
    }

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
        if self.is_paused() {
            return Err(libc::EROFS);
        }
        self.sync_metadata()?;
        let st = self.lock();
        let mut txn = Txn::default();
        // The dirty files from the in-memory tally: O(dirty), not a scan of the index.
        // Due at the epoch, not at the wall clock's now: `nacrithfs flush` waits until
        // nothing is due, and a backward step of the clock would otherwise make entries
        // due "now" look not yet due, ending the wait early.
        for ino in self.store.dirty_files() {
            let due = self.store.queue_due(ino).map_err(store_err)?;
            let writing = st.live.get(&ino).is_some_and(|l| l.writers > 0) && due.is_none();
            if !writing && due != Some(FLUSH_DUE) {
                txn.enqueue(ino, FLUSH_DUE);
            }
        }
        // (The commit tells the compressors of the entries it queued.)
        self.commit(txn, false)?;
        drop(st);
        self.wake.notify_all();
        Ok(())
    }

    /// The next due queue entry, or how long to wait for one.
    pub(crate) fn next_due(&self) -> FsResult<Result<u64, Duration>> {
        let st = self.lock();
        if st.paused {
            return Ok(Err(Duration::from_secs(5)));
        }
        let now = unix_ms(SystemTime::now());
        // The in-memory queue index, in due order: this skips at most the files being
        // compressed, never scans the queue.
        Ok(self.store.with_queue(|q| {
            let mut wait = Duration::from_secs(5);
            for (ino, due) in q.in_due_order() {
                // A file open for writing is still compressed if it has not been
                // written since it was queued (a write takes it off the queue); the
                // version check at commit catches a write that races the compression.
                if st.compressing.contains(&ino)
                    || st.deferred.contains(&ino)
                    || st.live.get(&ino).is_some_and(|l| l.changing > 0)
                {
                    // (A change under way would make its commit refused.)
                    continue;
                }
                if due > now {
                    wait = wait.min(Duration::from_millis(due - now));
                    break;
                }
                return Ok(ino);
            }
            Err(wait)
        }))
    }

    /// Claim `ino` for compression. Returns its plaintext path and the content version
    /// its commit will be checked against (read here, under the lock that marks it
    /// compressing, so that its in-memory state is kept from now until the end), or
    /// None if it no longer needs compressing (then its queue entry is dropped). (The
    /// compressors claim with [`Core::claim_group`].)
    #[cfg(test)]
    pub(crate) fn claim(&self, ino: u64) -> FsResult<Option<(std::path::PathBuf, u64)>> {
        Ok(self
            .claim_with(ino, false)?
            .map(|(path, version, _)| (path, version)))
    }

    /// As [`Core::claim`]; and if the file is small enough for a solid group, claim
    /// other due small files as candidates for its group (up to [`GROUP_CANDIDATES`]
    /// group sizes), in the same locked section: compressors woken together (a flush)
    /// would otherwise each take one file of what is one group, and code them alone.
    pub(crate) fn claim_group(&self, ino: u64) -> FsResult<Option<Claimed>> {
        self.claim_with(ino, true)
    }

    fn claim_with(&self, ino: u64, group: bool) -> FsResult<Option<Claimed>> {
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
                let version = st.live.get(&ino).map_or(0, |l| l.version);
                let limit = self.opts.group;
                let small = i.size > 0 && i.size <= limit / 2;
                let companions = if group && self.opts.pack && small {
                    // Candidates for several groups: the compressor keeps the ones most
                    // like this file and lets the rest go.
                    self.claim_companions(&mut st, ino, limit / 2, GROUP_CANDIDATES * limit)
                } else {
                    Vec::new()
                };
                Ok(Some((self.store.cache_path(ino), version, companions)))
            }
            _ => {
                let mut txn = Txn::default();
                txn.dequeue(ino);
                self.commit(txn, false)?;
                Ok(None)
            }
        }
    }

    /// Claim other due files of at most `each` bytes, `room` bytes in all, to be coded
    /// in one solid group with `first` (being claimed). Looks at the first
    /// [`GROUP_SCAN`] entries of the queue in due order (files closed together are
    /// mostly neighbours in a corpus); each claimed one is marked compressing as
    /// [`Core::claim`] does.
    fn claim_companions(&self, st: &mut State, first: u64, each: u64, room: u64) -> Vec<Companion> {
        let now = unix_ms(SystemTime::now());
        let candidates: Vec<u64> = self.store.with_queue(|q| {
            q.in_due_order()
                .take_while(|&(_, due)| due <= now)
                .map(|(ino, _)| ino)
                .filter(|&ino| {
                    ino != first
                        && !st.compressing.contains(&ino)
                        && !st.deferred.contains(&ino)
                        && st.live.get(&ino).is_none_or(|l| l.changing == 0)
                })
                .take(GROUP_SCAN)
                .collect()
        });
        let mut room = room;
        let mut out = Vec::new();
        for ino in candidates {
            if room == 0 {
                break;
            }
            // (Not there or unreadable: the file's own claim deals with it.)
            let Ok(inode) = self.get(ino) else { continue };
            // (An empty file gains nothing from a group, and would tie its next write
            // to a decode of the group.)
            if inode.kind != Kind::File
                || !inode.dirty
                || !inode.cached
                || inode.size == 0
                || inode.size > each
                || inode.size > room
            {
                continue;
            }
            room -= inode.size;
            st.compressing.push(ino);
            let version = st.live.get(&ino).map_or(0, |l| l.version);
            out.push(Companion {
                ino,
                path: self.store.cache_path(ino),
                version,
            });
        }
        out
    }

    /// Commit a solid group: each member's inode switches to its range of the packed
    /// blob at `slot` (written durably, holding `group_len` bytes of plaintext), all in
    /// one index batch. A member that changed since its version was read (or whose
    /// plaintext is not the file's length) is left out, as [`Core::commit_blob`] would
    /// refuse it; its range stays in the slot unused. Every member's compression ends
    /// here. Returns the members committed (none: the slot has no reference, and
    /// compaction takes it).
    pub(crate) fn commit_group(
        &self,
        members: &[GroupMember],
        seq: u64,
        stored_size: u64,
        slot: crate::store::PackSlot,
        group_len: u64,
    ) -> FsResult<Vec<u64>> {
        let mut st = self.lock();
        let mut accepted = Vec::new();
        let mut retry = Txn::default();
        for m in members {
            let (current, changing) = st
                .live
                .get(&m.ino)
                .map_or((0, 0), |l| (l.version, l.changing));
            self.compression_ended(&mut st, m.ino);
            let inode = match self.get(m.ino) {
                Ok(i) => i,
                Err(libc::ENOENT) => {
                    st.stats.superseded += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if st.paused
                || current != m.version
                || changing > 0
                || !inode.dirty
                || !inode.cached
                || inode.size != m.size
            {
                st.stats.superseded += 1;
                if !st.paused
                    && current == m.version
                    && changing == 0
                    && inode.dirty
                    && inode.cached
                {
                    // Its plaintext is not the file's length (see `commit_blob`): not
                    // grouped again every few seconds.
                    retry.enqueue(m.ino, unix_ms(SystemTime::now() + RETRY_AFTER));
                }
                continue;
            }
            accepted.push((m, inode));
        }
        if !retry.is_empty() {
            self.commit(retry, false)?;
        }
        if accepted.is_empty() {
            return Ok(Vec::new());
        }
        let mut txn = Txn::default();
        for (m, inode) in &mut accepted {
            if let Some(old) = inode.blob {
                txn.bury_blob(m.ino, &old);
            }
            inode.dirty = false;
            inode.blob = Some(BlobRef {
                seq,
                stored_size,
                pack: Some(slot),
                member: Some(crate::store::Member {
                    offset: m.offset,
                    group_len,
                    tail: crate::store::Member::tail_of(&m.content),
                }),
            });
            txn.put_inode(m.ino, inode);
            txn.dequeue(m.ino);
            // The newest blob with this content: a later duplicate shares the range.
            txn.put_content_hint(&m.content, m.ino);
        }
        // Applied, then flushed, as in `commit_blob` (a failed flush stops the daemon;
        // the commit stands).
        self.commit(txn, false)?;
        if let Err(e) = self.store.flush() {
            log::error!(
                "a group of {} files is committed but the index flush failed ({e}); the daemon stops",
                accepted.len()
            );
        }
        crate::crash::point("group.after_commit");
        self.reap_soon();
        let mut done = Vec::with_capacity(accepted.len());
        for (m, inode) in &accepted {
            st.clean.insert(m.ino, inode.size);
            st.stats.compressed_files += 1;
            st.stats.grouped_files += 1;
            st.stats.bytes_in += inode.size;
            st.stats.bytes_out += inode.blob.map_or(0, |b| b.share(inode.size));
            done.push(m.ino);
        }
        Ok(done)
    }

    /// Switch `ino` to the blob just written durably at `seq`, unless the file changed
    /// since `version`. The caller has fsynced the plaintext of that version (it becomes
    /// the clean copy). Returns whether it committed (if not, the caller deletes the blob).
    pub(crate) fn commit_blob(&self, ino: u64, version: u64, blob: &NewBlob) -> FsResult<bool> {
        let NewBlob {
            seq,
            stored_size,
            original,
            ref content,
            shared,
            pack,
            member,
        } = *blob;
        let mut st = self.lock();
        // Read before the compression ends: its end may drop the file's in-memory state.
        let (current, changing) = st
            .live
            .get(&ino)
            .map_or((0, 0), |l| (l.version, l.changing));
        self.compression_ended(&mut st, ino);
        let mut inode = match self.get(ino) {
            Ok(i) => i,
            // Deleted meanwhile: dropped like any compression of a file that changed.
            Err(libc::ENOENT) => {
                st.stats.superseded += 1;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        // An unmount in progress does not refuse a finished compression: its commit is
        // as durable as any, and the clean stop is recorded only after every
        // compressor has stopped (so after this commit, or without it).
        if st.paused
            || current != version
            || changing > 0
            || !inode.dirty
            || !inode.cached
            || inode.size != original
        {
            st.stats.superseded += 1;
            if !st.paused && current == version && changing == 0 && inode.dirty && inode.cached {
                // Nothing changed, yet the plaintext's length is not the file's (a
                // write that failed half-way left the cache file longer): the next
                // write puts it right; until then not every few seconds again.
                log::warn!(
                    "inode {ino}: its plaintext holds {original} bytes, the file {}; compressed again in {} s",
                    inode.size,
                    RETRY_AFTER.as_secs()
                );
                let mut txn = Txn::default();
                txn.enqueue(ino, unix_ms(SystemTime::now() + RETRY_AFTER));
                self.commit(txn, false)?;
            }
            return Ok(false);
        }
        if let (true, Some(slot)) = (shared, pack) {
            // The shared packed blob must still be referenced: compaction (under this
            // lock) moves referenced blobs only, and drops packs nobody refers to.
            if self.store.slot_refs(slot).map_err(store_err)?.is_empty() {
                // Every file that referred to it went since it was found (the equal
                // file deleted, its last handle closed): nothing to share, and nothing
                // wrong with this file, which is due again at once and coded on its own
                // (its content hint names a file without that blob now). A failure here
                // failed a `nacrithfs flush` running meanwhile.
                st.stats.superseded += 1;
                log::info!("inode {ino}: the equal file whose blob it was to share is gone; compressed again on its own");
                let mut txn = Txn::default();
                txn.enqueue(ino, unix_ms(SystemTime::now()));
                self.commit(txn, false)?;
                return Ok(false);
            }
        }
        let mut txn = Txn::default();
        if let Some(old) = inode.blob {
            txn.bury_blob(ino, &old);
        }
        inode.dirty = false;
        let new = BlobRef {
            seq,
            stored_size,
            pack,
            member,
        };
        inode.blob = Some(new);
        txn.put_inode(ino, &inode);
        txn.dequeue(ino);
        // The newest blob with this content: a later duplicate shares it.
        txn.put_content_hint(content, ino);
        // Applied, then flushed: once the batch is applied the index names the blob
        // (and may have it on disk already), so a failed flush must not make the
        // caller delete the blob: it returned an error, and the compressor removed the
        // blob file the index named (the clean copy then the only copy, until an
        // eviction). A failed flush stops the daemon (the index refuses every later
        // write; see `Store::flush`), and nothing is deleted meanwhile: evictions and
        // the reaper flush first. The next mount's journal replay has the commit (blob
        // in use) or not (the file dirty with its synced plaintext, the blob swept).
        self.commit(txn, false)?;
        if let Err(e) = self.store.flush() {
            log::error!(
                "inode {ino}: its blob is committed but the index flush failed ({e}); the blob is kept, and the daemon stops"
            );
        }
        crate::crash::point("compress.after_commit");
        self.reap_soon();
        st.clean.insert(ino, inode.size);
        st.stats.compressed_files += 1;
        st.stats.bytes_in += original;
        st.stats.bytes_out += new.share(original);
        if shared {
            st.stats.shared_files += 1;
            st.stats.shared_bytes += new.share(original);
        }
        Ok(true)
    }

    /// A compression failed: keep the plaintext, retry later.
    pub(crate) fn compression_failed(&self, ino: u64) {
        let mut st = self.lock();
        self.compression_ended(&mut st, ino);
        st.stats.failures += 1;
        let mut txn = Txn::default();
        txn.enqueue(ino, unix_ms(SystemTime::now() + RETRY_AFTER));
        // Through `Core::commit`, which drops a queue entry still waiting for the group
        // commit (a close's): that one, written later, would make the retry early.
        if let Err(e) = self.commit(txn, false) {
            log::error!("requeue of inode {ino}: errno {e}");
        }
    }

    /// Busy time is wall time with at least one compression running (they overlap).
    /// Files waiting for this one's content (see [`Core::start_coding`]) are released.
    pub(super) fn compression_ended(&self, st: &mut State, ino: u64) {
        st.compressing.retain(|&i| i != ino);
        st.tidy_live(ino);
        // Still queued (a group's candidate let go, a compression that stepped aside):
        // the scans passed over it while it was claimed.
        if let Some(d) = self.store.with_queue(|q| q.due_of(ino)) {
            self.due_at(d);
        }
        if st.compressing.is_empty() {
            if let Some(t) = st.busy_since.take() {
                st.stats.busy += t.elapsed();
            }
        }
        // At most one entry per compressor: a short scan.
        let owned = st
            .coding
            .iter()
            .find(|(_, (owner, _))| *owner == ino)
            .map(|(k, _)| *k);
        if let Some(key) = owned {
            if let Some((_, waiting)) = st.coding.remove(&key) {
                self.store.with_queue_mut(|q| {
                    for w in waiting {
                        st.deferred.remove(&w);
                        q.unpark(w);
                    }
                });
                self.due_at(0);
                self.wake.notify_all();
            }
        }
    }

    /// `ino` (claimed) is about to be coded, its plaintext's BLAKE3 being `content`.
    /// If another compressor is coding equal content now, `ino` steps aside and this
    /// returns false: its claim ends, its queue entry stays, and `next_due` passes over
    /// it until that compression ends; by then the content hint of the blob it committed
    /// lets `ino` share it with no model time (if it failed, `ino` is coded as usual).
    pub(crate) fn start_coding(&self, ino: u64, content: &[u8; 32]) -> bool {
        let mut guard = self.lock();
        let st = &mut *guard;
        match st.coding.get_mut(content) {
            Some((owner, _)) if *owner == ino => true,
            Some((_, waiting)) => {
                waiting.push(ino);
                st.deferred.insert(ino);
                // Out of the scan for the next due file until then: with thousands of
                // equal files waiting, every scan walked them all, under the state lock.
                self.store.with_queue_mut(|q| q.park(ino));
                self.compression_ended(st, ino);
                false
            }
            None => {
                st.coding.insert(*content, (ino, Vec::new()));
                true
            }
        }
    }

    /// A file that will not be compressed (too large): off the queue until it is
    /// written and closed again (or the next mount requeues it and it is skipped again).
    pub(crate) fn compression_skipped(&self, ino: u64) {
        let mut st = self.lock();
        self.compression_ended(&mut st, ino);
        let mut txn = Txn::default();
        txn.dequeue(ino);
        // (As in compression_failed: a pending group-commit entry must not requeue it.)
        if let Err(e) = self.commit(txn, false) {
            log::error!("dequeue of inode {ino}: errno {e}");
        }
    }

    /// Whether `ino` was written (or truncated, or deleted) since `version` was read for
    /// its compression: the plaintext being coded is no longer the file's.
    pub(crate) fn changed_since(&self, ino: u64, version: u64) -> bool {
        let st = self.lock();
        let (current, changing) = st
            .live
            .get(&ino)
            .map_or((0, 0), |l| (l.version, l.changing));
        current != version
            || changing > 0
            || !self
                .get(ino)
                .is_ok_and(|i| i.kind == Kind::File && i.dirty && i.cached)
    }

    /// A compression stopped by the unmount: the file stays dirty and queued (its
    /// queue entry is dropped only by a commit), for the next mount.
    pub(crate) fn compression_interrupted(&self, ino: u64) {
        let mut st = self.lock();
        self.compression_ended(&mut st, ino);
    }

    /// A compression overtaken by a change to its file (which queues it again when it is
    /// closed): not a failure, as when `commit_blob` refuses.
    pub(crate) fn compression_superseded(&self, ino: u64) {
        let mut st = self.lock();
        self.compression_ended(&mut st, ino);
        st.stats.superseded += 1;
    }

    pub(crate) fn count_symbols(&self, n: u64) {
        self.lock().stats.symbols_coded += n;
    }

    /// Time a compressor spent on one file, from its claim to its end (sums over files).
    pub(crate) fn count_compress_time(&self, d: Duration) {
        self.lock().stats.compress_time += d;
    }

    /// Time spent encoding with the coder and decoding to verify (the model's part of a
    /// compression; sums over files).
    pub(crate) fn count_coding_time(&self, d: Duration) {
        self.lock().stats.coding_time += d;
    }

    pub(crate) fn count_regions(&self, n: u64) {
        self.lock().stats.regions_decoded += n;
    }

    pub(crate) fn count_verify_failure(&self) {
        self.lock().stats.verify_failures += 1;
    }
}
