//! Every sparse dispatch strategy must equal the dense reference (every
//! expert on every token, then weighted) in outputs and in the gradients of
//! the input, the expert weights and the router weights.

use moe_block::{SparseMoe, SparseMoeConfig};
use moe_dispatch::DispatchKind;
use moe_experts::Activation;
use moe_routers::{ExpertChoiceScope, Gate, RouterConfig, WeightsOn};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

/// libtorch's generator is global and the tests of this file run in
/// parallel threads: a test holds this lock from seeding the generator until
/// it has drawn its parameters and inputs, so that it draws the same numbers
/// whatever the other tests do (a draw of another seed once pushed the bf16
/// test just past its tolerance).
fn rng() -> MutexGuard<'static, ()> {
    static RNG: Mutex<()> = Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// fp32 tolerance, relative to the reference's magnitude where that exceeds 1
/// (gradients of router weights sum over every token).
const TOL: f64 = 1e-5;

/// Every dispatch strategy, the dense reference included.
const EVERY_STRATEGY: [DispatchKind; 6] = [
    DispatchKind::DenseReference,
    DispatchKind::MaskLoop,
    DispatchKind::IndexedLoop,
    DispatchKind::Grouped,
    DispatchKind::Auto,
    DispatchKind::Capacity,
];

/// Mixtral's gate (with gate bias, so that `skew` can favour expert 0).
const TOP_K: Gate = Gate::TopK {
    norm_topk_prob: true,
};

#[derive(Clone)]
struct Case {
    n: i64,
    d: i64,
    h: i64,
    e: i64,
    k: i64,
    router: Gate,
    activation: Activation,
    /// Experts with biases `b_in`, `b_out`.
    expert_bias: bool,
    /// Bias added to expert 0's router logit (large: every token picks it).
    skew: f64,
    /// The input as `[n / seq_len, seq_len, d]` sequences (expert choice per
    /// position reads them); `None`: `[n, d]`.
    seq_len: Option<i64>,
}

/// Output and gradients (input first, then every parameter by name) of `moe` under `kind`.
fn run(
    vs: &nn::VarStore,
    moe: &mut SparseMoe,
    kind: DispatchKind,
    x: &Tensor,
) -> Vec<(String, Tensor)> {
    moe.set_dispatch(kind.build());
    run_with(vs, x, |x| moe.forward_t(x, false).unwrap().output)
}

/// Output and gradients (input first, then every parameter by name) of `forward`.
fn run_with(
    vs: &nn::VarStore,
    x: &Tensor,
    forward: impl FnOnce(&Tensor) -> Tensor,
) -> Vec<(String, Tensor)> {
    let x = x.detach().set_requires_grad(true);
    let y = forward(&x);
    // Weight outputs unevenly so every gradient entry matters.
    let w = Tensor::arange(y.numel() as i64, (Kind::Float, Device::Cpu))
        .view(y.size().as_slice())
        .cos();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in vars.iter_mut() {
        v.zero_grad();
    }
    (&y * w).sum(Kind::Float).backward();
    let grad = |t: &Tensor| {
        let g = t.grad();
        if g.defined() {
            g.copy()
        } else {
            t.zeros_like()
        }
    };
    let mut out = vec![
        ("output".to_string(), y.detach()),
        ("grad x".to_string(), grad(&x)),
    ];
    for (name, v) in &vars {
        out.push((format!("grad {name}"), grad(v)));
    }
    out
}

/// Every output and gradient of `got` within [`TOL`] of `reference`'s,
/// relative to its magnitude where that exceeds 1; `label` names the run.
fn assert_close(reference: &[(String, Tensor)], got: &[(String, Tensor)], label: &str) {
    for ((name, want), (_, have)) in reference.iter().zip(got) {
        let diff = (want - have).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1.0);
        assert!(
            diff <= TOL * scale,
            "{label}: {name} differs from the reference by {diff}"
        );
    }
}

