//! `nacrith`: the standalone codec CLI (compress / decompress / info).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use nacrithfs::codec::container::{Header, SegmentKind};
use nacrithfs::codec::source::{FileSource, Source};
use nacrithfs::codec::{self, CompressOptions, DecompressOptions, Engine, FileSink, WriteSink};
use nacrithfs::model::find_model;
use nacrithfs::pool::{LocalPool, DEFAULT_LANES};

#[derive(Parser)]
#[command(
    name = "nacrith",
    version,
    about = "LLM-driven lossless compression of text (NC06 blobs)",
    // A flag given twice takes its last value (scripts/gpu-check passes its defaults
    // first, then the caller's arguments).
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// GGUF model file (default: $NACRITH_MODEL, then the installed default model)
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Worker contexts (each single-threaded; default: one per core; with GPUs: per GPU, default 1)
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Streams each context advances in lockstep
    #[arg(long, value_name = "B", default_value_t = DEFAULT_LANES)]
    batch: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compress a file (or `-` for stdin) into an NC06 blob
    Compress {
        input: PathBuf,
        /// Output file, or `-` for stdout (default: INPUT.nc06; stdout when INPUT is `-`)
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Text chunk size in bytes (chunks are coded independently)
        #[arg(long, default_value_t = codec::DEFAULT_CHUNK_SIZE)]
        chunk_size: usize,
        /// Target size of the first chunk (0: the chunk size); a read of a file's start
        /// waits for this chunk only
        #[arg(long, default_value_t = codec::DEFAULT_HEAD_CHUNK)]
        head_chunk: usize,
        /// Decode the blob again and compare before writing it
        #[arg(long)]
        verify: bool,
        /// Override a coder parameter (experiments): NAME=VALUE
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
    /// Decompress an NC06 blob (or `-` for stdin)
    Decompress {
        input: PathBuf,
        /// Output file, or `-` for stdout
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// Decode even if the blob was made on another backend (checksums still verified)
        #[arg(long)]
        force_backend: bool,
    },
    /// One run on a GPU machine (or, without a usable GPU, on the CPU as a dry run):
    /// logits invariance, a round trip, a lanes x contexts speed sweep. Exit 1 on a failed
    /// check. `scripts/gpu-check` prepares and runs it.
    GpuCheck {
        /// Real text to cut every input from (the sweep and the round trip cycle it)
        text: PathBuf,
        /// GGUF model file (default: $NACRITH_MODEL, then the installed default model)
        #[arg(long, value_name = "PATH")]
        model: Option<PathBuf>,
        /// Positions the invariance check compares (default: past two KV slides)
        #[arg(long)]
        positions: Option<usize>,
        /// Lanes of the batch the checked stream shares
        #[arg(long, default_value_t = 64)]
        check_lanes: usize,
        /// Longest prefill run the checked stream is fed in one call
        #[arg(long, default_value_t = 64)]
        max_run: usize,
        /// Bytes of the round trip
        #[arg(long, default_value_t = 1 << 20)]
        round_trip_bytes: usize,
        /// Lanes per context to sweep
        #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "16,32,64,128,256")]
        lanes: Vec<usize>,
        /// Contexts per device to sweep
        #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "1,2,3,4")]
        contexts: Vec<usize>,
        /// Bytes each lane codes in a sweep setting
        #[arg(long, default_value_t = 2048)]
        sweep_chunk: usize,
        /// Seconds from the start after which sweep settings are skipped
        #[arg(long, default_value_t = 420)]
        budget_secs: u64,
    },
    /// Show a blob's header, segments, chunks, ratio and bits per byte
    Info {
        input: PathBuf,
        /// List every chunk
        #[arg(long)]
        chunks: bool,
    },
}

fn read_input(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
    } else {
        buf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(buf)
}

/// Write atomically (temporary file, fsync, rename) so a failure never leaves half a file.
fn write_output(path: &Path, data: &[u8]) -> Result<()> {
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(data).context("writing stdout")?;
        return out.flush().context("writing stdout");
    }
    write_atomically(path, |f| {
        let mut f = f;
        f.write_all(data)?;
        Ok(())
    })
}

