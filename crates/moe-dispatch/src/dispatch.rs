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
