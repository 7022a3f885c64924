//! The selection mechanisms every router shares: keep the `k` best experts
//! and weight them, either by a softmax over the kept scores or by the
//! probabilities the scores already are; and DeepSeek-V3's group limit on
//! the experts a token may choose from.

use moe_core::{accumulation_kind, check_rank, MoeError, Result, Routing};
use tch::Tensor;

/// Keeps the `k` largest `logits` per row and softmaxes over them alone:
///
/// `G(x) = softmax(KeepTopK(l, k))`, with `KeepTopK` setting every other
/// entry to `-inf` (Shazeer et al. 2017, arXiv 1701.06538, eq. 3-5; Mixtral,
/// arXiv 2401.04088). The weights `[N, k]` are that softmax read at the
/// chosen experts; they sum to 1. `probs` is the softmax over all `E` logits.
pub fn top_k_softmax(logits: Tensor, k: i64) -> Routing {
    let (values, indices) = logits.topk(k, -1, true, true);
    let weights = values
        .softmax(-1, accumulation_kind(logits.kind()))
        .to_kind(logits.kind());
    let probs = logits
        .softmax(-1, accumulation_kind(logits.kind()))
        .to_kind(logits.kind());
    Routing::token_choice(indices, weights, logits, probs)
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
    let (_, indices) = selection.topk(k, -1, true, true);
    let mut weights = affinity.gather(1, &indices, false);
    if renormalise {
        weights = &weights / weights.sum_dim_intlist(-1, true, None);
    }
    Routing::token_choice(indices, weights, logits, probs)
}

/// How [`group_limited_selection`] scores a group of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// The sum of its two largest selection scores (its one score when
    /// groups hold one expert): DeepSeek-V3's `noaux_tc`.
    TopTwoSum,
    /// Its largest selection score: DeepSeek-V2's `group_limited_greedy`.
    Max,
}

/// Group-limited selection (DeepSeek-V3, arXiv 2412.19437, §2.1.2 and
/// §3.2.2 "node-limited routing"; DeepSeek-V2, arXiv 2405.04434, §2.2.3
/// "device-limited routing"; HF `DeepseekV3TopkRouter` and
/// `DeepseekV2TopkRouter`): the `E` experts form `n_group` contiguous
/// groups of `E / n_group`; each group is scored from its selection scores
/// ([`GroupScore`]), the `topk_group` best groups of each token are kept,
/// and the scores of every expert outside them become `-inf`:
///
/// `score_g = sum Top2({sel_i : i in g})` (V3) or `max({sel_i : i in g})`
/// (V2), `G_t = TopK(score, topk_group)`,
/// `sel'_i = sel_i` if `group(i) in G_t`, else `-inf`.
///
/// A top-k of the returned `[N, E]` scores then chooses only inside the kept
/// groups, given `k <= topk_group * E / n_group` (checked by
/// [`crate::Gate::validate`]). HF masks with 0 instead of `-inf`, which is
/// the same while every score is positive (a softmax, or sigmoid + a small
/// bias); with the aux-free bias a score can turn negative, and a masked 0
/// would then beat it, so `-inf` keeps the group limit exact. `n_group = 1`
/// returns the scores unchanged.
pub fn group_limited_selection(
    selection: &Tensor,
    n_group: i64,
    topk_group: i64,
    score: GroupScore,
) -> Result<Tensor> {
    check_rank(selection, "selection scores [N, E]", 2, None)?;
    let (n, e) = (selection.size()[0], selection.size()[1]);
    check_groups(e, n_group, topk_group)?;
    if n_group == 1 {
        return Ok(selection.shallow_clone());
    }
    let size = e / n_group;
    let grouped = selection.view([n, n_group, size]);
    let group_scores = match score {
        GroupScore::TopTwoSum => {
            let (best, _) = grouped.topk(size.min(2), -1, true, false);
            best.sum_dim_intlist(-1, false, None)
        }
        GroupScore::Max => grouped.amax(-1, false),
    }; // [N, n_group]
    let (_, kept) = group_scores.topk(topk_group, -1, true, false);
    let keep = group_scores
        .zeros_like()
        .scatter_value(1, &kept, 1.0)
        .gt(0.5)
        .unsqueeze(-1)
        .expand([n, n_group, size], false)
        .reshape([n, e]);
    Ok(selection.masked_fill(&keep.logical_not(), f64::NEG_INFINITY))
}

/// `n_group >= 1` dividing `num_experts`, `1 <= topk_group <= n_group`.
pub(crate) fn check_groups(num_experts: i64, n_group: i64, topk_group: i64) -> Result<()> {
    if n_group < 1 || num_experts % n_group != 0 {
        return Err(MoeError::config(format!(
            "n_group must be at least 1 and divide the {num_experts} routed experts into \
             equal groups, got n_group = {n_group}"
        )));
    }
    if topk_group < 1 || topk_group > n_group {
        return Err(MoeError::config(format!(
            "topk_group must be in 1..={n_group} (n_group), got {topk_group}"
        )));
    }
    Ok(())
}

/// The softmax gates' selection (top-k, noisy top-k, attention): the `k`
/// largest `logits`, weighted by the softmax over those `k`
/// ([`top_k_softmax`]) when `norm_topk_prob`, else by the softmax over all
/// `E` read at the `k` (DeepSeekMoE, Qwen2-MoE, OLMoE).
pub fn softmax_top_k(logits: Tensor, k: i64, norm_topk_prob: bool) -> Routing {
    if norm_topk_prob {
        return top_k_softmax(logits, k);
    }
    let probs = logits
        .softmax(-1, accumulation_kind(logits.kind()))
        .to_kind(logits.kind());
    top_k_of_affinities(logits, &probs, &probs, probs.shallow_clone(), k, false)
}
