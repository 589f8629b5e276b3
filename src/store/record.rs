//! The on-disk encoding of index records. Hand-written, versioned, little-endian: the
//! index is part of the storage format (docs/FORMAT.md), so every byte is spelled out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::pack::PackSlot;

/// Version 1: fixed-width fields (114 bytes for a packed file). Version 2 (index layout
/// 6): the same fields as varints, and atime, ctime and crtime as offsets from mtime or
/// "equal to it" (about 35 bytes for a packed file). Both decode; records are written in
/// version 2.
const RECORD_V1: u8 = 1;
const RECORD_V2: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }

    /// The kind encoded in a `mode_t`'s type bits.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// Where a compressed copy of a regular file lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRef {
    /// Unique per blob: the file is `blobs/<ino>-<seq>.nc06` (unless packed).
    pub seq: u64,
    pub stored_size: u64,
    /// In a pack (layout 5): the slot holding its `stored_size` bytes; None: a file of
    /// its own.
    pub pack: Option<PackSlot>,
    /// A member of a solid group (layout 8): the blob holds several small files coded as
    /// one plaintext, and this file is `size` bytes of it. Always packed.
    pub member: Option<Member>,
}

/// Where a grouped file's bytes are in its group's plaintext (see [`BlobRef::member`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Member {
    /// The file's first byte in the group's plaintext (its length is the inode's size).
    pub offset: u64,
    /// The group's plaintext length (the blob header's original length): what the
    /// file's share of the blob is counted from.
    pub group_len: u64,
    /// Bytes 16..32 of the BLAKE3 of the file's bytes. A content hint is keyed by the
    /// first 16: with both, a duplicate is checked against all 32 without decoding the
    /// group; fsck --deep checks the decoded range against them.
    pub tail: [u8; 16],
}

impl Member {
    /// The tail of `hash` a member record keeps.
    pub fn tail_of(hash: &[u8; 32]) -> [u8; 16] {
        let mut t = [0u8; 16];
        t.copy_from_slice(&hash[16..]);
        t
    }
}

impl BlobRef {
    pub fn file(seq: u64, stored_size: u64) -> BlobRef {
        BlobRef {
            seq,
            stored_size,
            pack: None,
            member: None,
        }
    }

