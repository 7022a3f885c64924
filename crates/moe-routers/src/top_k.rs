use crate::{top_k_softmax, Router, RouterConfig};
use moe_core::{linear, Result, Routing};
use tch::{nn, nn::Module, Tensor};

/// Top-k gate: `l = W_g x + b_g`, `G(x) = softmax(KeepTopK(l, k))`
/// (Mixtral, Jiang et al. 2024, arXiv 2401.04088, eq. 1-2).
#[derive(Debug)]
pub struct TopKRouter {
    gate: nn::Linear,
    config: RouterConfig,
}

impl TopKRouter {
    /// Parameters: `p/gate`.
    pub fn new(p: &nn::Path, config: &RouterConfig) -> Result<Self> {
        config.validate()?;
        let gate = linear(
            p / "gate",
            config.input_dim,
            config.num_experts,
            true,
            config.init,
        );
        Ok(TopKRouter {
            gate,
            config: config.clone(),
        })
    }
}

impl Router for TopKRouter {
    fn route(&self, x: &Tensor, _train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        Ok(top_k_softmax(self.gate.forward(x), self.config.top_k))
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
