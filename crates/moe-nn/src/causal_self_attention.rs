use crate::sdpa::{causal_attention, causal_attention_math, Visibility};
use crate::{AttentionConfig, AttentionPath, KvCache};
use moe_core::{
    as_kind_of, check_float, check_rank, check_same_device, dropout, linear, linear_in_input_dtype,
    IntoChecked, MoeError, Result,
};
use tch::{nn, Tensor};

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
    pub fn new(p: &nn::Path, config: impl IntoChecked<AttentionConfig>) -> Result<Self> {
        let config = config.into_checked()?;
        let c = config.n_embd;
        let qkv = moe_core::var(
            p,
            "qkv",
            &[3 * c, c],
            config.init.weight(c, config.head_size()),
        );
        let proj = linear(p / "proj", c, c, true, config.init);
        Ok(CausalSelfAttention {
            qkv,
            proj,
            config: config.into_inner(),
        })
    }

    /// The layer's configuration.
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
        let out = linear_in_input_dtype(&heads, &self.proj);
        Ok(dropout(&out, self.config.dropout, train))
    }

    /// Incremental decoding (evaluation mode): `x` holds the `T_new` positions
    /// that follow the `T_past` positions of `cache`, `[B, T_new, C]`; they
    /// attend to the cached keys and values and to each other causally, and
    /// their keys and values are appended to the cache. Computes what
    /// [`Self::forward_t`] computes at those positions on the whole sequence
    /// (`T_past + T_new <= block_size`).
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.check_input_len(x, cache.len() + x.size().get(1).copied().unwrap_or(0))?;
        let (b, t, c) = x.size3().expect("checked rank 3");
        if let Some(cached) = cache.batch_size().filter(|&cached| cached != b) {
            return Err(MoeError::Shape {
                what: "attention input with a KV cache".into(),
                expected: format!("batch size {cached}, the cached sequences'"),
                got: x.size(),
            });
        }
        if cache.padding().is_some() {
            return Err(MoeError::config(
                "makeMoE's attention cannot take a left-padded batch: its positions are learned \
                 and absolute, so padding would shift every position of a shorter prompt (batch \
                 prompts of equal length, or generate them one by one)",
            ));
        }
        let (h, hs) = (self.config.n_head, self.config.head_size());
        let past = cache.len();
        let qkv = x.linear::<Tensor>(&as_kind_of(&self.qkv, x), None);
        let split = |i: i64| qkv.narrow(2, i * c, c).view([b, t, h, hs]).transpose(1, 2);
        let (keys, values) = cache.append(split(1), split(2))?;
        let scale = self.config.scale_factor();
        let heads = causal_attention(
            &split(0),
            &keys,
            &values,
            past,
            scale,
            0.0,
            Visibility::default(),
        )
        .transpose(1, 2)
        .contiguous()
        .view([b, t, c]);
        Ok(linear_in_input_dtype(&heads, &self.proj))
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        self.check_input_len(x, x.size().get(1).copied().unwrap_or(0))
    }

    /// Rank, dtype and device of `x`, and `len <= block_size`.
    fn check_input_len(&self, x: &Tensor, len: i64) -> Result<()> {
        check_rank(x, "attention input [B, T, C]", 3, Some(self.config.n_embd))?;
        check_float(x, "attention input")?;
        check_same_device(x, "attention input", self.qkv.device())?;
        if len > self.config.block_size {
            return Err(MoeError::SequenceTooLong {
                len,
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
        let qkv = x.linear::<Tensor>(&as_kind_of(&self.qkv, x), None);
        let split = |i: i64| qkv.narrow(2, i * c, c).view([b, t, h, hs]).transpose(1, 2);
        let (q, k, v) = (split(0), split(1), split(2));
        let scale = self.config.scale_factor();
        let p = if train { self.config.dropout } else { 0.0 };
        let heads = causal_attention(&q, &k, &v, 0, scale, p, Visibility::default());
        heads.transpose(1, 2).contiguous().view([b, t, c])
    }

    /// makeMoE's `Head.forward`, once per head, outputs concatenated.
    fn heads_per_head(&self, x: &Tensor, train: bool) -> Tensor {
        let (c, hs) = (self.config.n_embd, self.config.head_size());
        let p = if train { self.config.dropout } else { 0.0 };
        let qkv = as_kind_of(&self.qkv, x);
        let heads: Vec<Tensor> = (0..self.config.n_head)
            .map(|head| {
                let rows = |block: i64| qkv.narrow(0, block * c + head * hs, hs);
                let project = |block: i64| x.linear::<Tensor>(&rows(block), None);
                causal_attention_math(
                    &project(0),
                    &project(1),
                    &project(2),
                    0,
                    self.config.scale_factor(),
                    p,
                )
            })
            .collect();
        Tensor::cat(&heads, -1)
    }
}
