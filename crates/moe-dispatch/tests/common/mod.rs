//! What the dispatch tests share.

use moe_experts::{ExpertBank, ExpertConfig};
use tch::{nn, Tensor};

/// Experts on 1-d tokens: `FFN_e(x) = scale[e] * ReLU(x)`.
pub fn scaling_experts(vs: &nn::VarStore, scale: &[f32]) -> ExpertBank {
    let e = scale.len() as i64;
    let cfg = ExpertConfig {
        num_experts: e,
        input_dim: 1,
        hidden_dim: 1,
        dropout: 0.0,
        ..Default::default()
    };
    let bank = ExpertBank::new(&vs.root(), &cfg).unwrap();
    let vars = vs.variables();
    tch::no_grad(|| {
        let _ = vars["w_in"].shallow_clone().fill_(1.0);
        let _ = vars["b_in"].shallow_clone().fill_(0.0);
        vars["w_out"]
            .shallow_clone()
            .copy_(&Tensor::from_slice(scale).view([e, 1, 1]));
        let _ = vars["b_out"].shallow_clone().fill_(0.0);
    });
    bank
}
