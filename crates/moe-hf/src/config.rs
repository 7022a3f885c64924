//! `config.json` to [`DecoderConfig`] and back, one mapping per family.
//!
//! # Key policy
//!
//! Every key of `config.json` is in one of four sets for its family:
//!
//! - **mapped**: read into [`DecoderConfig`] (`hidden_size`,
//!   `num_local_experts`, ...); a missing or `null` key takes transformers'
//!   default for that family;
//! - **fixed**: a key the decoder implements at one setting only
//!   (`hidden_act: "silu"`, OLMoE's `clip_qkv: null`, Mixtral's
//!   `router_jitter_noise: 0`, `sliding_window` no shorter than the context,
//!   LLaMA's `mlp_bias: false`, `rope_scaling: null`, ...): any other value is
//!   an error naming the key, the value and what is supported;
//! - **informational**: keys that do not change the computation of the
//!   model's logits (`architectures`, `torch_dtype`/`dtype`,
//!   `transformers_version`, token ids, `use_cache`, `initializer_range`,
//!   `output_router_logits`, generation defaults, label maps, ...): ignored;
//! - **unknown**: anything else is an error, because a key this reader does
//!   not know may change the model (`quantization_config`,
//!   `partial_rotary_factor`, ...). [`crate::LoadOptions::ignore_keys`] lets a
//!   caller who knows better ignore it.

use crate::HfFamily;
use moe_core::{MoeError, Result};
use moe_experts::Activation;
use moe_models::{DecoderConfig, LatentAttention, LayerType};
use moe_nn::{QkNorm, RopeScaling};
use moe_routers::Gate;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A Hugging Face `config.json`: the family its `model_type` names and the
/// keys as read (or as [`HfConfig::from_decoder`] writes them).
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// The family of `model_type`.
    pub family: HfFamily,
    /// Every key of the file.
    pub json: Map<String, Value>,
    /// Where it was read from (`config.json` when built in memory); errors name it.
    pub path: PathBuf,
}

/// Keys of every family's `config.json` that do not change the logits.
const INFORMATIONAL: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "attn_implementation",
    "_attn_implementation_autoset",
    "auto_map",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "initializer_range",
    "output_router_logits",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    // Generation defaults (generation_config.json holds the ones that count).
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// transformers' defaults of the keys every family maps (its config class's
/// defaults), used when a key is missing or `null`.
struct Defaults {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    /// `None`: as many as the query heads.
    num_key_value_heads: Option<i64>,
    max_position_embeddings: i64,
    rms_norm_eps: f64,
    rope_theta: f64,
}

impl HfFamily {
    fn defaults(self) -> Defaults {
        match self {
            HfFamily::Mixtral => Defaults {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: Some(8),
                max_position_embeddings: 4096 * 32,
                rms_norm_eps: 1e-5,
                rope_theta: 1e6,
            },
            HfFamily::Qwen2Moe => Defaults {
                vocab_size: 151936,
                hidden_size: 2048,
                intermediate_size: 5632,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                num_key_value_heads: Some(16),
                max_position_embeddings: 32768,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
            },
            HfFamily::Qwen3Moe => Defaults {
                vocab_size: 151936,
                hidden_size: 2048,
                intermediate_size: 6144,
                num_hidden_layers: 24,
                num_attention_heads: 32,
                num_key_value_heads: Some(4),
                max_position_embeddings: 32768,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
            },
            HfFamily::Olmoe => Defaults {
                vocab_size: 50304,
                hidden_size: 2048,
                intermediate_size: 2048,
                num_hidden_layers: 16,
                num_attention_heads: 16,
                num_key_value_heads: None,
                max_position_embeddings: 4096,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
            },
            HfFamily::Llama => Defaults {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: None,
                max_position_embeddings: 2048,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
            },
            HfFamily::DeepseekV3 => Defaults {
                vocab_size: 129280,
                hidden_size: 7168,
                intermediate_size: 18432,
                num_hidden_layers: 61,
                num_attention_heads: 128,
                num_key_value_heads: Some(128),
                max_position_embeddings: 4096,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
            },
            // DeepseekV2Config keeps LlamaConfig's defaults but the vocabulary.
            HfFamily::DeepseekV2 => Defaults {
                vocab_size: 102400,
                ..HfFamily::Llama.defaults()
            },
            HfFamily::GptOss => Defaults {
                vocab_size: 201088,
                hidden_size: 2880,
                intermediate_size: 2880,
                num_hidden_layers: 36,
                num_attention_heads: 64,
                num_key_value_heads: Some(8),
                max_position_embeddings: 131072,
                rms_norm_eps: 1e-5,
                rope_theta: 150000.0,
            },
            HfFamily::Glm4Moe => Defaults {
                vocab_size: 151552,
                hidden_size: 4096,
                intermediate_size: 10944,
                num_hidden_layers: 46,
                num_attention_heads: 96,
                num_key_value_heads: Some(8),
                max_position_embeddings: 131072,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
            },
        }
    }
}

/// transformers' defaults of the keys of DeepSeek-V3's MoE layers, which
/// GLM-4.5 shares with other defaults.
struct SigmoidMoeDefaults {
    n_routed_experts: i64,
    moe_intermediate_size: i64,
    first_k_dense_replace: i64,
    routed_scaling_factor: f64,
    n_group: i64,
    topk_group: i64,
}

