use approx::assert_abs_diff_eq;
use moe_core::{MoeError, WeightInit};
use moe_routers::{
    group_limited_selection, AttentionRouter, AuxFreeSigmoidRouter, ExpertChoiceScope,
    FromRouterSpec, Gate, GroupScore, NoisyTopKRouter, Router, RouterConfig, RouterDims,
    RoutingStats, TopKRouter, WeightsOn,
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

fn dims(d: i64, e: i64, k: i64) -> RouterDims {
    RouterDims {
        input_dim: d,
        num_experts: e,
        top_k: k,
    }
}

/// `gate` with the gate layers' bias on or off, other settings at their defaults.
fn cfg(gate: Gate, bias: bool) -> RouterConfig {
    RouterConfig {
        bias,
        ..RouterConfig::with_gate(gate)
    }
}

const MIXTRAL: Gate = Gate::TopK {
    norm_topk_prob: true,
};
const DEEPSEEK_MOE: Gate = Gate::TopK {
    norm_topk_prob: false,
};

fn sigmoid_gate(norm_topk_prob: bool, n_group: i64, topk_group: i64) -> Gate {
    Gate::SigmoidAuxFree {
        norm_topk_prob,
        bias_update_rate: 1e-3,
        n_group,
        topk_group,
    }
}

fn init() -> WeightInit {
    WeightInit::default()
}

#[test]
fn top_k_router_hand_computed_case() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router = TopKRouter::new(&vs.root(), dims(2, 3, 2), &cfg(MIXTRAL, true), init()).unwrap();
    // logits = x W^T + b with W rows e0 = (1, 0), e1 = (0, 1), e2 = (1, 1), b = (0, 0, -2).
    set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
    set(&vs, "gate.bias", &[0., 0., -2.], &[3]);
    // x0 = (3, 1): logits (3, 1, 2) -> experts 0, 2 with softmax(3, 2).
    // x1 = (1, -1): logits (1, -1, -2) -> experts 0, 1 with softmax(1, -1).
    let x = Tensor::from_slice(&[3f32, 1., 1., -1.]).view([2, 2]);
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices().unwrap()), vec![0, 2, 0, 1]);
    let e = std::f32::consts::E;
    let expected = [
        e / (e + 1.),
        1. / (e + 1.),
        1. / (1. + (-2f32).exp()),
        1. / (1. + 2f32.exp()),
    ];
    for (got, want) in to_vec_f(&r.weights().unwrap()).iter().zip(expected) {
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

/// Llama 4's gate by hand: the top-k logits, each weighted by its own
/// sigmoid; the balance losses' probabilities are the normalised sigmoids.
#[test]
fn sigmoid_top_k_router_hand_computed_case() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router = RouterConfig {
        bias: false,
        ..RouterConfig::with_gate(Gate::SigmoidTopK)
    }
    .build(&vs.root(), dims(2, 3, 2), init())
    .unwrap();
    set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
    // x0 = (3, -1): logits (3, -1, 2) -> experts 0, 2 with sigmoid(3), sigmoid(2).
    // x1 = (-1, -2): logits (-1, -2, -3) -> experts 0, 1 with sigmoid(-1), sigmoid(-2).
    let x = Tensor::from_slice(&[3f32, -1., -1., -2.]).view([2, 2]);
    let r = router.route(&x, false).unwrap();
    assert_eq!(to_vec_i(&r.indices().unwrap()), vec![0, 2, 0, 1]);
    let sigmoid = |l: f32| 1. / (1. + (-l).exp());
    let expected = [sigmoid(3.), sigmoid(2.), sigmoid(-1.), sigmoid(-2.)];
    for (got, want) in to_vec_f(&r.weights().unwrap()).iter().zip(expected) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    let total: f32 = [3., -1., 2.].into_iter().map(sigmoid).sum();
    assert_abs_diff_eq!(to_vec_f(&r.probs)[1], sigmoid(-1.) / total, epsilon = 1e-6);
}

