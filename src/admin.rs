//! The client side of `nacrithfs flush|evict|status|metrics MOUNTPOINT`: everything goes
//! through two xattrs on the mount's root (`user.nacrith.status`, read; and
//! `user.nacrith.control`, written), so these commands work on any mount the caller can
//! reach, and the daemon answers from counters it keeps (no scan per call).

use std::ffi::CString;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fs::core::{XATTR_BACKENDS, XATTR_CONTROL, XATTR_STATUS};

/// The daemon's status: `key=value` lines, in its order.
pub struct Status(Vec<(String, String)>);

/// Counters that only grow while the daemon runs (Prometheus counters); the rest are
/// gauges of the volume's state.
const COUNTERS: &[&str] = &[
    "compressed_since_mount",
    "bytes_in",
    "bytes_out",
    "busy_seconds",
    "failures",
    "superseded",
    "verify_failures",
    "decompressions",
    "decompress_failures",
    "symbols_coded",
    "regions_decoded",
    "index_commits",
    "compress_seconds",
    "coding_seconds",
    "shared_files",
    "shared_bytes",
    "grouped_files",
];

/// One line of help per field, for the Prometheus exposition.
fn help(key: &str) -> &'static str {
    match key {
        "files" => "Regular files in the volume.",
        "compressed" => "Files stored as blobs.",
        "dirty" => "Files whose plaintext is their content (not compressed yet).",
        "dirty_bytes" => "Bytes of dirty files.",
        "queued" => "Files in the compression queue.",
        "due" => "Queued files due for compression now.",
        "compressing" => "Compressions running.",
        "logical_bytes" => "Sum of file sizes.",
        "stored_bytes" => "Bytes of the files' stored forms (blobs, dirty plaintext), not rounded.",
        "stored_disk_bytes" => {
            "What the stored forms occupy on the backing filesystem, in whole blocks."
        }
        "index_bytes" => "Bytes of the index on disk (tables and journal).",
        "disk_bytes" => {
            "What the volume occupies on disk: stored forms and clean copies in whole blocks, and the index."
        }
        "cache_bytes" => "Plaintext bytes in the cache (dirty files and clean copies).",
        "compressed_since_mount" => "Files compressed since mount.",
        "bytes_in" => "Plaintext bytes compressed since mount.",
        "bytes_out" => "Blob bytes written since mount.",
        "busy_seconds" => "Seconds with at least one compression running, since mount.",
        "failures" => "Compressions that failed (the file stays plaintext and is retried).",
        "superseded" => "Compressions dropped because their file changed meanwhile (or the blob it was to share went).",
        "verify_failures" => "New blobs that did not decode back (stored with zstd instead).",
        "decompressions" => "Files decompressed into the cache since mount.",
        "decompress_failures" => "Decompressions that failed (EIO to the reader).",
        "symbols_coded" => "Symbols (tokens) coded by the model since mount.",
        "regions_decoded" => "Blob regions decoded for readers since mount.",
        "chunk_jobs_queued" => "Chunk jobs waiting for a model lane.",
        "index_commits" => "Index batches committed since mount.",
        "paused" => "1 while remounted read-only: no compression commits, evictions or deletions.",
        "read_only" => "1 if mounted with -o ro (a private copy of the index; never read-write).",
        "shared_files" => {
            "Files stored since mount as a second name of an equal file's blob (no coding)."
        }
        "shared_bytes" => "Blob bytes those shared files did not write.",
        "grouped_files" => {
            "Files stored since mount as members of a solid group (small files coded together as one blob)."
        }
        "packs" => "Pack files (many small blobs in one file).",
        "pack_disk_bytes" => "What the pack files occupy on disk, in whole blocks.",
        "pack_live_bytes" => {
            "Bytes of the packs that files still refer to (the rest comes back at compaction)."
        }
        "compress_seconds" => {
            "Compressor seconds per file from claim to end, summed over files, since mount."
        }
        "coding_seconds" => {
            "Of compress_seconds, the time in the coder (encoding and the verifying decode)."
        }
        _ => "nacrithfs status field.",
    }
}

