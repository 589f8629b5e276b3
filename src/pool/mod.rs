//! The worker pool, shared by every file of a mount: one thread per worker, each owning
//! one single-threaded llama.cpp context (created on its first job, dropped after a
//! while idle) that advances many chunk streams in lockstep. Jobs from every file wait
//! in one queue; a worker fills a free lane as soon as one of its streams ends, taking
//! the most urgent job first (a reader's chunk before read-ahead before compression).
//!
//! With GPUs (the `cuda` feature), the model is loaded once per GPU and each worker's
//! context lives on its GPU.
//!
//! Why contexts and not threads per context: with two threads in one context, llama.cpp
//! splits attention work by thread and the logits start to depend on it past 256
//! positions; with one thread they do not depend on which lanes share a step.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::codec::lanes::{
    run_lanes, ChunkJob, ChunkOutput, JobSource, Taken, BACKGROUND, CANCELLED,
};
use crate::codec::params::CoderParams;
use crate::codec::tokenizer::TextTokenizer;
use crate::codec::Engine;
use crate::model::llama::{gpus, Device};
use crate::model::{ModelError, ModelRuntime};

/// Default lanes per context for background work: measured here (2-core x86-64-v3),
/// 16 lanes give ~1.2x one stream's tokens/s per context.
pub const DEFAULT_LANES: usize = 16;
/// Lanes per context kept free for reads, so a read starts at the next step even when
/// compression fills every other lane.
pub const READ_LANES: usize = 4;
/// A worker with nothing to do keeps its context this long (creating one costs ~0.1 s
/// and, at 20 lanes, ~1 GB of KV cache that an idle daemon should give back).
const IDLE_KEEP: Duration = Duration::from_secs(30);

pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What `workers` (the `workers=` option) means: workers per GPU when there are GPUs
/// (default 1), else workers in all (default: one per core).
fn workers_per_device(workers: Option<usize>, on_gpus: bool) -> usize {
    let default = if on_gpus { 1 } else { default_workers() };
    workers.unwrap_or(default).max(1)
}

/// Worker threads a pool made with `workers` will run.
pub fn total_workers(workers: Option<usize>) -> usize {
    let devices = gpus().map_or(0, |g| g.len());
    workers_per_device(workers, devices > 0) * devices.max(1)
}

/// Load the model and start a pool: one copy of the model per GPU, or without GPUs one
/// copy on the CPU, with [`workers_per_device`] single-threaded workers each.
pub fn load(path: &Path, workers: Option<usize>, lanes: usize) -> Result<LocalPool, ModelError> {
    let gpus = gpus()?;
    let per_device = workers_per_device(workers, !gpus.is_empty());
    if gpus.is_empty() {
        let runtime = ModelRuntime::load_on(path, &Device::Cpu)?;
        return Ok(LocalPool::new(runtime, per_device, lanes));
    }
    let runtimes = gpus
        .iter()
        .map(|d| ModelRuntime::load_on(path, d))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LocalPool::on_devices(runtimes, per_device, lanes))
}

/// The answer to one submitted job.
pub struct Done {
    pub tag: u64,
    pub result: Result<ChunkOutput, ModelError>,
}

/// One chunk job for the pool. `priority` (a tier from [`crate::codec::lanes`]) may be
/// raised while the job waits or runs; `progress` counts its coded symbols.
pub struct Submit {
    pub tag: u64,
    pub job: ChunkJob,
    pub priority: Arc<AtomicU8>,
    pub progress: Option<Arc<AtomicUsize>>,
    pub reply: Sender<Done>,
}

impl Submit {
    fn answer_cancelled(self) {
        let _ = self.reply.send(Done {
            tag: self.tag,
            result: Err(cancelled()),
        });
    }
}

/// The answer to a job its owner cancelled (nobody reads it but the owner's books).
fn cancelled() -> ModelError {
    ModelError::Runtime("cancelled".into())
}

struct Queue {
    jobs: VecDeque<Submit>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The coder parameters the shared contexts run (the model's defaults).
    params: CoderParams,
    /// Jobs each worker holds in its lanes ([`UNAVAILABLE`] for a worker that cannot
    /// take any). A busy worker leaves new jobs to a less busy one: otherwise the first
    /// worker to create its context takes a whole file's chunks while the others are
    /// still allocating theirs, and a 10-chunk file runs on one core.
    load: Vec<AtomicUsize>,
    /// Set at unmount: callers of [`Engine::run`] stop waiting and cancel their jobs, so
    /// that compressions end within a step instead of running on for minutes.
    stop_background: AtomicBool,
}

const UNAVAILABLE: usize = usize::MAX;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether worker `me` holds more jobs than some other worker that can take them.
    fn busier_than_another(&self, me: usize) -> bool {
        let mine = self.load[me].load(Ordering::Relaxed);
        self.load
            .iter()
            .enumerate()
            .any(|(w, l)| w != me && l.load(Ordering::Relaxed) < mine)
    }