#[test]
fn weights_sum_to_one_with_exactly_k_distinct_experts() {
    tch::manual_seed(3);
    for (e, k) in [(8, 2), (4, 1), (5, 5), (64, 8)] {
        // Expert choice gives a token any number of experts (its own tests).
        for name in Gate::NAMES.into_iter().filter(|n| *n != "expert_choice") {
            let gate: Gate = name.parse().unwrap();
            assert!(gate.is_token_choice(), "{name}");
            let vs = nn::VarStore::new(Device::Cpu);
            let router = RouterConfig::with_gate(gate.clone())
                .build(&vs.root(), dims(16, e, k), init())
                .unwrap();
            let x = Tensor::randn([50, 16], (Kind::Float, Device::Cpu));
            let r = router.route(&x, true).unwrap();
            assert_eq!(r.indices().unwrap().size(), vec![50, k]);
            // DeepSeekMoE and DeepSeek-V2 without norm_topk_prob keep the
            // raw probabilities.
            if !matches!(
                gate,
                DEEPSEEK_MOE
                    | Gate::SigmoidTopK
                    | Gate::GroupLimitedGreedy {
                        norm_topk_prob: false,
                        ..
                    }
            ) {
                let sums = r.weights().unwrap().sum_dim_intlist(-1, false, None);
                assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-5, "{name}");
            }
            let prob_sums = r.probs.sum_dim_intlist(-1, false, None);
            assert!((prob_sums - 1.0).abs().max().double_value(&[]) < 1e-5);
            let gates = r.dense_gates();
            let nonzero = gates.gt(0.0).sum_dim_intlist(-1, false, Kind::Int64);
            assert_eq!(to_vec_i(&nonzero), vec![k; 50], "{name} E={e} k={k}");
            assert_eq!(r.expert_counts().sum(Kind::Int64).int64_value(&[]), 50 * k);
        }
    }
}

#[test]
fn noise_is_added_in_training_only_unless_asked_for() {
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let quiet =
        NoisyTopKRouter::new(&vs.root(), dims(8, 4, 2), &RouterConfig::default(), init()).unwrap();
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
    let noisy_cfg = RouterConfig::with_gate(Gate::NoisyTopK {
        noise_at_eval: true,
        norm_topk_prob: true,
    });
    let noisy = NoisyTopKRouter::new(&vs2.root(), dims(8, 4, 2), &noisy_cfg, init()).unwrap();
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
        let err = cfg(MIXTRAL, true)
            .build(&vs.root(), dims(4, e, k), init())
            .unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "E={e} k={k}: {err}");
    }
    let err = cfg(MIXTRAL, true)
        .validate(dims(4, 8, 9))
        .unwrap_err()
        .to_string();
    assert!(err.contains("top_k") && err.contains("9"), "{err}");
    // A concrete router given another gate.
    let err = TopKRouter::new(&vs.root(), dims(4, 8, 2), &RouterConfig::default(), init())
        .unwrap_err()
        .to_string();
    assert!(err.contains("top_k") && err.contains("NoisyTopK"), "{err}");
}

#[test]
fn bad_gate_settings_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    // (gate, E, k, what the message must name)
    let cases = [
        (sigmoid_gate(true, 4, 5), 8, 2, "topk_group"),
        (sigmoid_gate(true, 4, 0), 8, 2, "topk_group"),
        (sigmoid_gate(true, 3, 1), 8, 2, "n_group"),
        (sigmoid_gate(true, 0, 1), 8, 2, "n_group"),
        // 2 kept groups of 2 experts hold 4 experts, fewer than k = 5.
        (sigmoid_gate(true, 4, 2), 8, 5, "top_k = 5"),
        (
            Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: -1.0,
                n_group: 1,
                topk_group: 1,
            },
            8,
            2,
            "bias_update_rate",
        ),
    ];
    for (gate, e, k, what) in cases {
        let config = cfg(gate.clone(), false);
        let err = config.validate(dims(4, e, k)).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{gate:?}: {err}");
        assert!(err.to_string().contains(what), "{gate:?}: {err}");
        let built = config.build(&vs.root(), dims(4, e, k), init());
        assert!(matches!(built, Err(MoeError::Config(_))), "{gate:?}");
    }
    for scale in [0.0, -2.5, f64::NAN, f64::INFINITY] {
        let config = RouterConfig {
            routed_scaling_factor: scale,
            ..cfg(MIXTRAL, true)
        };
        let err = config.validate(dims(4, 8, 2)).unwrap_err();
        assert!(err.to_string().contains("routed_scaling_factor"), "{err}");
    }
    // The group limit alone checks its groups too.
    let scores = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
    for (n_group, topk_group) in [(3, 1), (4, 5), (0, 0)] {
        assert!(matches!(
            group_limited_selection(&scores, n_group, topk_group, GroupScore::Max),
            Err(MoeError::Config(_))
        ));
    }
}

