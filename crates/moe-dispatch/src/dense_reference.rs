use crate::Dispatch;
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// Every expert on every token, then weighted by the dense gate matrix:
///
/// `y = sum_e G[:, e] * FFN_e(x)`, `G = Routing::dense_gates()` (zero off
/// the chosen (token, expert) pairs).
///
/// `E / k` times the work of a sparse layer; the oracle for tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseReference;

impl Dispatch for DenseReference {
    fn name(&self) -> &'static str {
        "dense_reference"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        let all = experts.forward_all(x, train); // [E, N, d]
        let gates = routing.dense_gates().to_kind(all.kind()); // [N, E]
        (all * gates.transpose(0, 1).unsqueeze(-1)).sum_dim_intlist(0, false, None)
    }
}
