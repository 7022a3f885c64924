use crate::{Dispatch, Grouped};
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// The default strategy: dropless, no host synchronisation, chosen from the
/// measurements in `docs/performance.md` (`cargo bench --bench dispatch`,
/// `examples/dispatch_bench.rs`).
///
/// Today it is [`Grouped`] on every device. On an H200 (bf16, forward +
/// backward) it was the fastest dropless strategy at makeMoE's size (3.9x
/// faster than the mask loop), at 64 fine-grained experts (4.8x) and at the
/// mid size (1.5x); only at the largest size did the loops win, by 7%, as
/// their per-expert synchronisation is amortised over 16k-token GEMMs. It
/// never synchronises with the host, which the loops must do once per
/// expert. Where `_grouped_mm` does not support the device, dtype or sizes,
/// `Grouped` itself falls back to a loop over expert segments.
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
