//! Compact NC06 headers (blob format versions 2 and 3), for blobs kept in pack files.
//!
//! A version-1 header repeats the coding profile (model fingerprint, backend tag, coder
//! parameters: ~200 bytes) in every blob and writes every length as a u64. A compact
//! header refers to the profile by a small id (the pack that holds the blob names it in
//! its own header, and the volume's index keeps the table) and writes lengths as LEB128
//! varints: a one-chunk text blob's header is ~59 bytes instead of ~295.
//!
//! A compact header is a lossless transformation of a version-1 header: [`expand`] with
//! its profile gives back the same [`Header`], so [`Header::to_bytes`] rebuilds the
//! version-1 header byte for byte, and readers decode a packed blob as the version-1
//! blob it was made from (header rebuilt in memory, payload read from the pack). The
//! encoder checks that round trip before it packs a blob (see `store::pack`).
//! docs/FORMAT.md documents the layout.

use super::container::{
    segment_kind, ChunkEntry, Cursor, FormatError, Header, Segment, SegmentKind, MAGIC, MAX_HEADER,
};

/// The format version of the compact headers written now. Version 3 is version 2 with
/// one shortcut: an llm segment of a single chunk (most small files) writes chunk count
/// 0 and the chunk's symbol count only, since the chunk's length, stored length and
/// CRC-32 are the segment's (8 bytes less per blob). Both versions are read.
pub const COMPACT_VERSION: u16 = 3;
/// The oldest compact header version read.
const COMPACT_VERSION_MIN: u16 = 2;

/// What a version-1 header says about how it was coded, apart from the file itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Profile {
    pub model_fingerprint: [u8; 32],
    pub backend_tag: String,
    pub params: Vec<(u16, u32)>,
}

fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(msg.into())
}

impl Profile {
    pub fn of(h: &Header) -> Profile {
        Profile {
            model_fingerprint: h.model_fingerprint,
            backend_tag: h.backend_tag.clone(),
            params: h.params.clone(),
        }
    }

