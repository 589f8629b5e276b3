//! `nacrith gpu-check`: one run that says whether a machine's accelerator can be trusted
//! with the coder and how fast it is, made for a GPU machine lent for a few minutes
//! (`scripts/gpu-check` brings the binary and the model there). Without a usable GPU the
//! same run happens on the CPU (a dry run of the script).
//!
//! (a) a stream's logits are bit-identical alone, in a batch whose other lanes join,
//!     leave and slide, and in prefill runs ([`crate::model::invariance`]);
//! (b) a text compressed and decompressed round trip, byte-exact;
//! (c) a sweep of lanes per context and contexts per device: compress and decompress
//!     tokens/s of the real coder, and the memory used.
//!
//! Every part runs even when an earlier one fails; the result says which failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::codec::{self, CompressOptions, DecompressOptions, Engine};
use crate::model::invariance::{self, Plan};
use crate::model::llama::gpus;
use crate::model::ModelRuntime;
use crate::pool::{self, DEFAULT_LANES};

/// What to run; `nacrith gpu-check --help` documents each.
pub struct Config {
    pub model: std::path::PathBuf,
    /// Real text: the check's streams, the round trip and the sweep are cut from it.
    pub text: Vec<u8>,
    /// Positions the invariance check compares (None: past two KV slides).
    pub positions: Option<usize>,
    pub check_lanes: usize,
    pub max_run: usize,
    pub round_trip_bytes: usize,
    pub lanes: Vec<usize>,
    pub contexts: Vec<usize>,
    /// Bytes each lane codes in a sweep setting (the chunk size of its blob).
    pub sweep_chunk: usize,
    /// Sweep settings not started by then (from the start of the run) are skipped.
    pub deadline: Duration,
}

/// Run everything, printing as it goes. Ok(true) when every check passed.
pub fn run(cfg: &Config) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let devices = gpus()?;
    match devices.first() {
        Some(d) => println!("device: {d:?} ({} of this model)", devices.len()),
        None => println!(
            "device: no usable GPU ({}): everything below runs on the CPU",
            if cfg!(feature = "cuda") {
                "none found, or NACRITH_CPU_ONLY is set"
            } else {
                "this build has no cuda feature"
            }
        ),
    }
    let mut ok = true;
    ok &= check_invariance(cfg)?;
    ok &= round_trip(cfg)?;
    ok &= sweep(cfg, t0)?;
    println!(
        "gpu-check: {} in {:.0} s",
        if ok { "PASS" } else { "FAIL" },
        t0.elapsed().as_secs_f64()
    );
    Ok(ok)
}

fn check_invariance(cfg: &Config) -> anyhow::Result<bool> {
    let t = Instant::now();
    let rt = ModelRuntime::load(&cfg.model)?;
    let params = rt.default_params();
    println!("backend: {}", rt.backend_tag);
    let all = rt.feed_tokens(&cfg.text);
    let slides = invariance::past_two_slides(&params);
    let positions = cfg.positions.unwrap_or(slides).min(all.len());
    // The other lanes read the second half of the text, the target the first.
    let (target, others) = all.split_at(all.len() / 2);
    let positions = positions.min(target.len());
    let plan = Plan {
        target,
        others,
        positions,
        lanes: cfg.check_lanes,
        max_run: cfg.max_run,
    };
    let what = format!(
        "(a) logits alone vs {} lanes joining/leaving vs prefill runs up to {}, {positions} positions{}",
        cfg.check_lanes.max(3),
        cfg.max_run,
        if positions >= slides {
            ", past two KV slides"
        } else {
            " (NOT past a KV slide: a dry run)"
        }
    );
    let r = invariance::check(&rt, &params, &plan);
    let secs = t.elapsed().as_secs_f64();
    match r {
        Ok(_) => {
            println!("{what}: identical ({secs:.0} s)");
            Ok(true)
        }
        Err(e) => {
            println!("{what}: FAIL: {e} ({secs:.0} s)");
            Ok(false)
        }
    }
}

/// One round trip through a pool: blob size, seconds and symbols each way, whether the
/// bytes came back. (A text too short to gain from the model is stored with zstd: then
/// nothing is decoded by the model.)
struct Trip {
    blob_len: usize,
    comp: f64,
    dec: f64,
    symbols: u64,
    dec_symbols: u64,
    same: bool,
}