/// Reads the keys of one `config.json`, remembering which it has used.
struct Reader<'a> {
    json: &'a Map<String, Value>,
    path: &'a Path,
    family: HfFamily,
    used: BTreeSet<String>,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl std::fmt::Display) -> MoeError {
        MoeError::Checkpoint {
            path: self.path.to_path_buf(),
            reason: format!("model_type `{}`: {reason}", self.family),
        }
    }

    /// The value of `key` (marked as used); `None` when missing or `null`.
    fn value(&mut self, key: &str) -> Option<&'a Value> {
        self.used.insert(key.to_string());
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn int(&mut self, key: &str, default: i64) -> Result<i64> {
        Ok(self.opt_int(key)?.unwrap_or(default))
    }

    /// An integer stored under either of two names (a config class's
    /// `attribute_map`: Qwen3-MoE's hub files say `num_experts`, what
    /// transformers 5 saves says `num_local_experts`); both present must
    /// agree.
    fn int_aliased(&mut self, key: &str, alias: &str, default: i64) -> Result<i64> {
        match (self.opt_int(key)?, self.opt_int(alias)?) {
            (Some(a), Some(b)) if a != b => Err(self.err(format!(
                "`{key}` = {a} and `{alias}` = {b} name the same setting and must agree"
            ))),
            (a, b) => Ok(a.or(b).unwrap_or(default)),
        }
    }

    fn opt_int(&mut self, key: &str) -> Result<Option<i64>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be an integer, got {v}"))),
        }
    }

    fn float(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.value(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }

    fn boolean(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.value(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    fn int_list(&mut self, key: &str) -> Result<Vec<i64>> {
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        self.err(format!("`{key}` must be a list of integers, got {v}"))
                    })
                })
                .collect(),
            Some(v) => Err(self.err(format!("`{key}` must be a list of integers, got {v}"))),
        }
    }

    /// Marks keys that do not change the computation as used.
    fn informational(&mut self, keys: &[&str]) {
        self.used.extend(keys.iter().map(|k| k.to_string()));
    }

    /// A key the decoder implements at one setting: `ok(value)` must hold
    /// when it is present and not `null`.
    fn fixed(&mut self, key: &str, ok: impl Fn(&Value) -> bool, supported: &str) -> Result<()> {
        match self.value(key) {
            Some(v) if !ok(v) => Err(self.err(format!(
                "`{key}` = {v} is not supported: the decoder implements {supported} only"
            ))),
            _ => Ok(()),
        }
    }

    /// `hidden_act` must be SiLU (SwiGLU experts and MLPs).
    fn silu(&mut self) -> Result<()> {
        self.fixed(
            "hidden_act",
            |v| matches!(v.as_str(), Some("silu" | "swish")),
            "\"silu\" (SwiGLU)",
        )
    }

    /// `sliding_window` must be `null` or at least the context (it then
    /// never masks anything).
    fn no_sliding_window(&mut self, context: i64) -> Result<()> {
        self.fixed(
            "sliding_window",
            |v| v.as_i64().is_some_and(|w| w >= context),
            &format!(
                "full attention (sliding_window null or >= max_position_embeddings = {context})"
            ),
        )
    }

    /// transformers 5's `layer_types`: every layer `full_attention`.
    fn full_attention_layers(&mut self) -> Result<()> {
        self.fixed(
            "layer_types",
            |v| {
                v.as_array()
                    .is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")))
            },
            "full attention in every layer (layer_types all \"full_attention\")",
        )
    }

    /// DeepSeek-V3's (and GLM-4.5's) MoE keys: routed and shared experts,
    /// the dense prefix, and the sigmoid router with the aux-free bias and
    /// group-limited top-k.
    fn sigmoid_moe(&mut self, c: &mut DecoderConfig, d: SigmoidMoeDefaults) -> Result<()> {
        c.num_local_experts = self.int("n_routed_experts", d.n_routed_experts)?;
        c.num_experts_per_tok = self.int("num_experts_per_tok", 8)?;
        c.moe_intermediate_size = Some(self.int("moe_intermediate_size", d.moe_intermediate_size)?);
        c.n_shared_experts = self.int("n_shared_experts", 1)?;
        c.first_k_dense_replace = self.int("first_k_dense_replace", d.first_k_dense_replace)?;
        c.router.routed_scaling_factor =
            self.float("routed_scaling_factor", d.routed_scaling_factor)?;
        c.router.gate = Gate::SigmoidAuxFree {
            norm_topk_prob: self.boolean("norm_topk_prob", true)?,
            // A training setting of ours; Hugging Face has none.
            bias_update_rate: 1e-3,
            n_group: self.int("n_group", d.n_group)?,
            topk_group: self.int("topk_group", d.topk_group)?,
        };
        Ok(())
    }

    /// DeepSeek's Multi-head Latent Attention keys (V2 and V3): the ranks
    /// and head widths, `qk_head_dim` and `head_dim` (transformers derives
    /// them; present, they must agree), every head with its own key.
    fn latent_attention(&mut self, c: &mut DecoderConfig, rope_interleave: bool) -> Result<()> {
        let latent = LatentAttention {
            // `null` is a full `q_proj` (DeepSeek-V2-Lite); missing is the default.
            q_lora_rank: match self.json.get("q_lora_rank") {
                Some(Value::Null) => None,
                _ => Some(self.int("q_lora_rank", 1536)?),
            },
            kv_lora_rank: self.int("kv_lora_rank", 512)?,
            qk_nope_head_dim: self.int("qk_nope_head_dim", 128)?,
            qk_rope_head_dim: self.int("qk_rope_head_dim", 64)?,
            v_head_dim: self.int("v_head_dim", 128)?,
            rope_interleave,
        };
        self.used.insert("q_lora_rank".into());
        let qk_head_dim = latent.qk_nope_head_dim + latent.qk_rope_head_dim;
        self.fixed(
            "qk_head_dim",
            |v| v.as_i64() == Some(qk_head_dim),
            &format!("qk_head_dim = qk_nope_head_dim + qk_rope_head_dim = {qk_head_dim}"),
        )?;
        // transformers builds the RoPE tables `head_dim` wide.
        let rope_dim = latent.qk_rope_head_dim;
        self.fixed(
            "head_dim",
            |v| v.as_i64() == Some(rope_dim),
            &format!("head_dim = qk_rope_head_dim = {rope_dim} (the width RoPE turns)"),
        )?;
        c.head_dim = None;
        // Every head has its own key in MLA.
        c.num_key_value_heads = c.num_attention_heads;
        c.latent_attention = Some(latent);
        Ok(())
    }

    /// Keys of DeepSeek's original checkpoints (its own modeling code) that
    /// transformers' classes do not read: the scores (`scoring`, the
    /// family's), every layer after the dense ones MoE, and settings that do
    /// not change the causal LM (multi-token-prediction layers, which
    /// transformers skips; expert-parallel size; training-only losses).
    fn deepseek_originals(&mut self, scoring: &str) -> Result<()> {
        self.fixed(
            "scoring_func",
            |v| v.as_str() == Some(scoring),
            &format!("\"{scoring}\" scores"),
        )?;
        self.fixed(
            "moe_layer_freq",
            |v| v.as_i64() == Some(1),
            "moe_layer_freq 1 (every layer after the dense ones is MoE)",
        )?;
        self.informational(&[
            "num_nextn_predict_layers",
            "num_mtp_layers",
            "ep_size",
            "aux_loss_alpha",
            "seq_aux",
            "pretraining_tp",
        ]);
        Ok(())
    }

    /// Qwen2-MoE's and Qwen3-MoE's layer layout: `decoder_sparse_step` and
    /// `mlp_only_layers` as a dense prefix ([`qwen2_dense_prefix`]; no
    /// routed experts at all when every layer is dense), and the sliding
    /// window (`use_sliding_window`; off, `sliding_window` does not apply).
    fn qwen_layers(
        &mut self,
        c: &mut DecoderConfig,
        num_experts: i64,
        max_position_embeddings: i64,
    ) -> Result<()> {
        let step = self.int("decoder_sparse_step", 1)?;
        let mlp_only = self.int_list("mlp_only_layers")?;
        c.first_k_dense_replace =
            qwen2_dense_prefix(self, c.num_hidden_layers, num_experts, step, &mlp_only)?;
        c.num_local_experts = if c.first_k_dense_replace >= c.num_hidden_layers {
            0
        } else {
            num_experts
        };
        if !self.boolean("use_sliding_window", false)? {
            // Off: the window applies nowhere.
            self.informational(&["sliding_window", "max_window_layers"]);
            if self.family == HfFamily::Qwen2Moe {
                self.full_attention_layers()?;
            }
            return Ok(());
        }
        c.sliding_window = self.sliding_window(Some(4096), max_position_embeddings)?;
        if self.family == HfFamily::Qwen2Moe {
            // transformers 5's `layer_types`, or its default: every other
            // layer below `max_window_layers` slides (layers 0, 2, ...).
            let max_window_layers = self.int("max_window_layers", 28)?;
            let types = self.layer_types()?.unwrap_or_else(|| {
                (0..c.num_hidden_layers)
                    .map(|i| {
                        if (i + 1) % 2 == 1 && i < max_window_layers {
                            LayerType::SlidingAttention
                        } else {
                            LayerType::FullAttention
                        }
                    })
                    .collect()
            });
            set_windowed_layers(c, types);
        } else {
            // Qwen3-MoE's attention takes the window in every layer.
            self.informational(&["max_window_layers"]);
        }
        Ok(())
    }

    /// `sliding_window` (`default` when missing or `null`) as the decoder's
    /// window: at least 1 (a query sees itself); `None` when it is at least
    /// the context, where it never hides a key.
    fn sliding_window(&mut self, default: Option<i64>, context: i64) -> Result<Option<i64>> {
        let Some(window) = self.opt_int("sliding_window")?.or(default) else {
            return Ok(None);
        };
        if window < 1 {
            return Err(self.err(format!(
                "`sliding_window` = {window}: a window holds at least the query's own position"
            )));
        }
        Ok((window < context).then_some(window))
    }

    /// transformers 5's `layer_types` (`full_attention` or
    /// `sliding_attention` per layer), when present.
    fn layer_types(&mut self) -> Result<Option<Vec<LayerType>>> {
        let Some(v) = self.value("layer_types") else {
            return Ok(None);
        };
        serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            self.err(format!(
                "`layer_types` must list \"full_attention\" or \"sliding_attention\" per \
                 layer, got {v}: {e}"
            ))
        })
    }

    /// The RoPE base and scaling: `rope_theta` and `rope_scaling`
    /// (transformers 4) or `rope_parameters` (transformers 5: `rope_theta`,
    /// `rope_type` and the scheme's fields in one object). A scheme other
    /// than `linear`, `dynamic`, `yarn` or `llama3`, a key the scheme does
    /// not have, or two different schemes (or partial factors) in the two
    /// places is an error. Also returns `partial_rotary_factor` (top level or
    /// in `rope_parameters`; 1 when absent).
    fn rope(&mut self, default_theta: f64) -> Result<(f64, Option<RopeScaling>, f64)> {
        let mut theta = self.float("rope_theta", default_theta)?;
        // GLM-4.5's hub files have it at the top level, transformers 5
        // writes it into `rope_parameters`.
        let mut partial = self.float("partial_rotary_factor", 1.0)?;
        let mut scaling = match self.value("rope_scaling") {
            Some(v) => self.rope_scaling(v, "rope_scaling")?,
            None => None,
        };
        if let Some(params) = self.value("rope_parameters") {
            if !params.is_object() {
                return Err(self.err(format!(
                    "`rope_parameters` must be an object with rope_type and rope_theta, got {params}"
                )));
            }
            if let Some(value) = params.get("rope_theta") {
                theta = value.as_f64().ok_or_else(|| {
                    self.err(format!(
                        "`rope_parameters.rope_theta` must be a number, got {value}"
                    ))
                })?;
            }
            if let Some(value) = params.get("partial_rotary_factor") {
                let inner = value.as_f64().ok_or_else(|| {
                    self.err(format!(
                        "`rope_parameters.partial_rotary_factor` must be a number, got {value}"
                    ))
                })?;
                let top_level = self.json.get("partial_rotary_factor");
                if top_level.is_some_and(|v| !v.is_null()) && inner != partial {
                    return Err(self.err(format!(
                        "`partial_rotary_factor` = {partial} and \
                         `rope_parameters.partial_rotary_factor` = {inner} disagree"
                    )));
                }
                partial = inner;
            }
            let from_parameters = self.rope_scaling(params, "rope_parameters")?;
            if scaling.is_some() && from_parameters.is_some() && scaling != from_parameters {
                return Err(self.err(format!(
                    "`rope_scaling` ({scaling:?}) and `rope_parameters` ({from_parameters:?}) \
                     disagree: give one RoPE scaling"
                )));
            }
            scaling = scaling.or(from_parameters);
        }
        Ok((theta, scaling, partial))
    }

    /// One RoPE settings object (`rope_scaling` or `rope_parameters`) as a
    /// scheme; `key` names it in errors.
    fn rope_scaling(&self, v: &Value, key: &str) -> Result<Option<RopeScaling>> {
        let Some(object) = v.as_object() else {
            return Err(self.err(format!("`{key}` must be an object, got {v}")));
        };
        let scaling = RopeScaling::from_json(v)
            .map_err(|e| self.err(format!("`{key}`: {}", strip_config_prefix(e))))?;
        let allowed = scaling.as_ref().map_or(&[][..], RopeScaling::field_names);
        for (field, value) in object {
            match field.as_str() {
                "rope_type" | "type" | "rope_theta" => {}
                // Read by `rope`.
                "partial_rotary_factor" if value.is_number() => {}
                f if allowed.contains(&f) => {}
                other => {
                    let kind = scaling.as_ref().map_or("default", RopeScaling::rope_type);
                    return Err(self.err(format!(
                        "`{key}.{other}` = {value} is not supported: rope_type `{kind}` takes \
                         rope_theta{}{}",
                        if allowed.is_empty() { "" } else { ", " },
                        allowed.join(", ")
                    )));
                }
            }
        }
        Ok(scaling)
    }

    /// Errors on the first key that is neither used nor in `ignore`.
    fn finish(&self, ignore: &[String]) -> Result<()> {
        let unknown: Vec<String> = self
            .json
            .iter()
            .filter(|(k, _)| !self.used.contains(*k) && !ignore.contains(*k))
            .map(|(k, v)| format!("`{k}` = {v}"))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(self.err(format!(
            "unknown key(s) {}: this reader does not know whether they change the model, so it \
             does not ignore them (LoadOptions::ignore_keys ignores keys known to be harmless)",
            unknown.join(", ")
        )))
    }
}

