//! The selection mechanisms every router shares: keep the `k` best experts
//! and weight them, either by a softmax over the kept scores or by the
//! probabilities the scores already are.

use moe_core::Routing;
use tch::{Kind, Tensor};

/// Keeps the `k` largest `logits` per row and softmaxes over them alone:
///
/// `G(x) = softmax(KeepTopK(l, k))`, with `KeepTopK` setting every other
/// entry to `-inf` (Shazeer et al. 2017, arXiv 1701.06538, eq. 3-5; Mixtral,
/// arXiv 2401.04088). The weights `[N, k]` are that softmax read at the
/// chosen experts; they sum to 1. `probs` is the softmax over all `E` logits.
pub fn top_k_softmax(logits: Tensor, k: i64) -> Routing {
    let num_experts = logits.size()[1];
    let (values, indices) = logits.topk(k, -1, true, true);
    let weights = values.softmax(-1, Kind::Float).to_kind(logits.kind());
    let probs = logits.softmax(-1, Kind::Float).to_kind(logits.kind());
    Routing {
        indices,
        weights,
        logits,
        probs,
        dropped: None,
        num_experts,
    }
}

/// Chooses the `k` largest entries of `selection` per row and weights each
/// chosen expert by its `affinity`, optionally renormalised over the `k`:
///
/// `g_i = s_i` for `i in TopK(selection, k)` (DeepSeekMoE, arXiv 2401.06066,
/// eq. 5), or `g_i = s_i / sum_{j in TopK} s_j` when `renormalise`
/// (DeepSeek-V3, arXiv 2412.19437, eq. 13).
///
/// `selection` is `affinity` itself (DeepSeekMoE) or `affinity + bias`
/// (DeepSeek-V3's auxiliary-loss-free balancing): the bias steers the
/// choice but never the weights. `probs` (rows summing to 1) is what the
/// balance losses read.
pub fn top_k_of_affinities(
    logits: Tensor,
    affinity: &Tensor,
    selection: &Tensor,
    probs: Tensor,
    k: i64,
    renormalise: bool,
) -> Routing {
    let num_experts = logits.size()[1];
    let (_, indices) = selection.topk(k, -1, true, true);
    let mut weights = affinity.gather(1, &indices, false);
    if renormalise {
        weights = &weights / weights.sum_dim_intlist(-1, true, None);
    }
    Routing {
        indices,
        weights,
        logits,
        probs,
        dropped: None,
        num_experts,
    }
}
