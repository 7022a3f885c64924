//! Checkpoint folders: `model.safetensors` (weights), `config.json` (model,
//! tokenizer and training configs, step) and, for training checkpoints,
//! `optimizer.safetensors` (AdamW's moments and step counts).
//!
//! Every file is written to a temporary name and renamed; `config.json` is
//! written last, and its `step` must match the optimizer file's, so a save
//! interrupted between files is detected when resuming. Loading checks every
//! tensor (present, no extra, same shape) before it copies any.

use crate::tensor_file::{file_err, read_tensors, write_bytes, write_tensors};
use crate::{Optimizer, TrainConfig};
use moe_core::{MoeError, Result};
use moe_data::Tokenizer;
use moe_models::{CausalLm, LmConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use tch::{nn, Device, Tensor};

/// File names inside a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The checkpoint's metadata file (model, tokenizer, training config, step).
pub const CONFIG_FILE: &str = "config.json";
/// The optimizer state's file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What `config.json` holds beside the weights: everything needed to
/// rebuild the model and its tokenizer, and to resume training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The model family and its config.
    pub model: LmConfig,
    /// The tokenizer the model was trained with.
    pub tokenizer: Tokenizer,
    #[serde(default)]
    /// The training config, to resume with.
    pub train: Option<TrainConfig>,
    /// Optimisation steps taken when saved.
    #[serde(default)]
    pub step: i64,
}

/// A loaded checkpoint: the model, the store owning its parameters, and its metadata.
#[derive(Debug)]
pub struct Checkpoint {
    /// The store owning the model's parameters.
    pub vs: nn::VarStore,
    /// The model.
    pub model: Box<dyn CausalLm>,
    /// What `config.json` held.
    pub meta: CheckpointMeta,
}

/// Writes `dir/model.safetensors` (every variable of `vs`, by its path) and
/// `dir/config.json`, each atomically.
pub fn save_checkpoint(dir: &Path, vs: &nn::VarStore, meta: &CheckpointMeta) -> Result<()> {
    save_files(dir, &named_variables(vs), None, meta)
}

/// Rebuilds the model from `dir/config.json` on `device` and loads
/// `dir/model.safetensors` into it.
pub fn load_checkpoint(dir: &Path, device: Device) -> Result<Checkpoint> {
    let meta = load_checkpoint_meta(dir)?;
    let vs = nn::VarStore::new(device);
    let model = meta.model.build(&vs.root())?;
    let variables = named_variables(&vs);
    let weights = read_weights(dir, &variables)?;
    copy_into(&variables, weights);
    Ok(Checkpoint { vs, model, meta })
}

/// The variables of `vs`, sorted by name (shallow copies sharing storage).
pub(crate) fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Writes weights, then the optimizer state (if any), then `config.json`.
pub(crate) fn save_files(
    dir: &Path,
    variables: &[(String, Tensor)],
    optimizer: Option<&dyn Optimizer>,
    meta: &CheckpointMeta,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    write_tensors(&dir.join(WEIGHTS_FILE), variables)?;
    if let Some(optimizer) = optimizer {
        optimizer.save(&dir.join(OPTIMIZER_FILE))?;
    }
    let config = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(meta).map_err(|e| file_err(&config, e))?;
    write_bytes(&config, json.as_bytes())
}

/// Reads and checks `dir/config.json` (model, tokenizer, training config, step).
pub fn load_checkpoint_meta(dir: &Path) -> Result<CheckpointMeta> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|e| MoeError::Checkpoint {
        path: path.clone(),
        reason: format!("cannot read the checkpoint's config: {e}"),
    })?;
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| file_err(&path, e))?;
    if meta.tokenizer.vocab_size() != meta.model.vocab_size() {
        return Err(MoeError::Checkpoint {
            path,
            reason: format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                meta.tokenizer.vocab_size(),
                meta.model.vocab_size()
            ),
        });
    }
    Ok(meta)
}

/// Reads `dir/model.safetensors`, checked against `variables`.
pub(crate) fn read_weights(
    dir: &Path,
    variables: &[(String, Tensor)],
) -> Result<HashMap<String, Tensor>> {
    let expected: Vec<(String, Vec<i64>)> = variables
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    read_weights_of_sizes(dir, &expected)
}

/// [`read_weights`] against the names and sizes `expected`.
pub(crate) fn read_weights_of_sizes(
    dir: &Path,
    expected: &[(String, Vec<i64>)],
) -> Result<HashMap<String, Tensor>> {
    read_tensors(&dir.join(WEIGHTS_FILE), "weights", expected)
}

/// Copies checked tensors into the variables of the same names.
pub(crate) fn copy_into(variables: &[(String, Tensor)], mut values: HashMap<String, Tensor>) {
    tch::no_grad(|| {
        for (name, var) in variables {
            if let Some(src) = values.remove(name) {
                var.shallow_clone().copy_(&src.to_kind(var.kind()));
            }
        }
    });
}

/// Names the fields in which two serialisable configs differ, e.g.
/// `n_embd: 32 (checkpoint) vs 64 (model)`.
pub(crate) fn config_differences<T: Serialize>(saved: &T, current: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(current))
    else {
        return vec!["the configs cannot be compared".into()];
    };
    let mut diffs: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| {
            let other = b.get(k).map_or("missing".into(), ToString::to_string);
            format!("{k}: {v} (checkpoint) vs {other} (model)")
        })
        .collect();
    diffs.sort();
    diffs
}