fn check(case: &Case, seed: i64) {
    // Tiny tensors: threads only add synchronisation.
    tch::set_num_threads(1);
    let rng = rng();
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = SparseMoeConfig {
        n_embd: case.d,
        num_experts: case.e,
        top_k: case.k,
        expert_hidden: case.h,
        dropout: 0.0,
        router: RouterConfig {
            gate: case.router.clone(),
            // A capacity factor of E gives C = N k: nothing can overflow, so
            // the capacity strategy must equal the dropless ones. Expert
            // choice has its own capacity, which never drops.
            capacity_factor: case.router.is_token_choice().then_some(case.e as f64),
            ..Default::default()
        },
        activation: case.activation,
        expert_bias: case.expert_bias,
        ..Default::default()
    };
    let mut moe = SparseMoe::new(&vs.root(), config).unwrap();
    if case.skew != 0.0 {
        let bias = vs.variables()["router.gate.bias"].shallow_clone();
        tch::no_grad(|| {
            let _ = bias.get(0).fill_(case.skew);
        });
    }
    let x = Tensor::randn([case.n, case.d], (Kind::Float, Device::Cpu));
    let x = match case.seq_len {
        Some(t) => x.view([case.n / t, t, case.d]),
        None => x,
    };
    drop(rng);
    let names: Vec<String> = vs.variables().into_keys().collect();
    let has_bias = names
        .iter()
        .any(|n| n == "experts.b_in" || n == "experts.b_out");
    assert_eq!(has_bias, case.expert_bias, "{names:?}");
    let reference = run(&vs, &mut moe, DispatchKind::DenseReference, &x);
    let strategies = [
        DispatchKind::MaskLoop,
        DispatchKind::IndexedLoop,
        DispatchKind::Grouped,
        DispatchKind::Auto,
        DispatchKind::Capacity,
    ];
    for kind in strategies {
        let got = run(&vs, &mut moe, kind, &x);
        let (n, d, h, e, k) = (case.n, case.d, case.h, case.e, case.k);
        assert_close(
            &reference,
            &got,
            &format!("{kind:?}, seed {seed}, N={n} d={d} h={h} E={e} k={k}"),
        );
    }
}

#[test]
fn random_cases_match_the_dense_reference() {
    for seed in 0..200 {
        let rng = rng();
        tch::manual_seed(1000 + seed);
        let r = |lo: i64, hi: i64| {
            Tensor::randint_low(lo, hi + 1, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])
        };
        let e = r(1, 12);
        let case = Case {
            n: r(1, 40),
            d: r(1, 12),
            h: r(1, 16),
            e,
            k: r(1, e),
            router: if seed % 2 == 0 {
                TOP_K
            } else {
                Gate::default()
            },
            activation: match seed % 3 {
                0 => Activation::SwiGlu,
                // gpt-oss's, with a limit the pre-activations cross.
                1 if seed % 2 == 1 => Activation::ClampedSwiGlu {
                    alpha: 1.702,
                    limit: 0.5,
                },
                _ => Activation::Relu,
            },
            expert_bias: seed % 5 != 0,
            skew: 0.0,
            seq_len: None,
        };
        drop(rng);
        check(&case, seed);
    }
}

#[test]
fn edge_cases_match_the_dense_reference() {
    let base = Case {
        n: 16,
        d: 8,
        h: 12,
        e: 6,
        k: 2,
        router: TOP_K,
        activation: Activation::Relu,
        expert_bias: true,
        skew: 0.0,
        seq_len: None,
    };
    // A single token: most experts get nothing.
    check(
        &Case {
            n: 1,
            ..base.clone()
        },
        1,
    );
    // Many experts, few tokens: several experts get no token.
    check(
        &Case {
            n: 3,
            e: 32,
            k: 1,
            ..base.clone()
        },
        2,
    );
    // Every expert on every token.
    check(
        &Case {
            k: 6,
            ..base.clone()
        },
        3,
    );
    // All tokens on one expert (k = 1), and expert 0 always among the k = 2.
    check(
        &Case {
            k: 1,
            skew: 1e3,
            ..base.clone()
        },
        4,
    );
    check(
        &Case {
            k: 2,
            skew: 1e3,
            ..base.clone()
        },
        5,
    );
    // One expert only.
    check(
        &Case {
            e: 1,
            k: 1,
            ..base.clone()
        },
        6,
    );
    // SwiGLU experts.
    check(
        &Case {
            activation: Activation::SwiGlu,
            ..base.clone()
        },
        7,
    );
    // SwiGLU experts without biases (Mixtral, Qwen2-MoE, DeepSeek, OLMoE),
    // also with empty experts and with every expert active.
    let bare = Case {
        activation: Activation::SwiGlu,
        expert_bias: false,
        ..base
    };
    check(&bare, 8);
    check(
        &Case {
            n: 3,
            e: 32,
            k: 1,
            ..bare.clone()
        },
        9,
    );
    check(&Case { k: 6, ..bare }, 10);
}

