use crate::rope_scaling::check_rope_norm_dropout;
use crate::RopeScaling;
use moe_core::{MoeError, Result, WeightInit};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Normalisation of queries and keys (QK-norm), which keeps attention
/// logits from growing during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum QkNorm {
    /// No normalisation (Llama, Mixtral, Qwen2-MoE, DeepSeek-V3, Yuan 2.0).
    #[default]
    None,
    /// OLMoE's (Muennighoff et al. 2024, arXiv 2409.02060; Hugging Face's
    /// `modeling_olmoe.py`): `q_norm = RMSNorm(num_attention_heads *
    /// head_dim)` and `k_norm = RMSNorm(num_key_value_heads * head_dim)` over
    /// the whole projections, before they are split into heads.
    Projection,
    /// Qwen3's (Hugging Face's `modeling_qwen3.py`): one `RMSNorm(head_dim)`
    /// for queries and one for keys, applied to every head.
    Head,
    /// Llama 4's (Hugging Face's `Llama4TextL2Norm`): every head of the
    /// queries and keys divided by its root mean square, without a gain,
    /// `x / sqrt(mean(x^2) + eps)`, after RoPE, in layers that turn
    /// positions ([`GqaConfig::use_rope`]).
    L2,
}

/// Llama 4's attention temperature tuning (Nakanishi 2025, "Scalable-Softmax
/// Is Superior for Attention", arXiv 2501.19399; Hugging Face's
/// `Llama4TextAttention`): in a layer without RoPE, the query at position
/// `m` is multiplied by
///
/// `tau(m) = 1 + attn_scale * ln(1 + floor((m + 1) / floor_scale))`,
///
/// which sharpens attention at long positions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TemperatureTuning {
    /// Positions per step of the logarithm (Llama 4: 8192).
    pub floor_scale: f64,
    /// Strength (Llama 4: 0.1).
    pub attn_scale: f64,
}

impl TemperatureTuning {
    /// `tau` at `positions` (int64, any shape), f32, same shape.
    pub fn scales(&self, positions: &Tensor) -> Tensor {
        ((positions.to_kind(Kind::Float) + 1.0) / self.floor_scale)
            .floor()
            .log1p()
            * self.attn_scale
            + 1.0
    }
}

/// Configuration of a [`crate::GroupedQueryAttention`] layer, with Hugging
/// Face's field names (`LlamaConfig`, `Qwen2MoeConfig`, `OlmoeConfig`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GqaConfig {
    /// Model width `C`.
    pub hidden_size: i64,
    /// Number of query heads `H`.
    pub num_attention_heads: i64,
    /// Number of key/value heads `H_kv`; must divide `H` (`H_kv = H` is
    /// multi-head attention, `H_kv = 1` multi-query attention).
    pub num_key_value_heads: i64,
    /// Width of a head; `hidden_size / num_attention_heads` when `None`
    /// (then `hidden_size` must be a multiple of `num_attention_heads`).
    /// Must be even (RoPE rotates pairs).
    pub head_dim: Option<i64>,
    /// Longest sequence (prompt and generated positions) the layer accepts.
    pub max_position_embeddings: i64,
    /// RoPE base `theta`.
    pub rope_theta: f64,
    /// RoPE scaling (Hugging Face's `rope_scaling`; `None`: plain RoPE).
    /// Reads `null` and `{"rope_type": "default"}` as `None`.
    #[serde(deserialize_with = "RopeScaling::deserialize_option")]
    pub rope_scaling: Option<RopeScaling>,
    /// The share of each head's dimensions RoPE turns (GLM-4.5's 0.5):
    /// the first `rotary_dim = floor(head_dim * partial_rotary_factor)`
    /// (even, positive) rotate in halves, the rest pass unrotated, as
    /// transformers' `apply_rotary_pos_emb` with a partial `cos`/`sin`
    /// (`modeling_glm4_moe.py`). 1: every dimension.
    pub partial_rotary_factor: f64,
    /// Bias on the q, k and v projections (Qwen2).
    pub attention_bias: bool,
    /// Bias on the output projection `o_proj` (gpt-oss, with
    /// `attention_bias`).
    pub o_proj_bias: bool,
    /// QK-norm, if any: before RoPE (OLMoE's, Qwen3's), or after it in
    /// the layers that turn positions (Llama 4's weightless L2).
    pub qk_norm: QkNorm,
    /// Whether the layer turns queries and keys by their positions (RoPE);
    /// false: a layer without positional encoding (Llama 4's NoPE layers,
    /// Kazemnejad et al. 2023, arXiv 2305.19466), where causality alone
    /// orders the tokens.
    pub use_rope: bool,
    /// RoPE turns adjacent pairs of a head's dimensions (`2i`, `2i + 1`:
    /// Meta's complex-number form, Llama 4) instead of its two halves
    /// (`i`, `i + head_dim / 2`, Hugging Face's `rotate_half`). Whole heads
    /// only (`partial_rotary_factor` 1).
    pub rope_interleave: bool,
    /// Chunked attention (Llama 4): positions form chunks of this many,
    /// `0..c`, `c..2c`, ..., and a query sees the earlier positions of its
    /// own chunk only (`floor(i / c) = floor(j / c)`, positions counted
    /// from the first real token of a left-padded row). `None`: no chunks.
    pub attention_chunk_size: Option<i64>,
    /// Llama 4's temperature tuning of the queries ([`TemperatureTuning`]).
    pub attn_temperature_tuning: Option<TemperatureTuning>,
    /// `eps` of the QK-norm and localized-filtering RMSNorms.
    pub rms_norm_eps: f64,
    /// Dropout on the attention weights in training.
    pub attention_dropout: f64,
    /// Yuan 2.0's localized filtering of the query/key input
    /// ([`crate::LocalizedFiltering`]); needs an even `hidden_size`.
    pub localized_filtering: bool,
    /// Sliding-window attention (Mistral, Qwen, gpt-oss): a query sees the
    /// `W` latest positions, itself included (`i - j < W`); `None`: every
    /// earlier position.
    pub sliding_window: Option<i64>,
    /// Learned attention sinks (gpt-oss): a parameter `sinks [H]`, one logit
    /// per query head that joins the softmax's denominator and takes weight
    /// from the keys without adding a value.
    pub attention_sinks: bool,
    /// How the projection (and filter convolution) weights are drawn.
    pub init: WeightInit,
}

