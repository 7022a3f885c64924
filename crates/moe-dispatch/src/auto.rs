use crate::{Dispatch, Grouped};
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// The default strategy: dropless, no host synchronisation, chosen from the
/// measurements in `docs/performance.md` (`cargo bench --bench dispatch`,
/// `examples/dispatch_bench.rs`).
///
/// Today it is [`Grouped`] on every device: sort + grouped GEMM was the
/// fastest dropless strategy on CPU (fp32) and CUDA (bf16) at every
/// benchmarked size; where `_grouped_mm` does not support the device, dtype
/// or sizes, `Grouped` itself falls back to a loop over expert segments.
#[derive(Debug, Clone, Copy, Default)]
pub struct Auto;

impl Dispatch for Auto {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        Grouped.combine(x, routing, experts, train)
    }
}
