//! `nacrithfs fsck`: check that the index, the blobs and the plaintext cache agree, and
//! with `repair` fix what can be fixed without losing data. Nothing is ever deleted that
//! could hold user data: unreferenced blobs and cache files move to `lost+found/` in the
//! backing directory, and inodes no directory names are linked into `/lost+found`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::record::{self, Inode, Kind};
use super::{
    dirent_key, ino_from, inode_key, queue_key, unix_ms, xattr_key, Result, Store, StoreError, Txn,
    META_KEYS, NEXT_BLOB_KEY, NEXT_INO_KEY, ROOT_INO,
};
use crate::codec::container::Header;
use crate::codec::source::{FileSource, Source};
use crate::codec::{self, DecompressOptions, Engine};
use crate::fs::acl;

/// Where repair puts files nothing refers to, inside the backing directory.
pub const LOST_FOUND: &str = "lost+found";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// A stable short name (orphan-blob, missing-blob, ...), for scripts and tests.
    pub code: &'static str,
    pub detail: String,
    /// What repair did, or None if it was not asked to or cannot fix this.
    pub repaired: Option<String>,
    /// Whether `--repair` knows a lossless fix.
    pub fixable: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub inodes: u64,
    pub files: u64,
    pub blobs_checked: u64,
    pub blobs_decoded: u64,
    /// Files in the graveyard: deleted or superseded, not yet removed because the daemon
    /// stopped first (a normal state after a crash; the next mount or `--repair` removes
    /// them). Not problems.
    pub awaiting_deletion: u64,
    /// Files whose blob is shared with an equal file (a hard link in the backing
    /// directory: deduplication). Not problems.
    pub shared_blobs: u64,
    /// Content hints naming a blob that is gone (its file deleted or rewritten since):
    /// harmless, `--repair` drops them.
    pub stale_hints: u64,
}

impl Report {
    pub fn unresolved(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.repaired.is_none())
            .count()
    }

    /// e2fsck's convention: 0 clean, 1 problems found and all repaired, 4 some remain.
    pub fn exit_code(&self) -> i32 {
        if self.findings.is_empty() {
            0
        } else if self.unresolved() == 0 {
            1
        } else {
            4
        }
    }
}

pub struct FsckOptions<'a> {
    pub repair: bool,
    /// Decode LLM blobs completely (needs the model); zstd-only blobs are always decoded.
    pub engine: Option<&'a dyn Engine>,
}

struct Checker<'a> {
    store: &'a Store,
    opts: FsckOptions<'a>,
    report: Report,
    txn: Txn,
    /// Unusable blobs the repaired index no longer refers to.
    rescue_after_commit: Vec<PathBuf>,
    /// The groups decoded last (deep check): slot -> the group's plaintext or why it
    /// did not decode, so that a group is decoded once for its members, not once each.
    groups: Vec<(super::PackSlot, Decoded)>,
}

/// A group's plaintext, or why it did not decode.
type Decoded = std::sync::Arc<std::result::Result<Vec<u8>, String>>;

/// Groups kept decoded by a deep check (each at most `MAX_GROUP` bytes).
const GROUPS_KEPT: usize = 64;

impl Checker<'_> {
    fn found(&mut self, code: &'static str, detail: String, fix: Option<String>) {
        let fixable = fix.is_some();
        let repaired = fix.filter(|_| self.opts.repair);
        self.report.findings.push(Finding {
            code,
            detail,
            repaired,
            fixable,
        });
    }

    /// Move an unreferenced file out of the store's way (repair only).
    fn rescue(&self, path: &Path) -> Result<String> {
        let target = super::rescue(self.store.backing(), path)?;
        Ok(format!("moved to {}", target.display()))
    }
}

/// Check (and optionally repair) an unmounted backing directory.
pub fn fsck(backing: &Path, opts: FsckOptions<'_>) -> Result<Report> {
    // A check changes nothing in the backing directory: it reads a private copy of the
    // index (as a read-only mount does), so an old volume is not moved to the current
    // format, nor the index rebuilt or its journal replayed in place.
    let store = if opts.repair {
        let store = Store::open_existing(backing)?;
        // Before any change: a crash of this repair must not leave the next mount
        // trusting a clean-stop record (it would skip the sweep of what the repair
        // left half-done); that mount scans the backing files instead.
        store.take_clean_stop()?;
        store
    } else {
        Store::open_existing_for_check(backing)?
    };
    let mut c = Checker {
        store: &store,
        opts,
        report: Report::default(),
        txn: Txn::default(),
        rescue_after_commit: Vec::new(),
        groups: Vec::new(),
    };
    check_key_shapes(&mut c)?;
    check_profiles(&mut c)?;
    let mut inodes = read_inodes(&mut c)?;
    let names = check_dirents(&mut c, &inodes)?;
    let cookies = check_cookies(&mut c, &inodes, &names)?;
    check_links(&mut c, &mut inodes, &names)?;
    check_dir_up_entries(&mut c, &inodes, &names, &cookies)?;
    let mut referenced = check_files(&mut c, &inodes)?;
    check_queue_and_xattrs(&mut c, &inodes)?;
    check_counters(&mut c, &inodes)?;
    check_content_hints(&mut c)?;
    let graves = graveyard(&mut c, &referenced)?;
    let txn = std::mem::take(&mut c.txn);
    if c.opts.repair {
        store.commit(txn, true)?;
        crate::crash::point("fsck.after_commit");
        for path in std::mem::take(&mut c.rescue_after_commit) {
            c.rescue(&path)?;
        }
        reap(&c, &graves, &referenced)?;
    }
    // Pack references and counts, from the inode records as they are now (repaired).
    let packs = check_packs(&mut c)?;
    if c.opts.repair {
        let txn = std::mem::take(&mut c.txn);
        store.commit(txn, true)?;
    }
    referenced.extend(packs);
    // Files are moved only after the index no longer needs them; graveyard files are
    // accounted for (and gone after a repair).
    referenced.extend(graves.into_iter().map(|(_, _, p)| p));
    check_directories(&mut c, &referenced)?;
    check_modes(&mut c)?;
    Ok(c.report)
}

/// Nothing in the backing directory is open to other users (store/perms.rs).
fn check_modes(c: &mut Checker) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for m in super::perms::loose_modes(c.store.backing())? {
        c.found(
            "loose-mode",
            format!(
                "{} is mode {:o}: other users can read the archive through it",
                m.path.display(),
                m.mode
            ),
            Some("chmod 700".into()),
        );
        if c.opts.repair {
            std::fs::set_permissions(
                &m.path,
                std::fs::Permissions::from_mode(super::perms::DIR_MODE),
            )?;
        }
    }
    Ok(())
}

