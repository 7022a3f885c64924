use crate::dispatch::gather_weighted_sum;
use crate::{Dispatch, SortedSlots};
use moe_core::Routing;
use moe_experts::{plus_bias, ExpertBank};
use std::collections::HashMap;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Dropless sorted dispatch with grouped GEMM (MegaBlocks, Gale et al. 2022,
/// arXiv 2211.15841; the `_grouped_mm` path of PyTorch's MoE code):
///
/// 1. sort the `S` slots (`N k` under token choice) by expert (stable),
///    counts -> offsets;
/// 2. gather `x` once into expert-contiguous rows `X_s`;
/// 3. `H = act(GroupedMM(X_s, W_in, offsets) (+ b_in[e_s]))` (the gate's
///    product with its bias likewise),
///    `O = GroupedMM(H, W_out, offsets) (+ b_out[e_s])` — every expert's segment
///    in one kernel, no padding, no dropped token;
/// 4. each token gathers its `k` rows back and sums them weighted (no
///    scatter-add, so no atomics); under expert choice, where a token has
///    any number of rows, an `index_add` sums them.
///
/// On a GPU nothing is read back to the host, in forward or backward, where
/// libtorch has a native `_grouped_mm` kernel (bf16 on sm90/sm100; its
/// fallback for other cases reads the offsets back itself). Where
/// `_grouped_mm` does not support the device, dtype or sizes (probed once
/// and remembered), and on CPU from `CPU_SEGMENT_LOOP_MIN_ROWS` rows per
/// expert, the GEMMs run as a loop over segments, which reads the segment
/// sizes back once per call. A quantised bank ([`ExpertBank::quantize`])
/// always takes the loop: `_grouped_mm` has no int8-weight form, and the
/// loop's per-expert products read the int8 weights directly
/// ([`ExpertBank::ffn_view`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Grouped;

impl Dispatch for Grouped {
    fn name(&self) -> &'static str {
        "grouped"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        let slots = SortedSlots::new(routing);
        let xs = x.index_select(0, &slots.token);
        let segments = Segments {
            counts: &slots.counts,
            offsets: &slots.offsets,
            expert: &slots.expert,
        };
        let out = experts.output_dropout(run_segments(experts, &xs, &segments), train);
        gather_weighted_sum(&out, &slots.position, &routing.weight, routing)
    }
}

/// Rows sorted by expert: segment `e` holds `counts[e]` rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segments<'a> {
    /// Rows per expert, `[E]` int64.
    pub counts: &'a Tensor,
    /// End offset of each segment, `[E]` int32 (cumulative counts).
    pub offsets: &'a Tensor,
    /// Expert of each row (non-decreasing), `[R]` int64.
    pub expert: &'a Tensor,
}

/// Every expert of the bank on its segment of `xs` (`[R, d]` sorted by
/// expert): two grouped GEMMs, or a loop of GEMMs over segments where that
/// is faster or `_grouped_mm` cannot run (a quantised bank among them).
pub(crate) fn run_segments(experts: &ExpertBank, xs: &Tensor, segments: &Segments<'_>) -> Tensor {
    let rows = xs.size()[0];
    let rows_per_expert = rows / experts.num_experts().max(1);
    let loop_is_faster = xs.device() == Device::Cpu && rows_per_expert >= CPU_SEGMENT_LOOP_MIN_ROWS;
    if rows == 0 || loop_is_faster || !grouped_mm_supported(experts, xs.kind()) {
        expert_segments_looped(experts, xs, segments)
    } else {
        expert_segments_grouped(experts, xs, segments)
    }
}

/// All experts on their contiguous segments of `xs` with two grouped GEMMs.
fn expert_segments_grouped(experts: &ExpertBank, xs: &Tensor, slots: &Segments<'_>) -> Tensor {
    // Weights follow the activations' dtype (bf16 autocast keeps fp32 masters).
    let kind = xs.kind();
    let mm = |a: &Tensor, w: &Tensor| {
        a.internal_grouped_mm(&w.to_kind(kind), Some(slots.offsets), None, None)
    };
    // Each row's expert bias, where the experts have biases.
    let bias = |b: &Option<Tensor>| {
        b.as_ref()
            .map(|b| b.index_select(0, slots.expert).to_kind(kind))
    };
    let pre = plus_bias(mm(xs, &experts.w_in), bias(&experts.b_in));
    let gate = experts
        .w_gate
        .as_ref()
        .map(|w| plus_bias(mm(xs, w), bias(&experts.b_gate)));
    let hidden = experts.activate(pre, gate);
    plus_bias(mm(&hidden, &experts.w_out), bias(&experts.b_out))
}

/// The same computation as a loop over segments (fallback; one host read).
/// One bias-fused GEMM pair per non-empty segment ([`ExpertBank::views`]),
/// the segment sizes read back to the host.
fn expert_segments_looped(experts: &ExpertBank, xs: &Tensor, slots: &Segments<'_>) -> Tensor {
    let counts = Vec::<i64>::try_from(slots.counts).expect("counts are int64");
    let views = experts.views(xs);
    let parts: Vec<Tensor> = xs
        .split_with_sizes(&counts, 0)
        .iter()
        .enumerate()
        .filter(|(e, _)| counts[*e] > 0)
        .map(|(e, segment)| experts.ffn_view(&views, e, segment))
        .collect();
    if parts.is_empty() {
        // No row at all (an expert-parallel rank that received nothing): an
        // empty output still connected to the weights, whose gradients are
        // then zeros rather than undefined.
        return experts.ffn_view(&views, 0, xs);
    }
    Tensor::cat(&parts, 0)
}

/// Average segment length (`N k / E` rows) from which, on CPU, a loop of
/// BLAS GEMMs beats libtorch's CPU `_grouped_mm`. Measured on the 2-core
/// development machine (`scripts/cpu_grouped_mm.py`, forward + backward,
/// `docs/results/cpu/cpu_grouped_mm.jsonl`): the loop took 271 vs 349 ms at
/// 1024 rows per expert (mid) and 489 vs 631 ms at 512 (64 fine-grained
/// experts); at 128 (makeMoE's size) the two were within noise (15.5 vs
/// 16.0 ms), and `_grouped_mm` is kept there.
pub const CPU_SEGMENT_LOOP_MIN_ROWS: i64 = 256;

type SupportCache = Mutex<Option<HashMap<(Device, Kind, i64, i64), bool>>>;

/// Whether `_grouped_mm` runs for this bank's sizes on its device in `kind`.
/// Probed once per (device, dtype, d, h) with a tiny call. Never for a
/// quantised bank, whose weights are int8.
pub fn grouped_mm_supported(experts: &ExpertBank, kind: Kind) -> bool {
    static CACHE: SupportCache = Mutex::new(None);
    if experts.quantization().is_some() {
        return false;
    }
    let device = experts.w_in.device();
    let (d, h) = (experts.config().input_dim, experts.config().hidden_dim);
    let key = (device, kind, d, h);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    *cache
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert_with(|| {
            let a = Tensor::zeros([4, d], (kind, device));
            let w = Tensor::zeros([2, d, h], (kind, device));
            let offs = Tensor::from_slice(&[2i32, 4]).to_device(device);
            tch::no_grad(|| a.f_internal_grouped_mm(&w, Some(&offs), None::<&Tensor>, None)).is_ok()
        })
}
