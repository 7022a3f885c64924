use crate::{
    apply_capacity, check_groups, AttentionRouter, AuxFreeSigmoidRouter, ExpertChoiceRouter,
    ExpertChoiceScope, NoisyTopKRouter, Router, TopKRouter,
};
use moe_core::{Checked, IntoChecked, MoeError, Result, Routing, WeightInit};
use serde::{Deserialize, Serialize};
use tch::nn;

/// DeepSeek-V3's bias update speed `gamma` (arXiv 2412.19437, §4.2: 0.001).
pub const DEFAULT_BIAS_UPDATE_RATE: f64 = 1e-3;

/// The gate of a router: how it scores the experts, which `k` it keeps and
/// how it weights them, with the settings of that gate only.
///
/// Serialised internally tagged by `kind` (`kind = "top_k"`, ...); inside a
/// [`RouterConfig`] the tag and the settings sit next to the router's own
/// fields (`[model.router] kind = "sigmoid_aux_free" n_group = 4 bias = false`).
/// A missing setting takes the default written on it.
///
/// With `l = W_g x (+ b_g)` the logits of a token over the `E` experts:
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Gate {
    /// Softmax over all `E` logits, `p = softmax(l)`, then the top-k of the
    /// probabilities; the weights are the chosen `p_i`, renormalised to sum
    /// to 1 when `norm_topk_prob`, which equals the softmax over the `k`
    /// kept logits and is computed that way, `G = softmax(KeepTopK(l, k))`
    /// ([`crate::top_k_softmax`]).
    ///
    /// Mixtral (arXiv 2401.04088, eq. 1-2; HF `MixtralSparseMoeBlock`):
    /// `norm_topk_prob: true`. DeepSeekMoE (arXiv 2401.06066, eq. 4-5),
    /// Qwen2-MoE (HF `Qwen2MoeSparseMoeBlock`, default false) and OLMoE
    /// (arXiv 2409.02060, false): the same gate with the setting of the model.
    TopK {
        /// Renormalise the `k` chosen probabilities (default true, Mixtral).
        #[serde(default = "default_true")]
        norm_topk_prob: bool,
    },
    /// Noisy top-k (Shazeer et al. 2017, arXiv 1701.06538, eq. 3-5; makeMoE):
    /// `H = l + eps * softplus(W_n x + b_n)`, `eps ~ N(0, 1)`,
    /// `G = softmax(KeepTopK(H, k))`. Noise in training only, or at
    /// evaluation too with `noise_at_eval` (makeMoE's router has no notion of mode).
    NoisyTopK {
        /// Also add noise outside training (default false; makeMoE's preset: true).
        #[serde(default)]
        noise_at_eval: bool,
        /// Weights renormalised over the `k` kept experts, i.e. the softmax
        /// over the `k` kept noisy logits (default true, makeMoE); false:
        /// the softmax over all `E` noisy logits, read at the kept ones.
        #[serde(default = "default_true")]
        norm_topk_prob: bool,
    },
    /// Yuan 2.0-M32's attention router (arXiv 2405.17976, §3):
    /// `P_i = sum_j softmax_j(Q_i K_j) V_j` with `Q, K, V` in `R^E` three
    /// linear maps of the token; top-k of `P`, softmax over the `k` values
    /// (`norm_topk_prob`, default true), or over all `E` read at the `k`.
    Attention {
        /// Renormalise over the `k` kept experts (default true, Yuan).
        #[serde(default = "default_true")]
        norm_topk_prob: bool,
    },
    /// DeepSeek-V2's softmax gate with group-limited greedy selection
    /// (arXiv 2405.04434, §2.2.3 "device-limited routing"; HF
    /// `DeepseekV2TopkRouter`, `topk_method = "group_limited_greedy"`):
    /// `p = softmax(l)`, experts chosen by `TopK(p, k)` within the
    /// `topk_group` groups of highest `max p` among `n_group`
    /// ([`crate::group_limited_selection`] with [`crate::GroupScore::Max`]),
    /// weights `p_i`, divided by their sum when `norm_topk_prob` (DeepSeek-V2
    /// never does). One group is [`Gate::TopK`].
    GroupLimitedGreedy {
        /// Renormalise the `k` chosen probabilities (default false, DeepSeek-V2).
        #[serde(default)]
        norm_topk_prob: bool,
        /// Expert groups `n_group` (default 1: no group limit; DeepSeek-V2: 8).
        #[serde(default = "default_one")]
        n_group: i64,
        /// Groups kept per token, `topk_group` (default 1; DeepSeek-V2: 3).
        #[serde(default = "default_one")]
        topk_group: i64,
    },
    /// DeepSeek-V3's sigmoid gate with auxiliary-loss-free balancing
    /// (arXiv 2412.19437, §2.1.2, eq. 12-16; HF `DeepseekV3TopkRouter`,
    /// `topk_method = "noaux_tc"`): `s = sigmoid(l)`, experts chosen by
    /// `TopK(s + b, k)` within the `topk_group` best of `n_group` expert
    /// groups ([`crate::group_limited_selection`]), weights `s_i`, divided by
    /// their sum when `norm_topk_prob`. `b` is a balancing bias updated after
    /// each step by `b_i += bias_update_rate * sign(mean load - load_i)`.
    SigmoidAuxFree {
        /// Renormalise the `k` chosen affinities (default true, DeepSeek-V3).
        #[serde(default = "default_true")]
        norm_topk_prob: bool,
        /// `gamma`, the bias update speed (default 1e-3, DeepSeek-V3).
        #[serde(default = "default_bias_update_rate")]
        bias_update_rate: f64,
        /// Expert groups `n_group` (default 1: no group limit; DeepSeek-V3: 8).
        #[serde(default = "default_one")]
        n_group: i64,
        /// Groups kept per token, `topk_group` (default 1; DeepSeek-V3: 4).
        #[serde(default = "default_one")]
        topk_group: i64,
    },
    /// Llama 4's sigmoid gate (HF `Llama4Router`): the `k` largest logits
    /// chosen, each weighted by its own sigmoid, `g_i = sigmoid(l_i)` for
    /// `i in TopK(l, k)`, not renormalised (a token's weights need not sum
    /// to 1). Llama 4 applies the weights to the experts' inputs
    /// ([`RouterConfig::weights_on`] = [`WeightsOn::Input`]). The balance
    /// losses read the normalised affinities `sigmoid(l) / sum sigmoid(l)`.
    SigmoidTopK,
    /// Expert choice (Zhou et al. 2022, arXiv 2202.09368, §3.1;
    /// [`crate::expert_choice`]): `S = softmax(l)` over the experts of each
    /// token; each expert takes the `C` tokens of highest `S[:, e]` among
    /// those of its `scope`, `C = floor(M k / E * capacity_factor)` for `M`
    /// tokens in scope, each weighted by its `S[n, e]`. A token gets zero,
    /// one or many experts; every expert gets exactly `C` tokens per scope.
    /// The layer's `top_k` sets the compute, `k` experts per token on
    /// average (times `capacity_factor`). Balanced by construction: the
    /// router's own `capacity_factor` must stay unset.
    ExpertChoice {
        /// `c` in `C = floor(M k / E * c)` (default 1: the compute of
        /// top-k; the paper's EC-CF2 is `k = 2`, `c = 1` here). Serialised
        /// as `ec_capacity_factor`: in a router table it sits next to
        /// [`RouterConfig::capacity_factor`], the token-choice limit.
        #[serde(rename = "ec_capacity_factor", default = "default_capacity_factor")]
        capacity_factor: f64,
        /// Which tokens an expert chooses among (default
        /// [`ExpertChoiceScope::PerPosition`], the causal form a decoder needs).
        #[serde(default)]
        scope: ExpertChoiceScope,
    },
}

