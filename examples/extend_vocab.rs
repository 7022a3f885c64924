//! Chinese-Mixtral's vocabulary extension (Cui & Yao 2024, arXiv
//! 2403.01851; Chinese-LLaMA, arXiv 2304.08177): pieces of a BPE trained
//! on text in a new language are merged into a Hugging Face checkpoint's
//! tokenizer, the embedding and LM head get one row per new piece
//! (initialised to the mean of the old rows: new tokens start as the
//! model's average token and take at most `k / (V + k)` of the probability,
//! so the old distribution is kept), and the result is saved as a folder of
//! the same `model_type` that `from_pretrained` (and transformers) loads.
//! Continued pre-training on the new language would start from there.
//!
//! The saved folder is read back and checked: the number of pieces added,
//! the old and new vocabulary sizes, the largest difference between the old
//! and the extended model's logits (over the old vocabulary) on text the
//! old tokenizer covers, and the new text's tokens per character and
//! unknown tokens before and after.
//!
//! ```sh
//! cargo xtask run run --release --example extend_vocab -- \
//!     --model tests/data/hf/mixtral --text tests/data/vocab/zh_sample.txt --out /tmp/ext
//! ```

use clap::Parser;
use moe_layers::hf::{from_pretrained, save_pretrained_with, LoadOptions, SaveOptions};
use moe_layers::lm::{resize_vocab, CausalLm, DecoderModel, ExtendOptions, HfTokenizer, Tokenizer};
use moe_layers::prelude::DeviceChoice;
use moe_layers::{MoeError, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

#[derive(Parser, Debug)]
#[command(version)]
#[command(
    about = "Extend a Hugging Face checkpoint's BPE vocabulary with pieces trained on new text"
)]
struct Args {
    /// A Hugging Face checkpoint folder with a BPE tokenizer.json
    #[arg(long)]
    model: PathBuf,
    /// Text in the new language (UTF-8); the new pieces are trained on it
    #[arg(long)]
    text: PathBuf,
    /// At most this many pieces are added (new characters first)
    #[arg(long, default_value_t = 1000)]
    new_pieces: usize,
    /// No merge of a pair seen fewer times in the text
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Text the old tokenizer covers, for the logit check (default: the
    /// model's own tokenizer decides which lines of tinyshakespeare it covers)
    #[arg(long)]
    covered: Option<PathBuf>,
    /// Where to run
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// The folder to write the extended checkpoint to
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| MoeError::io(path, e))
}

