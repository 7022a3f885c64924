use crate::{Activation, BankWeights, ExpertConfig};
use moe_core::{as_kind_of, dropout, MoeError, Result, WeightInit};
use tch::{nn, Tensor};

/// `E` two-layer experts, stacked (makeMoE's `Expert`, or a SwiGLU FFN):
///
/// `FFN_e(x) = Dropout(act_e(x) W_out[e] (+ b_out[e]))`, with
/// `act_e(x) = ReLU(x W_in[e] (+ b_in[e]))` or
/// `act_e(x) = SiLU(x W_gate[e]) * (x W_in[e] (+ b_in[e]))`,
///
/// `W_in, W_gate: [E, d, h]`, `b_in: [E, h]`, `W_out: [E, h, d]`, `b_out: [E, d]`;
/// the biases exist only with [`ExpertConfig::bias`] (Mixtral, Qwen2-MoE,
/// DeepSeek and OLMoE experts have none).
/// `W_in[e]` is the transpose of PyTorch's `nn.Linear(d, h).weight`, so that
/// `x W_in[e]` needs no transpose and grouped GEMM reads the bank as it is.
/// Checkpoints store these tensors under `<layer>/experts/{w_in,b_in,w_gate,w_out,b_out}`.
#[derive(Debug)]
pub struct ExpertBank {
    /// Input projections `[E, d, h]`.
    pub w_in: Tensor,
    /// With [`ExpertConfig::bias`] only.
    pub b_in: Option<Tensor>,
    /// SwiGLU only.
    pub w_gate: Option<Tensor>,
    /// Output projections `[E, h, d]`.
    pub w_out: Tensor,
    /// With [`ExpertConfig::bias`] only.
    pub b_out: Option<Tensor>,
    config: ExpertConfig,
}

/// `t + b` where there is a bias `b`, `t` itself where there is none.
pub fn plus_bias(t: Tensor, b: Option<Tensor>) -> Tensor {
    match b {
        Some(b) => t + b,
        None => t,
    }
}

impl ExpertBank {
    /// Parameters: `p/w_in`, `p/w_out` and, with SwiGLU, `p/w_gate`, each
    /// weight drawn by `config.init` for its fans; with `config.bias`,
    /// `p/b_in` and `p/b_out` drawn as PyTorch's `nn.Linear` biases.
    pub fn new(p: &nn::Path, config: &ExpertConfig) -> Result<Self> {
        config.validate()?;
        let (e, d, h) = (config.num_experts, config.input_dim, config.hidden_dim);
        let init = config.init;
        let w_gate = match config.activation {
            Activation::Relu => None,
            Activation::SwiGlu => Some(p.var("w_gate", &[e, d, h], init.weight(d, h))),
        };
        let bias = config.bias;
        Ok(ExpertBank {
            w_in: p.var("w_in", &[e, d, h], init.weight(d, h)),
            b_in: bias.then(|| p.var("b_in", &[e, h], WeightInit::bias(d))),
            w_gate,
            w_out: p.var("w_out", &[e, h, d], init.weight(h, d)),
            b_out: bias.then(|| p.var("b_out", &[e, d], WeightInit::bias(h))),
            config: config.clone(),
        })
    }

    /// The bank's configuration.
    pub fn config(&self) -> &ExpertConfig {
        &self.config
    }

    /// Number of experts `E` in the bank.
    pub fn num_experts(&self) -> i64 {
        self.config.num_experts
    }

    /// Overwrites the bank's weights with `weights` (e.g. from
    /// [`crate::split_dense_ffn`] or [`crate::upcycle_dense_ffn`]); shapes
    /// and the presence of a gate and of biases must match the bank's config.
    pub fn load(&mut self, weights: &BankWeights) -> Result<()> {
        let mut pairs = vec![
            ("w_in", &mut self.w_in, &weights.w_in),
            ("w_out", &mut self.w_out, &weights.w_out),
        ];
        let optional = [
            ("w_gate", "SwiGLU gate", &mut self.w_gate, &weights.w_gate),
            ("b_in", "input bias", &mut self.b_in, &weights.b_in),
            ("b_out", "output bias", &mut self.b_out, &weights.b_out),
        ];
        for (name, meaning, dst, src) in optional {
            match (dst, src) {
                (Some(dst), Some(src)) => pairs.push((name, dst, src)),
                (None, None) => {}
                (dst, src) => {
                    return Err(MoeError::config(format!(
                        "expert weights {} `{name}` ({meaning}) but the bank {} (activation \
                         {:?}, bias {})",
                        if src.is_some() { "have" } else { "lack" },
                        if dst.is_some() { "has one" } else { "has none" },
                        self.config.activation,
                        self.config.bias
                    )))
                }
            }
        }
        for (name, dst, src) in &pairs {
            if dst.size() != src.size() {
                return Err(MoeError::Shape {
                    what: format!("expert weights {name}"),
                    expected: format!("{:?}", dst.size()),
                    got: src.size(),
                });
            }
        }
        tch::no_grad(|| {
            for (_, dst, src) in pairs {
                dst.copy_(src);
            }
        });
        Ok(())
    }

