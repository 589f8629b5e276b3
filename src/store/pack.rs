//! Pack files: many small blobs in one file, so that a 3 KB text does not take a 4 KiB
//! block of its own, and so that a later object-store tier uploads MiB, not KiB.
//!
//! A pack holds blobs of one coding profile, named in its header; each blob is a record
//! (a 16-byte record header, then the blob with a compact header, see
//! [`crate::codec::compact`]). Packs are only ever appended to, by one writer per
//! profile, and sealed (never written again) when they reach [`PACK_TARGET`] or when the
//! daemon stops; space of blobs no longer referenced comes back when a background pass
//! copies a pack's live blobs into the open pack and deletes it (`Core::compact_packs`).
//! The index knows, per pack, its profile and how many bytes are still referenced ('k'),
//! and who references each blob ('R'): see [`super::Store::commit`].
//! docs/FORMAT.md has the layout, docs/DURABILITY.md the order of durable steps.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::codec::compact::{self, Profile};
use crate::codec::container::{FormatError, Header};
use crate::codec::source::{FileSource, Source};

pub const PACK_DIR: &str = "packs";
const PACK_MAGIC: &[u8; 4] = b"NCPK";
const PACK_VERSION: u16 = 1;
/// Blobs up to this size are packed; larger ones keep a file of their own (their
/// header and last block are a small share of them).
pub const PACK_MAX_BLOB: u64 = 256 << 10;
/// A pack is sealed once it holds this much.
pub const PACK_TARGET: u64 = 8 << 20;
/// A record: blob length (u32 LE), the inode that wrote it (u64 LE), CRC-32 of those 12
/// bytes; then the blob.
pub const RECORD_HEADER: u64 = 16;
/// The largest pack header this build reads (the profile is a few hundred bytes).
const MAX_PACK_HEADER: u64 = 64 << 10;

/// Where a packed blob's bytes start: the pack and the offset of the blob (after its
/// record header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackSlot {
    pub pack: u64,
    pub offset: u64,
}

/// What the index keeps per pack ('k'): its profile, and the blobs still referenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackInfo {
    pub profile: u32,
    pub live_bytes: u64,
    pub live_blobs: u64,
}

impl PackInfo {
    pub fn encode(&self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..4].copy_from_slice(&self.profile.to_le_bytes());
        v[4..12].copy_from_slice(&self.live_bytes.to_le_bytes());
        v[12..].copy_from_slice(&self.live_blobs.to_le_bytes());
        v
    }
    pub fn decode(v: &[u8]) -> Option<PackInfo> {
        if v.len() != 20 {
            return None;
        }
        Some(PackInfo {
            profile: u32::from_le_bytes(v[..4].try_into().ok()?),
            live_bytes: u64::from_le_bytes(v[4..12].try_into().ok()?),
            live_blobs: u64::from_le_bytes(v[12..].try_into().ok()?),
        })
    }
}

pub fn pack_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

