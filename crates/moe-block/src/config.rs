use moe_core::{MoeError, Result, WeightInit};
use moe_dispatch::DispatchKind;
use moe_experts::{Activation, ExpertConfig};
use moe_routers::{BalanceLossConfig, RouterConfig, RouterKind};
use serde::{Deserialize, Serialize};

/// Configuration of a [`crate::SparseMoe`] layer.
///
/// Sizes follow DeepSeekMoE (arXiv 2401.06066, §3): `num_experts` (`N`)
/// experts of hidden width `expert_hidden`, `top_k` (`K`) active, each split
/// into `segments` (`m`) fine-grained experts of width `expert_hidden / m`,
/// giving `m N` experts of which `m K` are active. `shared_experts` (`K_s`)
/// of them are taken out of the router: every token passes through them,
/// and the router chooses `m K - K_s` of the other `m N - K_s`. Active
/// parameters are the same for any `m` and `K_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SparseMoeConfig {
    /// Token width `d`.
    pub n_embd: i64,
    /// Number of experts `N` before segmentation.
    pub num_experts: i64,
    /// Experts per token `K` before segmentation.
    pub top_k: i64,
    /// Hidden width of each expert before segmentation; makeMoE uses `4 d`.
    pub expert_hidden: i64,
    /// Fine-grained segmentation factor `m` (1: none).
    pub segments: i64,
    /// Shared experts `K_s`, counted among the `m N` fine-grained experts.
    pub shared_experts: i64,
    /// Dropout on expert outputs.
    pub dropout: f64,
    /// The experts' non-linearity (ReLU in makeMoE).
    pub activation: Activation,
    pub router: RouterKind,
    /// Noisy router only: add noise outside training too (makeMoE).
    pub router_noise_at_eval: bool,
    /// DeepSeekMoE router only: renormalise the chosen probabilities.
    pub norm_topk_prob: bool,
    /// Sigmoid aux-free router only: bias update speed `gamma`.
    pub bias_update_rate: f64,
    /// Expert capacity factor (`None`: no limit).
    pub capacity_factor: Option<f64>,
    /// Balance losses the layer returns (none by default, as makeMoE).
    pub balance: BalanceLossConfig,
    pub dispatch: DispatchKind,
    pub init: WeightInit,
}

impl Default for SparseMoeConfig {
    /// makeMoE's layer: d = 128, 8 experts of hidden 512, noisy top-2, dropout 0.1.
    fn default() -> Self {
        SparseMoeConfig {
            n_embd: 128,
            num_experts: 8,
            top_k: 2,
            expert_hidden: 512,
            segments: 1,
            shared_experts: 0,
            dropout: 0.1,
            activation: Activation::default(),
            router: RouterKind::default(),
            router_noise_at_eval: false,
            norm_topk_prob: false,
            bias_update_rate: 1e-3,
            capacity_factor: None,
            balance: BalanceLossConfig::default(),
            dispatch: DispatchKind::default(),
            init: WeightInit::default(),
        }
    }
}

impl SparseMoeConfig {
    /// Experts the router chooses from: `m N - K_s`.
    pub fn routed_experts(&self) -> i64 {
        self.segments * self.num_experts - self.shared_experts
    }

    /// Experts the router chooses per token: `m K - K_s`.
    pub fn routed_top_k(&self) -> i64 {
        self.segments * self.top_k - self.shared_experts
    }

    /// Hidden width of each (fine-grained) expert: `expert_hidden / m`.
    pub fn fine_expert_hidden(&self) -> i64 {
        self.expert_hidden / self.segments.max(1)
    }

    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            kind: self.router,
            input_dim: self.n_embd,
            num_experts: self.routed_experts(),
            top_k: self.routed_top_k(),
            noise_at_eval: self.router_noise_at_eval,
            norm_topk_prob: self.norm_topk_prob,
            bias_update_rate: self.bias_update_rate,
            capacity_factor: self.capacity_factor,
            init: self.init,
        }
    }

    /// The routed experts' bank.
    pub fn expert_config(&self) -> ExpertConfig {
        self.bank_config(self.routed_experts())
    }

    /// The shared experts' bank (`None` without shared experts).
    pub fn shared_expert_config(&self) -> Option<ExpertConfig> {
        (self.shared_experts > 0).then(|| self.bank_config(self.shared_experts))
    }

    fn bank_config(&self, num_experts: i64) -> ExpertConfig {
        ExpertConfig {
            num_experts,
            input_dim: self.n_embd,
            hidden_dim: self.fine_expert_hidden(),
            dropout: self.dropout,
            activation: self.activation,
            init: self.init,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_embd <= 0 {
            return Err(MoeError::config(format!(
                "n_embd must be positive, got {}",
                self.n_embd
            )));
        }
        if self.num_experts < 1 || self.top_k < 1 || self.top_k > self.num_experts {
            return Err(MoeError::config(format!(
                "top_k must be in 1..=num_experts, got top_k = {} with num_experts = {}",
                self.top_k, self.num_experts
            )));
        }
        if self.segments < 1 || self.expert_hidden % self.segments != 0 {
            return Err(MoeError::config(format!(
                "segments (m = {}) must be at least 1 and divide expert_hidden ({})",
                self.segments, self.expert_hidden
            )));
        }
        let active = self.segments * self.top_k;
        if self.shared_experts < 0 || self.shared_experts >= active {
            return Err(MoeError::config(format!(
                "shared_experts must be in 0..{active} (fewer than the m K = {active} active \
                 fine-grained experts, so that the router still chooses one), got {}",
                self.shared_experts
            )));
        }
        self.router_config().validate()?;
        self.dispatch.validate()?;
        self.expert_config().validate()?;
        self.balance.validate(self.routed_experts())
    }

    /// Trainable parameters of the layer: routed and shared experts plus the router.
    pub fn total_params(&self) -> i64 {
        let per_expert = self.expert_config().params_per_expert();
        (self.routed_experts() + self.shared_experts) * per_expert
            + self.router_config().num_params()
    }

    /// Parameters a token passes through: the `m K - K_s` chosen experts,
    /// the `K_s` shared ones and the router.
    pub fn active_params(&self) -> i64 {
        let per_expert = self.expert_config().params_per_expert();
        (self.routed_top_k() + self.shared_experts) * per_expert + self.router_config().num_params()
    }
}