fn default_true() -> bool {
    true
}

fn default_bias_update_rate() -> f64 {
    DEFAULT_BIAS_UPDATE_RATE
}

fn default_one() -> i64 {
    1
}

fn default_capacity_factor() -> f64 {
    1.0
}

impl Default for Gate {
    /// makeMoE's gate: noisy top-k, noise in training only.
    fn default() -> Self {
        Gate::NoisyTopK {
            noise_at_eval: false,
            norm_topk_prob: true,
        }
    }
}

impl Gate {
    /// The gate names [`Gate::from_str`](std::str::FromStr) accepts, in the
    /// order of the router comparison.
    pub const NAMES: [&'static str; 8] = [
        "top_k",
        "noisy_top_k",
        "attention",
        "deepseek_moe",
        "group_limited_greedy",
        "sigmoid_aux_free",
        "sigmoid_top_k",
        "expert_choice",
    ];

    /// DeepSeek-V3's gate without group limit: sigmoid, renormalised,
    /// `gamma = 1e-3`, one group.
    pub fn sigmoid_aux_free() -> Self {
        Gate::SigmoidAuxFree {
            norm_topk_prob: true,
            bias_update_rate: DEFAULT_BIAS_UPDATE_RATE,
            n_group: 1,
            topk_group: 1,
        }
    }