pub fn parse_pack_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// A pack's header: "NCPK", version u16, flags u16 (0), pack id u64, profile id u32,
/// profile length u32 and the profile's bytes ([`Profile::encode`]), CRC-32 of all that.
pub fn encode_header(id: u64, profile_id: u32, profile: &Profile) -> Vec<u8> {
    let p = profile.encode();
    let mut b = Vec::with_capacity(28 + p.len());
    b.extend_from_slice(PACK_MAGIC);
    b.extend_from_slice(&PACK_VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&profile_id.to_le_bytes());
    b.extend_from_slice(&(p.len() as u32).to_le_bytes());
    b.extend_from_slice(&p);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A pack's header as read: (pack id, profile id, profile, header length).
pub fn read_header(src: &dyn Source) -> Result<(u64, u32, Profile, u64), String> {
    let mut start = [0u8; 24];
    src.read_exact_at(&mut start, 0)
        .map_err(|e| format!("reading the pack header: {e}"))?;
    if &start[..4] != PACK_MAGIC {
        return Err(format!("not a pack (it starts with {:02x?})", &start[..4]));
    }
    let version = u16::from_le_bytes([start[4], start[5]]);
    if version != PACK_VERSION {
        return Err(format!(
            "pack version {version}; this build reads version {PACK_VERSION}"
        ));
    }
    let id = u64::from_le_bytes(start[8..16].try_into().unwrap_or_default());
    let profile_id = u32::from_le_bytes(start[16..20].try_into().unwrap_or_default());
    let plen = u32::from_le_bytes(start[20..24].try_into().unwrap_or_default()) as u64;
    let total = 24 + plen + 4;
    if total > MAX_PACK_HEADER {
        return Err(format!("pack header of {total} bytes is impossible"));
    }
    let head = src
        .read_range(0..total)
        .map_err(|e| format!("reading the pack header: {e}"))?;
    let body = &head[..head.len() - 4];
    let crc = u32::from_le_bytes(head[head.len() - 4..].try_into().unwrap_or_default());
    if crc32fast::hash(body) != crc {
        return Err("pack header checksum mismatch".into());
    }
    let profile = Profile::decode(&body[24..]).map_err(|e| format!("pack header: {e}"))?;
    Ok((id, profile_id, profile, total))
}

fn record_header(len: u32, ino: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..12].copy_from_slice(&ino.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A record header as read: (blob length, inode that wrote it).
pub fn parse_record_header(h: &[u8; 16]) -> Option<(u32, u64)> {
    let crc = u32::from_le_bytes(h[12..].try_into().ok()?);
    (crc32fast::hash(&h[..12]) == crc).then(|| {
        (
            u32::from_le_bytes(h[..4].try_into().unwrap_or_default()),
            u64::from_le_bytes(h[4..12].try_into().unwrap_or_default()),
        )
    })
}

/// A packed blob presented as the version-1 blob it was made from: the header rebuilt
/// in memory from the compact one and the pack's profile, the payload read from the pack.
pub struct PackedBlob {
    head: Vec<u8>,
    file: std::fs::File,
    payload_at: u64,
    payload_len: u64,
}

impl Source for PackedBlob {
    fn len(&self) -> u64 {
        self.head.len() as u64 + self.payload_len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len()) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the packed blob",
            ));
        }
        let mut buf = buf;
        let mut offset = offset;
        let hl = self.head.len() as u64;
        if offset < hl {
            let n = ((hl - offset) as usize).min(buf.len());
            buf[..n].copy_from_slice(&self.head[offset as usize..offset as usize + n]);
            buf = &mut buf[n..];
            offset += n as u64;
        }
        if buf.is_empty() {
            return Ok(());
        }
        FileExt::read_exact_at(&self.file, buf, self.payload_at + (offset - hl))
    }
}

/// A blob to read: a file of its own, or a slot of a pack.
pub enum BlobSource {
    File(FileSource),
    Packed(PackedBlob),
}

impl Source for BlobSource {
    fn len(&self) -> u64 {
        match self {
            BlobSource::File(f) => f.len(),
            BlobSource::Packed(p) => p.len(),
        }
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            BlobSource::File(f) => f.read_exact_at(buf, offset),
            BlobSource::Packed(p) => p.read_exact_at(buf, offset),
        }
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The pack writer of one profile.
struct Writer {
    id: u64,
    file: std::fs::File,
    end: u64,
}

/// The packs of one backing directory: the profile table (loaded from the index at open,
/// small), which profile each pack holds, and the open writers.
pub struct Packs {
    dir: PathBuf,
    profiles: Mutex<ProfileTable>,
    /// Pack id -> profile id, as read from pack headers (each is read once).
    pack_profiles: Mutex<HashMap<u64, u32>>,
    writers: Mutex<HashMap<u32, Writer>>,
    /// Blobs appended whose index commit has not happened yet, per pack: compaction
    /// leaves such a pack alone (a commit may still refer to it).
    pending: Mutex<HashMap<u64, usize>>,
}

/// A blob appended but not yet committed (see [`Packs::append`]): dropped after the
/// commit, or when the blob is abandoned.
pub struct Pending<'a> {
    packs: &'a Packs,
    pub slot: PackSlot,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut p = self.packs.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = p.get_mut(&self.slot.pack) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.slot.pack);
            }
        }
    }
}