impl Status {
    pub fn read(mnt: &Path) -> Result<Status, String> {
        let buf = root_xattr(mnt, XATTR_STATUS, 8192)?.map_err(|e| {
            format!(
                "{}: cannot read status ({e}); is it a nacrithfs mount?",
                mnt.display()
            )
        })?;
        Ok(Status(
            String::from_utf8_lossy(&buf)
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    pub fn float(&self, key: &str) -> f64 {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    }

    pub fn get(&self, key: &str) -> u64 {
        self.float(key) as u64
    }

    /// Numeric fields only (all of them today), in the daemon's order.
    fn numbers(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0
            .iter()
            .filter_map(|(k, v)| v.parse::<f64>().ok().map(|n| (k.as_str(), n)))
    }

    /// One JSON object, every field a number.
    pub fn to_json(&self) -> String {
        let fields: Vec<String> = self
            .numbers()
            .map(|(k, v)| format!("  \"{k}\": {}", number(v)))
            .collect();
        format!("{{\n{}\n}}\n", fields.join(",\n"))
    }

    /// The Prometheus text exposition format (for node_exporter's textfile collector or
    /// any scraper), labelled with the mountpoint.
    pub fn to_prometheus(&self, mnt: &Path) -> String {
        let label = mnt
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let mut out = String::new();
        for (k, v) in self.numbers() {
            let counter = COUNTERS.contains(&k);
            let name = if counter {
                format!("nacrithfs_{k}_total")
            } else {
                format!("nacrithfs_{k}")
            };
            out.push_str(&format!("# HELP {name} {}\n", help(k)));
            out.push_str(&format!(
                "# TYPE {name} {}\n",
                if counter { "counter" } else { "gauge" }
            ));
            out.push_str(&format!("{name}{{mountpoint=\"{label}\"}} {}\n", number(v)));
        }
        out
    }
}

/// Integers without a fraction, the rest as Rust prints them (valid JSON and
/// Prometheus numbers either way).
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The value of xattr `name` on the mount's root, at most `max` bytes; the outer error
/// is a bad argument, the inner one the call's.
fn root_xattr(
    mnt: &Path,
    name: &[u8],
    max: usize,
) -> Result<Result<Vec<u8>, std::io::Error>, String> {
    let path = cpath(mnt)?;
    let name = CString::new(name).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; max];
    // SAFETY: valid NUL-terminated strings and a buffer of the stated length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Ok(Err(std::io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(Ok(buf))
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("bad path {}", p.display()))
}

/// Send a control command (`flush`, `evict`) to the daemon.
pub fn control(mnt: &Path, what: &str) -> Result<(), String> {
    let path = cpath(mnt)?;
    let name = CString::new(XATTR_CONTROL).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated strings and a value of the stated length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            what.as_ptr().cast(),
            what.len(),
            0,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EROFS) {
            return Err(format!(
                "{}: {what} refused: the mount is read-only (remounted ro, or mounted -o ro)",
                mnt.display()
            ));
        }
        if e.raw_os_error() == Some(libc::EPERM) {
            return Err(format!(
                "{}: {what} refused: only root and the user who mounted it may {what} a nacrithfs volume",
                mnt.display()
            ));
        }
        return Err(format!(
            "{}: {what} failed: {e}; is it a nacrithfs mount?",
            mnt.display()
        ));
    }
    Ok(())
}

