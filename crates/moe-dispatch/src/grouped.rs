use crate::{Dispatch, SortedSlots};
use moe_core::Routing;
use moe_experts::ExpertBank;
use std::collections::HashMap;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Dropless sorted dispatch with grouped GEMM (MegaBlocks, Gale et al. 2022,
/// arXiv 2211.15841; the `_grouped_mm` path of PyTorch's MoE code):
///
/// 1. sort the `N k` slots by expert (stable), counts -> offsets;
/// 2. gather `x` once into expert-contiguous rows `X_s`;
/// 3. `H = act(GroupedMM(X_s, W_in, offsets) + b_in[e_s])`,
///    `O = GroupedMM(H, W_out, offsets) + b_out[e_s]` — every expert's segment
///    in one kernel, no padding, no dropped token;
/// 4. scale by the slot weights and scatter-add back to tokens in one `index_add`.
///
/// Nothing is read back to the host, in forward or backward. Where libtorch's
/// `_grouped_mm` does not support the device, dtype or sizes (probed once and
/// remembered), the GEMMs run as a loop over segments, which reads the
/// offsets back once per call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grouped;

impl Dispatch for Grouped {
    fn name(&self) -> &'static str {
        "grouped"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        let slots = SortedSlots::new(routing);
        let xs = x.index_select(0, &slots.token);
        let out = if grouped_mm_supported(experts, x.kind()) {
            expert_segments_grouped(experts, &xs, &slots)
        } else {
            expert_segments_looped(experts, &xs, &slots)
        };
        let out = experts.output_dropout(out, train);
        let weighted = out * slots.weight.unsqueeze(1).to_kind(x.kind());
        x.zeros_like().index_add(0, &slots.token, &weighted)
    }
}

/// All experts on their contiguous segments of `xs` with two grouped GEMMs.
fn expert_segments_grouped(experts: &ExpertBank, xs: &Tensor, slots: &SortedSlots) -> Tensor {
    // Weights follow the activations' dtype (bf16 autocast keeps fp32 masters).
    let kind = xs.kind();
    let mm = |a: &Tensor, w: &Tensor| {
        a.internal_grouped_mm(&w.to_kind(kind), Some(&slots.offsets), None, None)
    };
    let bias = |b: &Tensor| b.index_select(0, &slots.expert).to_kind(kind);
    let pre = mm(xs, &experts.w_in) + bias(&experts.b_in);
    let gate = experts.w_gate.as_ref().map(|w| mm(xs, w));
    let hidden = experts.activate(pre, gate);
    mm(&hidden, &experts.w_out) + bias(&experts.b_out)
}

/// The same computation as a loop over segments (fallback; one host read).
fn expert_segments_looped(experts: &ExpertBank, xs: &Tensor, slots: &SortedSlots) -> Tensor {
    let ends =
        Vec::<i64>::try_from(slots.offsets.to_kind(Kind::Int64)).expect("offsets convert to int64");
    let mut start = 0;
    let mut parts = Vec::with_capacity(ends.len());
    for (e, &end) in ends.iter().enumerate() {
        if end > start {
            parts.push(experts.ffn(e as i64, &xs.narrow(0, start, end - start)));
        }
        start = end;
    }
    Tensor::cat(&parts, 0)
}

/// (device, dtype, d, h) -> whether `_grouped_mm` runs there.
type SupportCache = Mutex<Option<HashMap<(Device, Kind, i64, i64), bool>>>;

/// Whether `_grouped_mm` runs for this bank's sizes on its device in `kind`.
/// Probed once per (device, dtype, d, h) with a tiny call.
pub fn grouped_mm_supported(experts: &ExpertBank, kind: Kind) -> bool {
    static CACHE: SupportCache = Mutex::new(None);
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
