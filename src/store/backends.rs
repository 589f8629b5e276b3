//! Blobs per backend: which backend coded each stored file (its blob header's tag), the
//! census `nacrithfs recode` and `nacrithfs status --backends` print. The index does not
//! record a blob's backend, so a census reads every blob's header (header bytes only):
//! O(files), on demand, never on a request path that runs by itself.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;

use super::{BlobRef, Inode, Kind, Result, Store};
use crate::codec::container::Header;

/// What blobs without LLM segments (zstd or raw alone) are counted under: they decode on
/// any backend.
pub const NO_MODEL: &str = "no model segments (decodes anywhere)";

/// Blobs of one backend: distinct blob files (hard links of one blob count once), the
/// files that use them, and the blobs' bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendCount {
    pub blobs: u64,
    pub files: u64,
    pub bytes: u64,
}

/// A stored file: its inode, blob and blob header.
pub struct StoredFile {
    pub ino: u64,
    pub inode: Inode,
    pub blob: BlobRef,
    pub header: Header,
}

/// Count blobs per backend tag (or [`NO_MODEL`], or a line for blobs that cannot be
/// read), handing every stored file whose header was read to `each`. Dirty files (their
/// plaintext is their content) and deleted ones are not counted. A blob that vanishes
/// meanwhile because its file was recompressed (a mounted volume) is skipped.
pub fn census(
    store: &Store,
    mut each: impl FnMut(StoredFile),
) -> Result<BTreeMap<String, BackendCount>> {
    let mut counts: BTreeMap<String, BackendCount> = BTreeMap::new();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    for r in store.inodes() {
        let (ino, inode) = r?;
        if inode.kind != Kind::File || inode.dirty || inode.nlink == 0 {
            continue;
        }
        let Some(blob) = inode.blob else {
            continue;
        };
        // A blob's identity for counting: its file (hard links are one blob) or its slot.
        let read = store.open_blob(ino, &blob).and_then(|src| {
            let id = match (&src, blob.pack) {
                (super::pack::BlobSource::File(f), _) => {
                    let meta = f.file().metadata()?;
                    (meta.dev(), meta.ino(), meta.len())
                }
                (_, Some(slot)) => (u64::MAX - slot.pack, slot.offset, blob.stored_size),
                (_, None) => (0, 0, 0),
            };
            let (header, _) = Header::read_from(&src)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            Ok((id, header))
        });
        let ((dev, file_ino, len), header) = match read {
            Ok(x) => x,
            Err(e) => {
                let moved = e.kind() == std::io::ErrorKind::NotFound
                    && store.get(ino)?.and_then(|i| i.blob) != Some(blob);
                if !moved {
                    let key = format!("unreadable blobs ({e}; run `nacrithfs fsck`)");
                    counts.entry(key).or_default().files += 1;
                }
                continue;
            }
        };
        let key = if header.has_llm_segments() {
            header.backend_tag.clone()
        } else {
            NO_MODEL.to_string()
        };
        let c = counts.entry(key).or_default();
        c.files += 1;
        if seen.insert((dev, file_ino)) {
            c.blobs += 1;
            c.bytes += len;
        }
        each(StoredFile {
            ino,
            inode,
            blob,
            header,
        });
    }
    Ok(counts)
}

/// The census as text, one backend per line: `blobs files bytes<TAB>tag`.
pub fn to_text(counts: &BTreeMap<String, BackendCount>) -> String {
    counts
        .iter()
        .map(|(tag, c)| format!("{} {} {}\t{tag}\n", c.blobs, c.files, c.bytes))
        .collect()
}

/// Parse [`to_text`]'s output (lines that do not parse are skipped).
pub fn from_text(text: &str) -> BTreeMap<String, BackendCount> {
    text.lines()
        .filter_map(|l| {
            let (nums, tag) = l.split_once('\t')?;
            let mut n = nums.split(' ').map(|v| v.parse::<u64>().ok());
            let c = BackendCount {
                blobs: n.next()??,
                files: n.next()??,
                bytes: n.next()??,
            };
            Some((tag.to_string(), c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        let mut m = BTreeMap::new();
        m.insert(
            "llama; cpu x86-64-v3; weights Q4_1".to_string(),
            BackendCount {
                blobs: 2,
                files: 3,
                bytes: 931,
            },
        );
        m.insert(NO_MODEL.to_string(), BackendCount::default());
        assert_eq!(from_text(&to_text(&m)), m);
        assert!(from_text("garbage\n1 x 2\tfoo\n").is_empty());
    }
}