#[derive(Default)]
pub struct ProfileTable {
    pub by_id: HashMap<u32, Profile>,
    pub by_profile: HashMap<Profile, u32>,
    /// Ids whose stored profile does not decode: never given out again.
    pub unreadable: std::collections::HashSet<u32>,
}

impl ProfileTable {
    pub fn insert(&mut self, id: u32, p: Profile) {
        self.by_profile.insert(p.clone(), id);
        self.by_id.insert(id, p);
    }
}

impl Packs {
    pub fn new(backing: &Path, profiles: ProfileTable) -> Packs {
        Packs {
            dir: backing.join(PACK_DIR),
            profiles: Mutex::new(profiles),
            pack_profiles: Mutex::default(),
            writers: Mutex::default(),
            pending: Mutex::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(pack_name(id))
    }

    pub fn profile(&self, id: u32) -> Option<Profile> {
        self.profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .get(&id)
            .cloned()
    }

    pub fn profile_id(&self, p: &Profile) -> Option<u32> {
        self.profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_profile
            .get(p)
            .copied()
    }

    /// Record a profile the index now holds durably.
    pub fn add_profile(&self, id: u32, p: Profile) {
        self.profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, p);
    }

    /// The id a new profile gets: one past the largest known, so a gap in the ids (a
    /// profile key lost) never makes a new profile take an id packs still name.
    /// Take a profile as the one of `id` (fsck, from a pack header that carries it).
    pub fn learn_profile(&self, id: u32, p: Profile) {
        let mut t = self.profiles.lock().unwrap_or_else(|p| p.into_inner());
        t.unreadable.remove(&id);
        t.insert(id, p);
    }

    pub fn next_profile_id(&self) -> Option<u32> {
        let t = self.profiles.lock().unwrap_or_else(|p| p.into_inner());
        t.by_id
            .keys()
            .chain(t.unreadable.iter())
            .max()
            .map_or(Some(1), |m| m.checked_add(1))
    }