    /// Expert choice in its causal form (per position), `capacity_factor = 1`.
    pub fn expert_choice() -> Self {
        Gate::ExpertChoice {
            capacity_factor: 1.0,
            scope: ExpertChoiceScope::PerPosition,
        }
    }

    /// Whether each token chooses its `k` experts (every gate but expert
    /// choice, whose routings have any number of experts per token).
    pub fn is_token_choice(&self) -> bool {
        !matches!(self, Gate::ExpertChoice { .. })
    }

    /// `(n_group, topk_group)` of the gates with DeepSeek's group limit
    /// (V2's and V3's); `None` for the others.
    pub fn groups(&self) -> Option<(i64, i64)> {
        match *self {
            Gate::GroupLimitedGreedy {
                n_group,
                topk_group,
                ..
            }
            | Gate::SigmoidAuxFree {
                n_group,
                topk_group,
                ..
            } => Some((n_group, topk_group)),
            _ => None,
        }
    }

    /// How many linear maps `d -> E` the gate has (each with a bias when
    /// [`RouterConfig::bias`]): 1, 2 for noisy top-k (logits and noise
    /// scale), 3 for the attention router (`Q`, `K`, `V`).
    pub fn linear_maps(&self) -> i64 {
        match self {
            Gate::TopK { .. }
            | Gate::GroupLimitedGreedy { .. }
            | Gate::SigmoidAuxFree { .. }
            | Gate::SigmoidTopK
            | Gate::ExpertChoice { .. } => 1,
            Gate::NoisyTopK { .. } => 2,
            Gate::Attention { .. } => 3,
        }
    }