    /// Fingerprint (32), tag length (u16 LE) and tag, parameter count (u16 LE) and
    /// (u16 id, u32 value) pairs: the same bytes as in a version-1 header.
    pub fn encode(&self) -> Vec<u8> {
        let tag = self.backend_tag.as_bytes();
        let tag = &tag[..tag.len().min(u16::MAX as usize)];
        let mut b = Vec::with_capacity(36 + tag.len() + 6 * self.params.len());
        b.extend_from_slice(&self.model_fingerprint);
        b.extend_from_slice(&(tag.len() as u16).to_le_bytes());
        b.extend_from_slice(tag);
        b.extend_from_slice(&(self.params.len() as u16).to_le_bytes());
        for (id, v) in &self.params {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    pub fn decode(data: &[u8]) -> Result<Profile, FormatError> {
        let mut r = Cursor::new(data, 0);
        let model_fingerprint = r.array32()?;
        let tag_len = r.u16()? as usize;
        let backend_tag = String::from_utf8(r.take(tag_len)?.to_vec())
            .map_err(|_| corrupt("backend tag is not UTF-8"))?;
        let n = r.u16()? as usize;
        let mut params = Vec::with_capacity(n.min(r.remaining() / 6));
        for _ in 0..n {
            params.push((r.u16()?, r.u32()?));
        }
        if r.remaining() != 0 {
            return Err(corrupt("unexpected bytes after the coding profile"));
        }
        Ok(Profile {
            model_fingerprint,
            backend_tag,
            params,
        })
    }

    /// The profile of blobs without LLM segments: they need no model.
    pub fn needs_model(&self) -> bool {
        self.model_fingerprint != [0u8; 32] || !self.backend_tag.is_empty()
    }
}

/// A compact header as read: everything but the profile, which `profile_id` names.
#[derive(Debug, Clone, PartialEq)]
pub struct Compact {
    pub profile_id: u32,
    pub original_len: u64,
    pub checksum: [u8; 32],
    pub segments: Vec<Segment>,
}

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

/// Encode `h`'s file-specific fields with `profile_id` in place of its profile.
///
/// ```text
/// "NC06"  version u16 = 3  varint H (bytes from 0 through the CRC)
/// varint profile id  varint original length  BLAKE3 (32)  varint segment count
/// per segment: kind u8, varint original length, varint stored length, CRC-32 u32;
///   llm only: varint chunk count C, then
///     C = 0 (version 3): varint symbols of the one chunk, which is the whole segment
///     else: per chunk varint original length, varint symbols, varint stored
///     length, CRC-32 u32
/// CRC-32 of everything before it
/// ```
pub fn encode(h: &Header, profile_id: u32) -> Vec<u8> {
    encode_version(h, profile_id, COMPACT_VERSION)
}

/// [`encode`] as `version` wrote it (tests keep version 2's bytes reachable).
fn encode_version(h: &Header, profile_id: u32, version: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + h.segments.len() * 16);
    put_varint(&mut body, profile_id as u64);
    put_varint(&mut body, h.original_len);
    body.extend_from_slice(&h.checksum);
    put_varint(&mut body, h.segments.len() as u64);
    for s in &h.segments {
        body.push(s.kind as u8);
        put_varint(&mut body, s.original_len);
        put_varint(&mut body, s.stored_len);
        body.extend_from_slice(&s.crc.to_le_bytes());
        if s.kind == SegmentKind::Llm {
            let whole = match s.chunks.as_slice() {
                [c] if version >= 3 => Some(c),
                _ => None,
            };
            if let Some(c) = whole.filter(|c| {
                c.original_len as u64 == s.original_len
                    && c.stored_len as u64 == s.stored_len
                    && c.crc == s.crc
            }) {
                put_varint(&mut body, 0);
                put_varint(&mut body, c.n_symbols as u64);
                continue;
            }
            put_varint(&mut body, s.chunks.len() as u64);
            for c in &s.chunks {
                put_varint(&mut body, c.original_len as u64);
                put_varint(&mut body, c.n_symbols as u64);
                put_varint(&mut body, c.stored_len as u64);
                body.extend_from_slice(&c.crc.to_le_bytes());
            }
        }
    }
    // The length field counts itself: find the width that is consistent.
    let mut width = 1;
    let total = loop {
        let total = 6 + width + body.len() + 4;
        let mut probe = Vec::new();
        put_varint(&mut probe, total as u64);
        if probe.len() == width {
            break total;
        }
        width = probe.len();
    };
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&version.to_le_bytes());
    put_varint(&mut b, total as u64);
    b.extend_from_slice(&body);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(b.len(), total);
    b
}

/// The header length a compact header's first bytes announce (magic, version, varint),
/// checked against [`MAX_HEADER`]: how much to read before [`parse`].
pub fn announced_len(start: &[u8]) -> Result<usize, FormatError> {
    if start.len() < 7 {
        return Err(FormatError::Truncated(format!("{} bytes", start.len())));
    }
    let magic: [u8; 4] = [start[0], start[1], start[2], start[3]];
    if &magic != MAGIC {
        return Err(FormatError::NotNc06(magic));
    }
    let version = u16::from_le_bytes([start[4], start[5]]);
    if !(COMPACT_VERSION_MIN..=COMPACT_VERSION).contains(&version) {
        return Err(corrupt(format!(
            "blob in a pack has header version {version}; this build reads {COMPACT_VERSION_MIN} to {COMPACT_VERSION}"
        )));
    }
    let len = Cursor::new(start, 6).varint()?;
    if !(6 + 1 + 4..=MAX_HEADER).contains(&len) {
        return Err(corrupt(format!(
            "compact header length {len} is impossible"
        )));
    }
    Ok(len as usize)
}