#[test]
fn gate_names_parse_with_clear_errors() {
    let parsed: Vec<Gate> = Gate::NAMES.iter().map(|n| n.parse().unwrap()).collect();
    assert_eq!(
        parsed,
        [
            MIXTRAL,
            Gate::NoisyTopK {
                noise_at_eval: false,
                norm_topk_prob: true,
            },
            Gate::Attention {
                norm_topk_prob: true,
            },
            DEEPSEEK_MOE,
            Gate::GroupLimitedGreedy {
                norm_topk_prob: false,
                n_group: 1,
                topk_group: 1,
            },
            Gate::sigmoid_aux_free(),
            Gate::SigmoidTopK,
            Gate::ExpertChoice {
                capacity_factor: 1.0,
                scope: ExpertChoiceScope::PerPosition,
            },
        ]
    );
    assert_eq!(
        "Sigmoid-Aux-Free".parse::<Gate>().unwrap(),
        Gate::sigmoid_aux_free()
    );
    let err = "switch".parse::<Gate>().unwrap_err();
    assert!(matches!(err, MoeError::Config(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("`switch`") && msg.contains("noisy_top_k"),
        "{msg}"
    );
}

#[test]
fn router_configs_read_and_write_the_gate_flat() {
    let config: RouterConfig = serde_json::from_str(
        r#"{"kind": "sigmoid_aux_free", "n_group": 4, "topk_group": 2, "bias": false,
            "routed_scaling_factor": 2.5}"#,
    )
    .unwrap();
    assert_eq!(
        config,
        RouterConfig {
            gate: Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: 1e-3,
                n_group: 4,
                topk_group: 2,
            },
            bias: false,
            routed_scaling_factor: 2.5,
            capacity_factor: None,
            weights_on: WeightsOn::Output,
        }
    );
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["kind"], "sigmoid_aux_free");
    assert_eq!(json["n_group"], 4);
    let back: RouterConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, config);
    // `top_k` alone is Mixtral's gate; the router's other fields default.
    let top_k: RouterConfig = serde_json::from_str(r#"{"kind": "top_k"}"#).unwrap();
    assert_eq!(top_k, RouterConfig::with_gate(MIXTRAL));
    let unknown = serde_json::from_str::<RouterConfig>(r#"{"kind": "switch"}"#).unwrap_err();
    assert!(unknown.to_string().contains("switch"), "{unknown}");
    // The gate is never guessed.
    let missing = serde_json::from_str::<RouterConfig>(r#"{"bias": false}"#).unwrap_err();
    assert!(missing.to_string().contains("kind"), "{missing}");
}

#[test]
fn parameter_counts_match_the_variables() {
    for name in Gate::NAMES {
        for bias in [false, true] {
            let config = cfg(name.parse().unwrap(), bias);
            let vs = nn::VarStore::new(Device::Cpu);
            let _router = config.build(&vs.root(), dims(6, 8, 2), init()).unwrap();
            let counted: i64 = vs
                .trainable_variables()
                .iter()
                .map(|t| t.numel() as i64)
                .sum();
            assert_eq!(
                config.num_params(dims(6, 8, 2)),
                counted,
                "{name} bias={bias}"
            );
            let has_bias = vs.variables().keys().any(|k| k.ends_with(".bias"));
            assert_eq!(has_bias, bias, "{name}");
        }
    }
}

#[test]
fn bad_router_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router = RouterConfig::default()
        .build(&vs.root(), dims(4, 8, 2), init())
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
    let config = cfg(
        Gate::Attention {
            norm_topk_prob: true,
        },
        false,
    );
    let router = AttentionRouter::new(&vs.root(), dims(1, 2, 2), &config, init()).unwrap();
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
    assert_eq!(to_vec_i(&r.indices().unwrap()), vec![1, 0]);
    assert_all_close(&r.logits, &[p0, 2.], 1e-6);
    let w1 = 1. / (1. + (p0 - 2.).exp());
    assert_all_close(&r.weights().unwrap(), &[w1, 1. - w1], 1e-6);
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
    let config = cfg(
        Gate::Attention {
            norm_topk_prob: true,
        },
        false,
    );
    let router = AttentionRouter::new(&vs.root(), dims(d, e, k), &config, init()).unwrap();
    let vars = vs.variables();
    let w = |name: &str| to_vec_f(&vars[name]);
    let (wq, wk, wv) = (w("query.weight"), w("key.weight"), w("value.weight"));
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let r = router.route(&x, false).unwrap();
    let xs = to_vec_f(&x);
    let logits = to_vec_f(&r.logits);
    let indices = to_vec_i(&r.indices().unwrap());
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
fn top_k_gate_renormalises_only_with_norm_topk_prob() {
    for norm in [false, true] {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = cfg(
            Gate::TopK {
                norm_topk_prob: norm,
            },
            false,
        );
        let router = TopKRouter::new(&vs.root(), dims(2, 3, 2), &config, init()).unwrap();
        set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
        // x = (3, 1): logits (3, 1, 4); s = softmax over all three.
        let x = Tensor::from_slice(&[3f32, 1.]).view([1, 2]);
        let r = router.route(&x, true).unwrap();
        assert_eq!(to_vec_i(&r.indices().unwrap()), vec![2, 0]);
        let (a, b, c) = (3f32.exp(), 1f32.exp(), 4f32.exp());
        let z = a + b + c;
        assert_all_close(&r.probs, &[a / z, b / z, c / z], 1e-6);
        // Without: the chosen probabilities themselves, summing to 1 - s_1 < 1.
        // With (Mixtral): renormalised over the two, = softmax(4, 3).
        let want = if norm {
            [c / (a + c), a / (a + c)]
        } else {
            [c / z, a / z]
        };
        assert_all_close(&r.weights().unwrap(), &want, 1e-6);
        let sum = r.weights().unwrap().sum(Kind::Float).double_value(&[]);
        if norm {
            assert_abs_diff_eq!(sum, 1.0, epsilon = 1e-6);
        } else {
            assert_abs_diff_eq!(sum, f64::from(1. - b / z), epsilon = 1e-6);
            assert!(sum < 0.99);
        }
    }
}

#[test]
fn sigmoid_router_selects_with_the_bias_and_weights_without_it() {
    let vs = nn::VarStore::new(Device::Cpu);
    let config = cfg(Gate::sigmoid_aux_free(), false);
    let router = AuxFreeSigmoidRouter::new(&vs.root(), dims(2, 3, 2), &config, init()).unwrap();
    set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
    let x = Tensor::from_slice(&[3f32, 1.]).view([1, 2]);
    let sig = |v: f32| 1. / (1. + (-v).exp());
    let (s0, s1, s2) = (sig(3.), sig(1.), sig(4.));
    // Without bias: experts 2 and 0.
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices().unwrap()), vec![2, 0]);
    assert_all_close(
        &r.weights().unwrap(),
        &[s2 / (s2 + s0), s0 / (s2 + s0)],
        1e-6,
    );
    let sum = s0 + s1 + s2;
    assert_all_close(&r.probs, &[s0 / sum, s1 / sum, s2 / sum], 1e-6);
    // A large bias on expert 1 brings it in first; weights still come from s.
    set(&vs, "expert_bias", &[0., 10., 0.], &[3]);
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices().unwrap()), vec![1, 2]);
    assert_all_close(
        &r.weights().unwrap(),
        &[s1 / (s1 + s2), s2 / (s1 + s2)],
        1e-6,
    );
}

