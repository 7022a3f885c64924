use moe_core::{MoeError, Result, WeightInit};
use moe_dispatch::DispatchKind;
use moe_experts::{Activation, ExpertConfig};
use moe_routers::{check_top_k, BalanceLossConfig, RouterConfig, RouterDims};
use serde::{Deserialize, Serialize};

/// Experts outside the router that every token passes through with weight 1
/// (DeepSeekMoE's shared-expert isolation, arXiv 2401.06066, §3.2, eq. 9-11;
/// Qwen2-MoE's shared expert, HF `Qwen2MoeSparseMoeBlock`):
///
/// `y_shared(x) = sum_{s < num_experts} FFN^shared_s(x)`, multiplied by
/// `sigmoid(x w_g)` when `sigmoid_gate` (Qwen2-MoE; `w_g` a
/// `Linear(n_embd, 1)` without bias at `p/shared_expert_gate`).
///
/// The shared experts have the routed experts' activation, bias setting and
/// dropout, and their own width `hidden`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SharedExperts {
    /// Shared experts `K_s >= 1`.
    pub num_experts: i64,
    /// Hidden width of each shared expert (`>= 1`).
    pub hidden: i64,
    /// Scale the shared output by a learned per-token sigmoid gate (Qwen2-MoE).
    pub sigmoid_gate: bool,
}

impl Default for SharedExperts {
    /// One shared expert of makeMoE's expert width (512), without gate.
    fn default() -> Self {
        SharedExperts {
            num_experts: 1,
            hidden: 512,
            sigmoid_gate: false,
        }
    }
}

impl SharedExperts {
    /// `num_experts >= 1`, `hidden >= 1`.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts < 1 || self.hidden < 1 {
            return Err(MoeError::config(format!(
                "shared experts need num_experts >= 1 and hidden >= 1 (use no shared experts \
                 instead of zero), got num_experts = {} and hidden = {}",
                self.num_experts, self.hidden
            )));
        }
        Ok(())
    }
}

/// DeepSeekMoE's fine-grained expert layout (arXiv 2401.06066, §3.1-3.2),
/// written in terms of the coarse layer it refines: `num_experts` (`N`)
/// experts of hidden width `expert_hidden` (`h`), `top_k` (`K`) active,
/// each split into `segments` (`m`) experts of width `h / m`, giving `m N`
/// experts of which `m K` are active; `shared_experts` (`K_s`) of them are
/// taken out of the router:
///
/// routed `E = m N - K_s`, routed `k = m K - K_s`, width `h / m`, shared
/// `{ K_s, h / m, no gate }`.
///
/// Active parameters are those of the coarse top-`K` layer for any `m` and
/// `K_s` (up to the per-expert biases). [`SparseMoeConfig::fine_grained`]
/// applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FineGrained {
    /// `N`, experts before segmentation.
    pub num_experts: i64,
    /// `K`, experts per token before segmentation.
    pub top_k: i64,
    /// `h`, hidden width of an expert before segmentation.
    pub expert_hidden: i64,
    /// `m >= 1` dividing `h` (1: no segmentation).
    pub segments: i64,
    /// `K_s`, in `0..m K` so that the router still chooses one expert.
    pub shared_experts: i64,
}

impl Default for FineGrained {
    /// makeMoE's layer, not refined: 8 experts of hidden 512, top-2, `m = 1`,
    /// no shared expert.
    fn default() -> Self {
        FineGrained {
            num_experts: 8,
            top_k: 2,
            expert_hidden: 512,
            segments: 1,
            shared_experts: 0,
        }
    }
}

impl FineGrained {
    /// `1 <= K <= N`, `m >= 1` dividing `h`, `0 <= K_s < m K`.
    pub fn validate(&self) -> Result<()> {
        check_top_k(self.num_experts, self.top_k)?;
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
        Ok(())
    }
}

/// Configuration of a [`crate::SparseMoe`] layer:
///
/// `y(x) = sum_{e in TopK(x)} g_e(x) FFN_e(x) + [sigmoid(x w_g)] sum_s FFN^shared_s(x)`
///
/// with `num_experts` (`E`) routed experts of width `expert_hidden`, `top_k`
/// (`k`) of them chosen per token by the router, and optional
/// [`SharedExperts`]. DeepSeekMoE's fine-grained layout is a way to choose
/// these sizes ([`FineGrained`], [`SparseMoeConfig::fine_grained`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SparseMoeConfig {
    /// Token width `d`.
    pub n_embd: i64,
    /// Routed experts `E`.
    pub num_experts: i64,
    /// Routed experts per token `k`.
    pub top_k: i64,
    /// Hidden width of each routed expert; makeMoE uses `4 d`.
    pub expert_hidden: i64,
    /// Experts every token passes through (none by default).
    pub shared_experts: Option<SharedExperts>,
    /// Dropout on expert outputs.
    pub dropout: f64,
    /// The experts' non-linearity (ReLU in makeMoE).
    pub activation: Activation,
    /// Whether the experts (routed and shared) have biases.
    pub expert_bias: bool,
    /// The router's settings (its sizes are `n_embd`, `num_experts`, `top_k`).
    pub router: RouterConfig,
    /// Balance losses the layer returns (none by default, as makeMoE).
    pub balance: BalanceLossConfig,
    /// How routed tokens reach their experts.
    pub dispatch: DispatchKind,
    /// How the weights are drawn.
    pub init: WeightInit,
}

