//! `generation_config.json`: the generation defaults a checkpoint ships.

use moe_core::{MoeError, Result};
use moe_models::Sampling;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::path::Path;

/// The fields of transformers' `GenerationConfig` that generation here
/// uses or reports; the file's other keys are kept in `other` and written
/// back unchanged. A missing key is `None` (transformers' default applies,
/// see [`GenerationConfig::sampling`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Token a sequence starts with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    /// Tokens that end generation (`eos_token_id` as an integer or a list).
    #[serde(
        deserialize_with = "one_or_many",
        serialize_with = "int_or_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub eos_token_id: Vec<i64>,
    /// Padding token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// Longest prompt plus generated text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<i64>,
    /// Most new tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<i64>,
    /// Sample (true) or take the most likely token (false, transformers' default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// Softmax temperature (transformers' default 1.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Sample among the `k` most likely tokens (transformers' default 50; 0: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Nucleus sampling threshold (not applied by [`moe_models::generate`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Repetition penalty (not applied by [`moe_models::generate`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Every other key of the file (`transformers_version`, ...).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(i64),
        Many(Vec<i64>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(id)) => vec![id],
        Some(OneOrMany::Many(ids)) => ids,
    })
}

fn int_or_list<S: Serializer>(ids: &[i64], s: S) -> std::result::Result<S::Ok, S::Error> {
    match ids {
        [id] => s.serialize_i64(*id),
        _ => ids.serialize(s),
    }
}

impl GenerationConfig {
    /// Reads `generation_config.json`; bad JSON or a field of the wrong type
    /// is a [`MoeError::Checkpoint`] naming the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot read the generation config: {e}"),
        })?;
        serde_json::from_str(&text).map_err(|e| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a valid generation config: {e}"),
        })
    }

    /// What transformers derives from a `config.json` without a
    /// `generation_config.json`: its `bos_token_id`, `eos_token_id` and
    /// `pad_token_id`.
    pub fn from_model_config(json: &Map<String, Value>) -> Self {
        let id = |key: &str| json.get(key).and_then(Value::as_i64);
        let eos_token_id = match json.get("eos_token_id") {
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_i64).collect(),
            Some(v) => v.as_i64().into_iter().collect(),
            None => Vec::new(),
        };
        GenerationConfig {
            bos_token_id: id("bos_token_id"),
            eos_token_id,
            pad_token_id: id("pad_token_id"),
            ..Default::default()
        }
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: i64) -> bool {
        self.eos_token_id.contains(&id)
    }

    /// The sampling these defaults ask for: greedy unless `do_sample`, else
    /// `temperature` (default 1.0) and `top_k` (default 50, 0 for all
    /// tokens) clamped to `vocab_size`. `top_p` and `repetition_penalty`
    /// have no counterpart in [`Sampling`] and are left out.
    pub fn sampling(&self, vocab_size: i64) -> Sampling {
        if !self.do_sample.unwrap_or(false) {
            return Sampling::greedy();
        }
        let top_k = match self.top_k.unwrap_or(50) {
            k if k <= 0 => None,
            k => Some(k.min(vocab_size)),
        };
        Sampling {
            temperature: self.temperature.filter(|t| *t > 0.0).unwrap_or(1.0),
            top_k,
            top_p: self.top_p.filter(|p| *p > 0.0 && *p < 1.0),
            repetition_penalty: self.repetition_penalty.filter(|r| *r > 0.0).unwrap_or(1.0),
        }
    }
}
