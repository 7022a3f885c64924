use super::DecoderConfig;
use moe_block::{MoeOutput, SparseMoe};
use moe_core::profile::span;
use moe_core::{Checked, Result, Routing};
use moe_dispatch::ExpertParallelism;
use moe_nn::{GroupedQueryAttention, KvCache, MultiHeadLatentAttention, RmsNorm, SwiGluMlp};
use tch::{nn, Kind, Tensor};

/// The attention half of a decoder layer.
#[derive(Debug)]
pub enum Attention {
    /// Grouped-query attention over rotary positions (LLaMA, Mixtral, ...).
    GroupedQuery(GroupedQueryAttention),
    /// Multi-head Latent Attention (DeepSeek-V2/V3).
    Latent(MultiHeadLatentAttention),
}

impl Attention {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Attention::GroupedQuery(a) => a.forward_t(x, train),
            Attention::Latent(a) => a.forward_t(x, train),
        }
    }

    fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            Attention::GroupedQuery(a) => a.forward_cached(x, cache),
            Attention::Latent(a) => a.forward_cached(x, cache),
        }
    }
}

/// The feed-forward half of a decoder layer.
#[derive(Debug)]
pub enum FeedForward {
    /// A SwiGLU MLP (LLaMA; DeepSeek's first `first_k_dense_replace` layers).
    Dense(SwiGluMlp),
    /// A sparse MoE layer (boxed: it is several times a dense MLP's size).
    Moe(Box<SparseMoe>),
}

/// A decoder layer's output: the new residual stream and, for an MoE
/// layer, its routing and balance loss.
#[derive(Debug)]
pub struct LayerOutput {
    /// `[B, T, d]`.
    pub hidden: Tensor,
    /// The MoE layer's routing (`None` for a dense layer).
    pub routing: Option<Routing>,
    /// The MoE layer's weighted balance loss, if any is configured.
    pub aux_loss: Option<Tensor>,
}

/// A pre-RMSNorm decoder layer (LLaMA, Mixtral, Qwen2-MoE, DeepSeek, OLMoE):
///
/// `h = x + Attn(RMSNorm_1(x))`, `y = h + FFN(RMSNorm_2(h))`,
///
/// with grouped-query (or latent) attention over rotary positions and a dense or MoE
/// feed-forward network. Parameters carry Hugging Face's names:
/// `p/{input_layernorm, self_attn, post_attention_layernorm, mlp}`.
#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
    compute: Kind,
}

impl DecoderLayer {
    /// Layer `index` of a model with the checked `config` (whose check
    /// covers every layer's attention and MoE config); an MoE layer's
    /// experts are spread over the ranks of `parallelism` when given.
    pub fn new(
        p: &nn::Path,
        config: &Checked<DecoderConfig>,
        index: i64,
        parallelism: Option<&ExpertParallelism>,
    ) -> Result<Self> {
        let d = config.hidden_size;
        let mlp = if config.is_moe_layer(index) {
            FeedForward::Moe(Box::new(SparseMoe::with_parallelism(
                &(p / "mlp"),
                Checked::derived(config.moe_config()),
                parallelism,
            )?))
        } else {
            FeedForward::Dense(SwiGluMlp::new(
                &(p / "mlp"),
                d,
                config.intermediate_size,
                false,
                config.init,
            )?)
        };
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), d, config.rms_norm_eps),
            self_attn: match config.latent_attention_config() {
                Some(mla) => Attention::Latent(MultiHeadLatentAttention::new(
                    &(p / "self_attn"),
                    Checked::derived(mla),
                )?),
                None => Attention::GroupedQuery(GroupedQueryAttention::new(
                    &(p / "self_attn"),
                    Checked::derived(config.attention_config_of(index)),
                )?),
            },
            post_attention_layernorm: RmsNorm::new(
                &(p / "post_attention_layernorm"),
                d,
                config.rms_norm_eps,
            ),
            mlp,
            compute: config.precision.kind(),
        })
    }

    /// `x: [B, T, d]` in training or evaluation mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<LayerOutput> {
        let normed = self.input_layernorm.forward(x).to_kind(self.compute);
        let attn = span("attention", || self.self_attn.forward_t(&normed, train))?;
        self.feed_forward(x + attn.to_kind(x.kind()), train)
    }

    /// [`DecoderLayer::forward_t`] in evaluation mode for the positions
    /// that follow those in `cache`.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<LayerOutput> {
        let normed = self.input_layernorm.forward(x).to_kind(self.compute);
        let attn = span("attention", || {
            self.self_attn.forward_cached(&normed, cache)
        })?;
        self.feed_forward(x + attn.to_kind(x.kind()), false)
    }

    /// Reads ahead the experts this layer's router would pick for the
    /// hidden state `x` (`[B, T, d]`, e.g. the previous layer's input),
    /// when its routed experts are left in the checkpoint's files
    /// ([`SparseMoe::prefetch_experts`]); nothing otherwise.
    pub fn prefetch_experts(&self, x: &Tensor) -> Result<()> {
        match &self.mlp {
            FeedForward::Moe(moe) if moe.experts().mapped_experts().is_some() => {
                let normed = self
                    .post_attention_layernorm
                    .forward(x)
                    .to_kind(self.compute);
                moe.prefetch_experts(&normed)
            }
            _ => Ok(()),
        }
    }

    /// `h + FFN(RMSNorm_2(h))`.
    fn feed_forward(&self, h: Tensor, train: bool) -> Result<LayerOutput> {
        let normed = self
            .post_attention_layernorm
            .forward(&h)
            .to_kind(self.compute);
        let (out, routing, aux_loss) = match &self.mlp {
            FeedForward::Dense(mlp) => (span("dense_mlp", || mlp.forward(&normed))?, None, None),
            FeedForward::Moe(moe) => {
                let MoeOutput {
                    output,
                    routing,
                    aux_loss,
                } = moe.forward_t(&normed, train)?;
                (output, Some(routing), aux_loss)
            }
        };
        Ok(LayerOutput {
            hidden: out.to_kind(h.kind()) + h,
            routing,
            aux_loss,
        })
    }

    /// The attention layer.
    pub fn attention(&self) -> &Attention {
        &self.self_attn
    }

    /// The feed-forward network.
    pub fn feed_forward_network(&self) -> &FeedForward {
        &self.mlp
    }

    /// The feed-forward network, e.g. to change an MoE layer's dispatch.
    pub fn feed_forward_network_mut(&mut self) -> &mut FeedForward {
        &mut self.mlp
    }
}