    /// The blob bytes counted for a file of `size` bytes: all of its blob, or for a
    /// group member its share (by length; at least 1 byte of a non-empty blob).
    pub fn share(&self, size: u64) -> u64 {
        match self.member {
            Some(m) if m.group_len > 0 => {
                let share = (self.stored_size as u128 * size.min(m.group_len) as u128
                    / m.group_len as u128) as u64;
                share.max(u64::from(self.stored_size > 0))
            }
            _ => self.stored_size,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
    pub rdev: u32,
    /// Regular files: the plaintext cache file holds the whole content.
    pub cached: bool,
    /// Regular files: the plaintext differs from (or there is no) blob.
    pub dirty: bool,
    pub blob: Option<BlobRef>,
    /// Symlinks: the target.
    pub target: Vec<u8>,
}

impl Inode {
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32, now: SystemTime) -> Inode {
        Inode {
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            cached: kind == Kind::File,
            dirty: kind == Kind::File,
            blob: None,
            target: Vec::new(),
        }
    }

    /// The record in version 2 (see [`RECORD_V2`]):
    ///
    /// ```text
    /// version u8 = 2, kind u8, flags u8 (1 cached, 2 dirty), varint perm, uid, gid,
    /// nlink, size; mtime: varint zigzag seconds, varint nanoseconds; u8 "same" bits
    /// (1 atime, 2 ctime, 4 crtime equal to mtime), then for each of atime, ctime,
    /// crtime that is not: varint zigzag (its seconds - mtime's, as i128), varint
    /// nanoseconds; varint rdev; blob marker u8 (0 none, 1 file, 2 packed, 3 group
    /// member, layout 8), then varint seq, stored size, and for a packed blob or a
    /// member varint pack, offset, and for a member varint member offset, group length
    /// and 16 bytes of BLAKE3 (see [`Member`]); varint target length, target
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.target.len());
        out.push(RECORD_V2);
        out.push(self.kind.code());
        out.push(u8::from(self.cached) | (u8::from(self.dirty) << 1));
        for v in [
            self.perm as u64,
            self.uid as u64,
            self.gid as u64,
            self.nlink as u64,
        ] {
            put_varint(&mut out, v as u128);
        }
        put_varint(&mut out, self.size as u128);
        let (ms, mn) = split_time(self.mtime);
        put_varint(&mut out, zigzag(ms as i128));
        put_varint(&mut out, mn as u128);
        let others = [self.atime, self.ctime, self.crtime];
        let mut same = 0u8;
        for (i, t) in others.iter().enumerate() {
            if *t == self.mtime {
                same |= 1 << i;
            }
        }
        out.push(same);
        for (i, t) in others.iter().enumerate() {
            if same & (1 << i) == 0 {
                let (s, n) = split_time(*t);
                put_varint(&mut out, zigzag(s as i128 - ms as i128));
                put_varint(&mut out, n as u128);
            }
        }
        put_varint(&mut out, self.rdev as u128);
        match self.blob {
            Some(b) => {
                // (A member without a slot cannot be made; were one asked for, it is
                // written as a plain blob file, which fsck would then find missing.)
                let member = b.member.filter(|_| b.pack.is_some());
                out.push(match (b.pack, member) {
                    (_, Some(_)) => 3,
                    (Some(_), None) => 2,
                    (None, _) => 1,
                });
                put_varint(&mut out, b.seq as u128);
                put_varint(&mut out, b.stored_size as u128);
                if let Some(s) = b.pack {
                    put_varint(&mut out, s.pack as u128);
                    put_varint(&mut out, s.offset as u128);
                }
                if let Some(m) = member {
                    put_varint(&mut out, m.offset as u128);
                    put_varint(&mut out, m.group_len as u128);
                    out.extend_from_slice(&m.tail);
                }
            }
            None => out.push(0),
        }
        put_varint(&mut out, self.target.len() as u128);
        out.extend_from_slice(&self.target);
        out
    }

    pub fn decode(data: &[u8]) -> Result<Inode, String> {
        match data.first() {
            Some(&RECORD_V1) => Inode::decode_v1(data),
            Some(&RECORD_V2) => Inode::decode_v2(data),
            Some(v) => Err(format!("unknown inode record version {v}")),
            None => Err("record truncated".into()),
        }
    }

    fn decode_v2(data: &[u8]) -> Result<Inode, String> {
        let mut r = Reader { data, pos: 1 };
        let kind = Kind::from_code(r.u8()?).ok_or("unknown inode kind")?;
        let flags = r.u8()?;
        if flags & !3 != 0 {
            return Err("unknown inode flags".into());
        }
        let perm = r.var_u64()?.try_into().map_err(|_| "perm out of range")?;
        let uid = r.var_u32()?;
        let gid = r.var_u32()?;
        let nlink = r.var_u32()?;
        let size = r.var_u64()?;
        let ms = i64::try_from(unzigzag(r.var()?)).map_err(|_| "mtime out of range")?;
        let mtime = join_time(ms, r.var_u32()?);
        let same = r.u8()?;
        if same & !7 != 0 {
            return Err("unknown time bits".into());
        }
        let mut others = [mtime; 3];
        for (i, t) in others.iter_mut().enumerate() {
            if same & (1 << i) == 0 {
                let s = unzigzag(r.var()?)
                    .checked_add(ms as i128)
                    .and_then(|s| i64::try_from(s).ok())
                    .ok_or("time out of range")?;
                *t = join_time(s, r.var_u32()?);
            }
        }
        let rdev = r.var_u32()?;
        let blob = r.blob(Reader::var_u64)?;
        if let Some(m) = blob.and_then(|b| b.member) {
            // (Its end is checked where the range is used, against the file's size:
            // records are decoded before anything is compared.)
            if m.offset > m.group_len {
                return Err("group member starts past its group".into());
            }
        }
        let tlen = usize::try_from(r.var_u64()?).map_err(|_| "target length out of range")?;
        let target = r.target(tlen)?;
        Ok(Inode {
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            atime: others[0],
            mtime,
            ctime: others[1],
            crtime: others[2],
            rdev,
            cached: flags & 1 != 0,
            dirty: flags & 2 != 0,
            blob,
            target,
        })
    }

    /// A version-1 record (index layouts 1-5).
    fn decode_v1(data: &[u8]) -> Result<Inode, String> {
        let mut r = Reader { data, pos: 1 };
        let kind = Kind::from_code(r.u8()?).ok_or("unknown inode kind")?;
        let perm = u16::from_le_bytes(r.array()?);
        let uid = r.u32()?;
        let gid = r.u32()?;
        let nlink = r.u32()?;
        let size = r.u64()?;
        let mut times = [UNIX_EPOCH; 4];
        for t in &mut times {
            let s = r.u64()? as i64;
            let n = r.u32()?;
            *t = join_time(s, n);
        }
        let rdev = r.u32()?;
        let flags = r.u8()?;
        let blob = r.blob(Reader::u64)?;
        let tlen = r.u32()? as usize;
        let target = r.target(tlen)?;
        Ok(Inode {
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            atime: times[0],
            mtime: times[1],
            ctime: times[2],
            crtime: times[3],
            rdev,
            cached: flags & 1 != 0,
            dirty: flags & 2 != 0,
            blob,
            target,
        })
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i128) -> u128 {
    ((v << 1) ^ (v >> 127)) as u128
}

