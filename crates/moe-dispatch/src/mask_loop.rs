use crate::Dispatch;
use moe_core::Routing;
use moe_experts::ExpertBank;
use tch::Tensor;

/// makeMoE's `SparseMoE.forward`: for each expert `e`, the tokens whose
/// top-k holds `e` (whom `e` chose, under expert choice) are gathered, run
/// through `FFN_e`, scaled by `G[:, e]` and added back:
///
/// `y[M_e] += G[M_e, e] * FFN_e(x[M_e])`, `M_e = {n : e in topk(n)}`
/// (the column `e` of [`Routing::chosen`]).
///
/// Only chosen experts compute, but every expert costs a mask, a host
/// synchronisation (`M_e` empty?) and a gather; kept as the reference of the
/// tutorial and for comparison.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaskLoop;

impl Dispatch for MaskLoop {
    fn name(&self) -> &'static str {
        "mask_loop"
    }

    fn combine(&self, x: &Tensor, routing: &Routing, experts: &ExpertBank, train: bool) -> Tensor {
        let gates = routing.dense_gates().to_kind(x.kind());
        let chosen = routing.chosen();
        let views = experts.views(x);
        let mut y = x.zeros_like();
        for e in 0..experts.num_experts() {
            let rows = chosen.select(1, e).nonzero().squeeze_dim(1);
            if rows.size()[0] == 0 {
                continue;
            }
            let out = experts.ffn_view(&views, e as usize, &x.index_select(0, &rows));
            let out = experts.output_dropout(out, train);
            let gate = gates.index_select(0, &rows).select(1, e).unsqueeze(1);
            y = y.index_add(0, &rows, &(out * gate));
        }
        y
    }
}
