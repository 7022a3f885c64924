//! Batch-1 greedy inference benchmark of a Hugging Face checkpoint folder:
//! load time, prefill, decode and peak memory, as one JSON line.
//!
//! Our side of `scripts/inference_compare.py`; the transformers side is
//! `scripts/hf_inference_bench.py`, with the same flags, the same prompt and
//! the same JSON fields. Build it in release for timings (libtorch's kernels
//! are optimised either way, but the glue around them is not in debug; the
//! JSON's `build` says which):
//!
//! ```sh
//! cargo build --release -p moe-lab --bin inference_bench
//! OMP_NUM_THREADS=2 target/release/inference_bench --model /work/bench/olmoe-0.5b \
//!     --dtype bf16 --prompt-len 128 --new-tokens 64 --threads 2 --out /tmp/ours.json
//! ```
//!
//! - `load_s`: [`from_pretrained`] (config, weights, model) in `--dtype`
//!   (`auto`: the files' dtype);
//! - `prefill_s`, `prefill_tok_s`: one [`CausalLm::forward_cached`] of the
//!   prompt into an empty cache, the first token its argmax;
//! - `decode_ms_per_token`: the `new_tokens - 1` following greedy steps, each
//!   one position's cached forward pass plus its argmax, timed step by step
//!   (mean; `decode_ms_median` and `decode_ms_min` the median and fastest
//!   step: on a shared machine other work inflates the mean);
//! - `generate_*` (unless `--no-generate`): the library's own
//!   [`generate`] with greedy sampling, timed by its per-token callback:
//!   `generate_prefill_s` to the first new token, then
//!   `generate_decode_ms_per_token` between the first and the last
//!   (`generate_decode_ms_median`: the median interval);
//!   `generate_tokens_match` says whether it chose the loop's tokens;
//! - `rss_after_load_gib` (VmRSS), `peak_rss_gib` (VmHWM, the whole run).
//!
//! The prompt is `--prompt-len` ids of a 64-bit LCG seeded by `--seed`
//! (`x = x * 6364136223846793005 + 1442695040888963407 mod 2^64`, id =
//! `(x >> 33) % vocab_size`, as the Python side draws them), or the JSON
//! list in `--prompt-ids FILE`.

use clap::Parser;
use moe_layers::core::profile::{profiled, Profile};
use moe_layers::experts::ExpertQuantization;
use moe_layers::hf::{
    checkpoint_dtype, dtype_by_name, from_pretrained, memory_plan, ExpertStorage, LoadOptions,
};
use moe_layers::lm::{generate, CausalLm, Sampling};
use moe_layers::{MoeError, Result};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(about = "Time loading, prefill and greedy decoding of a Hugging Face checkpoint")]
struct Args {
    /// A Hugging Face checkpoint folder (config.json, safetensors weights)
    #[arg(long)]
    model: PathBuf,
    /// The parameters' dtype: auto (the files'), bf16 or f32
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens to generate (at least 2: the prefill's and one decode step)
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// libtorch's intra-op threads
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Seed of the prompt's LCG
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A JSON list of token ids to use as the prompt instead
    #[arg(long)]
    prompt_ids: Option<PathBuf>,
    /// Skip the check through the library's `generate`
    #[arg(long)]
    no_generate: bool,
    /// Also write the JSON line here
    #[arg(long)]
    out: Option<PathBuf>,
    /// Quantise the routed experts' weights after loading (int8)
    #[arg(long)]
    quantize_experts: Option<ExpertQuantization>,
    /// Leave the routed experts in the files with this many GiB of them
    /// resident (LRU, next-layer prefetch); adds the cache's counters
    #[arg(long)]
    expert_cache_gib: Option<f64>,
    /// Time this many extra decode steps span by span (embedding,
    /// attention, router, experts, lm_head, ...) and add the shares as
    /// `profile`, in ms per token (0: none)
    #[arg(long, default_value_t = 8)]
    profile_steps: usize,
    /// Instead of timing: load the model twice, as loaded (`--dtype`) and
    /// with int8 experts, run both over the prompt (one forward pass each,
    /// `--prompt-len` positions) and print how often their next-token
    /// argmaxes agree and the mean KL(as loaded || int8) of the next-token
    /// distributions
    #[arg(long)]
    int8_agreement: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// What [`from_pretrained`] is asked for.
fn load_options(args: &Args) -> Result<LoadOptions> {
    Ok(LoadOptions {
        dtype: Some(match dtype_by_name(&args.dtype)? {
            Some(kind) => kind,
            None => checkpoint_dtype(&args.model)?,
        }),
        device: Device::Cpu,
        experts: ExpertStorage::with_cache_gib(args.expert_cache_gib)?,
        quantize_experts: args.quantize_experts,
        ..LoadOptions::default()
    })
}

/// The benchmark prompt: `n` ids of the LCG of the module doc.
fn lcg_prompt(seed: u64, n: usize, vocab_size: i64) -> Vec<i64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab_size as u64) as i64
        })
        .collect()
}