fn unzigzag(v: u128) -> i128 {
    ((v >> 1) as i128) ^ -((v & 1) as i128)
}

fn split_time(t: SystemTime) -> (i64, u32) {
    // In i128: the earliest time a record can hold is 2^63 s before 1970, whose
    // seconds do not negate within i64 (found by fuzzing index_records).
    let (s, n) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i128, d.subsec_nanos()),
        Err(e) => {
            // Before 1970: floor to whole seconds below, nanoseconds above.
            let d = e.duration();
            match d.subsec_nanos() {
                0 => (-(d.as_secs() as i128), 0),
                n => (-(d.as_secs() as i128) - 1, 1_000_000_000 - n),
            }
        }
    };
    (s.clamp(i64::MIN as i128, i64::MAX as i128) as i64, n)
}

fn join_time(s: i64, n: u32) -> SystemTime {
    let n = n.min(999_999_999);
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, n)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(n as u64)
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self.data.get(self.pos..end).ok_or("record truncated")?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A varint of at most 19 bytes (what a u128 needs); more is refused, as is a
    /// value that does not fit.
    fn var(&mut self) -> Result<u128, String> {
        let mut v = 0u128;
        for i in 0..19 {
            let b = self.u8()?;
            let part = (b & 0x7f) as u128;
            if i == 18 && part > 0x3 {
                return Err("varint out of range".into());
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    /// The blob marker and its fields, each integer read by `int` (fixed-width in
    /// version 1, varints in version 2).
    fn blob(
        &mut self,
        int: fn(&mut Self) -> Result<u64, String>,
    ) -> Result<Option<BlobRef>, String> {
        Ok(match self.u8()? {
            0 => None,
            1 => Some(BlobRef::file(int(self)?, int(self)?)),
            2 => Some(BlobRef {
                seq: int(self)?,
                stored_size: int(self)?,
                pack: Some(PackSlot {
                    pack: int(self)?,
                    offset: int(self)?,
                }),
                member: None,
            }),
            // Only in version 2 records (layout 8); a version-1 record never has it.
            3 if self.data.first() == Some(&RECORD_V2) => Some(BlobRef {
                seq: int(self)?,
                stored_size: int(self)?,
                pack: Some(PackSlot {
                    pack: int(self)?,
                    offset: int(self)?,
                }),
                member: Some(Member {
                    offset: int(self)?,
                    group_len: int(self)?,
                    tail: self.array()?,
                }),
            }),
            _ => return Err("bad blob marker".into()),
        })
    }
    /// The symlink target, `len` bytes that end the record.
    fn target(&mut self, len: usize) -> Result<Vec<u8>, String> {
        let target = self.bytes(len)?.to_vec();
        if self.pos != self.data.len() {
            return Err("trailing bytes in inode record".into());
        }
        Ok(target)
    }
    fn var_u64(&mut self) -> Result<u64, String> {
        u64::try_from(self.var()?).map_err(|_| "varint out of range".into())
    }
    fn var_u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.var()?).map_err(|_| "varint out of range".into())
    }
}

/// An up entry's value (layout 7): the directory holding the name an inode was last
/// given, and that name's readdir cookie, as two varints (the name itself is in the
/// cookie's value: layouts 3-6 kept a copy of it here).
pub fn encode_up(parent: u64, cookie: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(6);
    put_varint(&mut v, parent as u128);
    put_varint(&mut v, cookie as u128);
    v
}

