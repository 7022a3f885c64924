use crate::{Dispatch, Grouped, IndexedLoop};
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// The default strategy: dropless, no host synchronisation, chosen from the
/// measurements in `docs/performance.md` (`cargo bench -p moe-lab --bench dispatch`,
/// `lab/src/bin/dispatch_bench.rs`).
///
/// It is [`Grouped`], except for forward passes in evaluation mode on CPU,
/// where it is [`IndexedLoop`]. On an H200 (bf16, forward +
/// backward) it was the fastest dropless strategy at makeMoE's size (3.9x
/// faster than the mask loop), at 64 fine-grained experts (4.8x) and at the
/// mid size (1.5x); only at the largest size did the loops win, by 7%, as
/// their per-expert synchronisation is amortised over 16k-token GEMMs. It
/// never synchronises with the host, which the loops must do once per
/// expert. Where `_grouped_mm` does not support the device, dtype or sizes,
/// `Grouped` itself falls back to a loop over expert segments.
///
/// On CPU a host synchronisation costs nothing, and per-expert BLAS GEMMs
/// beat libtorch's CPU `_grouped_mm` in forward passes (makeMoE's size:
/// 5.0 vs 10.7 ms, `scripts/cpu_grouped_mm.py`), so the index loop wins
/// where no backward pass follows: evaluating the makeMoE model (2 x 20 batches, in chunks of 1024
/// sequences) took 2.4 s with the index loop and 4.3 s with `Grouped` on the
/// 2-core development machine (`train_bench --device cpu --eval-iters 20`).
/// In training `Grouped` stays faster there (383 vs 454 ms per step with one
/// thread), because its backward is two grouped GEMMs instead of a loop.
#[derive(Debug, Clone, Copy, Default)]
pub struct Auto;

impl Dispatch for Auto {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        if !train && x.device() == tch::Device::Cpu {
            IndexedLoop.combine(x, routing, experts, train)
        } else {
            Grouped.combine(x, routing, experts, train)
        }
    }
}
