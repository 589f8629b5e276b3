//! Formats 1 and 2 kept the index in sled, in `BACKING/index/`. This version reads such
//! an index only to move it into fjall ([`super::index`]), once: in place at the first
//! read-write open, or into the private copy of a read-only mount (which writes nothing
//! in the backing directory).
//!
//! The move in place, step by step (docs/DURABILITY.md, "The move to format 3"):
//! 1. open sled (its lock keeps every other daemon out); remove any `index.fjall.tmp/`
//!    or `index.fjall/` an interrupted move left;
//! 2. copy every key into a new fjall index in `index.fjall.tmp/`, flush it;
//! 3. rename `index.fjall.tmp/` to `index.fjall/`, fsync the backing directory;
//! 4. write the format marker `nacrithfs 3` durably: from here the volume is format 3;
//! 5. close sled and delete `index/` (a format-3 open deletes one left behind).
//!
//! A crash before step 4 leaves a format-1/2 volume whose sled index was never written
//! to, and the next open starts over; after it, a format-3 volume.

use std::fs::File;
use std::io;
use std::path::Path;

use super::index::{Batch, Index};
use super::{Result, StoreError};

/// Where formats 1 and 2 keep the sled index.
pub const SLED_DIR: &str = "index";

/// Whether sled failed because another open of the index holds its file lock.
/// sled wraps the `flock` refusal in an `Other` error whose text is the only tell.
fn is_lock_refusal(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == io::ErrorKind::WouldBlock || io.to_string().contains("acquire lock")
        }
        _ => false,
    }
}

/// Open a sled index, waiting a little for its lock.
pub fn open_sled(dir: &Path, backing: &Path) -> Result<sled::Db> {
    super::wait_for_lock(backing, super::Shared::No, || {
        match sled::Config::new().path(dir).open() {
            Ok(db) => Ok(Some(db)),
            Err(e) if is_lock_refusal(&e) => Ok(None),
            Err(e) => Err(StoreError::Legacy(e)),
        }
    })
}

/// Copy every key of `from` into `to`, in batches; returns how many. Checkpoints `to`.
pub fn copy_into(from: &sled::Db, to: &Index) -> Result<u64> {
    const BATCH: usize = 4096;
    let (mut batch, mut n) = (Batch::default(), 0u64);
    for r in from.iter() {
        let (k, v) = r?;
        batch.insert(&k[..], &v[..]);
        n += 1;
        if batch.len() >= BATCH {
            to.apply(std::mem::take(&mut batch))?;
        }
    }
    to.apply(batch)?;
    to.checkpoint()?;
    Ok(n)
}

/// The shared lock a read-only mount holds on a sled index (sled takes it exclusively,
/// so no read-write daemon or fsck runs while the mount lasts).
pub fn lock_shared(backing: &Path) -> Result<File> {
    super::flock_shared(&backing.join(SLED_DIR).join("db"), backing)
}

/// Steps 1-5 above. `marker` is the format-3 line to write.
pub fn migrate_in_place(backing: &Path, marker: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let sled_dir = backing.join(SLED_DIR);
    let sled = open_sled(&sled_dir, backing)?;
    let tmp = backing.join(super::INDEX_TMP_DIR);
    let dest = backing.join(super::INDEX_DIR);
    for leftover in [&tmp, &dest] {
        if leftover.exists() {
            log::warn!(
                "index: removing {} left by an interrupted move to format 3",
                leftover.display()
            );
            std::fs::remove_dir_all(leftover)?;
        }
    }
    let copied = {
        let index = Index::open(&tmp)?;
        copy_into(&sled, &index)?
    };
    crate::crash::point("migrate.after_copy");
    std::fs::rename(&tmp, &dest)?;
    super::sync_dir(backing)?;
    crate::crash::point("migrate.after_rename");
    super::write_durably(&backing.join(super::FORMAT_MARKER), marker.as_bytes())?;
    crate::crash::point("migrate.after_marker");
    drop(sled);
    std::fs::remove_dir_all(&sled_dir)?;
    super::sync_dir(backing)?;
    log::info!(
        "index: moved from sled to fjall ({copied} keys, {:.1} s): {} is now format 3",
        started.elapsed().as_secs_f64(),
        backing.display()
    );
    Ok(())
}
