//! What the status and the compressor ask about the whole volume, kept in memory and
//! brought up to date by every commit (counted once when the store opens): totals over
//! the files, and the compression queue ordered by due time. A status read or a
//! "what is due next" is then O(1) or O(log n), never a scan of the index.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use super::record::{Inode, Kind};

/// Totals over every regular file.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub dirty: u64,
    /// Sum of the sizes of dirty files (what a flush has to compress).
    pub dirty_bytes: u64,
    /// Sum of file sizes.
    pub logical: u64,
    /// Bytes in the backing directory: blobs of compressed files, plaintext of dirty ones.
    pub stored: u64,
    /// Plaintext held in cache/ (dirty files and clean copies).
    pub cached: u64,
    /// What the stored forms occupy on the backing filesystem: each rounded up to its
    /// allocation unit (a 300-byte blob takes a 4 KiB block).
    pub stored_disk: u64,
    /// What the clean copies (plaintext of compressed files) occupy, likewise.
    pub clean_disk: u64,
}

/// What `st_blocks` and the status count for one inode: its blob once compressed, else
/// its plaintext (bytes, not rounded).
/// A group member counts its share of the group's blob (see [`super::BlobRef::share`]).
pub fn stored_size(inode: &Inode) -> u64 {
    match (inode.dirty, inode.blob) {
        (false, Some(b)) => b.share(inode.size),
        _ => inode.size,
    }
}

/// The backing filesystem's block size, set when a store opens (one backing directory
/// per daemon; 4 KiB until then, the default of ext4, xfs and btrfs).
static ALLOC_UNIT: AtomicU64 = AtomicU64::new(4096);

/// Record the backing filesystem's block size (kept to a power of two, 512 B-1 MiB).
pub fn set_alloc_unit(bytes: u64) {
    if bytes.is_power_of_two() && (512..=1 << 20).contains(&bytes) {
        ALLOC_UNIT.store(bytes, Ordering::Relaxed);
    }
}

/// Bytes a file of `len` bytes occupies on the backing filesystem: whole blocks (holes
/// and inline data aside).
pub fn on_disk(len: u64) -> u64 {
    let unit = ALLOC_UNIT.load(Ordering::Relaxed);
    len.div_ceil(unit).saturating_mul(unit)
}

/// What an inode's stored form occupies on the backing filesystem: a blob file or the
/// plaintext in whole blocks, a packed blob its bytes in its pack (record header
/// included).
pub fn stored_disk(inode: &Inode) -> u64 {
    match (inode.dirty, inode.blob) {
        // (Saturating: the values come from the index, which a damaged disk can hold.)
        (false, Some(b)) if b.pack.is_some() => match b.member {
            // Its share of the slot, record header included (by length).
            Some(m) if m.group_len > 0 => {
                let slot = b.stored_size.saturating_add(super::pack::RECORD_HEADER);
                ((slot as u128 * inode.size.min(m.group_len) as u128 / m.group_len as u128) as u64)
                    .max(1)
            }
            _ => b.stored_size.saturating_add(super::pack::RECORD_HEADER),
        },
        _ => on_disk(stored_size(inode)),
    }
}

impl Totals {
    pub fn of(i: &Inode) -> Totals {
        if i.kind != Kind::File {
            return Totals::default();
        }
        Totals {
            files: 1,
            dirty: u64::from(i.dirty),
            dirty_bytes: if i.dirty { i.size } else { 0 },
            logical: i.size,
            stored: stored_size(i),
            cached: if i.cached { i.size } else { 0 },
            // Packed blobs are counted with their packs, once each however many equal
            // files share one (a file's own share is its st_blocks: `stored_disk`).
            stored_disk: match (i.dirty, i.blob) {
                (false, Some(b)) if b.pack.is_some() => 0,
                _ => stored_disk(i),
            },
            // A dirty file's plaintext is its stored form, counted above.
            clean_disk: if i.cached && !i.dirty {
                on_disk(i.size)
            } else {
                0
            },
        }
    }

    fn add(&mut self, o: &Totals) {
        // Saturating, as `sub`: sizes come from index records.
        self.files = self.files.saturating_add(o.files);
        self.dirty = self.dirty.saturating_add(o.dirty);
        self.dirty_bytes = self.dirty_bytes.saturating_add(o.dirty_bytes);
        self.logical = self.logical.saturating_add(o.logical);
        self.stored = self.stored.saturating_add(o.stored);
        self.cached = self.cached.saturating_add(o.cached);
        self.stored_disk = self.stored_disk.saturating_add(o.stored_disk);
        self.clean_disk = self.clean_disk.saturating_add(o.clean_disk);
    }

    fn sub(&mut self, o: &Totals) {
        self.files = self.files.saturating_sub(o.files);
        self.dirty = self.dirty.saturating_sub(o.dirty);
        self.dirty_bytes = self.dirty_bytes.saturating_sub(o.dirty_bytes);
        self.logical = self.logical.saturating_sub(o.logical);
        self.stored = self.stored.saturating_sub(o.stored);
        self.cached = self.cached.saturating_sub(o.cached);
        self.stored_disk = self.stored_disk.saturating_sub(o.stored_disk);
        self.clean_disk = self.clean_disk.saturating_sub(o.clean_disk);
    }