impl HfConfig {
    /// Reads `path` (a `config.json`) and its `model_type`; an unreadable
    /// file, bad JSON or a missing or unknown `model_type` is a
    /// [`MoeError::Checkpoint`] naming the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot read the model config: {e}"),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(value, path)
    }

    /// [`HfConfig::read`] on JSON already in memory; `path` names it in errors.
    pub fn from_json(value: Value, path: &Path) -> Result<Self> {
        let err = |reason: String| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let Value::Object(json) = value else {
            return Err(err("a model config must be a JSON object".into()));
        };
        let model_type = match json.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(err(format!("`model_type` must be a string, got {other}"))),
            None => {
                return Err(err(format!(
                    "no `model_type`: expected one of {}",
                    HfFamily::supported_list()
                )))
            }
        };
        let family = model_type
            .parse::<HfFamily>()
            .map_err(|e| err(strip_config_prefix(e)))?;
        Ok(HfConfig {
            family,
            json,
            path: path.to_path_buf(),
        })
    }

    /// The decoder config of this `config.json` under the key policy of the
    /// module docs; keys in `ignore` are ignored. Errors (a
    /// [`MoeError::Checkpoint`] naming the file) on a key set to a value the
    /// decoder does not implement, an unknown key, a layer layout it cannot express, or
    /// sizes the decoder rejects.
    pub fn to_decoder(&self, ignore: &[String]) -> Result<DecoderConfig> {
        let path = self.path.as_path();
        let mut r = Reader {
            json: &self.json,
            path,
            family: self.family,
            used: BTreeSet::new(),
        };
        r.informational(INFORMATIONAL);
        let d = self.family.defaults();
        let num_attention_heads = r.int("num_attention_heads", d.num_attention_heads)?;
        let max_position_embeddings =
            r.int("max_position_embeddings", d.max_position_embeddings)?;
        let (rope_theta, rope_scaling, partial_rotary_factor) = r.rope(d.rope_theta)?;
        if partial_rotary_factor != 1.0 && self.family != HfFamily::Glm4Moe {
            return Err(r.err(format!(
                "`partial_rotary_factor` = {partial_rotary_factor} is not supported: the family \
                 turns every dimension of a head (1); glm4_moe takes other factors"
            )));
        }
        let mut c = DecoderConfig {
            vocab_size: r.int("vocab_size", d.vocab_size)?,
            hidden_size: r.int("hidden_size", d.hidden_size)?,
            intermediate_size: r.int("intermediate_size", d.intermediate_size)?,
            moe_intermediate_size: None,
            num_hidden_layers: r.int("num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads: r.int(
                "num_key_value_heads",
                d.num_key_value_heads.unwrap_or(num_attention_heads),
            )?,
            head_dim: r.opt_int("head_dim")?,
            max_position_embeddings,
            rope_theta,
            rope_scaling,
            partial_rotary_factor,
            rms_norm_eps: r.float("rms_norm_eps", d.rms_norm_eps)?,
            attention_bias: false,
            attention_dropout: r.float("attention_dropout", 0.0)?,
            tie_word_embeddings: r.boolean("tie_word_embeddings", false)?,
            qk_norm: QkNorm::None,
            localized_filtering: false,
            num_local_experts: 0,
            num_experts_per_tok: 2,
            n_shared_experts: 0,
            shared_expert_intermediate_size: None,
            first_k_dense_replace: 0,
            // The router is the decoder's default (softmax top-k,
            // renormalised, no bias); each family below changes its part.
            router_aux_loss_coef: 0.0,
            ..DecoderConfig::default()
        };
        r.silu()?;
        if !matches!(self.family, HfFamily::Qwen2Moe | HfFamily::GptOss) {
            // Read with the window where the family's class has the key.
            r.full_attention_layers()?;
        }
        match self.family {
            HfFamily::Mixtral => {
                c.num_local_experts = r.int("num_local_experts", 8)?;
                c.num_experts_per_tok = r.int("num_experts_per_tok", 2)?;
                c.router_aux_loss_coef = r.float("router_aux_loss_coef", 0.001)?;
                r.fixed(
                    "router_jitter_noise",
                    |v| v.as_f64() == Some(0.0),
                    "router_jitter_noise 0 (no jitter on the router input)",
                )?;
                // Every layer slides.
                c.sliding_window = r.sliding_window(None, max_position_embeddings)?;
            }
            HfFamily::Qwen2Moe => {
                let num_experts = r.int("num_experts", 60)?;
                c.num_experts_per_tok = r.int("num_experts_per_tok", 4)?;
                c.moe_intermediate_size = Some(r.int("moe_intermediate_size", 1408)?);
                c.shared_expert_intermediate_size =
                    Some(r.int("shared_expert_intermediate_size", 5632)?);
                c.router.gate = Gate::TopK {
                    norm_topk_prob: r.boolean("norm_topk_prob", false)?,
                };
                c.router_aux_loss_coef = r.float("router_aux_loss_coef", 0.001)?;
                // transformers 4 always gives q/k/v a bias; 5 has `qkv_bias`
                // (default true). Qwen2MoeAttention ignores `attention_bias`.
                c.attention_bias = r.boolean("qkv_bias", true)?;
                r.informational(&["attention_bias"]);
                r.qwen_layers(&mut c, num_experts, max_position_embeddings)?;
            }
            HfFamily::Qwen3Moe => {
                let num_experts = r.int_aliased("num_experts", "num_local_experts", 128)?;
                c.num_experts_per_tok = r.int("num_experts_per_tok", 8)?;
                c.moe_intermediate_size = Some(r.int("moe_intermediate_size", 768)?);
                c.router.gate = Gate::TopK {
                    norm_topk_prob: r.boolean("norm_topk_prob", false)?,
                };
                c.router_aux_loss_coef = r.float("router_aux_loss_coef", 0.001)?;
                c.qk_norm = QkNorm::Head;
                // Qwen3MoeAttention gives o_proj the bias too.
                r.fixed(
                    "attention_bias",
                    |v| v.as_bool() == Some(false),
                    "attention_bias false (q/k/v/o without bias)",
                )?;
                r.qwen_layers(&mut c, num_experts, max_position_embeddings)?;
            }
            HfFamily::Olmoe => {
                c.num_local_experts = r.int("num_experts", 64)?;
                c.num_experts_per_tok = r.int("num_experts_per_tok", 8)?;
                c.router.gate = Gate::TopK {
                    norm_topk_prob: r.boolean("norm_topk_prob", false)?,
                };
                c.router_aux_loss_coef = r.float("router_aux_loss_coef", 0.01)?;
                c.qk_norm = QkNorm::Projection;
                r.fixed(
                    "clip_qkv",
                    |_| false,
                    "clip_qkv null (no clipping of q, k, v)",
                )?;
                r.fixed(
                    "attention_bias",
                    |v| v.as_bool() == Some(false),
                    "attention_bias false (o_proj has no bias)",
                )?;
                r.no_sliding_window(max_position_embeddings)?;
            }
            HfFamily::Llama => {
                r.fixed(
                    "attention_bias",
                    |v| v.as_bool() == Some(false),
                    "attention_bias false (o_proj has no bias)",
                )?;
                r.fixed("mlp_bias", |v| v.as_bool() == Some(false), "mlp_bias false")?;
                // Splitting the matmuls over `pretraining_tp` slices is the same function.
                r.informational(&["pretraining_tp"]);
                r.no_sliding_window(max_position_embeddings)?;
            }
            HfFamily::Glm4Moe => {
                r.sigmoid_moe(
                    &mut c,
                    SigmoidMoeDefaults {
                        n_routed_experts: 128,
                        moe_intermediate_size: 1408,
                        first_k_dense_replace: 1,
                        routed_scaling_factor: 1.0,
                        n_group: 1,
                        topk_group: 1,
                    },
                )?;
                // q/k/v only: Glm4MoeAttention's o_proj has no bias.
                c.attention_bias = r.boolean("attention_bias", false)?;
                if r.boolean("use_qk_norm", false)? {
                    c.qk_norm = QkNorm::Head;
                }
                // Multi-token prediction layers (their weights past the last
                // layer are skipped on load, as transformers does).
                r.informational(&["num_nextn_predict_layers", "num_mtp_layers"]);
                r.no_sliding_window(max_position_embeddings)?;
            }
            HfFamily::DeepseekV3 => {
                r.sigmoid_moe(
                    &mut c,
                    SigmoidMoeDefaults {
                        n_routed_experts: 256,
                        moe_intermediate_size: 2048,
                        first_k_dense_replace: 3,
                        routed_scaling_factor: 2.5,
                        n_group: 8,
                        topk_group: 4,
                    },
                )?;
                c.attention_bias = r.boolean("attention_bias", false)?;
                let rope_interleave = r.boolean("rope_interleave", true)?;
                r.latent_attention(&mut c, rope_interleave)?;
                // The original checkpoints' keys (DeepSeek's own modeling code).
                r.fixed(
                    "topk_method",
                    |v| v.as_str() == Some("noaux_tc"),
                    "\"noaux_tc\" (group-limited top-k on the bias-corrected scores)",
                )?;
                r.deepseek_originals("sigmoid")?;
            }
            HfFamily::DeepseekV2 => {
                c.num_local_experts = r.int_aliased("n_routed_experts", "num_experts", 64)?;
                c.num_experts_per_tok = r.opt_int("num_experts_per_tok")?.ok_or_else(|| {
                    r.err("`num_experts_per_tok` is missing: DeepSeek-V2 has no default for it")
                })?;
                c.moe_intermediate_size = Some(r.int("moe_intermediate_size", 1407)?);
                c.n_shared_experts = r.int("n_shared_experts", 2)?;
                c.first_k_dense_replace = r.int("first_k_dense_replace", 0)?;
                c.router.routed_scaling_factor = r.float("routed_scaling_factor", 1.0)?;
                c.router.gate = match r.value("topk_method").map(|v| (v, v.as_str())) {
                    None | Some((_, Some("greedy"))) => {
                        // Without a group limit the group keys do nothing.
                        r.informational(&["n_group", "topk_group"]);
                        Gate::TopK {
                            norm_topk_prob: false,
                        }
                    }
                    Some((_, Some("group_limited_greedy"))) => Gate::GroupLimitedGreedy {
                        norm_topk_prob: false,
                        n_group: r.opt_int("n_group")?.ok_or_else(|| {
                            r.err("topk_method `group_limited_greedy` needs `n_group`")
                        })?,
                        topk_group: r.opt_int("topk_group")?.ok_or_else(|| {
                            r.err("topk_method `group_limited_greedy` needs `topk_group`")
                        })?,
                    },
                    Some((v, _)) => {
                        return Err(r.err(format!(
                            "`topk_method` = {v} is not supported: DeepSeek-V2 chooses by \
                             \"greedy\" or \"group_limited_greedy\""
                        )))
                    }
                };
                // transformers' DeepseekV2TopkRouter never renormalises,
                // whatever the key says (DeepSeek's own code did when true;
                // its checkpoints say false).
                r.informational(&["norm_topk_prob"]);
                c.attention_bias = r.boolean("attention_bias", false)?;
                r.fixed("mlp_bias", |v| v.as_bool() == Some(false), "mlp_bias false")?;
                // RoPE on adjacent pairs of the rotary dimensions (complex
                // products), as V3's `rope_interleave`.
                r.latent_attention(&mut c, true)?;
                r.deepseek_originals("softmax")?;
            }
            HfFamily::GptOss => {
                c.num_local_experts = r.int_aliased("num_local_experts", "num_experts", 128)?;
                c.num_experts_per_tok = r.int("num_experts_per_tok", 4)?;
                c.router_aux_loss_coef = r.float("router_aux_loss_coef", 0.001)?;
                // GptOssConfig's default is 64, not hidden_size /
                // num_attention_heads (which the decoder's `None` means).
                let head_dim = r.int("head_dim", 64)?;
                c.head_dim =
                    (head_dim * c.num_attention_heads != c.hidden_size).then_some(head_dim);
                // A biased router; the softmax of the top-k logits.
                c.router.bias = true;
                c.router.gate = Gate::TopK {
                    norm_topk_prob: true,
                };
                c.expert_bias = true;
                c.expert_activation = Activation::ClampedSwiGlu {
                    alpha: r.float("swiglu_alpha", 1.702)?,
                    limit: r.float("swiglu_limit", 7.0)?,
                };
                // q, k, v and o together.
                let bias = r.boolean("attention_bias", true)?;
                (c.attention_bias, c.o_proj_bias) = (bias, bias);
                c.attention_sinks = true;
                // transformers' default: layers 0, 2, ... slide.
                c.sliding_window = r.sliding_window(Some(128), max_position_embeddings)?;
                let types = r.layer_types()?.unwrap_or_else(|| {
                    (0..c.num_hidden_layers)
                        .map(|i| match i % 2 {
                            0 => LayerType::SlidingAttention,
                            _ => LayerType::FullAttention,
                        })
                        .collect()
                });
                set_windowed_layers(&mut c, types);
                // GptOssConfig's RoPE when the file has none: YaRN over 4096
                // original positions, factor 32, not truncated.
                if c.rope_scaling.is_none()
                    && !r.json.contains_key("rope_parameters")
                    && !r.json.contains_key("rope_scaling")
                {
                    c.rope_scaling = Some(RopeScaling::Yarn {
                        factor: 32.0,
                        original_max_position_embeddings: Some(4096),
                        beta_fast: 32.0,
                        beta_slow: 1.0,
                        mscale: None,
                        mscale_all_dim: None,
                        attention_factor: None,
                        truncate: false,
                    });
                }
                // The hub's experts in MXFP4: the weight loader dequantises
                // their `*_blocks` and `*_scales`.
                if let Some(q) = r.value("quantization_config") {
                    let method = q.get("quant_method").and_then(Value::as_str);
                    if method != Some("mxfp4") {
                        return Err(r.err(format!(
                            "`quantization_config` = {q} is not supported: gpt-oss's MXFP4 \
                             experts (quant_method \"mxfp4\") are dequantised on load, other \
                             methods are not read"
                        )));
                    }
                }
            }
        }
        r.finish(ignore)?;
        c.validate().map_err(|e| r.err(strip_config_prefix(e)))?;
        Ok(c)
    }

    /// The `config.json` of `config` for `family`: `model_type`,
    /// `architectures` and Hugging Face's keys for that family (the inverse
    /// of [`HfConfig::to_decoder`]). A config the family cannot express
    /// (another router, capacity limits, localized filtering, a gate bias,
    /// a dense layer in Mixtral, ...) is a [`MoeError::Config`] naming the
    /// setting.
    pub fn from_decoder(family: HfFamily, c: &DecoderConfig) -> Result<Self> {
        c.validate()?;
        let bad = |what: String| {
            MoeError::config(format!(
                "model_type `{family}` cannot express this decoder config: {what}"
            ))
        };
        // Multi-head Latent Attention and ungated shared experts.
        let deepseek = matches!(family, HfFamily::DeepseekV3 | HfFamily::DeepseekV2);
        // DeepSeek-V3's MoE layers: its sigmoid router, routed scaling and
        // ungated shared experts (GLM-4.5 has them too).
        let sigmoid_moe = matches!(family, HfFamily::DeepseekV3 | HfFamily::Glm4Moe);
        if c.partial_rotary_factor != 1.0 && family != HfFamily::Glm4Moe {
            return Err(bad(format!(
                "partial_rotary_factor = {} (GLM-4.5's RoPE on part of each head)",
                c.partial_rotary_factor
            )));
        }
        if c.localized_filtering {
            return Err(bad(
                "localized filtering (Yuan 2.0) has no counterpart".into()
            ));
        }
        let gpt_oss = family == HfFamily::GptOss;
        if c.attention_sinks != gpt_oss {
            return Err(bad(format!(
                "attention_sinks = {}; gpt-oss's attention has them, no other family's",
                c.attention_sinks
            )));
        }
        let clamped = matches!(c.expert_activation, Activation::ClampedSwiGlu { .. });
        let gpt_oss_experts = c.expert_bias && clamped;
        if c.num_local_experts > 0 && gpt_oss_experts != gpt_oss
            || (!gpt_oss && (c.expert_bias || c.expert_activation != Activation::SwiGlu))
        {
            return Err(bad(format!(
                "expert_activation = {:?}, expert_bias = {}; gpt-oss's experts have biases and \
                 the clamped SwiGLU, the other families' neither",
                c.expert_activation, c.expert_bias
            )));
        }
        if c.o_proj_bias != (gpt_oss && c.attention_bias) {
            return Err(bad(format!(
                "o_proj_bias = {} with attention_bias = {}; only gpt-oss biases o_proj, as its \
                 q, k and v",
                c.o_proj_bias, c.attention_bias
            )));
        }
        if let Some(window) = c.sliding_window {
            let every_layer = (0..c.num_hidden_layers).all(|i| c.sliding_window_of(i).is_some());
            let expressible = match family {
                HfFamily::Mixtral | HfFamily::Qwen3Moe => every_layer,
                HfFamily::Qwen2Moe | HfFamily::GptOss => true,
                _ => false,
            };
            if !expressible {
                return Err(bad(format!(
                    "sliding_window = {window} on layers {:?}; mixtral and qwen3_moe slide in \
                     every layer, qwen2_moe in any (layer_types), the others in none",
                    (0..c.num_hidden_layers)
                        .filter(|&i| c.sliding_window_of(i).is_some())
                        .collect::<Vec<_>>()
                )));
            }
        }
        if c.latent_attention.is_some() != deepseek {
            return Err(bad(if deepseek {
                "DeepSeek's attention is Multi-head Latent Attention (latent_attention)".into()
            } else {
                "latent_attention (Multi-head Latent Attention) is DeepSeek's".into()
            }));
        }
        if c.n_shared_experts != 0 && !(sigmoid_moe || deepseek) {
            return Err(bad(format!(
                "n_shared_experts = {} (DeepSeek's shared experts)",
                c.n_shared_experts
            )));
        }
        let expected_qk = match family {
            HfFamily::Olmoe => QkNorm::Projection,
            HfFamily::Qwen3Moe => QkNorm::Head,
            // `use_qk_norm`: either.
            HfFamily::Glm4Moe => c.qk_norm,
            _ => QkNorm::None,
        };
        if family == HfFamily::Glm4Moe && c.qk_norm == QkNorm::Projection {
            return Err(bad(
                "qk_norm = Projection; GLM-4.5's QK-norm is per head (Head)".into(),
            ));
        }
        if c.qk_norm != expected_qk {
            return Err(bad(format!(
                "qk_norm = {:?}, the family has {expected_qk:?}",
                c.qk_norm
            )));
        }
        let moe = c.num_local_experts > 0;
        let r = &c.router;
        if moe && (r.bias != gpt_oss || r.capacity_factor.is_some()) {
            return Err(bad(format!(
                "router bias = {}, capacity_factor = {:?}; the family's router has {} bias and \
                 no capacity limit",
                r.bias,
                r.capacity_factor,
                if gpt_oss { "a" } else { "no" }
            )));
        }
        if moe && !(sigmoid_moe || deepseek) && r.routed_scaling_factor != 1.0 {
            return Err(bad(format!(
                "routed_scaling_factor = {} (DeepSeek's); the family does not scale the expert \
                 weights",
                r.routed_scaling_factor
            )));
        }
        let v2 = family == HfFamily::DeepseekV2;
        let norm_topk_prob = match (moe, sigmoid_moe, &r.gate) {
            (false, _, _) => true,
            (true, false, Gate::TopK { norm_topk_prob })
            | (true, true, Gate::SigmoidAuxFree { norm_topk_prob, .. }) => *norm_topk_prob,
            (true, false, Gate::GroupLimitedGreedy { norm_topk_prob, .. }) if v2 => *norm_topk_prob,
            (true, _, other) => {
                return Err(bad(format!(
                    "router gate {other:?}; the family's router is {}",
                    if sigmoid_moe {
                        "sigmoid with the aux-free bias (SigmoidAuxFree)"
                    } else if v2 {
                        "softmax top-k (TopK), group-limited or not (GroupLimitedGreedy)"
                    } else {
                        "softmax top-k"
                    }
                )))
            }
        };
        if v2 && moe && norm_topk_prob {
            return Err(bad(
                "norm_topk_prob = true; transformers' DeepSeek-V2 router never renormalises".into(),
            ));
        }
        let mut j = Map::new();
        j.insert("model_type".into(), json!(family.model_type()));
        j.insert("architectures".into(), json!([family.architecture()]));
        j.insert("vocab_size".into(), json!(c.vocab_size));
        j.insert("hidden_size".into(), json!(c.hidden_size));
        j.insert("intermediate_size".into(), json!(c.intermediate_size));
        j.insert("num_hidden_layers".into(), json!(c.num_hidden_layers));
        j.insert("num_attention_heads".into(), json!(c.num_attention_heads));
        j.insert("num_key_value_heads".into(), json!(c.num_key_value_heads));
        if let Some(head_dim) = c.head_dim {
            j.insert("head_dim".into(), json!(head_dim));
        }
        j.insert(
            "max_position_embeddings".into(),
            json!(c.max_position_embeddings),
        );
        // transformers 5 keeps the RoPE settings in `rope_parameters` (and
        // still reads a top-level `rope_theta`, which transformers 4 wrote).
        j.insert("rope_parameters".into(), rope_parameters(c)?);
        j.insert("rms_norm_eps".into(), json!(c.rms_norm_eps));
        j.insert("tie_word_embeddings".into(), json!(c.tie_word_embeddings));
        j.insert("attention_dropout".into(), json!(c.attention_dropout));
        j.insert("hidden_act".into(), json!("silu"));
        match family {
            HfFamily::Mixtral => {
                if !moe || c.first_k_dense_replace != 0 || c.shared_experts().is_some() {
                    return Err(bad(format!(
                        "Mixtral has MoE layers only, without shared experts (num_local_experts \
                         = {}, first_k_dense_replace = {}, shared_expert_intermediate_size = {:?})",
                        c.num_local_experts,
                        c.first_k_dense_replace,
                        c.shared_expert_intermediate_size
                    )));
                }
                if !norm_topk_prob {
                    return Err(bad(
                        "Mixtral renormalises the top-k weights (norm_topk_prob = true)".into(),
                    ));
                }
                if c.attention_bias {
                    return Err(bad("Mixtral's attention has no bias".into()));
                }
                // No dense layer: the expert width is Mixtral's intermediate_size.
                j.insert("intermediate_size".into(), json!(c.expert_width()));
                j.insert("num_local_experts".into(), json!(c.num_local_experts));
                j.insert("num_experts_per_tok".into(), json!(c.num_experts_per_tok));
                j.insert("router_aux_loss_coef".into(), json!(c.router_aux_loss_coef));
                j.insert("router_jitter_noise".into(), json!(0.0));
                j.insert("sliding_window".into(), json!(c.sliding_window));
            }
            HfFamily::Qwen2Moe => {
                if moe && c.shared_expert_intermediate_size.is_none() {
                    return Err(bad("Qwen2-MoE layers have a gated shared expert \
                         (shared_expert_intermediate_size)"
                        .into()));
                }
                write_qwen_layers(&mut j, family, c, norm_topk_prob);
                j.insert(
                    "shared_expert_intermediate_size".into(),
                    json!(c.shared_expert_intermediate_size.unwrap_or(0)),
                );
                j.insert("qkv_bias".into(), json!(c.attention_bias));
            }
            HfFamily::Qwen3Moe => {
                if c.shared_experts().is_some() {
                    return Err(bad("Qwen3-MoE layers have no shared expert \
                         (shared_expert_intermediate_size)"
                        .into()));
                }
                if c.attention_bias {
                    return Err(bad("Qwen3-MoE's attention bias would include o_proj".into()));
                }
                write_qwen_layers(&mut j, family, c, norm_topk_prob);
                j.insert("attention_bias".into(), json!(false));
            }
            HfFamily::Olmoe => {
                if !moe || c.first_k_dense_replace != 0 || c.shared_experts().is_some() {
                    return Err(bad(format!(
                        "OLMoE has MoE layers only, without shared experts (num_local_experts = \
                         {}, first_k_dense_replace = {})",
                        c.num_local_experts, c.first_k_dense_replace
                    )));
                }
                if c.attention_bias {
                    return Err(bad("OLMoE's attention bias would include o_proj".into()));
                }
                if c.head_dim
                    .is_some_and(|h| h * c.num_attention_heads != c.hidden_size)
                {
                    return Err(bad(
                        "OLMoE's q_norm spans hidden_size, so head_dim must be hidden_size / \
                         num_attention_heads"
                            .into(),
                    ));
                }
                j.insert("intermediate_size".into(), json!(c.expert_width()));
                j.insert("num_experts".into(), json!(c.num_local_experts));
                j.insert("num_experts_per_tok".into(), json!(c.num_experts_per_tok));
                j.insert("norm_topk_prob".into(), json!(norm_topk_prob));
                j.insert("router_aux_loss_coef".into(), json!(c.router_aux_loss_coef));
                j.insert("attention_bias".into(), json!(false));
                j.insert("clip_qkv".into(), Value::Null);
            }
            HfFamily::Llama => {
                if moe {
                    return Err(bad(format!(
                        "LLaMA is dense (num_local_experts = {})",
                        c.num_local_experts
                    )));
                }
                if c.attention_bias {
                    return Err(bad("LLaMA's attention bias would include o_proj".into()));
                }
                j.insert("attention_bias".into(), json!(false));
                j.insert("mlp_bias".into(), json!(false));
            }
            HfFamily::Glm4Moe => {
                if !moe || c.shared_expert_intermediate_size.is_some() {
                    return Err(bad(format!(
                        "GLM-4.5 has routed experts and ungated shared ones \
                         (num_local_experts = {}, shared_expert_intermediate_size = {:?})",
                        c.num_local_experts, c.shared_expert_intermediate_size
                    )));
                }
                write_sigmoid_moe(&mut j, c, norm_topk_prob);
                j.insert("attention_bias".into(), json!(c.attention_bias));
                j.insert("use_qk_norm".into(), json!(c.qk_norm == QkNorm::Head));
                j.insert("num_nextn_predict_layers".into(), json!(0));
            }
            HfFamily::DeepseekV3 => {
                if !moe || c.shared_expert_intermediate_size.is_some() {
                    return Err(bad(format!(
                        "DeepSeek-V3 has routed experts and ungated shared ones \
                         (num_local_experts = {}, shared_expert_intermediate_size = {:?})",
                        c.num_local_experts, c.shared_expert_intermediate_size
                    )));
                }
                write_sigmoid_moe(&mut j, c, norm_topk_prob);
                let latent = write_latent_attention(&mut j, c);
                j.insert("rope_interleave".into(), json!(latent.rope_interleave));
                j.insert("attention_bias".into(), json!(c.attention_bias));
                j.insert("num_nextn_predict_layers".into(), json!(0));
            }
            HfFamily::GptOss => {
                if !moe || c.first_k_dense_replace != 0 || c.shared_experts().is_some() {
                    return Err(bad(format!(
                        "gpt-oss has MoE layers only, without shared experts (num_local_experts \
                         = {}, first_k_dense_replace = {})",
                        c.num_local_experts, c.first_k_dense_replace
                    )));
                }
                if !norm_topk_prob {
                    return Err(bad(
                        "gpt-oss softmaxes the top-k logits (norm_topk_prob = true)".into(),
                    ));
                }
                let Activation::ClampedSwiGlu { alpha, limit } = c.expert_activation else {
                    return Err(bad("gpt-oss's experts are clamped SwiGLUs".into()));
                };
                j.insert("intermediate_size".into(), json!(c.expert_width()));
                j.insert("num_local_experts".into(), json!(c.num_local_experts));
                j.insert("num_experts_per_tok".into(), json!(c.num_experts_per_tok));
                j.insert("router_aux_loss_coef".into(), json!(c.router_aux_loss_coef));
                j.insert("head_dim".into(), json!(c.attention_config().head_dim()));
                j.insert("attention_bias".into(), json!(c.attention_bias));
                j.insert("swiglu_alpha".into(), json!(alpha));
                j.insert("swiglu_limit".into(), json!(limit));
                // Without a window every layer attends fully (the window's
                // value is then never read).
                let types: Vec<LayerType> = (0..c.num_hidden_layers)
                    .map(|i| match c.sliding_window_of(i) {
                        Some(_) => LayerType::SlidingAttention,
                        None => LayerType::FullAttention,
                    })
                    .collect();
                j.insert(
                    "sliding_window".into(),
                    json!(c.sliding_window.unwrap_or(128)),
                );
                j.insert("layer_types".into(), json!(types));
            }
            HfFamily::DeepseekV2 => {
                if !moe || c.shared_expert_intermediate_size.is_some() {
                    return Err(bad(format!(
                        "DeepSeek-V2 has routed experts and ungated shared ones \
                         (num_local_experts = {}, shared_expert_intermediate_size = {:?})",
                        c.num_local_experts, c.shared_expert_intermediate_size
                    )));
                }
                if c.latent_attention.is_some_and(|l| !l.rope_interleave) {
                    return Err(bad(
                        "rope_interleave = false; DeepSeek-V2 turns adjacent pairs".into(),
                    ));
                }
                // transformers writes `null` groups for `greedy`.
                let (method, n_group, topk_group) = match r.gate.groups() {
                    Some((n, k)) => ("group_limited_greedy", json!(n), json!(k)),
                    None => ("greedy", Value::Null, Value::Null),
                };
                write_deepseek_experts(&mut j, c);
                j.insert("topk_method".into(), json!(method));
                j.insert("n_group".into(), n_group);
                j.insert("topk_group".into(), topk_group);
                j.insert("norm_topk_prob".into(), json!(false));
                write_latent_attention(&mut j, c);
                j.insert("attention_bias".into(), json!(c.attention_bias));
                j.insert("mlp_bias".into(), json!(false));
            }
        }
        Ok(HfConfig {
            family,
            json: j,
            path: PathBuf::from(crate::CONFIG_FILE),
        })
    }

    /// The JSON object of the file.
    pub fn to_json(&self) -> Value {
        Value::Object(self.json.clone())
    }
}

