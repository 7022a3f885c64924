use approx::assert_abs_diff_eq;
use moe_core::MoeError;
use moe_routers::{
    AttentionRouter, AuxFreeSigmoidRouter, DeepSeekMoeRouter, NoisyTopKRouter, Router,
    RouterConfig, RouterKind, RoutingStats, TopKRouter,
};
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
        for kind in RouterKind::ALL {
            let vs = nn::VarStore::new(Device::Cpu);
            let router = cfg(kind, 16, e, k).build(&vs.root()).unwrap();
            let x = Tensor::randn([50, 16], (Kind::Float, Device::Cpu));
            let r = router.route(&x, true).unwrap();
            assert_eq!(r.indices.size(), vec![50, k]);
            // DeepSeekMoE without norm_topk_prob keeps the raw probabilities.
            if kind != RouterKind::DeepSeekMoe {
                let sums = r.weights.sum_dim_intlist(-1, false, None);
                assert!(
                    (sums - 1.0).abs().max().double_value(&[]) < 1e-5,
                    "{kind:?}"
                );
            }
            let prob_sums = r.probs.sum_dim_intlist(-1, false, None);
            assert!((prob_sums - 1.0).abs().max().double_value(&[]) < 1e-5);
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

fn assert_all_close(got: &Tensor, want: &[f32], eps: f32) {
    let got = to_vec_f(got);
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert_abs_diff_eq!(*g, *w, epsilon = eps);
    }
}

#[test]
fn attention_router_hand_computed_case() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router = AttentionRouter::new(&vs.root(), &cfg(RouterKind::Attention, 1, 2, 2)).unwrap();
    // x = 1: Q = (1, 0), K = (0, 2), V = (3, 1).
    set(&vs, "query.weight", &[1., 0.], &[2, 1]);
    set(&vs, "key.weight", &[0., 2.], &[2, 1]);
    set(&vs, "value.weight", &[3., 1.], &[2, 1]);
    // Row 0: softmax(1*0, 1*2) = (1, e^2) / (1 + e^2) -> P_0 = (3 + e^2) / (1 + e^2).
    // Row 1: softmax(0, 0) = (1/2, 1/2) -> P_1 = 2.
    let e2 = 2f32.exp();
    let p0 = (3. + e2) / (1. + e2);
    let x = Tensor::from_slice(&[1f32]).view([1, 1]);
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices), vec![1, 0]);
    assert_all_close(&r.logits, &[p0, 2.], 1e-6);
    let w1 = 1. / (1. + (p0 - 2.).exp());
    assert_all_close(&r.weights, &[w1, 1. - w1], 1e-6);
}

/// `P_i = sum_j softmax_j(q_i k_j) v_j` with plain loops, per token.
fn attention_by_loops(x: &[f32], wq: &[f32], wk: &[f32], wv: &[f32], d: usize) -> Vec<f32> {
    let e = wq.len() / d;
    let proj = |w: &[f32]| -> Vec<f32> {
        (0..e)
            .map(|i| (0..d).map(|c| w[i * d + c] * x[c]).sum())
            .collect()
    };
    let (q, k, v) = (proj(wq), proj(wk), proj(wv));
    (0..e)
        .map(|i| {
            let scores: Vec<f32> = (0..e).map(|j| q[i] * k[j]).collect();
            let max = scores.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            (0..e).map(|j| (scores[j] - max).exp() / z * v[j]).sum()
        })
        .collect()
}

#[test]
fn attention_router_matches_a_per_token_loop() {
    tch::manual_seed(11);
    let (n, d, e, k) = (7, 5, 6, 2);
    let vs = nn::VarStore::new(Device::Cpu);
    let router = AttentionRouter::new(&vs.root(), &cfg(RouterKind::Attention, d, e, k)).unwrap();
    let vars = vs.variables();
    let w = |name: &str| to_vec_f(&vars[name]);
    let (wq, wk, wv) = (w("query.weight"), w("key.weight"), w("value.weight"));
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let r = router.route(&x, false).unwrap();
    let xs = to_vec_f(&x);
    let logits = to_vec_f(&r.logits);
    let indices = to_vec_i(&r.indices);
    for t in 0..n as usize {
        let d = d as usize;
        let want = attention_by_loops(&xs[t * d..(t + 1) * d], &wq, &wk, &wv, d);
        let e = e as usize;
        for i in 0..e {
            assert_abs_diff_eq!(logits[t * e + i], want[i], epsilon = 1e-5);
        }
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|a, b| want[*b].partial_cmp(&want[*a]).unwrap());
        let k = k as usize;
        let chosen: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
        assert_eq!(&indices[t * k..(t + 1) * k], chosen.as_slice(), "token {t}");
    }
}

