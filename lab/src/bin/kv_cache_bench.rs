//! Times KV-cached generation (one position's forward pass per token)
//! against the recomputation of the whole context for every token
//! (makeMoE's `generate`), on the same checkpoint, prompt and seed, one
//! after the other in this process, and prints the speed-up:
//!
//! `cargo xtask run run -p moe-lab --bin kv_cache_bench -- --checkpoint runs/shakespeare --max-new-tokens 2000 --device cpu`

use clap::Parser;
use moe_layers::lm::{generate, generate_recompute, load_checkpoint, Sampling};
use moe_layers::prelude::DeviceChoice;
use moe_layers::Result;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(version, about = "KV-cached generation against full recomputation")]
struct Args {
    /// A moe-layers checkpoint: a folder with model.safetensors and config.json
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue (every character in the tokenizer's vocabulary)
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 500)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1337)]
    seed: i64,
    /// Where to run
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let checkpoint = load_checkpoint(&args.checkpoint, args.device.resolve()?)?;
    let model = checkpoint.model.as_ref();
    let prompt = checkpoint.meta.tokenizer.encode(&args.prompt)?;
    let (n, sampling) = (args.max_new_tokens, Sampling::default());
    let time = |cached: bool| -> Result<f64> {
        tch::manual_seed(args.seed);
        let started = Instant::now();
        if cached {
            generate(model, &prompt, n, sampling, |_| {})?;
        } else {
            generate_recompute(model, &prompt, n, sampling, |_| {})?;
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let cached_s = time(true)?;
    let recompute_s = time(false)?;
    println!(
        "{n} tokens, context {}, {} MoE layers: KV cache {cached_s:.2} s ({:.2} ms/token), \
         recompute {recompute_s:.2} s ({:.2} ms/token), speed-up {:.1}x",
        model.max_context(),
        model.num_moe_layers(),
        1e3 * cached_s / n as f64,
        1e3 * recompute_s / n as f64,
        recompute_s / cached_s
    );
    Ok(())
}
