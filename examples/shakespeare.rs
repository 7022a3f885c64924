//! Trains a sparse MoE language model on tinyshakespeare (makeMoE's by
//! default, or the Mixtral-style decoder with `--family decoder`), writes
//! `OUT/metrics.jsonl`, saves a resumable checkpoint in `OUT`
//! (`model.safetensors`, `config.json`, `optimizer.safetensors`), optionally
//! plots `OUT/loss_curve.png`, logs the run to an MLflow tracking server with
//! `--mlflow-uri` (or `MLFLOW_TRACKING_URI`), and prints a generated sample.
//!
//! `cargo xtask shakespeare -- --preset makemoe` reproduces the tutorial's run;
//! `cargo xtask shakespeare -- --family decoder [--preset yuan]` trains a
//! decoder-family model with the same CLI, metrics, checkpoints and resume.
//! `--config FILE` (TOML or JSON) sets model, training and tokenizer; flags
//! override it, then `--set path.to.field=value` any field of it;
//! `--print-config` prints the resolved config and exits.
//! `cargo xtask shakespeare -- --nproc 2 --expert-parallel` trains on two
//! processes launched by torchrun, the experts spread over them.

use clap::Parser;
use moe_layers::dispatch::{ExchangeMode, ExpertParallelism};
use moe_layers::lm::{
    generate, plot_loss_curve, run_name, CausalLm, Continuation, LmConfig, LossCurves,
    MakeMoeConfig, MlflowOptions, Preset, Run, RunArgs, RunConfig, RunLog, RunStatus, Sampling,
    Tokenizer, TrainEvent,
};
use moe_layers::{MoeError, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(version)]
#[command(
    about = "Train a sparse MoE language model (makeMoE or the decoder family) on tinyshakespeare"
)]
struct Args {
    /// The flags every training program has: --config, --set,
    /// --print-config, --max-iters (default 5000, makeMoE's), --device,
    /// --block-size, --dispatch, --precision, --tokenizer, ...
    #[command(flatten)]
    run: RunArgs,
    /// Continue the run saved in this folder (its model and tokenizer; flags may change training)
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Model family: make_moe (the tutorial's model; unless a config file
    /// says otherwise) or decoder (Mixtral-style: RMSNorm, RoPE, grouped-query
    /// attention, SwiGLU experts)
    #[arg(long, value_parser = ["make_moe", "makemoe", "decoder"])]
    family: Option<String>,
    /// make_moe: makemoe (the tutorial's quirks; unless a config file is
    /// given) or default (textbook attention scale, no eval noise); decoder:
    /// mixtral (default), qwen2_moe, qwen3_moe, glm4_moe, deepseek_v3,
    /// deepseek_v2, gpt_oss, llama4, olmoe, yuan or llama
    #[arg(long)]
    preset: Option<String>,
    /// The corpus
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt"))]
    data: PathBuf,
    /// Run folder: metrics.jsonl, the checkpoint, the plot (its name names the MLflow run)
    #[arg(long, default_value = "runs/shakespeare")]
    out: PathBuf,
    /// MLflow: --mlflow-uri (else MLFLOW_TRACKING_URI), --mlflow-experiment
    /// (else "shakespeare"), --mlflow-file-store
    #[command(flatten)]
    mlflow: MlflowOptions,
    /// Save a training checkpoint in OUT every this many steps (and at the end)
    #[arg(long)]
    checkpoint_interval: Option<i64>,
    /// Write OUT/loss_curve.png at the end
    #[arg(long)]
    plot: bool,
    /// Characters generated at the end
    #[arg(long, default_value_t = 500)]
    sample_chars: usize,
    /// Run as one rank of torchrun's group (`torchrun --no-python
    /// --nproc-per-node P <this binary> --expert-parallel ...`, or `cargo
    /// xtask shakespeare -- --nproc P --expert-parallel`): the experts of
    /// every MoE layer are spread over the ranks, everything else is
    /// data-parallel; each rank draws its own batches, rank 0 writes the
    /// metrics and the checkpoint
    #[arg(long)]
    expert_parallel: bool,
    /// With --expert-parallel: how tokens are exchanged between ranks
    #[arg(long, value_enum, default_value_t = ExchangeMode::Dropless)]
    exchange: ExchangeMode,
    /// One process computing what N expert-parallel ranks compute (each
    /// step's batch is the N ranks' batches), to compare a parallel run with
    #[arg(long)]
    simulate_ranks: Option<i64>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The config file (or makeMoE's preset), then the flags on top, then the
/// `--set` overrides ([`RunArgs::resolve`]).
fn resolve_config(args: &Args) -> Result<RunConfig> {
    let base = || RunConfig {
        model: LmConfig::MakeMoe(MakeMoeConfig::preset(Preset::MakeMoe)),
        ..RunConfig::default()
    };
    args.run.resolve(base, |config| {
        (config.model).choose(args.family.as_deref(), args.preset.as_deref())
    })
}

fn run(args: Args) -> Result<()> {
    let device = args.run.device.resolve()?;
    let text = std::fs::read_to_string(&args.data).map_err(|e| MoeError::io(&args.data, e))?;
    // With --expert-parallel: this process is one rank of torchrun's group
    // (Gloo, CPU tensors).
    let parallelism = match (args.expert_parallel, device) {
        (false, _) => None,
        (true, tch::Device::Cpu) => Some(ExpertParallelism::from_env(args.exchange)?),
        (true, _) => {
            return Err(MoeError::config(
                "--expert-parallel runs on Gloo with CPU tensors: add --device cpu",
            ))
        }
    };
    // A resumed run keeps its model and tokenizer; training flags still apply.
    let prepared = Run::new(resolve_config(&args)?)
        .device(device)
        .checkpoints(&args.out, args.checkpoint_interval)
        .resume(args.resume.clone())
        .expert_parallel(parallelism)
        .simulated_ranks(args.simulate_ranks)
        .prepare(&text)?;
    if args.run.print_config {
        print!("{}", prepared.config().to_toml()?);
        return Ok(());
    }
    let config = prepared.config().clone();

    // Every event goes to metrics.jsonl; the progress bar and MLflow show
    // what a person follows (rank 0 alone writes and reports).
    let mut log = RunLog::for_run(&prepared, &args.out, &args.mlflow, "shakespeare")?;
    let trained = prepared.train(&text, |event| {
        if let (TrainEvent::Start { step, .. }, Some(dir)) = (event, &args.resume) {
            println!("resumed {} at step {step}", dir.display());
        }
        log.as_mut().map_or(Ok(()), |log| log.event(event))
    });
    let mut mlflow = log.map(RunLog::finish);
    let trained = trained.inspect_err(|_| {
        mlflow.take().map(|run| run.finish(RunStatus::Failed));
    })?;
    if let Some(mlflow) = mlflow.as_mut() {
        println!("saved {} (step {})", args.out.display(), trained.steps);
        if args.plot {
            let png = args.out.join("loss_curve.png");
            let curves = LossCurves::from_jsonl(&args.out.join("metrics.jsonl"))?;
            plot_loss_curve(&png, &run_name(&args.out), &curves)?;
            println!("plotted {}", png.display());
            mlflow.artifact(&png)?;
        }
    }
    if args.sample_chars > 0 {
        // Every rank samples alike (same seed): the forward passes of an
        // expert-parallel model are collectives. Rank 0 shows the text.
        if args.expert_parallel {
            tch::manual_seed(config.train.seed);
        }
        let (model, tokenizer) = (trained.model.as_ref(), &trained.tokenizer);
        print_sample(model, tokenizer, args.sample_chars, mlflow.is_some())?;
    }
    mlflow.map_or(Ok(()), |run| run.finish(RunStatus::Finished))
}

/// Generates `n` tokens from nothing, streaming their text when `show`.
fn print_sample(model: &dyn CausalLm, tokenizer: &Tokenizer, n: usize, show: bool) -> Result<()> {
    let mut sample = Continuation::new(tokenizer, &[], &[])?;
    if show {
        println!("--- sample ---");
    }
    generate(model, &[], n, Sampling::default(), |id| {
        let shown = sample.text().len();
        let _ = sample.push(id);
        if show {
            print!("{}", &sample.text()[shown..]);
            let _ = std::io::stdout().flush();
        }
    })?;
    if show {
        println!("\n--------------");
    }
    sample.finish().map(|_| ())
}
