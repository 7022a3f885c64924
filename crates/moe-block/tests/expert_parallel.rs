//! Expert parallelism over c10d's Gloo with ranks as threads: the layer
//! with its experts spread over P = 2 and P = 4 ranks computes what one
//! process holding every expert computes on the whole batch — outputs,
//! gradients of the inputs, of the expert weights and (summed over the
//! ranks) of the router — including an expert that gets no token and a
//! rank that receives nothing; the capacity mode equals the single-process
//! capacity dispatch on each rank's tokens; expert choice equals one
//! process running each rank's batch on its own.

use moe_aten::dist::{Group, GroupOptions};
use moe_block::{SharedExperts, SparseMoe, SparseMoeConfig};
use moe_dispatch::{DispatchKind, ExchangeMode, ExpertParallel};
use moe_experts::Activation;
use moe_routers::{BalanceLossConfig, Gate, RouterConfig};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

/// libtorch's generator is global and this file's tests run in parallel: a
/// test holds this lock from seeding it until its weights and inputs are
/// drawn, so that it draws the same numbers whatever the others do.
fn rng() -> MutexGuard<'static, ()> {
    static RNG: Mutex<()> = Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const E: i64 = 8;
const D: i64 = 12;
const N: i64 = 10; // tokens per rank

fn config(gate: Gate, activation: Activation, bias: bool, shared: bool) -> SparseMoeConfig {
    SparseMoeConfig {
        n_embd: D,
        num_experts: E,
        top_k: 2,
        expert_hidden: 16,
        shared_experts: shared.then_some(SharedExperts {
            num_experts: 1,
            hidden: 8,
            sigmoid_gate: true,
        }),
        dropout: 0.0,
        activation,
        expert_bias: bias,
        router: RouterConfig {
            bias,
            ..RouterConfig::with_gate(gate)
        },
        balance: BalanceLossConfig {
            load_balance: 0.01,
            ..BalanceLossConfig::default()
        },
        dispatch: DispatchKind::Grouped,
        ..SparseMoeConfig::default()
    }
}