/// transformers 5's `rope_parameters` of `c`: `rope_theta`, `rope_type`,
/// the scaling scheme's fields (which transformers 4 read from
/// `rope_scaling`) and a `partial_rotary_factor` other than 1.
fn rope_parameters(c: &DecoderConfig) -> Result<Value> {
    let mut params = match &c.rope_scaling {
        None => json!({"rope_type": "default"}),
        Some(scaling) => serde_json::to_value(scaling)
            .map_err(|e| MoeError::config(format!("rope_scaling: {e}")))?,
    };
    params["rope_theta"] = json!(c.rope_theta);
    // GLM-4.5's partial RoPE (any other family has refused a factor != 1).
    if c.partial_rotary_factor != 1.0 {
        params["partial_rotary_factor"] = json!(c.partial_rotary_factor);
    }
    Ok(params)
}

/// DeepSeek-V3's and GLM-4.5's MoE keys (the inverse of
/// [`Reader::sigmoid_moe`]); `c.router.gate` is `SigmoidAuxFree` (checked by
/// the caller).
fn write_sigmoid_moe(j: &mut Map<String, Value>, c: &DecoderConfig, norm_topk_prob: bool) {
    if let Gate::SigmoidAuxFree {
        n_group,
        topk_group,
        ..
    } = c.router.gate
    {
        j.insert("n_group".into(), json!(n_group));
        j.insert("topk_group".into(), json!(topk_group));
    }
    write_deepseek_experts(j, c);
    j.insert("norm_topk_prob".into(), json!(norm_topk_prob));
}