impl Trip {
    fn comp_rate(&self) -> f64 {
        self.symbols as f64 / self.comp.max(1e-9)
    }
    fn dec_rate(&self) -> f64 {
        self.dec_symbols as f64 / self.dec.max(1e-9)
    }
}

fn trip(pool: &dyn Engine, data: &[u8], opts: &CompressOptions) -> anyhow::Result<Trip> {
    let count = AtomicU64::new(0);
    let tick = |n: usize| {
        count.fetch_add(n as u64, Ordering::Relaxed);
    };
    let t = Instant::now();
    let blob = codec::compress(data, Some(pool), opts, &tick)?;
    let comp = t.elapsed().as_secs_f64();
    let symbols = count.swap(0, Ordering::Relaxed);
    let t = Instant::now();
    let back = codec::decompress(&blob, Some(pool), &DecompressOptions::default(), &tick)?;
    Ok(Trip {
        blob_len: blob.len(),
        comp,
        dec: t.elapsed().as_secs_f64(),
        symbols,
        dec_symbols: count.load(Ordering::Relaxed),
        same: back == data,
    })
}

/// The first `n` bytes of the text, cycled if it is shorter.
fn cut(text: &[u8], n: usize) -> Vec<u8> {
    text.iter().copied().cycle().take(n).collect()
}

fn round_trip(cfg: &Config) -> anyhow::Result<bool> {
    let pool = pool::load(&cfg.model, None, DEFAULT_LANES)?;
    let data = cut(&cfg.text, cfg.round_trip_bytes);
    let r = trip(&pool, &data, &CompressOptions::default())?;
    println!(
        "(b) round trip, default pool: {} -> {} bytes ({:.3} bits/byte), compress {:.1} s ({:.0} tok/s), decompress {:.1} s ({:.0} tok/s): {}",
        data.len(),
        r.blob_len,
        codec::bits_per_byte(r.blob_len as u64, data.len() as u64),
        r.comp,
        r.comp_rate(),
        r.dec,
        r.dec_rate(),
        if r.same { "identical" } else { "FAIL: differs" }
    );
    Ok(r.same)
}

/// GPU memory in use now (MiB, every GPU summed), from nvidia-smi; None without one.
fn gpu_memory_mib() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

/// This process's resident memory (MiB).
fn rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024)
}

fn sweep(cfg: &Config, t0: Instant) -> anyhow::Result<bool> {
    let mut ok = true;
    println!(
        "(c) sweep: each lane codes a {}-byte chunk; tok/s of the whole coder (model + ensemble)",
        cfg.sweep_chunk
    );
    println!(
        "{:>8} {:>6} {:>10} {:>14} {:>16} {:>9} {:>8}",
        "contexts", "lanes", "bytes", "compress tok/s", "decompress tok/s", "GPU MiB", "RSS MiB"
    );
    for &contexts in &cfg.contexts {
        for &lanes in &cfg.lanes {
            if t0.elapsed() > cfg.deadline {
                println!("{contexts:>8} {lanes:>6} skipped: past the run's time budget");
                continue;
            }
            let pool = pool::load(&cfg.model, Some(contexts), lanes)?;
            let data = cut(&cfg.text, contexts * lanes * cfg.sweep_chunk);
            let opts = CompressOptions {
                chunk_size: cfg.sweep_chunk,
                head_chunk: 0,
                ..CompressOptions::default()
            };
            let r = trip(&pool, &data, &opts)?;
            let mem = |m: Option<u64>| m.map_or("-".to_string(), |m| m.to_string());
            println!(
                "{contexts:>8} {lanes:>6} {:>10} {:>14.0} {:>16.0} {:>9} {:>8}{}",
                data.len(),
                r.comp_rate(),
                r.dec_rate(),
                mem(gpu_memory_mib()),
                mem(rss_mib()),
                if !r.same {
                    "  FAIL: round trip differs"
                } else if r.dec_symbols == 0 {
                    "  (stored with zstd: chunks too short for the model)"
                } else {
                    ""
                }
            );
            ok &= r.same;
        }
    }
    Ok(ok)
}
