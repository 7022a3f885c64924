//! Trains makeMoE's sparse MoE language model on tinyshakespeare, writes
//! `OUT/metrics.jsonl` and an MLflow run (`OUT/mlruns`), saves a resumable
//! checkpoint in `OUT` (`model.safetensors`, `config.json`,
//! `optimizer.safetensors`), optionally plots `OUT/loss_curve.png`, and
//! prints a generated sample.
//!
//! `cargo xtask shakespeare -- --preset makemoe` reproduces the tutorial's run.
//! `--config FILE` (TOML or JSON) sets model, training and tokenizer; flags
//! override it; `--print-config` prints the resolved config and exits.

use clap::Parser;
use moe_layers::lm::{
    generate, load_checkpoint_meta, parameter_count, plot_loss_curve, CausalLm, Checkpointing,
    Dataset, JsonlWriter, LmConfig, LossCurves, MakeMoeConfig, MlflowRun, Preset, Progress,
    RunConfig, RunStatus, Sampling, TextStream, Tokenizer, TokenizerKind, TrainEvent, Trainer,
};
use moe_layers::prelude::{DeviceChoice, DispatchSpec, Precision, WeightInit};
use moe_layers::{MoeError, Result};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Train the makeMoE sparse MoE language model on tinyshakespeare")]
struct Args {
    /// TOML or JSON file with [model], [train] and [tokenizer] sections
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the resolved config (TOML) and exit
    #[arg(long)]
    print_config: bool,
    /// Continue the run saved in this folder (its model and tokenizer; flags may change training)
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long)]
    max_iters: Option<i64>,
    #[arg(long)]
    eval_interval: Option<i64>,
    #[arg(long)]
    eval_iters: Option<i64>,
    #[arg(long)]
    batch_size: Option<i64>,
    #[arg(long)]
    block_size: Option<i64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    seed: Option<i64>,
    /// auto, cpu or cuda
    #[arg(long, default_value = "auto")]
    device: String,
    /// kaiming or xavier
    #[arg(long)]
    init: Option<String>,
    /// makemoe (the tutorial's quirks) or default (textbook attention scale,
    /// no eval noise); makemoe unless a config file is given
    #[arg(long)]
    preset: Option<String>,
    /// auto (default), mask_loop, indexed_loop, grouped, capacity[:FACTOR] or dense_reference;
    /// capacity[:FACTOR] also sets the router's capacity factor (default 1.25)
    #[arg(long)]
    dispatch: Option<String>,
    /// fp32 (default) or bf16: compute dtype of attention and experts
    /// (mixed precision; parameters stay f32)
    #[arg(long)]
    precision: Option<String>,
    /// char (makeMoE) or bpe (byte-level BPE trained on the corpus)
    #[arg(long)]
    tokenizer: Option<String>,
    /// Vocabulary size of the BPE tokenizer
    #[arg(long)]
    vocab_size: Option<usize>,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt"))]
    data: PathBuf,
    #[arg(long, default_value = "runs/shakespeare")]
    out: PathBuf,
    /// Save a training checkpoint in OUT every this many steps (and at the end)
    #[arg(long)]
    checkpoint_interval: Option<i64>,
    /// Write OUT/loss_curve.png at the end
    #[arg(long)]
    plot: bool,
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

/// The config file (or the preset's defaults), then the flags on top.
fn resolve_config(args: &Args) -> Result<RunConfig> {
    let mut config = match &args.config {
        Some(path) => RunConfig::from_file(path)?,
        None => RunConfig {
            model: LmConfig::MakeMoe(MakeMoeConfig::preset(Preset::MakeMoe)),
            ..RunConfig::default()
        },
    };
    let t = &mut config.train;
    let set = |dst: &mut i64, src: Option<i64>| *dst = src.unwrap_or(*dst);
    set(&mut t.max_iters, args.max_iters);
    set(&mut t.eval_interval, args.eval_interval);
    set(&mut t.eval_iters, args.eval_iters);
    set(&mut t.batch_size, args.batch_size);
    set(&mut t.seed, args.seed);
    t.learning_rate = args.lr.unwrap_or(t.learning_rate);
    match &mut config.model {
        LmConfig::MakeMoe(m) => apply_make_moe_flags(args, m)?,
    }
    if let Some(kind) = &args.tokenizer {
        config.tokenizer.kind = kind.parse::<TokenizerKind>()?;
    }
    config.tokenizer.vocab_size = args.vocab_size.unwrap_or(config.tokenizer.vocab_size);
    Ok(config)
}