/// The expert keys DeepSeek-V2, DeepSeek-V3 and GLM-4.5 share: routed and
/// shared experts, their width, the dense prefix, the routed scaling.
fn write_deepseek_experts(j: &mut Map<String, Value>, c: &DecoderConfig) {
    j.insert("n_routed_experts".into(), json!(c.num_local_experts));
    j.insert("num_experts_per_tok".into(), json!(c.num_experts_per_tok));
    j.insert("moe_intermediate_size".into(), json!(c.expert_width()));
    j.insert("n_shared_experts".into(), json!(c.n_shared_experts));
    j.insert(
        "first_k_dense_replace".into(),
        json!(c.first_k_dense_replace),
    );
    j.insert(
        "routed_scaling_factor".into(),
        json!(c.router.routed_scaling_factor),
    );
}

/// DeepSeek's Multi-head Latent Attention keys (the inverse of
/// [`Reader::latent_attention`]); `c.latent_attention` is set (checked by
/// the caller).
fn write_latent_attention(j: &mut Map<String, Value>, c: &DecoderConfig) -> LatentAttention {
    let latent = c.latent_attention.expect("checked by from_decoder");
    j.insert("q_lora_rank".into(), json!(latent.q_lora_rank));
    j.insert("kv_lora_rank".into(), json!(latent.kv_lora_rank));
    j.insert("qk_nope_head_dim".into(), json!(latent.qk_nope_head_dim));
    j.insert("qk_rope_head_dim".into(), json!(latent.qk_rope_head_dim));
    j.insert(
        "qk_head_dim".into(),
        json!(latent.qk_nope_head_dim + latent.qk_rope_head_dim),
    );
    j.insert("v_head_dim".into(), json!(latent.v_head_dim));
    j.insert("head_dim".into(), json!(latent.qk_rope_head_dim));
    j.insert("num_key_value_heads".into(), json!(c.num_attention_heads));
    latent
}

