//! The llama.cpp implementation (through `llama-cpp-2`).
//!
//! Determinism comes first. Measured on CPU with quantized weights: with one thread per
//! context and `kv_unified = false`, logits do not depend on how many other streams share
//! the batch; with two threads they diverge past ~256 positions, and F32 weights break
//! batch invariance too. So every context runs single-threaded, parallelism comes from
//! one context per core, and unquantized models are refused.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::gguf::Metadata;
use super::{Feed, LanguageModel, ModelError};
use crate::codec::params::CoderParams;
use crate::codec::tokenizer::{TextTokenizer, Vocabulary};

/// The llama.cpp build this binary links (llama-cpp-sys-2 is pinned in Cargo.toml).
pub const LLAMA_BUILD: &str = "llama-cpp-sys-2 0.1.160";

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
/// llama-cpp-2 documents that creating contexts in parallel is unsound.
static CONTEXT_CREATION: Mutex<()> = Mutex::new(());

fn backend() -> Result<&'static LlamaBackend, ModelError> {
    BACKEND
        .get_or_init(|| {
            let mut b = LlamaBackend::init().map_err(|e| e.to_string())?;
            if std::env::var_os("NACRITH_LLAMA_LOG").is_none() {
                b.void_logs();
            }
            Ok(b)
        })
        .as_ref()
        .map_err(|e| ModelError::Runtime(format!("cannot initialise the backend: {e}")))
}

/// The CPU features llama.cpp was compiled for: they change its kernels, hence the logits.
pub fn cpu_level() -> String {
    let level = if cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx512f",
        target_feature = "avx512bw",
        target_feature = "avx512vl",
        target_feature = "avx512dq"
    )) {
        "x86-64-v4"
    } else if cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "bmi2",
        target_feature = "f16c"
    )) {
        "x86-64-v3"
    } else if cfg!(all(target_arch = "x86_64", target_feature = "sse4.2")) {
        "x86-64-v2"
    } else if cfg!(target_arch = "x86_64") {
        "x86-64"
    } else {
        std::env::consts::ARCH
    };
    // Extra features llama.cpp's build script reacts to, beyond the level itself.
    let mut extra = Vec::new();
    if cfg!(target_feature = "avx512vnni") {
        extra.push("avx512vnni");
    }
    if cfg!(target_feature = "avx512bf16") {
        extra.push("avx512bf16");
    }
    if cfg!(target_feature = "avx512vbmi") {
        extra.push("avx512vbmi");
    }
    if cfg!(target_feature = "avxvnni") {
        extra.push("avxvnni");
    }
    if extra.is_empty() {
        level.to_string()
    } else {
        format!("{level}+{}", extra.join("+"))
    }
}

fn file_type_name(ft: i64) -> String {
    match ft {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        7 => "Q8_0".into(),
        8 => "Q5_0".into(),
        9 => "Q5_1".into(),
        10 => "Q2_K".into(),
        11 => "Q3_K_S".into(),
        12 => "Q3_K_M".into(),
        13 => "Q3_K_L".into(),
        14 => "Q4_K_S".into(),
        15 => "Q4_K_M".into(),
        16 => "Q5_K_S".into(),
        17 => "Q5_K_M".into(),
        18 => "Q6_K".into(),
        32 => "BF16".into(),
        other => format!("ftype{other}"),
    }
}

/// Attention kernel. On this CPU llama.cpp's flash attention runs at half speed once a
/// stream's context passes ~1,500 tokens (36 vs 55 tok/s at two lanes), and both kernels
/// pass the batch-invariance tests, so plain attention is the default.
/// `NACRITH_FLASH_ATTN=auto` selects llama.cpp's choice; it changes the logits, so the
/// mode is read once at load and recorded in the backend tag.
fn flash_attention_auto_requested() -> bool {
    std::env::var("NACRITH_FLASH_ATTN").is_ok_and(|v| v == "auto")
}

/// Tokens an encoding lane takes per step (prefill). Encoder output does not depend on
/// it (the logits are bit-identical, tests/determinism.rs), only its speed: on this
/// project's 2-core CPU see the README's bench-codec table. `NACRITH_ENCODE_RUN=1` gives
/// the one-token steps of earlier releases.
pub const DEFAULT_ENCODE_RUN: usize = 16;

/// Feeds per step at most, whatever the lanes and run: the logits buffer holds one row
/// of n_vocab floats per feed (512 x 49,152 x 4 B = 96 MiB for SmolLM2).
const MAX_STEP_TOKENS: usize = 512;