    /// The most urgent waiting job (first come first served within a tier); background
    /// jobs only if `background_ok`. Cancelled jobs are answered and dropped on the way.
    fn pop(q: &mut Queue, background_ok: bool) -> Option<Submit> {
        if q.jobs
            .iter()
            .any(|s| s.priority.load(Ordering::Relaxed) == CANCELLED)
        {
            let (cancelled, kept) = std::mem::take(&mut q.jobs)
                .into_iter()
                .partition(|s| s.priority.load(Ordering::Relaxed) == CANCELLED);
            q.jobs = kept;
            for s in cancelled {
                s.answer_cancelled();
            }
        }
        let mut best: Option<(usize, u8)> = None;
        for (i, s) in q.jobs.iter().enumerate() {
            let p = s.priority.load(Ordering::Relaxed);
            // (One cancelled since the sweep above waits for the next.)
            if p != CANCELLED
                && (p > BACKGROUND || background_ok)
                && best.is_none_or(|(_, bp)| p > bp)
            {
                best = Some((i, p));
            }
        }
        best.and_then(|(i, _)| q.jobs.remove(i))
    }
}

pub struct LocalPool {
    /// The model as loaded on the first device: tokenizer, fingerprint, backend tag.
    pub runtime: Arc<ModelRuntime>,
    /// Worker threads in all.
    pub workers: usize,
    pub lanes: usize,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// The queue of the one thread that runs jobs with other parameters than the shared
    /// contexts' (started on first use): one private context at a time, whatever a blob
    /// asks for (a hostile blob's thousands of chunks used to start a thread each).
    private: Mutex<Option<Sender<(CoderParams, Submit)>>>,
    /// Private threads started so far (one, unless one died).
    private_started: AtomicUsize,
}

impl LocalPool {
    /// Start `workers` worker threads (their contexts are created on first use), each
    /// running up to `lanes` background streams plus [`READ_LANES`] for reads.
    pub fn new(runtime: ModelRuntime, workers: usize, lanes: usize) -> LocalPool {
        LocalPool::on_devices(vec![runtime], workers, lanes)
    }

