use crate::{CharTokenizer, ModelConfig, MoeLanguageModel, TrainConfig};
use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

/// File names inside a checkpoint folder.
const WEIGHTS: &str = "model.safetensors";
const CONFIG: &str = "config.json";

/// What `config.json` holds beside the weights: everything needed to
/// rebuild the model and its tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub model: ModelConfig,
    pub tokenizer: CharTokenizer,
    #[serde(default)]
    pub train: Option<TrainConfig>,
    /// Optimisation steps taken when saved.
    #[serde(default)]
    pub step: i64,
}

/// A loaded checkpoint: the model, the store owning its parameters, and its metadata.
#[derive(Debug)]
pub struct Checkpoint {
    pub vs: nn::VarStore,
    pub model: MoeLanguageModel,
    pub meta: CheckpointMeta,
}

/// Writes `dir/model.safetensors` (every variable of `vs`, by its path) and
/// `dir/config.json`. Each file is written to a temporary name and renamed,
/// so an interrupted save never leaves a half-written checkpoint behind.
pub fn save_checkpoint(dir: &Path, vs: &nn::VarStore, meta: &CheckpointMeta) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    let weights = dir.join(WEIGHTS);
    let tmp = dir.join(format!(".{WEIGHTS}.tmp"));
    let vars = vs.variables();
    let mut named: Vec<(&str, &Tensor)> = vars.iter().map(|(k, v)| (k.as_str(), v)).collect();
    named.sort_by_key(|(k, _)| *k);
    Tensor::write_safetensors(&named, &tmp).map_err(|e| checkpoint_err(&tmp, e))?;
    fs::rename(&tmp, &weights).map_err(|e| MoeError::io(&weights, e))?;

    let json =
        serde_json::to_string_pretty(meta).map_err(|e| checkpoint_err(&dir.join(CONFIG), e))?;
    write_atomic(&dir.join(CONFIG), json.as_bytes())
}

/// Rebuilds the model from `dir/config.json` on `device` and loads
/// `dir/model.safetensors` into it. Every tensor is checked (present, no
/// extra, same shape) before any is copied.
pub fn load_checkpoint(dir: &Path, device: Device) -> Result<Checkpoint> {
    let config_path = dir.join(CONFIG);
    let text = fs::read_to_string(&config_path).map_err(|e| MoeError::Checkpoint {
        path: config_path.clone(),
        reason: format!("cannot read the checkpoint's config: {e}"),
    })?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).map_err(|e| checkpoint_err(&config_path, e))?;
    if meta.tokenizer.vocab_size() != meta.model.vocab_size {
        return Err(MoeError::Checkpoint {
            path: config_path,
            reason: format!(
                "the tokenizer has {} characters but the model's vocab_size is {}",
                meta.tokenizer.vocab_size(),
                meta.model.vocab_size
            ),
        });
    }
    let vs = nn::VarStore::new(device);
    let model = MoeLanguageModel::new(&vs.root(), &meta.model)?;
    load_weights(&dir.join(WEIGHTS), &vs)?;
    Ok(Checkpoint { vs, model, meta })
}

/// Loads a safetensors file into `vs`, all or nothing.
pub(crate) fn load_weights(path: &Path, vs: &nn::VarStore) -> Result<()> {
    if !path.is_file() {
        return Err(MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: "the weights file does not exist".into(),
        });
    }
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| checkpoint_err(path, e))?
        .into_iter()
        .collect();
    let mut vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut problems = Vec::new();
    for name in names {
        let var = &vars[name];
        match tensors.get(name) {
            None => problems.push(format!("missing tensor `{name}`")),
            Some(t) if t.size() != var.size() => problems.push(format!(
                "tensor `{name}` has shape {:?}, the config expects {:?}",
                t.size(),
                var.size()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
    extra.sort();
    problems.extend(extra.iter().map(|k| format!("unexpected tensor `{k}`")));
    if !problems.is_empty() {
        let shown = problems.len().min(5);
        return Err(MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "the weights do not match the config ({} problem(s)): {}{}",
                problems.len(),
                problems[..shown].join("; "),
                if problems.len() > shown { "; ..." } else { "" }
            ),
        });
    }
    tch::no_grad(|| {
        for (name, var) in vars.iter_mut() {
            let src = &tensors[name];
            var.f_copy_(&src.to_kind(var.kind()))
                .map_err(|e| checkpoint_err(path, e))?;
        }
        Ok(())
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(|e| MoeError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| MoeError::io(path, e))
}

fn checkpoint_err(path: &Path, e: impl std::fmt::Display) -> MoeError {
    MoeError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