    /// Replace `old`'s contribution with `new`'s.
    pub fn replace(&mut self, old: &Totals, new: &Totals) {
        self.sub(old);
        self.add(new);
    }
}

/// The in-memory tallies of one open store.
#[derive(Default)]
pub struct Tally {
    pub totals: Totals,
    by_due: BTreeSet<(u64, u64)>,
    due_of: HashMap<u64, u64>,
    /// Queue entries the compressors pass over for now (files waiting for an equal
    /// file's compression): kept out of `by_due`, so that the scan for the next due file
    /// does not walk thousands of them on every call, and kept right by `set_due`.
    parked: HashSet<u64>,
    /// Dirty regular files (what a flush queues), so a flush walks them, not the index.
    dirty: BTreeSet<u64>,
    /// What the count at open found for the mount's recovery, taken once: clean cached
    /// copies (ino, size) and inodes with no link left.
    pub clean_at_open: Vec<(u64, u64)>,
    pub unlinked_at_open: Vec<u64>,
}

impl Tally {
    /// Queue `ino` at `due` (None: off the queue).
    pub fn set_due(&mut self, ino: u64, due: Option<u64>) {
        if let Some(old) = self.due_of.remove(&ino) {
            self.by_due.remove(&(old, ino));
        }
        match due {
            Some(d) => {
                self.due_of.insert(ino, d);
                if !self.parked.contains(&ino) {
                    self.by_due.insert((d, ino));
                }
            }
            None => {
                self.parked.remove(&ino);
            }
        }
    }

    /// Keep queued `ino` out of [`Tally::in_due_order`] until [`Tally::unpark`].
    pub fn park(&mut self, ino: u64) {
        if let Some(&d) = self.due_of.get(&ino) {
            self.by_due.remove(&(d, ino));
            self.parked.insert(ino);
        }
    }

    pub fn unpark(&mut self, ino: u64) {
        if self.parked.remove(&ino) {
            if let Some(&d) = self.due_of.get(&ino) {
                self.by_due.insert((d, ino));
            }
        }
    }

    /// Record what `ino` counts as now (None: deleted).
    pub fn set_inode(&mut self, ino: u64, now: Option<&Totals>) {
        if now.is_some_and(|t| t.dirty > 0) {
            self.dirty.insert(ino);
        } else {
            self.dirty.remove(&ino);
        }
    }

    /// The dirty regular files, in inode order.
    pub fn dirty_files(&self) -> impl Iterator<Item = u64> + '_ {
        self.dirty.iter().copied()
    }

    /// When `ino` is due (None: not queued).
    pub fn due_of(&self, ino: u64) -> Option<u64> {
        self.due_of.get(&ino).copied()
    }

    pub fn queued(&self) -> usize {
        self.due_of.len()
    }

    /// Entries due at `now_ms` or before, parked ones included (walks only those and
    /// the parked).
    pub fn due(&self, now_ms: u64) -> usize {
        let parked = self
            .parked
            .iter()
            .filter(|ino| self.due_of.get(ino).is_some_and(|&d| d <= now_ms))
            .count();
        self.by_due.range(..=(now_ms, u64::MAX)).count() + parked
    }

    /// The queue in due order, from the earliest, parked entries left out.
    pub fn in_due_order(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.by_due.iter().map(|&(due, ino)| (ino, due))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_index_follows_every_change() {
        let mut t = Tally::default();
        t.set_due(5, Some(100));
        t.set_due(6, Some(50));
        t.set_due(5, Some(10));
        assert_eq!(t.queued(), 2);
        assert_eq!(t.in_due_order().collect::<Vec<_>>(), vec![(5, 10), (6, 50)]);
        assert_eq!(t.due(49), 1);
        t.set_due(5, None);
        assert_eq!(t.in_due_order().collect::<Vec<_>>(), vec![(6, 50)]);
        assert_eq!(t.due(1000), 1);
    }

    /// A parked entry stays queued and counted but out of the due order, follows the
    /// changes made to it meanwhile, and comes back in its place when unparked.
    #[test]
    fn a_parked_entry_is_passed_over_and_kept_right() {
        let mut t = Tally::default();
        for ino in 1..=1000 {
            t.set_due(ino, Some(10));
        }
        t.set_due(2000, Some(20));
        for ino in 1..=1000 {
            t.park(ino);
        }
        assert_eq!(t.in_due_order().collect::<Vec<_>>(), vec![(2000, 20)]);
        assert_eq!((t.queued(), t.due(15), t.due(25)), (1001, 1000, 1001));
        // Changed while parked: the new due time is kept, the entry stays parked.
        t.set_due(7, Some(5));
        assert_eq!(t.due_of(7), Some(5));
        assert_eq!(t.in_due_order().count(), 1);
        // Dequeued while parked: gone, and an unpark does not bring it back.
        t.set_due(8, None);
        t.unpark(8);
        assert_eq!(t.due_of(8), None);
        assert_eq!(t.queued(), 1000);
        t.unpark(7);
        t.unpark(9);
        assert_eq!(
            t.in_due_order().collect::<Vec<_>>(),
            vec![(7, 5), (9, 10), (2000, 20)]
        );
        // Parking what is not queued does nothing.
        t.park(4242);
        t.set_due(4242, Some(1));
        assert_eq!(t.in_due_order().next(), Some((4242, 1)));
    }
}
