//! Times training steps of the makeMoE model (and one evaluation of
//! `eval_iters` batches per split) for each dispatch strategy, and prints one
//! JSON line per strategy: `{"device":..,"dispatch":..,"ms_per_step":..,
//! "tokens_per_s":..,"eval_s":..}`.
//!
//! `cargo xtask run run --release -p moe-lab --bin train_bench -- --device cpu --steps 30`
//!
//! With `--versus-makemoe` it times makeMoE's own PyTorch step
//! (`scripts/makemoe_reference.py`, run by the `python` on `PATH`, which
//! `cargo xtask run` points at `.venv`) on the same device with the same
//! number of threads, in rounds alternating with ours so that both see the
//! same machine load, and prints a last line with both medians and their ratio:
//!
//! `cargo xtask run run --release -p moe-lab --bin train_bench -- --device cpu --dispatch auto --eval-iters 0 --versus-makemoe`

// The flags' help text (clap reads the doc comments) writes option syntax
// such as `capacity[:FACTOR]`, not links.
#![allow(rustdoc::broken_intra_doc_links)]

use clap::{Parser, ValueEnum};
use moe_layers::dispatch::DispatchSpec;
use moe_layers::lm::{
    estimate_loss, CausalLm, LmConfig, MakeMoeConfig, Preset, Run, RunConfig, TrainConfig, Trainer,
};
use moe_layers::prelude::{DeviceChoice, Precision};
use moe_layers::Result;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(version)]
#[command(about = "Training-step time of the makeMoE model per dispatch strategy")]
struct Args {
    /// Where to train
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Timed steps (after 5 warm-up steps)
    #[arg(long, default_value_t = 30)]
    steps: i64,
    /// Comma-separated strategies: auto, mask_loop, indexed_loop, grouped,
    /// capacity[:FACTOR] or dense_reference
    #[arg(long, default_value = "mask_loop,indexed_loop,grouped,capacity,auto")]
    dispatch: String,
    /// The makeMoE preset trained
    #[arg(long, value_enum, default_value_t = Preset::MakeMoe)]
    preset: Preset,
    /// Compute dtypes, comma-separated; each is timed with each strategy
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fp32")]
    precision: Vec<Precision>,
    /// Batches per split of the timed evaluation (0: skip)
    #[arg(long, default_value_t = 400)]
    eval_iters: i64,
    /// The corpus
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/tinyshakespeare.txt"))]
    data: PathBuf,
    /// AdamW's update
    #[arg(long, value_enum, default_value_t = AdamWUpdate::Fused)]
    optimizer: AdamWUpdate,
    /// Also time the phases of each step (batch, forward, backward,
    /// optimizer) in a second pass of `--steps` steps, printed as "phases_ms"
    #[arg(long)]
    phases: bool,
    /// Also time makeMoE's PyTorch step (scripts/makemoe_reference.py) in
    /// rounds alternating with ours (the first strategy of --dispatch)
    #[arg(long)]
    versus_makemoe: bool,
    /// Rounds of --versus-makemoe
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Python interpreter that runs the reference
    #[arg(long, default_value = "python")]
    python: String,
    /// The reference script
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/makemoe_reference.py"))]
    reference_script: PathBuf,
}

