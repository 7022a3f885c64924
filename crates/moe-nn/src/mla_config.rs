use crate::rope_scaling::check_rope_norm_dropout;
use crate::RopeScaling;
use moe_core::{MoeError, Result, WeightInit};
use serde::{Deserialize, Serialize};

/// Configuration of a [`crate::MultiHeadLatentAttention`] layer, with the
/// field names of Hugging Face's `DeepseekV3Config` (and `DeepseekV2Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MlaConfig {
    /// Model width `C`.
    pub hidden_size: i64,
    /// Number of heads `H` (queries, keys and values alike).
    pub num_attention_heads: i64,
    /// Rank of the low-rank query projection `q_a_proj: C -> q_lora_rank`,
    /// `q_b_proj: q_lora_rank -> H (d_n + d_r)`; `None`: one `q_proj`
    /// (DeepSeek-V2-Lite).
    pub q_lora_rank: Option<i64>,
    /// Width `r` of the key/value latent `c_kv`, what the cache holds.
    pub kv_lora_rank: i64,
    /// Width `d_n` of the query/key part without RoPE, per head (may be 0).
    pub qk_nope_head_dim: i64,
    /// Width `d_r` of the rotated query/key part (even), per head; the RoPE
    /// key is one head shared by all.
    pub qk_rope_head_dim: i64,
    /// Width `d_v` of a value head.
    pub v_head_dim: i64,
    /// Longest sequence (prompt and generated positions) the layer accepts;
    /// the length of its RoPE tables.
    pub max_position_embeddings: i64,
    /// RoPE base `theta`.
    pub rope_theta: f64,
    /// RoPE scaling (Hugging Face's `rope_scaling`; `None`: plain RoPE).
    /// DeepSeek-V3 uses YaRN, whose `mscale_all_dim` also scales the softmax
    /// ([`MlaConfig::softmax_scale`]). Reads `null` and `{"rope_type":
    /// "default"}` as `None`.
    #[serde(deserialize_with = "RopeScaling::deserialize_option")]
    pub rope_scaling: Option<RopeScaling>,
    /// Whether RoPE rotates interleaved pairs `(2i, 2i + 1)`
    /// ([`crate::Rope::apply_interleaved`]) rather than halves `(i, i +
    /// d_r / 2)`: Hugging Face's `DeepseekV3Config.rope_interleave`, true by
    /// default there (DeepSeek's checkpoints) and here.
    pub rope_interleave: bool,
    /// `eps` of `q_a_layernorm` and `kv_a_layernorm`. Hugging Face's
    /// `DeepseekV3Attention` (transformers 5.23) builds both with
    /// `DeepseekV3RMSNorm`'s default `eps = 1e-6`, not the config's
    /// `rms_norm_eps`; the default here is that 1e-6. DeepSeek-V2/V3's
    /// configs have `rms_norm_eps = 1e-6`, so passing it gives the same
    /// numbers for them; for another value, pass 1e-6 to match Hugging Face.
    pub rms_norm_eps: f64,
    /// Bias on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj`, as Hugging
    /// Face's `attention_bias` (`q_proj`, `q_b_proj`, `kv_b_proj` never have
    /// one).
    pub attention_bias: bool,
    /// Dropout on the attention weights in training.
    pub attention_dropout: f64,
    /// How the projection weights are drawn.
    pub init: WeightInit,
}

impl Default for MlaConfig {
    /// A small layer: C = 64, 4 heads, q_lora_rank 32, kv_lora_rank 32,
    /// d_n = 16, d_r = 8, d_v = 16, 256 positions, RoPE base 10000 without
    /// scaling, interleaved, no bias.
    fn default() -> Self {
        MlaConfig {
            hidden_size: 64,
            num_attention_heads: 4,
            q_lora_rank: Some(32),
            kv_lora_rank: 32,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            max_position_embeddings: 256,
            rope_theta: 10000.0,
            rope_scaling: None,
            rope_interleave: true,
            rms_norm_eps: 1e-6,
            attention_bias: false,
            attention_dropout: 0.0,
            init: WeightInit::default(),
        }
    }
}