pub fn human(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} KB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `nacrithfs status [--json]`.
pub fn print_status(mnt: &Path, json: bool, backends: bool) -> Result<(), String> {
    let s = Status::read(mnt)?;
    let census = if backends {
        Some(read_backends(mnt)?)
    } else {
        None
    };
    if json {
        let mut text = s.to_json();
        if let Some(c) = &census {
            // `{..}\n` becomes `{.., "backends": [..]}\n`.
            let rows: Vec<String> = c
                .iter()
                .map(|(tag, n)| {
                    format!(
                        "    {{\"backend\": \"{}\", \"blobs\": {}, \"files\": {}, \"bytes\": {}}}",
                        json_escape(tag),
                        n.blobs,
                        n.files,
                        n.bytes
                    )
                })
                .collect();
            let body = text.trim_end().trim_end_matches('}').trim_end().to_string();
            let sep = if body.ends_with('{') { "" } else { "," };
            text = format!(
                "{body}{sep}\n  \"backends\": [\n{}\n  ]\n}}\n",
                rows.join(",\n")
            );
        }
        print!("{text}");
        return Ok(());
    }
    let logical = s.get("logical_bytes");
    let stored = s.get("stored_bytes");
    let busy = s.float("busy_seconds");
    println!(
        "files         {} ({} compressed, {} dirty: {})",
        s.get("files"),
        s.get("compressed"),
        s.get("dirty"),
        human(s.get("dirty_bytes"))
    );
    println!(
        "queue         {} queued, {} due now, {} compressing",
        s.get("queued"),
        s.get("due"),
        s.get("compressing")
    );
    let (disk, stored_disk, index) = (
        s.get("disk_bytes"),
        s.get("stored_disk_bytes"),
        s.get("index_bytes"),
    );
    let ratio = |of: u64| {
        if of > 0 {
            logical as f64 / of as f64
        } else {
            1.0
        }
    };
    // The second ratio is the one the disk sees: small blobs take whole blocks.
    println!(
        "size          {} logical, {} stored, ratio {:.2} ({:.2} in whole blocks)",
        human(logical),
        human(stored),
        ratio(stored),
        ratio(stored_disk)
    );
    println!(
        "disk          {} used in the backing directory: {} stored forms, {} clean copies (in whole blocks), {} index",
        human(disk),
        human(stored_disk),
        human(disk.saturating_sub(stored_disk + index)),
        human(index)
    );
    let (pack_disk, pack_live) = (s.get("pack_disk_bytes"), s.get("pack_live_bytes"));
    println!(
        "packs         {} pack files, {} on disk, {} of it referenced ({:.0}%)",
        s.get("packs"),
        human(pack_disk),
        human(pack_live),
        if pack_disk > 0 {
            100.0 * pack_live as f64 / pack_disk as f64
        } else {
            100.0
        }
    );
    println!("cache         {} of plaintext", human(s.get("cache_bytes")));
    let bytes_in = s.get("bytes_in");
    let per_busy_second = |v: u64| if busy > 0.0 { v as f64 / busy } else { 0.0 };
    println!(
        "workers       {} files compressed since mount, {} -> {}, {:.2} KB/s, {:.0} tokens/s while busy ({} chunk jobs waiting)",
        s.get("compressed_since_mount"),
        human(bytes_in),
        human(s.get("bytes_out")),
        per_busy_second(bytes_in) / 1e3,
        per_busy_second(s.get("symbols_coded")),
        s.get("chunk_jobs_queued"),
    );
    println!(
        "duplicates    {} files stored as an equal file's blob since mount ({} not written)",
        s.get("shared_files"),
        human(s.get("shared_bytes"))
    );
    println!(
        "groups        {} small files stored in solid groups since mount (coded together, one blob per group)",
        s.get("grouped_files")
    );
    println!(
        "superseded    {} compressions dropped: the file changed, or the blob to share went",
        s.get("superseded")
    );
    println!(
        "reads         {} files decompressed since mount ({} regions decoded for reads)",
        s.get("decompressions"),
        s.get("regions_decoded")
    );
    println!(
        "errors        {} compression failures, {} verify failures, {} decompression failures",
        s.get("failures"),
        s.get("verify_failures"),
        s.get("decompress_failures")
    );
    if let Some(c) = census {
        println!("backends      blobs per backend (a census of every blob header):");
        if c.is_empty() {
            println!("              (no compressed files)");
        }
        for (tag, n) in &c {
            println!(
                "              {} blobs, {} files, {}: {tag}",
                n.blobs,
                n.files,
                human(n.bytes)
            );
        }
    }
    Ok(())
}

/// Blobs per backend on the mount (`user.nacrith.backends`; root and the mounter only).
pub fn read_backends(
    mnt: &Path,
) -> Result<std::collections::BTreeMap<String, crate::store::backends::BackendCount>, String> {
    let buf = root_xattr(mnt, XATTR_BACKENDS, 1 << 16)?.map_err(|e| {
        format!(
            "{}: cannot count blobs per backend ({e}){}",
            mnt.display(),
            if e.raw_os_error() == Some(libc::EPERM) {
                "; only root and the user who mounted may"
            } else {
                ""
            }
        )
    })?;
    Ok(crate::store::backends::from_text(&String::from_utf8_lossy(
        &buf,
    )))
}

fn json_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `nacrithfs metrics [--textfile PATH [--interval SECONDS]]`: to stdout, or written
/// atomically (temp file, rename) to PATH for node_exporter's textfile collector, once
/// or every SECONDS until killed.
pub fn metrics(mnt: &Path, textfile: Option<&Path>, interval: Option<u64>) -> Result<(), String> {
    let Some(path) = textfile else {
        print!("{}", Status::read(mnt)?.to_prometheus(mnt));
        return Ok(());
    };
    loop {
        // A read that fails (the mount is gone) ends the loop with the error: a stale
        // file would say the volume is fine.
        let text = Status::read(mnt)?.to_prometheus(mnt);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        // A new file, never one that is there: in a directory others can write to, a
        // link planted at the name would otherwise have root truncate its target.
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| {
                // Readable by the collector, whoever runs it.
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                f.write_all(text.as_bytes())
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("writing {}: {e}", path.display()));
        }
        match interval {
            Some(secs) => std::thread::sleep(Duration::from_secs(secs.max(1))),
            None => return Ok(()),
        }
    }
}