    /// `per_device` workers for each loaded copy of the model (one copy per GPU), worker
    /// threads of one device after the other. Every copy must code identically: same
    /// file, same backend tag. `runtimes` is never empty.
    fn on_devices(runtimes: Vec<ModelRuntime>, per_device: usize, lanes: usize) -> LocalPool {
        let runtimes: Vec<Arc<ModelRuntime>> = runtimes.into_iter().map(Arc::new).collect();
        let runtime = runtimes[0].clone();
        let per_device = per_device.max(1);
        let workers = per_device * runtimes.len();
        let lanes = lanes.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
            params: runtime.default_params(),
            load: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            stop_background: AtomicBool::new(false),
        });
        let threads = (0..workers)
            .filter_map(|i| {
                let rt = runtimes[i / per_device].clone();
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("nacrith-worker-{i}"))
                    .spawn(move || worker(&rt, &sh, i, lanes))
                    .map_err(|e| {
                        shared.load[i].store(UNAVAILABLE, Ordering::Relaxed);
                        log::error!("cannot start worker {i}: {e}")
                    })
                    .ok()
            })
            .collect();
        LocalPool {
            runtime,
            workers,
            lanes,
            shared,
            threads,
            private: Mutex::new(None),
            private_started: AtomicUsize::new(0),
        }
    }

    /// Queue one job; its answer arrives on `s.reply`. Jobs whose parameters differ from
    /// the shared contexts' (blobs made with `nacrith --param`) run on a private context.
    pub fn submit(&self, params: &CoderParams, s: Submit) {
        if *params == self.shared.params {
            let mut q = self.shared.lock();
            if q.shutdown {
                drop(q);
                let _ = s.reply.send(Done {
                    tag: s.tag,
                    result: Err(ModelError::Runtime("the pool is shutting down".into())),
                });
                return;
            }
            q.jobs.push_back(s);
            drop(q);
            self.shared.wake.notify_all();
            return;
        }
        let mut private = self.private.lock().unwrap_or_else(|p| p.into_inner());
        if private.is_none() {
            let (tx, rx) = crossbeam_channel::unbounded::<(CoderParams, Submit)>();
            let rt = self.runtime.clone();
            let spawned = std::thread::Builder::new()
                .name("nacrith-private".into())
                .spawn(move || {
                    for (params, s) in rx {
                        // A job given up while it waited (its decode abandoned, a hostile
                        // blob's thousands of chunks among them) is answered, not run.
                        if s.priority.load(Ordering::Relaxed) == CANCELLED {
                            let _ = s.reply.send(Done {
                                tag: s.tag,
                                result: Err(cancelled()),
                            });
                            continue;
                        }
                        let job = s.job;
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run_private(&rt, &params, vec![job], 1, 1, &|_| {})
                        }))
                        .unwrap_or_else(|_| {
                            Err(ModelError::Runtime("a private coder panicked".into()))
                        })
                        .and_then(|mut v| v.pop().ok_or_else(lost));
                        let _ = s.reply.send(Done { tag: s.tag, result });
                    }
                });
            match spawned {
                Ok(_) => {
                    self.private_started.fetch_add(1, Ordering::Relaxed);
                    *private = Some(tx);
                }
                Err(e) => {
                    drop(private);
                    let why = format!("cannot start the private coder thread: {e}");
                    log::error!("{why}");
                    // Answered, never dropped: its reader would wait for it forever.
                    let _ = s.reply.send(Done {
                        tag: s.tag,
                        result: Err(ModelError::Runtime(why)),
                    });
                    return;
                }
            }
        }
        if let Some(tx) = private.as_ref() {
            if let Err(e) = tx.send((params.clone(), s)) {
                let (_, s) = e.into_inner();
                *private = None;
                let _ = s.reply.send(Done {
                    tag: s.tag,
                    result: Err(ModelError::Runtime(
                        "the private coder thread is gone".into(),
                    )),
                });
            }
        }
    }

    /// Make every [`Engine::run`] in progress or to come fail at once ("stopped"), its
    /// jobs cancelled (their lanes freed at the next step). Reads, submitted directly,
    /// go on.
    pub fn stop_background(&self) {
        self.shared.stop_background.store(true, Ordering::Relaxed);
    }

    /// Threads started for jobs with other parameters than the pool's, so far.
    pub fn private_threads_started(&self) -> usize {
        self.private_started.load(Ordering::Relaxed)
    }

    /// Jobs waiting for a lane (not counting those running).
    pub fn queued(&self) -> usize {
        self.shared.lock().jobs.len()
    }
}

impl Drop for LocalPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn lost() -> ModelError {
    ModelError::Runtime("a chunk job was lost".into())
}

fn worker(runtime: &ModelRuntime, shared: &Shared, me: usize, lanes: usize) {
    loop {
        // Hold no context while there is nothing to do.
        {
            let mut q = shared.lock();
            while q.jobs.is_empty() && !q.shutdown {
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.shutdown {
                return;
            }
        }
        shared.load[me].store(0, Ordering::Relaxed);
        let mut source = PoolSource {
            shared,
            me,
            active: HashMap::new(),
            next_id: 0,
        };
        // Caught like a panic in the lanes below: a worker thread that died here would
        // leave its jobs (and every read waiting on them) unanswered for good.
        let lm = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::crash::panic_point("pool.context");
            runtime.lanes(lanes + READ_LANES, &shared.params)
        }))
        .unwrap_or_else(|_| {
            Err(ModelError::Runtime(
                "creating a coder context panicked".into(),
            ))
        });
        let outcome = match lm {
            Ok(mut lm) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_lanes(
                    &mut lm,
                    &shared.params,
                    &runtime.allowed,
                    lanes,
                    &mut source,
                )
            }))
            .unwrap_or_else(|_| Err(ModelError::Runtime("a coder worker panicked".into()))),
            Err(e) => {
                // Fail the job that woke us, so its owner hears about it; then wait.
                let job = Shared::pop(&mut shared.lock(), true);
                if let Some(s) = job {
                    let _ = s.reply.send(Done {
                        tag: s.tag,
                        result: Err(e.clone()),
                    });
                }
                Err(e)
            }
        };
        if let Err(e) = outcome {
            if shared.lock().shutdown {
                log::debug!("coder worker: {e}");
            } else {
                log::error!("coder worker: {e}");
            }
            for (_, s) in source.active.drain() {
                let _ = s.reply.send(Done {
                    tag: s.tag,
                    result: Err(e.clone()),
                });
            }
            // Do not spin on a context that cannot be created, and let the other
            // workers take the queue meanwhile.
            shared.load[me].store(UNAVAILABLE, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

struct Running {
    tag: u64,
    progress: Option<Arc<AtomicUsize>>,
    reply: Sender<Done>,
}

/// A worker's view of the shared queue. It keeps each running job's reply channel so
/// that a failing step can still answer every job it held.
struct PoolSource<'a> {
    shared: &'a Shared,
    me: usize,
    active: HashMap<usize, Running>,
    next_id: usize,
}

impl PoolSource<'_> {
    /// Take job `id` off this worker and answer it.
    fn end(&mut self, id: usize, result: Result<ChunkOutput, ModelError>) {
        let ended = self.active.remove(&id);
        self.shared.load[self.me].store(self.active.len(), Ordering::Relaxed);
        if let Some(s) = ended {
            let _ = s.reply.send(Done { tag: s.tag, result });
        }
    }
}

