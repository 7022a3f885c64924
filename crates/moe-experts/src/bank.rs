use crate::ExpertConfig;
use moe_core::{Result, WeightInit};
use tch::{nn, Tensor};

/// `E` two-layer ReLU experts (makeMoE's `Expert`), stacked:
///
/// `FFN_e(x) = Dropout(ReLU(x W_in[e] + b_in[e]) W_out[e] + b_out[e])`
///
/// with `W_in: [E, d, h]`, `b_in: [E, h]`, `W_out: [E, h, d]`, `b_out: [E, d]`.
/// Note the layout: `W_in[e]` is the transpose of PyTorch's
/// `nn.Linear(d, h).weight`, so that `x W_in[e]` needs no transpose and the
/// bank is ready for grouped GEMM. Checkpoints store these four tensors under
/// `<layer>/experts/{w_in,b_in,w_out,b_out}`.
#[derive(Debug)]
pub struct ExpertBank {
    pub w_in: Tensor,
    pub b_in: Tensor,
    pub w_out: Tensor,
    pub b_out: Tensor,
    config: ExpertConfig,
}

impl ExpertBank {
    pub fn new(p: &nn::Path, config: &ExpertConfig) -> Result<Self> {
        config.validate()?;
        let (e, d, h) = (config.num_experts, config.input_dim, config.hidden_dim);
        let init = config.init;
        Ok(ExpertBank {
            w_in: p.var("w_in", &[e, d, h], init.weight(d, h)),
            b_in: p.var("b_in", &[e, h], WeightInit::bias(d)),
            w_out: p.var("w_out", &[e, h, d], init.weight(h, d)),
            b_out: p.var("b_out", &[e, d], WeightInit::bias(h)),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ExpertConfig {
        &self.config
    }

    pub fn num_experts(&self) -> i64 {
        self.config.num_experts
    }

    /// Expert `e` on its tokens `x: [n, d]` -> `[n, d]`.
    pub fn forward_expert(&self, e: i64, x: &Tensor, train: bool) -> Tensor {
        let hidden = (x.matmul(&self.w_in.get(e)) + self.b_in.get(e)).relu();
        let out = hidden.matmul(&self.w_out.get(e)) + self.b_out.get(e);
        out.dropout(self.config.dropout, train)
    }

    /// Every expert on every token, `x: [N, d]` -> `[E, N, d]`: the dense
    /// reference computation, `E` times the work of a sparse layer with k = 1.
    pub fn forward_all(&self, x: &Tensor, train: bool) -> Tensor {
        let hidden = (x.matmul(&self.w_in) + self.b_in.unsqueeze(1)).relu();
        let out = hidden.matmul(&self.w_out) + self.b_out.unsqueeze(1);
        out.dropout(self.config.dropout, train)
    }
}
