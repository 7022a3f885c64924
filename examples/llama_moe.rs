//! LLaMA-MoE (Zhu et al. 2024, arXiv 2406.16554; seed document 002) on
//! tinyshakespeare: a dense LLaMA-style decoder (the config's model) is
//! trained, or loaded from one of our checkpoints (`--checkpoint`) or a
//! Hugging Face Llama folder (`--model`, whose tokenizer then encodes the
//! corpus); each layer's SwiGLU MLP is split into `E` experts with a new
//! gate; the dense and the MoE model then both continue training for
//! `max_iters` steps (continual pre-training, as LLaMA-MoE did). Writes,
//! under `--out`: `dense/` and `moe/` (checkpoints, `metrics.jsonl`),
//! `val_loss.png`, and `conversion.json` (with every expert active the MoE
//! model computes the dense logits: the conversion's check). With
//! `--model`, an upcycled MoE is also written as a `mixtral` folder,
//! `moe_hf/`, that transformers loads.
//!
//! ```sh
//! cargo xtask run run --release --example llama_moe -- --dense-steps 1000 --max-iters 1000
//! cargo xtask run run --release --example llama_moe -- --model tests/data/hf/llama \
//!     --construction upcycle --experts 8 --top-k 2 --max-iters 300 --out runs/llama_moe_hf
//! ```

