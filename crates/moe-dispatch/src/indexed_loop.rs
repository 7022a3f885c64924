use crate::Dispatch;
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// Mixtral's loop (Hugging Face `MixtralSparseMoeBlock`): for each expert,
/// `where` finds its slots, their tokens are gathered with `index_select`,
/// run through the expert, scaled by their own weight and scattered back
/// with `index_add`:
///
/// `y[T_e] += w[S_e] * FFN_e(x[T_e])`, `S_e = where(expert == e)`, `T_e = token[S_e]`.
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
        let views = experts.views(x);
        for e in 0..routing.num_experts {
            let slots = routing.expert.eq(e).nonzero().squeeze_dim(1);
            if slots.size()[0] == 0 {
                continue;
            }
            let tokens = routing.token.index_select(0, &slots);
            let weight = routing
                .weight
                .index_select(0, &slots)
                .unsqueeze(1)
                .to_kind(x.kind());
            let out = experts.ffn_view(&views, e as usize, &x.index_select(0, &tokens));
            let out = experts.output_dropout(out, train);
            y = y.index_add(0, &tokens, &(out * weight));
        }
        y
    }
}
