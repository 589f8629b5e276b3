//! Split input into text and binary runs (NC06's hybrid idea), and text into chunks.
//!
//! Text runs go to the LLM coder, binary runs to zstd. A few stray bytes inside text are
//! cheaper to escape than to cut out; a short text island inside binary is not worth a
//! segment of its own.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Text,
    Binary,
    /// Zero bytes, stored as nothing (a hole in a sparse file, or a long zero run).
    Zero,
}

/// Zero runs at least this long (after trimming to whole blocks) are stored as nothing;
/// shorter ones cost zstd a few bytes.
pub const ZERO_MIN: usize = 64 * 1024;
/// Zero runs are trimmed to this alignment of their file offsets, so that a decoded copy
/// leaves them as holes of whole filesystem blocks (SEEK_HOLE then finds them).
const ZERO_ALIGN: u64 = 4096;
/// A window is cut after its last newline when one is this near its end.
const WINDOW_NEWLINE_SLACK: usize = 4096;

const BLOCK: usize = 256;
/// A block with more "bad" bytes than this is binary.
const MAX_BAD_PER_BLOCK: usize = 8;
/// Binary islands of at most this many blocks inside text are absorbed into the text.
const ABSORB_BINARY_BLOCKS: usize = 1;
/// Text runs shorter than this many blocks between binary runs become binary.
const MIN_TEXT_BLOCKS: usize = 4;

/// Bytes that a tokenizer would not handle as text: invalid UTF-8, control characters
/// other than tab, newlines, form feed and escape, and DEL.
fn bad_bytes(data: &[u8]) -> Vec<bool> {
    let mut bad = vec![false; data.len()];
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        let n = match b {
            0x00..=0x7F => 1,
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => 0,
        };
        if n == 0 || i + n > data.len() || std::str::from_utf8(&data[i..i + n]).is_err() {
            bad[i] = true;
            i += 1;
            continue;
        }
        if n == 1 && ((b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r' | 0x0C | 0x1B)) || b == 0x7F)
        {
            bad[i] = true;
        }
        i += n;
    }
    bad
}

/// Runs of text and binary covering `data` in order.
pub fn segment(data: &[u8]) -> Vec<(RunKind, Range<usize>)> {
    if data.is_empty() {
        return Vec::new();
    }
    let bad = bad_bytes(data);
    let mut kinds: Vec<RunKind> = bad
        .chunks(BLOCK)
        .map(|blk| {
            let n = blk.iter().filter(|&&b| b).count();
            // A short final block is judged by proportion.
            if n * BLOCK > MAX_BAD_PER_BLOCK * blk.len() {
                RunKind::Binary
            } else {
                RunKind::Text
            }
        })
        .collect();
    smooth(&mut kinds, RunKind::Binary, ABSORB_BINARY_BLOCKS);
    smooth(&mut kinds, RunKind::Text, MIN_TEXT_BLOCKS - 1);
    let mut runs: Vec<(RunKind, Range<usize>)> = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        let start = i * BLOCK;
        let end = ((i + 1) * BLOCK).min(data.len());
        match runs.last_mut() {
            Some((kind, r)) if kind == k => r.end = end,
            _ => runs.push((*k, start..end)),
        }
    }
    runs
}

/// Whether any of `data` would go to the LLM coder (a text run): a file without one is
/// coded by the classical codec alone, and needs no model to be read.
pub fn has_text(data: &[u8]) -> bool {
    segment(data).iter().any(|(k, _)| *k == RunKind::Text)
}

/// Runs of `data`, which starts at file offset `base`: zero runs of at least
/// [`ZERO_MIN`] bytes (block-aligned in the file), and text and binary runs between them.
pub fn segment_at(data: &[u8], base: u64) -> Vec<(RunKind, Range<usize>)> {
    let mut runs = Vec::new();
    let mut at = 0;
    for z in zero_runs(data, base) {
        runs.extend(
            segment(&data[at..z.start])
                .into_iter()
                .map(|(k, r)| (k, r.start + at..r.end + at)),
        );
        runs.push((RunKind::Zero, z.clone()));
        at = z.end;
    }
    runs.extend(
        segment(&data[at..])
            .into_iter()
            .map(|(k, r)| (k, r.start + at..r.end + at)),
    );
    runs
}

