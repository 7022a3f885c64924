//! Generates text from a checkpoint, streaming it as it comes, with a KV
//! cache (one position's forward pass per token).
//!
//! ```sh
//! cargo xtask run run --release --example generate -- \
//!     --checkpoint runs/shakespeare --prompt "ROMEO:" --max-new-tokens 500
//! ```
//!
//! `--model DIR` reads a Hugging Face checkpoint folder instead (Mixtral,
//! Qwen2-MoE, DeepSeek-V3, OLMoE, LLaMA: `config.json`, safetensors weights,
//! `tokenizer.json`, `generation_config.json`): the prompt is encoded with
//! the checkpoint's own tokenizer, sampling follows its generation config
//! unless flags override it, and generation stops at one of its
//! end-of-sequence tokens. With either source, `--top-p`,
//! `--repetition-penalty` and `--stop` (a string that ends generation once
//! the text contains it) apply.
//!
//! ```sh
//! cargo xtask run run --release --example generate -- \
//!     --model tests/data/hf/mixtral --prompt "First Citizen:" --max-new-tokens 20
//! ```
//!
//! Several `--prompt`s are generated in one batch (left padding with an
//! attention mask, each row as its prompt alone would continue):
//!
//! ```sh
//! cargo xtask run run --release --example generate -- --model tests/data/hf/deepseek_v3 \
//!     --prompt "First Citizen:" --prompt "All:" --max-new-tokens 20 --top-k 1
//! ```
//!
//! `--plan` prints what a Hugging Face folder needs in memory (parameters,
//! active ones per token, bytes by dtype, KV cache per token and at the
//! context) from its config and its files' headers, without loading a
//! weight, and whether that fits in `--memory-gib` (default: the available
//! memory); `--dtype bf16` (or `auto`, the files' dtype) plans and loads in
//! another dtype:
//!
//! ```sh
//! cargo xtask run run --release --example generate -- \
//!     --model tests/data/hf/mixtral --plan --dtype auto
//! ```
//!
//! (`lab/src/bin/kv_cache_bench.rs` times the KV-cached generation against
//! the recomputation of the whole context for every token.)

use clap::Parser;
use moe_layers::experts::{ExpertQuantization, ExpertResidency};
use moe_layers::hf::{
    available_memory, dtype_by_name, from_pretrained, memory_plan, ExpertStorage, LoadOptions,
};
use moe_layers::lm::{
    generate_batch, generate_with, load_checkpoint, CausalLm, Continuation, GenerateOptions,
    Sampling, SamplingFlags, Tokenizer,
};
use moe_layers::prelude::DeviceChoice;
use moe_layers::{MoeError, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(version)]
#[command(about = "Generate text from a moe-layers or Hugging Face checkpoint")]
#[command(group(clap::ArgGroup::new("source").required(true).args(["checkpoint", "model"])))]
struct Args {
    /// A moe-layers checkpoint: a folder with model.safetensors and config.json
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// A Hugging Face checkpoint folder (config.json, model.safetensors or a
    /// sharded index, tokenizer.json, generation_config.json)
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to continue (with --checkpoint, every character must be in the
    /// tokenizer's vocabulary). Repeat it to generate for several prompts in
    /// one batch (left-padded with an attention mask; each row is what its
    /// prompt alone gives), printed when all are done
    #[arg(long)]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 500)]
    max_new_tokens: usize,
    /// --temperature, --top-k, --top-p, --repetition-penalty (each over the
    /// checkpoint's generation config with --model)
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Stop once the generated text contains this string (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, default_value_t = 1337)]
    seed: i64,
    /// Where to run
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// With --model: the parameters' dtype, auto (the dtype holding most
    /// of the checkpoint's weight bytes, as transformers' dtype="auto"),
    /// f32, bf16, f16 or f64. bf16 and f64 models compute in their dtype;
    /// f16 ones in f32
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// With --model: print what the checkpoint needs in memory (parameters,
    /// active ones per token, bytes, KV cache) from its config and its
    /// files' headers, without loading it, and exit
    #[arg(long)]
    plan: bool,
    /// With --plan: the memory to fit in, GiB (default: the machine's
    /// available memory, /proc/meminfo's MemAvailable)
    #[arg(long)]
    memory_gib: Option<f64>,
    /// With --model: quantise the routed experts' weights after loading
    /// (int8: per output channel, libtorch's int8 GEMV on the CPU)
    #[arg(long)]
    quantize_experts: Option<ExpertQuantization>,
    /// With --model: leave the routed experts in the checkpoint's files and
    /// keep at most this many GiB of them in memory (least recently used
    /// out first, the next layer's likely experts read ahead): for
    /// checkpoints larger than the memory; CPU, the files' dtype
    #[arg(long)]
    expert_cache_gib: Option<f64>,
}

