//! Expert choice routing (arXiv 2202.09368): a hand-worked case in both
//! scopes, exactly `C` tokens per expert (per position in the causal form),
//! the top-k rule of small batches, and the configuration errors.

use approx::assert_abs_diff_eq;
use moe_core::{MoeError, Routing, WeightInit};
use moe_routers::balance::load_balance_loss;
use moe_routers::{
    apply_capacity, expert_choice, expert_choice_capacity, softmax_top_k, ExpertChoiceScope, Gate,
    RouterConfig, RouterDims, RoutingStats,
};
use tch::{nn, Device, Kind, Tensor};

use ExpertChoiceScope::{AllTokens, PerPosition};

fn to_vec_f(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn to_vec_i(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
}

fn assert_all_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert_abs_diff_eq!(*g, *w, epsilon = 1e-6);
    }
}

const THIRD: f32 = 1.0 / 3.0;

/// Router probabilities of 4 tokens over 3 experts, as logits `ln p` (so
/// that `softmax(logits) = p`).
fn hand_logits() -> Tensor {
    #[rustfmt::skip]
    let p = [
        0.5, 0.4, 0.1, // token 0
        0.4, 0.1, 0.5, // token 1
        0.1, 0.5, 0.4, // token 2
        THIRD, THIRD, THIRD, // token 3
    ];
    Tensor::from_slice(&p).view([4, 3]).log()
}

/// The paper's form: N = 4, E = 3, k = 2, factor 1: C = floor(4 * 2 / 3) = 2.
/// Expert 0's column (.5, .4, .1, .33) picks tokens 0 and 1; expert 1's
/// (.4, .1, .5, .33) tokens 2 and 0; expert 2's (.1, .5, .4, .33) tokens 1
/// and 2. Token 3 (uniform) gets no expert; tokens 0-2 get two each.
#[test]
fn hand_worked_case_all_tokens() {
    let r = expert_choice(hand_logits(), 2, 1.0, AllTokens, None).unwrap();
    assert_eq!(r.top_k, None);
    assert_eq!(r.capacity, Some(2));
    assert_eq!(r.num_tokens(), 4);
    // Expert-major slots, best first.
    assert_eq!(to_vec_i(&r.expert), [0, 0, 1, 1, 2, 2]);
    assert_eq!(to_vec_i(&r.token), [0, 1, 2, 0, 1, 2]);
    assert_all_close(&to_vec_f(&r.weight), &[0.5, 0.4, 0.5, 0.4, 0.5, 0.4]);
    #[rustfmt::skip]
    let gates = [
        0.5, 0.4, 0.0,
        0.4, 0.0, 0.5,
        0.0, 0.5, 0.4,
        0.0, 0.0, 0.0,
    ];
    assert_all_close(&to_vec_f(&r.dense_gates()), &gates);
    assert_eq!(to_vec_i(&r.expert_counts()), [2, 2, 2]);
    let stats = RoutingStats::of(&r).unwrap();
    assert_abs_diff_eq!(stats.cv, 0.0);
    assert_abs_diff_eq!(stats.unrouted_fraction, 0.25);
    assert_abs_diff_eq!(stats.dropped_fraction, 0.0);
    // Even load, K' = 6 / 4 slots per token: f = 3 / (1.5 * 4) * 2 = 1 each,
    // so the loss is sum_i P_i = 1.
    let loss = load_balance_loss(&r, None).unwrap().double_value(&[]);
    assert_abs_diff_eq!(loss, 1.0, epsilon = 1e-6);
    // No [N, k] view: a clear error.
    let err = r.indices().unwrap_err().to_string();
    assert!(err.contains("expert-choice"), "{err}");
}

/// The causal form on the same scores as B = 2 sequences of T = 2: tokens
/// 0, 1 are sequence 0 at positions 0, 1; tokens 2, 3 sequence 1.
/// C_t = floor(2 * 2 / 3) = 1: at position 0 (tokens 0, 2) expert 0 takes
/// token 0 (.5 > .1), expert 1 token 2 (.5 > .4), expert 2 token 2
/// (.4 > .1); at position 1 (tokens 1, 3) expert 0 takes token 1
/// (.4 > .33), expert 1 token 3 (.33 > .1), expert 2 token 1 (.5 > .33).
#[test]
fn hand_worked_case_per_position() {
    let r = expert_choice(hand_logits(), 2, 1.0, PerPosition, Some(2)).unwrap();
    assert_eq!(r.top_k, None);
    assert_eq!(r.capacity, Some(2), "one token per position, two positions");
    assert_eq!(to_vec_i(&r.expert), [0, 0, 1, 1, 2, 2]);
    assert_eq!(to_vec_i(&r.token), [0, 1, 2, 3, 2, 1]);
    assert_all_close(&to_vec_f(&r.weight), &[0.5, 0.4, 0.5, THIRD, 0.4, 0.5]);
}