fn encode_run_requested() -> usize {
    std::env::var("NACRITH_ENCODE_RUN")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(DEFAULT_ENCODE_RUN, |n| n.clamp(1, MAX_STEP_TOKENS))
}

/// Host threads a context spreads its lanes' ensemble work over. On CPU one: every core
/// already runs a context. On a GPU every core of the host: one core codes ~1,500
/// symbols/s (`examples/lanes_speed`), far below what a GPU context steps.
/// `NACRITH_ENSEMBLE_THREADS` overrides it (the output is the same whatever it is).
fn ensemble_threads(device: &Device) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::var("NACRITH_ENSEMBLE_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(
            match device {
                Device::Cpu => 1,
                Device::Gpu { .. } => cores,
            },
            |n| n.clamp(1, 256),
        )
}

fn use_gpu() -> bool {
    cfg!(feature = "cuda") && std::env::var_os("NACRITH_CPU_ONLY").is_none()
}

/// Where a model's weights and its contexts live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A ggml backend device (its index in llama.cpp's device list) and its name, e.g.
    /// "NVIDIA H100 80GB HBM3": the kernels, hence the logits, depend on the GPU model.
    Gpu {
        index: usize,
        description: String,
        /// Compute capability and CUDA runtime (see [`cuda_detail`]).
        detail: String,
    },
}

impl Device {
    fn tag(&self) -> String {
        match self {
            Device::Cpu => format!("cpu {}", cpu_level()),
            Device::Gpu {
                description,
                detail,
                ..
            } => format!("cuda {description}; {detail}"),
        }
    }
}

/// What besides the GPU's name decides its kernels: the compute capability (llama.cpp
/// picks kernels by it) and the CUDA runtime the binary carries, e.g. "sm 9.0, cuda
/// runtime 13.0". `ggml_name` is ggml's device name, "CUDA<ordinal>".
#[cfg(feature = "cuda")]
fn cuda_detail(ggml_name: &str) -> String {
    extern "C" {
        // From the CUDA runtime that llama-cpp-sys-2 links (cudart_static).
        fn cudaRuntimeGetVersion(version: *mut i32) -> i32;
        fn cudaDeviceGetAttribute(value: *mut i32, attr: i32, device: i32) -> i32;
    }
    const COMPUTE_CAPABILITY_MAJOR: i32 = 75;
    const COMPUTE_CAPABILITY_MINOR: i32 = 76;
    let ordinal: Option<i32> = ggml_name.strip_prefix("CUDA").and_then(|n| n.parse().ok());
    let (mut major, mut minor, mut runtime) = (-1, -1, -1);
    // SAFETY: plain out-parameters; a failing call leaves them at -1.
    unsafe {
        if let Some(dev) = ordinal {
            if cudaDeviceGetAttribute(&mut major, COMPUTE_CAPABILITY_MAJOR, dev) != 0
                || cudaDeviceGetAttribute(&mut minor, COMPUTE_CAPABILITY_MINOR, dev) != 0
            {
                (major, minor) = (-1, -1);
            }
        }
        if cudaRuntimeGetVersion(&mut runtime) != 0 {
            runtime = -1;
        }
    }
    let sm = if major >= 0 {
        format!("sm {major}.{minor}")
    } else {
        format!("sm unknown ({ggml_name})")
    };
    let rt = if runtime >= 0 {
        format!("cuda runtime {}.{}", runtime / 1000, runtime % 1000 / 10)
    } else {
        "cuda runtime unknown".to_string()
    };
    format!("{sm}, {rt}")
}

#[cfg(not(feature = "cuda"))]
fn cuda_detail(ggml_name: &str) -> String {
    format!("{ggml_name} (not a cuda build)")
}

/// The GPUs the coder should use: none unless built with `cuda` (and `NACRITH_CPU_ONLY`
/// unset). Only GPUs of the first one's model are used, so every worker of a pool
/// computes the same logits and writes the same backend tag; `CUDA_VISIBLE_DEVICES`
/// picks among them.
pub fn gpus() -> Result<Vec<Device>, ModelError> {
    if !use_gpu() {
        if cfg!(feature = "cuda") {
            say_once(
                "NACRITH_CPU_ONLY is set: coding on the CPU (CPU blobs, as a CPU build makes)",
            );
        }
        return Ok(Vec::new());
    }
    backend()?;
    let all: Vec<Device> = llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| d.device_type == llama_cpp_2::LlamaBackendDeviceType::Gpu)
        .map(|d| Device::Gpu {
            index: d.index,
            detail: cuda_detail(&d.name),
            description: d.description,
        })
        .collect();
    let Some(first) = all.first().cloned() else {
        say_once(
            "built with cuda, but llama.cpp found no usable GPU (none present, driver too old, \
             or CUDA_VISIBLE_DEVICES empty): coding on the CPU (CPU blobs, as a CPU build makes)",
        );
        return Ok(Vec::new());
    };
    let (same, other): (Vec<Device>, Vec<Device>) =
        all.into_iter().partition(|d| d.tag() == first.tag());
    for d in other {
        log::warn!(
            "not using {d:?}: a pool uses GPUs of one model only ({})",
            first.tag()
        );
    }
    Ok(same)
}