/// Qwen2-MoE's and Qwen3-MoE's keys for the layers' layout and experts
/// (the inverse of [`Reader::qwen_layers`] and the router keys): a dense
/// prefix as `mlp_only_layers`, `decoder_sparse_step` 1, the sliding window
/// (Qwen2-MoE's layers by `layer_types`).
fn write_qwen_layers(
    j: &mut Map<String, Value>,
    family: HfFamily,
    c: &DecoderConfig,
    norm_topk_prob: bool,
) {
    let moe = c.num_local_experts > 0;
    let dense = c.first_k_dense_replace.min(c.num_hidden_layers);
    let mlp_only: Vec<i64> = if moe {
        (0..dense).collect()
    } else {
        Vec::new()
    };
    j.insert("num_experts".into(), json!(c.num_local_experts));
    j.insert("num_experts_per_tok".into(), json!(c.num_experts_per_tok));
    j.insert("moe_intermediate_size".into(), json!(c.expert_width()));
    j.insert("norm_topk_prob".into(), json!(norm_topk_prob));
    j.insert("router_aux_loss_coef".into(), json!(c.router_aux_loss_coef));
    j.insert("decoder_sparse_step".into(), json!(1));
    j.insert("mlp_only_layers".into(), json!(mlp_only));
    j.insert(
        "use_sliding_window".into(),
        json!(c.sliding_window.is_some()),
    );
    if let Some(window) = c.sliding_window {
        j.insert("sliding_window".into(), json!(window));
        if family == HfFamily::Qwen2Moe {
            // Explicit, so that `max_window_layers` does not apply.
            let types: Vec<LayerType> = (0..c.num_hidden_layers)
                .map(|i| match c.sliding_window_of(i) {
                    Some(_) => LayerType::SlidingAttention,
                    None => LayerType::FullAttention,
                })
                .collect();
            j.insert("layer_types".into(), json!(types));
        }
    }
}

