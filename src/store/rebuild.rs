//! Rebuilding the index into a fresh fjall database at a read-write open
//! (docs/DURABILITY.md, "Index rebuild").
//!
//! fjall keeps every batch in its journal until the journal passes 64 MB, long after
//! the batches are in its tables, and its tables keep the tombstones and old versions
//! of what the volume went through: a corpus written once and then left cold carried
//! ~1.3 KB of journal per file (bench-corpus --index-files), more than its packed blobs.
//! When the journal takes more blocks than the tables and more than [`REBUILD_ABOVE`]
//! (16 KiB), the live keys are copied into `index.fjall.tmp`, which then takes the
//! place of `index.fjall` in one `renameat2(RENAME_EXCHANGE)`: at every instant
//! `index.fjall` is a whole index, the old one or the new one.
//!
//! `NACRITHFS_INDEX_REBUILD=always` (or `never`) overrides the rule (tests, operators).

use std::path::Path;
use std::time::Instant;

use super::index::Index;
use super::{open_index, sync_dir, Result, INDEX_DIR, INDEX_TMP_DIR};

/// Journal blocks below which the index is left as it is. A rebuild costs a few
/// fsyncs and a copy of the live keys (milliseconds for thousands of files); the rule
/// that the journal outweigh the tables keeps a big volume's index from being copied
/// at every mount (its tables outgrow fjall's 64 MB journal). It was 64 KiB, compared
/// with every other file of the index: a small volume's fixed files (keyspace
/// manifests and versions, ~56 KiB in 4 KiB blocks) then kept a journal of up to 64 KiB
/// for good, more than a corpus of 48 small files takes in packs (bench-corpus).
const REBUILD_ABOVE: u64 = 16 << 10;

/// Bytes of disk blocks under an index directory.
#[derive(Debug, Clone, Copy, Default)]
struct Blocks {
    /// Journal files (at its top).
    journal: u64,
    /// Table files (in a keyspace's `tables/`): what the live keys (and the tombstones
    /// and old versions not compacted yet) take.
    tables: u64,
    /// Everything else: fjall's own small files, whatever the index holds.
    other: u64,
}

impl Blocks {
    fn total(&self) -> u64 {
        self.journal + self.tables + self.other
    }
}

fn index_blocks(dir: &Path) -> std::io::Result<Blocks> {
    use std::os::unix::fs::MetadataExt;
    let mut b = Blocks::default();
    let mut stack = vec![(dir.to_path_buf(), true)];
    while let Some((d, top)) = stack.pop() {
        let in_tables = d.file_name().is_some_and(|n| n == "tables");
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            let bytes = m.blocks() * 512;
            if m.is_dir() {
                stack.push((e.path(), false));
            } else if top && e.path().extension().is_some_and(|x| x == "jnl") {
                b.journal += bytes;
            } else if in_tables {
                b.tables += bytes;
            } else {
                b.other += bytes;
            }
        }
    }
    Ok(b)
}

/// Swap two directory entries atomically.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    #[cfg(test)]
    if let Some(errno) = tests::EXCHANGE_FAILS.with(|e| e.get()) {
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths; AT_FDCWD for both directories.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// When a rebuild runs: at a read-write open, or after a clean stop (the daemon's
/// index closed, so that a volume left unmounted keeps no journal of its last session).
/// Only the names of the crash points differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum At {
    Open,
    Stop,
}

impl At {
    fn points(self) -> (&'static str, &'static str) {
        match self {
            At::Open => ("index_rebuild.after_copy", "index_rebuild.after_exchange"),
            At::Stop => ("stop_rebuild.after_copy", "stop_rebuild.after_exchange"),
        }
    }
}

/// `db` is the index of `backing`, just opened read-write (a leftover `index.fjall.tmp`
/// already removed). Returns it, or the rebuilt one.
pub(super) fn maybe(db: Index, backing: &Path) -> Result<Index> {
    Ok(maybe_at(db, backing, At::Open)?.0)
}

