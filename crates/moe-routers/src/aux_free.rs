use crate::config::wrong_gate;
use crate::{
    group_limited_selection, top_k_of_affinities, Gate, GroupScore, Router, RouterConfig,
    RouterDims,
};
use crate::{FromRouterSpec, RouterSpec};
use moe_core::Checked;
use moe_core::{linear, MoeError, Result, Routing, WeightInit};
use tch::{nn, Kind, Tensor};

/// Sigmoid gate with auxiliary-loss-free load balancing
/// ([`Gate::SigmoidAuxFree`]; DeepSeek-V3, arXiv 2412.19437, §2.1.2,
/// eq. 12-16; Wang et al. 2024, arXiv 2408.15664; HF `DeepseekV3TopkRouter`):
///
/// `s_{i,t} = sigmoid(u_t^T e_i)`, experts chosen by `TopK(s_{i,t} + b_i, k)`
/// within the `topk_group` best of `n_group` expert groups
/// ([`group_limited_selection`]; one group: no limit),
/// `g_{i,t} = s_{i,t} / sum_{j chosen} s_{j,t}` with `norm_topk_prob`, else
/// `g_{i,t} = s_{i,t}`.
///
/// The bias `b` steers selection only. It is not learned by gradient: after
/// each training step, [`Router::after_step`] applies
///
/// `b_i += gamma * sign(mean_j load_j - load_i)`,
///
/// lowering the bias of overloaded experts and raising that of idle ones.
/// `b` is a non-trainable variable (`p/expert_bias`), so checkpoints keep it.
/// The balance losses read `probs = s / sum_j s_j`, the normalised
/// affinities of DeepSeek-V3's sequence-wise loss (eq. 19).
#[derive(Debug)]
pub struct AuxFreeSigmoidRouter {
    gate: nn::Linear,
    expert_bias: Tensor,
    norm_topk_prob: bool,
    bias_update_rate: f64,
    groups: (i64, i64),
    dims: RouterDims,
    config: RouterConfig,
}

impl FromRouterSpec for AuxFreeSigmoidRouter {
    /// Parameters: `p/gate.weight` (`[E, d]`), `p/gate.bias` (`[E]`, with
    /// `config.bias`) and the buffer `p/expert_bias` (`[E]`).
    fn from_spec(p: &nn::Path, spec: &Checked<RouterSpec>, init: WeightInit) -> Result<Self> {
        let (dims, config) = (spec.dims, &spec.config);
        let Gate::SigmoidAuxFree {
            norm_topk_prob,
            bias_update_rate,
            n_group,
            topk_group,
        } = config.gate
        else {
            return Err(wrong_gate(
                "AuxFreeSigmoidRouter",
                "sigmoid_aux_free",
                &config.gate,
            ));
        };
        let (d, e) = (dims.input_dim, dims.num_experts);
        Ok(AuxFreeSigmoidRouter {
            gate: linear(p / "gate", d, e, config.bias, init),
            // In the store's dtype, as every parameter (a bf16 model loaded
            // as bf16 holds it in bf16, as transformers does).
            expert_bias: p.add(
                "expert_bias",
                Tensor::zeros([e], (p.kind(), p.device())),
                false,
            ),
            norm_topk_prob,
            bias_update_rate,
            groups: (n_group, topk_group),
            dims,
            config: config.clone(),
        })
    }
}

impl AuxFreeSigmoidRouter {
    /// The balancing bias `b`, `[E]`.
    pub fn expert_bias(&self) -> &Tensor {
        &self.expert_bias
    }
}

impl Router for AuxFreeSigmoidRouter {
    fn select(&self, x: &Tensor, _train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        let logits = moe_core::router_logits(x, &self.gate);
        let affinity = logits.sigmoid();
        let selection = (&affinity + self.expert_bias.to_kind(affinity.kind())).detach();
        let (n_group, topk_group) = self.groups;
        let selection =
            group_limited_selection(&selection, n_group, topk_group, GroupScore::TopTwoSum)?;
        let probs = &affinity / affinity.sum_dim_intlist(-1, true, None);
        Ok(top_k_of_affinities(
            logits,
            &affinity,
            &selection,
            probs,
            self.dims.top_k,
            self.norm_topk_prob,
        ))
    }

    fn after_step_with_counts(&self, counts: &Tensor) -> Result<()> {
        if counts.size() != [self.dims.num_experts] {
            return Err(MoeError::config(format!(
                "after_step got expert counts of shape {:?}, the router has {} experts",
                counts.size(),
                self.dims.num_experts
            )));
        }
        let load = counts.to_kind(Kind::Float);
        let step = (load.mean(Kind::Float) - &load).sign() * self.bias_update_rate;
        let mut bias = self.expert_bias.shallow_clone();
        tch::no_grad(|| {
            let _ = bias.g_add_(&step.to_device(bias.device()).to_kind(bias.kind()));
        });
        Ok(())
    }

    fn dims(&self) -> RouterDims {
        self.dims
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
