//! An expert-choice routing (a token with no expert, tokens with two)
//! through every dispatch strategy, by hand: the same slots, one code path.

mod common;

use common::scaling_experts;
use moe_core::Routing;
use moe_dispatch::DispatchKind;
use tch::{nn, Device, Kind, Tensor};

#[test]
fn every_strategy_computes_the_hand_worked_expert_choice_case() {
    let vs = nn::VarStore::new(Device::Cpu);
    let experts = scaling_experts(&vs, &[1.0, 10.0, 100.0]);
    let x = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([4, 1]);
    // Expert 0 chose tokens 0, 1; expert 1 tokens 2, 0; expert 2 tokens 1, 2
    // (crates/moe-routers/tests/expert_choice.rs); token 3 got none.
    let mut weight = Tensor::from_slice(&[0.5f32, 0.4, 0.5, 0.4, 0.5, 0.4]).set_requires_grad(true);
    let routing = Routing::expert_choice(
        Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]),
        Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]),
        weight.shallow_clone(),
        Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)),
        Tensor::full([4, 3], 1.0 / 3.0, (Kind::Float, Device::Cpu)),
        2,
    );
    // y_0 = .5 * 1 * 1 + .4 * 10 * 1, y_1 = .4 * 1 * 2 + .5 * 100 * 2,
    // y_2 = .5 * 10 * 3 + .4 * 100 * 3, y_3 = 0.
    let want = [4.5f32, 100.8, 135.0, 0.0];
    // d(sum y) / d weight[s] = FFN_{expert[s]}(x_{token[s]}).
    let want_grad = [1f32, 2., 30., 10., 200., 300.];
    for kind in DispatchKind::all() {
        let y = kind.build().combine(&x, &routing, &experts, false);
        let got = Vec::<f32>::try_from(y.view([-1])).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{kind:?}: {got:?}, want {want:?}");
        }
        weight.zero_grad();
        y.sum(Kind::Float).backward();
        let grad = Vec::<f32>::try_from(weight.grad()).unwrap();
        for (g, w) in grad.iter().zip(want_grad) {
            assert!(
                (g - w).abs() < 1e-4,
                "{kind:?}: gradient {grad:?}, want {want_grad:?}"
            );
        }
    }
}
