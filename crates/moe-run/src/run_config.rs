//! A run's whole configuration in one file (TOML or JSON):
//!
//! ```toml
//! [model]
//! n_layer = 4
//! [train]
//! max_iters = 2000
//! [tokenizer]
//! kind = "bpe"
//! vocab_size = 512
//! ```
//!
//! Missing sections and fields take their defaults.

use moe_core::{MoeError, Result};
use moe_data::TokenizerConfig;
use moe_models::LmConfig;
use moe_train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Model, training and tokenizer configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    /// The model family and its config.
    pub model: LmConfig,
    /// Optimisation, schedule and evaluation.
    pub train: TrainConfig,
    /// The tokenizer trained on the corpus.
    pub tokenizer: TokenizerConfig,
}

impl RunConfig {
    /// Reads a `.toml` or `.json` file; an unknown field, a value of the
    /// wrong type or another extension is an error naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MoeError::io(path, e))?;
        let bad = |e: &dyn std::fmt::Display| MoeError::config(format!("{}: {e}", path.display()));
        let value: serde_json::Value = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| bad(&e))?,
            Some("json") => serde_json::from_str(&text).map_err(|e| bad(&e))?,
            _ => return Err(bad(&"expected a .toml or .json file")),
        };
        let config: RunConfig = serde_json::from_value(value.clone()).map_err(|e| bad(&e))?;
        let known = serde_json::to_value(&config).map_err(|e| bad(&e))?;
        let unknown = unknown_keys(&value, &known, "");
        if !unknown.is_empty() {
            return Err(bad(&format!(
                "unknown field(s) {} (see --print-config for the known ones)",
                unknown.join(", ")
            )));
        }
        Ok(config)
    }

    /// The config as TOML (what `--print-config` shows).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| MoeError::config(format!("cannot write TOML: {e}")))
    }
}

/// Keys of `input` (dotted paths) that the parsed config does not have: a
/// misspelt field would otherwise be silently ignored by `#[serde(default)]`.
fn unknown_keys(input: &serde_json::Value, known: &serde_json::Value, prefix: &str) -> Vec<String> {
    let (Some(input), Some(known)) = (input.as_object(), known.as_object()) else {
        return Vec::new();
    };
    input
        .iter()
        .flat_map(|(key, value)| {
            let path = format!("{prefix}{key}");
            match known.get(key) {
                None => vec![path],
                Some(k) => unknown_keys(value, k, &format!("{path}.")),
            }
        })
        .collect()
}