impl Default for SparseMoeConfig {
    /// makeMoE's layer: d = 128, 8 experts of hidden 512 with biases, noisy
    /// top-2, dropout 0.1.
    fn default() -> Self {
        SparseMoeConfig {
            n_embd: 128,
            num_experts: 8,
            top_k: 2,
            expert_hidden: 512,
            shared_experts: None,
            dropout: 0.1,
            activation: Activation::default(),
            expert_bias: true,
            router: RouterConfig::default(),
            balance: BalanceLossConfig::default(),
            dispatch: DispatchKind::default(),
            init: WeightInit::default(),
        }
    }
}

impl moe_core::Validate for SparseMoeConfig {
    fn validate(&self) -> Result<()> {
        SparseMoeConfig::validate(self)
    }
}

impl SparseMoeConfig {
    /// `self` with the sizes of DeepSeekMoE's fine-grained `layout`: routed
    /// `E = m N - K_s` experts of width `h / m`, `k = m K - K_s`, and `K_s`
    /// shared experts of width `h / m` without gate (none when `K_s = 0`).
    pub fn fine_grained(self, layout: FineGrained) -> Result<Self> {
        layout.validate()?;
        let m = layout.segments;
        let hidden = layout.expert_hidden / m;
        Ok(SparseMoeConfig {
            num_experts: m * layout.num_experts - layout.shared_experts,
            top_k: m * layout.top_k - layout.shared_experts,
            expert_hidden: hidden,
            shared_experts: (layout.shared_experts > 0).then_some(SharedExperts {
                num_experts: layout.shared_experts,
                hidden,
                sigmoid_gate: false,
            }),
            ..self
        })
    }

    /// The router's sizes: `d = n_embd`, `E = num_experts`, `k = top_k`.
    pub fn router_dims(&self) -> RouterDims {
        RouterDims {
            input_dim: self.n_embd,
            num_experts: self.num_experts,
            top_k: self.top_k,
        }
    }

    /// The routed experts' bank.
    pub fn expert_config(&self) -> ExpertConfig {
        self.bank_config(self.num_experts, self.expert_hidden)
    }

    /// The shared experts' bank (`None` without shared experts).
    pub fn shared_expert_config(&self) -> Option<ExpertConfig> {
        self.shared_experts
            .map(|s| self.bank_config(s.num_experts, s.hidden))
    }

    fn bank_config(&self, num_experts: i64, hidden_dim: i64) -> ExpertConfig {
        ExpertConfig {
            num_experts,
            input_dim: self.n_embd,
            hidden_dim,
            dropout: self.dropout,
            activation: self.activation,
            bias: self.expert_bias,
            init: self.init,
        }
    }

    /// Sizes, shared experts, the capacity dispatch's need of a capacity
    /// factor (a token-choice gate's; expert choice has its own), the router's settings for its sizes (`1 <= top_k <=
    /// num_experts` among them), experts and balance losses.
    pub fn validate(&self) -> Result<()> {
        if self.n_embd <= 0 {
            return Err(MoeError::config(format!(
                "n_embd must be positive, got {}",
                self.n_embd
            )));
        }
        if let Some(shared) = &self.shared_experts {
            shared.validate()?;
        }
        if self.dispatch == DispatchKind::Capacity
            && self.router.capacity_factor.is_none()
            && self.router.gate.is_token_choice()
        {
            return Err(MoeError::config(
                "dispatch `capacity` needs router.capacity_factor (the one capacity setting: \
                 the router marks the dropped slots and the strategy sizes its buffers from \
                 them); set it, e.g. to 1.25, or choose a dropless dispatch",
            ));
        }
        self.router.validate(self.router_dims())?;
        self.expert_config().validate()?;
        self.balance.validate(self.num_experts)
    }

    /// Parameters of the shared experts and their gate (0 without them).
    fn shared_params(&self) -> i64 {
        self.shared_experts.map_or(0, |s| {
            let bank = self.bank_config(s.num_experts, s.hidden);
            s.num_experts * bank.params_per_expert() + i64::from(s.sigmoid_gate) * self.n_embd
        })
    }

    /// Trainable parameters of the layer: routed experts, shared experts
    /// and their gate, router.
    pub fn total_params(&self) -> i64 {
        self.num_experts * self.expert_config().params_per_expert()
            + self.shared_params()
            + self.router.num_params(self.router_dims())
    }

    /// Parameters a token passes through: the `k` chosen experts, the
    /// shared experts and their gate, the router.
    pub fn active_params(&self) -> i64 {
        self.top_k * self.expert_config().params_per_expert()
            + self.shared_params()
            + self.router.num_params(self.router_dims())
    }
}
