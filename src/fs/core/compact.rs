//! Pack compaction: the space of packed blobs nobody refers to any more (files deleted
//! or rewritten) comes back by copying a pack's live blobs into the open pack and
//! deleting the old pack. docs/DURABILITY.md ("Pack compaction") has the order of the
//! durable steps; each is a crash point.

use super::*;
use crate::store::pack::{self, PACK_TARGET, RECORD_HEADER};
use crate::store::PackSlot;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Compacted {
    /// Packs copied and deleted, and packs deleted with nothing left in them.
    pub packs_compacted: u64,
    pub packs_dropped: u64,
    /// Blobs copied into the open pack, and their bytes.
    pub blobs_moved: u64,
    pub bytes_moved: u64,
    /// Bytes of pack files given back (their whole length).
    pub bytes_freed: u64,
}

/// A sealed pack is compacted when under this share of its records (its header apart)
/// is still referenced...
const LIVE_SHARE: f64 = 0.5;
/// ...or when it is this small (a pack sealed early, by an unmount): merging it costs
/// little and keeps the number of files down.
const SMALL_PACK: u64 = PACK_TARGET / 8;

/// The bytes of pack `path` (`len` long) that hold records: its length less its
/// header. The header (the coding profile, a few hundred bytes) is not dead space a
/// copy would give back: counted as dead, a sealed pack holding one small blob and
/// nothing dead (an empty file's, a small pack sealed by an unmount) was copied into
/// the open pack at every pass that found it sealed again.
fn record_bytes(path: &std::path::Path, len: u64) -> u64 {
    crate::codec::source::FileSource::open(path)
        .ok()
        .and_then(|f| pack::read_header(&f).ok())
        .map_or(len, |(.., header)| len.saturating_sub(header))
}