/// The zero runs of `data` (at file offset `base`) worth a segment of their own: whole
/// aligned blocks, at least [`ZERO_MIN`] bytes, or any length at either edge of `data`
/// (where the window's neighbour may continue the run: the coder joins them).
fn zero_runs(data: &[u8], base: u64) -> Vec<Range<usize>> {
    let align = ZERO_ALIGN as usize;
    // Offsets in `data` where file blocks start.
    let first = ((ZERO_ALIGN - base % ZERO_ALIGN) % ZERO_ALIGN) as usize;
    let keep = |r: &Range<usize>| r.len() >= ZERO_MIN || r.start == 0 || r.end == data.len();
    let mut out = Vec::new();
    let mut run: Option<usize> = None;
    let mut at = first;
    while at + align <= data.len() {
        let zero = data[at..at + align].iter().all(|&b| b == 0);
        match (zero, run) {
            (true, None) => run = Some(at),
            (false, Some(s)) => {
                if keep(&(s..at)) {
                    out.push(s..at);
                }
                run = None;
            }
            _ => {}
        }
        at += align;
    }
    if let Some(s) = run.filter(|&s| keep(&(s..at))) {
        out.push(s..at);
    }
    out
}

/// Where to end a window of a longer input that starts at file offset `base`: in a zero
/// run, at a block boundary (so the run continues, aligned, in the next window);
/// otherwise after a newline near the end, else not in the middle of a UTF-8 character
/// (so text is not cut mid-character between windows).
pub fn window_cut(data: &[u8], base: u64) -> usize {
    if data.last() == Some(&0) {
        let end = base + data.len() as u64;
        let aligned = (end - end % ZERO_ALIGN).saturating_sub(base) as usize;
        if aligned >= data.len() / 2 {
            return aligned;
        }
    }
    let tail = data.len().saturating_sub(WINDOW_NEWLINE_SLACK);
    if let Some(p) = data[tail..].iter().rposition(|&b| b == b'\n') {
        return tail + p + 1;
    }
    // The last lead byte in the final three: cut before it if its character runs past
    // the end.
    for back in 1..=3.min(data.len()) {
        let i = data.len() - back;
        let need = match data[i] {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => continue,
        };
        return if i + need > data.len() && i > 0 {
            i
        } else {
            data.len()
        };
    }
    data.len()
}

/// Flip runs of `kind` no longer than `max_len` blocks to the other kind.
fn smooth(kinds: &mut [RunKind], kind: RunKind, max_len: usize) {
    let other = match kind {
        RunKind::Text => RunKind::Binary,
        RunKind::Binary => RunKind::Text,
        RunKind::Zero => return,
    };
    // Only islands: a run at either end of the file is kept unless the file is all one run.
    let mut i = 0;
    while i < kinds.len() {
        if kinds[i] != kind {
            i += 1;
            continue;
        }
        let start = i;
        while i < kinds.len() && kinds[i] == kind {
            i += 1;
        }
        let len = i - start;
        let bounded = start > 0 && i < kinds.len();
        if len <= max_len && bounded {
            kinds[start..i].fill(other);
        }
    }
}

/// Cut text into chunks of about `target` bytes, at a newline when one is near, else at a
/// UTF-8 character boundary.
pub fn chunk_text(data: &[u8], target: usize) -> Vec<Range<usize>> {
    chunk_text_with_head(data, target, target)
}