fn run(args: Args) -> Result<()> {
    let device = args.device.resolve()?;
    // f32 parameters: this example trains them.
    let options = LoadOptions {
        device,
        dtype: Some(tch::Kind::Float),
        ..LoadOptions::default()
    };
    println!("loading {}", args.model.display());
    let pretrained = from_pretrained(&args.model, &options)?;
    let old_tok = match &pretrained.tokenizer {
        Some(Tokenizer::Hf(t)) => t.clone(),
        _ => {
            return Err(MoeError::Checkpoint {
                path: args.model.join("tokenizer.json"),
                reason: "the checkpoint has no tokenizer.json to extend".into(),
            })
        }
    };
    let text = read(&args.text)?;

    println!(
        "training BPE pieces on {} ({} characters)",
        args.text.display(),
        text.chars().count()
    );
    let extension = old_tok.extend_vocab(
        &text,
        &ExtendOptions {
            max_new_pieces: args.new_pieces,
            min_frequency: args.min_frequency,
        },
    )?;
    let shown: Vec<&str> = extension
        .pieces
        .iter()
        .rev()
        .take(8)
        .map(String::as_str)
        .collect();
    println!(
        "  {} pieces ({} characters, {} merges; {} merges of old characters left out), ids {:?}; \
         the last few: {shown:?}",
        extension.pieces.len(),
        extension.new_chars,
        extension.merges,
        extension.skipped_covered,
        extension.new_ids()
    );

    println!(
        "resizing the embedding and LM head: {} -> {} rows (new rows = mean of the old rows)",
        pretrained.config.vocab_size,
        extension.new_vocab_size()
    );
    let vs = nn::VarStore::new(device);
    let model = resize_vocab(
        &pretrained.vs,
        &pretrained.config,
        extension.new_vocab_size(),
        &vs,
    )?;
    let save = SaveOptions {
        dtype: pretrained.saved_dtype(),
        generation: Some(pretrained.generation.clone()),
        ..SaveOptions::default()
    };
    println!(
        "saving {} ({}, {:?})",
        args.out.display(),
        pretrained.family().model_type(),
        save.dtype.unwrap_or(tch::Kind::Float)
    );
    let new_tokenizer = Tokenizer::Hf(extension.tokenizer.clone());
    save_pretrained_with(
        &model,
        &vs,
        pretrained.family().model_type(),
        &args.out,
        Some(&new_tokenizer),
        &save,
    )?;

    println!("reloading {}", args.out.display());
    let extended = from_pretrained(&args.out, &options)?;
    let new_tok = match &extended.tokenizer {
        Some(Tokenizer::Hf(t)) => t.clone(),
        _ => {
            return Err(MoeError::Checkpoint {
                path: args.out.join("tokenizer.json"),
                reason: "the saved folder has no tokenizer.json".into(),
            })
        }
    };
    let covered = match &args.covered {
        Some(path) => read(path)?,
        None => covered_lines(&old_tok)?,
    };
    let diff = logit_diff(
        &pretrained.model,
        &old_tok,
        &extended.model,
        &new_tok,
        &covered,
    )?;

    let (old_v, new_v) = (pretrained.config.vocab_size, extended.config.vocab_size);
    println!("pieces added:            {}", new_v - old_v);
    println!("vocabulary:              {old_v} -> {new_v}");
    println!("max |logit diff|, covered text, old vocabulary: {diff:.3e}");
    let chars = text.chars().count() as f64;
    for (label, tok) in [("before", &old_tok), ("after ", &new_tok)] {
        let ids = tok.encode_plain(&text)?;
        let unknown = tok
            .unk_token_id()
            .map_or(0, |unk| ids.iter().filter(|&&id| id == unk).count());
        let exact = tok.decode(&ids)? == text;
        println!(
            "new text {label}: {} tokens, {:.3} tokens/char, {unknown} unknown, decodes exactly: {exact}",
            ids.len(),
            ids.len() as f64 / chars
        );
    }
    Ok(())
}

/// Lines of tinyshakespeare's head that `tok` encodes without unknown
/// tokens, up to 4,000 characters.
fn covered_lines(tok: &HfTokenizer) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tinyshakespeare.txt");
    let corpus = read(&path)?;
    let unk = tok.unk_token_id();
    let mut out = String::new();
    for line in corpus.lines().filter(|l| !l.is_empty()) {
        if out.len() >= 4000 {
            break;
        }
        if !tok.encode_plain(line)?.iter().any(|&id| Some(id) == unk) {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Max |logit difference| between the old model and the extended one (over
/// the old vocabulary) on `text`, in windows of the context length; both
/// tokenizers must encode `text` to the same ids.
fn logit_diff(
    old: &DecoderModel,
    old_tok: &HfTokenizer,
    new: &DecoderModel,
    new_tok: &HfTokenizer,
    text: &str,
) -> Result<f64> {
    let ids = old_tok.encode(text)?;
    if new_tok.encode(text)? != ids {
        return Err(MoeError::Data(
            "the extended tokenizer splits the covered text differently".into(),
        ));
    }
    let context = old.max_context() as usize;
    let old_v = old.vocab_size();
    let mut max = 0f64;
    tch::no_grad(|| -> Result<()> {
        for window in ids.chunks(context) {
            let idx = Tensor::from_slice(window)
                .view([1, -1])
                .to_device(old.device());
            let a = old.forward_t(&idx, false)?.logits;
            let b = new.forward_t(&idx, false)?.logits.narrow(2, 0, old_v);
            max = max.max((a - b).abs().max().double_value(&[]));
        }
        Ok(())
    })?;
    Ok(max)
}