/// Parse a compact header (`data` holds at least its announced length). Lengths are
/// bounded here only as far as allocation needs: the expanded header goes through
/// [`Header::parse`], which checks everything a version-1 header is checked for.
pub fn parse(data: &[u8]) -> Result<(Compact, usize), FormatError> {
    let len = announced_len(data)?;
    if data.len() < len {
        return Err(FormatError::Truncated(format!(
            "compact header claims {len} bytes, only {} present",
            data.len()
        )));
    }
    let stored_crc =
        u32::from_le_bytes([data[len - 4], data[len - 3], data[len - 2], data[len - 1]]);
    if crc32fast::hash(&data[..len - 4]) != stored_crc && !cfg!(fuzzing) {
        return Err(corrupt("compact header checksum mismatch"));
    }
    let version = u16::from_le_bytes([data[4], data[5]]);
    let mut r = Cursor::new(&data[..len - 4], 6);
    r.varint()?;
    let profile_id = u32::try_from(r.varint()?).map_err(|_| corrupt("profile id over 2^32"))?;
    let original_len = r.varint()?;
    let checksum = r.array32()?;
    let n_segments = r.varint()?;
    // A segment takes at least 8 bytes (kind, two varints, CRC).
    if n_segments > (r.remaining() / 7) as u64 {
        return Err(corrupt("segment count exceeds header size"));
    }
    let mut segments = Vec::with_capacity(n_segments as usize);
    for _ in 0..n_segments {
        let kind = segment_kind(r.u8()?)?;
        let original_len = r.varint()?;
        let stored_len = r.varint()?;
        let crc = r.u32()?;
        let mut chunks = Vec::new();
        if kind == SegmentKind::Llm {
            let field = |v: u64| u32::try_from(v).map_err(|_| corrupt("chunk field over 2^32"));
            let n = r.varint()?;
            if n == 0 && version >= 3 {
                // The one chunk is the whole segment.
                chunks.push(ChunkEntry {
                    original_len: field(original_len)?,
                    n_symbols: field(r.varint()?)?,
                    stored_len: field(stored_len)?,
                    crc,
                });
            } else {
                // A chunk takes at least 7 bytes.
                if n > (r.remaining() / 7) as u64 {
                    return Err(corrupt("chunk count does not fit the header"));
                }
                chunks.reserve(n as usize);
                for _ in 0..n {
                    chunks.push(ChunkEntry {
                        original_len: field(r.varint()?)?,
                        n_symbols: field(r.varint()?)?,
                        stored_len: field(r.varint()?)?,
                        crc: r.u32()?,
                    });
                }
            }
        }
        segments.push(Segment {
            kind,
            original_len,
            stored_len,
            crc,
            chunks,
        });
    }
    if r.remaining() != 0 {
        return Err(corrupt("unexpected bytes at the end of the compact header"));
    }
    Ok((
        Compact {
            profile_id,
            original_len,
            checksum,
            segments,
        },
        len,
    ))
}