/// `C_t = floor(B k / E * factor) = 0` (here B = 1: one sequence, or no
/// sequence axis): each token takes the top-k of the same scores, weighted
/// by them, not renormalised.
#[test]
fn small_batches_fall_back_to_top_k_of_the_same_scores() {
    for seq_len in [None, Some(4)] {
        let r = expert_choice(hand_logits(), 2, 1.0, PerPosition, seq_len).unwrap();
        assert_eq!(r.top_k, Some(2), "{seq_len:?}");
        assert_eq!(r.capacity, None);
        let indices = r.indices().unwrap();
        assert_eq!(to_vec_i(&indices.narrow(0, 0, 3)), [0, 1, 2, 0, 1, 2]);
        let weights = to_vec_f(&r.weights().unwrap());
        assert_all_close(&weights[..6], &[0.5, 0.4, 0.5, 0.4, 0.5, 0.4]);
        let top_k = softmax_top_k(hand_logits(), 2, false);
        assert!(r.weight.allclose(&top_k.weight, 1e-6, 1e-7, false));
        assert!(r.expert.equal(&top_k.expert));
    }
    // B = 2 sequences with k = 1 of E = 3: floor(2 / 3) = 0, top-1 too.
    let r = expert_choice(hand_logits(), 1, 1.0, PerPosition, Some(2)).unwrap();
    assert_eq!(r.top_k, Some(1));
    assert_eq!(to_vec_i(&r.expert.narrow(0, 0, 3)), [0, 2, 1]);
    // A larger factor makes it an expert choice again: floor(2 / 3 * 2) = 1.
    let r = expert_choice(hand_logits(), 1, 2.0, PerPosition, Some(2)).unwrap();
    assert_eq!(r.top_k, None);
}

/// The slots of expert `e` (tokens, weights).
fn slots_of(r: &Routing, e: i64) -> (Vec<i64>, Vec<f32>) {
    let mine = r.expert.eq(e);
    (
        to_vec_i(&r.token.masked_select(&mine)),
        to_vec_f(&r.weight.masked_select(&mine)),
    )
}

/// Every expert takes exactly C distinct tokens, those of highest score in
/// its column, weighted by that score.
#[test]
fn every_expert_takes_exactly_c_tokens_of_its_highest_scores() {
    tch::manual_seed(21);
    for (n, e, k, factor) in [
        (16, 4, 2, 1.0),
        (37, 8, 2, 1.25),
        (10, 3, 1, 2.0),
        (5, 8, 1, 1.0),
    ] {
        let logits = Tensor::randn([n, e], (Kind::Float, Device::Cpu));
        let probs = logits.softmax(-1, Kind::Float);
        let r = expert_choice(logits, k, factor, AllTokens, None).unwrap();
        let c = expert_choice_capacity(n, k, e, factor).max(1);
        assert_eq!(r.capacity, Some(c));
        assert_eq!(to_vec_i(&r.expert_counts()), vec![c; e as usize]);
        for expert in 0..e {
            let (tokens, weights) = slots_of(&r, expert);
            let column = to_vec_f(&probs.select(1, expert));
            let mut sorted = column.clone();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let mut distinct = tokens.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len() as i64, c, "N={n} E={e}: distinct tokens");
            for (&t, &w) in tokens.iter().zip(&weights) {
                assert_abs_diff_eq!(w, column[t as usize], epsilon = 1e-7);
                assert!(
                    w >= sorted[c as usize - 1],
                    "expert {expert} took a low score"
                );
            }
        }
    }
    // C = floor(N k / E * factor) rounds down; the paper's form keeps at
    // least one token per expert and at most all of them.
    assert_eq!(expert_choice_capacity(37, 2, 8, 1.25), 11);
    assert_eq!(expert_choice_capacity(3, 1, 8, 1.0), 0);
    assert_eq!(expert_choice_capacity(4, 2, 2, 4.0), 4);
}