/// `--plan`: the memory plan of `dir` and whether it fits.
fn print_plan(args: &Args, dir: &std::path::Path) -> Result<()> {
    let plan = memory_plan(dir, dtype_by_name(&args.dtype)?, &[])?;
    let budget = match args.memory_gib {
        Some(gib) if gib > 0.0 && gib.is_finite() => (gib * (1u64 << 30) as f64) as u64,
        Some(gib) => {
            return Err(MoeError::config(format!(
                "--memory-gib must be > 0, got {gib}"
            )))
        }
        None => available_memory().ok_or_else(|| {
            MoeError::config("cannot read MemAvailable from /proc/meminfo: give --memory-gib")
        })?,
    };
    println!("{plan}\n{}", plan.verdict(budget));
    Ok(())
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// A loaded model with its tokenizer, the default sampling and the tokens
/// that end generation.
struct Loaded {
    model: Box<dyn CausalLm>,
    tokenizer: Tokenizer,
    sampling: Sampling,
    stop_tokens: Vec<i64>,
    /// The experts left in the files, with `--expert-cache-gib`.
    residency: Option<ExpertResidency>,
}

fn load(args: &Args) -> Result<Loaded> {
    let device = args.device.resolve()?;
    if let Some(dir) = &args.model {
        let options = LoadOptions {
            device,
            dtype: dtype_by_name(&args.dtype)?,
            experts: ExpertStorage::with_cache_gib(args.expert_cache_gib)?,
            quantize_experts: args.quantize_experts,
            ..LoadOptions::default()
        };
        let mut pretrained = from_pretrained(dir, &options)?;
        let tokenizer = pretrained.take_tokenizer()?;
        return Ok(Loaded {
            sampling: pretrained.generation.sampling(pretrained.config.vocab_size),
            stop_tokens: pretrained.generation.eos_token_id.clone(),
            residency: pretrained.residency,
            model: Box::new(pretrained.model),
            tokenizer,
        });
    }
    let dir = args
        .checkpoint
        .as_ref()
        .expect("clap requires --checkpoint or --model");
    let checkpoint = load_checkpoint(dir, device)?;
    Ok(Loaded {
        model: checkpoint.model,
        tokenizer: checkpoint.meta.tokenizer,
        sampling: Sampling::default(),
        stop_tokens: Vec::new(),
        residency: None,
    })
}

fn run(args: Args) -> Result<()> {
    if args.plan {
        let dir = args.model.as_ref().ok_or_else(|| {
            MoeError::config("--plan reads a Hugging Face folder: give it with --model DIR")
        })?;
        return print_plan(&args, dir);
    }
    let loaded = load(&args)?;
    let tokenizer = &loaded.tokenizer;
    let texts = match args.prompt.as_slice() {
        [] => vec![String::new()],
        texts => texts.to_vec(),
    };
    let prompts = texts
        .iter()
        .map(|t| tokenizer.encode(t))
        .collect::<Result<Vec<_>>>()?;
    let sampling = args.sampling.over(loaded.sampling);
    let model = loaded.model.as_ref();
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        eos_token_ids: loaded.stop_tokens.clone(),
    };
    tch::manual_seed(args.seed);
    if prompts.len() > 1 {
        return generate_rows(model, tokenizer, &texts, &prompts, &options, &args.stop);
    }
    let (text, prompt) = (&texts[0], &prompts[0]);
    print!("{text}");
    let mut row = Continuation::new(tokenizer, prompt, &args.stop)?;
    let (start, mut generated, mut shown) = (Instant::now(), 0usize, 0);
    generate_with(model, prompt, &options, |id| {
        generated += 1;
        let flow = row.push(id);
        print!("{}", &row.text()[shown..]);
        let _ = std::io::stdout().flush();
        shown = row.text().len();
        flow
    })?;
    if let Some(residency) = &loaded.residency {
        let speed = generated as f64 / start.elapsed().as_secs_f64();
        eprintln!(
            "\nexperts from the files: {}; {speed:.3} tokens/s",
            residency.stats()
        );
    }
    println!();
    row.finish().map(|_| ())
}

/// Generates for every prompt in one batch; prints each row (prompt and
/// continuation) when all have ended.
fn generate_rows(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    texts: &[String],
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
    stop: &[String],
) -> Result<()> {
    let mut rows = prompts
        .iter()
        .map(|prompt| Continuation::new(tokenizer, prompt, stop))
        .collect::<Result<Vec<_>>>()?;
    generate_batch(model, prompts, options, |row, id| rows[row].push(id))?;
    for (row, (text, continuation)) in texts.iter().zip(rows).enumerate() {
        println!("--- prompt {row}\n{text}{}", continuation.finish()?);
    }
    Ok(())
}