/// A layer's variables by name.
fn vars(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

/// Runs `f(rank, group, input)` on every rank in its own thread, rank `r`
/// taking `inputs[r]` (tensors are not shared between threads, so each
/// rank gets its own handles); results in rank order.
fn on_ranks<I: Send, T: Send>(inputs: Vec<I>, f: impl Fn(i64, Group, I) -> T + Sync) -> Vec<T> {
    let groups = Group::in_process(
        inputs.len() as i64,
        &GroupOptions {
            timeout: std::time::Duration::from_secs(60),
            ..GroupOptions::default()
        },
    )
    .unwrap();
    std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .zip(inputs)
            .map(|(g, input)| {
                let f = &f;
                scope.spawn(move || f(g.rank(), g, input))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `rank`'s copy of the reference's variables: its share of the
/// experts, everything else whole.
fn rank_weights(reference: &BTreeMap<String, Tensor>, rank: i64, l: i64) -> Vec<(String, Tensor)> {
    reference
        .iter()
        .map(|(name, full)| {
            let value = if name.starts_with("experts.") {
                full.narrow(0, rank * l, l).copy()
            } else {
                full.copy()
            };
            (name.clone(), value.detach())
        })
        .collect()
}

/// The expert-parallel layer of rank `rank` with `weights`.
fn rank_layer(
    cfg: &SparseMoeConfig,
    group: Group,
    mode: ExchangeMode,
    weights: Vec<(String, Tensor)>,
) -> (nn::VarStore, SparseMoe) {
    let parallel = ExpertParallel::new(Arc::new(Mutex::new(group)), E, mode).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = SparseMoe::new_expert_parallel(&vs.root(), cfg.clone(), parallel).unwrap();
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, value) in weights {
            vars[&name].shallow_clone().copy_(&value);
        }
    });
    (vs, layer)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The largest difference two f32 evaluations of the layer (one process,
/// and P ranks summing in another order) may show in values like `want`.
///
/// A sum of `n` products in any order is off by at most `n u` (`u =
/// 2^-24`) of the sum of its terms' magnitudes (Higham, *Accuracy and
/// Stability of Numerical Algorithms*, §3.1). The reductions on any path
/// here: the router (D = 12 terms), its softmax (E = 8), an expert's input
/// (D) and output (16) layers, the shared expert's (D, 8), the sum over the
/// k = 2 experts and the shared one, the balance loss over the P N <= 40
/// tokens and the E experts, and each weight gradient's sum over the
/// tokens (40): under 160 terms in all. We allow the terms' magnitudes to
/// reach 8 times the largest value of the result (unit-scale inputs,
/// routing weights below one), so the bound is `160 u * 8 * max |want|`
/// (~8e-5 for values of size 1; 0 where the result is exactly 0, as for an
/// expert that got no token).
fn tolerance(want: &Tensor) -> f64 {
    const F32_U: f64 = 5.960_464_477_539_063e-8;
    160.0 * F32_U * 8.0 * want.abs().max().double_value(&[])
}

/// What one rank computes: its rows of the output, the gradients of its
/// input rows, of its experts and of its replicated parameters, its aux loss.
/// Checks one rank's expert gradients against rows `first .. first + l` of
/// the one-process reference's, and adds its other (replicated) parameters'
/// gradients into `summed`, to compare with the reference's after all ranks.
fn check_rank_grads(
    what: &str,
    r: &RankResult,
    reference: &BTreeMap<String, Tensor>,
    first: i64,
    l: i64,
    summed: &mut BTreeMap<String, Tensor>,
) {
    for (name, grad) in &r.grads {
        let full = reference[name].grad();
        if name.starts_with("experts.") {
            let want = full.narrow(0, first, l);
            let d = max_diff(grad, &want);
            assert!(
                d <= tolerance(&want),
                "{what}: {name} gradient differs by {d}"
            );
        } else {
            let sum = summed
                .remove(name)
                .map_or_else(|| grad.copy(), |s| s + grad);
            summed.insert(name.clone(), sum);
        }
    }
}

struct RankResult {
    output: Tensor,
    input_grad: Tensor,
    grads: BTreeMap<String, Tensor>,
    aux: f64,
}

impl RankResult {
    /// After `backward`: the output, the gradient of the input `xr`, every
    /// trainable parameter's gradient, and the aux loss.
    fn after_backward(vs: &nn::VarStore, output: &Tensor, xr: &Tensor, aux: f64) -> Self {
        RankResult {
            output: output.detach(),
            input_grad: xr.grad(),
            grads: vs
                .variables()
                .into_iter()
                .filter(|(_, v)| v.requires_grad())
                .map(|(name, v)| (name, v.grad()))
                .collect(),
            aux,
        }
    }
}

/// The expert-parallel layer on `p` ranks against one layer holding every
/// expert, on the same weights and the same global batch.
fn check(cfg: &SparseMoeConfig, p: i64, starve: &[i64], label: &str) {
    let rng = rng();
    tch::manual_seed(11);
    let reference_vs = nn::VarStore::new(Device::Cpu);
    let reference = SparseMoe::new(&reference_vs.root(), cfg.clone()).unwrap();
    // Experts nobody chooses: their gate bias (or aux-free bias) far down.
    tch::no_grad(|| {
        let vars = reference_vs.variables();
        for &e in starve {
            let bias = vars
                .get("router.gate.bias")
                .or_else(|| vars.get("router.expert_bias"))
                .expect("a router with a bias to starve experts with");
            let _ = bias.get(e).fill_(-1e3);
        }
    });
    let x = Tensor::randn([p * N, D], (Kind::Float, Device::Cpu));
    let upstream = Tensor::randn([p * N, D], (Kind::Float, Device::Cpu));
    drop(rng);
    // The reference on the whole batch.
    let xr = x.copy().set_requires_grad(true);
    let out = reference.forward_t(&xr, true).unwrap();
    let aux = out.aux_loss.as_ref().unwrap().double_value(&[]);
    ((&out.output * &upstream).sum(Kind::Float) + out.aux_loss.unwrap()).backward();
    let want = out.output.detach();
    let ref_vars = vars(&reference_vs);
    let counts: Vec<i64> = Vec::try_from(out.routing.expert_counts()).unwrap();
    for &e in starve {
        assert_eq!(
            counts[e as usize], 0,
            "{label}: expert {e} should get no token"
        );
    }

    let l = E / p;
    let inputs: Vec<_> = (0..p)
        .map(|rank| {
            (
                rank_weights(&ref_vars, rank, l),
                x.narrow(0, rank * N, N).copy(),
                upstream.narrow(0, rank * N, N).copy(),
            )
        })
        .collect();
    let results = on_ranks(inputs, |_, group, (weights, x, g)| {
        let (vs, layer) = rank_layer(cfg, group, ExchangeMode::Dropless, weights);
        let xr = x.set_requires_grad(true);
        let out = layer.forward_t(&xr, true).unwrap();
        let aux = out.aux_loss.as_ref().unwrap();
        // The reference's aux loss is the mean over the ranks of theirs, and
        // its gradient the mean of theirs; the sum of the ranks' gradients
        // (what an all-reduce gives) is compared, so each rank adds aux / P.
        ((&out.output * &g).sum(Kind::Float) + aux / p as f64).backward();
        RankResult::after_backward(&vs, &out.output, &xr, aux.double_value(&[]))
    });

    let mut router_grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut aux_mean = 0.0;
    for (rank, r) in results.iter().enumerate() {
        let rows = |t: &Tensor| t.narrow(0, rank as i64 * N, N);
        let d = max_diff(&r.output, &rows(&want));
        assert!(
            d <= tolerance(&want),
            "{label}, P = {p}, rank {rank}: output differs by {d}"
        );
        let d = max_diff(&r.input_grad, &rows(&xr.grad()));
        assert!(
            d <= tolerance(&xr.grad()),
            "{label}, P = {p}, rank {rank}: input gradient differs by {d}"
        );
        check_rank_grads(
            &format!("{label}, P = {p}, rank {rank}"),
            r,
            &ref_vars,
            rank as i64 * l,
            l,
            &mut router_grads,
        );
        aux_mean += r.aux / p as f64;
    }
    // Replicated parameters: the sum of the ranks' gradients (what an
    // all-reduce gives) is the reference's.
    for (name, sum) in router_grads {
        let d = max_diff(&sum, &ref_vars[&name].grad());
        assert!(
            d <= tolerance(&ref_vars[&name].grad()),
            "{label}, P = {p}: summed {name} gradient differs by {d}"
        );
    }
    assert!(
        (aux_mean - aux).abs() < 1e-6,
        "{label}, P = {p}: aux loss {aux_mean} over the ranks, {aux} in one process"
    );
}

#[test]
fn expert_parallel_equals_one_process_holding_every_expert() {
    let cases = [
        (
            "top_k, SwiGLU",
            config(
                Gate::TopK {
                    norm_topk_prob: true,
                },
                Activation::SwiGlu,
                false,
                false,
            ),
        ),
        (
            "sigmoid aux-free, grouped, shared expert",
            config(
                Gate::SigmoidAuxFree {
                    norm_topk_prob: true,
                    bias_update_rate: 1e-3,
                    n_group: 4,
                    topk_group: 2,
                },
                Activation::SwiGlu,
                false,
                true,
            ),
        ),
        (
            "top_k with biases, ReLU",
            config(
                Gate::TopK {
                    norm_topk_prob: false,
                },
                Activation::Relu,
                true,
                false,
            ),
        ),
    ];
    for (label, cfg) in &cases {
        check(cfg, 2, &[], label);
        check(cfg, 4, &[], label);
    }
    // Expert 1 gets no token; with P = 4, rank 3 (experts 6 and 7) receives nothing.
    for (label, cfg) in &cases[1..] {
        check(cfg, 2, &[1], label);
        check(cfg, 4, &[1, 6, 7], label);
    }
}

#[test]
fn capacity_mode_equals_the_capacity_dispatch_on_each_ranks_tokens() {
    let mut cfg = config(
        Gate::TopK {
            norm_topk_prob: true,
        },
        Activation::SwiGlu,
        false,
        false,
    );
    cfg.router.capacity_factor = Some(1.0);
    cfg.dispatch = DispatchKind::Capacity;
    let p = 2;
    let rng = rng();
    tch::manual_seed(5);
    let reference_vs = nn::VarStore::new(Device::Cpu);
    let reference = SparseMoe::new(&reference_vs.root(), cfg.clone()).unwrap();
    let ref_vars = vars(&reference_vs);
    let x = Tensor::randn([p * N, D], (Kind::Float, Device::Cpu));
    drop(rng);
    let l = E / p;
    let inputs: Vec<_> = (0..p)
        .map(|rank| {
            (
                rank_weights(&ref_vars, rank, l),
                x.narrow(0, rank * N, N).copy(),
            )
        })
        .collect();
    let results = on_ranks(inputs, |_, group, (weights, x)| {
        let (_vs, layer) = rank_layer(&cfg, group, ExchangeMode::Capacity, weights);
        let out = layer.forward_t(&x, false).unwrap();
        (out.output, out.routing.dropped.unwrap())
    });
    let mut dropped_any = false;
    for (rank, (output, dropped)) in results.iter().enumerate() {
        let want = reference
            .forward_t(&x.narrow(0, rank as i64 * N, N), false)
            .unwrap()
            .output;
        let d = max_diff(output, &want);
        assert!(
            d <= tolerance(&want),
            "capacity, rank {rank}: differs by {d}"
        );
        dropped_any |= dropped.any().int64_value(&[]) == 1;
    }
    assert!(dropped_any, "the case should drop some slots");
}

#[test]
fn experts_must_split_evenly_over_the_ranks() {
    let results = on_ranks(vec![(); 3], |_, group, ()| {
        ExpertParallel::new(Arc::new(Mutex::new(group)), E, ExchangeMode::Dropless)
            .unwrap_err()
            .to_string()
    });
    for msg in results {
        assert!(msg.contains("8 experts over 3 ranks"), "{msg}");
    }
}

/// Expert choice: each rank's experts choose among that rank's tokens (its
/// `[B, T, d]` batch), so the expert-parallel layer must equal one process
/// holding every expert that runs each rank's batch on its own: outputs and
/// input gradients rank by rank, expert gradients (each rank's share of the
/// sum over the ranks' batches) and the summed router gradients, in both
/// exchange modes (every expert gets exactly `C` rows per rank: the
/// capacity mode pads and drops nothing).
#[test]
fn expert_choice_equals_one_process_on_each_ranks_batch() {
    use moe_routers::ExpertChoiceScope;
    let (p, b, t) = (2, 4, 3);
    for scope in [ExpertChoiceScope::PerPosition, ExpertChoiceScope::AllTokens] {
        for mode in [ExchangeMode::Dropless, ExchangeMode::Capacity] {
            let label = format!("{scope:?}, {mode:?}");
            let mut cfg = config(
                Gate::ExpertChoice {
                    capacity_factor: 1.0,
                    scope,
                },
                Activation::SwiGlu,
                true,
                false,
            );
            cfg.balance = BalanceLossConfig::default();
            let rng = rng();
            tch::manual_seed(13);
            let reference_vs = nn::VarStore::new(Device::Cpu);
            let reference = SparseMoe::new(&reference_vs.root(), cfg.clone()).unwrap();
            let x = Tensor::randn([p * b, t, D], (Kind::Float, Device::Cpu));
            let upstream = Tensor::randn([p * b, t, D], (Kind::Float, Device::Cpu));
            drop(rng);
            let batch = |t: &Tensor, rank: i64| t.narrow(0, rank * b, b).copy();
            // The reference on each rank's batch; parameter gradients add up.
            let mut want = Vec::new();
            for rank in 0..p {
                let xr = batch(&x, rank).set_requires_grad(true);
                let out = reference.forward_t(&xr, true).unwrap();
                assert_eq!(out.routing.top_k, None, "{label}: expert choice");
                (&out.output * batch(&upstream, rank))
                    .sum(Kind::Float)
                    .backward();
                want.push((out.output.detach(), xr.grad()));
            }
            let ref_vars = vars(&reference_vs);
            let l = E / p;
            let inputs: Vec<_> = (0..p)
                .map(|rank| {
                    (
                        rank_weights(&ref_vars, rank, l),
                        batch(&x, rank),
                        batch(&upstream, rank),
                    )
                })
                .collect();
            let results = on_ranks(inputs, |_, group, (weights, x, g)| {
                let (vs, layer) = rank_layer(&cfg, group, mode, weights);
                let xr = x.set_requires_grad(true);
                let out = layer.forward_t(&xr, true).unwrap();
                (&out.output * &g).sum(Kind::Float).backward();
                RankResult::after_backward(&vs, &out.output, &xr, 0.0)
            });
            let mut router_grads: BTreeMap<String, Tensor> = BTreeMap::new();
            for (rank, (r, (output, input_grad))) in results.iter().zip(&want).enumerate() {
                let d = max_diff(&r.output, output);
                assert!(
                    d <= tolerance(output),
                    "{label}, rank {rank}: output differs by {d}"
                );
                let d = max_diff(&r.input_grad, input_grad);
                assert!(
                    d <= tolerance(input_grad),
                    "{label}, rank {rank}: input gradient differs by {d}"
                );
                check_rank_grads(
                    &format!("{label}, rank {rank}"),
                    r,
                    &ref_vars,
                    rank as i64 * l,
                    l,
                    &mut router_grads,
                );
            }
            for (name, sum) in router_grads {
                let d = max_diff(&sum, &ref_vars[&name].grad());
                assert!(
                    d <= tolerance(&ref_vars[&name].grad()),
                    "{label}: summed {name} gradient differs by {d}"
                );
            }
        }
    }
}