/// The causal form: at every position, every expert takes exactly C_t of
/// the B tokens there, and none from another position.
#[test]
fn per_position_every_expert_takes_exactly_c_t_tokens_at_each_position() {
    tch::manual_seed(22);
    let (b, t, e, k) = (6, 5, 4, 2);
    let logits = Tensor::randn([b * t, e], (Kind::Float, Device::Cpu));
    let r = expert_choice(logits, k, 1.0, PerPosition, Some(t)).unwrap();
    let c_t = expert_choice_capacity(b, k, e, 1.0);
    assert_eq!(c_t, 3);
    assert_eq!(r.capacity, Some(t * c_t));
    for expert in 0..e {
        let (tokens, _) = slots_of(&r, expert);
        let mut per_position = vec![0; t as usize];
        for token in tokens {
            per_position[(token % t) as usize] += 1;
        }
        assert_eq!(per_position, vec![c_t; t as usize], "expert {expert}");
    }
}

fn dims(e: i64, k: i64) -> RouterDims {
    RouterDims {
        input_dim: 4,
        num_experts: e,
        top_k: k,
    }
}

#[test]
fn configuration_errors_say_what_was_expected() {
    let vs = nn::VarStore::new(Device::Cpu);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let config = RouterConfig::with_gate(Gate::ExpertChoice {
            capacity_factor: bad,
            scope: AllTokens,
        });
        let err = config
            .build(&vs.root(), dims(4, 2), WeightInit::default())
            .unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
        assert!(err.to_string().contains("capacity_factor"), "{err}");
    }
    // The router's token-choice capacity limit does not apply.
    let config = RouterConfig {
        capacity_factor: Some(1.25),
        ..RouterConfig::with_gate(Gate::expert_choice())
    };
    let err = config.validate(dims(4, 2)).unwrap_err().to_string();
    assert!(err.contains("leave router.capacity_factor unset"), "{err}");
    // A sequence length that does not divide the tokens.
    let err = expert_choice(hand_logits(), 2, 1.0, PerPosition, Some(3)).unwrap_err();
    assert!(
        err.to_string().contains("divide the 4 routed tokens"),
        "{err}"
    );
    // apply_capacity is for token choice.
    let r = expert_choice(hand_logits(), 2, 1.0, AllTokens, None).unwrap();
    assert!(matches!(apply_capacity(r, 1.0), Err(MoeError::Config(_))));
    // Names and serialised configs.
    assert_eq!(
        "expert-choice".parse::<Gate>().unwrap(),
        Gate::expert_choice()
    );
    let parsed: RouterConfig = serde_json::from_str(r#"{"kind": "expert_choice"}"#).unwrap();
    assert_eq!(parsed, RouterConfig::with_gate(Gate::expert_choice()));
    let parsed: RouterConfig = serde_json::from_str(
        r#"{"kind": "expert_choice", "scope": "all_tokens", "ec_capacity_factor": 2.0}"#,
    )
    .unwrap();
    assert_eq!(
        parsed,
        RouterConfig::with_gate(Gate::ExpertChoice {
            capacity_factor: 2.0,
            scope: AllTokens
        })
    );
    let json = serde_json::to_value(&parsed).unwrap();
    assert_eq!(json["ec_capacity_factor"], 2.0);
    assert_eq!(json["capacity_factor"], serde_json::Value::Null);
    let bad = serde_json::from_str::<RouterConfig>(r#"{"kind": "expert_choice", "scope": "x"}"#);
    assert!(bad.unwrap_err().to_string().contains("per_position"));
}

/// The router routes `[N, d]` as one sequence and `route_sequences` as B
/// sequences of T; its weights carry the gradient to the gate.
#[test]
fn the_router_reads_the_sequence_layout_and_passes_gradients() {
    let vs = nn::VarStore::new(Device::Cpu);
    let router = RouterConfig::with_gate(Gate::expert_choice())
        .build(&vs.root(), dims(4, 2), WeightInit::default())
        .unwrap();
    let x = Tensor::from_slice(&(0..64).map(|i| (i as f32 * 0.7).sin()).collect::<Vec<_>>())
        .view([16, 4]);
    // One sequence: C_t = floor(2 / 4) = 0, top-k.
    assert_eq!(router.route(&x, true).unwrap().top_k, Some(2));
    // 8 sequences of 2: C_t = floor(8 * 2 / 4) = 4 per position.
    let r = router.route_sequences(&x, Some(2), true).unwrap();
    assert_eq!(r.top_k, None);
    assert_eq!(to_vec_i(&r.expert_counts()), [8, 8, 8, 8]);
    r.weight.sum(Kind::Float).backward();
    let grad = vs.variables()["gate.weight"].grad();
    assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}
