//! Mount-time recovery: bring the index and the backing files back in line after an
//! unclean stop (docs/DURABILITY.md, "Recovery"). It deletes only what the index
//! accounts for as unneeded; anything else it cannot place goes to `lost+found/`.

use std::collections::{HashMap, HashSet};

use super::*;

/// What recovery does with a file in blobs/ or cache/.
enum Verdict {
    Keep,
    /// Accounted for and unneeded: a temp file, a blob or decoded copy the index does
    /// not use of an inode whose data is elsewhere, an empty file.
    Remove,
    /// Not accounted for: moved to `lost+found/`, never deleted.
    Rescue,
}

/// Why a clean copy could not be shown to be its blob's content.
enum CopyCheck {
    /// The copy differs from what the blob's header says: the blob is the content.
    Differs(String),
    /// The blob itself cannot be read: the copy may be the only readable content.
    BlobUnreadable(String),
}

impl Core {
    /// A clean copy is the blob's content: its size and BLAKE3 are the header's.
    fn clean_copy_matches(&self, ino: u64, blob: BlobRef, size: u64) -> Result<(), CopyCheck> {
        let member = blob.member;
        let blob = self.store.open_blob(ino, &blob).map_err(|e| {
            CopyCheck::BlobUnreadable(format!(
                "its blob {} cannot be read ({e})",
                self.store.blob_display(ino, &blob)
            ))
        })?;
        let (header, _) = crate::codec::container::Header::read_from(&blob)
            .map_err(|e| CopyCheck::BlobUnreadable(format!("its blob's header is bad ({e})")))?;
        let unreadable = |e: std::io::Error| CopyCheck::Differs(format!("cannot be read ({e})"));
        let mut plain = File::open(self.store.cache_path(ino)).map_err(unreadable)?;
        let len = plain.metadata().map_err(unreadable)?.len();
        // A group member's copy is its range of the group: its length is the file's,
        // and its BLAKE3's second half is the one in its record.
        let (whole, want_len) = match member {
            Some(m) => (m.group_len, size),
            None => (size, header.original_len),
        };
        if len != want_len || header.original_len != whole || len != size {
            return Err(CopyCheck::Differs(format!(
                "has {len} bytes, the blob {}",
                header.original_len
            )));
        }
        // Streamed: a clean copy can be far larger than memory allows.
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut plain, &mut hasher).map_err(unreadable)?;
        let hash: [u8; 32] = hasher.finalize().into();
        let matches = match member {
            Some(m) => crate::store::Member::tail_of(&hash) == m.tail,
            None => hash == header.checksum,
        };
        if !matches {
            return Err(CopyCheck::Differs(
                "does not match the blob's BLAKE3".into(),
            ));
        }
        Ok(())
    }

    /// After an unclean stop: the cache file is the truth for dirty sizes (a dirty file
    /// whose never-synced cache file is gone is empty); dirty files are queued again;
    /// orphans (unlinked while open) are deleted; the graveyard is emptied; temp files
    /// and files the index has stopped needing go. A read-only mount changes nothing.
    pub(super) fn recover(&self) -> Result<(), StoreError> {
        if self.opts.read_only {
            // Nothing changes: only the clean copies, for the cache cap.
            let (clean, _) = self.store.take_open_scan();
            let mut st = self.lock();
            for (ino, size) in clean {
                st.clean.insert(ino, size);
            }
            return Ok(());
        }
        if self.store.take_clean_stop()? {
            return self.recover_after_clean_stop();
        }
        // The full pass below finds all of it again.
        drop(self.store.take_open_scan());
        let mut inodes: HashMap<u64, Inode> = HashMap::new();
        let mut unreadable = 0usize;
        for r in self.store.inodes() {
            match r {
                Ok((ino, inode)) => {
                    inodes.insert(ino, inode);
                }
                Err(e) => {
                    log::error!("recovery: {e}; run `nacrithfs fsck`");
                    unreadable += 1;
                }
            }
        }
        let now_ms = unix_ms(SystemTime::now());
        let queue = self.store.queue()?;
        let queued: HashSet<u64> = queue.iter().map(|&(i, _)| i).collect();
        let mut txn = Txn::default();
        // The idle time of this mount applies to what an earlier mount queued.
        let latest = now_ms + self.opts.idle.as_millis() as u64;
        for &(ino, due) in &queue {
            if due > latest {
                txn.enqueue(ino, latest);
            }
        }
        let (mut requeued, mut emptied, mut distrusted) = (0, 0, 0);
        let mut emptied_dirs = std::collections::BTreeSet::new();
        let check_clean = self.store.clean_copies_unverified()?;
        let mut deleted = Vec::new();
        let mut st = self.lock();
        for (&ino, inode) in inodes.iter_mut() {
            if inode.nlink == 0 && ino != ROOT_INO {
                self.store.delete_inode(&mut txn, ino, inode)?;
                deleted.push(ino);
                continue;
            }
            if inode.kind != Kind::File {
                continue;
            }
            let before = inode.clone();
            if inode.cached {
                let cache = self.store.cache_path(ino);
                match std::fs::metadata(&cache) {
                    Ok(m) => {
                        if inode.dirty {
                            inode.size = m.len();
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !inode.dirty => {
                        if inode.blob.is_some() {
                            // Evicted, and the crash came before the index said so.
                            inode.cached = false;
                        } else {
                            log::error!("recovery: inode {ino} has neither plaintext nor blob; run `nacrithfs fsck`");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        // A dirty file whose cache file never reached the disk (created
                        // and not fsynced before a power cut): its content is empty.
                        // (Its subdirectory too, if it was removed by hand.)
                        self.store.make_file_dir(false, ino)?;
                        std::fs::File::create(&cache)?;
                        inode.size = 0;
                        emptied += 1;
                        emptied_dirs.insert(self.store.cache_dir_of(ino));
                        log::warn!(
                            "recovery: inode {ino}: its plaintext was never synced and did not survive; it is empty now"
                        );
                    }
                    Err(e) => log::error!(
                        "recovery: inode {ino}: cannot stat its plaintext {}: {e}; run `nacrithfs fsck`",
                        cache.display()
                    ),
                }
            }
            if check_clean && inode.cached && !inode.dirty {
                if let Some(b) = inode.blob {
                    match self.clean_copy_matches(ino, b, inode.size) {
                        Ok(()) => {}
                        Err(CopyCheck::Differs(why)) => {
                            // The blob is the content; the plaintext is only a copy of it.
                            log::warn!(
                                "recovery: inode {ino}: its clean copy was never synced and {why}; it is decoded from its blob again"
                            );
                            inode.cached = false;
                            distrusted += 1;
                        }
                        // Never delete what may be the only readable copy (fsck keeps
                        // it too, and recompresses from it).
                        Err(CopyCheck::BlobUnreadable(why)) => log::error!(
                            "recovery: inode {ino}: {why}; its clean copy is kept, unchecked: run `nacrithfs fsck`"
                        ),
                    }
                }
            }
            if inode.dirty && !queued.contains(&ino) {
                txn.enqueue(ino, now_ms + self.opts.idle.as_millis() as u64);
                requeued += 1;
            }
            if inode.cached && !inode.dirty {
                st.clean.insert(ino, inode.size);
            }
            if *inode != before {
                txn.put_inode(ino, inode);
            }
        }
        drop(st);
        for ino in &deleted {
            inodes.remove(ino);
        }
        for dir in &emptied_dirs {
            crate::store::sync_dir(dir)?;
        }
        if check_clean {
            self.store.clean_copies_verified(&mut txn);
            log::info!(
                "recovery: clean copies of an older layout checked against their blobs: {distrusted} distrusted"
            );
        }
        self.store.commit(txn, true)?;
        crate::crash::point("recover.after_commit");
        self.reap();
        if unreadable > 0 {
            log::error!(
                "recovery: {unreadable} index records could not be read, so nothing in blobs/ or cache/ is swept; run `nacrithfs fsck`"
            );
            return Ok(());
        }
        let (removed, rescued) = self.sweep(&inodes)?;
        crate::crash::point("recover.after_sweep");
        if requeued + emptied + removed + rescued + deleted.len() > 0 {
            log::info!(
                "recovery: {requeued} dirty files queued again, {} orphans deleted, {removed} leftover files removed, {rescued} unaccounted files moved to lost+found/",
                deleted.len()
            );
        }
        Ok(())
    }

    /// After a clean stop the backing files are as the index says (no temp files, no
    /// compression or decode cut off, the graveyard emptied): no stat or listing of the
    /// backing files, and no pass over the index either. What it needs, the count at
    /// open (`Store::init_tally`) collected: clean copies for the cache cap, inodes
    /// without links (none, after a clean stop, unless a lazy unmount left them), dirty
    /// files (a flush request's set) that are not queued. Each dirty file's plaintext is
    /// looked at (O(dirty)), as after a crash: the stop synced the backing filesystem,
    /// but its length is what a read returns and what a compression codes, so the size
    /// follows it whatever happened to it meanwhile.
    fn recover_after_clean_stop(&self) -> Result<(), StoreError> {
        let now_ms = unix_ms(SystemTime::now());
        let latest = now_ms + self.opts.idle.as_millis() as u64;
        let queue: Vec<(u64, u64)> = self.store.with_queue(|q| q.in_due_order().collect());
        let mut txn = Txn::default();
        for &(ino, due) in &queue {
            if due > latest {
                txn.enqueue(ino, latest);
            }
        }
        let (clean, unlinked) = self.store.take_open_scan();
        let mut orphans = HashSet::new();
        for ino in unlinked {
            if let Some(inode) = self.store.get(ino)? {
                self.store.delete_inode(&mut txn, ino, &inode)?;
                orphans.insert(ino);
            }
        }
        let mut emptied_dirs = std::collections::BTreeSet::new();
        let mut resized = 0;
        for ino in self.store.dirty_files() {
            if orphans.contains(&ino) {
                continue;
            }
            if self.store.queue_due(ino)?.is_none() {
                txn.enqueue(ino, latest);
            }
            let Some(mut inode) = self.store.get(ino)? else {
                continue;
            };
            if inode.kind != Kind::File || !inode.cached {
                continue;
            }
            let cache = self.store.cache_path(ino);
            let len = match std::fs::metadata(&cache) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.store.make_file_dir(false, ino)?;
                    std::fs::File::create(&cache)?;
                    emptied_dirs.insert(self.store.cache_dir_of(ino));
                    0
                }
                Err(e) => {
                    log::error!(
                        "recovery: inode {ino}: cannot stat its plaintext {}: {e}; run `nacrithfs fsck`",
                        cache.display()
                    );
                    continue;
                }
            };
            if len != inode.size {
                log::warn!(
                    "recovery: inode {ino}: the index said {} bytes, its plaintext holds {len} (changed or lost after the clean stop); it has {len} now",
                    inode.size
                );
                inode.size = len;
                txn.put_inode(ino, &inode);
                resized += 1;
            }
        }
        for dir in &emptied_dirs {
            crate::store::sync_dir(dir)?;
        }
        let mut st = self.lock();
        for (ino, size) in clean {
            st.clean.insert(ino, size);
        }
        drop(st);
        self.store.commit(txn, true)?;
        self.reap();
        log::info!(
            "recovery: the last stop was clean: backing files not scanned ({} orphans deleted, {resized} dirty sizes corrected)",
            orphans.len()
        );
        Ok(())
    }

    /// Files in blobs/ and cache/ that the index does not use: removed when accounted
    /// for, rescued to `lost+found/` when not. Returns (removed, rescued).
    fn sweep(&self, inodes: &HashMap<u64, Inode>) -> Result<(usize, usize), StoreError> {
        let (mut removed, mut rescued) = (0, 0);
        // A pack being made when the daemon stopped (its entry is in the index, its
        // file not yet named): the temp file holds only a header, and the entry, which
        // nothing refers to, goes too. Packs themselves are never swept: the index
        // knows each before it exists, and compaction drops them.
        let packs = self.store.packs().dir();
        if let Ok(entries) = std::fs::read_dir(packs) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    match std::fs::remove_file(e.path()) {
                        Ok(()) => removed += 1,
                        Err(err) => {
                            log::warn!("recovery: cannot remove {}: {err}", e.path().display())
                        }
                    }
                }
            }
        }
        let mut txn = Txn::default();
        for (id, info) in self.store.pack_infos()? {
            let path = self.store.packs().path(id);
            let missing = matches!(std::fs::symlink_metadata(&path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if info.is_some_and(|i| i.live_blobs == 0) && missing {
                log::info!(
                    "recovery: {} was being made when the daemon stopped; its empty entry is dropped",
                    path.display()
                );
                txn.forget_pack(id);
            }
        }
        if !txn.is_empty() {
            self.store.commit(txn, true)?;
        }
        for is_blob in [true, false] {
            for dir in self.store.file_dirs(is_blob) {
                let mut changed = false;
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    // A subdirectory removed by hand: nothing in it to sweep (it is made
                    // again when a file of it is next made).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                for e in entries {
                    let e = e?;
                    if e.file_type().is_ok_and(|t| t.is_dir()) && self.store.is_shard_dir(&e.path())
                    {
                        continue;
                    }
                    let name = e.file_name().to_string_lossy().into_owned();
                    let verdict = if name.ends_with(".tmp") {
                        Verdict::Remove
                    } else if is_blob {
                        self.placed(&e.path(), blob_verdict(&name, inodes), |ino| {
                            crate::store::parse_blob_name(&name)
                                .map(|(_, seq)| self.store.blob_path(ino, seq))
                        })
                    } else {
                        let empty = e.metadata().is_ok_and(|m| m.len() == 0);
                        self.placed(&e.path(), cache_verdict(&name, inodes, empty), |ino| {
                            Some(self.store.cache_path(ino))
                        })
                    };
                    match verdict {
                        Verdict::Keep => {}
                        Verdict::Remove => match std::fs::remove_file(e.path()) {
                            Ok(()) => {
                                removed += 1;
                                changed = true;
                            }
                            Err(err) => {
                                log::warn!("recovery: cannot remove {}: {err}", e.path().display())
                            }
                        },
                        Verdict::Rescue => {
                            let to = crate::store::rescue(self.store.backing(), &e.path())?;
                            log::warn!(
                                "recovery: {} is not accounted for by the index; moved to {}",
                                e.path().display(),
                                to.display()
                            );
                            rescued += 1;
                            changed = true;
                        }
                    }
                }
                if changed {
                    crate::store::sync_dir(&dir)?;
                }
            }
        }
        Ok((removed, rescued))
    }

    /// A file is only what its name says where that name belongs (its inode's
    /// directory): anywhere else nothing wrote it, and it is rescued, never removed.
    fn placed(
        &self,
        path: &std::path::Path,
        verdict: Verdict,
        canonical: impl Fn(u64) -> Option<std::path::PathBuf>,
    ) -> Verdict {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ino = name.split('-').next().and_then(|i| i.parse::<u64>().ok());
        match ino.and_then(canonical) {
            Some(c) if c == path => verdict,
            _ => Verdict::Rescue,
        }
    }
}