/// AdamW's update, `--optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AdamWUpdate {
    /// libtorch's fused kernel
    Fused,
    /// Nine tensor operations per parameter
    TensorOps,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let device = args.device.resolve()?;
    let text =
        std::fs::read_to_string(&args.data).map_err(|e| moe_layers::MoeError::io(&args.data, e))?;
    let dispatches = args
        .dispatch
        .split(',')
        .map(|d| d.trim().parse::<DispatchSpec>())
        .collect::<Result<Vec<_>>>()?;
    for (precision, dispatch) in args
        .precision
        .iter()
        .flat_map(|&p| dispatches.iter().map(move |&d| (p, d)))
    {
        let mut model = MakeMoeConfig {
            precision,
            ..MakeMoeConfig::preset(args.preset)
        };
        model.set_dispatch(dispatch);
        let config = RunConfig {
            model: LmConfig::MakeMoe(model),
            train: TrainConfig {
                eval_iters: args.eval_iters.max(1),
                ..TrainConfig::default()
            },
            ..RunConfig::default()
        };
        let built = Run::new(config).device(device).build(&text)?;
        let train = &built.config().train;
        let mut trainer = built.trainer()?;
        trainer
            .optimizer_mut()
            .set_fused(args.optimizer == AdamWUpdate::Fused);
        let sync = || sync_device(device);
        for _ in 0..5 {
            let _ = trainer.step()?;
        }
        let (ms, loss) = time_steps(&mut trainer, args.steps, device)?;
        if args.versus_makemoe {
            return versus_makemoe(&args, &mut trainer, device, ms);
        }
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
            estimate_loss(built.model.as_ref(), &built.data, train)?;
            sync();
            Some(t.elapsed().as_secs_f64())
        } else {
            None
        };
        let tokens_per_step = (train.batch_size * built.data.block_size()) as f64;
        println!(
            "{}",
            json!({
                "device": format!("{device:?}"), "preset": args.preset, "precision": precision.to_string(),
                "dispatch": dispatch.kind.build().name(), "threads": tch::get_num_threads(),
                "optimizer": if trainer.optimizer().fused() { "fused" } else { "tensor-ops" },
                "steps": args.steps, "ms_per_step": ms, "tokens_per_s": tokens_per_step * 1e3 / ms,
                "last_loss": loss, "eval_iters": args.eval_iters, "eval_s": eval_s,
                "phases_ms": phases_ms,
            })
        );
    }
    Ok(())
}

fn sync_device(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Milliseconds per step over `steps` steps, and the last step's loss.
fn time_steps(
    trainer: &mut Trainer<dyn CausalLm>,
    steps: i64,
    device: tch::Device,
) -> Result<(f64, Option<f64>)> {
    sync_device(device);
    let started = Instant::now();
    let mut last = None;
    for _ in 0..steps {
        last = Some(trainer.step()?);
    }
    let loss = last.map(|l| l.double_value(&[]));
    sync_device(device);
    Ok((
        1e3 * started.elapsed().as_secs_f64() / steps.max(1) as f64,
        loss,
    ))
}

/// One run of scripts/makemoe_reference.py; its ms per step.
fn makemoe_step_ms(args: &Args, device: tch::Device) -> Result<f64> {
    let script = &args.reference_script;
    let device_arg = match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    let failed = |why: String| {
        moe_layers::MoeError::config(format!(
            "the makeMoE reference ({} {}) failed: {why}",
            args.python,
            script.display()
        ))
    };
    let out = Command::new(&args.python)
        .arg(script)
        .args(["--steps", &args.steps.to_string(), "--device", &device_arg])
        .args(["--threads", &tch::get_num_threads().to_string()])
        .arg("--data")
        .arg(&args.data)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| failed(format!("{e} in {line:?}")))?;
    value["ms_per_step"]
        .as_f64()
        .ok_or_else(|| failed(format!("no ms_per_step in {line:?}")))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// `--versus-makemoe`: alternating rounds of makeMoE's step and ours.
fn versus_makemoe(
    args: &Args,
    trainer: &mut Trainer<dyn CausalLm>,
    device: tch::Device,
    first: f64,
) -> Result<()> {
    if args.preset != Preset::MakeMoe {
        return Err(moe_layers::MoeError::config(format!(
            "--versus-makemoe compares makeMoE's own model, so it needs --preset makemoe, got {:?}",
            args.preset
        )));
    }
    let mut ours = vec![first];
    let mut theirs = Vec::new();
    for round in 0..args.rounds.max(1) {
        theirs.push(makemoe_step_ms(args, device)?);
        if round > 0 {
            ours.push(time_steps(trainer, args.steps, device)?.0);
        }
        eprintln!(
            "round {}: ours {:.1} ms/step, makeMoE {:.1} ms/step",
            round + 1,
            ours[round],
            theirs[round]
        );
    }
    let (ours_ms, theirs_ms) = (median(&ours), median(&theirs));
    println!(
        "{}",
        json!({
            "versus": "makemoe-pytorch", "device": format!("{device:?}"),
            "threads": tch::get_num_threads(), "steps": args.steps, "preset": args.preset,
            "precision": args.precision, "dispatch": args.dispatch,
            "ours_ms_per_step": ours, "makemoe_ms_per_step": theirs,
            "ours_median_ms": ours_ms, "makemoe_median_ms": theirs_ms,
            "ratio": ours_ms / theirs_ms,
        })
    );
    Ok(())
}
