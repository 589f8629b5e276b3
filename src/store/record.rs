//! The on-disk encoding of index records. Hand-written, versioned, little-endian: the
//! index is part of the storage format (docs/FORMAT.md), so every byte is spelled out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::pack::PackSlot;

const RECORD_VERSION: u8 = 1;

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
}

impl BlobRef {
    pub fn file(seq: u64, stored_size: u64) -> BlobRef {
        BlobRef {
            seq,
            stored_size,
            pack: None,
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

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.target.len());
        out.push(RECORD_VERSION);
        out.push(self.kind.code());
        out.extend_from_slice(&self.perm.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.nlink.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            let (s, n) = split_time(t);
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.rdev.to_le_bytes());
        let flags = u8::from(self.cached) | (u8::from(self.dirty) << 1);
        out.push(flags);
        match self.blob {
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
        out.extend_from_slice(&(self.target.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.target);
        out
    }

    pub fn decode(data: &[u8]) -> Result<Inode, String> {
        let mut r = Reader { data, pos: 0 };
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(format!("unknown inode record version {version}"));
        }
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
        let blob = match r.u8()? {
            0 => None,
            1 => Some(BlobRef::file(r.u64()?, r.u64()?)),
            2 => Some(BlobRef {
                seq: r.u64()?,
                stored_size: r.u64()?,
                pack: Some(PackSlot {
                    pack: r.u64()?,
                    offset: r.u64()?,
                }),
            }),
            _ => return Err("bad blob marker".into()),
        };
        let tlen = r.u32()? as usize;
        let target = r.bytes(tlen)?.to_vec();
        if r.pos != data.len() {
            return Err("trailing bytes in inode record".into());
        }
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
        });
        assert_eq!(Inode::decode(&packed.encode()).unwrap(), packed);
        for cut in 0..i.encode().len() {
            assert!(Inode::decode(&i.encode()[..cut]).is_err());
        }
    }
}