/// Fill a temporary file beside `path` with `fill`, fsync it and rename it over `path`:
/// a failure (a bad blob found late) never leaves half a file or replaces a good one.
fn write_atomically(path: &Path, fill: impl FnOnce(&std::fs::File) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&f).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn load_pool(args: &ModelArgs) -> Result<LocalPool> {
    let path = find_model(args.model.as_deref())?;
    Ok(nacrithfs::pool::load(&path, args.threads, args.batch)?)
}

fn progress_bar(total_symbols: u64, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || total_symbols < 2000 {
        return None;
    }
    let bar = ProgressBar::new(total_symbols);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} tokens ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(bar)
}

fn compress(
    input: &Path,
    output: Option<PathBuf>,
    args: &ModelArgs,
    (chunk_size, head_chunk): (usize, usize),
    verify: bool,
    overrides: &[String],
) -> Result<()> {
    let data = read_input(input)?;
    let pool = load_pool(args)?;
    let mut params = pool.default_params();
    for o in overrides {
        let (k, v) = o.split_once('=').context("--param takes NAME=VALUE")?;
        params.set(k, v).map_err(anyhow::Error::msg)?;
    }
    // A rough token estimate for the progress bar (about 4 bytes per token in English).
    let bar = progress_bar(data.len() as u64 / 4, "compress");
    let t0 = Instant::now();
    let opts = CompressOptions {
        chunk_size,
        head_chunk,
        params: Some(params),
        ..CompressOptions::default()
    };
    let tick = |n: usize| {
        if let Some(b) = &bar {
            b.inc(n as u64)
        }
    };
    let blob = codec::compress(&data, Some(&pool as &dyn Engine), &opts, &tick)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if verify {
        let back = codec::decompress(&blob, Some(&pool), &DecompressOptions::default(), &|_| {})
            .context("verification failed: the new blob does not decode")?;
        if back != data {
            bail!("verification failed: the new blob decodes to different bytes");
        }
    }
    let out = output.unwrap_or_else(|| {
        if input == Path::new("-") {
            return PathBuf::from("-");
        }
        let mut p = input.as_os_str().to_owned();
        p.push(".nc06");
        PathBuf::from(p)
    });
    write_output(&out, &blob)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} -> {} bytes ({:.3} bits/byte, {:.2} KB/s){}",
        data.len(),
        blob.len(),
        codec::bits_per_byte(blob.len() as u64, data.len() as u64),
        data.len() as f64 / 1000.0 / secs.max(1e-9),
        if verify { ", verified" } else { "" }
    );
    Ok(())
}

