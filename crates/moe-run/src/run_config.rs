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

    /// The config with `overrides` applied in order, each
    /// `path.to.field=value` (nanoGPT's configurator, typed): `path` names a
    /// field of the config as `--print-config` shows it (`train.max_iters`,
    /// `model.router.n_group`, `model.rope_scaling`), `value` is a TOML
    /// value (`3`, `1e-3`, `true`, `"bpe"`, `[0, 1]`, `{ factor = 2.0 }`), or
    /// a bare word taken as a string (`bpe`). A path the config does not
    /// have is an error listing the fields at that level; a value of the
    /// wrong type is serde's error naming the field.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self> {
        let mut value =
            serde_json::to_value(self).map_err(|e| MoeError::config(format!("config: {e}")))?;
        for item in overrides {
            let (path, raw) = item.split_once('=').ok_or_else(|| {
                MoeError::config(format!(
                    "--set {item:?}: expected path.to.field=value (e.g. train.max_iters=100)"
                ))
            })?;
            let slot = field_mut(&mut value, path.trim())?;
            *slot = parse_value(raw.trim());
        }
        let known = value.clone();
        let config: RunConfig = serde_json::from_value(value)
            .map_err(|e| MoeError::config(format!("--set {}: {e}", overrides.join(" "))))?;
        // Leftovers serde skipped (another family's fields, say) are errors.
        let kept = serde_json::to_value(&config).map_err(|e| MoeError::config(e.to_string()))?;
        let unknown = unknown_keys(&known, &kept, "");
        if !unknown.is_empty() {
            return Err(MoeError::config(format!(
                "--set: field(s) {} do not apply to this config",
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

/// The field at the dotted `path` of a config's JSON; an error listing the
/// fields of the level where the path leaves the config.
fn field_mut<'a>(
    value: &'a mut serde_json::Value,
    path: &str,
) -> Result<&'a mut serde_json::Value> {
    let mut at = value;
    let mut walked = String::new();
    for key in path.split('.') {
        let fields = match at.as_object() {
            Some(object) => object.keys().cloned().collect::<Vec<_>>(),
            None => {
                return Err(MoeError::config(format!(
                    "--set {path}: `{walked}` is a value, not a table of fields"
                )))
            }
        };
        let here = if walked.is_empty() {
            "the config"
        } else {
            walked.as_str()
        };
        let message = format!(
            "--set {path}: {here} has no field `{key}`; its fields are {}",
            fields.join(", ")
        );
        at = at
            .as_object_mut()
            .and_then(|object| object.get_mut(key))
            .ok_or_else(|| MoeError::config(message))?;
        walked = if walked.is_empty() {
            key.to_string()
        } else {
            format!("{walked}.{key}")
        };
    }
    Ok(at)
}

/// A TOML value (`3`, `true`, `"x"`, `[1, 2]`, `{ a = 1 }`) as JSON; a text
/// that is not one is taken as a string (`--set tokenizer.kind=bpe`).
fn parse_value(raw: &str) -> serde_json::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or_else(|| serde_json::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_models::{DecoderConfig, DecoderPreset};

    fn decoder() -> RunConfig {
        RunConfig {
            model: LmConfig::Decoder(DecoderConfig::preset(DecoderPreset::Mixtral)),
            ..RunConfig::default()
        }
    }

    #[test]
    fn overrides_set_typed_fields_at_any_depth() {
        let set: Vec<String> = [
            "train.max_iters=42",
            "train.learning_rate=3e-4",
            "model.num_hidden_layers = 3",
            "model.router.norm_topk_prob=false",
            "model.sliding_window=8",
            "model.rope_scaling={ rope_type = \"linear\", factor = 2.0 }",
            "tokenizer.kind=bpe",
        ]
        .map(String::from)
        .to_vec();
        let got = decoder().with_overrides(&set).unwrap();
        assert_eq!(got.train.max_iters, 42);
        assert_eq!(got.train.learning_rate, 3e-4);
        let LmConfig::Decoder(d) = &got.model else {
            panic!("still the decoder")
        };
        assert_eq!(d.num_hidden_layers, 3);
        assert_eq!(d.sliding_window, Some(8));
        assert_eq!(
            d.router.gate,
            moe_routers::Gate::TopK {
                norm_topk_prob: false
            }
        );
        let scaling = d.rope_scaling.as_ref().expect("set");
        assert_eq!((scaling.rope_type(), scaling.factor()), ("linear", 2.0));
        assert_eq!(got.tokenizer.kind, moe_data::TokenizerKind::Bpe);
        // Later overrides win; none leaves the config as it was.
        let twice = ["train.seed=1", "train.seed=2"].map(String::from);
        assert_eq!(decoder().with_overrides(&twice).unwrap().train.seed, 2);
        assert_eq!(decoder().with_overrides(&[]).unwrap(), decoder());
    }

    #[test]
    fn bad_overrides_name_the_path_and_the_choices() {
        let err = |s: &str| {
            decoder()
                .with_overrides(&[s.to_string()])
                .unwrap_err()
                .to_string()
        };
        let unknown = err("train.max_iter=3");
        assert!(
            unknown.contains("train has no field `max_iter`") && unknown.contains("max_iters"),
            "{unknown}"
        );
        let top = err("trian.seed=3");
        assert!(top.contains("the config has no field `trian`"), "{top}");
        let through_a_value = err("train.seed.x=3");
        assert!(
            through_a_value.contains("`train.seed` is a value"),
            "{through_a_value}"
        );
        let wrong_type = err("train.max_iters=many");
        assert!(
            wrong_type.contains("max_iters") || wrong_type.contains("invalid type"),
            "{wrong_type}"
        );
        let no_equals = err("train.max_iters");
        assert!(
            no_equals.contains("expected path.to.field=value"),
            "{no_equals}"
        );
    }
}
