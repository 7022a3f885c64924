//! Trains makeMoE's sparse MoE language model on tinyshakespeare, writes
//! `OUT/metrics.jsonl`, saves `OUT/model.safetensors` + `OUT/config.json`,
//! and prints a generated sample.
//!
//! `cargo xtask shakespeare -- --preset makemoe` reproduces the tutorial's run.

use clap::Parser;
use moe_layers::lm::{
    generate, parameter_count, save_checkpoint, CharTokenizer, CheckpointMeta, Dataset,
    JsonlWriter, ModelConfig, MoeLanguageModel, Preset, Sampling, TrainConfig, TrainEvent, Trainer,
};
use moe_layers::prelude::{DeviceChoice, DispatchKind, WeightInit};
use moe_layers::{MoeError, Result};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Train the makeMoE sparse MoE language model on tinyshakespeare")]
struct Args {
    #[arg(long, default_value_t = 5000)]
    max_iters: i64,
    #[arg(long, default_value_t = 100)]
    eval_interval: i64,
    #[arg(long, default_value_t = 400)]
    eval_iters: i64,
    #[arg(long, default_value_t = 16)]
    batch_size: i64,
    #[arg(long, default_value_t = 32)]
    block_size: i64,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1337)]
    seed: i64,
    /// auto, cpu or cuda
    #[arg(long, default_value = "auto")]
    device: String,
    /// kaiming or xavier
    #[arg(long, default_value = "kaiming")]
    init: String,
    /// makemoe (the tutorial's quirks) or default (textbook attention scale, no eval noise)
    #[arg(long, default_value = "makemoe")]
    preset: String,
    /// auto, mask_loop, indexed_loop, grouped, capacity[:FACTOR] or dense_reference
    #[arg(long, default_value = "auto")]
    dispatch: String,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt"))]
    data: PathBuf,
    #[arg(long, default_value = "runs/shakespeare")]
    out: PathBuf,
    /// Characters generated at the end
    #[arg(long, default_value_t = 500)]
    sample_chars: usize,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let device = args.device.parse::<DeviceChoice>()?.resolve()?;
    let preset: Preset = args.preset.parse()?;
    let init: WeightInit = args.init.parse()?;
    let dispatch: DispatchKind = args.dispatch.parse()?;
    let text = std::fs::read_to_string(&args.data).map_err(|e| {
        MoeError::Data(format!(
            "cannot read the corpus {}: {e}",
            args.data.display()
        ))
    })?;
    std::fs::create_dir_all(&args.out).map_err(|e| MoeError::io(&args.out, e))?;
    let mut metrics = JsonlWriter::create(args.out.join("metrics.jsonl"))?;

    let tokenizer = CharTokenizer::from_text(&text)?;
    let model_config = ModelConfig {
        vocab_size: tokenizer.vocab_size(),
        block_size: args.block_size,
        init,
        dispatch,
        ..ModelConfig::preset(preset)
    };
    let train_config = TrainConfig {
        batch_size: args.batch_size,
        max_iters: args.max_iters,
        eval_interval: args.eval_interval,
        eval_iters: args.eval_iters,
        learning_rate: args.lr,
        seed: args.seed,
        ..TrainConfig::default()
    };
    train_config.validate()?;

    tch::manual_seed(args.seed);
    let vs = tch::nn::VarStore::new(device);
    let model = MoeLanguageModel::new(&vs.root(), &model_config)?;
    let tokens = tokenizer.encode(&text)?;
    let data = Dataset::new(
        &tokens,
        tokenizer.vocab_size(),
        train_config.train_fraction,
        model_config.block_size,
        device,
    )?;
    let params = parameter_count(&vs);
    println!(
        "{:.6} M parameters ({:.3} M active per token), device {device:?}, preset {}",
        params as f64 / 1e6,
        model_config.active_params(params) as f64 / 1e6,
        args.preset
    );
    metrics.write(&json!({
        "event": "start", "parameters": params,
        "active_parameters": model_config.active_params(params),
        "device": format!("{device:?}"),
        "config": { "model": &model_config, "train": &train_config },
    }))?;

    let started = Instant::now();
    let mut write_error = None;
    let last = Trainer::new(&vs, &model, &data, train_config.clone())?.run(|event| {
        let written = match *event {
            TrainEvent::Step {
                step,
                loss,
                ms_per_step,
                tokens_per_s,
                eta_s,
            } => {
                println!(
                    "step {step:>5}/{}: loss {loss:.4}, {ms_per_step:.1} ms/step, \
                     {tokens_per_s:.0} tokens/s, ETA {}",
                    train_config.max_iters,
                    format_secs(eta_s)
                );
                Ok(())
            }
            TrainEvent::Eval {
                step,
                losses,
                ms_per_step,
                tokens_per_s,
                eval_s,
            } => {
                println!(
                    "step {step}: train loss {:.4}, val loss {:.4} (eval {eval_s:.1} s)",
                    losses.train, losses.val
                );
                metrics.write(&json!({
                    "event": "eval", "step": step,
                    "train_loss": losses.train, "val_loss": losses.val,
                    "ms_per_step": ms_per_step, "tokens_per_s": tokens_per_s,
                    "eval_s": eval_s,
                }))
            }
        };
        if let Err(e) = written {
            write_error.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_error {
        return Err(e);
    }
    let wall_s = started.elapsed().as_secs_f64();

    let meta = CheckpointMeta {
        model: model_config,
        tokenizer: tokenizer.clone(),
        train: Some(train_config.clone()),
        step: train_config.max_iters,
    };
    save_checkpoint(&args.out, &vs, &meta)?;
    println!("saved {}", args.out.display());

    if args.sample_chars > 0 {
        println!("--- sample ---");
        let mut stdout = std::io::stdout();
        let mut decode_error = None;
        generate(
            &model,
            &[],
            args.sample_chars,
            Sampling::default(),
            |id| match tokenizer.decode_one(id) {
                Ok(c) => {
                    print!("{c}");
                    let _ = stdout.flush();
                }
                Err(e) => {
                    decode_error.get_or_insert(e);
                }
            },
        )?;
        println!("\n--------------");
        if let Some(e) = decode_error {
            return Err(e);
        }
    }
    metrics.write(&json!({
        "event": "end",
        "steps": train_config.max_iters,
        "train_loss": last.map(|l| l.train),
        "val_loss": last.map(|l| l.val),
        "wall_s": wall_s,
    }))?;
    Ok(())
}

fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