impl JobSource for PoolSource<'_> {
    fn next(&mut self, block: bool, background_ok: bool) -> Option<Taken> {
        let mut q = self.shared.lock();
        let s = loop {
            if q.shutdown {
                return None;
            }
            if !block && self.shared.busier_than_another(self.me) {
                return None;
            }
            if let Some(s) = Shared::pop(&mut q, background_ok) {
                break s;
            }
            if !block {
                return None;
            }
            let (guard, timeout) = self
                .shared
                .wake
                .wait_timeout(q, IDLE_KEEP)
                .unwrap_or_else(|p| p.into_inner());
            q = guard;
            if timeout.timed_out() && q.jobs.is_empty() {
                return None;
            }
        };
        drop(q);
        let id = self.next_id;
        self.next_id += 1;
        let Submit {
            tag,
            job,
            priority,
            progress,
            reply,
        } = s;
        self.active.insert(
            id,
            Running {
                tag,
                progress,
                reply,
            },
        );
        self.shared.load[self.me].store(self.active.len(), Ordering::Relaxed);
        Some(Taken { id, job, priority })
    }

    fn finished(&mut self, id: usize, output: ChunkOutput) {
        self.end(id, Ok(output));
    }

    fn cancelled(&mut self, id: usize) {
        self.end(id, Err(cancelled()));
    }

    fn progress(&mut self, id: usize, symbols: usize) {
        if let Some(p) = self.active.get(&id).and_then(|s| s.progress.as_ref()) {
            p.fetch_add(symbols, Ordering::Relaxed);
        }
    }

    fn stop(&self) -> bool {
        self.shared.lock().shutdown
    }
}

