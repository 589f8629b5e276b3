//! Deleting files no index state needs any more. An operation that stops needing a file
//! (unlink, a superseded blob) lists it in the graveyard in the same index batch; the
//! reaper deletes it only after a flush has made that batch durable, and recovery does
//! the same for whatever a crash left listed (docs/DURABILITY.md, invariant 2).

use super::*;
use crate::store::GRAVE_CACHE;

impl Core {
    /// Ask the reaper to run soon (callable with the state lock held).
    pub(crate) fn reap_soon(&self) {
        *self.reap_wanted.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.reap_wake.notify_all();
    }

    /// The reaper's wait: true when it should reap, false at shutdown.
    ///
    /// Lock order: the state lock is never taken while `reap_wanted` is held (callers
    /// of `reap_soon` hold the state lock and then take `reap_wanted`; the reverse
    /// deadlocked a commit against the reaper). Shutdown sets `reap_wanted` too, so a
    /// flag read before the wait cannot miss it.
    pub(crate) fn wait_for_reap(&self, timeout: Duration) -> bool {
        let shutting_down = self.is_shutting_down();
        let mut wanted = self.reap_wanted.lock().unwrap_or_else(|p| p.into_inner());
        if !*wanted && !shutting_down {
            wanted = self
                .reap_wake
                .wait_timeout(wanted, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *wanted = false;
        drop(wanted);
        !self.is_shutting_down()
    }

    /// Flush the index, then delete every graveyard file the index does not refer to,
    /// then drop the entries. Errors leave the entries for the next pass.
    pub(crate) fn reap(&self) {
        if self.opts.read_only || self.is_paused() {
            return;
        }
        let graves = match self.store.graveyard() {
            Ok(g) => g,
            Err(e) => return log::error!("graveyard: {e}"),
        };
        if graves.is_empty() {
            return;
        }
        if let Err(e) = self.store.flush() {
            return log::error!("graveyard: index flush: {e}; nothing deleted");
        }
        crate::crash::point("reap.after_flush");
        let mut txn = Txn::default();
        for (ino, tag) in graves {
            match self.grave_in_use(ino, tag) {
                Ok(true) => {}
                Ok(false) => {
                    let path = self.store.grave_path(ino, tag);
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            log::warn!("graveyard: cannot remove {}: {e}", path.display());
                            continue;
                        }
                    }
                }
                Err(e) => {
                    log::error!("graveyard: inode {ino}: {e}; its files are kept");
                    continue;
                }
            }
            txn.unbury(ino, tag);
        }
        crate::crash::point("reap.after_delete");
        if let Err(e) = self.store.commit(txn, false) {
            log::error!("graveyard: {e}");
        }
    }

    /// Whether the index (as it is now) still refers to a graveyard entry's file. Inode
    /// numbers and blob sequence numbers are never reused, so once unreferenced a file
    /// stays so.
    fn grave_in_use(&self, ino: u64, tag: u64) -> Result<bool, StoreError> {
        Ok(match self.store.get(ino)? {
            // A pack is buried with no reference left; one found again is kept.
            None if ino == crate::store::PACK_GRAVE => !self.store.pack_refs(tag)?.is_empty(),
            None => false,
            Some(_) if tag == GRAVE_CACHE => true,
            Some(i) => i.blob.is_some_and(|b| b.seq == tag),
        })
    }
}
