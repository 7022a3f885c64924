use moe_core::Routing;
use tch::{Kind, Tensor};

/// The `S` routing slots sorted by expert: the permutation that turns
/// scattered (token, expert) pairs into one contiguous segment per expert,
/// computed on the device without reading anything back.
///
/// After a stable sort by expert, segment `e` is `[offsets[e-1],
/// offsets[e])`, in slot order (token order under token choice, where slot
/// `s = n k + j` is token `n`'s `j`-th choice; already sorted under expert
/// choice).
#[derive(Debug)]
pub struct SortedSlots {
    /// Token of each sorted slot, `[S]` int64.
    pub token: Tensor,
    /// Expert of each sorted slot (non-decreasing), `[S]` int64.
    pub expert: Tensor,
    /// Sorted position of each slot `s` (slot order), `[S]` int64: the
    /// inverse permutation, where slot `s`'s output lands.
    pub position: Tensor,
    /// Slots per expert, `[E]` int64.
    pub counts: Tensor,
    /// End offset of each expert's segment, `[E]` int32 (cumulative counts),
    /// the layout `_grouped_mm` expects.
    pub offsets: Tensor,
}

impl SortedSlots {
    /// Sorts the routing's `N * k` slots by expert (stable, so tokens keep their order inside a segment).
    pub fn new(routing: &Routing) -> Self {
        let (expert, order) = routing.expert.sort_stable(true, 0, false);
        let counts = routing.expert_counts();
        let slots = Tensor::arange(order.size()[0], (Kind::Int64, order.device()));
        SortedSlots {
            token: routing.token.index_select(0, &order),
            position: order.zeros_like().scatter(0, &order, &slots),
            expert,
            offsets: counts.cumsum(0, Kind::Int).to_kind(Kind::Int),
            counts,
        }
    }
}