/// Mixed precision (`Precision::Bf16`): a bf16 input with the f32 parameters
/// gives, with every strategy, the f32 reference's output and gradients up to
/// bf16 rounding, and the parameters' gradients stay f32.
#[test]
fn bf16_compute_with_f32_parameters_matches_the_f32_reference() {
    tch::set_num_threads(1);
    let rng = rng();
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = SparseMoeConfig {
        n_embd: 16,
        num_experts: 4,
        top_k: 2,
        expert_hidden: 32,
        dropout: 0.0,
        router: RouterConfig {
            gate: TOP_K,
            capacity_factor: Some(4.0),
            ..Default::default()
        },
        activation: Activation::SwiGlu,
        ..Default::default()
    };
    let mut moe = SparseMoe::new(&vs.root(), config).unwrap();
    // Representable in bf16, so that both runs route exactly alike (the
    // router computes in f32 either way).
    let x = Tensor::randn([40, 16], (Kind::Float, Device::Cpu))
        .to_kind(Kind::BFloat16)
        .to_kind(Kind::Float);
    drop(rng);
    let reference = run(&vs, &mut moe, DispatchKind::DenseReference, &x);
    for kind in EVERY_STRATEGY {
        let got = run(&vs, &mut moe, kind, &x.to_kind(Kind::BFloat16));
        assert_eq!(got[0].1.kind(), Kind::BFloat16, "{kind:?}: output dtype");
        for ((name, want), (_, have)) in reference.iter().zip(&got) {
            if name.starts_with("grad ") && name != "grad x" {
                assert_eq!(have.kind(), Kind::Float, "{kind:?}: {name} dtype");
            }
            let have = have.to_kind(Kind::Float);
            let err = (want - &have).norm().double_value(&[]);
            let scale = want.norm().double_value(&[]).max(1e-6);
            assert!(
                err <= 2e-2 * scale,
                "{kind:?} in bf16 differs from the f32 reference in {name}: |diff| {err}, |ref| {scale}"
            );
        }
    }
}

/// Expert choice (a token gets zero, one or many experts) through every
/// strategy: the paper's form on `[N, d]`, the causal form on `[B, T, d]`
/// (and its top-k rule where `C_t = 0`), in values and gradients of the
/// input, the experts and the router.
#[test]
fn expert_choice_matches_the_dense_reference() {
    let all_tokens = |capacity_factor| Gate::ExpertChoice {
        capacity_factor,
        scope: ExpertChoiceScope::AllTokens,
    };
    let per_position = |capacity_factor| Gate::ExpertChoice {
        capacity_factor,
        scope: ExpertChoiceScope::PerPosition,
    };
    let base = Case {
        n: 24,
        d: 8,
        h: 12,
        e: 6,
        k: 2,
        router: all_tokens(1.0),
        activation: Activation::Relu,
        expert_bias: true,
        skew: 0.0,
        seq_len: None,
    };
    let cases = [
        base.clone(),
        Case {
            router: all_tokens(2.5),
            activation: Activation::SwiGlu,
            expert_bias: false,
            ..base.clone()
        },
        // Experts crowding onto the tokens expert 0 likes.
        Case {
            skew: 5.0,
            ..base.clone()
        },
        // B = 6 sequences of T = 4: C_t = floor(6 * 2 / 6) = 2.
        Case {
            router: per_position(1.0),
            seq_len: Some(4),
            ..base.clone()
        },
        // B = 2: C_t = floor(2 * 2 / 6) = 0, the per-token top-k rule.
        Case {
            router: per_position(1.0),
            seq_len: Some(12),
            ..base.clone()
        },
        // More experts than tokens in scope: C = 1 each.
        Case {
            n: 3,
            e: 8,
            k: 1,
            ..base
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        check(case, 300 + i as i64);
    }
}

/// Llama 4's weights on the experts' inputs with its sigmoid gate: every
/// strategy, expert-capacity included, equals the dense sum written out,
/// `y = sum_e FFN_e(G[:, e] x)` over every expert with the routing's gate
/// matrix `G` (0 off the chosen experts, and these bias-free SwiGLU experts
/// map 0 to 0, as in Hugging Face's `Llama4TextMoe`, which runs every
/// expert on every token), in outputs and gradients.
#[test]
fn weights_on_the_inputs_match_the_dense_sum() {
    tch::set_num_threads(1);
    for (k, seed) in [(1, 21), (2, 22)] {
        let rng = rng();
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let e = 6;
        let config = SparseMoeConfig {
            n_embd: 8,
            num_experts: e,
            top_k: k,
            expert_hidden: 12,
            dropout: 0.0,
            router: RouterConfig {
                gate: Gate::SigmoidTopK,
                bias: false,
                weights_on: WeightsOn::Input,
                capacity_factor: Some(e as f64),
                ..Default::default()
            },
            activation: Activation::SwiGlu,
            expert_bias: false,
            ..Default::default()
        };
        let mut moe = SparseMoe::new(&vs.root(), config).unwrap();
        let x = Tensor::randn([20, 8], (Kind::Float, Device::Cpu));
        drop(rng);
        let reference = run_with(&vs, &x, |x| {
            let gates = moe.router().route(x, false).unwrap().dense_gates();
            (0..e)
                .map(|i| {
                    moe.experts()
                        .forward_expert(i, &(x * gates.narrow(1, i, 1)), false)
                })
                .fold(x.zeros_like(), |acc, y| acc + y)
        });
        for kind in EVERY_STRATEGY {
            let got = run(&vs, &mut moe, kind, &x);
            assert_close(&reference, &got, &format!("{kind:?}, k = {k}"));
        }
        // One token at a time on the CPU (decoding's path) gives the same rows.
        let rows = moe.forward_t(&x.narrow(0, 3, 1), false).unwrap().output;
        let diff = (rows - reference[0].1.narrow(0, 3, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= TOL, "one token, k = {k}: {diff}");
    }
}