    /// Checks the gate's settings against the router's sizes: a finite
    /// `bias_update_rate >= 0`; `n_group >= 1` dividing `E`, `topk_group`
    /// in `1..=n_group`, and at least `k` experts in the kept groups
    /// (`k <= topk_group * E / n_group`); expert choice's finite
    /// `capacity_factor > 0`.
    pub fn validate(&self, dims: RouterDims) -> Result<()> {
        if let Gate::ExpertChoice {
            capacity_factor, ..
        } = *self
        {
            if !(capacity_factor > 0.0 && capacity_factor.is_finite()) {
                return Err(MoeError::config(format!(
                    "expert choice's capacity_factor must be a finite number > 0 (each expert \
                     takes floor(M k / E * capacity_factor) of the M tokens it chooses among), \
                     got {capacity_factor}"
                )));
            }
        }
        if let Gate::SigmoidAuxFree {
            bias_update_rate, ..
        } = *self
        {
            if !(bias_update_rate >= 0.0 && bias_update_rate.is_finite()) {
                return Err(MoeError::config(format!(
                    "bias_update_rate must be a finite number >= 0, got {bias_update_rate}"
                )));
            }
        }
        if let Some((n_group, topk_group)) = self.groups() {
            check_groups(dims.num_experts, n_group, topk_group)?;
            let available = topk_group * (dims.num_experts / n_group);
            if dims.top_k > available {
                return Err(MoeError::config(format!(
                    "top_k = {} is more than the {available} experts of the topk_group = \
                     {topk_group} kept groups ({} experts each); expected top_k <= \
                     topk_group * num_experts / n_group",
                    dims.top_k,
                    dims.num_experts / n_group
                )));
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Gate {
    type Err = MoeError;

    /// `top_k` (Mixtral: renormalised), `noisy_top_k` (noise in training
    /// only), `attention`, `deepseek_moe` (top-k of the softmax, not
    /// renormalised; DeepSeekMoE's gate has no bias, which is
    /// [`RouterConfig::bias`]), `group_limited_greedy` (DeepSeek-V2's
    /// gate, one group until `n_group` and `topk_group` are set),
    /// `sigmoid_aux_free` (DeepSeek-V3's defaults), `sigmoid_top_k` (Llama
    /// 4's) or `expert_choice` (causal, per position, capacity factor
    /// 1; [`Gate::expert_choice`]); `-` may replace `_`.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "top_k" | "topk" => Ok(Gate::TopK {
                norm_topk_prob: true,
            }),
            "noisy_top_k" | "noisy" => Ok(Gate::default()),
            "attention" => Ok(Gate::Attention {
                norm_topk_prob: true,
            }),
            "deepseek_moe" | "deepseek" => Ok(Gate::TopK {
                norm_topk_prob: false,
            }),
            "group_limited_greedy" => Ok(Gate::GroupLimitedGreedy {
                norm_topk_prob: false,
                n_group: 1,
                topk_group: 1,
            }),
            "sigmoid_aux_free" | "aux_free" => Ok(Gate::sigmoid_aux_free()),
            "sigmoid_top_k" => Ok(Gate::SigmoidTopK),
            "expert_choice" | "ec" => Ok(Gate::expert_choice()),
            other => Err(MoeError::config(format!(
                "unknown router gate `{other}`: expected one of {}",
                Gate::NAMES.join(", ")
            ))),
        }
    }
}

/// The sizes of a router: token width `d`, experts `E`, experts per token `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterDims {
    /// Token width `d`.
    pub input_dim: i64,
    /// Routed experts `E`.
    pub num_experts: i64,
    /// Experts chosen per token `k`, `1 <= k <= E`.
    pub top_k: i64,
}

impl RouterDims {
    /// `d >= 1`, `E >= 1`, `1 <= k <= E`.
    pub fn validate(&self) -> Result<()> {
        check_top_k(self.num_experts, self.top_k)?;
        if self.input_dim <= 0 {
            return Err(MoeError::config(format!(
                "router input_dim must be positive, got {}",
                self.input_dim
            )));
        }
        Ok(())
    }
}

/// `num_experts >= 1` and `1 <= top_k <= num_experts`: what choosing `k`
/// of `E` experts needs.
pub fn check_top_k(num_experts: i64, top_k: i64) -> Result<()> {
    if num_experts <= 0 {
        return Err(MoeError::config(format!(
            "num_experts must be at least 1, got {num_experts}"
        )));
    }
    if top_k < 1 || top_k > num_experts {
        return Err(MoeError::config(format!(
            "top_k must be in 1..={num_experts} (num_experts), got {top_k}"
        )));
    }
    Ok(())
}