#[test]
fn deepseek_moe_router_hand_computed_case() {
    for norm in [false, true] {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = RouterConfig {
            norm_topk_prob: norm,
            ..cfg(RouterKind::DeepSeekMoe, 2, 3, 2)
        };
        let router = DeepSeekMoeRouter::new(&vs.root(), &config).unwrap();
        set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
        // x = (3, 1): logits (3, 1, 4); s = softmax over all three.
        let x = Tensor::from_slice(&[3f32, 1.]).view([1, 2]);
        let r = router.route(&x, true).unwrap();
        assert_eq!(to_vec_i(&r.indices), vec![2, 0]);
        let (a, b, c) = (3f32.exp(), 1f32.exp(), 4f32.exp());
        let z = a + b + c;
        assert_all_close(&r.probs, &[a / z, b / z, c / z], 1e-6);
        let want = if norm {
            [c / (a + c), a / (a + c)]
        } else {
            [c / z, a / z]
        };
        assert_all_close(&r.weights, &want, 1e-6);
    }
}

#[test]
fn sigmoid_router_selects_with_the_bias_and_weights_without_it() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router =
        AuxFreeSigmoidRouter::new(&vs.root(), &cfg(RouterKind::SigmoidAuxFree, 2, 3, 2)).unwrap();
    set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
    let x = Tensor::from_slice(&[3f32, 1.]).view([1, 2]);
    let sig = |v: f32| 1. / (1. + (-v).exp());
    let (s0, s1, s2) = (sig(3.), sig(1.), sig(4.));
    // Without bias: experts 2 and 0.
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices), vec![2, 0]);
    assert_all_close(&r.weights, &[s2 / (s2 + s0), s0 / (s2 + s0)], 1e-6);
    let sum = s0 + s1 + s2;
    assert_all_close(&r.probs, &[s0 / sum, s1 / sum, s2 / sum], 1e-6);
    // A large bias on expert 1 brings it in first; weights still come from s.
    set(&vs, "expert_bias", &[0., 10., 0.], &[3]);
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices), vec![1, 2]);
    assert_all_close(&r.weights, &[s1 / (s1 + s2), s2 / (s1 + s2)], 1e-6);
}

#[test]
fn sigmoid_router_bias_update_follows_the_sign_of_the_load_gap() {
    let vs = nn::VarStore::new(Device::Cpu);
    let config = RouterConfig {
        bias_update_rate: 0.25,
        ..cfg(RouterKind::SigmoidAuxFree, 2, 3, 1)
    };
    let router = AuxFreeSigmoidRouter::new(&vs.root(), &config).unwrap();
    // Rows pick experts 0, 0, 0, 1: loads (3, 1, 0), mean 4/3.
    set(&vs, "gate.weight", &[1., 0., 0., 1., -1., -1.], &[3, 2]);
    let x = Tensor::from_slice(&[2f32, 0., 2., 1., 3., 0., 0., 2.]).view([4, 2]);
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices), vec![0, 0, 0, 1]);
    router.after_step(&r).unwrap();
    assert_all_close(router.expert_bias(), &[-0.25, 0.25, 0.25], 0.0);
    // The bias is a buffer: no gradient, not among the trainable variables.
    assert_eq!(vs.trainable_variables().len(), 1);
}

#[test]
fn aux_free_bias_reduces_max_violation_on_a_skewed_stream() {
    tch::manual_seed(5);
    let (d, e, k) = (8, 8, 2);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = RouterConfig {
        bias_update_rate: 1e-2,
        ..cfg(RouterKind::SigmoidAuxFree, d, e, k)
    };
    let router = AuxFreeSigmoidRouter::new(&vs.root(), &config).unwrap();
    // Tokens share a common direction that the gate maps onto experts 0 and 1.
    let skew = Tensor::zeros([d], (Kind::Float, Device::Cpu));
    let _ = skew.get(0).fill_(3.0);
    let w = Tensor::randn([e, d], (Kind::Float, Device::Cpu)) * 0.3;
    let _ = w.get(0).get(0).fill_(1.0);
    let _ = w.get(1).get(0).fill_(0.9);
    let w = w.view([-1]);
    set(&vs, "gate.weight", &to_vec_f(&w), &[e, d]);
    let batch = || Tensor::randn([256, d], (Kind::Float, Device::Cpu)) + &skew;
    let before = RoutingStats::of(&router.route(&batch(), true).unwrap())
        .unwrap()
        .max_violation;
    for _ in 0..300 {
        let r = router.route(&batch(), true).unwrap();
        router.after_step(&r).unwrap();
    }
    let after = RoutingStats::of(&router.route(&batch(), true).unwrap())
        .unwrap()
        .max_violation;
    assert!(before > 1.5, "the stream should start skewed: {before}");
    assert!(
        after < before / 4.0,
        "max violation {before} -> {after}: the bias should balance the load"
    );
}

#[test]
fn capacity_factor_is_validated() {
    let vs = nn::VarStore::new(Device::Cpu);
    for bad in [0.0, -1.0, f64::NAN] {
        let config = RouterConfig {
            capacity_factor: Some(bad),
            ..cfg(RouterKind::TopK, 4, 8, 2)
        };
        assert!(matches!(config.build(&vs.root()), Err(MoeError::Config(_))));
    }
}