/// The graveyard's entries: inode, tag, and the path of the file the entry names.
type Graves = Vec<(u64, u64, PathBuf)>;

fn graveyard(c: &mut Checker, referenced: &HashSet<PathBuf>) -> Result<Graves> {
    let mut graves = Vec::new();
    for (ino, tag) in c.store.graveyard()? {
        let path = c.store.grave_path(ino, tag);
        if !referenced.contains(&path) && path.exists() {
            c.report.awaiting_deletion += 1;
        }
        graves.push((ino, tag, path));
    }
    Ok(graves)
}

/// Packed blobs: every reference key ('R') matches an inode record that names that
/// slot, and each pack's live counts ('k') are what those references add up to; every
/// pack has its entry and a known profile. Returns the pack files the index knows.
fn check_packs(c: &mut Checker) -> Result<HashSet<PathBuf>> {
    use super::pack::{PackInfo, RECORD_HEADER};
    use super::PackSlot;
    use std::collections::BTreeMap;
    let mut expected: BTreeMap<(PackSlot, u64), u64> = BTreeMap::new();
    for r in c.store.inodes() {
        let (ino, i) = r?;
        if let Some(b) = i.blob {
            if let Some(slot) = b.pack {
                expected.insert((slot, ino), b.stored_size);
            }
        }
    }
    let mut found: BTreeMap<(PackSlot, u64), Option<u64>> = BTreeMap::new();
    for r in c.store.all_refs() {
        let (slot, ino, len) = r?;
        found.insert((slot, ino), len);
    }
    for (&(slot, ino), &len) in &expected {
        if found.get(&(slot, ino)) != Some(&Some(len)) {
            c.found(
                "missing-ref",
                format!(
                    "inode {ino}'s packed blob ({} at {}) has no reference entry",
                    super::pack::pack_name(slot.pack),
                    slot.offset
                ),
                Some("added".into()),
            );
            c.txn
                .batch
                .insert(super::ref_key(slot, ino), len.to_le_bytes());
        }
    }
    for &(slot, ino) in found.keys() {
        if !expected.contains_key(&(slot, ino)) {
            c.found(
                "stale-ref",
                format!(
                    "a reference entry says inode {ino} uses the blob at {} of {}; it does not",
                    slot.offset,
                    super::pack::pack_name(slot.pack)
                ),
                Some("removed".into()),
            );
            c.txn.batch.remove(super::ref_key(slot, ino));
        }
    }
    // What each pack's counts must be: distinct referenced slots.
    let mut live: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut last = None;
    for (&(slot, _), &len) in &expected {
        if last != Some(slot) {
            let e = live.entry(slot.pack).or_default();
            e.0 += len + RECORD_HEADER;
            e.1 += 1;
            last = Some(slot);
        }
    }
    let mut known = HashSet::new();
    let mut reported = HashSet::new();
    let infos: BTreeMap<u64, Option<PackInfo>> = c.store.pack_infos()?.into_iter().collect();
    for (&id, info) in &infos {
        let path = c.store.packs().path(id);
        let (bytes, blobs) = live.get(&id).copied().unwrap_or_default();
        let Some(info) = info else {
            continue; // check_key_shapes reported it
        };
        let mut fixed = *info;
        // The entry's profile is the one compaction appends the pack's blobs under: one
        // that differs from the header's (which the blobs were coded with) would move
        // them into a pack of another profile, undecodable there.
        let header = FileSource::open(&path)
            .ok()
            .and_then(|f| super::pack::read_header(&f).ok());
        if let Some((hid, ..)) = header.as_ref().filter(|(hid, ..)| *hid != id) {
            // A pack file under another pack's name: reads and compaction refuse it;
            // which of the two is right is not fsck's to guess.
            c.found(
                "pack-id",
                format!("{} says it is pack {hid}", path.display()),
                None,
            );
        }
        let header = header.filter(|(hid, ..)| *hid == id);
        if let Some((_, pid, profile, _)) = &header {
            if c.store.packs().profile(*pid).is_some_and(|p| p != *profile) {
                // The header is checksummed and is how the blobs were coded; the index's
                // copy of the profile may be the damaged one, or the header may be a
                // pack of another volume: reads and compaction refuse the pack.
                c.found(
                    "profile-contents",
                    format!(
                        "{} carries coding profile {pid} with other contents than the index's",
                        path.display()
                    ),
                    None,
                );
            }
        }
        if let Some((_, profile, ..)) = header.filter(|h| h.1 != info.profile) {
            c.found(
                "pack-profile",
                format!(
                    "{} is entered with coding profile {}; its header says {profile}",
                    path.display(),
                    info.profile
                ),
                Some("entry set to the header's profile".into()),
            );
            fixed.profile = profile;
        }
        if c.store.packs().profile(fixed.profile).is_none() && reported.insert(fixed.profile) {
            // (check_profiles restored every profile a readable pack header carries.)
            c.found(
                "unknown-profile",
                format!(
                    "{} holds coding profile {}, which the index does not have",
                    path.display(),
                    fixed.profile
                ),
                None,
            );
        }
        if !path.exists() {
            if blobs == 0 {
                c.found(
                    "stale-pack",
                    format!(
                        "the index knows {}, which is gone and was empty",
                        path.display()
                    ),
                    Some("entry removed".into()),
                );
                c.txn.batch.remove(super::pack_key(id));
            }
            // else: each file in it was reported as a missing blob.
            continue;
        }
        known.insert(path.clone());
        if (info.live_bytes, info.live_blobs) != (bytes, blobs) {
            c.found(
                "pack-count",
                format!(
                    "{} is counted as {} live blobs of {} bytes; its references add up to {blobs} of {bytes}",
                    path.display(),
                    info.live_blobs,
                    info.live_bytes
                ),
                Some("recounted".into()),
            );
            fixed.live_bytes = bytes;
            fixed.live_blobs = blobs;
        }
        if fixed != *info {
            c.txn.batch.insert(super::pack_key(id), fixed.encode());
        }
    }
    for (&id, &(bytes, blobs)) in &live {
        if infos.contains_key(&id) {
            continue;
        }
        let path = c.store.packs().path(id);
        let header = FileSource::open(&path)
            .ok()
            .and_then(|f| super::pack::read_header(&f).ok());
        let fix = header.as_ref().map(|(_, profile, _, _)| {
            c.txn.batch.insert(
                super::pack_key(id),
                PackInfo {
                    profile: *profile,
                    live_bytes: bytes,
                    live_blobs: blobs,
                }
                .encode(),
            );
            "entry added from the pack's header".to_string()
        });
        if fix.is_some() {
            known.insert(path.clone());
        }
        c.found(
            "missing-pack-entry",
            format!(
                "{} is referenced but the index has no entry for it",
                path.display()
            ),
            fix,
        );
    }
    Ok(known)
}