/// The model flags, on makeMoE's config.
fn apply_make_moe_flags(args: &Args, m: &mut MakeMoeConfig) -> Result<()> {
    if let Some(preset) = &args.preset {
        m.apply_preset(preset.parse::<Preset>()?);
    }
    m.block_size = args.block_size.unwrap_or(m.block_size);
    if let Some(init) = &args.init {
        m.init = init.parse::<WeightInit>()?;
    }
    if let Some(precision) = &args.precision {
        m.precision = precision.parse::<Precision>()?;
    }
    if let Some(dispatch) = &args.dispatch {
        m.set_dispatch(dispatch.parse::<DispatchSpec>()?);
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    let device = args.device.parse::<DeviceChoice>()?.resolve()?;
    let mut config = resolve_config(&args)?;
    let text = std::fs::read_to_string(&args.data).map_err(|e| {
        MoeError::Data(format!(
            "cannot read the corpus {}: {e}",
            args.data.display()
        ))
    })?;
    // A resumed run keeps its model and tokenizer; training flags still apply.
    let resumed = match &args.resume {
        Some(dir) => Some(load_checkpoint_meta(dir)?),
        None => None,
    };
    let tokenizer = match &resumed {
        Some(meta) => {
            config.model = meta.model.clone();
            meta.tokenizer.clone()
        }
        None => Tokenizer::train(&text, &config.tokenizer)?,
    };
    config.model.set_vocab_size(tokenizer.vocab_size());
    config.model.validate()?;
    config.train.validate()?;
    if args.print_config {
        print!("{}", config.to_toml()?);
        return Ok(());
    }
    let (model_config, train_config) = (config.model.clone(), config.train.clone());

    std::fs::create_dir_all(&args.out).map_err(|e| MoeError::io(&args.out, e))?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = if resumed.is_some() {
        JsonlWriter::append(&metrics_path)?
    } else {
        JsonlWriter::create(&metrics_path)?
    };
    let run_name = args
        .out
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().into_owned());
    let mlflow = MlflowRun::create(&args.out.join("mlruns"), "shakespeare", &run_name)?;
    log_params(&mlflow, &config)?;

    tch::manual_seed(train_config.seed);
    let vs = tch::nn::VarStore::new(device);
    let model = model_config.build(&vs.root())?;
    let tokens = tokenizer.encode(&text)?;
    let data = Dataset::new(
        &tokens,
        tokenizer.vocab_size(),
        train_config.train_fraction,
        model_config.max_context(),
        device,
    )?;
    let params = parameter_count(&vs);
    let active = model_config.active_params(params)?;
    println!(
        "{:.6} M parameters ({:.3} M active per token), device {device:?}, vocabulary {}",
        params as f64 / 1e6,
        active as f64 / 1e6,
        tokenizer.vocab_size()
    );
    metrics.write(&json!({
        "event": "start", "parameters": params,
        "active_parameters": active,
        "device": format!("{device:?}"),
        "config": { "model": &model_config, "train": &train_config },
    }))?;

    let mut trainer = Trainer::new(&vs, model.as_ref(), &data, train_config.clone())?
        .with_checkpointing(Checkpointing {
            dir: args.out.clone(),
            interval: args
                .checkpoint_interval
                .unwrap_or(train_config.max_iters.max(1)),
            tokenizer: tokenizer.clone(),
        })?;
    if let Some(dir) = &args.resume {
        trainer.resume(dir)?;
        println!("resumed {} at step {}", dir.display(), trainer.steps_done());
    }
    let started = Instant::now();
    let progress = Progress::new(train_config.max_iters, trainer.steps_done());
    let mut write_error = None;
    let result = trainer.run_with_routing_stats(|event, routing| {
        let written = match *event {
            TrainEvent::Step {
                step,
                loss,
                ms_per_step,
                tokens_per_s,
                eta_s,
            } => {
                progress.step(step, loss, ms_per_step, tokens_per_s, eta_s);
                mlflow.log_metric("loss", loss, step)
            }
            TrainEvent::Eval {
                step,
                losses,
                ms_per_step,
                tokens_per_s,
                eval_s,
            } => {
                progress.println(&format!(
                    "step {step}: train loss {:.4}, val loss {:.4} (eval {eval_s:.1} s)",
                    losses.train, losses.val
                ));
                mlflow
                    .log_metric("train_loss", losses.train, step)
                    .and_then(|_| mlflow.log_metric("val_loss", losses.val, step))
                    .and_then(|_| mlflow.log_metric("tokens_per_s", tokens_per_s, step))
                    .and_then(|_| {
                        // Per-layer routing statistics, and their mean CV as one
                        // plottable balance figure.
                        let layers = routing.unwrap_or_default();
                        let load_cv =
                            layers.iter().map(|s| s.cv).sum::<f64>() / layers.len().max(1) as f64;
                        metrics.write(&json!({
                            "event": "eval", "step": step,
                            "train_loss": losses.train, "val_loss": losses.val,
                            "ms_per_step": ms_per_step, "tokens_per_s": tokens_per_s,
                            "eval_s": eval_s, "load_cv": load_cv, "routing": layers,
                        }))
                    })
            }
        };
        if let Err(e) = written {
            write_error.get_or_insert(e);
        }
    });
    progress.finish();
    let last = match result.and_then(|last| write_error.map_or(Ok(last), Err)) {
        Ok(last) => last,
        Err(e) => {
            let _ = mlflow.finish(RunStatus::Failed);
            return Err(e);
        }
    };
    let wall_s = started.elapsed().as_secs_f64();
    println!(
        "saved {} (step {})",
        args.out.display(),
        trainer.steps_done()
    );

    if args.plot {
        let png = args.out.join("loss_curve.png");
        plot_loss_curve(&png, &LossCurves::from_jsonl(&metrics_path)?)?;
        println!("plotted {}", png.display());
    }
    if args.sample_chars > 0 {
        print_sample(model.as_ref(), &tokenizer, args.sample_chars)?;
    }
    metrics.write(&json!({
        "event": "end",
        "steps": trainer.steps_done(),
        "train_loss": last.map(|l| l.train),
        "val_loss": last.map(|l| l.val),
        "wall_s": wall_s,
    }))?;
    mlflow.finish(RunStatus::Finished)
}

/// Every field of the config as an MLflow parameter (`model.n_embd`, ...).
fn log_params(mlflow: &MlflowRun, config: &RunConfig) -> Result<()> {
    let value = serde_json::to_value(config)
        .map_err(|e| MoeError::config(format!("cannot serialise the config: {e}")))?;
    for (section, fields) in value.as_object().into_iter().flatten() {
        for (key, v) in fields.as_object().into_iter().flatten() {
            let text = v.as_str().map_or(v.to_string(), str::to_string);
            mlflow.log_param(&format!("{section}.{key}"), text)?;
        }
    }
    Ok(())
}

/// Generates `n` tokens from an empty prompt, printing the text as it comes.
fn print_sample(model: &dyn CausalLm, tokenizer: &Tokenizer, n: usize) -> Result<()> {
    println!("--- sample ---");
    let mut stream = TextStream::new(tokenizer);
    let mut error = None;
    generate(model, &[], n, Sampling::default(), |id| {
        match stream.push(id) {
            Ok(text) => {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    })?;
    println!("\n--------------");
    error.map_or(Ok(()), Err)
}