/// The version-1 header a compact one was made from, given its profile.
pub fn expand(c: Compact, profile: &Profile) -> Header {
    Header {
        original_len: c.original_len,
        checksum: c.checksum,
        model_fingerprint: profile.model_fingerprint,
        backend_tag: profile.backend_tag.clone(),
        params: profile.params.clone(),
        segments: c.segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(segments: Vec<Segment>) -> Header {
        let original_len = segments.iter().map(|s| s.original_len).sum();
        Header {
            original_len,
            checksum: [7u8; 32],
            model_fingerprint: [9u8; 32],
            backend_tag:
                "llama-cpp-sys-2 0.1.160; cpu x86-64-v3; weights Q4_1; threads 1; attention plain"
                    .into(),
            params: vec![(1, 2048), (2, 1536), (11, 0x3d4c_cccd)],
            segments,
        }
    }

    fn llm(chunks: &[(u32, u32, u32)]) -> Segment {
        Segment {
            kind: SegmentKind::Llm,
            original_len: chunks.iter().map(|c| c.0 as u64).sum(),
            stored_len: chunks.iter().map(|c| c.2 as u64).sum(),
            crc: 0xdead_beef,
            chunks: chunks
                .iter()
                .map(|&(o, n, s)| ChunkEntry {
                    original_len: o,
                    n_symbols: n,
                    stored_len: s,
                    crc: o ^ s,
                })
                .collect(),
        }
    }

    #[test]
    fn compact_headers_expand_to_the_same_version_1_bytes() {
        let cases = [
            header(vec![]),
            header(vec![llm(&[(4096, 900, 400)])]),
            header(vec![
                llm(&[(4100, 1000, 500), (16384, 3000, 2000)]),
                Segment {
                    kind: SegmentKind::Zstd,
                    original_len: 600,
                    stored_len: 611,
                    crc: 1,
                    chunks: vec![],
                },
                Segment {
                    kind: SegmentKind::Zero,
                    original_len: 1 << 40,
                    stored_len: 0,
                    crc: 0,
                    chunks: vec![],
                },
            ]),
        ];
        for h in cases {
            let profile = Profile::of(&h);
            assert_eq!(
                Profile::decode(&profile.encode()).expect("profile"),
                profile
            );
            let c = encode(&h, 300);
            let (parsed, len) = parse(&c).expect("parse");
            assert_eq!(len, c.len());
            assert_eq!(parsed.profile_id, 300);
            let back = expand(parsed, &profile);
            assert_eq!(back.to_bytes(), h.to_bytes());
            assert!(
                c.len() < h.to_bytes().len() / 2,
                "{} vs {}",
                c.len(),
                h.to_bytes().len()
            );
        }
    }

    /// A segment of one chunk that is the whole segment (as the encoder makes them).
    fn llm_whole(original_len: u32, n_symbols: u32, stored_len: u32) -> Segment {
        let mut s = llm(&[(original_len, n_symbols, stored_len)]);
        s.crc = s.chunks[0].crc;
        s
    }

    #[test]
    fn version_3_drops_a_whole_segment_chunk_and_version_2_still_reads() {
        let cases = [
            header(vec![llm_whole(3000, 830, 358)]),
            header(vec![
                llm_whole(300, 80, 40),
                Segment {
                    kind: SegmentKind::Zstd,
                    original_len: 600,
                    stored_len: 611,
                    crc: 1,
                    chunks: vec![],
                },
                llm_whole(1 << 20, 250_000, 100_000),
            ]),
            // One chunk whose CRC differs from the segment's: written in full.
            header(vec![llm(&[(4096, 900, 400)])]),
        ];
        for h in cases {
            let profile = Profile::of(&h);
            let v3 = encode(&h, 7);
            let v2 = encode_version(&h, 7, 2);
            for c in [&v3, &v2] {
                let (parsed, len) = parse(c).expect("parse");
                assert_eq!(len, c.len());
                assert_eq!(expand(parsed, &profile).to_bytes(), h.to_bytes());
            }
            let whole = h
                .segments
                .iter()
                .filter(|s| s.chunks.len() == 1 && s.chunks[0].crc == s.crc)
                .count();
            assert!(
                v2.len() - v3.len() >= 7 * whole,
                "{whole} whole-segment chunks: {} vs {} bytes",
                v3.len(),
                v2.len()
            );
        }
        // The bytes of a version-3 header are the format (docs/FORMAT.md): a change
        // here is a format change, and packs already written must still read.
        let golden = encode(&header(vec![llm_whole(3000, 830, 358)]), 1);
        let hex: String = golden.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "4e43303603003b01b8170707070707070707070707070707070707070707070707070707070707070707\
             0102b817e602de0a000000be069085394e"
        );
    }

    #[test]
    fn damaged_compact_headers_are_errors() {
        let h = header(vec![llm(&[(4096, 900, 400)])]);
        let c = encode(&h, 1);
        for i in 0..c.len() {
            let mut d = c.clone();
            d[i] ^= 0x41;
            assert!(parse(&d).is_err(), "flipped byte {i} accepted");
        }
        for n in 0..c.len() {
            assert!(parse(&c[..n]).is_err(), "cut at {n} accepted");
        }
        // A hostile length is refused before anything is allocated.
        let mut d = c[..6].to_vec();
        d.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(announced_len(&d).is_err());
    }
}
