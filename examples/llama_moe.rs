//! LLaMA-MoE (Zhu et al. 2024, arXiv 2406.16554; seed document 002) on
//! tinyshakespeare: a dense LLaMA-style decoder is trained (or loaded from
//! one of our checkpoints with `--checkpoint`, or from a Hugging Face Llama
//! folder with `--model`, whose tokenizer then encodes the corpus), each
//! layer's SwiGLU MLP is split into `E`
//! experts (random or balanced-clustering neuron split, or upcycling) with
//! a new gate, and both the dense model and the converted MoE model then
//! continue training on the corpus with the same trainer (continual
//! pre-training, as LLaMA-MoE did). Writes, under `--out`:
//!
//! - `dense/` and `moe/`: checkpoints (our format, `family = "decoder"`)
//!   and `metrics.jsonl` of the continued training;
//! - `val_loss.png`: both validation curves;
//! - `conversion.json`: the conversion and the logit check at conversion
//!   time (with all experts active the MoE model computes the dense logits).
//!
//! ```sh
//! cargo xtask run run --release --example llama_moe -- --dense-steps 1000 --moe-steps 1000
//! cargo xtask run run --release --example llama_moe -- --model tests/data/hf/llama \
//!     --experts 8 --top-k 2 --moe-steps 300 --out runs/llama_moe_hf
//! ```
//!
//! With `--model`, an upcycled MoE (`--construction upcycle`: softmax top-k
//! without scaling) is also written as a Hugging Face `mixtral` folder,
//! `moe_hf/`, that transformers loads.

use clap::{Parser, ValueEnum};
use moe_layers::experts::NeuronPartition;
use moe_layers::hf::{from_pretrained, save_pretrained, LoadOptions};
use moe_layers::lm::{
    load_checkpoint, plot_val_losses, CausalLm, CharTokenizer, Checkpointing, Dataset,
    DecoderConfig, DecoderModel, DecoderPreset, ExpertConstruction, JsonlWriter, LmConfig,
    LossCurves, MoeConversion, Tokenizer, TrainConfig, TrainEvent, Trainer,
};
use moe_layers::prelude::DeviceChoice;
use moe_layers::{MoeError, Result};
use std::path::{Path, PathBuf};
use tch::nn;

#[derive(Parser, Debug)]
#[command(version)]
#[command(
    about = "Convert a dense LLaMA-style decoder into an MoE (LLaMA-MoE) and keep training both"
)]
struct Args {
    /// A dense decoder checkpoint of ours to convert (else one is trained first)
    #[arg(long, conflicts_with = "model")]
    checkpoint: Option<PathBuf>,
    /// A Hugging Face Llama checkpoint folder to convert (its tokenizer.json
    /// encodes the corpus)
    #[arg(long)]
    model: Option<PathBuf>,
    /// Steps of the dense model's pre-training when no checkpoint is given
    #[arg(long, default_value_t = 1000)]
    dense_steps: i64,
    /// Steps of continued training, for the dense and the MoE model each
    #[arg(long, default_value_t = 1000)]
    moe_steps: i64,
    /// Decoder layers of the dense model trained here
    #[arg(long, default_value_t = 4)]
    layers: i64,
    /// Experts per layer
    #[arg(long, default_value_t = 8)]
    experts: i64,
    /// Experts per token
    #[arg(long, default_value_t = 2)]
    top_k: i64,
    /// How experts are made from the dense MLP
    #[arg(long, value_enum, default_value_t = Construction::Split)]
    construction: Construction,
    /// Standard deviation of the new gates' weights
    #[arg(long, default_value_t = 0.02)]
    gate_std: f64,
    /// Evaluate every this many steps
    #[arg(long, default_value_t = 100)]
    eval_interval: i64,
    /// Batches per split in each evaluation
    #[arg(long, default_value_t = 100)]
    eval_iters: i64,
    #[arg(long, default_value_t = 1337)]
    seed: i64,
    /// Where to run
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
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

/// The expert constructions `--construction` chooses between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Construction {
    /// Random neurons of the MLP for each expert
    Split,
    /// Neurons clustered by balanced k-means for each expert
    Balanced,
    /// Each expert a copy of the MLP
    Upcycle,
}

