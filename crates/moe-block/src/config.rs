use moe_core::{MoeError, Result, WeightInit};
use moe_dispatch::DispatchKind;
use moe_experts::{Activation, ExpertConfig};
use moe_routers::{RouterConfig, RouterKind};
use serde::{Deserialize, Serialize};

/// Configuration of a [`crate::SparseMoe`] layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SparseMoeConfig {
    /// Token width `d`.
    pub n_embd: i64,
    /// Number of experts `E`.
    pub num_experts: i64,
    /// Experts per token `k`.
    pub top_k: i64,
    /// Hidden width of each expert; makeMoE uses `4 d`.
    pub expert_hidden: i64,
    /// Dropout on expert outputs.
    pub dropout: f64,
    /// The experts' non-linearity (ReLU in makeMoE).
    pub activation: Activation,
    pub router: RouterKind,
    /// Noisy router only: add noise outside training too (makeMoE).
    pub router_noise_at_eval: bool,
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
            dropout: 0.1,
            activation: Activation::default(),
            router: RouterKind::default(),
            router_noise_at_eval: false,
            dispatch: DispatchKind::default(),
            init: WeightInit::default(),
        }
    }
}

impl SparseMoeConfig {
    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            kind: self.router,
            input_dim: self.n_embd,
            num_experts: self.num_experts,
            top_k: self.top_k,
            noise_at_eval: self.router_noise_at_eval,
            init: self.init,
        }
    }

    pub fn expert_config(&self) -> ExpertConfig {
        ExpertConfig {
            num_experts: self.num_experts,
            input_dim: self.n_embd,
            hidden_dim: self.expert_hidden,
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
        self.router_config().validate()?;
        self.dispatch.validate()?;
        self.expert_config().validate()
    }

    /// Parameters of the layer: experts plus router.
    pub fn total_params(&self) -> i64 {
        let router_linears = match self.router {
            RouterKind::TopK => 1,
            RouterKind::NoisyTopK => 2,
        };
        self.num_experts * self.expert_config().params_per_expert()
            + router_linears * (self.n_embd * self.num_experts + self.num_experts)
    }

    /// Parameters a token passes through: `k` experts plus the router.
    pub fn active_params(&self) -> i64 {
        self.total_params()
            - (self.num_experts - self.top_k) * self.expert_config().params_per_expert()
    }
}
