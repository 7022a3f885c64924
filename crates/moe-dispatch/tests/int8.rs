//! Every dispatch strategy on an int8-quantised expert bank
//! (`ExpertBank::quantize`): the same `y_n = sum_s weight[s] FFN_{expert[s]}(x_n)`
//! as the bank's own per-expert FFN, slot by slot, under token and expert
//! choice.

use moe_core::Routing;
use moe_dispatch::{grouped_mm_supported, DispatchKind};
use moe_experts::{Activation, ExpertBank, ExpertConfig, ExpertQuantization};
use tch::{nn, Device, Kind, Tensor};

/// `y_n = sum_{s : token[s] = n} weight[s] FFN_{expert[s]}(x_n)`, one slot
/// at a time through `ExpertBank::ffn`.
fn by_slot(x: &Tensor, routing: &Routing, bank: &ExpertBank) -> Tensor {
    let y = x.zeros_like();
    let tokens = Vec::<i64>::try_from(&routing.token).unwrap();
    let experts = Vec::<i64>::try_from(&routing.expert).unwrap();
    let weights = Vec::<f64>::try_from(routing.weight.to_kind(Kind::Double)).unwrap();
    for ((n, e), w) in tokens.into_iter().zip(experts).zip(weights) {
        let out = bank.ffn(e, &x.narrow(0, n, 1)) * w;
        let mut row = y.narrow(0, n, 1);
        row += out;
    }
    y
}

#[test]
fn every_strategy_runs_a_quantised_bank_as_its_per_expert_ffn() {
    tch::manual_seed(0);
    let (e, d, h, n, k) = (4, 64, 96, 9, 2);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = ExpertConfig {
        num_experts: e,
        input_dim: d,
        hidden_dim: h,
        dropout: 0.0,
        activation: Activation::SwiGlu,
        bias: false,
        ..Default::default()
    };
    let mut bank = ExpertBank::new(&vs.root(), &config).unwrap();
    bank.quantize(ExpertQuantization::Int8).unwrap();
    assert!(!grouped_mm_supported(&bank, Kind::Float));
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let indices = Tensor::randperm(e, (Kind::Int64, Device::Cpu))
        .narrow(0, 0, k)
        .unsqueeze(0)
        .repeat([n, 1]);
    // Different experts per token: rotate each row.
    let indices =
        (indices + Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(1)).remainder(e);
    let weights = Tensor::rand([n, k], (Kind::Float, Device::Cpu));
    let probs = Tensor::full([n, e], 1.0 / e as f64, (Kind::Float, Device::Cpu));
    let token_choice = Routing::token_choice(indices, weights, probs.zeros_like(), probs.copy());
    // Expert choice: expert 0 took tokens 0 and 3, expert 2 tokens 3, 5
    // and 8; token 1 has no expert.
    let expert_choice = Routing::expert_choice(
        Tensor::from_slice(&[0i64, 3, 3, 5, 8]),
        Tensor::from_slice(&[0i64, 0, 2, 2, 2]),
        Tensor::from_slice(&[0.5f32, 0.25, 0.75, 1.0, 0.125]),
        probs.zeros_like(),
        probs.copy(),
        3,
    );
    for (label, routing) in [
        ("token choice", token_choice),
        ("expert choice", expert_choice),
    ] {
        let want = by_slot(&x, &routing, &bank);
        let scale = want.abs().max().double_value(&[]);
        for kind in DispatchKind::all() {
            let y = kind.build().combine(&x, &routing, &bank, false);
            assert_eq!(y.size(), vec![n, d], "{label} {kind:?}");
            // The strategies run the same int8 products on other row
            // groupings (f32 sums of K <= 96 terms, in another order where
            // BLAS blocks rows otherwise): they differ by f32 rounding,
            // far below 1e-4 of the output's scale.
            let diff = (&y - &want).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-4 * scale,
                "{label} {kind:?}: {diff} off (scale {scale})"
            );
        }
    }
}
