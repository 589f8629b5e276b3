//! Mount options (`-o a=b,c`), as given on the command line, in fstab or by mount.fuse3.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Quiet time after the last close before a file is queued for compression.
    pub idle: Duration,
    /// Cap on clean plaintext copies in the cache (dirty ones are never evicted).
    pub cache_size: u64,
    /// Free space on the backing filesystem that writes into the cache leave alone, so
    /// compressions (which free space) and index updates can still commit on a full
    /// disk. None: 1% of the backing filesystem, at most 256 MiB.
    pub reserve: Option<u64>,
    /// Worker contexts: in all on a CPU (None: one per core), per GPU with GPUs (None: 1).
    pub workers: Option<usize>,
    /// Lanes (chunk streams) per worker context.
    pub batch: usize,
    pub chunk_size: usize,
    /// Files larger than this stay plaintext. Compression streams (memory does not grow
    /// with the file) except for the chunk table, ~100 bytes per chunk of text kept while
    /// a file is coded or decoded: ~100 MiB at the default 16 GiB.
    pub compress_max: u64,
    /// First chunk's target size (0: `chunk_size`).
    pub head_chunk: usize,
    pub model: Option<PathBuf>,
    pub allow_other: bool,
    pub allow_root: bool,
    pub read_only: bool,
    /// Decode every new blob and compare before it replaces the plaintext.
    pub verify: bool,
    /// Answer a read(2) of a compressed file with the bytes decoded so far (a short
    /// read), so `cat` prints a file's head while the rest decodes. Off by default: some
    /// programs take a short read of a regular file for its end (GNU tar pads the
    /// archive with zeros, bash's `source` runs part of the script).
    pub stream_reads: bool,
    /// An index call that has not returned after this long is a hung index: the daemon
    /// logs it and exits with [`EXIT_INDEX_HUNG`] for systemd to restart it (zero: never).
    pub index_timeout: Duration,
    /// The index's block cache in bytes (`index_cache=`; 0: a sixteenth of the memory,
    /// between 32 MiB and 1 GiB, see `store::index::default_cache_bytes`).
    pub index_cache: u64,
    /// When a read or a listing updates atime (the kernel leaves it to the daemon).
    pub atime: Atime,
    /// Listings never update a directory's atime.
    pub nodiratime: bool,
    /// POSIX ACLs (`acl`, the default; `noacl`): the kernel enforces the ACLs the
    /// daemon keeps (see `fs::acl`).
    pub acl: bool,
    /// A file equal to one already stored shares its blob (`dedup`, the default;
    /// `nodedup` codes every file on its own).
    pub dedup: bool,
    /// Small blobs go into pack files (`pack`, the default; `nopack` gives every blob a
    /// file of its own).
    pub pack: bool,
    /// Solid groups (`group=SIZE`, default [`DEFAULT_GROUP`]; `group=0` or `nogroup`:
    /// none): due files of at most half this size are coded together, up to this many
    /// plaintext bytes, as one packed blob (one chunk: each file is coded with the ones
    /// before it as context). Needs `pack`.
    pub group: u64,
    /// `-o remount,ro|rw`: change a live mount (see `fs::mount::remount`), no new daemon.
    pub remount: bool,
    /// The backing directory when the mount source is only a tag.
    pub backing: Option<PathBuf>,
    /// Everything passed through to the kernel unchanged (noatime, nosuid, ...).
    pub kernel: Vec<String>,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            idle: Duration::from_secs(30),
            cache_size: 1 << 30,
            reserve: None,
            workers: None,
            batch: crate::pool::DEFAULT_LANES,
            chunk_size: crate::codec::DEFAULT_CHUNK_SIZE,
            compress_max: 16 << 30,
            head_chunk: crate::codec::DEFAULT_HEAD_CHUNK,
            model: None,
            allow_other: false,
            allow_root: false,
            read_only: false,
            verify: true,
            stream_reads: false,
            index_timeout: Duration::from_secs(30),
            index_cache: 0,
            atime: Atime::Relative,
            nodiratime: false,
            acl: true,
            dedup: true,
            group: DEFAULT_GROUP,
            pack: true,
            remount: false,
            backing: None,
            kernel: Vec::new(),
        }
    }
}

/// The mount's atime rule, from `relatime` (the default), `strictatime` and `noatime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atime {
    /// Updated when it is not after the last change, or a day old.
    Relative,
    /// Updated by every read and listing that reaches the daemon.
    Strict,
    Never,
}

/// The daemon's exit status when its watchdog finds the index hung.
pub const EXIT_INDEX_HUNG: i32 = 70;
/// Plaintext bytes of a solid group by default: one chunk of the default size (the
/// measurement in the README: groups of up to 16 KiB cut a small file's coded bytes by
/// ~40%).
pub const DEFAULT_GROUP: u64 = 16 * 1024;
/// The largest `group=`: half a pack's largest blob, so that even a group that does not
/// compress (the zstd fallback) fits a pack slot.
pub const MAX_GROUP: u64 = crate::store::pack::PACK_MAX_BLOB / 2;