/// [`maybe`], at `at`; also says whether the index was rebuilt.
pub(super) fn maybe_at(db: Index, backing: &Path, at: At) -> Result<(Index, bool)> {
    let dir = backing.join(INDEX_DIR);
    // (A file fjall deletes between the listing and its stat: a rebuild only saves
    // space, so nothing about deciding on it stops a mount.)
    let blocks = match index_blocks(&dir) {
        Ok(b) => b,
        Err(e) => {
            log::warn!("index: not rebuilt: measuring {}: {e}", dir.display());
            return Ok((db, false));
        }
    };
    let wanted = match std::env::var("NACRITHFS_INDEX_REBUILD").as_deref() {
        Ok("always") => true,
        Ok("never") => false,
        _ => blocks.journal > REBUILD_ABOVE && blocks.journal > blocks.tables,
    };
    if !wanted {
        return Ok((db, false));
    }
    rebuild(db, backing, blocks.total(), blocks.journal, at)
}

/// Remove a copy that will not take the index's name (or the next open removes it).
fn drop_copy(tmp: &Path, backing: &Path) {
    if std::fs::remove_dir_all(tmp).is_ok() {
        let _ = sync_dir(backing);
    }
}

/// Copy the live keys of `db` into a new index and put it in the old one's place.
/// `before`, `journal`: the old index's blocks, for the log line.
fn rebuild(db: Index, backing: &Path, before: u64, journal: u64, at: At) -> Result<(Index, bool)> {
    let (after_copy, after_exchange) = at.points();
    let dir = backing.join(INDEX_DIR);
    let started = Instant::now();
    let tmp = backing.join(INDEX_TMP_DIR);
    // The rebuild only saves space: a volume whose disk has no room for the copy (the
    // live keys are fewer than the old index's blocks) mounts with its index as it is.
    match super::statvfs(backing) {
        Ok(s) if s.f_bavail.saturating_mul(s.f_frsize) < before => {
            log::warn!(
                "index: not rebuilt: {} has less free space than the index's {} KiB; the journal stays",
                backing.display(),
                before >> 10
            );
            return Ok((db, false));
        }
        _ => {}
    }
    // Straight into tables, in key order (no journal); synced, whole before it takes
    // the name.
    let copy = (|| -> Result<u64> { Ok(Index::open(&tmp)?.load_sorted(db.iter())?) })();
    let copied = match copy {
        Ok(n) => n,
        Err(e) => {
            // A full disk, a quota, an I/O error: the old index is whole and still open.
            log::warn!("index: not rebuilt ({e}); the journal stays");
            drop_copy(&tmp, backing);
            return Ok((db, false));
        }
    };
    crate::crash::point(after_copy);
    // From here until the old index is gone nobody may open or lock the real index (it
    // would get the one about to change names): the rebuild lock, exclusive. Openers
    // take it shared for each attempt, so this waits for attempts under way.
    let guard = match super::rebuild_lock_exclusive(backing) {
        Ok(g) => g,
        Err(e) => {
            log::warn!("index: not rebuilt ({e}); the journal stays");
            drop_copy(&tmp, backing);
            return Ok((db, false));
        }
    };
    // Closed (its threads joined) before its directory changes name under it.
    drop(db);
    if let Err(e) = exchange(&tmp, &dir) {
        // A failed exchange changed no name (EINVAL: the backing filesystem cannot
        // exchange names; ENOSYS or EPERM: a sandbox refuses the call; EXDEV: an
        // overlay): the old index is whole, and a volume mounts with it. The copy goes
        // (or the next open removes it).
        log::warn!(
            "index: not rebuilt (exchanging {} and {}: {e}); the journal stays",
            tmp.display(),
            dir.display()
        );
        if let Err(e) = std::fs::remove_dir_all(&tmp).and_then(|()| sync_dir(backing)) {
            log::warn!("index: removing the copy {}: {e}", tmp.display());
        }
        drop(guard);
        return Ok((open_index(&dir, backing)?, false));
    }
    sync_dir(backing)?;
    crate::crash::point(after_exchange);
    // The old index, now under the temporary name (a crash, or a failure here, leaves
    // it to the next open, which removes it).
    match std::fs::remove_dir_all(&tmp).and_then(|()| sync_dir(backing)) {
        Ok(()) => {}
        Err(e) => log::warn!("index: removing the old index {}: {e}", tmp.display()),
    }
    drop(guard);
    let after = index_blocks(&dir).unwrap_or_default();
    log::info!(
        "index: rebuilt{} ({copied} keys, {:.1} s): {} KiB on disk instead of {} KiB ({} KiB of journal)",
        if at == At::Stop { " after the stop" } else { "" },
        started.elapsed().as_secs_f64(),
        after.total() >> 10,
        before >> 10,
        journal >> 10
    );
    // (Another process may lock it first: then this open waits, or says who has it.)
    let rebuilt = open_index(&dir, backing)?;
    Ok((rebuilt, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::index::Batch;

    thread_local! {
        /// The errno every exchange on this thread fails with.
        pub(super) static EXCHANGE_FAILS: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
    }

    /// An index of 3000 keys with a journal of their history, checkpointed: its keys,
    /// and its journal's bytes.
    type Keys = Vec<(Vec<u8>, Vec<u8>)>;

    fn index_with_history(backing: &Path) -> (Index, Keys, u64) {
        let (db, keys, journal) = index_with_history_of(backing, 3000);
        assert!(journal > 100_000, "journal {journal}");
        (db, keys, journal)
    }

    fn index_with_history_of(backing: &Path, n: u32) -> (Index, Keys, u64) {
        let db = Index::open(&backing.join(INDEX_DIR)).expect("open");
        for i in 0..n {
            let mut b = Batch::default();
            b.insert(format!("k{i:05}"), vec![i as u8; 40]);
            // History the rebuilt index does not need: a key written and removed.
            b.insert(format!("q{i:05}"), b"queued");
            db.apply(b).expect("apply");
            let mut b = Batch::default();
            b.remove(format!("q{i:05}"));
            db.apply(b).expect("apply");
        }
        db.checkpoint().expect("checkpoint");
        let keys = all(&db);
        assert_eq!(keys.len(), n as usize);
        let journal = index_blocks(&backing.join(INDEX_DIR))
            .expect("blocks")
            .journal;
        (db, keys, journal)
    }

    /// Between a rebuild's close of the old index and the removal of the old one, no
    /// other process may open (read-write) or lock (read-only) the real index: it would
    /// get the directory about to change names, write into the new one through its
    /// paths, or delete it as a leftover. Both wait for the rebuild lock; before it, a
    /// remount right after an unmount (its daemon rebuilding after the stop) could.
    #[test]
    fn nobody_opens_the_index_while_a_rebuild_changes_its_name() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().to_path_buf();
        let db = Index::open(&backing.join(INDEX_DIR)).expect("open");
        let guard = super::super::rebuild_lock_exclusive(&backing).expect("rebuild lock");
        // The gap: the old index closed, unlocked, its name about to change.
        drop(db);
        let released = Arc::new(AtomicBool::new(false));
        let (b, r) = (backing.clone(), released.clone());
        let writer = std::thread::spawn(move || {
            let db = open_index(&b.join(INDEX_DIR), &b).expect("open after the rebuild");
            assert!(r.load(Ordering::SeqCst), "opened in the gap");
            drop(db);
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        released.store(true, Ordering::SeqCst);
        drop(guard);
        writer.join().expect("read-write opener");

        let guard = super::super::rebuild_lock_exclusive(&backing).expect("rebuild lock");
        let released = Arc::new(AtomicBool::new(false));
        let (b, r) = (backing.clone(), released.clone());
        let reader = std::thread::spawn(move || {
            let lock = super::super::flock_shared(&b.join(INDEX_DIR).join("lock"), &b)
                .expect("shared lock after the rebuild");
            assert!(r.load(Ordering::SeqCst), "locked in the gap");
            drop(lock);
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        released.store(true, Ordering::SeqCst);
        drop(guard);
        reader.join().expect("read-only locker");
    }

    /// A small volume's index (a few hundred files' history): its journal is more than
    /// its tables but less than fjall's fixed files, which the rule used to count as
    /// tables, so it was never rebuilt. Now it is, at the next open, and keeps every key.
    #[test]
    fn a_small_index_whose_journal_outweighs_its_tables_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path();
        let (db, before, _) = index_with_history_of(backing, 150);
        let b = index_blocks(&backing.join(INDEX_DIR)).expect("blocks");
        assert!(
            b.journal > REBUILD_ABOVE && b.journal > b.tables,
            "not a case for the rule: {b:?}"
        );
        assert!(
            b.journal < b.tables + b.other,
            "the old rule would rebuild it too: {b:?}"
        );
        let db = maybe(db, backing).expect("open");
        assert_eq!(all(&db), before);
        let after = index_blocks(&backing.join(INDEX_DIR)).expect("blocks");
        assert!(after.journal <= 8192, "not rebuilt: {after:?}");
        assert!(after.total() < b.total(), "{b:?} -> {after:?}");
        drop(db);
        // Nothing more to gain: the next open leaves it.
        let db = Index::open(&backing.join(INDEX_DIR)).expect("open");
        let db = maybe(db, backing).expect("open");
        assert_eq!(all(&db), before);
        assert_eq!(
            index_blocks(&backing.join(INDEX_DIR))
                .expect("blocks")
                .total(),
            after.total()
        );
    }

    fn all(db: &Index) -> Keys {
        db.iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("read"))
            .collect()
    }

    /// An exchange the backing filesystem or a sandbox refuses (EPERM, ENOSYS, EXDEV as
    /// well as EINVAL) changes no name: the volume mounts with its old index, whole,
    /// and the copy is gone. Only EINVAL did; any other errno failed the mount, at
    /// every read-write open.
    #[test]
    fn a_refused_exchange_keeps_the_old_index_and_mounts() {
        for errno in [libc::EINVAL, libc::EPERM, libc::ENOSYS, libc::EXDEV] {
            let dir = tempfile::tempdir().expect("tempdir");
            let backing = dir.path();
            let (db, before, journal) = index_with_history(backing);
            EXCHANGE_FAILS.with(|e| e.set(Some(errno)));
            let kept = rebuild(db, backing, 0, journal, At::Open).map(|(db, _)| db);
            EXCHANGE_FAILS.with(|e| e.set(None));
            let db = kept.unwrap_or_else(|e| panic!("errno {errno}: {e}"));
            assert_eq!(all(&db), before, "errno {errno}");
            assert!(!backing.join(INDEX_TMP_DIR).exists(), "errno {errno}");
            let after = index_blocks(&backing.join(INDEX_DIR))
                .expect("blocks")
                .journal;
            assert!(after >= journal, "errno {errno}: the journal went");
        }
    }

    /// Every key and value the same after a rebuild; the journal gone, the temporary
    /// directory too, and the new index open (locked) under the old name.
    #[test]
    fn a_rebuilt_index_holds_the_same_keys_without_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path();
        let (db, before, journal) = index_with_history(backing);
        let (db, rebuilt) = rebuild(db, backing, 0, journal, At::Open).expect("rebuild");
        assert!(rebuilt);
        assert_eq!(all(&db), before);
        let journal = index_blocks(&backing.join(INDEX_DIR))
            .expect("blocks")
            .journal;
        assert!(journal <= 8192, "journal after the rebuild {journal}");
        assert!(!backing.join(INDEX_TMP_DIR).exists());
        assert!(matches!(
            Index::open(&backing.join(INDEX_DIR)),
            Err(fjall::Error::Locked)
        ));
    }
}
