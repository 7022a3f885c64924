use crate::Dispatch;
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::{Kind, Tensor};

/// Mixtral's loop (Hugging Face `MixtralSparseMoeBlock`): for each expert,
/// `where` finds its (token, choice) pairs, the tokens are gathered with
/// `index_select`, run through the expert, scaled by their own weight and
/// scattered back with `index_add`:
///
/// `y[T_e] += w[T_e, J_e] * FFN_e(x[T_e])`, `(T_e, J_e) = where(indices == e)`.
///
/// One gather and one scatter per expert and no dense gate matrix, but still
/// one host synchronisation per expert (the size of `where`'s result).
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexedLoop;

impl Dispatch for IndexedLoop {
    fn name(&self) -> &'static str {
        "indexed_loop"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        let mut y = x.zeros_like();
        // [E, N, k]: which (token, choice) pairs each expert serves.
        let per_expert = routing
            .indices
            .one_hot(routing.num_experts)
            .permute([2, 0, 1])
            .to_kind(Kind::Bool);
        let views = experts.views(x);
        for e in 0..routing.num_experts {
            let pairs = per_expert.get(e).nonzero(); // [m, 2]: (token, choice)
            if pairs.size()[0] == 0 {
                continue;
            }
            let (tokens, choices) = (pairs.select(1, 0), pairs.select(1, 1));
            let weight = routing
                .weights
                .index_select(0, &tokens)
                .gather(1, &choices.unsqueeze(1), false)
                .to_kind(x.kind());
            let out = experts.ffn_view(&views, e as usize, &x.index_select(0, &tokens));
            let out = experts.output_dropout(out, train);
            y = y.index_add(0, &tokens, &(out * weight));
        }
        y
    }
}