/// The fallback to the CPU is said once per process, however often the GPUs are listed.
fn say_once(msg: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| log::warn!("{msg}"));
}

/// A loaded model with everything the coder needs to know about it.
pub struct ModelRuntime {
    pub path: PathBuf,
    /// BLAKE3 of the GGUF file.
    pub fingerprint: [u8; 32],
    /// Backend, CPU level / GPU, weights type, llama.cpp build: all change the logits.
    pub backend_tag: String,
    pub tokenizer: TextTokenizer,
    /// Tokens allowed to carry probability mass (producible by the tokenizer, or escape).
    pub allowed: Vec<bool>,
    pub start_token: u32,
    pub escape_token: u32,
    /// Whether contexts use llama.cpp's flash-attention choice (else plain attention);
    /// fixed at load so the backend tag always describes the kernel in use.
    flash_attention_auto: bool,
    /// Tokens per encoding lane per step; see [`DEFAULT_ENCODE_RUN`].
    pub encode_run: usize,
    /// See [`ensemble_threads`].
    pub ensemble_threads: usize,
    /// Loaded on a GPU (else everything stays on the host).
    on_gpu: bool,
    model: LlamaModel,
}

pub fn fingerprint_file(path: &Path) -> Result<[u8; 32], std::io::Error> {
    let mut hasher = blake3::Hasher::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut hasher)?;
    Ok(*hasher.finalize().as_bytes())
}

impl ModelRuntime {
    /// Load on the first GPU (see [`gpus`]) or, without one, on the CPU.
    pub fn load(path: &Path) -> Result<ModelRuntime, ModelError> {
        let device = gpus()?.into_iter().next().unwrap_or(Device::Cpu);
        ModelRuntime::load_on(path, &device)
    }

    pub fn load_on(path: &Path, device: &Device) -> Result<ModelRuntime, ModelError> {
        let name = path.display().to_string();
        let load_err = |msg: String| ModelError::Load {
            path: name.clone(),
            msg,
        };
        let meta = Metadata::read(path).map_err(|e| load_err(e.to_string()))?;
        let ftype = meta.get_int("general.file_type").unwrap_or(-1);
        if matches!(ftype, 0 | 1 | 32) {
            return Err(ModelError::Refused {
                path: name,
                msg: format!(
                    "its weights are unquantized ({}); with them llama.cpp's logits depend on \
                     how streams are batched, so blobs would not decode reliably. Use a \
                     quantized GGUF (Q4_1, Q8_0, ...)",
                    file_type_name(ftype)
                ),
            });
        }
        if meta.get_str("tokenizer.ggml.model") != Some("gpt2") {
            return Err(ModelError::Refused {
                path: name,
                msg: format!(
                    "tokenizer type {:?} is not supported (byte-level BPE \"gpt2\" only)",
                    meta.get_str("tokenizer.ggml.model")
                ),
            });
        }
        let tokens = meta
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| load_err("no tokenizer.ggml.tokens".into()))?
            .to_vec();
        let merges = meta
            .get_str_array("tokenizer.ggml.merges")
            .ok_or_else(|| load_err("no tokenizer.ggml.merges".into()))?
            .to_vec();
        let token_types = meta
            .get_int_array("tokenizer.ggml.token_type")
            .map(|v| v.to_vec())
            .unwrap_or_default();
        // `<|endoftext|>` separates documents in pre-training: the natural start of a
        // stream, and a token plain text never produces, so it doubles as the escape.
        let escape = tokens
            .iter()
            .position(|t| t == "<|endoftext|>")
            .or_else(|| {
                meta.get_int("tokenizer.ggml.eos_token_id")
                    .map(|v| v as usize)
            })
            .ok_or_else(|| load_err("no <|endoftext|> or EOS token to use as escape".into()))?
            as u32;
        let vocab = Vocabulary {
            tokens,
            merges,
            token_types,
        };
        let tokenizer = TextTokenizer::new(&vocab, escape).map_err(|e| load_err(e.to_string()))?;
        let mut allowed = tokenizer.producible().to_vec();
        allowed[escape as usize] = true;

