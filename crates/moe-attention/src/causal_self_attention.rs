use crate::{AttentionConfig, AttentionPath};
use moe_core::{check_float, check_rank, check_same_device, linear, MoeError, Result};
use tch::{nn, nn::Module, Kind, Tensor};

/// Causal multi-head self-attention:
///
/// `Attention(Q, K, V) = softmax(s * Q K^T + M) V` per head, with
/// `Q = x W_q`, `K = x W_k`, `V = x W_v`, `M[i, j] = -inf` for `j > i`,
/// then `y = Dropout(concat_h(head_h) W_o + b_o)` (Vaswani et al. 2017).
///
/// The three projections are stored as one `[3C, C]` matrix without bias
/// (`qkv`), rows `[0, C)` for queries, `[C, 2C)` for keys, `[2C, 3C)` for
/// values, head `h` owning rows `h*hs .. (h+1)*hs` of each: the same
/// parameters as makeMoE's per-head `query`, `key` and `value` layers.
#[derive(Debug)]
pub struct CausalSelfAttention {
    qkv: Tensor,
    proj: nn::Linear,
    config: AttentionConfig,
}

impl CausalSelfAttention {
    /// Creates the layer's parameters under `p` (`p/qkv`, `p/proj`).
    pub fn new(p: &nn::Path, config: AttentionConfig) -> Result<Self> {
        config.validate()?;
        let c = config.n_embd;
        let qkv = p.var(
            "qkv",
            &[3 * c, c],
            config.init.weight(c, config.head_size()),
        );
        let proj = linear(p / "proj", c, c, true, config.init);
        Ok(CausalSelfAttention { qkv, proj, config })
    }

    pub fn config(&self) -> &AttentionConfig {
        &self.config
    }

    /// Switches the implementation; both paths read the same parameters.
    pub fn set_path(&mut self, path: AttentionPath) {
        self.config.path = path;
    }

    /// `x`: `[B, T, C]` with `T <= block_size`; returns `[B, T, C]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x)?;
        let heads = match self.config.path {
            AttentionPath::Fused => self.heads_fused(x, train),
            AttentionPath::PerHead => self.heads_per_head(x, train),
        };
        let dropout = if train { self.config.dropout } else { 0.0 };
        Ok(self.proj.forward(&heads).dropout(dropout, train))
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        check_rank(x, "attention input [B, T, C]", 3, Some(self.config.n_embd))?;
        check_float(x, "attention input")?;
        check_same_device(x, "attention input", self.qkv.device())?;
        let t = x.size()[1];
        if t > self.config.block_size {
            return Err(MoeError::SequenceTooLong {
                len: t,
                block_size: self.config.block_size,
            });
        }
        Ok(())
    }

    /// All heads at once: one qkv matmul, then libtorch's fused kernel
    /// (flash / memory-efficient attention where available).
    fn heads_fused(&self, x: &Tensor, train: bool) -> Tensor {
        let (b, t, c) = x.size3().expect("checked rank 3");
        let (h, hs) = (self.config.n_head, self.config.head_size());
        let qkv = x.linear::<Tensor>(&self.qkv, None);
        let split = |i: i64| qkv.narrow(2, i * c, c).view([b, t, h, hs]).transpose(1, 2);
        let dropout = if train { self.config.dropout } else { 0.0 };
        Tensor::scaled_dot_product_attention::<Tensor>(
            &split(0),
            &split(1),
            &split(2),
            None,
            dropout,
            true,
            self.config.scale_factor(),
            false,
        )
        .transpose(1, 2)
        .contiguous()
        .view([b, t, c])
    }

    /// makeMoE's `Head.forward`, once per head, outputs concatenated.
    fn heads_per_head(&self, x: &Tensor, train: bool) -> Tensor {
        let t = x.size()[1];
        let (c, hs) = (self.config.n_embd, self.config.head_size());
        let causal = Tensor::ones([t, t], (Kind::Bool, x.device())).tril(0);
        let heads: Vec<Tensor> = (0..self.config.n_head)
            .map(|head| {
                let rows = |block: i64| self.qkv.narrow(0, block * c + head * hs, hs);
                let q = x.linear::<Tensor>(&rows(0), None);
                let k = x.linear::<Tensor>(&rows(1), None);
                let v = x.linear::<Tensor>(&rows(2), None);
                let wei = (q.matmul(&k.transpose(-2, -1)) * self.config.scale_factor())
                    .masked_fill(&causal.logical_not(), f64::NEG_INFINITY)
                    .softmax(-1, Kind::Float)
                    .to_kind(x.kind())
                    .dropout(self.config.dropout, train);
                wei.matmul(&v)
            })
            .collect();
        Tensor::cat(&heads, -1)
    }
}