#[test]
fn sigmoid_router_without_norm_topk_prob_weights_by_the_sigmoids() {
    let sig = |v: f32| 1. / (1. + (-v).exp());
    for norm in [false, true] {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = cfg(sigmoid_gate(norm, 1, 1), false);
        let router = config.build(&vs.root(), dims(2, 3, 2), init()).unwrap();
        set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
        // Tokens (3, 1) and (-1, 0.5): sigmoids of (3, 1, 4) and (-1, 0.5, -0.5).
        let x = Tensor::from_slice(&[3f32, 1., -1., 0.5]).view([2, 2]);
        let r = router.route(&x, true).unwrap();
        assert_eq!(to_vec_i(&r.indices().unwrap()), vec![2, 0, 1, 2]);
        let raw = [sig(4.), sig(3.), sig(0.5), sig(-0.5)];
        let sums = to_vec_f(&r.weights().unwrap().sum_dim_intlist(-1, false, None));
        if norm {
            let want = [
                raw[0] / (raw[0] + raw[1]),
                raw[1] / (raw[0] + raw[1]),
                raw[2] / (raw[2] + raw[3]),
                raw[3] / (raw[2] + raw[3]),
            ];
            assert_all_close(&r.weights().unwrap(), &want, 1e-6);
            assert_all_close(
                &r.weights().unwrap().sum_dim_intlist(-1, false, None),
                &[1., 1.],
                1e-6,
            );
        } else {
            // The affinities themselves: rows sum to 1.93 and 1.0 (sigmoid(x) +
            // sigmoid(-x) = 1 for the second token's pair), not renormalised.
            assert_all_close(&r.weights().unwrap(), &raw, 1e-6);
            assert!((sums[0] - 1.0).abs() > 0.5, "{sums:?}");
        }
    }
}