impl Core {
    /// One compaction pass over every sealed pack (O(packs), each a few MiB). Runs in
    /// the compactor thread, and on the `compact` control command; one pass at a time.
    pub fn compact_packs(&self) -> FsResult<Compacted> {
        let mut done = Compacted::default();
        if self.opts.read_only || self.is_paused() {
            return Ok(done);
        }
        let _one = self.compacting.lock().unwrap_or_else(|p| p.into_inner());
        // The entries first, then the open packs: a pack is made (its entry written,
        // then its file) with its writer's lock held until it is open, and the list of
        // open packs takes that lock; so every pack listed here is either open by then
        // or sealed. (In the other order, a pack made between the two listings was
        // neither open nor yet pending: dropped as empty while its first blob went in.)
        let packs = self.store.pack_infos().map_err(store_err)?;
        let open = self.store.packs().open_packs();
        // Small packs by coding profile: only packs of one profile merge into one.
        let mut small: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
        for (id, info) in packs {
            if open.contains(&id) || self.store.packs().is_pending(id) || self.is_shutting_down() {
                continue;
            }
            let Some(info) = info else {
                continue; // malformed: fsck's
            };
            let path = self.store.packs().path(id);
            let len = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && info.live_blobs == 0 => 0,
                Err(e) => {
                    log::error!("compaction: {}: {e}", path.display());
                    continue;
                }
            };
            if info.live_blobs == 0 {
                if self.drop_pack(id)? {
                    done.packs_dropped += 1;
                    done.bytes_freed += len;
                }
            } else if (info.live_bytes as f64) < LIVE_SHARE * len as f64
                && (info.live_bytes as f64) < LIVE_SHARE * record_bytes(&path, len) as f64
            {
                if self.compact_one(id, info.profile, &mut done)? {
                    done.bytes_freed += len;
                }
            } else if len < SMALL_PACK {
                small.entry(info.profile).or_default().push(id);
            }
        }
        // Small, mostly live packs are merged only when there are several of them of
        // one profile (copying a profile's only one gains nothing: it was the case of
        // every volume after every unmount, one small pack for text, one for binary).
        for ids in small.into_values().filter(|ids| ids.len() > 1) {
            for id in ids {
                if let Ok(Some(info)) = self.store.pack_info(id) {
                    let len = std::fs::metadata(self.store.packs().path(id)).map_or(0, |m| m.len());
                    if self.compact_one(id, info.profile, &mut done)? {
                        done.bytes_freed += len;
                    }
                }
            }
        }
        if done.packs_compacted + done.packs_dropped > 0 {
            log::info!(
                "compaction: {} packs compacted, {} empty packs dropped; {} blobs ({} bytes) moved, {} bytes of packs given back",
                done.packs_compacted,
                done.packs_dropped,
                done.blobs_moved,
                done.bytes_moved,
                done.bytes_freed
            );
        }
        Ok(done)
    }

    /// Delete pack `id` if nothing refers to it (under the state lock, so no commit
    /// adds a reference meanwhile): its index entry goes and its file is buried in one
    /// durable batch; the reaper deletes the file.
    fn drop_pack(&self, id: u64) -> FsResult<bool> {
        let _st = self.lock();
        // A blob appended to it may still be committed: not yet.
        if self.store.packs().is_pending(id)
            || !self.store.pack_refs(id).map_err(store_err)?.is_empty()
        {
            return Ok(false);
        }
        let mut txn = Txn::default();
        txn.bury_pack(id);
        self.commit(txn, true)?;
        crate::crash::point("compact.after_bury");
        self.reap_soon();
        Ok(true)
    }

    /// Copy pack `id`'s referenced blobs into the open pack, switch their references in
    /// one durable batch, then drop the pack.
    /// Returns whether the pack went (its bytes given back).
    fn compact_one(&self, id: u64, profile: u32, done: &mut Compacted) -> FsResult<bool> {
        let path = self.store.packs().path(id);
        // A reference whose inode is gone or refers elsewhere (a damaged index) would
        // fail the commit below on every pass, each time after copying the blobs again
        // (dead bytes in the open pack): such a pack is left as it is, for fsck. Read
        // without the state lock (a pack holds thousands of references); one that looks
        // stale is read again under it, where references and inode records agree.
        let holds = |slot: PackSlot, ino: u64| -> FsResult<bool> {
            match self.get(ino) {
                Ok(i) => Ok(i.blob.is_some_and(|b| b.pack == Some(slot))),
                Err(libc::ENOENT) => Ok(false),
                Err(e) => Err(e),
            }
        };
        // An inode record that cannot be read stops this pack only, like a stale
        // reference (it used to end the whole pass, every pass, for every later pack).
        let unreadable = |ino: u64, e: i32| {
            log::error!(
                "compaction: {} is referenced by inode {ino}, whose record cannot be read (errno {e}); not compacted: run `nacrithfs fsck`",
                path.display()
            );
        };
        for (slot, ino, _) in self.store.pack_refs(id).map_err(store_err)? {
            match holds(slot, ino) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    unreadable(ino, e);
                    return Ok(false);
                }
            }
            let _st = self.lock();
            let still = self
                .store
                .slot_refs(slot)
                .map_err(store_err)?
                .contains(&ino);
            let stale = match holds(slot, ino) {
                Ok(h) => still && !h,
                Err(e) => {
                    unreadable(ino, e);
                    return Ok(false);
                }
            };
            if stale {
                log::error!(
                    "compaction: {} has a stale reference (inode {ino} at offset {}); not compacted: run `nacrithfs fsck --repair`",
                    path.display(),
                    slot.offset
                );
                return Ok(false);
            }
        }
        let refs = self.store.pack_refs(id).map_err(store_err)?;
        let source = match crate::codec::source::FileSource::open(&path) {
            Ok(f) => f,
            Err(e) => {
                log::error!(
                    "compaction: {}: {e}; its blobs stay where they are",
                    path.display()
                );
                return Ok(false);
            }
        };
        // The blobs were coded with the profile of the pack's header; copied into an
        // open pack of another profile (an index entry that says another, or a damaged
        // copy of the profile in the index, from which the copies' header would be
        // written) they would not decode there, and the old pack, the only record of
        // how they were coded, would go. The read path's check, and the entry's profile.
        match self.store.packs().profile_of_pack(id, source.file()) {
            Ok(header_profile) if header_profile == profile => {}
            Ok(header_profile) => {
                log::error!(
                    "compaction: {} is of coding profile {header_profile}; the index has it of profile {profile}; not compacted: run `nacrithfs fsck --repair`",
                    path.display()
                );
                return Ok(false);
            }
            Err(e) => {
                log::error!(
                    "compaction: {}: {e}; its blobs stay where they are: run `nacrithfs fsck`",
                    path.display()
                );
                return Ok(false);
            }
        }
        // Every blob read and checked before any is copied: a damaged one keeps the
        // pack where it is with nothing appended (copying the good ones first left them
        // as dead bytes in the open pack, again at every pass). Copied once per blob,
        // whoever refers to it; a pack holds a few MiB.
        let cannot_copy = |slot: PackSlot, e: &std::io::Error| {
            log::error!(
                "compaction: the blob at {} of {} cannot be copied ({e}); the pack is kept",
                slot.offset,
                path.display()
            );
        };
        let mut blobs: Vec<(PackSlot, u64, u64, Vec<u8>)> = Vec::new();
        for (slot, ino, len) in refs {
            if blobs.last().is_some_and(|b| b.0 == slot) {
                continue;
            }
            let read = (|| -> std::io::Result<Vec<u8>> {
                use std::os::unix::fs::FileExt;
                // Packed blobs are at most PACK_MAX_BLOB (a damaged index says more).
                if len > pack::PACK_MAX_BLOB {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("the index says {len} bytes, more than a packed blob holds"),
                    ));
                }
                let mut bytes = vec![0u8; len as usize];
                source.file().read_exact_at(&mut bytes, slot.offset)?;
                // The compact header's checksum: a damaged blob is not spread further
                // (it stays where it is, for fsck to report).
                crate::codec::compact::parse(&bytes)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                Ok(bytes)
            })();
            match read {
                Ok(bytes) => blobs.push((slot, ino, len, bytes)),
                Err(e) => {
                    cannot_copy(slot, &e);
                    return Ok(false);
                }
            }
        }
        let mut moved: Vec<(PackSlot, PackSlot, u64)> = Vec::new();
        // The copies are pending until the batch that refers to them is committed.
        let mut pending = Vec::new();
        for (slot, ino, len, bytes) in blobs {
            let appended = self
                .store
                .packs()
                .append(profile, ino, &bytes, &|| self.store.new_pack(profile));
            match appended {
                Ok(to) => {
                    moved.push((slot, to.slot, len));
                    pending.push(to);
                }
                Err(e) => {
                    cannot_copy(slot, &e);
                    return Ok(false);
                }
            }
        }
        crate::crash::point("compact.after_copy");
        {
            let _st = self.lock();
            let mut txn = Txn::default();
            for (from, to, len) in &moved {
                // Who refers to it now (a file may have shared it since the listing).
                for ino in self.store.slot_refs(*from).map_err(store_err)? {
                    let mut inode = self.get(ino)?;
                    let Some(mut b) = inode.blob.filter(|b| b.pack == Some(*from)) else {
                        continue;
                    };
                    b.pack = Some(*to);
                    inode.blob = Some(b);
                    // (A content hint names the inode, so it follows the move.)
                    txn.put_inode(ino, &inode);
                }
                done.blobs_moved += 1;
                done.bytes_moved += len + RECORD_HEADER;
            }
            self.commit(txn, true)?;
        }
        drop(pending);
        crate::crash::point("compact.after_commit");
        if self.drop_pack(id)? {
            done.packs_compacted += 1;
            Ok(true)
        } else {
            log::warn!(
                "compaction: {} is still referenced after its blobs were moved; kept",
                pack::pack_name(id)
            );
            Ok(false)
        }
    }
}
