//! Raw model throughput: one single-threaded context advancing B lanes in lockstep, and
//! W such contexts on W threads; prefill runs of R tokens per lane per step (how the
//! encoder feeds known tokens); and the CPU side alone, the ensemble (n-grams, match
//! model, bias, mixer, CDF, range coder) per symbol on one core. Prints tokens/s.
//!
//! cargo run --release --example lanes_speed -- [STEPS] [WORKERS]

use std::time::Instant;

use nacrithfs::model::{find_model, Feed, LanguageModel, ModelRuntime};

/// One arbitrary (but fixed) token per lane for step `i`.
fn feeds(lanes: usize, i: usize) -> Vec<Feed> {
    (0..lanes)
        .map(|lane| Feed {
            lane,
            token: (100 + i * 7 + lane * 13) as u32 % 40000 + 100,
            want_logits: true,
        })
        .collect()
}

fn run(rt: &ModelRuntime, lanes: usize, steps: usize) -> anyhow::Result<f64> {
    let params = rt.default_params();
    let mut lm = rt.lanes(lanes, &params)?;
    for l in 0..lanes {
        lm.reset_lane(l)?;
    }
    let t0 = Instant::now();
    for i in 0..steps {
        lm.step(&feeds(lanes, i))?;
    }
    Ok((steps * lanes) as f64 / t0.elapsed().as_secs_f64())
}

/// Tokens/s of `lanes` lanes each fed `run` tokens per step, `tokens` tokens per lane.
fn prefill(rt: &ModelRuntime, lanes: usize, run: usize, tokens: usize) -> anyhow::Result<f64> {
    let params = rt.default_params();
    let mut lm = rt.lanes_with_run(lanes, &params, run)?;
    for l in 0..lanes {
        lm.reset_lane(l)?;
    }
    // Every lane takes the same run, within the step's capacity.
    let per_lane = (lm.step_capacity() / lanes).max(1);
    let t0 = Instant::now();
    let mut done = 0;
    while done < tokens {
        let mut fs = Vec::new();
        let k = lm.run_room(0).min(per_lane).min(tokens - done);
        for lane in 0..lanes {
            for j in 0..k {
                fs.push(Feed {
                    lane,
                    token: (100 + (done + j) * 7 + lane * 13) as u32 % 40000 + 100,
                    want_logits: true,
                });
            }
        }
        done += k;
        lm.step(&fs)?;
    }
    Ok((tokens * lanes) as f64 / t0.elapsed().as_secs_f64())
}

/// Symbols/s one core codes once the logits are there: predict (softmax over the
/// vocabulary, mixing, CDF), encode, update, with real logits from one model step.
fn ensemble(rt: &ModelRuntime, symbols: usize) -> anyhow::Result<f64> {
    use nacrithfs::codec::predictor::ChunkModel;
    use nacrithfs::codec::range::Encoder;
    let params = rt.default_params();
    let mut lm = rt.lanes(1, &params)?;
    lm.reset_lane(0)?;
    lm.step(&feeds(1, 0))?;
    let logits = lm.logits(0).to_vec();
    let text = std::fs::read("/usr/share/common-licenses/GPL-3")?;
    let syms = rt.tokenizer.encode(&text);
    let mut model = ChunkModel::new(&params, &rt.allowed);
    let mut enc = Encoder::new();
    let t0 = Instant::now();
    for &s in syms.iter().cycle().take(symbols) {
        model.predict(Some(&logits));
        model.encode(&mut enc, s);
        model.update(s);
    }
    let _ = enc.finish();
    Ok(symbols as f64 / t0.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(1).map_or(Ok(200), |s| s.parse())?;
    let workers: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let rt = ModelRuntime::load(&find_model(None)?)?;
    println!("backend: {}", rt.backend_tag);
    println!(
        "ensemble on one core: {:>6.0} symbols/s (the CPU side of one lane-step each)",
        ensemble(&rt, 2000)?
    );
    for lanes in [1, 4, 16] {
        for run in [1, 4, 16, 64] {
            println!(
                "prefill, 1 context, B={lanes:>2}, run {run:>2}: {:>6.1} tok/s",
                prefill(&rt, lanes, run, steps)?
            );
        }
    }
    for lanes in [1, 2, 4, 8, 16] {
        println!(
            "1 context,  B={lanes:>2}: {:>6.1} tok/s",
            run(&rt, lanes, steps)?
        );
    }
    // Cost against position: one lane run to a full 2,048-token context.
    {
        let params = rt.default_params();
        let mut lm = rt.lanes(2, &params)?;
        lm.reset_lane(0)?;
        lm.reset_lane(1)?;
        let mut t = Instant::now();
        for i in 0..2000usize {
            lm.step(&feeds(2, i))?;
            if (i + 1) % 500 == 0 {
                println!(
                    "B=2 positions {:>4}..{:>4}: {:>6.1} tok/s",
                    i + 1 - 500,
                    i + 1,
                    1000.0 / t.elapsed().as_secs_f64()
                );
                t = Instant::now();
            }
        }
    }
    for lanes in [1, 16] {
        let rates: Vec<f64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..workers)
                .map(|_| s.spawn(|| run(&rt, lanes, steps)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("thread").unwrap_or(0.0))
                .collect()
        });
        println!(
            "{workers} contexts, B={lanes:>2}: {:>6.1} tok/s total",
            rates.iter().sum::<f64>()
        );
    }
    Ok(())
}
