//! Fine-grained and shared experts (DeepSeekMoE, Qwen2-MoE's gated shared
//! expert), capacity limits and every router gate inside `SparseMoe`,
//! against a per-token loop reference; parameter counts and config errors.

use moe_block::{FineGrained, SharedExperts, SparseMoe, SparseMoeConfig};
use moe_core::MoeError;
use moe_dispatch::DispatchKind;
use moe_experts::Activation;
use moe_routers::{balance::load_balance_loss, BalanceLossConfig, Gate, RouterConfig};
use tch::{nn, Device, Kind, Tensor};

/// `y_n = c(x_n) sum_s FFN^shared_s(x_n) + sum_j w[n, j] FFN_{i[n, j]}(x_n)`,
/// token by token, `c` the shared experts' sigmoid gate or 1.
fn loop_reference(moe: &SparseMoe, x: &Tensor, indices: &Tensor, weights: &Tensor) -> Tensor {
    let n = x.size()[0];
    let rows: Vec<Tensor> = (0..n)
        .map(|t| {
            let xt = x.narrow(0, t, 1);
            let mut y = xt.zeros_like();
            if let Some(shared) = moe.shared_experts() {
                let mut s_out = xt.zeros_like();
                for s in 0..shared.num_experts() {
                    s_out += shared.forward_expert(s, &xt, false);
                }
                if let Some(gate) = moe.shared_expert_gate() {
                    s_out *= xt.matmul(&gate.ws.tr()).sigmoid();
                }
                y += s_out;
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

/// The router of each design as the comparison configures it.
fn router(name: &str) -> RouterConfig {
    RouterConfig {
        // makeMoE and Mixtral-style top-k have gate biases, the others none.
        bias: matches!(name, "top_k" | "noisy_top_k"),
        ..RouterConfig::with_gate(name.parse().unwrap())
    }
}

/// `N = 4` experts of hidden 16, top-2, over 6-wide tokens, refined by `m`
/// segments with `shared` shared experts.
fn layout(segments: i64, shared: i64) -> FineGrained {
    FineGrained {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 16,
        segments,
        shared_experts: shared,
    }
}

fn base(router: RouterConfig) -> SparseMoeConfig {
    SparseMoeConfig {
        n_embd: 6,
        num_experts: 4,
        top_k: 2,
        expert_hidden: 16,
        dropout: 0.0,
        router,
        ..Default::default()
    }
}

fn config(gate: &str, segments: i64, shared: i64) -> SparseMoeConfig {
    base(router(gate))
        .fine_grained(layout(segments, shared))
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn fine_grained_layouts_derive_the_routed_and_shared_sizes() {
    let c = config("deepseek_moe", 4, 1);
    // m N - K_s = 15 routed of width 16 / 4, m K - K_s = 7 chosen, 1 shared.
    assert_eq!((c.num_experts, c.top_k, c.expert_hidden), (15, 7, 4));
    assert_eq!(
        c.shared_experts,
        Some(SharedExperts {
            num_experts: 1,
            hidden: 4,
            sigmoid_gate: false
        })
    );
    let plain = config("top_k", 1, 0);
    assert_eq!(
        (plain.num_experts, plain.top_k, plain.expert_hidden),
        (4, 2, 16)
    );
    assert_eq!(plain.shared_experts, None);
}

#[test]
fn fine_grained_shared_and_capped_layers_match_a_per_token_loop() {
    tch::manual_seed(21);
    let qwen_like = SparseMoeConfig {
        expert_bias: false,
        shared_experts: Some(SharedExperts {
            num_experts: 1,
            hidden: 10,
            sigmoid_gate: true,
        }),
        ..config("deepseek_moe", 2, 0)
    };
    let grouped_sigmoid = SparseMoeConfig {
        router: RouterConfig {
            gate: Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: 1e-3,
                n_group: 4,
                topk_group: 2,
            },
            bias: false,
            routed_scaling_factor: 2.5,
            ..RouterConfig::default()
        },
        ..config("sigmoid_aux_free", 2, 0)
    };
    let cases = [
        (config("top_k", 1, 0), None),
        (config("deepseek_moe", 4, 1), None),
        (config("deepseek_moe", 2, 3), None),
        (config("attention", 2, 0), None),
        (config("sigmoid_aux_free", 4, 2), None),
        (grouped_sigmoid, None),
        (qwen_like, None),
        (config("noisy_top_k", 1, 0), Some(1.0)),
        (config("top_k", 4, 1), Some(0.5)),
    ];
    for (base, capacity) in cases {
        for activation in [Activation::Relu, Activation::SwiGlu] {
            for dispatch in [
                DispatchKind::MaskLoop,
                DispatchKind::DenseReference,
                DispatchKind::Capacity,
            ] {
                if dispatch == DispatchKind::Capacity && capacity.is_none() {
                    continue;
                }
                let mut cfg = SparseMoeConfig {
                    activation,
                    dispatch,
                    ..base.clone()
                };
                cfg.router.capacity_factor = capacity;
                let vs = nn::VarStore::new(Device::Cpu);
                let moe = SparseMoe::new(&vs.root(), cfg.clone()).unwrap();
                let x = Tensor::randn([3, 5, 6], (Kind::Float, Device::Cpu));
                let out = moe.forward_t(&x, false).unwrap();
                let r = &out.routing;
                assert_eq!(r.indices().unwrap().size(), vec![15, cfg.top_k]);
                assert_eq!(r.num_experts, cfg.num_experts);
                let want = loop_reference(
                    &moe,
                    &x.view([15, 6]),
                    &r.indices().unwrap(),
                    &r.weights().unwrap(),
                );
                let diff = max_diff(&out.output.view([15, 6]), &want);
                assert!(diff < 1e-5, "{cfg:?}: {diff}");
                if capacity.is_some() {
                    assert!(r.dropped.is_some() && r.capacity.is_some());
                }
            }
        }
    }
}

/// Qwen2-MoE's block (HF `Qwen2MoeSparseMoeBlock`): routed experts plus one
/// shared expert scaled by `sigmoid(x w_g)`, everything from the layer's own
/// variables with plain tensor algebra.
#[test]
fn the_shared_expert_sigmoid_gate_scales_the_shared_output() {
    tch::manual_seed(3);
    let cfg = SparseMoeConfig {
        n_embd: 5,
        num_experts: 6,
        top_k: 2,
        expert_hidden: 7,
        shared_experts: Some(SharedExperts {
            num_experts: 1,
            hidden: 9,
            sigmoid_gate: true,
        }),
        dropout: 0.0,
        activation: Activation::SwiGlu,
        expert_bias: false,
        router: RouterConfig {
            bias: false,
            ..RouterConfig::with_gate(Gate::TopK {
                norm_topk_prob: false,
            })
        },
        ..Default::default()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let moe = SparseMoe::new(&vs.root(), cfg).unwrap();
    let v = vs.variables();
    assert_eq!(v["shared_expert_gate.weight"].size(), vec![1, 5]);
    assert!(!v.contains_key("shared_expert_gate.bias"));
    let x = Tensor::randn([11, 5], (Kind::Float, Device::Cpu));
    let out = moe.forward_t(&x, false).unwrap();
    let r = &out.routing;

    // SwiGLU without biases: (SiLU(x W_gate) * (x W_in)) W_out.
    let ffn = |prefix: &str, e: i64, x: &Tensor| {
        let w = |name: &str| v[&format!("{prefix}.{name}")].get(e);
        (x.matmul(&w("w_gate")).silu() * x.matmul(&w("w_in"))).matmul(&w("w_out"))
    };
    // Router: softmax over the 6 logits, the chosen probabilities unnormalised.
    let probs = x
        .matmul(&v["router.gate.weight"].tr())
        .softmax(-1, Kind::Float);
    let mut routed = x.zeros_like();
    for t in 0..11 {
        let xt = x.narrow(0, t, 1);
        for j in 0..2 {
            let e = r.indices().unwrap().int64_value(&[t, j]);
            let p = probs.double_value(&[t, e]);
            assert!((r.weights().unwrap().double_value(&[t, j]) - p).abs() < 1e-6);
            let y = ffn("experts", e, &xt) * p;
            routed = routed.index_add(0, &Tensor::from_slice(&[t]), &y);
        }
    }
    let gate = x.matmul(&v["shared_expert_gate.weight"].tr()).sigmoid(); // [N, 1]
    let want = routed + gate * ffn("shared_experts", 0, &x);
    let diff = max_diff(&out.output, &want);
    assert!(diff < 1e-5, "{diff}");
    // The gate matters: without it the output would differ.
    assert!(max_diff(&out.output, &(&want - 0.5 * ffn("shared_experts", 0, &x))) > 1e-3);
}

#[test]
fn parameter_counts_match_the_variables() {
    let qwen_like = |activation| SparseMoeConfig {
        activation,
        expert_bias: false,
        shared_experts: Some(SharedExperts {
            num_experts: 2,
            hidden: 10,
            sigmoid_gate: true,
        }),
        ..config("deepseek_moe", 1, 0)
    };
    for (gate, m, shared) in [
        ("top_k", 1, 0),
        ("noisy_top_k", 1, 0),
        ("attention", 1, 0),
        ("deepseek_moe", 4, 1),
        ("sigmoid_aux_free", 2, 0),
    ] {
        for activation in [Activation::Relu, Activation::SwiGlu] {
            for cfg in [
                SparseMoeConfig {
                    activation,
                    ..config(gate, m, shared)
                },
                SparseMoeConfig {
                    activation,
                    expert_bias: false,
                    ..config(gate, m, shared)
                },
                qwen_like(activation),
            ] {
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
    }
    // Fine-grained segmentation with shared experts keeps the active experts'
    // parameters of top-2 of 4 (hidden 16): 8 experts of hidden 4 active.
    let coarse = config("deepseek_moe", 1, 0);
    let fine = config("deepseek_moe", 4, 1);
    let expert_active =
        |c: &SparseMoeConfig| c.active_params() - c.router.num_params(c.router_dims());
    let (d, h) = (6, 16);
    // Weights are identical (2 k d h); each expert has its own biases (h/m + d).
    assert_eq!(expert_active(&coarse), 2 * (2 * d * h + h + d));
    assert_eq!(expert_active(&fine), 8 * (2 * d * (h / 4) + h / 4 + d));
    // Qwen-like: 2 routed (ReLU, no bias) + 2 shared of hidden 10 + the gate.
    let q = qwen_like(Activation::Relu);
    assert_eq!(expert_active(&q), 2 * (2 * d * h) + 2 * (2 * d * 10) + d);
}

#[test]
fn bad_layer_configs_are_errors() {
    let shared = |num_experts, hidden| SparseMoeConfig {
        shared_experts: Some(SharedExperts {
            num_experts,
            hidden,
            sigmoid_gate: true,
        }),
        ..config("top_k", 1, 0)
    };
    let grouped = |n_group, topk_group, top_k| SparseMoeConfig {
        top_k,
        router: RouterConfig {
            bias: false,
            ..RouterConfig::with_gate(Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: 1e-3,
                n_group,
                topk_group,
            })
        },
        ..config("top_k", 2, 0) // 8 routed experts
    };
    // (config, what the message names)
    let bad = [
        (
            SparseMoeConfig {
                top_k: 5,
                ..config("top_k", 1, 0)
            },
            "top_k",
        ),
        (
            SparseMoeConfig {
                dispatch: DispatchKind::Capacity,
                ..config("top_k", 1, 0)
            },
            "capacity_factor",
        ),
        (shared(1, 0), "hidden"),
        (shared(0, 4), "num_experts"),
        (grouped(4, 5, 2), "topk_group"),
        (grouped(3, 1, 2), "n_group"),
        (grouped(4, 1, 3), "top_k = 3"),
        (
            SparseMoeConfig {
                balance: BalanceLossConfig {
                    device_balance: 0.1,
                    expert_devices: vec![0, 1],
                    ..Default::default()
                },
                ..config("top_k", 1, 0)
            },
            "expert_devices",
        ),
    ];
    for (cfg, what) in bad {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = SparseMoe::new(&vs.root(), cfg.clone()).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{cfg:?}: {err}");
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    // The same capacity dispatch is fine with a capacity factor.
    let mut capped = SparseMoeConfig {
        dispatch: DispatchKind::Capacity,
        ..config("top_k", 1, 0)
    };
    capped.router.capacity_factor = Some(1.25);
    assert!(capped.validate().is_ok());
    // Layout errors.
    for (segments, shared, what) in [(3, 0, "16"), (0, 0, "segments"), (2, 4, "shared_experts")] {
        let err = base(router("top_k"))
            .fine_grained(layout(segments, shared))
            .unwrap_err();
        assert!(matches!(err, MoeError::Config(_)));
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    assert!(base(router("top_k")).fine_grained(layout(1, -1)).is_err());
}

#[test]
fn the_layer_returns_its_balance_loss_per_sequence_when_asked() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let plain = SparseMoe::new(&vs.root(), config("top_k", 1, 0)).unwrap();
    let x = Tensor::randn([2, 4, 6], (Kind::Float, Device::Cpu));
    assert!(plain.forward_t(&x, true).unwrap().aux_loss.is_none());

    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = SparseMoeConfig {
        balance: BalanceLossConfig {
            load_balance: 0.5,
            per_sequence: true,
            ..Default::default()
        },
        ..config("deepseek_moe", 2, 1)
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