/// (directory, cookie) of an up entry; None unless the value is exactly two varints
/// that fit a u64.
pub fn decode_up(v: &[u8]) -> Option<(u64, u64)> {
    let mut r = Reader { data: v, pos: 0 };
    let parent = r.var_u64().ok()?;
    let cookie = r.var_u64().ok()?;
    (r.pos == v.len()).then_some((parent, cookie))
}

/// Directory entry value: child inode, kind and readdir cookie (17 bytes). Layout-1
/// volumes wrote 9 bytes (no cookie); those still decode.
pub fn encode_dirent(ino: u64, kind: Kind, cookie: u64) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[..8].copy_from_slice(&ino.to_le_bytes());
    v[8] = kind.code();
    v[9..].copy_from_slice(&cookie.to_le_bytes());
    v
}

/// A readdir cookie's value (layout 4): the entry as readdir returns it, so that a
/// listing reads only the cookie keys: child ino (u64 LE), kind (u8), name.
pub fn encode_cookie(ino: u64, kind: Kind, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + name.len());
    v.extend_from_slice(&ino.to_le_bytes());
    v.push(kind.code());
    v.extend_from_slice(name);
    v
}

/// (child, kind, name) of a layout-4 cookie value.
pub fn decode_cookie(v: &[u8]) -> Option<(u64, Kind, &[u8])> {
    let ino = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let kind = Kind::from_code(*v.get(8)?)?;
    let name = v.get(9..).filter(|n| !n.is_empty())?;
    Some((ino, kind, name))
}

pub fn decode_dirent(v: &[u8]) -> Option<(u64, Kind)> {
    decode_dirent_full(v).map(|(ino, kind, _)| (ino, kind))
}

