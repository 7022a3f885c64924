use moe_core::{MoeError, Result, WeightInit};
use serde::{Deserialize, Serialize};

/// Which implementation computes attention. Both give the same outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AttentionPath {
    /// One fused qkv projection and `scaled_dot_product_attention`.
    #[default]
    Fused,
    /// makeMoE's loop over heads with an explicit causal mask.
    PerHead,
}

/// The factor the scores `q k^T` are multiplied by before the softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AttentionScale {
    /// `head_size^-0.5`, the textbook scaled dot product.
    #[default]
    HeadSize,
    /// `n_embd^-0.5`: makeMoE's `Head` scales by `C**-0.5` with `C` the
    /// embedding width, a quirk kept by its preset to reproduce its numbers.
    Embedding,
}

/// Configuration of a [`crate::CausalSelfAttention`] layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttentionConfig {
    /// Model width `C`.
    pub n_embd: i64,
    /// Number of heads `H`; `C` must be a multiple of it.
    pub n_head: i64,
    /// Longest sequence the layer accepts.
    pub block_size: i64,
    /// Dropout on the attention weights and on the output projection.
    pub dropout: f64,
    /// Which implementation computes attention.
    pub path: AttentionPath,
    /// How scores are scaled before the softmax.
    pub scale: AttentionScale,
    /// How the projections are drawn.
    pub init: WeightInit,
}

impl Default for AttentionConfig {
    /// makeMoE's sizes: C = 128, 8 heads, context 32, dropout 0.1.
    fn default() -> Self {
        AttentionConfig {
            n_embd: 128,
            n_head: 8,
            block_size: 32,
            dropout: 0.1,
            path: AttentionPath::default(),
            scale: AttentionScale::default(),
            init: WeightInit::default(),
        }
    }
}

impl moe_core::Validate for AttentionConfig {
    fn validate(&self) -> Result<()> {
        AttentionConfig::validate(self)
    }
}

impl AttentionConfig {
    /// Checks the sizes; every constructor calls it.
    pub fn validate(&self) -> Result<()> {
        if self.n_embd <= 0 || self.n_head <= 0 || self.block_size <= 0 {
            return Err(MoeError::config(format!(
                "n_embd ({}), n_head ({}) and block_size ({}) must all be positive",
                self.n_embd, self.n_head, self.block_size
            )));
        }
        if self.n_embd % self.n_head != 0 {
            return Err(MoeError::config(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(MoeError::config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// Width of one head, `C / H`.
    pub fn head_size(&self) -> i64 {
        self.n_embd / self.n_head
    }

    /// The score scale as a number.
    pub fn scale_factor(&self) -> f64 {
        let d = match self.scale {
            AttentionScale::HeadSize => self.head_size(),
            AttentionScale::Embedding => self.n_embd,
        };
        (d as f64).powf(-0.5)
    }
}
