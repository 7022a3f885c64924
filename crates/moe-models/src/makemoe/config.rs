use moe_block::{FineGrained, SparseMoeConfig};
use moe_core::{MoeError, Precision, Result, WeightInit};
use moe_dispatch::{DispatchKind, DispatchSpec};
use moe_experts::Activation;
use moe_nn::{AttentionConfig, AttentionPath, AttentionScale};
use moe_routers::{BalanceLossConfig, Gate, RouterConfig};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// Hyper-parameters of the language model. `Default` is makeMoE's model
/// with textbook behaviour; [`MakeMoeConfig::preset`] gives makeMoE's quirks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MakeMoeConfig {
    /// Vocabulary size (65 characters in tinyshakespeare).
    pub vocab_size: i64,
    /// Context length `T`.
    pub block_size: i64,
    /// Model width `C`.
    pub n_embd: i64,
    /// Attention heads `H`.
    pub n_head: i64,
    /// Transformer blocks.
    pub n_layer: i64,
    /// Dropout on attention weights, projections and experts.
    pub dropout: f64,
    /// Routed experts `E`.
    pub num_experts: i64,
    /// Experts per token `k`.
    pub top_k: i64,
    /// Hidden width of each expert; `None` means `4 * n_embd` (makeMoE).
    pub expert_hidden: Option<i64>,
    /// Experts' non-linearity: ReLU (makeMoE) or SwiGLU (Mixtral, LLaMA, DeepSeek).
    pub activation: Activation,
    /// DeepSeekMoE fine-grained segmentation `m` (1: none); see [`FineGrained`].
    pub segments: i64,
    /// DeepSeekMoE shared experts `K_s`, out of the `m * num_experts`.
    pub shared_experts: i64,
    /// The router's settings: gate, gate bias, routed scaling factor and
    /// capacity factor (`[model.router] kind = "top_k"` in a run config).
    pub router: RouterConfig,
    /// Balance losses added to the training loss (none: makeMoE).
    pub balance: BalanceLossConfig,
    /// How routed tokens reach their experts.
    pub dispatch: DispatchKind,
    /// Which attention implementation runs.
    pub attention: AttentionPath,
    /// How attention scores are scaled.
    pub attention_scale: AttentionScale,
    /// How weights are drawn.
    pub init: WeightInit,
    /// Compute dtype of attention and experts; parameters stay f32.
    pub precision: Precision,
}

impl Default for MakeMoeConfig {
    fn default() -> Self {
        MakeMoeConfig {
            vocab_size: 65,
            block_size: 32,
            n_embd: 128,
            n_head: 8,
            n_layer: 8,
            dropout: 0.1,
            num_experts: 8,
            top_k: 2,
            expert_hidden: None,
            activation: Activation::Relu,
            segments: 1,
            shared_experts: 0,
            router: RouterConfig::default(),
            balance: BalanceLossConfig::default(),
            dispatch: DispatchKind::Auto,
            attention: AttentionPath::Fused,
            attention_scale: AttentionScale::HeadSize,
            init: WeightInit::Kaiming,
            precision: Precision::Fp32,
        }
    }
}

/// A named set of behaviours on top of the sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "lower"))]
#[non_exhaustive]
pub enum Preset {
    /// Textbook choices: attention scaled by `head_size^-0.5`, router noise
    /// in training only.
    #[default]
    Default,
    /// makeMoE exactly: attention scaled by `n_embd^-0.5`, router noise at
    /// evaluation and generation too. Reproduces the tutorial's numbers.
    MakeMoe,
}

impl FromStr for Preset {
    type Err = MoeError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "default" => Ok(Preset::Default),
            "makemoe" => Ok(Preset::MakeMoe),
            other => Err(MoeError::config(format!(
                "unknown preset `{other}`: expected default or makemoe"
            ))),
        }
    }
}

impl moe_core::Validate for MakeMoeConfig {
    fn validate(&self) -> Result<()> {
        MakeMoeConfig::validate(self)
    }
}

impl MakeMoeConfig {
    /// makeMoE's sizes with the given preset's behaviour.
    pub fn preset(preset: Preset) -> Self {
        let mut config = MakeMoeConfig::default();
        config.apply_preset(preset);
        config
    }

    /// The preset's behaviour on this config: the attention scale and,
    /// for a noisy top-k gate, whether noise is added at evaluation
    /// (makeMoE: `n_embd^-0.5` and noise; default: `head_size^-0.5`, none).
    /// Sizes and the other settings stay.
    pub fn apply_preset(&mut self, preset: Preset) {
        let makemoe = preset == Preset::MakeMoe;
        self.attention_scale = if makemoe {
            AttentionScale::Embedding
        } else {
            AttentionScale::HeadSize
        };
        if let Gate::NoisyTopK { noise_at_eval, .. } = &mut self.router.gate {
            *noise_at_eval = makemoe;
        }
    }

    /// A command line's `--dispatch` ([`DispatchSpec`]): the strategy, and
    /// for `capacity[:F]` the router's capacity factor `F`.
    pub fn set_dispatch(&mut self, spec: DispatchSpec) {
        spec.apply(&mut self.dispatch, &mut self.router.capacity_factor);
    }

    /// Hidden width of each expert (`4 * n_embd` unless set).
    pub fn expert_hidden(&self) -> i64 {
        self.expert_hidden.unwrap_or(4 * self.n_embd)
    }

    /// The attention layers' configuration.
    pub fn attention_config(&self) -> AttentionConfig {
        AttentionConfig {
            n_embd: self.n_embd,
            n_head: self.n_head,
            block_size: self.block_size,
            dropout: self.dropout,
            path: self.attention,
            scale: self.attention_scale,
            init: self.init,
        }
    }

    /// The fine-grained layout of the MoE layers: `num_experts`, `top_k`,
    /// the expert width, `segments` and `shared_experts`.
    pub fn layout(&self) -> FineGrained {
        FineGrained {
            num_experts: self.num_experts,
            top_k: self.top_k,
            expert_hidden: self.expert_hidden(),
            segments: self.segments,
            shared_experts: self.shared_experts,
        }
    }

    /// The config of each MoE layer: the sizes derived from [`Self::layout`]
    /// (routed `E = m N - K_s`, `k = m K - K_s`, width `h / m`, `K_s` shared
    /// experts of width `h / m`), experts with biases, and this config's
    /// router, balance losses, dispatch and init. An error for a bad layout.
    pub fn moe_config(&self) -> Result<SparseMoeConfig> {
        SparseMoeConfig {
            n_embd: self.n_embd,
            dropout: self.dropout,
            activation: self.activation,
            expert_bias: true,
            router: self.router.clone(),
            balance: self.balance.clone(),
            dispatch: self.dispatch,
            init: self.init,
            ..SparseMoeConfig::default()
        }
        .fine_grained(self.layout())
    }

    /// Checks every size and option; the error names the field and what was expected.
    pub fn validate(&self) -> Result<()> {
        if self.vocab_size <= 0 || self.n_layer <= 0 {
            return Err(MoeError::config(format!(
                "vocab_size ({}) and n_layer ({}) must be positive",
                self.vocab_size, self.n_layer
            )));
        }
        self.attention_config().validate()?;
        self.moe_config()?.validate()
    }

    /// Parameters a token passes through (the active and shared experts of
    /// each layer, not all of them), given the model's `total`.
    pub fn active_params(&self, total: i64) -> Result<i64> {
        let moe = self.moe_config()?;
        Ok(total - self.n_layer * (moe.total_params() - moe.active_params()))
    }
}