impl moe_core::Validate for MlaConfig {
    fn validate(&self) -> Result<()> {
        MlaConfig::validate(self)
    }
}

impl MlaConfig {
    /// DeepSeek-V3's (and R1's) attention, from its `config.json`: C = 7168,
    /// 128 heads, q_lora_rank 1536, kv_lora_rank 512, d_n = 128, d_r = 64,
    /// d_v = 128, 163,840 positions, RoPE base 10000 with YaRN (factor 40
    /// over 4096 positions, `mscale = mscale_all_dim = 1`), interleaved.
    pub fn deepseek_v3() -> Self {
        MlaConfig {
            hidden_size: 7168,
            num_attention_heads: 128,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            max_position_embeddings: 163_840,
            rope_theta: 10000.0,
            rope_scaling: Some(RopeScaling::Yarn {
                factor: 40.0,
                original_max_position_embeddings: Some(4096),
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: Some(1.0),
                attention_factor: None,
                truncate: true,
            }),
            rope_interleave: true,
            rms_norm_eps: 1e-6,
            attention_bias: false,
            attention_dropout: 0.0,
            init: WeightInit::default(),
        }
    }

    /// Checks the sizes and ranges; every constructor calls it.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(1)),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, value)) = sizes.iter().find(|(_, v)| *v <= 0) {
            return Err(MoeError::config(format!(
                "{name} must be positive, got {value}"
            )));
        }
        if self.qk_nope_head_dim < 0 {
            return Err(MoeError::config(format!(
                "qk_nope_head_dim must be non-negative, got {}",
                self.qk_nope_head_dim
            )));
        }
        if self.qk_rope_head_dim % 2 != 0 {
            return Err(MoeError::config(format!(
                "qk_rope_head_dim ({}) must be even for RoPE",
                self.qk_rope_head_dim
            )));
        }
        check_rope_norm_dropout(
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rms_norm_eps,
            self.attention_dropout,
        )?;
        Ok(())
    }

    /// Width of a query/key head, `d_n + d_r` (Hugging Face's
    /// `qk_head_dim`).
    pub fn qk_head_dim(&self) -> i64 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The score scale: `qk_head_dim^-0.5`, times
    /// `(0.1 mscale_all_dim ln(factor) + 1)^2` with YaRN scaling whose
    /// `mscale_all_dim` is non-zero ([`RopeScaling::softmax_scale_multiplier`];
    /// Hugging Face's `yarn_apply_mscale` in `modeling_deepseek_v3.py`).
    /// DeepSeek-V3: `192^-0.5 (0.1 ln 40 + 1)^2 = 0.1352`.
    pub fn softmax_scale(&self) -> f64 {
        let multiplier = self
            .rope_scaling
            .as_ref()
            .map_or(1.0, RopeScaling::softmax_scale_multiplier);
        (self.qk_head_dim() as f64).powf(-0.5) * multiplier
    }

    /// Bytes a [`crate::KvCache`] of this layer holds per token:
    /// `(kv_lora_rank + qk_rope_head_dim) * dtype_bytes` (the normalised
    /// latent and the shared RoPE key; `dtype_bytes` is 2 for bf16, 4 for
    /// f32), whatever the number of heads.
    ///
    /// DeepSeek-V3 in bf16 ([`MlaConfig::deepseek_v3`]): `(512 + 64) * 2 =
    /// 1,152` bytes per token and layer, 70,272 bytes (68.6 KiB) per token
    /// over its 61 layers, 8.6 GiB for a 131,072-token context. Its 128
    /// heads as multi-head attention with 128-wide keys and values
    /// ([`crate::GqaConfig::kv_cache_bytes_per_token`]: `2 * 128 * 128 * 2`)
    /// would take 65,536 bytes per token and layer, 56.9 times more (488 GiB
    /// for that context); the expanded keys (192 wide) and values (128 wide)
    /// that transformers 4.x cached for it, `128 * (192 + 128) * 2 = 81,920`,
    /// 71.1 times more.
    pub fn kv_cache_bytes_per_token(&self, dtype_bytes: i64) -> i64 {
        (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
    }
}