/// Options that mount(8) and mount.fuse3 hand to every helper and that mean nothing here.
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "nofail",
    "_netdev",
    "default_permissions",
    "async",
];
/// Generic VFS flags passed on to the kernel.
const KERNEL: &[&str] = &[
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "dirsync", "sync",
];

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("bad size {s:?} (use a number with K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

impl FsOptions {
    /// Apply one comma-separated `-o` string.
    pub fn apply<'a>(&mut self, opts: &'a str) -> Result<(), String> {
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let need = |v: Option<&'a str>| -> Result<&'a str, String> {
                v.ok_or_else(|| format!("option {key} needs a value"))
            };
            let number = |v: Option<&'a str>| -> Result<u64, String> {
                let v = need(v)?;
                v.parse::<u64>()
                    .map_err(|_| format!("option {key}: {v:?} is not a number"))
            };
            match key {
                "idle" => self.idle = Duration::from_secs(number(value)?),
                "cache_size" => self.cache_size = parse_size(need(value)?)?,
                "reserve" => self.reserve = Some(parse_size(need(value)?)?),
                "workers" => self.workers = Some((number(value)? as usize).max(1)),
                "batch" => self.batch = (number(value)? as usize).clamp(1, 256),
                "chunk_size" => {
                    self.chunk_size = (parse_size(need(value)?)? as usize).clamp(1024, 1 << 24)
                }
                "index_timeout" => self.index_timeout = Duration::from_secs(number(value)?),
                "index_cache" => self.index_cache = parse_size(need(value)?)?,
                "compress_max" => self.compress_max = parse_size(need(value)?)?,
                "head_chunk" => {
                    self.head_chunk = match parse_size(need(value)?)? as usize {
                        0 => 0,
                        n => n.clamp(1024, 1 << 24),
                    }
                }
                "model" => self.model = Some(PathBuf::from(need(value)?)),
                "backing" => self.backing = Some(PathBuf::from(need(value)?)),
                "verify" => {
                    self.verify = match need(value)? {
                        "full" => true,
                        "none" => false,
                        v => return Err(format!("verify={v}: use verify=full or verify=none")),
                    }
                }
                "allow_other" => self.allow_other = true,
                "allow_root" => self.allow_root = true,
                "ro" => self.read_only = true,
                "rw" => self.read_only = false,
                "remount" => self.remount = true,
                "stream_reads" => self.stream_reads = true,
                "acl" => self.acl = true,
                "noacl" => self.acl = false,
                "dedup" => self.dedup = true,
                "nodedup" => self.dedup = false,
                "pack" => self.pack = true,
                "nopack" => self.pack = false,
                "nogroup" => self.group = 0,
                // A reader of any member decodes the whole group (one chunk), and its
                // blob must fit a pack slot.
                "group" => self.group = parse_size(need(value)?)?.min(MAX_GROUP),
                "relatime" | "atime" => self.atime = Atime::Relative,
                "strictatime" => self.atime = Atime::Strict,
                "noatime" => {
                    self.atime = Atime::Never;
                    self.kernel.push(key.to_string());
                }
                "nodiratime" => {
                    self.nodiratime = true;
                    self.kernel.push(key.to_string());
                }
                k if IGNORED.contains(&k) => {}
                k if k.starts_with("x-") || k == "comment" || k == "fsname" || k == "subtype" => {}
                k if KERNEL.contains(&k) => self.kernel.push(k.to_string()),
                _ => return Err(format!("unknown option {opt:?}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_options() {
        let mut o = FsOptions::default();
        o.apply("rw,idle=0,cache_size=64M,reserve=2M,workers=3,verify=none,nosuid,x-systemd.automount,backing=/srv/b")
            .unwrap();
        assert_eq!(o.idle, Duration::ZERO);
        assert_eq!(o.cache_size, 64 << 20);
        assert_eq!(o.reserve, Some(2 << 20));
        assert_eq!(o.workers, Some(3));
        assert!(!o.verify);
        assert_eq!(o.kernel, vec!["nosuid".to_string()]);
        assert_eq!(o.backing, Some(PathBuf::from("/srv/b")));
        assert!(o.apply("bogus").is_err());
        assert!(o.apply("idle=soon").is_err());
        assert!(o.apply("verify=maybe").is_err());
        assert_eq!(o.head_chunk, crate::codec::DEFAULT_HEAD_CHUNK);
        o.apply("head_chunk=8K,chunk_size=32K").unwrap();
        assert_eq!((o.head_chunk, o.chunk_size), (8192, 32768));
        o.apply("head_chunk=0").unwrap();
        assert_eq!(o.head_chunk, 0);
        assert!(!o.stream_reads);
        o.apply("stream_reads").unwrap();
        assert!(o.stream_reads);
        assert_eq!(o.index_timeout, Duration::from_secs(30));
        o.apply("index_timeout=0").unwrap();
        assert_eq!(o.index_timeout, Duration::ZERO);
        assert_eq!(o.index_cache, 0);
        o.apply("index_cache=256M").unwrap();
        assert_eq!(o.index_cache, 256 << 20);
        assert!(o.acl);
        o.apply("noacl").unwrap();
        assert!(!o.acl);
        o.apply("acl").unwrap();
        assert!(o.acl);
        assert!(o.dedup);
        o.apply("nodedup").unwrap();
        assert!(!o.dedup);
        assert!(o.pack);
        o.apply("nopack").unwrap();
        assert!(!o.pack);
        assert_eq!(o.group, DEFAULT_GROUP);
        o.apply("group=8K").unwrap();
        assert_eq!(o.group, 8192);
        o.apply("nogroup").unwrap();
        assert_eq!(o.group, 0);
        o.apply("group=1T").unwrap();
        assert_eq!(o.group, MAX_GROUP);
    }
}