/// A router's settings, without its sizes ([`RouterDims`], which the layer
/// knows): the [`Gate`] and what applies to every gate.
///
/// The routing a router returns is the gate's, then
///
/// `w <- routed_scaling_factor * w` (after any renormalisation; DeepSeek-V3,
/// HF `DeepseekV3MoE`), then the capacity limit ([`apply_capacity`]) when
/// `capacity_factor` is set.
///
/// `Default` is makeMoE's router: noisy top-k without noise at evaluation,
/// gate layers with bias, no scaling, no capacity limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    /// The gate and its settings; serialised flat (`kind = "top_k"` next to
    /// `bias`). A serialised router table must name its `kind`: the other
    /// fields default, the gate does not (a gate guessed from a table with a
    /// typo in `kind` would train another model).
    #[serde(flatten)]
    pub gate: Gate,
    /// Whether the gate's linear maps `x -> R^E` have a bias (makeMoE's and
    /// Mixtral-style top-k: yes; DeepSeekMoE, DeepSeek-V3, Yuan 2.0's
    /// attention router, Qwen2-MoE, OLMoE: no). The balancing bias of the
    /// sigmoid gate is not this bias.
    pub bias: bool,
    /// Factor on the routed weights, after any renormalisation (1: none;
    /// DeepSeek-V3: 2.5).
    pub routed_scaling_factor: f64,
    /// Expert capacity factor: each expert keeps at most
    /// `C = max(1, floor(N k / E * factor))` slots of a batch of `N` tokens
    /// (Switch Transformer, arXiv 2101.03961, §2.2); `None`: no limit. The
    /// one capacity setting: the capacity dispatch strategy reads `C` from
    /// the routing. Token-choice gates only: expert choice
    /// ([`Gate::ExpertChoice`]) has its own capacity factor and drops nothing.
    pub capacity_factor: Option<f64>,
    /// What a slot's weight multiplies: the expert's output (default,
    /// `y = sum_i g_i E_i(x)`) or its input (Llama 4, `y = sum_i E_i(g_i x)`).
    pub weights_on: WeightsOn,
}

/// Where the MoE layer applies the routing weights
/// ([`RouterConfig::weights_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsOn {
    /// `y = sum_i g_i E_i(x)`: every family but Llama 4.
    #[default]
    Output,
    /// `y = sum_i E_i(g_i x)`: Llama 4 (HF `Llama4TextMoe` scales the
    /// tokens by their router scores before the experts and sums the
    /// experts' outputs unweighted).
    Input,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            gate: Gate::default(),
            bias: true,
            routed_scaling_factor: 1.0,
            capacity_factor: None,
            weights_on: WeightsOn::Output,
        }
    }
}

impl RouterConfig {
    /// A router with `gate` and the other settings at their defaults.
    pub fn with_gate(gate: Gate) -> Self {
        RouterConfig {
            gate,
            ..Default::default()
        }
    }

    /// Checks the sizes, the gate's settings for them, a finite
    /// `routed_scaling_factor > 0` and a finite `capacity_factor > 0`,
    /// which only token-choice gates take.
    pub fn validate(&self, dims: RouterDims) -> Result<()> {
        dims.validate()?;
        self.gate.validate(dims)?;
        let scale = self.routed_scaling_factor;
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(MoeError::config(format!(
                "routed_scaling_factor must be a finite number > 0, got {scale}"
            )));
        }
        if let Some(factor) = self.capacity_factor {
            if !self.gate.is_token_choice() {
                return Err(MoeError::config(format!(
                    "router.capacity_factor = {factor} limits token-choice routings; expert \
                     choice sets its capacity with the gate's own capacity factor \
                     (`ec_capacity_factor` in a config file) and drops nothing: leave \
                     router.capacity_factor unset"
                )));
            }
            check_capacity_factor(factor)?;
        }
        Ok(())
    }

    /// Builds the router under `p` for `dims`, its weight matrices drawn
    /// with `init`. Parameters: `p/gate`, `p/noise` (noisy top-k),
    /// `p/{query,key,value}` (attention), `p/expert_bias` (sigmoid aux-free,
    /// not trained).
    pub fn build(
        &self,
        p: &nn::Path,
        dims: RouterDims,
        init: WeightInit,
    ) -> Result<Box<dyn Router>> {
        let spec = RouterSpec {
            config: self.clone(),
            dims,
        };
        build_router(p, spec, init)
    }

    /// Trainable parameters of the router: `E d` per linear map of the gate
    /// ([`Gate::linear_maps`]), plus `E` each with `bias` (the balancing
    /// bias is not trained).
    pub fn num_params(&self, dims: RouterDims) -> i64 {
        let (d, e) = (dims.input_dim, dims.num_experts);
        self.gate.linear_maps() * e * (d + i64::from(self.bias))
    }

    /// What follows the gate: the routed weights times
    /// `routed_scaling_factor`, then the capacity limit when
    /// `capacity_factor` is set ([`apply_capacity`]).
    pub fn finish(&self, routing: Routing) -> Result<Routing> {
        // Out of place: the weights may be the saved output of a softmax.
        let routing = if self.routed_scaling_factor != 1.0 {
            Routing {
                weight: routing.weight.multiply_scalar(self.routed_scaling_factor),
                ..routing
            }
        } else {
            routing
        };
        match self.capacity_factor {
            Some(factor) => apply_capacity(routing, factor),
            None => Ok(routing),
        }
    }
}

