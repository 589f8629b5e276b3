//! The clean-copy cache: eviction, the cache cap, and installing decoded plaintext.

use std::collections::BTreeSet;

use super::*;

/// The clean plaintext copies (evictable: their blob holds the content), in order of
/// last use, with their total size: the cache cap is checked in O(1) after each new
/// copy and the least recently used are found in O(log n), never by sorting them all.
#[derive(Default)]
pub(crate) struct CleanCopies {
    /// ino → (size, tick of last use).
    of: HashMap<u64, (u64, u64)>,
    by_use: BTreeSet<(u64, u64)>,
    total: u64,
    tick: u64,
}

impl CleanCopies {
    pub(crate) fn insert(&mut self, ino: u64, size: u64) {
        self.remove(ino);
        self.tick += 1;
        self.of.insert(ino, (size, self.tick));
        self.by_use.insert((self.tick, ino));
        self.total += size;
    }

    pub(crate) fn remove(&mut self, ino: u64) {
        if let Some((size, tick)) = self.of.remove(&ino) {
            self.by_use.remove(&(tick, ino));
            self.total -= size;
        }
    }

    /// `ino` was read or written: it becomes the most recently used.
    pub(crate) fn touch(&mut self, ino: u64) {
        if let Some(&(size, _)) = self.of.get(&ino) {
            self.insert(ino, size);
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    pub(crate) fn inos(&self) -> Vec<u64> {
        self.of.keys().copied().collect()
    }

    /// From the least recently used: (ino, size).
    fn oldest(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.by_use
            .iter()
            .map(|&(_, ino)| (ino, self.of.get(&ino).map_or(0, |e| e.0)))
    }
}

/// How long `evict` waits for reads in progress to let go of their files.
const EVICT_PIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long it waits for finished decodes to install their copies: bounded work (an
/// fsync, a BLAKE3 pass, a rename and an index update), but on a loaded disk an fsync
/// alone can take seconds.
const EVICT_INSTALL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Core {
    /// Drop every clean plaintext copy that no operation is using. Returns bytes freed.
    /// A read pins its file from its start until its reply is sent, so a read that has
    /// just answered its caller may hold a pin a moment longer: those are retried for up
    /// to [`EVICT_PIN_WAIT`] (`nacrithfs evict` right after a read found one copy pinned
    /// on a busy machine and left it). A decode whose every region is done is waited
    /// for up to [`EVICT_INSTALL_WAIT`]: its last reads were answered from it before its
    /// copy is installed, and a copy installed just after the evict would outlive it
    /// (tests/crash.rs saw one decode too few on the next mount). What stays is logged.
    pub fn evict_all(&self) -> FsResult<u64> {
        let start = std::time::Instant::now();
        let mut freed = 0;
        loop {
            let mut st = self.lock();
            if st.paused || self.opts.read_only {
                return Err(libc::EROFS);
            }
            let inos = st.clean.inos();
            let (bytes, gone) = self.evict_locked(&mut st, &inos)?;
            freed += bytes;
            // Under the lock the eviction held: a copy installed or let go of after
            // it is seen here and taken by the next pass. (Looked at under a second
            // lock, an install that got the lock in between, often one that waited
            // for this eviction's commit, was neither evicted nor waited for: CI saw
            // one decode too few on the next mount.)
            let pinned = st
                .clean
                .inos()
                .into_iter()
                .any(|ino| st.live.get(&ino).is_some_and(|l| l.pins > 0));
            let installing = !self.opts.read_only && st.partial.values().any(|p| p.complete());
            drop(st);
            self.delete_evicted(gone);
            let waited = start.elapsed();
            let wait =
                (pinned && waited < EVICT_PIN_WAIT) || (installing && waited < EVICT_INSTALL_WAIT);
            if !wait {
                self.log_kept_copies();
                return Ok(freed);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// After an evict: say which clean copies stayed and why (an evict that leaves a
    /// copy is legal, but a test or an operator expecting none needs to know which).
    fn log_kept_copies(&self) {
        let st = self.lock();
        let mut kept: Vec<String> = st
            .clean
            .inos()
            .into_iter()
            .map(|ino| {
                let why = if st.compressing.contains(&ino) {
                    "being compressed"
                } else if st.live.get(&ino).is_some_and(|l| l.pins > 0) {
                    "in use by a read or write"
                } else {
                    "busy"
                };
                format!("inode {ino} ({why})")
            })
            .collect();
        kept.extend(
            st.partial
                .iter()
                .filter(|(_, p)| p.complete())
                .map(|(ino, _)| format!("inode {ino} (its decode is being installed)")),
        );
        if !kept.is_empty() {
            log::info!(
                "evict: {} clean copies kept: {}",
                kept.len(),
                kept.join(", ")
            );
        }
    }

    /// Evict these clean copies (those no operation is using): one durable index update
    /// says they are gone. Returns the bytes freed and the inodes whose cache files the
    /// caller deletes with [`Core::delete_evicted`] once it has let go of the state lock
    /// (deleting a large file takes a while). A crash before that leaves cache files of
    /// evicted inodes, which recovery deletes (their blobs are the data).
    pub(super) fn evict_locked(&self, st: &mut State, inos: &[u64]) -> FsResult<(u64, Vec<u64>)> {
        let mut txn = Txn::default();
        let mut gone = Vec::new();
        for &ino in inos {
            // Open files may go too: their next read or write waits for the decompressor
            // like any other (the kernel's page cache usually answers first).
            if st.live.get(&ino).is_some_and(|l| l.pins > 0) || st.compressing.contains(&ino) {
                continue;
            }
            let mut inode = self.get(ino)?;
            if inode.kind != Kind::File || !inode.cached || inode.dirty || inode.blob.is_none() {
                st.clean.remove(ino);
                continue;
            }
            inode.cached = false;
            txn.put_inode(ino, &inode);
            gone.push((ino, inode.size));
        }
        if gone.is_empty() {
            return Ok((0, Vec::new()));
        }
        self.commit(txn, true)?;
        crate::crash::point("evict.after_index");
        let mut freed = 0;
        for &(ino, size) in &gone {
            st.clean.remove(ino);
            if let Some(l) = st.live.get_mut(&ino) {
                l.file = None;
            }
            st.evicting.insert(ino);
            freed += size;
        }
        Ok((freed, gone.into_iter().map(|(ino, _)| ino).collect()))
    }

    /// Delete the cache files of inodes [`Core::evict_locked`] evicted (without the state
    /// lock), then let whoever waits to make a new one at the same path go on.
    fn delete_evicted(&self, gone: Vec<u64>) {
        if gone.is_empty() {
            return;
        }
        for &ino in &gone {
            match std::fs::remove_file(self.store.cache_path(ino)) {
                // Deleted meanwhile: the reaper took it with its inode.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("evicting inode {ino}: {e}; recovery removes it"),
                Ok(()) => {}
            }
        }
        crate::crash::point("evict.after_delete");
        let mut st = self.lock();
        for ino in gone {
            st.evicting.remove(&ino);
        }
        drop(st);
        self.cache_path_free.notify_all();
    }

    /// Wait until no eviction is deleting `ino`'s cache file: whatever makes a cache
    /// file for an inode that has none (a decode's install, a truncation of an evicted
    /// file) calls this first, with the state lock, and keeps the lock until the file
    /// is there.
    pub(super) fn wait_cache_path_free<'a>(
        &self,
        st: MutexGuard<'a, State>,
        ino: u64,
    ) -> MutexGuard<'a, State> {
        self.cache_path_free
            .wait_while(st, |st| st.evicting.contains(&ino))
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Evict least recently used clean copies until the cache is under its cap.
    pub(crate) fn enforce_cache_cap(&self) {
        let mut st = self.lock();
        // (Read-only: the clean copies are the backing directory's, not ours to delete;
        // the decodes this mount made are.)
        if self.opts.read_only {
            return self.cap_read_only_decodes(st);
        }
        if st.paused {
            return;
        }
        let mut total = st.clean.total();
        if total <= self.opts.cache_size {
            return;
        }
        let mut chosen = Vec::new();
        for (ino, size) in st.clean.oldest() {
            if total <= self.opts.cache_size {
                break;
            }
            total = total.saturating_sub(size);
            chosen.push(ino);
        }
        match self.evict_locked(&mut st, &chosen) {
            Ok((_, gone)) => {
                drop(st);
                self.delete_evicted(gone);
            }
            Err(e) => log::warn!("evicting clean copies for the cache cap: errno {e}"),
        }
    }

    /// A read-only mount keeps each whole decode as its temp file (nothing may be
    /// installed in the backing directory): past the cache cap, the least recently used
    /// that no operation is using go, and a later read decodes the file again. Without
    /// this a long-lived read-only mount of an archive kept every file it ever decoded.
    fn cap_read_only_decodes(&self, mut st: MutexGuard<'_, State>) {
        let cap = self.opts.cache_size;
        let mut total = st.ro_decoded.total();
        if total <= cap {
            return;
        }
        let mut chosen = Vec::new();
        for (ino, size) in st.ro_decoded.oldest() {
            if total <= cap {
                break;
            }
            let busy =
                st.live.get(&ino).is_some_and(|l| l.pins > 0) || st.waiters.contains_key(&ino);
            if !busy {
                total = total.saturating_sub(size);
                chosen.push(ino);
            }
        }
        for &ino in &chosen {
            st.ro_decoded.remove(ino);
            if st.partial.get(&ino).is_some_and(|p| p.complete()) {
                st.partial.remove(&ino);
            }
        }
        drop(st);
        // A reader that still holds the file by its handle reads on; the next decode of
        // the same file makes a new one (create_new), never this one truncated.
        for ino in chosen {
            let _ = std::fs::remove_file(self.store.cache_tmp_path(ino));
        }
    }

    /// What the decompressor needs: the blob to read and the expected size, or None if
    /// the plaintext is already there.
    pub(crate) fn blob_of(&self, ino: u64) -> FsResult<Option<(u64, BlobRef)>> {
        let _st = self.lock();
        let inode = self.get(ino)?;
        if inode.cached {
            return Ok(None);
        }
        let b = inode.blob.ok_or_else(|| {
            log::error!("inode {ino} has neither plaintext nor blob; run `nacrithfs fsck`");
            libc::EIO
        })?;
        Ok(Some((inode.size, b)))
    }

    /// The decompressor wrote the plaintext to the temp path (or found it already there,
    /// `blob` None): install it if the file is still as it was, and hand the result to
    /// everyone waiting.
    pub(crate) fn materialized(&self, ino: u64, blob: Option<BlobRef>, result: FsResult<()>) {
        // An install makes the cache file: not while an eviction is deleting the last.
        let mut st = self.wait_cache_path_free(self.lock(), ino);
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
            let (guard, r) = self.install_decoded(st, ino, blob);
            st = guard;
            result = r;
            if matches!(result, Err(e) if e != libc::EAGAIN) && !self.opts.read_only {
                // The file was deleted while its read-ahead decoded (or the install
                // failed): nothing will use the temp file, and a clean stop means the
                // next mount does not scan for it (found by tests/reference.rs).
                let _ = std::fs::remove_file(self.store.cache_tmp_path(ino));
            }
        } else if result.is_err() {
            st.stats.decompress_failures += 1;
        }
        if let Some(blob) = blob.filter(|_| !(self.opts.read_only && result.is_ok())) {
            if st.partial.get(&ino).is_some_and(|p| p.blob == blob) {
                st.partial.remove(&ino);
                st.ro_decoded.remove(ino);
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

    /// Make a finished decode of `blob` the file's clean copy (docs/DURABILITY.md,
    /// "decompression install"), unless the file has moved on. The rename happens with
    /// the state lock, so nothing else makes the cache file meanwhile; the directory
    /// fsync, the slow step, without it: the index says "cached" only after the fsync,
    /// and what changed meanwhile is looked at again first.
    fn install_decoded<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        ino: u64,
        blob: BlobRef,
    ) -> (MutexGuard<'a, State>, FsResult<()>) {
        let inode = match self.get(ino) {
            Ok(i) => i,
            Err(e) => return (st, Err(e)),
        };
        if inode.cached {
            let _ = std::fs::remove_file(self.store.cache_tmp_path(ino));
            return (st, Ok(()));
        }
        if inode.blob != Some(blob) {
            return (st, Err(libc::EAGAIN));
        }
        if self.opts.read_only {
            // Nothing changes on disk: the decoded temp file (outside the backing
            // directory) stays a complete partial decode until unmount.
            if let Some(p) = st.partial.get_mut(&ino).filter(|p| p.blob == blob) {
                p.done.iter_mut().for_each(|d| *d = true);
                let size = p.size;
                st.ro_decoded.insert(ino, size);
                st.stats.decompressions += 1;
                return (st, Ok(()));
            }
            return (st, Err(libc::EAGAIN));
        }
        // The temp file was fsynced and checked against the blob's BLAKE3; the rename is
        // made durable before the index may say "cached", so a clean copy the index
        // names is always whole.
        let renamed = std::fs::rename(self.store.cache_tmp_path(ino), self.store.cache_path(ino));
        if let Err(e) = renamed {
            return (st, Err(io_err(e)));
        }
        crate::crash::point("decode.after_rename");
        drop(st);
        let synced = crate::store::sync_dir(&self.store.cache_dir_of(ino));
        crate::crash::point("decode.after_dir_sync");
        let mut st = self.lock();
        let r = (|| {
            // Deleted meanwhile (ENOENT): its grave, made after the rename, covers the
            // cache file.
            let mut inode = self.get(ino)?;
            if inode.cached {
                // Truncated meanwhile: the truncation's file (made over this one) is
                // the content now.
                return Ok(());
            }
            if synced.is_err() || inode.blob != Some(blob) {
                // Not durable, or not this file's content any more: not a clean copy.
                let _ = std::fs::remove_file(self.store.cache_path(ino));
                return Err(synced.err().map_or(libc::EAGAIN, io_err));
            }
            inode.cached = true;
            self.put(ino, &inode)?;
            crate::crash::point("decode.after_index");
            st.clean.insert(ino, inode.size);
            st.stats.decompressions += 1;
            Ok(())
        })();
        (st, r)
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
}
