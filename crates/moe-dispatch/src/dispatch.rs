use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// A way to send tokens to their experts and combine the results.
pub trait Dispatch: std::fmt::Debug + Send + Sync {
    /// Short name, as used in configs and benchmark tables.
    fn name(&self) -> &'static str;

    /// `x: [N, d]` -> `y: [N, d]`, `y_n = sum_j w[n, j] FFN_{i[n, j]}(x_n)`.
    /// Shapes are the caller's contract (the MoE layer checks them).
    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor;
}

/// `y_n = sum_j w[n, j] * rows[row_of_slot[n k + j]]`: each token gathers its
/// `k` expert outputs from a strategy's output rows and sums them weighted.
/// A gather and a reduction over `k` rather than a scatter-add into `y`, so
/// the forward pass needs no atomics (slow for bf16 on CUDA) and its result
/// does not depend on the order in which slots land. `slot_weight` is `[N k]`
/// in slot order (zero for a dropped slot).
pub(crate) fn gather_weighted_sum(
    rows: &Tensor,
    row_of_slot: &Tensor,
    slot_weight: &Tensor,
    (n, k): (i64, i64),
) -> Tensor {
    let d = rows.size()[1];
    (rows.index_select(0, row_of_slot) * slot_weight.to_kind(rows.kind()).unsqueeze(1))
        .view([n, k, d])
        .sum_dim_intlist(1, false, None)
}
