//! The worker pool: one single-threaded llama.cpp context per worker, each advancing many
//! chunk streams in lockstep; jobs are handed out through a crossbeam channel so a worker
//! refills a lane as soon as one of its streams ends.

use std::sync::Mutex;

use crossbeam_channel::Receiver;

use crate::codec::lanes::{run_lanes, ChunkJob, ChunkOutput, JobSource};
use crate::codec::params::CoderParams;
use crate::codec::tokenizer::TextTokenizer;
use crate::codec::Engine;
use crate::model::{ModelError, ModelRuntime};

/// Default lanes per context: measured here, 16 lanes give ~1.2x one stream's tokens/s.
pub const DEFAULT_LANES: usize = 16;

pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub struct LocalPool {
    pub runtime: ModelRuntime,
    pub workers: usize,
    pub lanes: usize,
}

impl LocalPool {
    pub fn new(runtime: ModelRuntime, workers: usize, lanes: usize) -> LocalPool {
        LocalPool {
            runtime,
            workers: workers.max(1),
            lanes: lanes.max(1),
        }
    }
}

struct ChannelSource<'a> {
    rx: Receiver<(usize, ChunkJob)>,
    results: &'a Mutex<Vec<Option<ChunkOutput>>>,
    progress: &'a (dyn Fn(usize) + Sync),
}

impl JobSource for ChannelSource<'_> {
    fn next(&mut self, block: bool) -> Option<(usize, ChunkJob)> {
        if block {
            self.rx.recv().ok()
        } else {
            self.rx.try_recv().ok()
        }
    }

    fn finished(&mut self, id: usize, output: ChunkOutput) {
        let mut r = self.results.lock().unwrap_or_else(|p| p.into_inner());
        r[id] = Some(output);
    }

    fn progress(&mut self, symbols: usize) {
        (self.progress)(symbols);
    }
}

impl Engine for LocalPool {
    fn tokenizer(&self) -> &TextTokenizer {
        &self.runtime.tokenizer
    }

    fn fingerprint(&self) -> [u8; 32] {
        self.runtime.fingerprint
    }

    fn backend_tag(&self) -> &str {
        &self.runtime.backend_tag
    }

    fn default_params(&self) -> CoderParams {
        self.runtime.default_params()
    }

    fn run(
        &self,
        params: &CoderParams,
        jobs: Vec<ChunkJob>,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<ChunkOutput>, ModelError> {
        let n = jobs.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        for job in jobs.into_iter().enumerate() {
            // The receiver is alive until the workers below finish.
            let _ = tx.send(job);
        }
        drop(tx);
        let workers = self.workers.min(n);
        let lanes = self.lanes.min(n.div_ceil(workers));
        let results = Mutex::new((0..n).map(|_| None).collect::<Vec<_>>());
        // Contexts are created one at a time; start stepping only when all exist, so the
        // first worker does not take every job while the others are still starting.
        let ready = std::sync::Barrier::new(workers);
        let outcomes: Vec<Result<(), ModelError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let rx = rx.clone();
                    let results = &results;
                    let ready = &ready;
                    s.spawn(move || {
                        let lm = self.runtime.lanes(lanes, params);
                        ready.wait();
                        let mut lm = lm?;
                        let mut source = ChannelSource {
                            rx,
                            results,
                            progress,
                        };
                        run_lanes(&mut lm, params, &self.runtime.allowed, &mut source)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(ModelError::Runtime("a worker panicked".into())))
                })
                .collect()
        });
        for o in outcomes {
            o?;
        }
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results
            .into_iter()
            .map(|r| r.ok_or_else(|| ModelError::Runtime("a chunk job was lost".into())))
            .collect()
    }
}

/// A pool whose model is loaded on first use, not at mount: a volume whose model file is
/// missing or broken still mounts and serves its plaintext and zstd-only files, and a
/// later attempt succeeds once the file is back. Once loaded, the model stays in memory.
pub struct LazyPool {
    path: std::path::PathBuf,
    workers: usize,
    lanes: usize,
    loaded: Mutex<Option<std::sync::Arc<LocalPool>>>,
}

impl LazyPool {
    pub fn new(path: std::path::PathBuf, workers: usize, lanes: usize) -> LazyPool {
        LazyPool {
            path,
            workers,
            lanes,
            loaded: Mutex::new(None),
        }
    }

    /// An already-loaded pool (tests, and callers that loaded the model themselves).
    pub fn with(pool: LocalPool) -> LazyPool {
        LazyPool {
            path: pool.runtime.path.clone(),
            workers: pool.workers,
            lanes: pool.lanes,
            loaded: Mutex::new(Some(std::sync::Arc::new(pool))),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The loaded pool, loading the model now if this is the first use (or every
    /// earlier attempt failed).
    pub fn get(&self) -> Result<std::sync::Arc<LocalPool>, ModelError> {
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let runtime = ModelRuntime::load(&self.path)?;
        log::info!(
            "model {} loaded ({}), backend {}",
            self.path.display(),
            crate::codec::hex(&runtime.fingerprint[..8]),
            runtime.backend_tag
        );
        let pool = std::sync::Arc::new(LocalPool::new(runtime, self.workers, self.lanes));
        *slot = Some(pool.clone());
        Ok(pool)
    }
}