    /// The packs open for appending (never compacted while open).
    pub fn open_packs(&self) -> Vec<u64> {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|w| w.id)
            .collect()
    }

    /// Whether a blob appended to pack `id` still waits for its commit.
    pub fn is_pending(&self, id: u64) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Seal every open pack (the next append starts a new one).
    pub fn seal_all(&self) {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Open the blob of `len` bytes at `slot`, checking its record header and compact
    /// header, as the version-1 blob it was made from.
    pub fn open(&self, slot: PackSlot, len: u64) -> io::Result<PackedBlob> {
        // A packed blob is at most PACK_MAX_BLOB and inside its pack: a damaged index
        // that says otherwise gets an error, not an allocation of what it says.
        if len > PACK_MAX_BLOB {
            return Err(bad(format!(
                "the index says {len} bytes, more than a packed blob holds"
            )));
        }
        let path = self.path(slot.pack);
        let file = std::fs::File::open(&path)?;
        let file_len = file.metadata()?.len();
        if slot
            .offset
            .checked_add(len)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad(format!(
                "the blob of {len} bytes at {} is past the pack's end ({file_len} bytes)",
                slot.offset
            )));
        }
        let profile_id = self.profile_of_pack(slot.pack, &file)?;
        let at = slot
            .offset
            .checked_sub(RECORD_HEADER)
            .ok_or_else(|| bad("slot before the first record"))?;
        let mut rh = [0u8; 16];
        FileExt::read_exact_at(&file, &mut rh, at)?;
        match parse_record_header(&rh) {
            Some((l, _)) if l as u64 == len => {}
            Some((l, _)) => {
                return Err(bad(format!(
                    "the record at {at} holds {l} bytes, the index says {len}"
                )))
            }
            None => return Err(bad(format!("no record header at {at} (checksum)"))),
        }
        let mut start = vec![0u8; len.min(16) as usize];
        FileExt::read_exact_at(&file, &mut start, slot.offset)?;
        let hlen = compact::announced_len(&start).map_err(|e| bad(e.to_string()))? as u64;
        if hlen > len {
            return Err(bad(format!(
                "compact header of {hlen} bytes in a {len}-byte blob"
            )));
        }
        let mut head = vec![0u8; hlen as usize];
        FileExt::read_exact_at(&file, &mut head, slot.offset)?;
        let (c, _) = compact::parse(&head).map_err(|e| bad(e.to_string()))?;
        if c.profile_id != profile_id {
            return Err(bad(format!(
                "blob of profile {} in a pack of profile {profile_id}",
                c.profile_id
            )));
        }
        let profile = self
            .profile(profile_id)
            .ok_or_else(|| bad(format!("profile {profile_id} is not in the index")))?;
        let header = compact::expand(c, &profile);
        Ok(PackedBlob {
            head: header.to_bytes(),
            file,
            payload_at: slot.offset + hlen,
            payload_len: len - hlen,
        })
    }

    /// The coding profile pack `id` (open as `file`) was written with, once its header
    /// is checked against the index: its own id, and its profile equal to the index's
    /// copy. Reads and compaction both go through this check.
    pub fn profile_of_pack(&self, id: u64, file: &std::fs::File) -> io::Result<u32> {
        if let Some(p) = self
            .pack_profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(*p);
        }
        let src = FileSource::new(file.try_clone()?)?;
        let (pid, profile_id, profile, _) = read_header(&src).map_err(bad)?;
        if pid != id {
            return Err(bad(format!("pack {id:016x} says it is pack {pid:016x}")));
        }
        if self.profile(profile_id).as_ref() != Some(&profile) {
            return Err(bad(format!(
                "pack {id:016x}'s profile {profile_id} has other contents than the index's"
            )));
        }
        self.pack_profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, profile_id);
        Ok(profile_id)
    }

    /// Append `blob` (compact) to the open pack of `profile_id`, made by `create` (which
    /// allocates the id and records the pack in the index) when there is none or it is
    /// full. The bytes are durable (fdatasync) on return; the slot counts as pending
    /// until the returned guard is dropped (after the commit that refers to it).
    pub fn append(
        &self,
        profile_id: u32,
        ino: u64,
        blob: &[u8],
        create: &dyn Fn() -> io::Result<u64>,
    ) -> io::Result<Pending<'_>> {
        let len = u32::try_from(blob.len()).map_err(|_| bad("blob too large for a pack"))?;
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if writers
            .get(&profile_id)
            .is_none_or(|w| w.end >= PACK_TARGET)
        {
            writers.remove(&profile_id);
            // Looked up before `create` records a pack in the index: an unknown profile
            // left an entry with no file at every try.
            let profile = self
                .profile(profile_id)
                .ok_or_else(|| bad(format!("profile {profile_id} is unknown")))?;
            let id = create()?;
            let header = encode_header(id, profile_id, &profile);
            let path = self.path(id);
            if path.exists() {
                return Err(bad(format!(
                    "{} is already there: the blob counter is behind; run `nacrithfs fsck --repair`",
                    path.display()
                )));
            }
            let tmp = path.with_extension("tmp");
            super::write_durably(&tmp, &header)?;
            crate::crash::point("pack.after_tmp");
            std::fs::rename(&tmp, &path)?;
            super::sync_dir(&self.dir)?;
            crate::crash::point("pack.after_create");
            let file = std::fs::OpenOptions::new().write(true).open(&path)?;
            writers.insert(
                profile_id,
                Writer {
                    id,
                    file,
                    end: header.len() as u64,
                },
            );
        }
        let Some(w) = writers.get_mut(&profile_id) else {
            return Err(bad("no pack writer"));
        };
        let mut rec = Vec::with_capacity(16 + blob.len());
        rec.extend_from_slice(&record_header(len, ino));
        rec.extend_from_slice(blob);
        let written = w
            .file
            .write_all_at(&rec, w.end)
            .and_then(|()| w.file.sync_data());
        if let Err(e) = written {
            // Whatever reached the file past `end` is dead bytes: seal this pack.
            writers.remove(&profile_id);
            return Err(e);
        }
        let slot = PackSlot {
            pack: w.id,
            offset: w.end + RECORD_HEADER,
        };
        w.end += rec.len() as u64;
        *self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(slot.pack)
            .or_default() += 1;
        crate::crash::point("pack.after_append");
        Ok(Pending { packs: self, slot })
    }
}

