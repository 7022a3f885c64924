use crate::{NoisyTopKRouter, Router, TopKRouter};
use moe_core::{MoeError, Result, WeightInit};
use serde::{Deserialize, Serialize};
use tch::nn;

/// Which router a MoE layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    /// Softmax over the k largest logits (Mixtral).
    TopK,
    /// Logits plus learned-scale Gaussian noise, then top-k (makeMoE).
    #[default]
    NoisyTopK,
}

/// Configuration of a router.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    pub kind: RouterKind,
    /// Token width `d`.
    pub input_dim: i64,
    /// Number of experts `E`.
    pub num_experts: i64,
    /// Experts per token `k`, `1 <= k <= E`.
    pub top_k: i64,
    /// Noisy top-k only: also add noise outside training. makeMoE does (its
    /// router has no notion of mode); the textbook router does not.
    pub noise_at_eval: bool,
    pub init: WeightInit,
}

impl Default for RouterConfig {
    /// makeMoE's router: noisy top-2 of 8 experts over 128-wide tokens.
    fn default() -> Self {
        RouterConfig {
            kind: RouterKind::default(),
            input_dim: 128,
            num_experts: 8,
            top_k: 2,
            noise_at_eval: false,
            init: WeightInit::default(),
        }
    }
}

impl RouterConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_experts <= 0 {
            return Err(MoeError::config(format!(
                "num_experts must be at least 1, got {}",
                self.num_experts
            )));
        }
        if self.top_k < 1 || self.top_k > self.num_experts {
            return Err(MoeError::config(format!(
                "top_k must be in 1..={} (num_experts), got {}",
                self.num_experts, self.top_k
            )));
        }
        if self.input_dim <= 0 {
            return Err(MoeError::config(format!(
                "router input_dim must be positive, got {}",
                self.input_dim
            )));
        }
        Ok(())
    }

    /// Builds the configured router under `p`.
    pub fn build(&self, p: &nn::Path) -> Result<Box<dyn Router>> {
        Ok(match self.kind {
            RouterKind::TopK => Box::new(TopKRouter::new(p, self)?),
            RouterKind::NoisyTopK => Box::new(NoisyTopKRouter::new(p, self)?),
        })
    }
}
