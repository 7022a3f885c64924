use crate::config::wrong_gate;
use crate::{softmax_top_k, Gate, Router, RouterConfig, RouterDims};
use crate::{FromRouterSpec, RouterSpec};
use moe_core::Checked;
use moe_core::{linear, Result, Routing, WeightInit};
use tch::{nn, nn::Module, Kind, Tensor};

/// Attention router of Yuan 2.0-M32 ([`Gate::Attention`]; Wu et al. 2024,
/// arXiv 2405.17976, §3): the experts attend to each other so that the
/// choice of one expert accounts for its correlation with the others.
///
/// Per token `x`: `Q = W_q x`, `K = W_k x`, `V = W_v x`, each in `R^E`
/// (with a bias each when [`RouterConfig::bias`]; Yuan 2.0 has none), and
///
/// `P = softmax(Q K^T) V`, i.e. `P_i = sum_j softmax_j(Q_i K_j) V_j`,
///
/// an `E x E` attention per token, without `1/sqrt(d)` scaling, computed in
/// fp32. The top-k of `P` choose the experts, weighted by a softmax over
/// those `k` values ([`crate::top_k_softmax`]; see [`softmax_top_k`]).
#[derive(Debug)]
pub struct AttentionRouter {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    norm_topk_prob: bool,
    dims: RouterDims,
    config: RouterConfig,
}

impl FromRouterSpec for AttentionRouter {
    /// Parameters: `p/{query,key,value}.weight`, each `[E, d]`, and with
    /// `config.bias` `p/{query,key,value}.bias`, each `[E]`.
    fn from_spec(p: &nn::Path, spec: &Checked<RouterSpec>, init: WeightInit) -> Result<Self> {
        let (dims, config) = (spec.dims, &spec.config);
        let Gate::Attention { norm_topk_prob } = config.gate else {
            return Err(wrong_gate("AttentionRouter", "attention", &config.gate));
        };
        let (d, e, bias) = (dims.input_dim, dims.num_experts, config.bias);
        Ok(AttentionRouter {
            query: linear(p / "query", d, e, bias, init),
            key: linear(p / "key", d, e, bias, init),
            value: linear(p / "value", d, e, bias, init),
            norm_topk_prob,
            dims,
            config: config.clone(),
        })
    }
}

impl AttentionRouter {
    /// `P`, `[N, E]` in fp32.
    pub fn expert_attention(&self, x: &Tensor) -> Tensor {
        let q = self.query.forward(x).to_kind(Kind::Float); // [N, E]
        let k = self.key.forward(x).to_kind(Kind::Float);
        let v = self.value.forward(x).to_kind(Kind::Float);
        // scores[n, i, j] = q[n, i] * k[n, j]: the outer product Q K^T of each token.
        let scores = q.unsqueeze(2) * k.unsqueeze(1);
        scores
            .softmax(-1, Kind::Float)
            .matmul(&v.unsqueeze(2))
            .squeeze_dim(2)
    }
}

impl Router for AttentionRouter {
    fn select(&self, x: &Tensor, _train: bool) -> Result<Routing> {
        self.check_input(x, self.query.ws.device())?;
        let p = self.expert_attention(x).to_kind(x.kind());
        Ok(softmax_top_k(p, self.dims.top_k, self.norm_topk_prob))
    }

    fn dims(&self) -> RouterDims {
        self.dims
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