/// A field of /proc/self/status (`VmRSS`, `VmHWM`) in GiB.
fn proc_status_gib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1u64 << 20) as f64)
}

/// The argmax of the last position's logits (`[1, T, V]`).
fn greedy(logits: &Tensor) -> i64 {
    logits.select(1, -1).argmax(-1, false).int64_value(&[0])
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Float => "float32",
        Kind::Half => "float16",
        _ => "float64",
    }
}

fn run(args: Args) -> Result<()> {
    if args.new_tokens < 2 || args.prompt_len < 1 {
        return Err(MoeError::config(
            "--new-tokens must be at least 2 and --prompt-len at least 1",
        ));
    }
    tch::set_num_threads(args.threads);
    if args.int8_agreement {
        return int8_agreement(&args);
    }
    let options = load_options(&args)?;
    let started = Instant::now();
    let pretrained = from_pretrained(&args.model, &options)?;
    let load_s = started.elapsed().as_secs_f64();
    let rss_after_load = proc_status_gib("VmRSS");
    let params = memory_plan(&args.model, None, &[])?.total_params;
    let model = &pretrained.model;
    let prompt = match &args.prompt_ids {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| MoeError::io(path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| MoeError::config(format!("{}: {e}", path.display())))?
        }
        None => lcg_prompt(args.seed, args.prompt_len, model.vocab_size()),
    };

    let (prefill_s, steps, tokens, profile) = tch::no_grad(|| -> Result<_> {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let row = Tensor::from_slice(&prompt).unsqueeze(0);
        let mut token = greedy(&model.forward_cached(&row, &mut cache)?.logits);
        let prefill_s = t0.elapsed().as_secs_f64();
        let (mut steps, mut tokens) = (Vec::new(), vec![token]);
        for _ in 1..args.new_tokens {
            let t = Instant::now();
            let row = Tensor::from_slice(&[token]).unsqueeze(0);
            token = greedy(&model.forward_cached(&row, &mut cache)?.logits);
            tokens.push(token);
            steps.push(t.elapsed().as_secs_f64());
        }
        // More steps of the same sequence, span by span.
        let (stepped, profile) = profiled(|| -> Result<()> {
            for _ in 0..args.profile_steps {
                let row = Tensor::from_slice(&[token]).unsqueeze(0);
                token = greedy(&model.forward_cached(&row, &mut cache)?.logits);
            }
            Ok(())
        });
        stepped?;
        Ok((prefill_s, steps, tokens, profile))
    })?;

    let mut result = json!({
        "impl": "moe-layers",
        "model": args.model.display().to_string(),
        "dtype": dtype_name(options.dtype.unwrap_or(Kind::Float)),
        "threads": args.threads,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "params": params,
        "prompt_len": prompt.len(),
        "new_tokens": args.new_tokens,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt.len() as f64 / prefill_s,
        "decode_ms_per_token": 1e3 * steps.iter().sum::<f64>() / steps.len() as f64,
        "decode_ms_median": 1e3 * median(&steps),
        "decode_ms_min": 1e3 * steps.iter().copied().fold(f64::INFINITY, f64::min),
    });
    if args.profile_steps > 0 {
        result["profile"] = profile_json(&profile, args.profile_steps);
        eprintln!(
            "per decode step, over {} steps:\n{profile}",
            args.profile_steps
        );
    }
    if let Some(residency) = &pretrained.residency {
        let s = residency.stats();
        result["expert_cache"] = json!({
            "capacity_bytes": s.capacity_bytes,
            "hit_rate": s.hit_rate(),
            "hits": s.hits,
            "misses": s.misses,
            "prefetches": s.prefetches,
            "evictions": s.evictions,
            "bytes_loaded": s.bytes_loaded,
            "resident_bytes": s.resident_bytes,
        });
    }
    if let Some(q) = args.quantize_experts {
        result["quantize_experts"] = json!(format!("{q:?}").to_lowercase());
    }
    if !args.no_generate {
        let mut stamps = Vec::with_capacity(args.new_tokens);
        let t0 = Instant::now();
        let generated = generate(model, &prompt, args.new_tokens, Sampling::greedy(), |_| {
            stamps.push(Instant::now())
        })?;
        let (first, last) = (stamps[0], stamps[stamps.len() - 1]);
        result["generate_prefill_s"] = json!((first - t0).as_secs_f64());
        result["generate_decode_ms_per_token"] =
            json!(1e3 * (last - first).as_secs_f64() / (stamps.len() - 1) as f64);
        let intervals: Vec<f64> = stamps
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        result["generate_decode_ms_median"] = json!(1e3 * median(&intervals));
        result["generate_tokens_match"] = json!(generated == tokens);
    }
    result["rss_after_load_gib"] = json!(rss_after_load);
    result["peak_rss_gib"] = json!(proc_status_gib("VmHWM"));
    result["versions"] = json!({ "moe-layers": env!("CARGO_PKG_VERSION") });
    result["prompt_ids"] = json!(prompt);
    result["tokens"] = json!(tokens);

    let line = result.to_string();
    println!("{line}");
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{line}\n")).map_err(|e| MoeError::io(path, e))?;
    }
    Ok(())
}