        let fingerprint = fingerprint_file(path).map_err(|e| load_err(e.to_string()))?;
        let params = match device {
            // llama.cpp's default puts every layer on a GPU when there is one: a "CPU"
            // model in a cuda build on a GPU machine would compute on the GPU, under a
            // CPU tag. Zero layers there (contexts also keep KV and ops on the host).
            Device::Cpu => LlamaModelParams::default().with_n_gpu_layers(0),
            // Every layer on this one GPU: a split across GPUs would make the logits
            // depend on how many there are.
            Device::Gpu { index, .. } => LlamaModelParams::default()
                .with_n_gpu_layers(999)
                .with_devices(&[*index])
                .map_err(|e| load_err(format!("GPU {index}: {e}")))?,
        };
        let model = LlamaModel::load_from_file(backend()?, path, &params)
            .map_err(|e| load_err(format!("llama.cpp could not load it: {e}")))?;
        if model.n_vocab() as usize != vocab.tokens.len() {
            return Err(load_err(format!(
                "llama.cpp reports {} tokens, the GGUF vocabulary has {}",
                model.n_vocab(),
                vocab.tokens.len()
            )));
        }
        let flash_attention_auto = flash_attention_auto_requested();
        let backend_tag = format!(
            "{LLAMA_BUILD}; {}; weights {}; threads 1; attention {}",
            device.tag(),
            file_type_name(ftype),
            if flash_attention_auto {
                "flash-auto"
            } else {
                "plain"
            }
        );
        Ok(ModelRuntime {
            path: path.to_path_buf(),
            fingerprint,
            backend_tag,
            tokenizer,
            allowed,
            start_token: escape,
            escape_token: escape,
            flash_attention_auto,
            encode_run: encode_run_requested(),
            ensemble_threads: ensemble_threads(device),
            on_gpu: matches!(device, Device::Gpu { .. }),
            model,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.allowed.len()
    }

    /// llama.cpp's own tokenization (no BOS, special-token text not parsed), to cross-check
    /// the `tokenizers` implementation the coder uses.
    pub fn llama_tokenize(&self, text: &str) -> Vec<u32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    /// The parameters this build codes new blobs with.
    /// The tokens the model is fed for `text`: its tokenizer's, an escaped byte fed as
    /// the escape token (as the coder feeds it).
    pub fn feed_tokens(&self, text: &[u8]) -> Vec<u32> {
        self.tokenizer
            .encode(text)
            .into_iter()
            .map(|s| match s {
                crate::codec::tokenizer::Symbol::Token(t) => t,
                crate::codec::tokenizer::Symbol::Escaped(_) => self.escape_token,
            })
            .collect()
    }

    pub fn default_params(&self) -> CoderParams {
        CoderParams::new(self.n_vocab() as u32, self.start_token, self.escape_token)
    }

    /// A single-threaded context with `n_lanes` independent streams.
    pub fn lanes(
        &self,
        n_lanes: usize,
        params: &CoderParams,
    ) -> Result<LlamaLanes<'_>, ModelError> {
        self.lanes_with_run(n_lanes, params, self.encode_run)
    }

    /// [`lanes`](Self::lanes) whose encoding lanes take up to `run` tokens per step.
    pub fn lanes_with_run(
        &self,
        n_lanes: usize,
        params: &CoderParams,
        run: usize,
    ) -> Result<LlamaLanes<'_>, ModelError> {
        let n_lanes = n_lanes.clamp(1, 256);
        let run = run.clamp(1, MAX_STEP_TOKENS);
        let capacity = (n_lanes * run).min(MAX_STEP_TOKENS).max(n_lanes);
        let ctx_len = params.ctx_len;
        let n_ctx = NonZeroU32::new(ctx_len * n_lanes as u32)
            .ok_or_else(|| ModelError::Runtime("zero context".into()))?;
        let cparams = LlamaContextParams::default()
            .with_n_ctx(Some(n_ctx))
            .with_n_batch(capacity as u32)
            .with_n_ubatch(capacity as u32)
            .with_n_seq_max(n_lanes as u32)
            .with_n_threads(1)
            .with_n_threads_batch(1)
            .with_kv_unified(false)
            .with_flash_attention_policy(if self.flash_attention_auto {
                llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO
            } else {
                llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
            })
            .with_no_perf(true)
            // On a CPU model: no KV cache and no large-batch matrix products moved to a
            // GPU that happens to be present (see `load_on`).
            .with_offload_kqv(self.on_gpu)
            .with_op_offload(self.on_gpu);
        let ctx = {
            let _guard = CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
            self.model
                .new_context(backend()?, cparams)
                .map_err(|e| ModelError::Runtime(format!("cannot create a context: {e}")))?
        };
        Ok(LlamaLanes {
            ctx,
            batch: LlamaBatch::new(capacity, n_lanes as i32),
            pos: vec![0; n_lanes],
            fed_count: vec![0; n_lanes],
            run,
            capacity,
            host_threads: self.ensemble_threads,
            logit_index: Vec::with_capacity(n_lanes),
            ctx_len,
            ctx_keep: params.ctx_keep,
            n_vocab: self.n_vocab(),
        })
    }
}