/// A router's settings with the sizes it routes for: what a router is
/// built from, and checked as ([`RouterConfig::validate`] needs both).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    /// The router's settings.
    pub config: RouterConfig,
    /// Its sizes.
    pub dims: RouterDims,
}

impl moe_core::Validate for RouterSpec {
    fn validate(&self) -> Result<()> {
        self.config.validate(self.dims)
    }
}

/// A concrete router, built from a checked [`RouterSpec`].
pub trait FromRouterSpec: Sized {
    /// The router of `spec` under `p`, its weight matrices drawn with
    /// `init`; the spec is not checked again. Another gate than this
    /// router's is an error.
    fn from_spec(p: &nn::Path, spec: &Checked<RouterSpec>, init: WeightInit) -> Result<Self>;

    /// The router of `config` for `dims` under `p`, the pair checked here
    /// ([`RouterConfig::validate`]).
    fn new(
        p: &nn::Path,
        dims: RouterDims,
        config: &RouterConfig,
        init: WeightInit,
    ) -> Result<Self> {
        let spec = RouterSpec {
            config: config.clone(),
            dims,
        };
        Self::from_spec(p, &Checked::new(spec)?, init)
    }
}

/// The router of `spec`'s gate under `p`, its weight matrices drawn with
/// `init` ([`RouterConfig::build`]); a spec already checked (a checked
/// MoE layer's, [`moe_core::Checked::derived`]) is not checked again.
pub fn build_router(
    p: &nn::Path,
    spec: impl IntoChecked<RouterSpec>,
    init: WeightInit,
) -> Result<Box<dyn Router>> {
    let spec = &spec.into_checked()?;
    Ok(match spec.config.gate {
        Gate::TopK { .. } | Gate::GroupLimitedGreedy { .. } | Gate::SigmoidTopK => {
            Box::new(TopKRouter::from_spec(p, spec, init)?)
        }
        Gate::NoisyTopK { .. } => Box::new(NoisyTopKRouter::from_spec(p, spec, init)?),
        Gate::Attention { .. } => Box::new(AttentionRouter::from_spec(p, spec, init)?),
        Gate::SigmoidAuxFree { .. } => Box::new(AuxFreeSigmoidRouter::from_spec(p, spec, init)?),
        Gate::ExpertChoice { .. } => Box::new(ExpertChoiceRouter::from_spec(p, spec, init)?),
    })
}

/// A capacity factor must be a finite number `> 0`.
pub(crate) fn check_capacity_factor(factor: f64) -> Result<()> {
    if factor > 0.0 && factor.is_finite() {
        Ok(())
    } else {
        Err(MoeError::config(format!(
            "capacity_factor must be a positive number, got {factor}"
        )))
    }
}

/// The error of a concrete router's constructor given another gate.
pub(crate) fn wrong_gate(router: &str, expected: &str, got: &Gate) -> MoeError {
    MoeError::config(format!(
        "{router} needs a `{expected}` gate, got {got:?} (RouterConfig::build picks the router \
         for any gate)"
    ))
}
