use crate::{top_k_of_affinities, Router, RouterConfig};
use moe_core::{linear, Result, Routing};
use tch::{nn, nn::Module, Kind, Tensor};

/// DeepSeekMoE gate (Dai et al. 2024, arXiv 2401.06066, eq. 4-5): a softmax
/// over all `E` experts before the top-k,
///
/// `s_{i,t} = softmax_i(u_t^T e_i)`, `g_{i,t} = s_{i,t}` if `s_{i,t}` is among
/// the `k` largest, else 0,
///
/// so the weights of a token sum to at most 1; with `norm_topk_prob` they are
/// renormalised over the `k` chosen experts. The centroids `e_i` form a
/// linear map without bias.
#[derive(Debug)]
pub struct DeepSeekMoeRouter {
    gate: nn::Linear,
    config: RouterConfig,
}

impl DeepSeekMoeRouter {
    /// Parameters: `p/gate.weight`, `[E, d]`.
    pub fn new(p: &nn::Path, config: &RouterConfig) -> Result<Self> {
        config.validate()?;
        let gate = linear(
            p / "gate",
            config.input_dim,
            config.num_experts,
            false,
            config.init,
        );
        Ok(DeepSeekMoeRouter {
            gate,
            config: config.clone(),
        })
    }
}

impl Router for DeepSeekMoeRouter {
    fn route(&self, x: &Tensor, _train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        let logits = self.gate.forward(x);
        let probs = logits.softmax(-1, Kind::Float).to_kind(logits.kind());
        Ok(top_k_of_affinities(
            logits,
            &probs,
            &probs,
            probs.shallow_clone(),
            self.config.top_k,
            self.config.norm_topk_prob,
        ))
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