/// (child, kind, cookie if the entry has one).
pub fn decode_dirent_full(v: &[u8]) -> Option<(u64, Kind, Option<u64>)> {
    if v.len() != 9 && v.len() != 17 {
        return None;
    }
    let ino = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let kind = Kind::from_code(*v.get(8)?)?;
    let cookie = match v.get(9..17) {
        Some(c) => Some(u64::from_le_bytes(c.try_into().ok()?)),
        None => None,
    };
    Some((ino, kind, cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Version 1 as layouts 1-5 wrote it (the encoder this version no longer has).
    fn encode_v1(i: &Inode) -> Vec<u8> {
        let mut out = vec![RECORD_V1, i.kind.code()];
        out.extend_from_slice(&i.perm.to_le_bytes());
        out.extend_from_slice(&i.uid.to_le_bytes());
        out.extend_from_slice(&i.gid.to_le_bytes());
        out.extend_from_slice(&i.nlink.to_le_bytes());
        out.extend_from_slice(&i.size.to_le_bytes());
        for t in [i.atime, i.mtime, i.ctime, i.crtime] {
            let (s, n) = split_time(t);
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&i.rdev.to_le_bytes());
        out.push(u8::from(i.cached) | (u8::from(i.dirty) << 1));
        match i.blob {
            Some(b) => {
                out.push(if b.pack.is_some() { 2 } else { 1 });
                out.extend_from_slice(&b.seq.to_le_bytes());
                out.extend_from_slice(&b.stored_size.to_le_bytes());
                if let Some(s) = b.pack {
                    out.extend_from_slice(&s.pack.to_le_bytes());
                    out.extend_from_slice(&s.offset.to_le_bytes());
                }
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(i.target.len() as u32).to_le_bytes());
        out.extend_from_slice(&i.target);
        out
    }

    /// Version 2 round-trips every field, extreme times and sizes included, and is
    /// much shorter than version 1; version 1 records still decode to the same inode.
    #[test]
    fn version_2_round_trips_and_version_1_still_decodes() {
        let now = UNIX_EPOCH + Duration::new(1_764_800_000, 123_456_789);
        let mut packed = Inode::new(Kind::File, 0o644, 0, 0, now);
        packed.size = 3000;
        packed.cached = false;
        packed.dirty = false;
        packed.atime = now + Duration::from_nanos(17);
        packed.blob = Some(BlobRef {
            seq: 40_000,
            stored_size: 600,
            pack: Some(PackSlot {
                pack: 3,
                offset: 5_000_000,
            }),
            member: None,
        });
        let v2 = packed.encode();
        assert_eq!(v2[0], RECORD_V2);
        assert!(v2.len() <= 40, "{} bytes", v2.len());
        // These bytes are the format (docs/FORMAT.md): indexes written with them must
        // keep decoding, so a change here is a format change.
        let hex: String = v2.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "020100a403000001b81780d885930d959aef3a0600a69aef3a0002c0b802d80403c096b10200"
        );
        assert_eq!(encode_v1(&packed).len(), 114);
        let mut odd = Inode::new(Kind::CharDev, 0o7777, u32::MAX, u32::MAX, now);
        odd.nlink = u32::MAX;
        odd.size = u64::MAX;
        odd.rdev = u32::MAX;
        odd.atime = UNIX_EPOCH - Duration::from_millis(1500);
        odd.ctime = UNIX_EPOCH + Duration::new(i64::MAX as u64, 999_999_999);
        odd.crtime = UNIX_EPOCH - Duration::from_secs(i64::MAX as u64);
        odd.blob = Some(BlobRef::file(u64::MAX, u64::MAX));
        let mut link = Inode::new(Kind::Symlink, 0o777, 1000, 100, now);
        link.target = vec![b'x'; 300];
        for i in [&packed, &odd, &link] {
            assert_eq!(Inode::decode(&i.encode()).as_ref(), Ok(i));
            assert_eq!(Inode::decode(&encode_v1(i)).as_ref(), Ok(i));
            let e = i.encode();
            for cut in 0..e.len() {
                assert!(Inode::decode(&e[..cut]).is_err(), "cut at {cut}");
            }
        }
        // Overlong and out-of-range varints are refused, not wrapped.
        let mut bad = vec![RECORD_V2, 1, 0];
        bad.extend_from_slice(&[0xff; 20]);
        assert!(Inode::decode(&bad).is_err());
        let mut big_uid = vec![RECORD_V2, 1, 0, 0];
        put_varint(&mut big_uid, u32::MAX as u128 + 1);
        assert!(Inode::decode(&big_uid).is_err());
    }

    #[test]
    fn up_entries_are_two_varints() {
        for (parent, cookie) in [(1, 3), (4096, 70_000), (u64::MAX, u64::MAX)] {
            let v = encode_up(parent, cookie);
            assert_eq!(decode_up(&v), Some((parent, cookie)));
            for cut in 0..v.len() {
                assert_eq!(decode_up(&v[..cut]), None, "cut at {cut}");
            }
            let mut long = v.clone();
            long.push(0);
            assert_eq!(decode_up(&long), None);
        }
        assert_eq!(encode_up(1, 3), [1, 3]);
    }

    #[test]
    fn inode_round_trips() {
        let mut i = Inode::new(Kind::Symlink, 0o4755, 1000, 100, SystemTime::now());
        i.target = b"../some/where".to_vec();
        i.blob = Some(BlobRef::file(7, 1234));
        i.atime = UNIX_EPOCH - Duration::from_millis(1500);
        let back = Inode::decode(&i.encode()).unwrap();
        assert_eq!(back, i);
        let mut packed = i.clone();
        packed.blob = Some(BlobRef {
            seq: 8,
            stored_size: 300,
            pack: Some(PackSlot {
                pack: 5,
                offset: 4096,
            }),
            member: None,
        });
        assert_eq!(Inode::decode(&packed.encode()).unwrap(), packed);
        // A group member (layout 8): marker 3, its range and hash tail round-trip; a
        // range past its group is refused.
        let mut member = packed.clone();
        member.kind = Kind::File;
        member.target.clear();
        member.size = 100;
        member.blob = Some(BlobRef {
            member: Some(Member {
                offset: 200,
                group_len: 300,
                tail: [7; 16],
            }),
            ..packed.blob.unwrap()
        });
        let e = member.encode();
        assert_eq!(Inode::decode(&e).unwrap(), member);
        for cut in 0..e.len() {
            assert!(Inode::decode(&e[..cut]).is_err(), "cut at {cut}");
        }
        if let Some(m) = member.blob.as_mut().and_then(|b| b.member.as_mut()) {
            m.offset = 301;
        }
        assert!(Inode::decode(&member.encode()).is_err());
        if let Some(m) = member.blob.as_mut().and_then(|b| b.member.as_mut()) {
            m.offset = 200;
        }
        assert_eq!(member.blob.unwrap().share(100), 100);
        assert_eq!(BlobRef::file(1, 300).share(100), 300);
        for cut in 0..i.encode().len() {
            assert!(Inode::decode(&i.encode()[..cut]).is_err());
        }
    }
}