fn run(args: Args) -> Result<()> {
    let device = args.device.resolve()?;
    let construction = match args.construction {
        Construction::Split => ExpertConstruction::Split {
            partition: NeuronPartition::Random { seed: 0 },
        },
        Construction::Balanced => ExpertConstruction::Split {
            partition: NeuronPartition::BalancedKMeans {
                iterations: 10,
                seed: 0,
            },
        },
        Construction::Upcycle => ExpertConstruction::Upcycle,
    };
    let text = std::fs::read_to_string(&args.data).map_err(|e| MoeError::io(&args.data, e))?;
    std::fs::create_dir_all(&args.out).map_err(|e| MoeError::io(&args.out, e))?;
    let train = |max_iters| TrainConfig {
        max_iters,
        eval_interval: args.eval_interval,
        eval_iters: args.eval_iters,
        seed: args.seed,
        ..TrainConfig::default()
    };

    // 1. The dense model: loaded, or trained here.
    if let Some(dir) = &args.model {
        // f32 parameters: this example trains them.
        let options = LoadOptions {
            device,
            dtype: Some(tch::Kind::Float),
            ..LoadOptions::default()
        };
        let dense = from_pretrained(dir, &options)?;
        let tokenizer = dense
            .tokenizer
            .clone()
            .ok_or_else(|| MoeError::Checkpoint {
                path: dir.join("tokenizer.json"),
                reason: "the checkpoint has no tokenizer.json to encode the corpus with".into(),
            })?;
        println!(
            "loaded {} ({} layers, vocabulary {})",
            dir.display(),
            dense.config.num_hidden_layers,
            dense.config.vocab_size
        );
        return convert_and_continue(
            &args,
            &dense.vs,
            &dense.config,
            0,
            construction,
            &text,
            &tokenizer,
            &train,
        );
    }
    if let Some(dir) = &args.checkpoint {
        let loaded = load_checkpoint(dir, device)?;
        let config = loaded.meta.model.as_decoder()?.clone();
        let step = loaded.meta.step;
        return convert_and_continue(
            &args,
            &loaded.vs,
            &config,
            step,
            construction,
            &text,
            &loaded.meta.tokenizer,
            &train,
        );
    }
    let tokenizer = Tokenizer::Char(CharTokenizer::from_text(&text)?);
    tch::manual_seed(args.seed);
    let dense_config = DecoderConfig {
        vocab_size: tokenizer.vocab_size(),
        num_hidden_layers: args.layers,
        ..DecoderConfig::preset(DecoderPreset::Llama)
    };
    let dense_vs = nn::VarStore::new(device);
    let dense = DecoderModel::new(&dense_vs.root(), &dense_config)?;
    let data = dataset(&text, &tokenizer, &dense_config, device)?;
    println!(
        "pre-training the dense model for {} steps",
        args.dense_steps
    );
    train_logged(
        &dense_vs,
        &dense,
        &data,
        train(args.dense_steps),
        &args.out.join("dense_pretrain"),
        &tokenizer,
        "dense pre-training",
    )?;
    convert_and_continue(
        &args,
        &dense_vs,
        &dense_config,
        args.dense_steps,
        construction,
        &text,
        &tokenizer,
        &train,
    )
}

