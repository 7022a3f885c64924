//! Generates text from a checkpoint, streaming it as it comes, with a KV
//! cache (one position's forward pass per token).
//!
//! ```sh
//! cargo xtask run run --release --example generate -- \
//!     --checkpoint runs/shakespeare --prompt "ROMEO:" --max-new-tokens 500
//! ```
//!
//! `--bench` instead times the KV-cached generation against makeMoE's
//! recomputation of the whole context for every token, and prints the ratio.

use clap::Parser;
use moe_layers::lm::{
    generate, generate_recompute, load_checkpoint, CausalLm, Sampling, TextStream,
};
use moe_layers::prelude::DeviceChoice;
use moe_layers::Result;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Generate text from a moe-layers checkpoint")]
struct Args {
    /// A folder with model.safetensors and config.json
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue (every character must be in the tokenizer's vocabulary)
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 500)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample among the k most likely tokens only (1: greedy)
    #[arg(long)]
    top_k: Option<i64>,
    #[arg(long, default_value_t = 1337)]
    seed: i64,
    /// auto, cpu or cuda
    #[arg(long, default_value = "auto")]
    device: String,
    /// Time KV-cached generation against full recomputation instead
    #[arg(long)]
    bench: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let device = args.device.parse::<DeviceChoice>()?.resolve()?;
    let checkpoint = load_checkpoint(&args.checkpoint, device)?;
    let tokenizer = &checkpoint.meta.tokenizer;
    let prompt = tokenizer.encode(&args.prompt)?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        ..Sampling::default()
    };
    if args.bench {
        return bench(
            checkpoint.model.as_ref(),
            &prompt,
            args.max_new_tokens,
            sampling,
            args.seed,
        );
    }
    tch::manual_seed(args.seed);
    print!("{}", args.prompt);
    let mut stream = TextStream::new(tokenizer);
    let mut error = None;
    generate(
        checkpoint.model.as_ref(),
        &prompt,
        args.max_new_tokens,
        sampling,
        |id| match stream.push(id) {
            Ok(text) => {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        },
    )?;
    println!();
    error.map_or(Ok(()), Err)
}

/// Times both generators on the same task and prints the speed-up.
fn bench(
    model: &dyn CausalLm,
    prompt: &[i64],
    n: usize,
    sampling: Sampling,
    seed: i64,
) -> Result<()> {
    let context = model.max_context();
    let time = |cached: bool| -> Result<f64> {
        tch::manual_seed(seed);
        let started = Instant::now();
        if cached {
            generate(model, prompt, n, sampling, |_| {})?;
        } else {
            generate_recompute(model, prompt, n, sampling, |_| {})?;
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let cached_s = time(true)?;
    let recompute_s = time(false)?;
    println!(
        "{n} tokens, context {context}, {} MoE layers: \
         KV cache {cached_s:.2} s ({:.2} ms/token), recompute {recompute_s:.2} s \
         ({:.2} ms/token), speed-up {:.1}x",
        model.num_moe_layers(),
        1e3 * cached_s / n as f64,
        1e3 * recompute_s / n as f64,
        recompute_s / cached_s
    );
    Ok(())
}