/// Qwen2-MoE's layer layout as a dense prefix: layer `i` is dense when it
/// is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0` (or
/// there are no experts). Only "the first k layers dense" is expressible.
fn qwen2_dense_prefix(
    r: &Reader<'_>,
    layers: i64,
    num_experts: i64,
    step: i64,
    mlp_only: &[i64],
) -> Result<i64> {
    if step < 1 {
        return Err(r.err(format!("`decoder_sparse_step` must be >= 1, got {step}")));
    }
    let dense: Vec<i64> = (0..layers)
        .filter(|i| mlp_only.contains(i) || num_experts <= 0 || (i + 1) % step != 0)
        .collect();
    let k = dense.len() as i64;
    if dense.iter().copied().ne(0..k) {
        return Err(r.err(format!(
            "decoder_sparse_step = {step} and mlp_only_layers = {mlp_only:?} make layers \
             {dense:?} dense; the decoder expresses only every layer MoE or a dense prefix \
             (the first k layers)"
        )));
    }
    Ok(k)
}

/// A family's per-layer windows (`layer_types`) in the decoder's canonical
/// form, so that a config survives a round trip unchanged: a list that
/// mixes sliding and full layers is kept; all sliding is the empty list
/// (every layer slides); all full is no window at all. A list of the wrong
/// length is kept for [`DecoderConfig::validate`] to name.
fn set_windowed_layers(c: &mut DecoderConfig, types: Vec<LayerType>) {
    let all = |kind: LayerType| types.iter().all(|t| *t == kind);
    c.layer_types = Vec::new();
    if types.len() as i64 != c.num_hidden_layers {
        c.layer_types = types;
    } else if c.sliding_window.is_none() || all(LayerType::FullAttention) {
        c.sliding_window = None;
    } else if !all(LayerType::SlidingAttention) {
        c.layer_types = types;
    }
}

/// The message of a [`MoeError::Config`] without its "invalid configuration: " prefix.
fn strip_config_prefix(e: MoeError) -> String {
    match e {
        MoeError::Config(msg) => msg,
        other => other.to_string(),
    }
}