/// Whether the version-1 blob whose header is `header` (of `header_len` bytes, read from
/// `v1`) can be packed with profile `profile_id`: the compact header must expand back to
/// the very same bytes. Returns the compact blob (header + payload).
pub fn compact_blob(
    v1: &dyn Source,
    header: &Header,
    header_len: usize,
    profile_id: u32,
) -> Result<Option<Vec<u8>>, FormatError> {
    let c = compact::encode(header, profile_id);
    let (parsed, _) = compact::parse(&c)?;
    let original = v1
        .read_range(0..header_len as u64)
        .map_err(|e| FormatError::Truncated(e.to_string()))?;
    if compact::expand(parsed, &Profile::of(header)).to_bytes() != original {
        return Ok(None);
    }
    let payload = v1
        .read_range(header_len as u64..v1.len())
        .map_err(|e| FormatError::Truncated(e.to_string()))?;
    let mut out = c;
    out.extend_from_slice(&payload);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a damaged index may say about a packed blob (its length, its place) is
    /// checked before anything is read or allocated for it.
    #[test]
    fn a_slot_the_pack_cannot_hold_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(PACK_DIR)).expect("mkdir");
        let mut t = ProfileTable::default();
        t.insert(
            1,
            Profile {
                model_fingerprint: [0; 32],
                backend_tag: String::new(),
                params: vec![],
            },
        );
        let packs = Packs::new(dir.path(), t);
        assert_eq!(packs.next_profile_id(), Some(2));
        let blob = b"not a compact header, but bytes".to_vec();
        let slot = packs.append(1, 7, &blob, &|| Ok(42)).expect("append").slot;
        let len = blob.len() as u64;
        let err = |slot, len| packs.open(slot, len).err().expect("refused").to_string();
        let e = err(slot, PACK_MAX_BLOB + 1);
        assert!(e.contains("more than a packed blob holds"), "{e}");
        let e = err(slot, len + 1);
        assert!(e.contains("past the pack's end"), "{e}");
        let far = PackSlot {
            pack: slot.pack,
            offset: u64::MAX - 3,
        };
        let e = err(far, len);
        assert!(e.contains("past the pack's end"), "{e}");
        // The slot as written gets as far as the compact header.
        let e = err(slot, len);
        assert!(!e.contains("past the pack's end"), "{e}");
    }

    /// A gap in the profile ids (a key lost) never makes a new profile take an id.
    #[test]
    fn new_profile_ids_follow_the_largest() {
        let p = |tag: &str| Profile {
            model_fingerprint: [0; 32],
            backend_tag: tag.into(),
            params: vec![],
        };
        let mut t = ProfileTable::default();
        t.insert(2, p("b"));
        let packs = Packs::new(std::path::Path::new("/nonexistent"), t);
        assert_eq!(packs.next_profile_id(), Some(3));
        let mut t = ProfileTable::default();
        t.insert(u32::MAX, p("c"));
        assert_eq!(
            Packs::new(std::path::Path::new("/x"), t).next_profile_id(),
            None
        );
        assert_eq!(
            Packs::new(std::path::Path::new("/x"), ProfileTable::default()).next_profile_id(),
            Some(1)
        );
    }
}