/// E = 8 experts in 4 groups of 2 ({0,1}, {2,3}, {4,5}, {6,7}), k = 2,
/// one-dimensional tokens so that the logits are the gate weights times x.
#[test]
fn group_limited_routing_chooses_inside_the_best_groups() {
    let sig = |v: f32| 1. / (1. + (-v).exp());
    let logits = [3.0f32, -3.0, 1.2, 0.8, 0.6, 0.4, 2.5, -4.0];
    let route = |n_group: i64, topk_group: i64| {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = cfg(sigmoid_gate(true, n_group, topk_group), false);
        let router = config.build(&vs.root(), dims(1, 8, 2), init()).unwrap();
        set(&vs, "gate.weight", &logits, &[8, 1]);
        // x = 1 gives the logits above, x = -1 their negatives.
        let x = Tensor::from_slice(&[1f32, -1.]).view([2, 1]);
        router.route(&x, true).unwrap()
    };
    // Token 0's group scores (sum of each group's top-2 sigmoids):
    // g0 = s(3) + s(-3) = 1.000, g1 = s(1.2) + s(0.8) = 1.459,
    // g2 = s(0.6) + s(0.4) = 1.244, g3 = s(2.5) + s(-4) = 0.942.
    // Token 1 (negated logits): g0 = 1.000, g1 = 0.542, g2 = 0.756, g3 = 1.058.
    //
    // No group limit: the two largest sigmoids overall.
    let plain = route(1, 1);
    assert_eq!(to_vec_i(&plain.indices().unwrap()), vec![0, 6, 7, 1]);
    // Groups 1 and 2 for token 0: experts 2 and 3, although 0 and 6 score
    // higher; groups 3 and 0 for token 1: the same experts as without limit.
    let grouped = route(4, 2);
    assert_eq!(to_vec_i(&grouped.indices().unwrap()), vec![2, 3, 7, 1]);
    let (s2, s3) = (sig(1.2), sig(0.8));
    let (s7, s1) = (sig(4.0), sig(3.0));
    assert_all_close(
        &grouped.weights().unwrap(),
        &[
            s2 / (s2 + s3),
            s3 / (s2 + s3),
            s7 / (s7 + s1),
            s1 / (s7 + s1),
        ],
        1e-6,
    );
    // The limit steers selection only: probabilities stay over all 8.
    assert!(plain.probs.equal(&grouped.probs));
    // Three groups for token 0 (1, 2 and 0): expert 0 is back, with expert 2.
    assert_eq!(to_vec_i(&route(4, 3).indices().unwrap())[..2], [0, 2]);
    // One group of 2 is enough for k = 2.
    assert_eq!(to_vec_i(&route(4, 1).indices().unwrap()), vec![2, 3, 7, 6]);
}