fn decompress(input: &Path, output: &Path, args: &ModelArgs, force_backend: bool) -> Result<()> {
    // A file is read a region at a time; only standard input is read whole.
    let blob: Box<dyn Source> = if input == Path::new("-") {
        Box::new(read_input(input)?)
    } else {
        Box::new(
            FileSource::open(input).with_context(|| format!("cannot read {}", input.display()))?,
        )
    };
    let (header, _) = Header::read_from(&*blob)?;
    let pool = if header.has_llm_segments() {
        Some(load_pool(args)?)
    } else {
        None
    };
    let total: u64 = header
        .segments
        .iter()
        .flat_map(|s| s.chunks.iter())
        .map(|c| c.n_symbols as u64)
        .sum();
    let bar = progress_bar(total, "decompress");
    let tick = |n: usize| {
        if let Some(b) = &bar {
            b.inc(n as u64)
        }
    };
    let opts = DecompressOptions {
        force_backend,
        ..DecompressOptions::default()
    };
    let engine = pool.as_ref().map(|p| p as &dyn Engine);
    if output == Path::new("-") {
        // Streamed as it decodes (like gzip -d): a failed check still exits non-zero.
        let mut sink = WriteSink(std::io::BufWriter::new(std::io::stdout().lock()));
        codec::decode_to(&*blob, engine, &opts, &tick, &mut sink)?;
        sink.0.flush()?;
    } else {
        // Renamed over the output only once every check passed; zero runs stay holes.
        write_atomically(output, |file| {
            // The whole length first: a blob claiming more than the filesystem holds
            // (a zero run of exabytes) is refused now, not after hashing its zeros.
            file.set_len(header.original_len).with_context(|| {
                format!(
                    "the blob holds {} bytes, which {} cannot",
                    header.original_len,
                    output.display()
                )
            })?;
            let mut sink = FileSink::new(file);
            codec::decode_to(&*blob, engine, &opts, &tick, &mut sink)?;
            Ok(sink.finish()?)
        })?;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    Ok(())
}

fn info(input: &Path, show_chunks: bool) -> Result<()> {
    let blob = read_input(input)?;
    let (h, header_len) = Header::parse(&blob, Some(blob.len() as u64))?;
    let ratio = if blob.is_empty() {
        0.0
    } else {
        h.original_len as f64 / blob.len() as f64
    };
    let bpb = codec::bits_per_byte(blob.len() as u64, h.original_len);
    println!("format        NC06 v{}", codec::container::VERSION);
    println!("original      {} bytes", h.original_len);
    println!("stored        {} bytes (header {header_len})", blob.len());
    println!("ratio         {ratio:.3}  ({bpb:.4} bits/byte)");
    println!("blake3        {}", codec::hex(&h.checksum));
    if h.has_llm_segments() {
        println!("model         {}", codec::hex(&h.model_fingerprint));
        println!("backend       {}", h.backend_tag);
        match h.coder_params() {
            Ok(p) => println!("params        {p}"),
            Err(e) => println!("params        unreadable: {e}"),
        }
    } else {
        println!("model         none needed");
    }
    println!("segments      {}", h.segments.len());
    let mut offset = 0u64;
    for (i, s) in h.segments.iter().enumerate() {
        let sbpb = codec::bits_per_byte(s.stored_len, s.original_len);
        println!(
            "  #{i:<3} {:<6} at {offset:>10}  {:>10} -> {:>10} bytes  {sbpb:.4} bpb{}",
            s.kind.name(),
            s.original_len,
            s.stored_len,
            if s.kind == SegmentKind::Llm {
                format!("  {} chunks", s.chunks.len())
            } else {
                String::new()
            }
        );
        if show_chunks {
            let mut co = offset;
            for (j, c) in s.chunks.iter().enumerate() {
                println!(
                    "        chunk {j:<4} at {co:>10}  {:>8} bytes {:>7} tokens -> {:>7} bytes  {:.4} bpb  crc {:08x}",
                    c.original_len,
                    c.n_symbols,
                    c.stored_len,
                    c.stored_len as f64 * 8.0 / c.original_len.max(1) as f64,
                    c.crc
                );
                co += c.original_len as u64;
            }
        }
        offset += s.original_len;
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Compress {
            input,
            output,
            model,
            chunk_size,
            head_chunk,
            verify,
            params,
        } => compress(
            input,
            output.clone(),
            model,
            (*chunk_size, *head_chunk),
            *verify,
            params,
        ),
        Cmd::Decompress {
            input,
            output,
            model,
            force_backend,
        } => decompress(input, output, model, *force_backend),
        Cmd::Info { input, chunks } => info(input, *chunks),
        Cmd::GpuCheck {
            text,
            model,
            positions,
            check_lanes,
            max_run,
            round_trip_bytes,
            lanes,
            contexts,
            sweep_chunk,
            budget_secs,
        } => (|| {
            let cfg = nacrithfs::selfcheck::Config {
                model: find_model(model.as_deref())?,
                text: std::fs::read(text)
                    .with_context(|| format!("cannot read {}", text.display()))?,
                positions: *positions,
                check_lanes: *check_lanes,
                max_run: *max_run,
                round_trip_bytes: *round_trip_bytes,
                lanes: lanes.clone(),
                contexts: contexts.clone(),
                sweep_chunk: (*sweep_chunk).max(64),
                deadline: std::time::Duration::from_secs(*budget_secs),
            };
            if nacrithfs::selfcheck::run(&cfg)? {
                Ok(())
            } else {
                bail!("a check failed (see above)")
            }
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("nacrith: error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}
