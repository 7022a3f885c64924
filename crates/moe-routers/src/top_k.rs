use crate::config::wrong_gate;
use crate::{softmax_top_k, Gate, Router, RouterConfig, RouterDims};
use moe_core::{linear, Result, Routing, WeightInit};
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
#[derive(Debug)]
pub struct TopKRouter {
    gate: nn::Linear,
    norm_topk_prob: bool,
    dims: RouterDims,
    config: RouterConfig,
}

impl TopKRouter {
    /// Parameters: `p/gate` (`weight [E, d]`, `bias [E]` with `config.bias`).
    pub fn new(
        p: &nn::Path,
        dims: RouterDims,
        config: &RouterConfig,
        init: WeightInit,
    ) -> Result<Self> {
        let Gate::TopK { norm_topk_prob } = config.gate else {
            return Err(wrong_gate("TopKRouter", "top_k", &config.gate));
        };
        config.validate(dims)?;
        let (d, e) = (dims.input_dim, dims.num_experts);
        Ok(TopKRouter {
            gate: linear(p / "gate", d, e, config.bias, init),
            norm_topk_prob,
            dims,
            config: config.clone(),
        })
    }
}

impl Router for TopKRouter {
    fn select(&self, x: &Tensor, _train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        let logits = moe_core::router_logits(x, &self.gate);
        Ok(softmax_top_k(logits, self.dims.top_k, self.norm_topk_prob))
    }

    fn dims(&self) -> RouterDims {
        self.dims
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