fn blob_verdict(name: &str, inodes: &HashMap<u64, Inode>) -> Verdict {
    let Some((ino, seq)) = crate::store::parse_blob_name(name) else {
        return Verdict::Rescue;
    };
    match inodes.get(&ino) {
        Some(i) if i.blob.is_some_and(|b| b.seq == seq) => Verdict::Keep,
        // A blob of a live file that the index does not use: written but never committed,
        // or superseded; the file's content is its plaintext or its other blob.
        Some(i) if i.kind == Kind::File && (i.cached || i.blob.is_some()) => Verdict::Remove,
        _ => Verdict::Rescue,
    }
}

fn cache_verdict(name: &str, inodes: &HashMap<u64, Inode>, empty: bool) -> Verdict {
    let Ok(ino) = name.parse::<u64>() else {
        return Verdict::Rescue;
    };
    match inodes.get(&ino) {
        Some(i) if i.kind == Kind::File && i.cached => Verdict::Keep,
        // A decoded copy the index never took, or a clean copy whose eviction was
        // committed: the durable blob is the data. (A clean file's cache file changes
        // only after the index durably says dirty and cached.)
        Some(i) if i.kind == Kind::File && !i.dirty && i.blob.is_some() => Verdict::Remove,
        None if empty => Verdict::Remove,
        _ => Verdict::Rescue,
    }
}