/// Converts the dense model, checks the conversion, continues training both.
#[allow(clippy::too_many_arguments)]
fn convert_and_continue(
    args: &Args,
    dense_vs: &nn::VarStore,
    dense_config: &DecoderConfig,
    dense_step: i64,
    construction: ExpertConstruction,
    text: &str,
    tokenizer: &Tokenizer,
    train: &dyn Fn(i64) -> TrainConfig,
) -> Result<()> {
    let device = dense_vs.device();
    let data = dataset(text, tokenizer, dense_config, device)?;
    // A copy of the dense model keeps training beside the MoE model.
    let mut continued_vs = nn::VarStore::new(device);
    let continued = DecoderModel::new(&continued_vs.root(), dense_config)?;
    continued_vs.copy(dense_vs)?;

    // With every expert active and uniform gates, the conversion computes
    // the dense model's function: the check of the conversion itself.
    let all_active = MoeConversion {
        num_experts: args.experts,
        top_k: args.experts,
        construction,
        gate_std: 0.0,
    };
    let check_vs = nn::VarStore::new(device);
    let check = all_active.convert(dense_vs, dense_config, &check_vs)?;
    let probe = data.batch(moe_layers::data::Split::Val, 4).x;
    let logit_diff = tch::no_grad(|| -> Result<f64> {
        let a = continued.forward_t(&probe, false)?.logits;
        let b = check.forward_t(&probe, false)?.logits;
        Ok((a - b).abs().max().double_value(&[]))
    })?;
    println!(
        "all {} experts active: max logit difference to the dense model {logit_diff:.2e}",
        args.experts
    );

    let conversion = MoeConversion {
        top_k: args.top_k,
        gate_std: args.gate_std,
        ..all_active
    };
    tch::manual_seed(args.seed);
    let moe_vs = nn::VarStore::new(device);
    let moe = conversion.convert(dense_vs, dense_config, &moe_vs)?;
    let count = |vs: &nn::VarStore| -> i64 {
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    };
    let moe_lm = LmConfig::Decoder(moe.config().clone());
    let (dense_params, moe_params) = (count(dense_vs), count(&moe_vs));
    let record = serde_json::json!({
        "conversion": &conversion,
        "dense_step": dense_step,
        "all_experts_active_max_logit_diff": logit_diff,
        "dense_parameters": dense_params,
        "moe_parameters": moe_params,
        "moe_active_parameters": moe_lm.active_params(moe_params)?,
    });
    std::fs::write(args.out.join("conversion.json"), record.to_string())
        .map_err(|e| MoeError::io(args.out.join("conversion.json"), e))?;
    if args.model.is_some() && construction == ExpertConstruction::Upcycle {
        // Softmax top-k, renormalised, unscaled: a Mixtral checkpoint.
        let dir = args.out.join("moe_hf");
        save_pretrained(&moe, &moe_vs, "mixtral", &dir, Some(tokenizer))?;
        println!(
            "wrote the converted model as a mixtral checkpoint: {}",
            dir.display()
        );
    }

    let steps = train(args.moe_steps);
    println!(
        "continued training: dense and MoE, {} steps each",
        args.moe_steps
    );
    let dense_curves = train_logged(
        &continued_vs,
        &continued,
        &data,
        steps.clone(),
        &args.out.join("dense"),
        tokenizer,
        "dense",
    )?;
    let moe_curves = train_logged(
        &moe_vs,
        &moe,
        &data,
        steps,
        &args.out.join("moe"),
        tokenizer,
        "MoE",
    )?;
    let png = args.out.join("val_loss.png");
    let moe_name = format!("LLaMA-MoE ({} of {} experts)", args.top_k, args.experts);
    plot_val_losses(
        &png,
        &[("dense LLaMA", &dense_curves), (&moe_name, &moe_curves)],
    )?;
    println!("plotted {}", png.display());
    Ok(())
}

fn dataset(
    text: &str,
    tokenizer: &Tokenizer,
    config: &DecoderConfig,
    device: tch::Device,
) -> Result<Dataset> {
    let tokens = tokenizer.encode(text)?;
    Dataset::new(
        &tokens,
        tokenizer.vocab_size(),
        0.9,
        config.max_position_embeddings,
        device,
    )
}

/// Trains `model`, writing `dir/metrics.jsonl` and a checkpoint in `dir`;
/// returns the loss curves.
fn train_logged(
    vs: &nn::VarStore,
    model: &DecoderModel,
    data: &Dataset,
    config: TrainConfig,
    dir: &Path,
    tokenizer: &Tokenizer,
    label: &str,
) -> Result<LossCurves> {
    std::fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    let metrics_path = dir.join("metrics.jsonl");
    let mut metrics = JsonlWriter::create(&metrics_path)?;
    let interval = config.max_iters.max(1);
    Trainer::new(vs, model, data, config)?
        .with_checkpointing(Checkpointing {
            dir: dir.to_path_buf(),
            interval,
            tokenizer: tokenizer.clone(),
        })?
        .run(|event| {
            metrics.write(event)?;
            if let TrainEvent::Eval { step, val_loss, .. } = event {
                println!("  {label} step {step}: val loss {val_loss:.4}");
            }
            Ok(())
        })?;
    LossCurves::from_jsonl(&metrics_path)
}