/// `--int8-agreement`: top-1 agreement and mean KL of int8 experts against
/// the model as loaded, teacher-forced over the prompt, as one JSON line.
fn int8_agreement(args: &Args) -> Result<()> {
    let options = load_options(args)?;
    let reference = from_pretrained(&args.model, &options)?;
    let quantized = from_pretrained(
        &args.model,
        &LoadOptions {
            quantize_experts: Some(ExpertQuantization::Int8),
            ..options
        },
    )?;
    let prompt = lcg_prompt(args.seed, args.prompt_len, reference.model.vocab_size());
    let row = Tensor::from_slice(&prompt).unsqueeze(0);
    let (agreement, mean_kl) = tch::no_grad(|| -> Result<(f64, f64)> {
        let logits = |m: &moe_layers::hf::Pretrained| -> Result<Tensor> {
            let mut cache = m.model.new_cache();
            Ok(m.model
                .forward_cached(&row, &mut cache)?
                .logits
                .to_kind(Kind::Float))
        };
        let (p, q) = (logits(&reference)?, logits(&quantized)?);
        let same = p.argmax(-1, false).eq_tensor(&q.argmax(-1, false));
        let (log_p, log_q) = (
            p.log_softmax(-1, Kind::Float),
            q.log_softmax(-1, Kind::Float),
        );
        let kl = (log_p.exp() * (&log_p - &log_q)).sum_dim_intlist(-1, false, Kind::Float);
        Ok((
            same.to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]),
            kl.mean(Kind::Float).double_value(&[]),
        ))
    })?;
    let line = json!({
        "model": args.model.display().to_string(),
        "dtype": dtype_name(options.dtype.unwrap_or(Kind::Float)),
        "positions": prompt.len(),
        "seed": args.seed,
        "top1_agreement": agreement,
        "mean_kl": mean_kl,
    })
    .to_string();
    println!("{line}");
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{line}\n")).map_err(|e| MoeError::io(path, e))?;
    }
    Ok(())
}

/// `profile` as `{span: ms per step, ..., "wall": ms per step}`.
fn profile_json(profile: &Profile, steps: usize) -> serde_json::Value {
    let per_step = |d: std::time::Duration| 1e3 * d.as_secs_f64() / steps as f64;
    let mut spans = serde_json::Map::new();
    for span in &profile.spans {
        spans.insert(span.name.to_string(), json!(per_step(span.total)));
    }
    spans.insert("wall".into(), json!(per_step(profile.wall)));
    serde_json::Value::Object(spans)
}

/// The median of `values` (not empty).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}
