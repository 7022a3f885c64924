//! Times training steps of the makeMoE model (and one evaluation of
//! `eval_iters` batches per split) for each dispatch strategy, and prints one
//! JSON line per strategy: `{"device":..,"dispatch":..,"ms_per_step":..,
//! "tokens_per_s":..,"eval_s":..}`.
//!
//! `cargo xtask run run --release --example train_bench -- --device cpu --steps 30`

use clap::Parser;
use moe_layers::dispatch::DispatchKind;
use moe_layers::lm::{
    estimate_loss, CharTokenizer, Dataset, ModelConfig, MoeLanguageModel, Preset, TrainConfig,
    Trainer,
};
use moe_layers::prelude::DeviceChoice;
use moe_layers::Result;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Training-step time of the makeMoE model per dispatch strategy")]
struct Args {
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed steps (after 5 warm-up steps)
    #[arg(long, default_value_t = 30)]
    steps: i64,
    /// Comma-separated strategies
    #[arg(long, default_value = "mask_loop,indexed_loop,grouped,capacity,auto")]
    dispatch: String,
    /// makemoe or default
    #[arg(long, default_value = "makemoe")]
    preset: String,
    /// Batches per split of the timed evaluation (0: skip)
    #[arg(long, default_value_t = 400)]
    eval_iters: i64,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt"))]
    data: PathBuf,
    /// Also time the phases of each step (batch, forward, backward,
    /// optimizer) in a second pass of `--steps` steps, printed as "phases_ms"
    #[arg(long)]
    phases: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let device = args.device.parse::<DeviceChoice>()?.resolve()?;
    let text =
        std::fs::read_to_string(&args.data).map_err(|e| moe_layers::MoeError::io(&args.data, e))?;
    let tokenizer = CharTokenizer::from_text(&text)?;
    let tokens = tokenizer.encode(&text)?;
    for name in args.dispatch.split(',') {
        let dispatch: DispatchKind = name.trim().parse()?;
        let config = ModelConfig {
            vocab_size: tokenizer.vocab_size(),
            dispatch,
            ..ModelConfig::preset(args.preset.parse::<Preset>()?)
        };
        let train = TrainConfig {
            eval_iters: args.eval_iters.max(1),
            ..TrainConfig::default()
        };
        tch::manual_seed(1337);
        let vs = tch::nn::VarStore::new(device);
        let model = MoeLanguageModel::new(&vs.root(), &config)?;
        let data = Dataset::new(&tokens, config.vocab_size, 0.9, config.block_size, device)?;
        let mut trainer = Trainer::new(&vs, &model, &data, train.clone())?;
        let sync = || {
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        for _ in 0..5 {
            let _ = trainer.step()?;
        }
        sync();
        let started = Instant::now();
        let mut last = None;
        for _ in 0..args.steps {
            last = Some(trainer.step()?);
        }
        let loss = last.map(|l| l.double_value(&[]));
        sync();
        let secs = started.elapsed().as_secs_f64();
        let phases_ms = if args.phases {
            trainer.time_phases();
            for _ in 0..args.steps {
                let _ = trainer.step()?;
            }
            trainer.phases().map(|p| {
                let per_step = |s: f64| 1e3 * s / p.steps.max(1) as f64;
                json!({
                    "batch": per_step(p.batch_s), "forward": per_step(p.forward_s),
                    "backward": per_step(p.backward_s), "optimizer": per_step(p.optimizer_s),
                })
            })
        } else {
            None
        };
        let eval_s = if args.eval_iters > 0 {
            let t = Instant::now();
            estimate_loss(&model, &data, &train)?;
            sync();
            Some(t.elapsed().as_secs_f64())
        } else {
            None
        };
        let ms = 1e3 * secs / args.steps.max(1) as f64;
        let tokens_per_step = (train.batch_size * config.block_size) as f64;
        println!(
            "{}",
            json!({
                "device": format!("{device:?}"), "preset": args.preset,
                "dispatch": dispatch.build().name(), "threads": tch::get_num_threads(),
                "steps": args.steps, "ms_per_step": ms, "tokens_per_s": tokens_per_step * 1e3 / ms,
                "last_loss": loss, "eval_iters": args.eval_iters, "eval_s": eval_s,
                "phases_ms": phases_ms,
            })
        );
    }
    Ok(())
}
