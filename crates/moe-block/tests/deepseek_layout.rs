//! Fine-grained and shared experts (DeepSeekMoE), capacity limits and every
//! router kind inside `SparseMoe`, against a per-token loop reference.

use moe_block::{SparseMoe, SparseMoeConfig};
use moe_core::MoeError;
use moe_dispatch::DispatchKind;
use moe_experts::Activation;
use moe_routers::{balance::load_balance_loss, BalanceLossConfig, RouterKind};
use tch::{nn, Device, Kind, Tensor};

/// `y_n = sum_s FFN^shared_s(x_n) + sum_j w[n, j] FFN_{i[n, j]}(x_n)`, token by token.
fn loop_reference(moe: &SparseMoe, x: &Tensor, indices: &Tensor, weights: &Tensor) -> Tensor {
    let n = x.size()[0];
    let rows: Vec<Tensor> = (0..n)
        .map(|t| {
            let xt = x.narrow(0, t, 1);
            let mut y = xt.zeros_like();
            if let Some(shared) = moe.shared_experts() {
                for s in 0..shared.num_experts() {
                    y += shared.forward_expert(s, &xt, false);
                }
            }
            for j in 0..indices.size()[1] {
                let e = indices.int64_value(&[t, j]);
                y += moe.experts().forward_expert(e, &xt, false) * weights.double_value(&[t, j]);
            }
            y
        })
        .collect();
    Tensor::cat(&rows, 0)
}

fn config(router: RouterKind, segments: i64, shared: i64) -> SparseMoeConfig {
    SparseMoeConfig {
        n_embd: 6,
        num_experts: 4,
        top_k: 2,
        expert_hidden: 16,
        segments,
        shared_experts: shared,
        dropout: 0.0,
        router,
        ..Default::default()
    }
}

#[test]
fn fine_grained_shared_and_capped_layers_match_a_per_token_loop() {
    tch::manual_seed(21);
    let cases = [
        (config(RouterKind::TopK, 1, 0), None),
        (config(RouterKind::DeepSeekMoe, 4, 1), None),
        (config(RouterKind::DeepSeekMoe, 2, 3), None),
        (config(RouterKind::Attention, 2, 0), None),
        (config(RouterKind::SigmoidAuxFree, 4, 2), None),
        (config(RouterKind::NoisyTopK, 1, 0), Some(1.0)),
        (config(RouterKind::TopK, 4, 1), Some(0.5)),
    ];
    for (base, capacity) in cases {
        for activation in [Activation::Relu, Activation::SwiGlu] {
            for dispatch in [DispatchKind::MaskLoop, DispatchKind::DenseReference] {
                let cfg = SparseMoeConfig {
                    activation,
                    dispatch,
                    capacity_factor: capacity,
                    ..base.clone()
                };
                let vs = nn::VarStore::new(Device::Cpu);
                let moe = SparseMoe::new(&vs.root(), cfg.clone()).unwrap();
                let x = Tensor::randn([3, 5, 6], (Kind::Float, Device::Cpu));
                let out = moe.forward_t(&x, false).unwrap();
                let r = &out.routing;
                assert_eq!(r.indices.size(), vec![15, cfg.routed_top_k()]);
                assert_eq!(r.num_experts, cfg.routed_experts());
                let want = loop_reference(&moe, &x.view([15, 6]), &r.indices, &r.weights);
                let diff = (out.output.view([15, 6]) - want)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(diff < 1e-5, "{cfg:?}: {diff}");
                if capacity.is_some() {
                    assert!(r.dropped.is_some());
                }
            }
        }
    }
}

#[test]
fn parameter_counts_match_the_variables() {
    for (router, m, shared) in [
        (RouterKind::TopK, 1, 0),
        (RouterKind::NoisyTopK, 1, 0),
        (RouterKind::Attention, 1, 0),
        (RouterKind::DeepSeekMoe, 4, 1),
        (RouterKind::SigmoidAuxFree, 2, 0),
    ] {
        for activation in [Activation::Relu, Activation::SwiGlu] {
            let cfg = SparseMoeConfig {
                activation,
                ..config(router, m, shared)
            };
            let vs = nn::VarStore::new(Device::Cpu);
            let _moe = SparseMoe::new(&vs.root(), cfg.clone()).unwrap();
            let counted: i64 = vs
                .trainable_variables()
                .iter()
                .map(|t| t.numel() as i64)
                .sum();
            assert_eq!(cfg.total_params(), counted, "{cfg:?}");
        }
    }
    // Fine-grained segmentation with shared experts keeps the active experts'
    // parameters of top-2 of 4 (hidden 16): 8 experts of hidden 4 active.
    let coarse = config(RouterKind::DeepSeekMoe, 1, 0);
    let fine = config(RouterKind::DeepSeekMoe, 4, 1);
    let expert_active = |c: &SparseMoeConfig| c.active_params() - c.router_config().num_params();
    let (d, h) = (6, 16);
    // Weights are identical (2 k d h); each expert has its own biases (h/m + d).
    assert_eq!(expert_active(&coarse), 2 * (2 * d * h + h + d));
    assert_eq!(expert_active(&fine), 8 * (2 * d * (h / 4) + h / 4 + d));
}

#[test]
fn bad_layer_configs_are_errors() {
    let bad = [
        SparseMoeConfig {
            top_k: 5,
            ..config(RouterKind::TopK, 1, 0)
        },
        SparseMoeConfig {
            segments: 3,
            ..config(RouterKind::TopK, 1, 0)
        },
        config(RouterKind::DeepSeekMoe, 2, 4),
        config(RouterKind::DeepSeekMoe, 1, -1),
        SparseMoeConfig {
            balance: BalanceLossConfig {
                device_balance: 0.1,
                expert_devices: vec![0, 1],
                ..Default::default()
            },
            ..config(RouterKind::TopK, 1, 0)
        },
    ];
    for cfg in bad {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = SparseMoe::new(&vs.root(), cfg.clone()).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{cfg:?}: {err}");
    }
    let err = config(RouterKind::TopK, 3, 0)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("segments") && err.contains("16"), "{err}");
    let err = config(RouterKind::TopK, 2, 4)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("shared_experts"), "{err}");
}

#[test]
fn the_layer_returns_its_balance_loss_per_sequence_when_asked() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let plain = SparseMoe::new(&vs.root(), config(RouterKind::TopK, 1, 0)).unwrap();
    let x = Tensor::randn([2, 4, 6], (Kind::Float, Device::Cpu));
    assert!(plain.forward_t(&x, true).unwrap().aux_loss.is_none());

    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = SparseMoeConfig {
        balance: BalanceLossConfig {
            load_balance: 0.5,
            per_sequence: true,
            ..Default::default()
        },
        ..config(RouterKind::DeepSeekMoe, 2, 1)
    };
    let moe = SparseMoe::new(&vs.root(), cfg).unwrap();
    let out = moe.forward_t(&x, true).unwrap();
    let want = load_balance_loss(&out.routing, Some(4))
        .unwrap()
        .double_value(&[])
        * 0.5;
    let got = out.aux_loss.unwrap();
    assert!((got.double_value(&[]) - want).abs() < 1e-7);
    // The loss reaches the router's weights.
    got.backward();
    let grad = vs.variables()["router.gate.weight"].grad();
    assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}
