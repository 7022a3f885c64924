use crate::{top_k_softmax, Router, RouterConfig};
use moe_core::{linear, Result, Routing};
use tch::{nn, nn::Module, Tensor};

/// Noisy top-k gate (Shazeer et al. 2017, arXiv 1701.06538, eq. 4; makeMoE):
///
/// `H(x) = W_g x + b_g + eps * softplus(W_n x + b_n)`, `eps ~ N(0, 1)`,
/// `G(x) = softmax(KeepTopK(H(x), k))`.
///
/// The noise spreads tokens over experts early in training. It is added in
/// training, and outside it too when `noise_at_eval` is set (makeMoE's
/// behaviour).
#[derive(Debug)]
pub struct NoisyTopKRouter {
    gate: nn::Linear,
    noise: nn::Linear,
    config: RouterConfig,
}

impl NoisyTopKRouter {
    /// Parameters: `p/gate` (logits) and `p/noise` (noise scale logits).
    pub fn new(p: &nn::Path, config: &RouterConfig) -> Result<Self> {
        config.validate()?;
        let (d, e) = (config.input_dim, config.num_experts);
        Ok(NoisyTopKRouter {
            gate: linear(p / "gate", d, e, true, config.init),
            noise: linear(p / "noise", d, e, true, config.init),
            config: config.clone(),
        })
    }

    /// Whether noise is added in this mode.
    pub fn adds_noise(&self, train: bool) -> bool {
        train || self.config.noise_at_eval
    }
}

impl Router for NoisyTopKRouter {
    fn route(&self, x: &Tensor, train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        let mut logits = self.gate.forward(x);
        if self.adds_noise(train) {
            let scale = self.noise.forward(x).softplus();
            logits = &logits + logits.randn_like() * scale;
        }
        Ok(top_k_softmax(logits, self.config.top_k))
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