/// Jobs with their own parameters, on contexts made for them (`workers` threads with
/// `lanes` lanes each), outputs in job order.
fn run_private(
    runtime: &ModelRuntime,
    params: &CoderParams,
    jobs: Vec<ChunkJob>,
    workers: usize,
    lanes: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<ChunkOutput>, ModelError> {
    struct Private<'a> {
        rx: Receiver<(usize, ChunkJob)>,
        results: &'a Mutex<Vec<Option<ChunkOutput>>>,
        progress: &'a (dyn Fn(usize) + Sync),
    }
    impl JobSource for Private<'_> {
        fn next(&mut self, _block: bool, _background_ok: bool) -> Option<Taken> {
            self.rx
                .try_recv()
                .ok()
                .map(|(id, job)| Taken::background(id, job))
        }
        fn finished(&mut self, id: usize, output: ChunkOutput) {
            self.results.lock().unwrap_or_else(|p| p.into_inner())[id] = Some(output);
        }
        fn progress(&mut self, _id: usize, symbols: usize) {
            (self.progress)(symbols);
        }
    }
    let n = jobs.len();
    let (tx, rx) = crossbeam_channel::unbounded();
    for job in jobs.into_iter().enumerate() {
        let _ = tx.send(job);
    }
    drop(tx);
    let workers = workers.clamp(1, n.max(1));
    // Contexts hold lanes x ctx_len tokens of KV cache: a blob with a longer context
    // gets fewer lanes, so its memory stays what the default parameters cost.
    let kv_tokens = DEFAULT_LANES * crate::codec::params::DEFAULT_CTX_LEN as usize;
    let lanes = lanes
        .min(n.div_ceil(workers))
        .min(kv_tokens / params.ctx_len.max(1) as usize)
        .max(1);
    let results = Mutex::new((0..n).map(|_| None).collect::<Vec<_>>());
    let outcomes: Vec<Result<(), ModelError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let rx = rx.clone();
                let results = &results;
                s.spawn(move || {
                    let mut lm = runtime.lanes(lanes, params)?;
                    let mut source = Private {
                        rx,
                        results,
                        progress,
                    };
                    run_lanes(&mut lm, params, &runtime.allowed, lanes, &mut source)
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
    results.into_iter().map(|r| r.ok_or_else(lost)).collect()
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

    /// Every job at background priority on the shared workers, so several callers (one
    /// per file being compressed) fill the same lanes.
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
        if *params != self.shared.params {
            return run_private(
                &self.runtime,
                params,
                jobs,
                self.workers,
                self.lanes,
                progress,
            );
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let coded = Arc::new(AtomicUsize::new(0));
        let priority = Arc::new(AtomicU8::new(BACKGROUND));
        for (i, job) in jobs.into_iter().enumerate() {
            self.submit(
                params,
                Submit {
                    tag: i as u64,
                    job,
                    priority: priority.clone(),
                    progress: Some(coded.clone()),
                    reply: tx.clone(),
                },
            );
        }
        // Only the workers hold senders now: if they all drop theirs, recv says so.
        drop(tx);
        let answers = collect(&rx, n, &coded, progress, &self.shared.stop_background);
        if answers.is_err() {
            // One chunk failed, so the file fails: its other chunks stop taking lanes.
            priority.store(CANCELLED, Ordering::Relaxed);
        }
        answers
    }
}

/// The answers to jobs tagged `0..n`, in tag order, reporting symbols coded as they go;
/// the first failure, or `stop`, ends the wait.
fn collect(
    rx: &Receiver<Done>,
    n: usize,
    coded: &AtomicUsize,
    progress: &(dyn Fn(usize) + Sync),
    stop: &AtomicBool,
) -> Result<Vec<ChunkOutput>, ModelError> {
    let mut out: Vec<Option<ChunkOutput>> = (0..n).map(|_| None).collect();
    let mut reported = 0;
    let mut received = 0;
    while received < n {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Done { tag, result }) => {
                let slot = out.get_mut(tag as usize).ok_or_else(lost)?;
                *slot = Some(result?);
                received += 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(lost()),
        }
        if stop.load(Ordering::Relaxed) {
            return Err(ModelError::Runtime(
                "stopped: the filesystem is being unmounted".into(),
            ));
        }
        let now = coded.load(Ordering::Relaxed);
        if now > reported {
            progress(now - reported);
            reported = now;
        }
    }
    out.into_iter().map(|r| r.ok_or_else(lost)).collect()
}

/// A pool whose model is loaded on first use, not at mount: a volume whose model file is
/// missing or broken still mounts and serves its plaintext and zstd-only files, and a
/// later attempt succeeds once the file is back. Once loaded, the model stays in memory.
pub struct LazyPool {
    path: std::path::PathBuf,
    workers: Option<usize>,
    lanes: usize,
    loaded: Mutex<Option<Arc<LocalPool>>>,
    /// [`LazyPool::stop_background`] was called (applies to a pool loaded later too).
    stopped: AtomicBool,
}

impl LazyPool {
    pub fn new(path: std::path::PathBuf, workers: Option<usize>, lanes: usize) -> LazyPool {
        LazyPool {
            path,
            workers,
            lanes,
            loaded: Mutex::new(None),
            stopped: AtomicBool::new(false),
        }
    }

    /// An already-loaded pool (tests, and callers that loaded the model themselves).
    pub fn with(pool: LocalPool) -> LazyPool {
        LazyPool {
            path: pool.runtime.path.clone(),
            workers: Some(pool.workers),
            lanes: pool.lanes,
            loaded: Mutex::new(Some(Arc::new(pool))),
            stopped: AtomicBool::new(false),
        }
    }

    /// [`LocalPool::stop_background`], now or as soon as the model is loaded.
    pub fn stop_background(&self) {
        let slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(p) = slot.as_ref() {
            p.stop_background();
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The pool if the model is already loaded (never loads it).
    pub fn loaded(&self) -> Option<Arc<LocalPool>> {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The loaded pool, loading the model now if this is the first use (or every
    /// earlier attempt failed).
    pub fn get(&self) -> Result<Arc<LocalPool>, ModelError> {
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let pool = Arc::new(load(&self.path, self.workers, self.lanes)?);
        if self.stopped.load(Ordering::Relaxed) {
            pool.stop_background();
        }
        log::info!(
            "model {} loaded ({}), backend {}, {} workers",
            self.path.display(),
            crate::codec::hex(&pool.runtime.fingerprint[..8]),
            pool.runtime.backend_tag,
            pool.workers
        );
        *slot = Some(pool.clone());
        Ok(pool)
    }
}