use clap::Parser;
use moe_layers::hf::{from_pretrained, save_pretrained, LoadOptions};
use moe_layers::lm::{
    load_checkpoint, plot_val_losses, CausalLm, DecoderConfig, DecoderPreset, ExpertConstruction,
    LmConfig, LossCurves, MlflowOptions, MoeConversion, Run, RunArgs, RunConfig, RunLog, RunStatus,
    TrainConfig, TrainedRun,
};
use moe_layers::{MoeError, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Convert a dense LLaMA-style decoder into an MoE and train both"
)]
struct Args {
    /// --config, --set, --print-config, --device, ...; --max-iters: the
    /// continued training's steps (default 1000), for the dense and the MoE
    /// model each; the dense model trained here is the config's
    #[command(flatten)]
    run: RunArgs,
    /// A dense decoder checkpoint of ours to convert (else one is trained first)
    #[arg(long, conflicts_with = "model")]
    checkpoint: Option<PathBuf>,
    /// A Hugging Face Llama folder to convert (its tokenizer.json encodes the corpus)
    #[arg(long)]
    model: Option<PathBuf>,
    /// Steps of the dense model's pre-training when no model is given
    #[arg(long, default_value_t = 1000)]
    dense_steps: i64,
    /// Experts per layer
    #[arg(long, default_value_t = 8)]
    experts: i64,
    /// Experts per token
    #[arg(long, default_value_t = 2)]
    top_k: i64,
    /// How experts are made from the dense MLP: split (random neurons),
    /// balanced (balanced k-means clusters of neurons) or upcycle (copies)
    #[arg(long, default_value = "split")]
    construction: ExpertConstruction,
    /// Standard deviation of the new gates' weights
    #[arg(long, default_value_t = 0.02)]
    gate_std: f64,
    /// The corpus
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt"))]
    data: PathBuf,
    #[arg(long, default_value = "runs/llama_moe")]
    out: PathBuf,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// A dense 4-layer LLaMA, 1000 steps, evaluated every 100 on 100 batches.
fn base_config() -> RunConfig {
    let llama = DecoderConfig::preset(DecoderPreset::Llama);
    RunConfig {
        model: LmConfig::Decoder(DecoderConfig {
            num_hidden_layers: 4,
            ..llama
        }),
        train: TrainConfig {
            max_iters: 1000,
            eval_iters: 100,
            ..TrainConfig::default()
        },
        ..RunConfig::default()
    }
}

fn run(args: Args) -> Result<()> {
    let config = args.run.resolve(base_config, |_| Ok(()))?;
    if args.run.print_config {
        print!("{}", config.to_toml()?);
        return Ok(());
    }
    let device = args.run.device.resolve()?;
    let text = std::fs::read_to_string(&args.data).map_err(|e| MoeError::io(&args.data, e))?;
    std::fs::create_dir_all(&args.out).map_err(|e| MoeError::io(&args.out, e))?;

    // 1. The dense model: loaded, or trained here.
    let (vs, model, tokenizer): (_, Box<dyn CausalLm>, _) = if let Some(dir) = &args.model {
        // f32 parameters: this example trains them.
        let options = LoadOptions {
            device,
            dtype: Some(Kind::Float),
            ..Default::default()
        };
        let mut dense = from_pretrained(dir, &options)?;
        let tokenizer = dense.take_tokenizer()?;
        println!(
            "loaded {} ({} layers)",
            dir.display(),
            dense.config.num_hidden_layers
        );
        (dense.vs, Box::new(dense.model), tokenizer)
    } else if let Some(dir) = &args.checkpoint {
        let loaded = load_checkpoint(dir, device)?;
        (loaded.vs, loaded.model, loaded.meta.tokenizer)
    } else {
        println!(
            "pre-training the dense model for {} steps",
            args.dense_steps
        );
        let train = TrainConfig {
            max_iters: args.dense_steps,
            ..config.train.clone()
        };
        let pretrain = RunConfig {
            train,
            ..config.clone()
        };
        let dense = train_logged(
            Run::new(pretrain).device(device),
            None,
            &text,
            &args.out.join("dense_pretrain"),
        )?;
        (dense.vs, dense.model, dense.tokenizer)
    };
    let dense_config = model.lm_config().as_decoder()?.clone();

    // 2. The conversion, checked: with every expert active and uniform
    // gates it computes the dense model's function.
    let conversion = MoeConversion {
        num_experts: args.experts,
        top_k: args.top_k,
        construction: args.construction,
        gate_std: args.gate_std,
    };
    let probe_len = dense_config.max_position_embeddings.min(16);
    let probe = Tensor::randint(
        tokenizer.vocab_size(),
        [4, probe_len],
        (Kind::Int64, device),
    );
    let logit_diff = conversion.all_active_error(model.as_ref(), &vs, &probe)?;
    println!(
        "all {} experts active: max logit difference {logit_diff:.2e}",
        args.experts
    );
    tch::manual_seed(config.train.seed);
    let moe_vs = nn::VarStore::new(device);
    let moe = conversion.convert(&vs, &dense_config, &moe_vs)?;
    let parameters = |vs: &nn::VarStore| -> i64 {
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    };
    let record = serde_json::json!({
        "conversion": &conversion,
        "all_experts_active_max_logit_diff": logit_diff,
        "dense_parameters": parameters(&vs),
        "moe_parameters": parameters(&moe_vs),
        "moe_active_parameters": moe.lm_config().active_params(parameters(&moe_vs))?,
    });
    let path = args.out.join("conversion.json");
    std::fs::write(&path, record.to_string()).map_err(|e| MoeError::io(&path, e))?;
    if args.model.is_some() && args.construction == ExpertConstruction::Upcycle {
        // Softmax top-k, renormalised, unscaled: a Mixtral checkpoint.
        let dir = args.out.join("moe_hf");
        save_pretrained(&moe, &moe_vs, "mixtral", &dir, Some(&tokenizer))?;
        println!(
            "wrote the converted model as a mixtral checkpoint: {}",
            dir.display()
        );
    }

    // 3. Both models train on: the same steps, data and trainer.
    println!(
        "continued training: dense and MoE, {} steps each",
        config.train.max_iters
    );
    let continued = |vs, model, dir: &str| {
        let run = Run::new(config.clone()).tokenizer(tokenizer.clone());
        train_logged(
            run.device(device),
            Some((vs, model)),
            &text,
            &args.out.join(dir),
        )
    };
    continued(vs, model, "dense")?;
    continued(moe_vs, Box::new(moe), "moe")?;
    let png = args.out.join("val_loss.png");
    let curves = |dir: &str| LossCurves::from_jsonl(&args.out.join(dir).join("metrics.jsonl"));
    let moe_name = format!("LLaMA-MoE ({} of {} experts)", args.top_k, args.experts);
    plot_val_losses(
        &png,
        &[
            ("dense LLaMA", &curves("dense")?),
            (&moe_name, &curves("moe")?),
        ],
    )?;
    println!("plotted {}", png.display());
    Ok(())
}

/// Trains `run` (its model drawn, or `start`) on `text`, with a checkpoint,
/// `metrics.jsonl` and the progress bar in `dir`.
fn train_logged(
    run: Run,
    start: Option<(nn::VarStore, Box<dyn CausalLm>)>,
    text: &str,
    dir: &Path,
) -> Result<TrainedRun> {
    let prepared = run.checkpoints(dir, None).prepare(text)?;
    let mut log = RunLog::for_run(&prepared, dir, &MlflowOptions::default(), "llama_moe")?;
    let built = match start {
        Some((vs, model)) => prepared.build_from(vs, model, text)?,
        None => prepared.build(text)?,
    };
    let trained = built.train(|event| log.as_mut().map_or(Ok(()), |log| log.event(event)))?;
    log.map_or(Ok(()), |log| log.finish().finish(RunStatus::Finished))?;
    Ok(trained)
}
