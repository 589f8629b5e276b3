//! The threads that do the slow work away from the FUSE threads: the compressor (takes
//! due files from the persistent queue, compresses, verifies, commits the blob durably)
//! and the decompressor (turns a blob back into a cached plaintext file, then answers
//! every request that was waiting for it).

use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::core::Core;
use crate::codec::{self, CompressOptions, DecompressOptions, Engine};
use crate::store::write_durably;

pub fn start(
    core: Arc<Core>,
    decompress_rx: Receiver<u64>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    // A read-only mount leaves the blobs as they are; queued files wait for a
    // read-write mount.
    if !core.opts.read_only {
        let c = core.clone();
        threads.push(
            std::thread::Builder::new()
                .name("nacrith-compress".into())
                .spawn(move || compressor(&c))?,
        );
    }
    threads.push(
        std::thread::Builder::new()
            .name("nacrith-decompress".into())
            .spawn(move || decompressor(&core, decompress_rx))?,
    );
    Ok(threads)
}

fn compressor(core: &Core) {
    loop {
        if core.is_shutting_down() {
            return;
        }
        match core.next_due() {
            Ok(Ok((ino, version))) => {
                // A bug in the coder must not stop the queue or lose the file: it stays
                // plaintext and is retried later.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    compress_one(core, ino, version)
                }));
                if r.is_err() {
                    log::error!("compressing inode {ino} panicked; it stays uncompressed");
                    core.compression_failed(ino);
                }
            }
            Ok(Err(wait)) => {
                if !core.wait_for_work(wait) {
                    return;
                }
            }
            Err(e) => {
                log::error!("compression queue unreadable (errno {e}); retrying in 5 s");
                if !core.wait_for_work(Duration::from_secs(5)) {
                    return;
                }
            }
        }
    }
}

fn compress_one(core: &Core, ino: u64, version: u64) {
    let path = match core.claim(ino) {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => {
            log::error!("claiming inode {ino} for compression: errno {e}");
            return;
        }
    };
    let start = Instant::now();
    let name = core.describe(ino);
    let fail = |why: String| {
        log::error!("compressing {name}: {why}; it stays uncompressed and will be retried");
        core.compression_failed(ino);
    };
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => return fail(format!("reading its plaintext: {e}")),
    };
    let opts = CompressOptions {
        chunk_size: core.opts.chunk_size,
        ..CompressOptions::default()
    };
    // Without the model nothing is compressed (not even with zstd): a text file stored
    // with zstd now would stay that way, so it waits as plaintext for the model.
    let pool = match core.engine.get() {
        Ok(p) => p,
        Err(e) => return fail(format!("the model is unavailable: {e}")),
    };
    let engine: &dyn Engine = &*pool;
    let mut blob = match codec::compress(&data, Some(engine), &opts, &|_| {}) {
        Ok(b) => b,
        Err(e) => return fail(e.to_string()),
    };
    if core.opts.verify {
        let ok = matches!(
            codec::decompress(&blob, Some(engine), &DecompressOptions::default(), &|_| {}),
            Ok(ref back) if *back == data
        );
        if !ok {
            // Invariant: never replace plaintext with a blob that did not decode back.
            log::error!(
                "compressing {name}: the new blob did not decode to the same bytes; storing it with zstd instead"
            );
            core.count_verify_failure();
            blob = match codec::compress(&data, None, &opts, &|_| {}) {
                Ok(b) => b,
                Err(e) => return fail(e.to_string()),
            };
            match codec::decompress(&blob, None, &DecompressOptions::default(), &|_| {}) {
                Ok(back) if back == data => {}
                _ => return fail("the zstd fallback did not verify either".into()),
            }
        }
    }
    let seq = match core.store.alloc_blob_seq() {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let blob_path = core.store.blob_path(ino, seq);
    if let Err(e) = write_durably(&blob_path, &blob) {
        let _ = std::fs::remove_file(&blob_path);
        return fail(format!("writing {}: {e}", blob_path.display()));
    }
    pause_before_commit(&blob_path);
    let took = start.elapsed();
    match core.commit_blob(
        ino,
        version,
        seq,
        blob.len() as u64,
        data.len() as u64,
        took,
    ) {
        Ok(true) => log::info!(
            "compressed {name}: {} -> {} bytes ({:.3} bits/byte) in {:.1} s",
            data.len(),
            blob.len(),
            codec::bits_per_byte(blob.len() as u64, data.len() as u64),
            took.as_secs_f64()
        ),
        Ok(false) => {
            log::debug!("{name} changed while compressing; blob dropped");
            let _ = std::fs::remove_file(&blob_path);
        }
        Err(e) => {
            let _ = std::fs::remove_file(&blob_path);
            fail(format!("committing the blob: errno {e}"));
        }
    }
    core.enforce_cache_cap();
}

/// Fault injection for the crash test: with NACRITHFS_FAULT_PAUSE_BEFORE_COMMIT_MS set,
/// wait that long between writing a blob durably and committing it to the index, so a
/// kill lands exactly mid-commit. Never set in normal use.
fn pause_before_commit(blob: &std::path::Path) {
    static PAUSE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("NACRITHFS_FAULT_PAUSE_BEFORE_COMMIT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(ms) = *pause {
        log::warn!(
            "fault injection: {} is written, pausing {ms} ms before committing it",
            blob.display()
        );
        std::thread::sleep(Duration::from_millis(ms));
    }
}

fn decompressor(core: &Core, rx: Receiver<u64>) {
    loop {
        let ino = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(ino) => ino,
            Err(RecvTimeoutError::Timeout) => {
                if core.is_shutting_down() {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match core.blob_of(ino) {
            Ok(None) => core.materialized(ino, None, Ok(())),
            Ok(Some((path, size, blob))) => {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    materialize(core, ino, &path, size)
                }))
                .unwrap_or_else(|_| Err((libc::EIO, "the decoder panicked".into())));
                let r = r.map_err(|(errno, why)| {
                    // Readers retry (the kernel and cat both do): one line per bad blob.
                    if core.first_failure_of(ino, blob) {
                        log::error!("cannot read {}: {why}", core.describe(ino));
                    } else {
                        log::debug!("cannot read inode {ino} (again): {why}");
                    }
                    errno
                });
                core.materialized(ino, Some(blob), r);
            }
            Err(e) => core.materialized(ino, None, Err(e)),
        }
    }
}

/// Decode the blob of `ino` into its cache temp file; on failure, the errno for the
/// reader and what went wrong.
fn materialize(
    core: &Core,
    ino: u64,
    path: &std::path::Path,
    size: u64,
) -> Result<(), (i32, String)> {
    let fail = |why: String| (libc::EIO, why);
    let data = std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    // Only blobs with LLM segments need the model: zstd-only files stay readable without it.
    let (header, _) = crate::codec::container::Header::parse(&data, Some(data.len() as u64))
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let pool = if header.has_llm_segments() {
        Some(core.engine.get().map_err(|e| {
            fail(format!(
                "{} needs the model, which is unavailable: {e}",
                path.display()
            ))
        })?)
    } else {
        None
    };
    let engine = pool.as_deref().map(|p| p as &dyn Engine);
    let plain = codec::decompress(&data, engine, &DecompressOptions::default(), &|_| {})
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    if plain.len() as u64 != size {
        return Err(fail(format!(
            "{} decodes to {} bytes but the index says {size}",
            path.display(),
            plain.len()
        )));
    }
    let tmp = core.store.cache_tmp_path(ino);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&plain)?;
        // The clean copy will be recorded as cached: make it as durable as the record.
        f.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        (
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("writing its plaintext to {}: {e}", tmp.display()),
        )
    })
}
