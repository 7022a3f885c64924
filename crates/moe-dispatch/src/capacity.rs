use crate::dispatch::gather_weighted_sum;
use crate::Dispatch;
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::{Kind, Tensor};

/// Fixed-capacity dispatch (GShard, arXiv 2006.16668; Switch Transformer,
/// arXiv 2101.03961): every expert gets a buffer of `C` rows, the capacity
/// the router's limit recorded in [`Routing::capacity`],
///
/// `C = max(1, floor(N k / E * capacity_factor))`
///
/// with the router's `capacity_factor` (the one capacity setting; a layer
/// configured with this strategy and no capacity factor is a config error).
/// Each expert keeps its first `C` slots in token order; overflowing
/// slots are dropped (they contribute nothing, and the kept weights are not
/// renormalised), exactly the slots the router marked in
/// [`Routing::dropped`]. All shapes, `[E, C, d]` included, depend only on
/// `N, k, E, d` — never on the routing — so the computation is three batched
/// matmuls with no host synchronisation, suitable for CUDA graphs.
///
/// A routing without a capacity (none was configured) gets `C = N`: a
/// token chooses an expert at most once, so nothing overflows, at the cost
/// of the dense layer's `E N` rows.
///
/// An expert-choice routing records the tokens each expert chose as its
/// capacity, so its buffers are exactly full: nothing is dropped and no row
/// is padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity;

/// Where each slot lands in its expert's buffer.
#[derive(Debug)]
pub struct CapacityPlan {
    /// Rows per expert.
    pub capacity: i64,
    /// Row of each slot (slot order) in the flat `[E * C + 1, d]`
    /// buffer; dropped slots point at the last, spare row.
    pub row: Tensor,
    /// 1 for kept slots, 0 for dropped ones, `[S]`.
    pub keep: Tensor,
}

impl Capacity {
    /// `C` for `routing`: [`Routing::capacity`], or `N` without one.
    pub fn capacity(&self, routing: &Routing) -> i64 {
        routing.capacity.unwrap_or_else(|| routing.num_tokens())
    }

    /// Buffer positions ([`Routing::slot_positions`]): a slot's row within
    /// its expert is the number of earlier slots (in slot order, token order
    /// under token choice) routed there.
    pub fn plan(&self, routing: &Routing) -> CapacityPlan {
        let e = routing.num_experts;
        let capacity = self.capacity(routing);
        let position = routing.slot_positions();
        let keep = position.lt(capacity);
        let spare = Tensor::full_like(&routing.expert, e * capacity);
        let row = (&routing.expert * capacity + &position).where_self(&keep, &spare);
        CapacityPlan {
            capacity,
            row,
            keep,
        }
    }

    /// Number of dropped slots, as a device scalar (not read back).
    pub fn dropped_slots(&self, routing: &Routing) -> Tensor {
        self.plan(routing).keep.logical_not().sum(Kind::Int64)
    }
}

impl Dispatch for Capacity {
    fn name(&self) -> &'static str {
        "capacity"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        let plan = self.plan(routing);
        let (e, c, d) = (routing.num_experts, plan.capacity, x.size()[1]);
        let buffer = fill_buffer(x, routing, &plan).view([e, c, d]);
        let out = experts.output_dropout(experts.batched_ffn(&buffer), train);
        combine_rows(&out.view([e * c, d]), x, routing, &plan)
    }
}

/// The `[E C, d]` buffer of a capacity plan: row `e C + i` holds the token
/// of expert `e`'s `i`-th kept slot, zeros where the expert has fewer.
/// Filled by gathering: each buffer row looks up the slot that owns it
/// (rows nobody owns read a zero row); scattering tokens in would need
/// atomics.
pub(crate) fn fill_buffer(x: &Tensor, routing: &Routing, plan: &CapacityPlan) -> Tensor {
    let (n, d) = (x.size()[0], x.size()[1]);
    let (e, c) = (routing.num_experts, plan.capacity);
    let slots = routing.num_slots();
    let opts = (Kind::Int64, x.device());
    let slot_of_row = Tensor::full([e * c + 1], slots, opts)
        .scatter(0, &plan.row, &Tensor::arange(slots, opts))
        .narrow(0, 0, e * c);
    let token_of_slot = Tensor::cat(
        &[routing.token.shallow_clone(), Tensor::full([1], n, opts)],
        0,
    );
    let x_or_zero = Tensor::cat(
        &[
            x.shallow_clone(),
            x.new_zeros([1, d], (x.kind(), x.device())),
        ],
        0,
    );
    x_or_zero.index_select(0, &token_of_slot.index_select(0, &slot_of_row))
}

/// `y_n = sum_{s : token[s] = n} weight[s] keep[s] rows[row(s)]` from the
/// experts' `[E C, d]` output rows (dropped slots read a zero spare row).
pub(crate) fn combine_rows(
    rows: &Tensor,
    x: &Tensor,
    routing: &Routing,
    plan: &CapacityPlan,
) -> Tensor {
    let d = x.size()[1];
    let kind = x.kind();
    let rows = Tensor::cat(
        &[
            rows.shallow_clone(),
            x.new_zeros([1, d], (kind, x.device())),
        ],
        0,
    );
    let weight = routing.weight.to_kind(kind) * plan.keep.to_kind(kind);
    gather_weighted_sum(&rows, &plan.row, &weight, routing)
}