#[test]
fn group_limited_selection_masks_the_other_groups_with_minus_infinity() {
    let sel = Tensor::from_slice(&[0.9f32, 0.1, 0.5, 0.6, -0.3, -0.2, 0.4, 0.7, 0.2]).view([1, 9]);
    // Groups {0,1,2}: 0.9 + 0.5 = 1.4; {3,4,5}: 0.6 - 0.2 = 0.4; {6,7,8}: 0.7 + 0.4 = 1.1.
    let masked = group_limited_selection(&sel, 3, 2, GroupScore::TopTwoSum).unwrap();
    let inf = f32::NEG_INFINITY;
    assert_eq!(
        to_vec_f(&masked),
        vec![0.9, 0.1, 0.5, inf, inf, inf, 0.4, 0.7, 0.2]
    );
    // One expert per group: groups are scored by that one score.
    let single = group_limited_selection(&sel, 9, 3, GroupScore::TopTwoSum).unwrap();
    assert_eq!(
        to_vec_f(&single),
        vec![0.9, inf, inf, 0.6, inf, inf, inf, 0.7, inf]
    );
    // One group: unchanged.
    assert!(group_limited_selection(&sel, 1, 1, GroupScore::TopTwoSum)
        .unwrap()
        .equal(&sel));
    // DeepSeek-V2's group score, the largest: {0,1,2}: 0.9; {3,4,5}: 0.6;
    // {6,7,8}: 0.7 -- the second group loses to the third by its best alone.
    let by_max = group_limited_selection(&sel, 3, 2, GroupScore::Max).unwrap();
    assert_eq!(
        to_vec_f(&by_max),
        vec![0.9, 0.1, 0.5, inf, inf, inf, 0.4, 0.7, 0.2]
    );
    let one_group = group_limited_selection(&sel, 3, 1, GroupScore::Max).unwrap();
    assert_eq!(
        to_vec_f(&one_group),
        vec![0.9, 0.1, 0.5, inf, inf, inf, inf, inf, inf]
    );
}

