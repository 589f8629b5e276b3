//! Tuning harness: run the LLM once over a text's chunks, keep the logits, then score
//! coder-parameter variants offline by their exact code length (−log2 of the quantized
//! CDF). Used to choose the defaults in `CoderParams::new`; not part of the product.
//!
//! cargo run --release --example tune -- FILE CHUNK_SIZE [NAME=VALUE,NAME=VALUE ...]

use nacrithfs::codec::params::CoderParams;
use nacrithfs::codec::predictor::ChunkModel;
use nacrithfs::codec::range::Encoder;
use nacrithfs::codec::segment::chunk_text;
use nacrithfs::codec::tokenizer::Symbol;
use nacrithfs::model::{find_model, Feed, LanguageModel, ModelRuntime};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!("usage: tune FILE CHUNK_SIZE [variant ...]");
    }
    let data = std::fs::read(&args[1])?;
    let chunk_size: usize = args[2].parse()?;
    let rt = ModelRuntime::load(&find_model(None)?)?;
    let base = rt.default_params();
    let chunks: Vec<Vec<Symbol>> = chunk_text(&data, chunk_size)
        .into_iter()
        .map(|r| rt.tokenizer.encode(&data[r]))
        .collect();
    let n_tokens: usize = chunks.iter().map(|c| c.len()).sum();
    eprintln!(
        "{} bytes, {} chunks, {n_tokens} tokens",
        data.len(),
        chunks.len()
    );

    // Logits for every position of every chunk, all chunks in lockstep lanes; cached on
    // disk by input and chunk size.
    let cache = format!(
        "/tmp/nacrith-tune2-{}-{chunk_size}.bin",
        nacrithfs::codec::hex(&blake3::hash(&data).as_bytes()[..8])
    );
    let v = rt.n_vocab();
    if let Ok(raw) = std::fs::read(&cache) {
        let floats: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut pos = 0;
        let logits: Vec<Vec<Vec<f32>>> = chunks
            .iter()
            .map(|c| {
                (0..c.len())
                    .map(|_| {
                        pos += v;
                        floats[pos - v..pos].to_vec()
                    })
                    .collect()
            })
            .collect();
        return score(&args, &rt, &base, &chunks, &logits, data.len(), n_tokens);
    }
    let t0 = std::time::Instant::now();
    let mut lm = rt.lanes(chunks.len().min(16), &base)?;
    let mut logits: Vec<Vec<Vec<f32>>> =
        chunks.iter().map(|c| Vec::with_capacity(c.len())).collect();
    for group in (0..chunks.len()).collect::<Vec<_>>().chunks(lm.n_lanes()) {
        for lane in 0..group.len() {
            lm.reset_lane(lane)?;
        }
        let longest = group.iter().map(|&c| chunks[c].len()).max().unwrap_or(0);
        for i in 0..longest {
            let mut feeds = Vec::new();
            let mut owners = Vec::new();
            for (lane, &c) in group.iter().enumerate() {
                if i < chunks[c].len() {
                    let token = if i == 0 {
                        base.start_token
                    } else {
                        match chunks[c][i - 1] {
                            Symbol::Token(t) => t,
                            Symbol::Escaped(_) => base.escape_token,
                        }
                    };
                    feeds.push(Feed {
                        lane,
                        token,
                        want_logits: true,
                    });
                    owners.push(c);
                }
            }
            lm.step(&feeds)?;
            for (f, &c) in owners.iter().enumerate() {
                logits[c].push(lm.logits(f).to_vec());
            }
        }
    }
    eprintln!("llm pass: {:.1}s", t0.elapsed().as_secs_f64());
    let mut raw = Vec::with_capacity(n_tokens * v * 4);
    for l in logits.iter().flatten().flatten() {
        raw.extend_from_slice(&l.to_le_bytes());
    }
    std::fs::write(&cache, raw)?;
    score(&args, &rt, &base, &chunks, &logits, data.len(), n_tokens)
}

fn score(
    args: &[String],
    rt: &ModelRuntime,
    base: &CoderParams,
    chunks: &[Vec<Symbol>],
    logits: &[Vec<Vec<f32>>],
    data_len: usize,
    n_tokens: usize,
) -> anyhow::Result<()> {
    let mut variants: Vec<String> = args[3..].to_vec();
    if variants.is_empty() {
        variants.push(String::new());
    }
    for v in variants {
        let mut p: CoderParams = base.clone();
        for kv in v.split(',').filter(|s| !s.is_empty()) {
            let (k, val) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("bad {kv}"))?;
            p.set(k, val).map_err(anyhow::Error::msg)?;
        }
        let mut bytes = 0usize;
        let mut skipped = 0usize;
        for (c, symbols) in chunks.iter().enumerate() {
            let mut m = ChunkModel::new(&p, &rt.allowed);
            let mut enc = Encoder::new();
            for (i, &s) in symbols.iter().enumerate() {
                let want = m.wants_llm();
                skipped += !want as usize;
                m.predict(want.then(|| logits[c][i].as_slice()));
                m.encode(&mut enc, s);
                m.update(s);
            }
            bytes += enc.finish().len();
        }
        println!(
            "{:<60} {:>8} bytes  {:.4} bpb  skipped {:.1}%",
            if v.is_empty() { "(defaults)" } else { &v },
            bytes,
            bytes as f64 * 8.0 / data_len as f64,
            100.0 * skipped as f64 / n_tokens as f64
        );
    }
    Ok(())
}
