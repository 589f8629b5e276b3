//! Random-access input for the coder: a buffer, or a file read with `pread`, so a file of
//! any size is coded a window at a time instead of being read into memory.

use std::io;
use std::os::unix::fs::FileExt;

/// Bytes that can be read at any offset. Lengths are fixed when the source is made.
pub trait Source: Sync {
    fn len(&self) -> u64;
    /// Fill `buf` from `offset`; an error if the source ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `range` read into a new buffer. Callers bound the range (a window, a chunk).
    fn read_range(&self, range: std::ops::Range<u64>) -> io::Result<Vec<u8>> {
        let len = range.end.checked_sub(range.start).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "range ends before it starts")
        })?;
        if range.end > self.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("bytes {range:?} are past the end ({})", self.len()),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact_at(&mut buf, range.start)?;
        Ok(buf)
    }
}

impl Source for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
        {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the buffer",
            )),
        }
    }
}

impl Source for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Source::read_exact_at(&self.as_slice(), buf, offset)
    }
}

/// A file, with its length taken when it was opened: bytes past it are not read even if
/// the file grows (and a shrunk file gives an error, never short data).
pub struct FileSource {
    file: std::fs::File,
    len: u64,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> io::Result<FileSource> {
        FileSource::new(std::fs::File::open(path)?)
    }

    pub fn new(file: std::fs::File) -> io::Result<FileSource> {
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }

    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the length the file had when opened",
            ));
        }
        FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// `std::io::Read` over a range of a source (for streaming decoders such as zstd's).
pub struct RangeReader<'a> {
    src: &'a dyn Source,
    pos: u64,
    end: u64,
}

impl<'a> RangeReader<'a> {
    pub fn new(src: &'a dyn Source, range: std::ops::Range<u64>) -> RangeReader<'a> {
        RangeReader {
            src,
            pos: range.start,
            end: range.end.min(src.len()).max(range.start),
        }
    }
}

impl io::Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.pos) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.src.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn buffers_and_ranges_refuse_reads_past_the_end() {
        let data: &[u8] = b"0123456789";
        let mut b = [0u8; 4];
        Source::read_exact_at(&data, &mut b, 6).expect("in range");
        assert_eq!(&b, b"6789");
        assert!(Source::read_exact_at(&data, &mut b, 7).is_err());
        assert!(Source::read_exact_at(&data, &mut b, u64::MAX).is_err());
        assert!(Source::read_range(&data, 8..12).is_err());
        let mut s = String::new();
        RangeReader::new(&data, 2..5)
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "234");
    }
}
