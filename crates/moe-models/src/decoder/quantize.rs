//! Weight-only quantisation of a decoder's routed experts for inference.

use super::{DecoderModel, FeedForward};
use moe_core::{MoeError, Result};
use moe_experts::ExpertQuantization;

impl DecoderModel {
    /// Quantises the routed experts of every MoE layer
    /// ([`moe_experts::ExpertBank::quantize`]; with
    /// [`ExpertQuantization::Int8`], per expert and output channel
    /// `s = max|w| / 127`, `q = clamp(round(w / s), -127, 127)`), for
    /// inference: the bank's float matrices are freed, so their
    /// `VarStore` entries become empty `[0]` tensors. Shared experts, dense
    /// MLPs, attention, norms, embeddings and the head stay float; the
    /// model then holds `(3 E H I)` bytes of routed-expert weights per MoE
    /// layer plus 4 bytes per expert and output channel, instead of
    /// `3 E H I` times the float dtype's size (bf16: 2).
    ///
    /// Load the weights first: a checkpoint load into a quantised model
    /// fails its shape check, and `forward_t` with `train = true` is an
    /// error. With expert parallelism each rank quantises its own share.
    /// An error if the experts are already quantised (nothing is changed
    /// then: every layer is checked first).
    pub fn quantize_experts(&mut self, quantization: ExpertQuantization) -> Result<()> {
        for layer in self.layers() {
            if let FeedForward::Moe(moe) = layer.feed_forward_network() {
                if let Some(current) = moe.experts().quantization() {
                    return Err(MoeError::config(format!(
                        "the routed experts are already quantised ({current})"
                    )));
                }
            }
        }
        for layer in self.layers_mut() {
            if let FeedForward::Moe(moe) = layer.feed_forward_network_mut() {
                moe.experts_mut().quantize(quantization)?;
            }
        }
        Ok(())
    }
}
