use approx::assert_abs_diff_eq;
use moe_core::MoeError;
use moe_routers::{NoisyTopKRouter, Router, RouterConfig, RouterKind, TopKRouter};
use tch::{nn, Device, Kind, Tensor};

fn set(vs: &nn::VarStore, name: &str, values: &[f32], shape: &[i64]) {
    let mut var = vs.variables()[name].shallow_clone();
    tch::no_grad(|| var.copy_(&Tensor::from_slice(values).view(shape)));
}

fn to_vec_f(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn to_vec_i(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
}

fn cfg(kind: RouterKind, d: i64, e: i64, k: i64) -> RouterConfig {
    RouterConfig {
        kind,
        input_dim: d,
        num_experts: e,
        top_k: k,
        ..Default::default()
    }
}

#[test]
fn top_k_router_hand_computed_case() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router = TopKRouter::new(&vs.root(), &cfg(RouterKind::TopK, 2, 3, 2)).unwrap();
    // logits = x W^T + b with W rows e0 = (1, 0), e1 = (0, 1), e2 = (1, 1), b = (0, 0, -2).
    set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
    set(&vs, "gate.bias", &[0., 0., -2.], &[3]);
    // x0 = (3, 1): logits (3, 1, 2) -> experts 0, 2 with softmax(3, 2).
    // x1 = (1, -1): logits (1, -1, -2) -> experts 0, 1 with softmax(1, -1).
    let x = Tensor::from_slice(&[3f32, 1., 1., -1.]).view([2, 2]);
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices), vec![0, 2, 0, 1]);
    let e = std::f32::consts::E;
    let expected = [
        e / (e + 1.),
        1. / (e + 1.),
        1. / (1. + (-2f32).exp()),
        1. / (1. + 2f32.exp()),
    ];
    for (got, want) in to_vec_f(&r.weights).iter().zip(expected) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    assert_eq!(to_vec_f(&r.logits), vec![3., 1., 2., 1., -1., -2.]);
    // makeMoE's gating_output: the same weights scattered into [N, E], zero elsewhere.
    let gates = to_vec_f(&r.dense_gates());
    assert_abs_diff_eq!(gates[1], 0.0);
    assert_abs_diff_eq!(gates[5], 0.0);
    assert_abs_diff_eq!(gates[0], expected[0], epsilon = 1e-6);
    assert_eq!(to_vec_i(&r.expert_counts()), vec![2, 1, 1]);
}

#[test]
fn weights_sum_to_one_with_exactly_k_distinct_experts() {
    tch::manual_seed(3);
    for (e, k) in [(8, 2), (4, 1), (5, 5), (64, 8)] {
        for kind in [RouterKind::TopK, RouterKind::NoisyTopK] {
            let vs = nn::VarStore::new(Device::Cpu);
            let router = cfg(kind, 16, e, k).build(&vs.root()).unwrap();
            let x = Tensor::randn([50, 16], (Kind::Float, Device::Cpu));
            let r = router.route(&x, true).unwrap();
            assert_eq!(r.indices.size(), vec![50, k]);
            let sums = r.weights.sum_dim_intlist(-1, false, None);
            assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-6);
            let gates = r.dense_gates();
            let nonzero = gates.gt(0.0).sum_dim_intlist(-1, false, Kind::Int64);
            assert_eq!(to_vec_i(&nonzero), vec![k; 50], "{kind:?} E={e} k={k}");
            assert_eq!(r.expert_counts().sum(Kind::Int64).int64_value(&[]), 50 * k);
        }
    }
}

#[test]
fn noise_is_added_in_training_only_unless_asked_for() {
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let quiet = NoisyTopKRouter::new(&vs.root(), &cfg(RouterKind::NoisyTopK, 8, 4, 2)).unwrap();
    let x = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
    let eval_a = quiet.route(&x, false).unwrap().logits;
    let eval_b = quiet.route(&x, false).unwrap().logits;
    assert!(
        eval_a.equal(&eval_b),
        "evaluation must be deterministic by default"
    );
    let train = quiet.route(&x, true).unwrap().logits;
    assert!(
        (&train - &eval_a).abs().max().double_value(&[]) > 1e-3,
        "training adds noise"
    );

    let vs2 = nn::VarStore::new(Device::Cpu);
    let noisy_cfg = RouterConfig {
        noise_at_eval: true,
        ..cfg(RouterKind::NoisyTopK, 8, 4, 2)
    };
    let noisy = NoisyTopKRouter::new(&vs2.root(), &noisy_cfg).unwrap();
    let a = noisy.route(&x, false).unwrap().logits;
    let b = noisy.route(&x, false).unwrap().logits;
    assert!(
        !a.equal(&b),
        "makeMoE's router adds noise at evaluation too"
    );
}

#[test]
fn bad_router_configs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    for (e, k) in [(8, 0), (8, 9), (0, 1)] {
        let err = cfg(RouterKind::TopK, 4, e, k)
            .build(&vs.root())
            .unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "E={e} k={k}: {err}");
    }
    let err = cfg(RouterKind::TopK, 4, 8, 9)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("top_k") && err.contains("9"), "{err}");
}

#[test]
fn bad_router_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router = cfg(RouterKind::NoisyTopK, 4, 8, 2)
        .build(&vs.root())
        .unwrap();
    let wrong_width = Tensor::zeros([3, 5], (Kind::Float, Device::Cpu));
    assert!(matches!(
        router.route(&wrong_width, false),
        Err(MoeError::Shape { .. })
    ));
    let wrong_kind = Tensor::zeros([3, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        router.route(&wrong_kind, false),
        Err(MoeError::Kind { .. })
    ));
}