    /// The hidden activation from the two pre-activations: `ReLU(pre)` or
    /// `SiLU(gate) * pre`. Shared by every dispatch strategy, whatever way it
    /// computed `pre = x W_in (+ b_in)` and `gate = x W_gate`.
    pub fn activate(&self, pre: Tensor, gate: Option<Tensor>) -> Tensor {
        match (self.config.activation, gate) {
            (Activation::SwiGlu, Some(gate)) => gate.silu() * pre,
            _ => pre.relu(),
        }
    }

    /// Output dropout, applied to each (token, expert) output before weighting.
    pub fn output_dropout(&self, out: Tensor, train: bool) -> Tensor {
        dropout(&out, self.config.dropout, train)
    }

    /// Expert `e` on its tokens `x: [n, d]` -> `[n, d]`, dropout included.
    pub fn forward_expert(&self, e: i64, x: &Tensor, train: bool) -> Tensor {
        self.output_dropout(self.ffn(e, x), train)
    }

    /// The bank split along the expert axis (`unbind`), in `like`'s dtype,
    /// for strategies that loop over experts. Taking `w_in[e]` once per
    /// expert would give each expert's backward its own zero-filled
    /// gradient of the whole bank (`select`'s backward), `E` times the
    /// bank's size in memory traffic; `unbind`'s backward stacks the `E`
    /// gradients once.
    pub fn views(&self, like: &Tensor) -> ExpertViews {
        let split = |t: &Tensor| as_kind_of(t, like).unbind(0);
        ExpertViews {
            w_in: split(&self.w_in),
            b_in: self.b_in.as_ref().map(split),
            w_gate: self.w_gate.as_ref().map(split),
            w_out: split(&self.w_out),
            b_out: self.b_out.as_ref().map(split),
        }
    }

    /// Expert `e`'s FFN (no output dropout) through `views`, with the biases
    /// fused into the GEMMs: `act(b_in + x W_in) W_out + b_out` as two `addmm`
    /// (two `mm` without biases).
    pub fn ffn_view(&self, views: &ExpertViews, e: usize, x: &Tensor) -> Tensor {
        let affine = |x: &Tensor, w: &[Tensor], b: &Option<Vec<Tensor>>| match b {
            Some(b) => b[e].addmm(x, &w[e]),
            None => x.mm(&w[e]),
        };
        let pre = affine(x, &views.w_in, &views.b_in);
        let gate = views.w_gate.as_ref().map(|g| x.matmul(&g[e]));
        affine(&self.activate(pre, gate), &views.w_out, &views.b_out)
    }

    /// Expert `e`'s FFN without the output dropout (for strategies that
    /// apply dropout once to all slots).
    pub fn ffn(&self, e: i64, x: &Tensor) -> Tensor {
        let w = |t: &Tensor| as_kind_of(&t.get(e), x);
        let pre = plus_bias(x.matmul(&w(&self.w_in)), self.b_in.as_ref().map(w));
        let gate = self.w_gate.as_ref().map(|g| x.matmul(&w(g)));
        plus_bias(
            self.activate(pre, gate).matmul(&w(&self.w_out)),
            self.b_out.as_ref().map(w),
        )
    }

    /// Every expert at once as batched matmuls, without the output dropout:
    /// `x: [N, d]` (every expert on the same tokens) or `x: [E, C, d]` (one
    /// buffer of rows per expert) -> `[E, N or C, d]`, in `x`'s dtype.
    pub fn batched_ffn(&self, x: &Tensor) -> Tensor {
        let w = |t: &Tensor| as_kind_of(t, x);
        let b = |t: &Tensor| w(t).unsqueeze(1);
        let pre = plus_bias(x.matmul(&w(&self.w_in)), self.b_in.as_ref().map(b));
        let gate = self.w_gate.as_ref().map(|g| x.matmul(&w(g)));
        plus_bias(
            self.activate(pre, gate).matmul(&w(&self.w_out)),
            self.b_out.as_ref().map(b),
        )
    }

    /// Every expert on every token, `x: [N, d]` -> `[E, N, d]`: the dense
    /// reference computation.
    pub fn forward_all(&self, x: &Tensor, train: bool) -> Tensor {
        self.output_dropout(self.batched_ffn(x), train)
    }
}

/// One view per expert of each stacked parameter ([`ExpertBank::views`]).
#[derive(Debug)]
pub struct ExpertViews {
    w_in: Vec<Tensor>,
    b_in: Option<Vec<Tensor>>,
    w_gate: Option<Vec<Tensor>>,
    w_out: Vec<Tensor>,
    b_out: Option<Vec<Tensor>>,
}