/// DeepSeek-V2's gate on one token by hand: the softmax of the logits, the
/// groups scored by their largest probability, the top-k inside the kept
/// groups, weighted by the probabilities themselves (not renormalised).
#[test]
fn group_limited_greedy_routes_by_hand() {
    let logits = [2.0f32, 0.0, 1.0, 2.5, 1.9, 1.8];
    let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
    let p = |i: usize| f64::from(logits[i]).exp() / z;
    // Groups {0,1}, {2,3}, {4,5} scored 2.0, 2.5, 1.9 by their best logit:
    // two kept groups choose experts 3 and 0 (DeepSeek-V3's sum of the two
    // best would keep {4,5}, 3.7, and choose 3 and 4); one kept group, 3 and 2.
    for (topk_group, expected) in [(2, [3i64, 0]), (1, [3, 2])] {
        let vs = nn::VarStore::new(Device::Cpu);
        let gate = Gate::GroupLimitedGreedy {
            norm_topk_prob: false,
            n_group: 3,
            topk_group,
        };
        let router = TopKRouter::new(&vs.root(), dims(1, 6, 2), &cfg(gate, false), init()).unwrap();
        set(&vs, "gate.weight", &logits, &[6, 1]);
        let r = router
            .route(&Tensor::ones([1, 1], (Kind::Float, Device::Cpu)), false)
            .unwrap();
        let indices: Vec<i64> = Vec::try_from(r.indices().unwrap().view([-1])).unwrap();
        assert_eq!(indices, expected, "topk_group {topk_group}");
        let weights = to_vec_f(&r.weights().unwrap());
        for (w, &e) in weights.iter().zip(&expected) {
            assert_abs_diff_eq!(f64::from(*w), p(e as usize), epsilon = 1e-6);
        }
    }
    // Renormalised: the two chosen probabilities over their sum.
    let vs = nn::VarStore::new(Device::Cpu);
    let gate = Gate::GroupLimitedGreedy {
        norm_topk_prob: true,
        n_group: 3,
        topk_group: 1,
    };
    let router =
        TopKRouter::new(&vs.root(), dims(1, 6, 2), &cfg(gate.clone(), false), init()).unwrap();
    set(&vs, "gate.weight", &logits, &[6, 1]);
    let r = router
        .route(&Tensor::ones([1, 1], (Kind::Float, Device::Cpu)), false)
        .unwrap();
    let weights = to_vec_f(&r.weights().unwrap());
    assert_abs_diff_eq!(f64::from(weights[0]), p(3) / (p(3) + p(2)), epsilon = 1e-6);
    // k beyond the kept groups' experts is a config error.
    let err = TopKRouter::new(
        &(vs.root() / "k3"),
        dims(1, 6, 3),
        &cfg(gate, false),
        init(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("topk_group"), "{err}");
}

#[test]
fn routed_scaling_factor_scales_the_final_weights() {
    tch::manual_seed(8);
    let x = Tensor::randn([20, 6], (Kind::Float, Device::Cpu));
    for gate in [
        MIXTRAL,
        DEEPSEEK_MOE,
        Gate::GroupLimitedGreedy {
            norm_topk_prob: true,
            n_group: 4,
            topk_group: 2,
        },
        sigmoid_gate(true, 4, 2),
        Gate::Attention {
            norm_topk_prob: true,
        },
    ] {
        let config = RouterConfig {
            routed_scaling_factor: 2.5,
            ..cfg(gate.clone(), false)
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let router = config.build(&vs.root(), dims(6, 8, 2), init()).unwrap();
        let unscaled = router.select(&x, false).unwrap();
        let scaled = router.route(&x, false).unwrap();
        assert!(
            scaled
                .indices()
                .unwrap()
                .equal(&unscaled.indices().unwrap()),
            "{gate:?}"
        );
        let diff = (&scaled.weights().unwrap() - &unscaled.weights().unwrap() * 2.5)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "{gate:?}: {diff}");
        // The scale is applied after the renormalisation: rows sum to 2.5.
        if gate != DEEPSEEK_MOE {
            let sums = scaled.weights().unwrap().sum_dim_intlist(-1, false, None);
            assert!(
                (sums - 2.5).abs().max().double_value(&[]) < 1e-5,
                "{gate:?}"
            );
        }
        // The probabilities the balance losses read are not scaled.
        assert!(scaled.probs.equal(&unscaled.probs));
    }
    // By hand: the top-k case of `top_k_router_hand_computed_case`, times 2.5.
    let vs = nn::VarStore::new(Device::Cpu);
    let config = RouterConfig {
        routed_scaling_factor: 2.5,
        ..cfg(MIXTRAL, false)
    };
    let router = config.build(&vs.root(), dims(2, 3, 2), init()).unwrap();
    set(&vs, "gate.weight", &[1., 0., 0., 1., 1., 1.], &[3, 2]);
    let r = router
        .route(&Tensor::from_slice(&[3f32, 1.]).view([1, 2]), false)
        .unwrap();
    let e = std::f32::consts::E;
    assert_all_close(
        &r.weights().unwrap(),
        &[2.5 * e / (e + 1.), 2.5 / (e + 1.)],
        1e-6,
    );
}

#[test]
fn sigmoid_router_bias_update_follows_the_sign_of_the_load_gap() {
    let vs = nn::VarStore::new(Device::Cpu);
    let gate = Gate::SigmoidAuxFree {
        norm_topk_prob: true,
        bias_update_rate: 0.25,
        n_group: 1,
        topk_group: 1,
    };
    let router =
        AuxFreeSigmoidRouter::new(&vs.root(), dims(2, 3, 1), &cfg(gate, false), init()).unwrap();
    // Rows pick experts 0, 0, 0, 1: loads (3, 1, 0), mean 4/3.
    set(&vs, "gate.weight", &[1., 0., 0., 1., -1., -1.], &[3, 2]);
    let x = Tensor::from_slice(&[2f32, 0., 2., 1., 3., 0., 0., 2.]).view([4, 2]);
    let r = router.route(&x, true).unwrap();
    assert_eq!(to_vec_i(&r.indices().unwrap()), vec![0, 0, 0, 1]);
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
    let gate = Gate::SigmoidAuxFree {
        norm_topk_prob: true,
        bias_update_rate: 1e-2,
        n_group: 1,
        topk_group: 1,
    };
    let router =
        AuxFreeSigmoidRouter::new(&vs.root(), dims(d, e, k), &cfg(gate, false), init()).unwrap();
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
fn capacity_factor_is_validated_and_recorded_in_the_routing() {
    let vs = nn::VarStore::new(Device::Cpu);
    for bad in [0.0, -1.0, f64::NAN] {
        let config = RouterConfig {
            capacity_factor: Some(bad),
            ..cfg(MIXTRAL, true)
        };
        let built = config.build(&vs.root(), dims(4, 8, 2), init());
        assert!(matches!(built, Err(MoeError::Config(_))));
    }
    let config = RouterConfig {
        capacity_factor: Some(1.0),
        ..cfg(MIXTRAL, true)
    };
    let router = config.build(&vs.root(), dims(4, 8, 2), init()).unwrap();
    let x = Tensor::randn([12, 4], (Kind::Float, Device::Cpu));
    let r = router.route(&x, false).unwrap();
    // C = floor(12 * 2 / 8 * 1.0) = 3.
    assert_eq!(r.capacity, Some(3));
    assert!(r.dropped.is_some());
    assert_eq!(router.select(&x, false).unwrap().capacity, None);
}

/// The noisy (at evaluation, without noise) and attention gates take
/// `norm_topk_prob` too: renormalised over the `k`, or the softmax over all
/// `E` read at the `k`, with the same choice of experts.
#[test]
fn every_softmax_gate_renormalises_only_with_norm_topk_prob() {
    let gates = |norm: bool| {
        [
            Gate::NoisyTopK {
                noise_at_eval: false,
                norm_topk_prob: norm,
            },
            Gate::Attention {
                norm_topk_prob: norm,
            },
        ]
    };
    let x = Tensor::from_slice(&[0.3f32, -1.2, 0.8, 2.0, -0.5, 0.1]).view([2, 3]);
    for (with, without) in gates(true).into_iter().zip(gates(false)) {
        // Both routers hold the same weights (copied, not re-seeded: other
        // tests draw from the global generator in parallel).
        let vs_a = nn::VarStore::new(Device::Cpu);
        let router_a = cfg(with.clone(), true)
            .build(&vs_a.root(), dims(3, 4, 2), init())
            .unwrap();
        let mut vs_b = nn::VarStore::new(Device::Cpu);
        let router_b = cfg(without.clone(), true)
            .build(&vs_b.root(), dims(3, 4, 2), init())
            .unwrap();
        // Fixed, modest weights: the probabilities stay spread out (random
        // ones can make a token's top 2 of 4 hold more than 0.999).
        tch::no_grad(|| {
            for (_, mut var) in vs_a.variables() {
                let n = var.numel() as i64;
                let values = Tensor::arange(n, (Kind::Float, Device::Cpu)).sin() * 0.3;
                var.copy_(&values.view(var.size().as_slice()));
            }
        });
        vs_b.copy(&vs_a).unwrap();
        let a = router_a.route(&x, false).unwrap();
        let b = router_b.route(&x, false).unwrap();
        assert!(
            a.indices().unwrap().equal(&b.indices().unwrap()),
            "{with:?}: same experts"
        );
        let sums = a.weights().unwrap().sum_dim_intlist(-1, false, Kind::Float);
        assert_all_close(&sums, &[1.0, 1.0], 1e-6);
        // Without: the probabilities over all E at the chosen experts.
        let want = b.probs.gather(1, &b.indices().unwrap(), false);
        assert!(
            (&b.weights().unwrap() - want).abs().max().double_value(&[]) < 1e-6,
            "{without:?}"
        );
        let sums = Vec::<f64>::try_from(b.weights().unwrap().sum_dim_intlist(
            -1,
            false,
            Kind::Double,
        ))
        .unwrap();
        assert!(sums.iter().all(|&s| s < 0.999), "{without:?}: {sums:?}");
    }
}