pub struct LlamaLanes<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    pos: Vec<u32>,
    /// Tokens each lane is fed in the step being checked.
    fed_count: Vec<usize>,
    run: usize,
    capacity: usize,
    host_threads: usize,
    /// Batch index of each feed of the last step.
    logit_index: Vec<i32>,
    ctx_len: u32,
    ctx_keep: u32,
    n_vocab: usize,
}

impl LlamaLanes<'_> {
    /// Make room in a full lane: keep the start token at position 0 (models lean on the
    /// first token as an attention sink; dropping it cost ~10% more bits here), drop the
    /// oldest tokens after it, and shift the rest down, re-rotating RoPE keys instead of
    /// re-evaluating. Reproducible, and the decoder slides at the same point.
    fn slide(&mut self, lane: usize) -> Result<(), ModelError> {
        let pos = self.pos[lane];
        let discard = pos - self.ctx_keep;
        let seq = lane as i32;
        self.ctx
            .kv_cache_seq_rm(seq, Some(1), Some(1 + discard))
            .map_err(|e| ModelError::Runtime(format!("kv remove: {e}")))?;
        self.ctx
            .kv_cache_seq_add(seq, Some(1 + discard), Some(pos), -(discard as i32))
            .map_err(|e| ModelError::Runtime(format!("kv shift: {e}")))?;
        self.pos[lane] = self.ctx_keep;
        Ok(())
    }
}

impl LanguageModel for LlamaLanes<'_> {
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    fn n_lanes(&self) -> usize {
        self.pos.len()
    }

    fn reset_lane(&mut self, lane: usize) -> Result<(), ModelError> {
        self.ctx
            .clear_kv_cache_seq(Some(lane as u32), None, None)
            .map_err(|e| ModelError::Runtime(format!("kv clear: {e}")))?;
        self.pos[lane] = 0;
        Ok(())
    }

    fn step_capacity(&self) -> usize {
        self.capacity
    }

    fn host_threads(&self) -> usize {
        self.host_threads
    }

    fn run_room(&self, lane: usize) -> usize {
        let pos = self.pos[lane];
        let room = if pos >= self.ctx_len {
            self.ctx_len - self.ctx_keep
        } else {
            self.ctx_len - pos
        };
        (room as usize).clamp(1, self.run)
    }

    fn step(&mut self, feeds: &[Feed]) -> Result<(), ModelError> {
        self.batch.clear();
        self.logit_index.clear();
        if feeds.len() > self.capacity {
            return Err(ModelError::Runtime(format!(
                "{} feeds in one step, capacity {}",
                feeds.len(),
                self.capacity
            )));
        }
        // A slide inside a run would put its later tokens at other positions than
        // one-token steps give them: refuse a run longer than its room, changing nothing.
        self.fed_count.fill(0);
        for f in feeds {
            if f.lane >= self.pos.len() {
                return Err(ModelError::Runtime(format!("no lane {}", f.lane)));
            }
            self.fed_count[f.lane] += 1;
            let (count, room) = (self.fed_count[f.lane], self.run_room(f.lane));
            if count > room {
                return Err(ModelError::Runtime(format!(
                    "lane {} fed {count} tokens in one step, more than its room of {room}",
                    f.lane
                )));
            }
        }
        for f in feeds {
            if self.pos[f.lane] >= self.ctx_len {
                self.slide(f.lane)?;
            }
            let index = self.batch.n_tokens();
            self.batch
                .add(
                    LlamaToken::new(f.token as i32),
                    self.pos[f.lane] as i32,
                    &[f.lane as i32],
                    f.want_logits,
                )
                .map_err(|e| ModelError::Runtime(format!("batch: {e}")))?;
            self.logit_index.push(index);
            self.pos[f.lane] += 1;
        }
        if feeds.is_empty() {
            return Ok(());
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| ModelError::Runtime(format!("decode: {e}")))
    }

    fn logits(&self, feed_index: usize) -> &[f32] {
        self.ctx.get_logits_ith(self.logit_index[feed_index])
    }
}
