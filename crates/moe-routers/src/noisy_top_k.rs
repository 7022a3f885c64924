use crate::config::wrong_gate;
use crate::{softmax_top_k, Gate, Router, RouterConfig, RouterDims};
use crate::{FromRouterSpec, RouterSpec};
use moe_core::Checked;
use moe_core::{linear, Result, Routing, WeightInit};
use tch::{nn, nn::Module, Tensor};

/// Noisy top-k gate ([`Gate::NoisyTopK`]; Shazeer et al. 2017, arXiv
/// 1701.06538, eq. 4; makeMoE):
///
/// `H(x) = W_g x + b_g + eps * softplus(W_n x + b_n)`, `eps ~ N(0, 1)`,
/// `G(x) = softmax(KeepTopK(H(x), k))`.
///
/// The noise spreads tokens over experts early in training. It is added in
/// training, and outside it too when `noise_at_eval` is set (makeMoE's
/// behaviour). `eps` comes from libtorch's generator, or from a tape of
/// given draws inside [`with_given_noise`](crate::with_given_noise).
#[derive(Debug)]
pub struct NoisyTopKRouter {
    gate: nn::Linear,
    noise: nn::Linear,
    noise_at_eval: bool,
    norm_topk_prob: bool,
    dims: RouterDims,
    config: RouterConfig,
}

impl FromRouterSpec for NoisyTopKRouter {
    /// Parameters: `p/gate` (logits) and `p/noise` (noise scale logits),
    /// each `weight [E, d]` and, with `config.bias`, `bias [E]`.
    fn from_spec(p: &nn::Path, spec: &Checked<RouterSpec>, init: WeightInit) -> Result<Self> {
        let (dims, config) = (spec.dims, &spec.config);
        let Gate::NoisyTopK {
            noise_at_eval,
            norm_topk_prob,
        } = config.gate
        else {
            return Err(wrong_gate("NoisyTopKRouter", "noisy_top_k", &config.gate));
        };
        let (d, e) = (dims.input_dim, dims.num_experts);
        Ok(NoisyTopKRouter {
            gate: linear(p / "gate", d, e, config.bias, init),
            noise: linear(p / "noise", d, e, config.bias, init),
            noise_at_eval,
            norm_topk_prob,
            dims,
            config: config.clone(),
        })
    }
}

impl NoisyTopKRouter {
    /// Whether noise is added in this mode.
    pub fn adds_noise(&self, train: bool) -> bool {
        train || self.noise_at_eval
    }
}

impl Router for NoisyTopKRouter {
    fn select(&self, x: &Tensor, train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        let mut logits = self.gate.forward(x);
        if self.adds_noise(train) {
            let scale = self.noise.forward(x).softplus();
            logits = &logits + crate::noise::standard_normal_like(&logits)? * scale;
        }
        Ok(softmax_top_k(logits, self.dims.top_k, self.norm_topk_prob))
    }

    fn dims(&self) -> RouterDims {
        self.dims
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