/// Repair's version of the daemon's reaper (the index that stopped needing these
/// files is durable, since before the crash): delete the files nothing refers to, then
/// drop the entries, durably.
fn reap(c: &Checker, graves: &Graves, referenced: &HashSet<PathBuf>) -> Result<()> {
    // Inode and blob numbers are never reused: a path no inode refers to now never
    // will be again. The repaired index is re-read, so a file fsck just gave back to
    // an inode is kept.
    let mut txn = Txn::default();
    for (ino, tag, path) in graves {
        let in_use = match c.store.get(*ino)? {
            // A pack an inode record points into is kept even if its reference keys
            // are gone (check_packs, after this, puts them back).
            None if *ino == super::PACK_GRAVE => {
                !c.store.pack_refs(*tag)?.is_empty() || referenced.contains(path)
            }
            None => false,
            Some(i) => *tag == super::GRAVE_CACHE || i.blob.is_some_and(|b| b.seq == *tag),
        };
        if !in_use {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        txn.unbury(*ino, *tag);
    }
    crate::crash::point("fsck.after_graves");
    c.store.commit(txn, true)
}

/// Per (directory, name) of a subdirectory: the readdir cookie the name has once the
/// repair is committed, and whether it is new (given by this check). Only
/// subdirectories' names: their up entries are checked (a million files' names would be
/// a second copy of `Names` in memory for nothing).
type FinalCookies = HashMap<(u64, Vec<u8>), (u64, bool)>;

/// Every entry's readdir cookie has its `c` key (else readdir would never list it),
/// and every `c` key names an entry that has that cookie. Returns the cookies as the
/// repair leaves them.
fn check_cookies(
    c: &mut Checker,
    inodes: &HashMap<u64, Inode>,
    names: &Names,
) -> Result<FinalCookies> {
    let mut finals = FinalCookies::new();
    if !c.store.cookies {
        return Ok(finals);
    }
    let kept: HashSet<(u64, &[u8])> = names
        .values()
        .flatten()
        .map(|(p, n)| (*p, n.as_slice()))
        .collect();
    let mut max_cookie = 0;
    let mut by_cookie: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for r in c.store.db.scan_prefix(b"c") {
        let (k, v) = r?;
        match (ino_from(&k), super::second_u64(&k)) {
            (Some(parent), Some(cookie)) if k.len() == 17 => {
                by_cookie.insert((parent, cookie), v.to_vec());
            }
            _ => {
                c.found(
                    "bad-cookie",
                    format!("readdir cookie key {k:?} cannot be decoded"),
                    Some("removed".into()),
                );
                c.txn.batch.remove(k);
            }
        }
    }
    let mut sorted: Vec<&(u64, &[u8])> = kept.iter().collect();
    sorted.sort();
    let mut expected: HashSet<(u64, u64)> = HashSet::new();
    for &&(parent, name) in &sorted {
        let shown = format!("{:?} in directory {parent}", String::from_utf8_lossy(name));
        let raw = c.store.db.get(dirent_key(parent, name))?;
        // The entry as it will be once this repair is committed: check_dirents may
        // have rewritten its kind to its inode's (and with it the cookie key).
        let stored = raw.as_deref().and_then(record::decode_dirent_full);
        let dirent =
            stored.map(|(ino, kind, ck)| (ino, inodes.get(&ino).map_or(kind, |i| i.kind), ck));
        let cookie = dirent.and_then(|(_, _, ck)| ck);
        let subdir =
            dirent.is_some_and(|(ino, _, _)| inodes.get(&ino).is_some_and(|i| i.kind == Kind::Dir));
        // The cookie key's value names this entry, and (layout 4) carries its child and
        // kind as they are in the entry: as stored (a wrong kind there is the entry's
        // fault, reported by check_dirents, whose repair rewrites both keys) or as the
        // repair leaves it.
        let matches = |v: &Vec<u8>| match record::decode_cookie(v) {
            Some((ino, kind, n)) => {
                let agrees = |e: Option<(u64, Kind, Option<u64>)>| {
                    e.is_some_and(|(i, k, _)| i == ino && k == kind)
                };
                n == name && (agrees(dirent) || agrees(stored))
            }
            None => false,
        };
        match cookie {
            Some(ck) if by_cookie.get(&(parent, ck)).is_some_and(matches) => {
                max_cookie = max_cookie.max(ck);
                expected.insert((parent, ck));
                if subdir {
                    finals.insert((parent, name.to_vec()), (ck, false));
                }
            }
            Some(ck) => {
                max_cookie = max_cookie.max(ck);
                expected.insert((parent, ck));
                if subdir {
                    finals.insert((parent, name.to_vec()), (ck, false));
                }
                let why = if by_cookie.contains_key(&(parent, ck)) {
                    "a cookie key that does not match it (readdir lists it wrong)"
                } else {
                    "no cookie key (readdir skips it)"
                };
                c.found(
                    "missing-cookie",
                    format!("entry {shown} has readdir cookie {ck} but {why}"),
                    Some("rewrote the cookie key".into()),
                );
                if let Some((ino, kind, _)) = dirent {
                    c.txn.batch.insert(
                        super::cookie_key(parent, ck),
                        record::encode_cookie(ino, kind, name),
                    );
                }
            }
            None => {
                c.found(
                    "missing-cookie",
                    format!("entry {shown} has no readdir cookie (readdir skips it)"),
                    Some("gave it a new cookie".into()),
                );
                if let Some((ino, kind, _)) = raw.as_deref().and_then(record::decode_dirent_full) {
                    let ck = c.store.alloc_cookie(&mut c.txn);
                    c.txn.put_dirent(parent, name, ino, kind, ck);
                    expected.insert((parent, ck));
                    if subdir {
                        finals.insert((parent, name.to_vec()), (ck, true));
                    }
                }
            }
        }
    }
    let mut stale: Vec<_> = by_cookie
        .keys()
        .filter(|k| !expected.contains(k))
        .copied()
        .collect();
    stale.sort();
    for (parent, ck) in stale {
        c.found(
            "stale-cookie",
            format!("readdir cookie {ck} in directory {parent} names no entry that has it"),
            Some("removed".into()),
        );
        c.txn.batch.remove(super::cookie_key(parent, ck));
    }
    let next = c
        .store
        .next_cookie
        .load(std::sync::atomic::Ordering::SeqCst);
    if next <= max_cookie {
        c.found(
            "counter",
            format!("next readdir cookie {next} is already in use (highest {max_cookie})"),
            Some(format!("set to {}", max_cookie + 1)),
        );
        c.txn
            .batch
            .insert(super::NEXT_COOKIE_KEY, (max_cookie + 1).to_le_bytes());
        c.store
            .next_cookie
            .store(max_cookie + 1, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(finals)
}

/// Every key has a shape this index writes: a malformed key of a known kind (a wrong
/// length, an empty name, an unknown counter, a queue entry without its due time) is
/// garbage no reader uses, removed by --repair; a key of an unknown kind is reported and
/// left alone. (Readdir cookie keys are checked with the cookies.)
fn check_key_shapes(c: &mut Checker) -> Result<()> {
    // One pass over the index, holding only the bad keys' findings.
    let store = c.store;
    for r in store.db.iter() {
        let (k, v) = r?;
        let ok = match k.first() {
            Some(b'i') => k.len() == 9,
            // Parent entries until layout 7 (which removes the last before it is
            // written), up entries since (and in an index on its way to it).
            Some(b'p') => k.len() == 9 && store.layout < super::LAYOUT_UP_ENTRIES,
            Some(b'u') => k.len() == 9 && record::decode_up(&v).is_some(),
            Some(b'q') => k.len() == 9 && v.len() == 8,
            Some(b'g') => k.len() == 17,
            Some(b'h') => store.content_hint_well_formed(&k, &v),
            Some(b'd' | b'x') => k.len() > 9,
            // (An undecodable profile is restored from a pack header that has it,
            // after the removal: see check_packs.)
            Some(b'P') => k.len() == 5 && crate::codec::compact::Profile::decode(&v).is_ok(),
            Some(b'k') => k.len() == 9 && super::PackInfo::decode(&v).is_some(),
            Some(b'R') => k.len() == 25 && v.len() == 8,
            Some(b'c') => continue,
            Some(b'm') => META_KEYS.contains(&&k[..]),
            _ => {
                c.found(
                    "unknown-key",
                    format!("index key {k:?} is of no kind this version writes"),
                    None,
                );
                continue;
            }
        };
        if !ok {
            c.found(
                "bad-key",
                format!("index key {k:?} ({} bytes of value) is malformed", v.len()),
                Some("removed".into()),
            );
            c.txn.batch.remove(k);
        }
    }
    Ok(())
}

/// A pack whose coding profile the index lacks (its key lost, or its value undecodable
/// and removed above): each pack's header carries its profile whole (checksummed), so
/// the index's copy comes back from it. Done before the blobs are checked, so that they
/// are read with it (in memory for a check; in the first batch for a repair).
fn check_profiles(c: &mut Checker) -> Result<()> {
    let mut restored = HashSet::new();
    for (id, info) in c.store.pack_infos()? {
        if info.is_none() {
            continue; // check_key_shapes reported it
        }
        // The header's profile, whatever the entry names (check_packs sets an entry
        // that names another profile from the header; restored here, one --repair
        // does both).
        let path = c.store.packs().path(id);
        let header = FileSource::open(&path)
            .ok()
            .and_then(|f| super::pack::read_header(&f).ok())
            .filter(|(hid, ..)| *hid == id);
        let Some((_, pid, profile, _)) = header else {
            continue; // check_packs reports it
        };
        if restored.contains(&pid) || c.store.packs().profile(pid).is_some() {
            continue;
        }
        c.txn
            .batch
            .insert(super::profile_key(pid), profile.encode());
        c.store.packs().learn_profile(pid, profile);
        restored.insert(pid);
        c.found(
            "unknown-profile",
            format!(
                "{} holds coding profile {pid}, which the index does not have",
                path.display()
            ),
            Some("restored from the pack's header".into()),
        );
    }
    Ok(())
}

fn read_inodes(c: &mut Checker) -> Result<HashMap<u64, Inode>> {
    let mut inodes = HashMap::new();
    let mut bad = Vec::new();
    for r in c.store.db.scan_prefix(b"i") {
        let (k, v) = r?;
        if k.len() != 9 {
            continue; // a bad-key
        }
        match (ino_from(&k), Inode::decode(&v)) {
            (Some(ino), Ok(i)) => {
                inodes.insert(ino, i);
            }
            (ino, Err(why)) => bad.push((ino, why)),
            (None, Ok(_)) => bad.push((None, "short key".into())),
        }
    }
    for (ino, why) in bad {
        let what = ino.map_or("an inode record".to_string(), |i| format!("inode {i}"));
        c.found(
            "bad-inode-record",
            format!("{what} cannot be decoded: {why}"),
            None,
        );
    }
    c.report.inodes = inodes.len() as u64;
    match inodes.get(&ROOT_INO) {
        Some(r) if r.kind == Kind::Dir => {}
        Some(_) => c.found("bad-root", "the root inode is not a directory".into(), None),
        None => c.found("bad-root", "the root inode is missing".into(), None),
    }
    Ok(inodes)
}

/// Per inode, the (parent directory, name) pairs that name it.
type Names = HashMap<u64, Vec<(u64, Vec<u8>)>>;

/// Every dirent points at a live inode of the kind it says, under a directory.
/// Returns, per inode, the (parent, name) pairs that name it.
fn check_dirents(c: &mut Checker, inodes: &HashMap<u64, Inode>) -> Result<Names> {
    let mut names = Names::new();
    let entries: Vec<_> = c
        .store
        .db
        .scan_prefix(b"d")
        .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
        .collect::<std::result::Result<_, _>>()?;
    for (k, v) in entries {
        let parent = ino_from(&k).unwrap_or(0);
        let name = k.get(9..).unwrap_or(&[]).to_vec();
        let shown = format!("{:?} in directory {parent}", String::from_utf8_lossy(&name));
        let Some((child, kind)) = record::decode_dirent(&v) else {
            c.found(
                "bad-dirent",
                format!("entry {shown} cannot be decoded"),
                Some("removed the entry".into()),
            );
            c.txn.batch.remove(k);
            continue;
        };
        if !inodes.get(&parent).is_some_and(|p| p.kind == Kind::Dir) {
            c.found(
                "dangling-dirent",
                format!("entry {shown}: the directory does not exist"),
                Some("removed the entry".into()),
            );
            c.txn.batch.remove(k);
            continue;
        }
        let Some(target) = inodes.get(&child) else {
            c.found(
                "dangling-dirent",
                format!("entry {shown} points at inode {child}, which does not exist"),
                Some("removed the entry".into()),
            );
            c.txn.batch.remove(k);
            continue;
        };
        if target.kind != kind {
            c.found(
                "dirent-kind",
                format!(
                    "entry {shown} says {kind:?} but inode {child} is {:?}",
                    target.kind
                ),
                Some("rewrote the entry's kind".into()),
            );
            c.store
                .put_name(&mut c.txn, parent, &name, child, target.kind)?;
        }
        names.entry(child).or_default().push((parent, name));
    }
    Ok(names)
}

/// A directory's up entry names it (its parent and the readdir cookie of its name): a
/// lookup of `..` goes through it (`Core::parent_dir`). One missing, or naming something
/// else (say, moved from a malformed layout-6 parent entry), is rewritten from the
/// directory's name and the cookie that name has once this repair is committed
/// (`cookies`, from check_cookies). A name given a new cookie by check_cookies had its up
/// entry rewritten there (one defect, one finding). Files' up entries only name them in
/// log lines, and one left stale by a removed hard link is expected: not checked.
fn check_dir_up_entries(
    c: &mut Checker,
    inodes: &HashMap<u64, Inode>,
    names: &Names,
    cookies: &FinalCookies,
) -> Result<()> {
    if c.store.layout < super::LAYOUT_UP_ENTRIES {
        return Ok(());
    }
    let mut dirs: Vec<_> = names
        .iter()
        .filter(|(ino, _)| inodes.get(ino).is_some_and(|i| i.kind == Kind::Dir))
        .collect();
    dirs.sort_by_key(|(ino, _)| **ino);
    for (&ino, ns) in dirs {
        let up = c
            .store
            .db
            .get(super::up_key(ino))?
            .as_deref()
            .and_then(record::decode_up);
        let finals: Vec<_> = ns
            .iter()
            .filter_map(|(p, n)| cookies.get(&(*p, n.clone())).map(|f| (*p, n, *f)))
            .collect();
        if finals
            .iter()
            .any(|(p, _, (ck, fresh))| *fresh || up == Some((*p, *ck)))
        {
            continue;
        }
        let Some((parent, name, (cookie, _))) = finals.first() else {
            continue;
        };
        c.found(
            "stale-up",
            format!(
                "directory {ino} ({:?} in directory {parent}) has no up entry naming it (its `..` fails)",
                String::from_utf8_lossy(name)
            ),
            Some("rewritten".into()),
        );
        c.txn
            .batch
            .insert(super::up_key(ino), record::encode_up(*parent, *cookie));
    }
    Ok(())
}

/// Link counts match the names; live inodes nothing names go to /lost+found.
/// The link counts fixed are also set in `inodes`, so that a later check that fixes the
/// same record (check_files) writes both fixes: a batch keeps the last write of a key.
fn check_links(c: &mut Checker, inodes: &mut HashMap<u64, Inode>, names: &Names) -> Result<()> {
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    for (ino, ns) in names {
        if inodes.get(ino).is_some_and(|i| i.kind == Kind::Dir) {
            for (parent, _) in ns {
                *subdirs.entry(*parent).or_default() += 1;
            }
        }
    }
    // /lost+found is made (when a repair needs it) before any count is checked, so that
    // the root's count includes it.
    let orphan = |ino: u64, i: &Inode| {
        ino != ROOT_INO && i.nlink != 0 && names.get(&ino).is_none_or(|v| v.is_empty())
    };
    let mut lost_found: Option<u64> = None;
    let mut made_lost_found = false;
    if c.opts.repair && inodes.iter().any(|(&ino, i)| orphan(ino, i)) {
        let (lf, made) = lost_found_inode(c)?;
        lost_found = Some(lf);
        if made {
            *subdirs.entry(ROOT_INO).or_default() += 1;
            made_lost_found = true;
        }
    }
    let mut fixes: Vec<(u64, Inode)> = Vec::new();
    let mut sorted: Vec<_> = inodes.iter().collect();
    sorted.sort_by_key(|(ino, _)| **ino);
    for (&ino, inode) in sorted {
        let named = names.get(&ino).map_or(0, |v| v.len() as u32);
        if ino != ROOT_INO && named == 0 {
            if !orphan(ino, inode) {
                // Unlinked while open when the daemon stopped: the next mount deletes it.
                continue;
            }
            let fix = format!("linked as /{LOST_FOUND}/#{ino}");
            c.found(
                "orphan-inode",
                format!(
                    "inode {ino} ({:?}, {} bytes) has no name",
                    inode.kind, inode.size
                ),
                Some(fix),
            );
            if let Some(lf) = lost_found {
                let mut fixed = inode.clone();
                fixed.nlink = if inode.kind == Kind::Dir {
                    2 + subdirs.get(&ino).copied().unwrap_or(0)
                } else {
                    1
                };
                fixes.push((ino, fixed));
                c.store.put_name(
                    &mut c.txn,
                    lf,
                    format!("#{ino}").as_bytes(),
                    ino,
                    inode.kind,
                )?;
                if inode.kind == Kind::Dir {
                    *subdirs.entry(lf).or_default() += 1;
                }
            }
            continue;
        }
        let want = if inode.kind == Kind::Dir {
            2 + subdirs.get(&ino).copied().unwrap_or(0)
        } else {
            named
        };
        // The root's count was right if only the /lost+found made just now is missing.
        let was_right = ino == ROOT_INO && made_lost_found && inode.nlink + 1 == want;
        if inode.nlink != want && was_right {
            let mut fixed = inode.clone();
            fixed.nlink = want;
            fixes.push((ino, fixed));
        } else if inode.nlink != want && Some(ino) != lost_found {
            c.found(
                "link-count",
                format!(
                    "inode {ino} has link count {} but {want} names",
                    inode.nlink
                ),
                Some(format!("set to {want}")),
            );
            let mut fixed = inode.clone();
            fixed.nlink = want;
            fixes.push((ino, fixed));
        }
    }
    for (ino, fixed) in fixes {
        c.txn.put_inode(ino, &fixed);
        inodes.insert(ino, fixed);
    }
    if let Some(lf) = lost_found {
        // Its own record was written by lost_found_inode; fix its count for what moved in.
        if let Some(mut i) = c.store.get(lf)? {
            i.nlink = 2 + subdirs.get(&lf).copied().unwrap_or(0);
            c.txn.put_inode(lf, &i);
        }
    }
    Ok(())
}

/// The inode of /lost+found, and whether it was made (committed) just now. The root's
/// link count is the caller's to fix, with the rest of the repair.
fn lost_found_inode(c: &mut Checker) -> Result<(u64, bool)> {
    if let Some((ino, Kind::Dir)) = c.store.lookup(ROOT_INO, LOST_FOUND.as_bytes())? {
        return Ok((ino, false));
    }
    let mut txn = Txn::default();
    let ino = c.store.alloc_ino(&mut txn);
    let dir = Inode::new(Kind::Dir, 0o700, 0, 0, SystemTime::now());
    txn.put_inode(ino, &dir);
    c.store
        .put_name(&mut txn, ROOT_INO, LOST_FOUND.as_bytes(), ino, Kind::Dir)?;
    c.store.commit(txn, true)?;
    Ok((ino, true))
}

/// Each regular file has its content somewhere, and what it names is sound.
/// Returns the blob and cache files the index refers to.
fn check_files(c: &mut Checker, inodes: &HashMap<u64, Inode>) -> Result<HashSet<PathBuf>> {
    let mut referenced = HashSet::new();
    let queued: HashSet<u64> = c.store.queue()?.into_iter().map(|(i, _)| i).collect();
    let mut sorted: Vec<_> = inodes
        .iter()
        .filter(|(_, i)| i.kind == Kind::File)
        .collect();
    sorted.sort_by_key(|(ino, _)| **ino);
    for (&ino, inode) in sorted {
        c.report.files += 1;
        let mut fixed = inode.clone();
        let cache = c.store.cache_path(ino);
        let cache_len = std::fs::metadata(&cache).ok().map(|m| m.len());
        let plaintext_ok = inode.cached && cache_len == Some(inode.size);
        if inode.cached && cache_len.is_some() {
            referenced.insert(cache.clone());
        }
        let mut blob_ok = false;
        let mut blob_reported = false;
        if let Some(b) = inode.blob {
            let path = match b.pack {
                Some(slot) => c.store.packs().path(slot.pack),
                None => c.store.blob_path(ino, b.seq),
            };
            match check_blob(c, ino, inode, &b) {
                None => {
                    blob_ok = true;
                    use std::os::unix::fs::MetadataExt;
                    let shared = match b.pack {
                        // (Members of one group share the slot, not their content.)
                        Some(slot) => c
                            .store
                            .slot_refs(slot)?
                            .iter()
                            .filter(|&&other| other != ino)
                            .any(|other| {
                                inodes
                                    .get(other)
                                    .and_then(|i| i.blob)
                                    .is_some_and(|o| o.member == b.member)
                            }),
                        None => std::fs::metadata(&path).is_ok_and(|m| m.nlink() > 1),
                    };
                    if shared {
                        c.report.shared_blobs += 1;
                    }
                    referenced.insert(path);
                }
                Some((code, why)) => {
                    blob_reported = true;
                    let detail =
                        format!("inode {ino}: blob {} {why}", c.store.blob_display(ino, &b));
                    // The blob is unusable; what repair can do depends on the plaintext.
                    let fix = if inode.dirty && inode.cached && cache_len.is_some() {
                        Some("dropped it: the plaintext is newer".to_string())
                    } else if plaintext_ok {
                        Some(
                            "its plaintext copy is intact: marked dirty and queued for \
                             compression; the blob goes to lost+found"
                                .to_string(),
                        )
                    } else {
                        None
                    };
                    if fix.is_some() {
                        fixed.blob = None;
                        fixed.dirty = true;
                        if !queued.contains(&ino) {
                            c.txn.enqueue(ino, unix_ms(SystemTime::now()));
                        }
                        // A pack holds other files' blobs: only the reference goes.
                        if c.opts.repair && path.exists() && b.pack.is_none() {
                            c.rescue_after_commit.push(path.clone());
                        }
                    }
                    // Reported here, not again as an orphan. Without a fix it stays
                    // referenced: nothing better exists (reads give EIO).
                    referenced.insert(path);
                    let detail = if fix.is_some() {
                        detail
                    } else {
                        format!("{detail}; there is no plaintext copy: the content is lost")
                    };
                    c.found(code, detail, fix);
                }
            }
        }
        if inode.cached {
            match (cache_len, inode.dirty) {
                (Some(len), true) if len != inode.size => {
                    c.found(
                        "size-mismatch",
                        format!(
                            "inode {ino}: the index says {} bytes, its plaintext has {len}",
                            inode.size
                        ),
                        Some(format!("size set to {len} (the plaintext is the truth)")),
                    );
                    fixed.size = len;
                }
                (Some(len), false) if len != inode.size => {
                    let fix = blob_ok.then(|| "dropped the stale plaintext copy".to_string());
                    c.found(
                        "stale-cache",
                        format!(
                            "inode {ino}: its clean plaintext copy has {len} bytes, not {}",
                            inode.size
                        ),
                        fix.clone(),
                    );
                    if fix.is_some() {
                        fixed.cached = false;
                        referenced.remove(&cache);
                    }
                }
                (None, false) if blob_ok => {
                    c.found(
                        "missing-cache",
                        format!("inode {ino}: marked cached but its plaintext copy is gone"),
                        Some("marked not cached (the blob has the content)".into()),
                    );
                    fixed.cached = false;
                }
                (None, _) if !blob_reported => c.found(
                    "lost-content",
                    format!(
                        "inode {ino}: its plaintext {} is missing and there is no good blob: \
                         the content is lost",
                        cache.display()
                    ),
                    None,
                ),
                _ => {}
            }
        } else if inode.blob.is_none() {
            c.found(
                "lost-content",
                format!("inode {ino}: no plaintext copy and no blob: the content is lost"),
                None,
            );
        }
        if fixed.dirty && !queued.contains(&ino) && !(blob_reported && fixed.blob.is_none()) {
            c.found(
                "not-queued",
                format!("inode {ino} has uncompressed changes but is not queued"),
                Some("queued for compression".into()),
            );
            c.txn.enqueue(ino, unix_ms(SystemTime::now()));
        }
        if fixed != *inode {
            c.txn.put_inode(ino, &fixed);
        }
    }
    Ok(referenced)
}

/// None if the blob exists, has the recorded size, a sound header for this file's size,
/// and (zstd-only, or with an engine) decodes to bytes matching its checksums; else a
/// finding code and what is wrong.
/// Content hints (deduplication) are advisory: one naming a file that is gone or has
/// no blob is counted (and dropped by a repair), never reported as a problem.
fn check_content_hints(c: &mut Checker) -> Result<()> {
    let mut stale = Vec::new();
    for r in c.store.content_hints() {
        let (key, v) = r?;
        // Malformed ones are check_key_shapes' findings.
        let Some(ino) = c.store.hint_owner(&v) else {
            continue;
        };
        if c.store.get(ino)?.is_none_or(|i| i.blob.is_none()) {
            stale.push(key);
        }
    }
    c.report.stale_hints = stale.len() as u64;
    for key in stale {
        c.txn.del_content_hint_key(&key);
    }
    Ok(())
}

fn check_blob(
    c: &mut Checker,
    ino: u64,
    inode: &Inode,
    b: &super::BlobRef,
) -> Option<(&'static str, String)> {
    c.report.blobs_checked += 1;
    let stored = match b.pack {
        // A packed blob reads as the version-1 blob it was made from.
        Some(_) => None,
        None => Some(b.stored_size),
    };
    // Read a region at a time: a blob can be as large as its file.
    let blob = match c.store.open_blob(ino, b) {
        Ok(b) => b,
        Err(e) => return Some(("missing-blob", format!("cannot be read: {e}"))),
    };
    let why = if stored.is_some_and(|s| blob.len() != s) {
        format!("has {} bytes, the index says {}", blob.len(), b.stored_size)
    } else {
        match Header::read_from(&blob) {
            Err(e) => e.to_string(),
            Ok((h, _)) if b.member.is_some() => {
                return check_member(c, inode, b, &blob, &h).map(|why| ("bad-blob", why));
            }
            Ok((h, _)) if h.original_len != inode.size => format!(
                "decodes to {} bytes, the file has {}",
                h.original_len, inode.size
            ),
            Ok((h, _)) => {
                if h.has_llm_segments() && c.opts.engine.is_none() {
                    return None; // header and sizes are sound; the payload needs --deep
                }
                c.report.blobs_decoded += 1;
                let engine = c.opts.engine.filter(|_| h.has_llm_segments());
                let opts = DecompressOptions::default();
                match codec::decode_to(&blob, engine, &opts, &|_| {}, &mut codec::NullSink) {
                    Ok(_) => return None,
                    Err(e) => e.to_string(),
                }
            }
        }
    };
    Some(("bad-blob", why))
}

/// A member of a solid group: its group's length is the header's, its range lies in
/// the group, and (deep) the group decodes and the range's BLAKE3 tail is its record's.
/// Returns what is wrong.
fn check_member(
    c: &mut Checker,
    inode: &Inode,
    b: &super::BlobRef,
    blob: &super::pack::BlobSource,
    h: &Header,
) -> Option<String> {
    let m = b.member?;
    if h.original_len != m.group_len {
        return Some(format!(
            "decodes to {} bytes, the index says its group holds {}",
            h.original_len, m.group_len
        ));
    }
    // (Decoded into memory below: never more than a group can hold.)
    if m.group_len > crate::fs::options::MAX_GROUP {
        return Some(format!(
            "is a group of {} bytes, more than a group holds ({})",
            m.group_len,
            crate::fs::options::MAX_GROUP
        ));
    }
    let size = inode.size;
    let Some(end) = m.offset.checked_add(size).filter(|&e| e <= m.group_len) else {
        return Some(format!(
            "is a group of {} bytes; the file's {size} bytes at {} run past it",
            m.group_len, m.offset
        ));
    };
    if h.has_llm_segments() && c.opts.engine.is_none() {
        return None; // header and range are sound; the payload needs --deep
    }
    let slot = b.pack?;
    let known = c
        .groups
        .iter()
        .find(|(s, _)| *s == slot)
        .map(|(_, g)| g.clone());
    let group = match known {
        Some(g) => g,
        None => {
            c.report.blobs_decoded += 1;
            let engine = c.opts.engine.filter(|_| h.has_llm_segments());
            let mut plain = Vec::new();
            let decoded = codec::decode_to(
                blob,
                engine,
                &DecompressOptions::default(),
                &|_| {},
                &mut plain,
            )
            .map(|_| plain)
            .map_err(|e| e.to_string());
            let g = std::sync::Arc::new(decoded);
            if c.groups.len() >= GROUPS_KEPT {
                c.groups.remove(0);
            }
            c.groups.push((slot, g.clone()));
            g
        }
    };
    match &*group {
        Err(e) => Some(e.clone()),
        Ok(plain) => {
            let range = plain.get(m.offset as usize..end as usize)?;
            let hash: [u8; 32] = blake3::hash(range).into();
            if super::Member::tail_of(&hash) != m.tail && !inode.dirty {
                Some(format!(
                    "decodes, but bytes {}..{end} of its group are not the file the index names",
                    m.offset
                ))
            } else {
                None
            }
        }
    }
}

fn check_queue_and_xattrs(c: &mut Checker, inodes: &HashMap<u64, Inode>) -> Result<()> {
    // Parent and up entries are advisory (a path for log lines, checked before use),
    // but one of an inode that is gone is garbage.
    // (From layout 7 a 'p' key is a bad key, reported and removed as such.)
    let mut parents: Vec<_> = if c.store.layout < super::LAYOUT_UP_ENTRIES {
        c.store
            .db
            .scan_prefix(b"p")
            .keys()
            .collect::<std::result::Result<_, _>>()?
    } else {
        Vec::new()
    };
    for k in c.store.db.scan_prefix(b"u").keys() {
        parents.push(k?);
    }
    for k in parents.into_iter().filter(|k| k.len() == 9) {
        let ino = ino_from(&k).unwrap_or(0);
        // (An inode this repair made, /lost+found, is in the index but not in `inodes`.)
        let exists = inodes.contains_key(&ino) || c.store.get(ino).ok().flatten().is_some();
        if !exists {
            c.found(
                "stale-parent",
                format!(
                    "{} names inode {ino}, which does not exist",
                    if k[0] == b'u' {
                        "an up entry"
                    } else {
                        "a parent entry"
                    }
                ),
                Some("removed".into()),
            );
            c.txn.batch.remove(&k[..]);
        }
    }
    for (ino, _) in c.store.queue()? {
        if !inodes.get(&ino).is_some_and(|i| i.kind == Kind::File) {
            c.found(
                "stale-queue",
                format!("the compression queue names inode {ino}, which is not a file"),
                Some("removed from the queue".into()),
            );
            c.txn.batch.remove(&queue_key(ino)[..]);
        }
    }
    let keys: Vec<_> = c
        .store
        .db
        .scan_prefix(b"x")
        .keys()
        .collect::<std::result::Result<_, _>>()?;
    for k in keys {
        let ino = ino_from(&k).unwrap_or(0);
        let raw_name = k.get(9..).unwrap_or(&[]);
        let name = String::from_utf8_lossy(raw_name).into_owned();
        let Some(inode) = inodes.get(&ino) else {
            c.found(
                "stale-xattr",
                format!("xattr {name:?} belongs to inode {ino}, which does not exist"),
                Some("removed".into()),
            );
            c.txn.batch.remove(xattr_key(ino, raw_name));
            continue;
        };
        if raw_name == acl::ACCESS || raw_name == acl::DEFAULT {
            // The kernel checks permissions against these: one it cannot read, or a
            // default ACL on something that is not a directory, is a fault.
            let value = c.store.db.get(&k)?.unwrap_or_default();
            let fault = match acl::Acl::parse(&value) {
                Ok(Some(_)) if inode.kind == Kind::Symlink => Some("on a symbolic link"),
                Ok(Some(_)) if raw_name == acl::DEFAULT && inode.kind != Kind::Dir => {
                    Some("a default ACL on a non-directory")
                }
                Ok(Some(_)) => None,
                Ok(None) => Some("empty"),
                Err(_) => Some("malformed"),
            };
            if let Some(why) = fault {
                c.found(
                    "bad-acl",
                    format!("inode {ino}: {name} is {why}"),
                    Some("removed (the mode bits decide)".into()),
                );
                c.txn.batch.remove(xattr_key(ino, raw_name));
            }
        }
    }
    Ok(())
}

/// The allocation counters are beyond every number in use (else a new file or blob
/// would overwrite an old one).
fn check_counters(c: &mut Checker, inodes: &HashMap<u64, Inode>) -> Result<()> {
    let max_ino = inodes.keys().copied().max().unwrap_or(ROOT_INO);
    let next_ino = c.store.next_ino.load(std::sync::atomic::Ordering::SeqCst);
    if next_ino <= max_ino {
        c.found(
            "counter",
            format!("next inode number {next_ino} is already in use (highest {max_ino})"),
            Some(format!("set to {}", max_ino + 1)),
        );
        c.txn
            .batch
            .insert(NEXT_INO_KEY, (max_ino + 1).to_le_bytes());
    }
    let mut max_seq = 0;
    for dir in c.store.file_dirs(true) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if let Some((_, seq)) = super::parse_blob_name(&e.file_name().to_string_lossy()) {
                max_seq = max_seq.max(seq);
            }
        }
    }
    for i in inodes.values() {
        if let Some(b) = i.blob {
            max_seq = max_seq.max(b.seq);
        }
    }
    // Pack ids come from the same counter: a pack's entry, its file, its grave (a
    // new pack made at a number in use would replace a live pack's file).
    for (id, _) in c.store.pack_infos()? {
        max_seq = max_seq.max(id);
    }
    if let Ok(entries) = std::fs::read_dir(c.store.packs().dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".tmp").map(|s| format!("{s}.pack"));
            if let Some(id) = super::pack::parse_pack_name(stem.as_deref().unwrap_or(&name)) {
                max_seq = max_seq.max(id);
            }
        }
    }
    for (ino, tag) in c.store.graveyard()? {
        if ino == super::PACK_GRAVE {
            max_seq = max_seq.max(tag);
        }
    }
    let next_blob = c.store.next_blob.load(std::sync::atomic::Ordering::SeqCst);
    if next_blob <= max_seq {
        c.found(
            "counter",
            format!("next blob number {next_blob} is already in use (highest {max_seq})"),
            Some(format!("set to {}", max_seq + 1)),
        );
        c.txn
            .batch
            .insert(NEXT_BLOB_KEY, (max_seq + 1).to_le_bytes());
    }
    Ok(())
}