/// `nacrithfs compact`: one compaction pass now (it also runs every few minutes).
pub fn compact(mnt: &Path) -> Result<(), String> {
    let before = Status::read(mnt)?;
    control(mnt, "compact")?;
    let after = Status::read(mnt)?;
    println!(
        "packs: {} -> {} files, {} -> {} on disk ({} referenced)",
        before.get("packs"),
        after.get("packs"),
        human(before.get("pack_disk_bytes")),
        human(after.get("pack_disk_bytes")),
        human(after.get("pack_live_bytes"))
    );
    Ok(())
}

/// `nacrithfs evict`.
pub fn evict(mnt: &Path) -> Result<(), String> {
    let before = Status::read(mnt)?.get("cache_bytes");
    control(mnt, "evict")?;
    let after = Status::read(mnt)?.get("cache_bytes");
    println!(
        "evicted {} of clean plaintext ({} remain: dirty or in use)",
        human(before.saturating_sub(after)),
        human(after)
    );
    Ok(())
}

/// Bytes of plaintext per symbol the status counts (English: ~3.6 bytes a token, each
/// token counted when coded and again when the new blob is verified).
const BYTES_PER_SYMBOL: f64 = 1.8;

/// How often `flush` prints a progress line when not on a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(30);

/// Progress of a long job (flush, recode): files and bytes done of the total, tokens/s,
/// ETA; a bar on a terminal, else a line every [`PLAIN_EVERY`] on stderr.
pub struct Progress {
    what: &'static str,
    /// Plaintext bytes one counted symbol stands for, to estimate the bytes of files
    /// still in progress (bytes count only when a file is done).
    bytes_per_symbol: f64,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    pub fn new(what: &'static str, bytes_per_symbol: f64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{what} [{{elapsed_precise}}] {{wide_bar}} {{bytes}}/{{total_bytes}} {{msg}}"
                ))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            what,
            bytes_per_symbol,
            start: Instant::now(),
            bar,
            last_line: std::sync::Mutex::new(Instant::now()),
        }
    }

    pub fn show(&self, bytes: u64, bytes_total: u64, files: u64, files_total: u64, symbols: u64) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let tokens = symbols as f64 / secs;
        let estimate =
            bytes.max(((symbols as f64 * self.bytes_per_symbol) as u64).min(bytes_total));
        let eta = if estimate > 0 {
            duration(secs * bytes_total.saturating_sub(estimate) as f64 / estimate as f64)
        } else {
            "?".into()
        };
        let msg = format!("{files}/{files_total} files, {tokens:.0} tokens/s, ETA {eta}");
        match &self.bar {
            Some(b) => {
                b.set_length(bytes_total.max(1));
                b.set_position(bytes.min(bytes_total));
                b.set_message(msg);
            }
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= PLAIN_EVERY {
                    eprintln!(
                        "{}: {} of {}, {msg}",
                        self.what,
                        human(bytes),
                        human(bytes_total)
                    );
                    *last = Instant::now();
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `nacrithfs flush`: queue every closed dirty file now and wait until the queue is
/// done. Progress (files and bytes done of what was dirty, tokens/s, ETA) as a bar on a
/// terminal, as a line every 30 s otherwise.
pub fn flush(mnt: &Path) -> Result<(), String> {
    let start = Status::read(mnt)?;
    let (files_total, bytes_total) = (start.get("dirty"), start.get("dirty_bytes"));
    control(mnt, "flush")?;
    let render = Progress::new("flush", BYTES_PER_SYMBOL);
    loop {
        let s = Status::read(mnt)?;
        let files = s
            .get("compressed_since_mount")
            .saturating_sub(start.get("compressed_since_mount"))
            + s.get("superseded").saturating_sub(start.get("superseded"));
        let bytes = s
            .get("bytes_in")
            .saturating_sub(start.get("bytes_in"))
            .min(bytes_total);
        let symbols = s
            .get("symbols_coded")
            .saturating_sub(start.get("symbols_coded"));
        let done = s.get("due") == 0 && s.get("compressing") == 0;
        if !done {
            render.show(
                bytes,
                bytes_total,
                files.min(files_total),
                files_total,
                symbols,
            );
        } else {
            render.finish();
            let failed = s.get("failures").saturating_sub(start.get("failures"));
            println!(
                "flushed: {} files compressed, {} dirty (open for writing or failed)",
                s.get("compressed"),
                s.get("dirty")
            );
            if failed > 0 {
                return Err(format!(
                    "{failed} compressions failed (the files stay uncompressed; see the daemon's log)"
                ));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
