//! Mount-time recovery: bring the index and the backing files back in line after an
//! unclean stop (docs/DURABILITY.md, "Recovery").

use super::*;

impl Core {
    /// Bring index and files back in line after an unclean stop: the cache file is the
    /// truth for dirty sizes; half-written temp files and unreferenced blobs go; dirty
    /// files are queued again; orphans (unlinked while open) are removed.
    pub(super) fn recover(&self) -> Result<(), StoreError> {
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
}