/// Files in blobs/ and cache/ that the index does not refer to.
fn check_directories(c: &mut Checker, referenced: &HashSet<PathBuf>) -> Result<()> {
    let dirs = c
        .store
        .file_dirs(true)
        .into_iter()
        .map(|d| (d, "orphan-blob"))
        .chain(std::iter::once((
            c.store.packs().dir().to_path_buf(),
            "orphan-pack",
        )))
        .chain(
            c.store
                .file_dirs(false)
                .into_iter()
                .map(|d| (d, "orphan-cache")),
        );
    for (dir, code) in dirs.collect::<Vec<_>>() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(d) => d
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        entries.sort();
        for path in entries {
            if path.is_dir() && c.store.is_shard_dir(&path) {
                continue;
            }
            if referenced.contains(&path) {
                continue;
            }
            let is_tmp = path.extension().is_some_and(|e| e == "tmp");
            if is_tmp {
                // Half-written by an interrupted compression or decompression: the
                // index never pointed at it, and its source is still in place.
                c.found(
                    "leftover-temp",
                    format!("{} was left by an interrupted write", path.display()),
                    Some("removed".into()),
                );
                if c.opts.repair {
                    std::fs::remove_file(&path)?;
                }
                continue;
            }
            c.found(
                code,
                format!("{} is not referenced by the index", path.display()),
                Some(format!("moved to {LOST_FOUND}/")),
            );
            if c.opts.repair {
                let what = c.rescue(&path)?;
                if let Some(f) = c.report.findings.last_mut() {
                    f.repaired = Some(what);
                }
            }
        }
    }
    Ok(())
}

