use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// A way to send tokens to their experts and combine the results.
pub trait Dispatch: std::fmt::Debug + Send + Sync {
    /// Short name, as used in configs and benchmark tables.
    fn name(&self) -> &'static str;

    /// `x: [N, d]` -> `y: [N, d]`, `y_n = sum_{s : token[s] = n} weight[s]
    /// FFN_{expert[s]}(x_n)` over the routing's slots (token or expert
    /// choice alike). Shapes are the caller's contract (the MoE layer checks
    /// them).
    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor;
}

/// `y_n = sum_{s : token[s] = n} weight[s] * rows[row_of_slot[s]]`: each
/// token sums the output rows of its slots, weighted (`slot_weight`, `[S]`
/// in slot order, zero for a dropped slot; `row_of_slot` where a strategy's
/// output holds each slot).
///
/// Under token choice (`k` slots per token, token-major) a gather and a
/// reduction over `k` rather than a scatter-add into `y`, so the forward
/// pass needs no atomics (slow for bf16 on CUDA) and its result does not
/// depend on the order in which slots land. Under expert choice a token has
/// any number of slots, which an `index_add` into `y` sums.
pub(crate) fn gather_weighted_sum(
    rows: &Tensor,
    row_of_slot: &Tensor,
    slot_weight: &Tensor,
    routing: &Routing,
) -> Tensor {
    let (n, d) = (routing.num_tokens(), rows.size()[1]);
    let weighted =
        rows.index_select(0, row_of_slot) * slot_weight.to_kind(rows.kind()).unsqueeze(1);
    match routing.top_k {
        Some(k) => weighted.view([n, k, d]).sum_dim_intlist(1, false, None),
        None => weighted
            .new_zeros([n, d], (weighted.kind(), weighted.device()))
            .index_add(0, &routing.token, &weighted),
    }
}