/// Like [`chunk_text`], but the first chunk is at least `head` bytes (at most a quarter
/// more, cut at a newline when one is near): a page-sized read at the start of a file
/// then needs this chunk alone.
pub fn chunk_text_with_head(data: &[u8], head: usize, rest: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < data.len() {
        // The window a cut may fall in: [lo, hi) bytes from the chunk's start.
        let (lo, hi) = if out.is_empty() && head != rest {
            let head = head.max(64);
            (head, head + head / 4)
        } else {
            let rest = rest.max(64);
            (rest * 3 / 4, rest)
        };
        let hard_end = start + hi;
        if hard_end >= data.len() {
            out.push(start..data.len());
            break;
        }
        let window = &data[start + lo..hard_end];
        let end = match window.iter().rposition(|&b| b == b'\n') {
            Some(p) => start + lo + p + 1,
            None => {
                let mut e = hard_end;
                // Back off continuation bytes so a character is not split.
                while e > start + 1 && (data[e] & 0xC0) == 0x80 && hard_end - e < 4 {
                    e -= 1;
                }
                e
            }
        };
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(runs: &[(RunKind, Range<usize>)], len: usize) {
        let mut pos = 0;
        for (_, r) in runs {
            assert_eq!(r.start, pos);
            assert!(r.end > r.start);
            pos = r.end;
        }
        assert_eq!(pos, len);
    }

    #[test]
    fn text_with_a_binary_middle() {
        let mut data = b"hello world, this is text.\n".repeat(100);
        let bin: Vec<u8> = (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect();
        data.extend_from_slice(&bin);
        data.extend_from_slice(&b"more text here, plenty of it.\n".repeat(100));
        let runs = segment(&data);
        covers(&runs, data.len());
        let kinds: Vec<_> = runs.iter().map(|r| r.0).collect();
        assert_eq!(kinds, vec![RunKind::Text, RunKind::Binary, RunKind::Text]);
    }

    #[test]
    fn long_zero_runs_are_their_own_aligned_runs() {
        let mut data = b"text before the hole\n".repeat(300);
        let hole_at = data.len();
        data.resize(hole_at + 200_000, 0);
        data.extend_from_slice(&b"and text after it\n".repeat(300));
        // A short zero run stays inside its neighbour.
        data.extend_from_slice(&[0u8; 5000]);
        data.extend_from_slice(b"end\n");
        let base = 1000;
        let runs = segment_at(&data, base);
        covers(&runs, data.len());
        let zeros: Vec<_> = runs.iter().filter(|r| r.0 == RunKind::Zero).collect();
        assert_eq!(zeros.len(), 1, "{runs:?}");
        let z = &zeros[0].1;
        assert!(data[z.clone()].iter().all(|&b| b == 0));
        assert_eq!((base + z.start as u64) % ZERO_ALIGN, 0);
        assert_eq!((base + z.end as u64) % ZERO_ALIGN, 0);
        assert!(z.start >= hole_at && z.start - hole_at < 4096);
        assert!(hole_at + 200_000 - z.end < 4096);
        // Everything zero: one run (no file-block offset is lost at an aligned base).
        let runs = segment_at(&vec![0u8; 1 << 20], 0);
        assert_eq!(runs, vec![(RunKind::Zero, 0..1 << 20)]);
    }

    #[test]
    fn windows_end_at_a_newline_or_a_character_boundary() {
        let mut data = "line\n".repeat(10).into_bytes();
        data.extend_from_slice(&[b'x'; 3000]);
        assert_eq!(window_cut(&data, 0), 50);
        // No newline near the end: cut at the end.
        data.extend_from_slice(&[b'x'; 2000]);
        assert_eq!(window_cut(&data, 0), data.len());
        let mut data = vec![b'a'; 5000];
        data.extend_from_slice("é".as_bytes());
        data.extend_from_slice(&"漢".as_bytes()[..2]);
        assert_eq!(window_cut(&data, 0), 5002);
        // Ending in zeros: at a file block boundary.
        assert_eq!(window_cut(&vec![0u8; 8192], 0), 8192);
        assert_eq!(window_cut(&vec![0u8; 8192], 100), 8192 - 100);
    }

    #[test]
    fn stray_control_bytes_stay_text() {
        let mut data = b"plain prose line\n".repeat(200);
        data[1000] = 0x04;
        data[2000] = 0xFF;
        let runs = segment(&data);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, RunKind::Text);
    }

    #[test]
    fn chunks_cover_and_prefer_newlines() {
        let data = "Line of text with é and 漢字.\n".repeat(500);
        let chunks = chunk_text(data.as_bytes(), 1000);
        let mut pos = 0;
        for c in &chunks {
            assert_eq!(c.start, pos);
            pos = c.end;
            if c.end < data.len() {
                assert_eq!(data.as_bytes()[c.end - 1], b'\n');
            }
        }
        assert_eq!(pos, data.len());
    }

    #[test]
    fn the_head_chunk_holds_at_least_its_target() {
        let data = "A line of prose, some forty bytes long.\n".repeat(2000);
        let chunks = chunk_text_with_head(data.as_bytes(), 4096, 16384);
        assert!((4096..=5120).contains(&chunks[0].len()), "{:?}", chunks[0]);
        assert_eq!(data.as_bytes()[chunks[0].end - 1], b'\n');
        for c in &chunks[1..] {
            assert!(c.len() <= 16384, "{c:?}");
        }
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(chunks.last().map(|c| c.end), Some(data.len()));
        // Text shorter than the head is one chunk.
        assert_eq!(
            chunk_text_with_head(&data.as_bytes()[..3000], 4096, 16384),
            vec![0..3000]
        );
    }
}