impl Store {
    /// Open a backing directory that must already be one (fsck never initializes).
    pub fn open_existing(backing: &Path) -> Result<Store> {
        Self::must_be_a_volume(backing)?;
        Store::open(backing)
    }

    /// [`Store::open_existing`] for a check ([`Store::open_for_check`]).
    pub fn open_existing_for_check(backing: &Path) -> Result<Store> {
        Self::must_be_a_volume(backing)?;
        Store::open_for_check(backing)
    }

    fn must_be_a_volume(backing: &Path) -> Result<()> {
        if backing.join(super::FORMAT_MARKER).is_file() {
            return Ok(());
        }
        Err(StoreError::Setup(format!(
            "{} is not a nacrithfs backing directory (no {})",
            backing.display(),
            super::FORMAT_MARKER
        )))
    }

    /// Plant a raw index entry (fsck's tests build broken directories with it).
    #[doc(hidden)]
    pub fn raw_insert(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Every raw index entry (the fsck fuzz target mutates them).
    #[doc(hidden)]
    pub fn raw_entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for r in self.db.iter() {
            let (k, v) = r?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    #[doc(hidden)]
    pub fn raw_remove(&self, key: &[u8]) -> Result<()> {
        self.db.remove(key)?;
        self.db.flush()?;
        Ok(())
    }

    #[doc(hidden)]
    pub fn dirent_key(parent: u64, name: &[u8]) -> Vec<u8> {
        dirent_key(parent, name)
    }

    #[doc(hidden)]
    pub fn up_key(ino: u64) -> Vec<u8> {
        super::up_key(ino).to_vec()
    }

    #[doc(hidden)]
    pub fn cookie_key(parent: u64, cookie: u64) -> Vec<u8> {
        super::cookie_key(parent, cookie).to_vec()
    }

    #[doc(hidden)]
    pub fn inode_key(ino: u64) -> Vec<u8> {
        inode_key(ino).to_vec()
    }
}
