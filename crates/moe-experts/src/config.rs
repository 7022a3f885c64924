use moe_core::{MoeError, Result, WeightInit};
use serde::{Deserialize, Serialize};

/// The non-linearity inside each expert.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Activation {
    /// `ReLU(x W_in (+ b_in))` (makeMoE, Switch).
    #[default]
    Relu,
    /// `SiLU(x W_gate) * (x W_in (+ b_in))` (Shazeer 2020, arXiv 2002.05202;
    /// Mixtral, LLaMA, DeepSeek). Adds a gate matrix `[E, d, h]` per bank.
    SwiGlu,
    /// gpt-oss's clamped SwiGLU (HF `GptOssExperts._apply_gate`):
    /// `g = min(x W_gate (+ b_gate), limit)`,
    /// `u = clamp(x W_in (+ b_in), -limit, limit)`,
    /// `act = (u + 1) * g * sigmoid(alpha * g)`. A gate matrix as SwiGLU.
    ClampedSwiGlu {
        /// `alpha` of the sigmoid (gpt-oss: 1.702, `swiglu_alpha`).
        alpha: f64,
        /// `limit` of the clamps (gpt-oss: 7, `swiglu_limit`).
        limit: f64,
    },
}

impl Activation {
    /// Whether the experts have a gate projection `W_gate` (the SwiGLUs).
    pub fn is_gated(&self) -> bool {
        !matches!(self, Activation::Relu)
    }
}

/// Configuration of an [`crate::ExpertBank`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExpertConfig {
    /// Number of experts `E`.
    pub num_experts: i64,
    /// Token width `d`.
    pub input_dim: i64,
    /// Hidden width `h` of each expert (makeMoE: `4 d`).
    pub hidden_dim: i64,
    /// Dropout on each expert's output.
    pub dropout: f64,
    /// The experts' non-linearity (ReLU or SwiGLU).
    pub activation: Activation,
    /// Whether the experts' linear layers have biases `b_in`, `b_out` and,
    /// gated, `b_gate` (makeMoE, Switch, gpt-oss: yes; Mixtral, Qwen2-MoE,
    /// DeepSeek, OLMoE: no). A bank without them has no such variables.
    pub bias: bool,
    /// How the weights are drawn.
    pub init: WeightInit,
}

impl Default for ExpertConfig {
    /// makeMoE's experts: 8 x Linear(128, 512)-ReLU-Linear(512, 128)-Dropout(0.1).
    fn default() -> Self {
        ExpertConfig {
            num_experts: 8,
            input_dim: 128,
            hidden_dim: 512,
            dropout: 0.1,
            activation: Activation::default(),
            bias: true,
            init: WeightInit::default(),
        }
    }
}

impl moe_core::Validate for ExpertConfig {
    fn validate(&self) -> Result<()> {
        ExpertConfig::validate(self)
    }
}

impl ExpertConfig {
    /// Checks the sizes: an error names a non-positive width or a dropout outside `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts <= 0 {
            return Err(MoeError::config(format!(
                "num_experts must be at least 1, got {}",
                self.num_experts
            )));
        }
        if self.input_dim <= 0 || self.hidden_dim <= 0 {
            return Err(MoeError::config(format!(
                "expert input_dim ({}) and hidden_dim ({}) must be positive",
                self.input_dim, self.hidden_dim
            )));
        }
        if let Activation::ClampedSwiGlu { alpha, limit } = self.activation {
            if !(alpha.is_finite() && limit > 0.0 && limit.is_finite()) {
                return Err(MoeError::config(format!(
                    "the clamped SwiGLU needs a finite alpha and a finite limit > 0, got alpha \
                     {alpha}, limit {limit}"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(MoeError::config(format!(
                "expert dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// Parameters of one expert: `2 d h`, plus `d h` for a SwiGLU's gate,
    /// plus `h + d` with biases (and `h` more for a gate's).
    pub fn params_per_expert(&self) -> i64 {
        let (d, h) = (self.input_dim, self.hidden_dim);
        let gated = i64::from(self.activation.is_gated());
        let bias = if self.bias { h + d + gated * h } else { 0 };
        2 * d * h + gated * d * h + bias
    }
}