impl Default for GqaConfig {
    /// A small layer: C = 64, 4 query heads of width 16 sharing 2 key/value
    /// heads, 256 positions, RoPE base 10000 without scaling, no bias, no
    /// QK-norm.
    fn default() -> Self {
        GqaConfig {
            hidden_size: 64,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: None,
            max_position_embeddings: 256,
            rope_theta: 10000.0,
            rope_scaling: None,
            partial_rotary_factor: 1.0,
            attention_bias: false,
            o_proj_bias: false,
            qk_norm: QkNorm::None,
            use_rope: true,
            rope_interleave: false,
            attention_chunk_size: None,
            attn_temperature_tuning: None,
            rms_norm_eps: 1e-6,
            attention_dropout: 0.0,
            localized_filtering: false,
            sliding_window: None,
            attention_sinks: false,
            init: WeightInit::default(),
        }
    }
}

impl moe_core::Validate for GqaConfig {
    fn validate(&self) -> Result<()> {
        GqaConfig::validate(self)
    }
}

impl GqaConfig {
    /// Checks the sizes and ranges; every constructor calls it.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim.unwrap_or(1)),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, value)) = sizes.iter().find(|(_, v)| *v <= 0) {
            return Err(MoeError::config(format!(
                "{name} must be positive, got {value}"
            )));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(MoeError::config(format!(
                "num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.num_key_value_heads, self.num_attention_heads
            )));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(MoeError::config(format!(
                "hidden_size ({}) must be divisible by num_attention_heads ({}) when head_dim \
                 is not given",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(MoeError::config(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim()
            )));
        }
        let rotary = self.rotary_dim();
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0)
            || rotary <= 0
            || rotary % 2 != 0
        {
            return Err(MoeError::config(format!(
                "partial_rotary_factor ({}) must be in (0, 1] and turn an even, positive number \
                 of the head's {} dimensions (got {rotary})",
                self.partial_rotary_factor,
                self.head_dim()
            )));
        }
        check_rope_norm_dropout(
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rms_norm_eps,
            self.attention_dropout,
        )?;
        if let Some(w) = self.sliding_window.filter(|&w| w < 1) {
            return Err(MoeError::config(format!(
                "sliding_window must be at least 1 (a query sees itself), got {w}"
            )));
        }
        if let Some(c) = self.attention_chunk_size.filter(|&c| c < 1) {
            return Err(MoeError::config(format!(
                "attention_chunk_size must be at least 1 (a query sees itself), got {c}"
            )));
        }
        if self.sliding_window.is_some() && self.attention_chunk_size.is_some() {
            return Err(MoeError::config(
                "a layer has a sliding window or chunked attention, not both",
            ));
        }
        if self.rope_interleave && rotary != self.head_dim() {
            return Err(MoeError::config(format!(
                "rope_interleave turns whole heads: partial_rotary_factor must be 1, got {}",
                self.partial_rotary_factor
            )));
        }
        if let Some(t) = self.attn_temperature_tuning {
            if !(t.floor_scale > 0.0 && t.floor_scale.is_finite() && t.attn_scale.is_finite()) {
                return Err(MoeError::config(format!(
                    "attention temperature tuning needs a finite floor_scale > 0 and a finite \
                     attn_scale, got floor_scale = {} and attn_scale = {}",
                    t.floor_scale, t.attn_scale
                )));
            }
        }
        if self.localized_filtering && self.hidden_size % 2 != 0 {
            return Err(MoeError::config(format!(
                "localized filtering needs an even hidden_size, got {}",
                self.hidden_size
            )));
        }
        Ok(())
    }

    /// Width of a head: `head_dim`, or `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The dimensions of a head RoPE turns: `floor(head_dim *
    /// partial_rotary_factor)` (transformers' `int(...)`).
    pub fn rotary_dim(&self) -> i64 {
        (self.head_dim() as f64 * self.partial_rotary_factor).floor() as i64
    }

    /// Query heads per key/value head, `H / H_kv`.
    pub fn num_key_value_groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// The score scale `head_dim^-0.5`.
    pub fn scale_factor(&self) -> f64 {
        (self.head_dim() as f64).powf(-0.5)
    }

    /// Bytes a [`crate::KvCache`] of this layer holds per token:
    /// `2 * num_key_value_heads * head_dim * dtype_bytes` (a key and a value
    /// per key/value head; `dtype_bytes` is 2 for bf16, 4 for f32).
    ///
    /// In bf16: Mixtral 8x7B (8 key/value heads of 128) 4,096 bytes per token
    /// and layer; DeepSeek-V3's 128 heads of 128 as multi-head attention
    /// would take 65,536, 57 times what its Multi-head Latent Attention
    /// caches ([`crate::MlaConfig::kv_cache_bytes_per_token`]: 1,152).
    pub fn kv_cache_bytes_per_token(&self, dtype_bytes: i64) -> i64 {
        2 * self.num_key_value_heads * self.head_dim() * dtype_bytes
    }
}
