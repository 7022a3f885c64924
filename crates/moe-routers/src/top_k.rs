use crate::config::wrong_gate;
use crate::{
    group_limited_selection, softmax_top_k, top_k_of_affinities, Gate, GroupScore, Router,
    RouterConfig, RouterDims,
};
use crate::{FromRouterSpec, RouterSpec};
use moe_core::Checked;
use moe_core::{accumulation_kind, linear, Result, Routing, WeightInit};
use tch::{nn, Tensor};

/// The top-k gate ([`Gate::TopK`]): `l = W_g x (+ b_g)`, `p = softmax(l)`
/// over all `E` experts, the `k` largest `p_i` chosen.
///
/// - `norm_topk_prob: true` (Mixtral, arXiv 2401.04088, eq. 1-2): weights
///   `p_i / sum_{j in TopK} p_j`, computed as `softmax(KeepTopK(l, k))`
///   ([`crate::top_k_softmax`]), the same numbers.
/// - `norm_topk_prob: false` (DeepSeekMoE, arXiv 2401.06066, eq. 4-5;
///   Qwen2-MoE and OLMoE's default): weights `p_i` ([`crate::top_k_of_affinities`]),
///   a token's weights summing to at most 1.
///
/// With DeepSeek-V2's group limit ([`Gate::GroupLimitedGreedy`]) the `k`
/// are chosen among the experts of the `topk_group` groups of highest
/// `max p` ([`group_limited_selection`], [`GroupScore::Max`]), weighted by
/// `p_i` (renormalised when `norm_topk_prob`).
///
/// Llama 4's gate ([`Gate::SigmoidTopK`]) chooses the `k` largest logits
/// and weights each by `sigmoid(l_i)` ([`crate::top_k_of_affinities`] of the
/// sigmoid affinities, not renormalised).
#[derive(Debug)]
pub struct TopKRouter {
    gate: nn::Linear,
    /// Sigmoid affinities (Llama 4) instead of softmax probabilities.
    sigmoid: bool,
    norm_topk_prob: bool,
    /// `(n_group, topk_group)`; `(1, 1)` without a group limit.
    groups: (i64, i64),
    dims: RouterDims,
    config: RouterConfig,
}

impl FromRouterSpec for TopKRouter {
    /// Parameters: `p/gate` (`weight [E, d]`, `bias [E]` with `config.bias`).
    fn from_spec(p: &nn::Path, spec: &Checked<RouterSpec>, init: WeightInit) -> Result<Self> {
        let (dims, config) = (spec.dims, &spec.config);
        let norm_topk_prob = match config.gate {
            Gate::TopK { norm_topk_prob } | Gate::GroupLimitedGreedy { norm_topk_prob, .. } => {
                norm_topk_prob
            }
            Gate::SigmoidTopK => false,
            _ => {
                return Err(wrong_gate(
                    "TopKRouter",
                    "top_k, group_limited_greedy or sigmoid_top_k",
                    &config.gate,
                ))
            }
        };
        let (d, e) = (dims.input_dim, dims.num_experts);
        Ok(TopKRouter {
            gate: linear(p / "gate", d, e, config.bias, init),
            sigmoid: config.gate == Gate::SigmoidTopK,
            norm_topk_prob,
            groups: config.gate.groups().unwrap_or((1, 1)),
            dims,
            config: config.clone(),
        })
    }
}

impl Router for TopKRouter {
    fn select(&self, x: &Tensor, _train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        let logits = moe_core::router_logits(x, &self.gate);
        if self.sigmoid {
            let affinity = logits.sigmoid();
            let probs = &affinity / affinity.sum_dim_intlist(-1, true, None);
            let selection = logits.detach();
            return Ok(top_k_of_affinities(
                logits,
                &affinity,
                &selection,
                probs,
                self.dims.top_k,
                false,
            ));
        }
        let (n_group, topk_group) = self.groups;
        if n_group == 1 {
            return Ok(softmax_top_k(logits, self.dims.top_k, self.norm_topk_prob));
        }
        let probs = logits
            .softmax(-1, accumulation_kind(logits.kind()))
            .to_kind(logits.kind());
        let selection =
            group_limited_selection(&probs.detach(), n_group, topk_group, GroupScore::Max)?;
        Ok(top_k_of_affinities(
            logits,
            &probs,
            &selection,
            probs.shallow_clone(),
            self.dims.top_k,
            self.norm_topk_prob,
        ))
    }

    fn dims(&self) -> RouterDims {
        self.dims
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
