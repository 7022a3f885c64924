use super::MakeMoeConfig;
use moe_block::{MoeOutput, SparseMoe};
use moe_core::{Checked, Result};
use moe_dispatch::ExpertParallelism;
use moe_nn::{CausalSelfAttention, KvCache};
use tch::{nn, nn::Module, Kind, Tensor};

/// A pre-LayerNorm transformer block whose feed-forward network is a sparse
/// MoE layer (makeMoE's `Block`): communication, then computation,
///
/// `h = x + Attn(LN_1(x))`, `y = h + MoE(LN_2(h))`.
///
/// The residual stream and the layer norms stay in the stream's dtype (f32);
/// attention and the MoE layer run in the config's compute dtype
/// ([`moe_core::Precision`]) and their outputs are cast back before the sums.
#[derive(Debug)]
pub struct Block {
    ln1: nn::LayerNorm,
    attn: CausalSelfAttention,
    ln2: nn::LayerNorm,
    moe: SparseMoe,
    compute: Kind,
}

impl Block {
    /// Parameters: `p/{ln1,attn,ln2,moe}`, of a checked model config
    /// (whose check covers the attention's and the MoE layer's).
    pub fn new(
        p: &nn::Path,
        config: &Checked<MakeMoeConfig>,
        parallelism: Option<&ExpertParallelism>,
    ) -> Result<Self> {
        let c = config.n_embd;
        Ok(Block {
            ln1: nn::layer_norm(p / "ln1", vec![c], Default::default()),
            attn: CausalSelfAttention::new(
                &(p / "attn"),
                Checked::derived(config.attention_config()),
            )?,
            ln2: nn::layer_norm(p / "ln2", vec![c], Default::default()),
            moe: SparseMoe::with_parallelism(
                &(p / "moe"),
                Checked::derived(config.moe_config()?),
                parallelism,
            )?,
            compute: config.precision.kind(),
        })
    }

    /// `x: [B, T, C]` -> the block's output and the MoE layer's routing.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<MoeOutput> {
        let a = self
            .attn
            .forward_t(&self.ln1.forward(x).to_kind(self.compute), train)?;
        self.moe_residual(x + a.to_kind(x.kind()), train)
    }

    /// [`Block::forward_t`] in evaluation mode for the positions after those
    /// in `cache` (incremental decoding).
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<MoeOutput> {
        let a = self
            .attn
            .forward_cached(&self.ln1.forward(x).to_kind(self.compute), cache)?;
        self.moe_residual(x + a.to_kind(x.kind()), false)
    }

    /// The computation half: `h + MoE(LN_2(h))`.
    fn moe_residual(&self, h: Tensor, train: bool) -> Result<MoeOutput> {
        let moe = self
            .moe
            .forward_t(&self.ln2.forward(&h).to_kind(self.compute), train)?;
        Ok(MoeOutput {
            output: moe.output.to_kind(h.kind()) + h,
            ..moe
        })
    }

    /// The block's self-attention.
    pub fn attention(&self) -> &CausalSelfAttention {
        &self.attn
    }

    /// The block's sparse MoE feed-forward layer.
    pub fn moe(&self) -> &SparseMoe {
        &self.moe
    }

    /// The sparse MoE layer, mutably (e.g. to update an aux-free router's bias).
    pub fn moe_mut(&mut self) -> &mut SparseMoe {
        &mut self.moe
    }
}
