use crate::{
    AttentionRouter, AuxFreeSigmoidRouter, CapacityLimited, DeepSeekMoeRouter, NoisyTopKRouter,
    Router, TopKRouter,
};
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
    /// Yuan 2.0-M32's attention router: experts attend to each other.
    Attention,
    /// DeepSeekMoE: softmax over all experts, then top-k of the probabilities.
    DeepSeekMoe,
    /// DeepSeek-V3: sigmoid affinities, a balancing bias for selection only.
    SigmoidAuxFree,
}

impl RouterKind {
    /// Every kind, in the order of the comparison table.
    pub const ALL: [RouterKind; 5] = [
        RouterKind::TopK,
        RouterKind::NoisyTopK,
        RouterKind::Attention,
        RouterKind::DeepSeekMoe,
        RouterKind::SigmoidAuxFree,
    ];
}

impl std::str::FromStr for RouterKind {
    type Err = MoeError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "top_k" | "topk" => Ok(RouterKind::TopK),
            "noisy_top_k" | "noisy" => Ok(RouterKind::NoisyTopK),
            "attention" => Ok(RouterKind::Attention),
            "deepseek_moe" | "deepseek" => Ok(RouterKind::DeepSeekMoe),
            "sigmoid_aux_free" | "aux_free" => Ok(RouterKind::SigmoidAuxFree),
            other => Err(MoeError::config(format!(
                "unknown router `{other}`: expected top_k, noisy_top_k, attention, \
                 deepseek_moe or sigmoid_aux_free"
            ))),
        }
    }
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
    /// DeepSeekMoE only: renormalise the `k` selected probabilities to sum
    /// to 1 (`norm_topk_prob` of the reference code; off in the paper).
    pub norm_topk_prob: bool,
    /// Sigmoid aux-free only: `gamma`, the bias update speed (DeepSeek-V3: 1e-3).
    pub bias_update_rate: f64,
    /// Expert capacity factor: each expert keeps at most
    /// `floor(N k / E * factor)` slots per batch (Switch Transformer). `None`: no limit.
    pub capacity_factor: Option<f64>,
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
            norm_topk_prob: false,
            bias_update_rate: 1e-3,
            capacity_factor: None,
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
        if !(self.bias_update_rate >= 0.0 && self.bias_update_rate.is_finite()) {
            return Err(MoeError::config(format!(
                "bias_update_rate must be a finite number >= 0, got {}",
                self.bias_update_rate
            )));
        }
        if let Some(factor) = self.capacity_factor {
            if !(factor > 0.0 && factor.is_finite()) {
                return Err(MoeError::config(format!(
                    "capacity_factor must be a positive number, got {factor}"
                )));
            }
        }
        Ok(())
    }

    /// Builds the configured router under `p`, wrapped in a capacity limit
    /// when `capacity_factor` is set.
    pub fn build(&self, p: &nn::Path) -> Result<Box<dyn Router>> {
        let router: Box<dyn Router> = match self.kind {
            RouterKind::TopK => Box::new(TopKRouter::new(p, self)?),
            RouterKind::NoisyTopK => Box::new(NoisyTopKRouter::new(p, self)?),
            RouterKind::Attention => Box::new(AttentionRouter::new(p, self)?),
            RouterKind::DeepSeekMoe => Box::new(DeepSeekMoeRouter::new(p, self)?),
            RouterKind::SigmoidAuxFree => Box::new(AuxFreeSigmoidRouter::new(p, self)?),
        };
        Ok(match self.capacity_factor {
            Some(factor) => Box::new(CapacityLimited::new(router, factor)?),
            None => router,
        })
    }

    /// Trainable parameters of the router: `E (d + 1)` per linear gate with
    /// bias, `E d` per gate without (the balancing bias is not trained).
    pub fn num_params(&self) -> i64 {
        let (d, e) = (self.input_dim, self.num_experts);
        match self.kind {
            RouterKind::TopK => e * (d + 1),
            RouterKind::NoisyTopK => 2 * e * (d + 1),
            RouterKind::Attention => 3 * e * d,
            RouterKind::DeepSeekMoe | RouterKind::SigmoidAuxFree => e * d,
        }
    }
}
