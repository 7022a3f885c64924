//! Balance losses, the capacity limit and routing statistics against
//! hand-computed values and plain-loop references.

use approx::assert_abs_diff_eq;
use moe_core::{MoeError, Routing};
use moe_routers::balance::{
    device_balance_loss, load_balance_loss, router_z_loss, BalanceLossConfig,
};
use moe_routers::{apply_capacity, RoutingStats};
use tch::{Device, Kind, Tensor};

/// A routing from plain values; `logits = ln(probs)` (so `softmax(logits) = probs`).
fn routing(indices: &[i64], k: i64, probs: &[f32], e: i64) -> Routing {
    let n = indices.len() as i64 / k;
    let probs = Tensor::from_slice(probs).view([n, e]);
    let indices = Tensor::from_slice(indices).view([n, k]);
    Routing::token_choice(
        indices,
        Tensor::ones([n, k], (Kind::Float, Device::Cpu)) / k as f64,
        probs.clamp_min(1e-30).log(),
        probs,
    )
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn load_balance_loss_hand_computed() {
    // Both tokens on expert 0: f = (2, 0) (E/(kT) * counts), P = (0.7, 0.3) -> 1.4.
    // As Switch writes it: E * sum_i (count_i / (N k)) P_i = 2 * (1 * 0.7) = 1.4.
    let r = routing(&[0, 0], 1, &[0.8, 0.2, 0.6, 0.4], 2);
    assert_abs_diff_eq!(
        scalar(&load_balance_loss(&r, None).unwrap()),
        1.4,
        epsilon = 1e-6
    );
    // k = 2 of 3: counts (2, 1, 1) over kT = 4 slots, f = 3/4 * counts = (1.5, .75, .75),
    // P = (0.5, 0.25, 0.25) -> 0.75 + 0.1875 + 0.1875 = 1.125.
    let r = routing(&[0, 1, 0, 2], 2, &[0.6, 0.2, 0.2, 0.4, 0.3, 0.3], 3);
    assert_abs_diff_eq!(
        scalar(&load_balance_loss(&r, None).unwrap()),
        1.125,
        epsilon = 1e-6
    );
}

#[test]
fn load_balance_loss_is_one_at_uniform_routing_and_e_when_collapsed() {
    let uniform = routing(&[0, 1, 2, 3], 1, &[0.25; 16], 4);
    assert_abs_diff_eq!(
        scalar(&load_balance_loss(&uniform, None).unwrap()),
        1.0,
        epsilon = 1e-6
    );
    // All slots and all probability on one expert: E * 1 * 1 = E.
    let collapsed = routing(&[2, 2, 2, 2], 1, &[0., 0., 1., 0.].repeat(4), 4);
    assert_abs_diff_eq!(
        scalar(&load_balance_loss(&collapsed, None).unwrap()),
        4.0,
        epsilon = 1e-6
    );
}

#[test]
fn per_sequence_load_balance_averages_over_sequences() {
    // Sequence 1: both on expert 0, P = (0.7, 0.3) -> 1.4. Sequence 2: both on
    // expert 1, P = (0.5, 0.5) -> f = (0, 2) -> 1.0. Mean 1.2; over the whole
    // batch the load is even (f = (1, 1)), so the global loss is 1.0.
    let r = routing(
        &[0, 0, 1, 1],
        1,
        &[0.8, 0.2, 0.6, 0.4, 0.5, 0.5, 0.5, 0.5],
        2,
    );
    assert_abs_diff_eq!(
        scalar(&load_balance_loss(&r, Some(2)).unwrap()),
        1.2,
        epsilon = 1e-6
    );
    assert_abs_diff_eq!(
        scalar(&load_balance_loss(&r, None).unwrap()),
        1.0,
        epsilon = 1e-6
    );
    assert!(matches!(
        load_balance_loss(&r, Some(3)),
        Err(MoeError::Config(_))
    ));
}

#[test]
fn router_z_loss_hand_computed() {
    // logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4 = 2 ln 2 -> mean of squares 2.5 ln^2 2.
    let r = Routing {
        logits: Tensor::from_slice(&[0f32, 0., 3f32.ln(), 0.]).view([2, 2]),
        ..routing(&[0, 0], 1, &[0.5, 0.5, 0.75, 0.25], 2)
    };
    let ln2 = 2f64.ln();
    assert_abs_diff_eq!(scalar(&router_z_loss(&r)), 2.5 * ln2 * ln2, epsilon = 1e-6);
}

#[test]
fn device_balance_loss_hand_computed_and_uniform() {
    // Experts {0, 1} on device 0, {2, 3} on device 1. Tokens on experts 0 and 1:
    // f = 4/2 * (1, 1, 0, 0) = (2, 2, 0, 0) -> f' = (2, 0);
    // P = (.375, .375, .125, .125) -> P' = (.75, .25); loss 1.5.
    let r = routing(&[0, 1], 1, &[0.5, 0.5, 0., 0., 0.25, 0.25, 0.25, 0.25], 4);
    let devices = [0, 0, 1, 1];
    assert_abs_diff_eq!(
        scalar(&device_balance_loss(&r, &devices).unwrap()),
        1.5,
        epsilon = 1e-6
    );
    let uniform = routing(&[0, 1, 2, 3], 1, &[0.25; 16], 4);
    assert_abs_diff_eq!(
        scalar(&device_balance_loss(&uniform, &devices).unwrap()),
        1.0,
        epsilon = 1e-6
    );
    assert!(device_balance_loss(&r, &[0, 1]).is_err());
    assert!(
        device_balance_loss(&r, &[0, 0, 2, 2]).is_err(),
        "device 1 is empty"
    );
}

#[test]
fn balance_config_weights_and_sums_the_losses() {
    let r = routing(&[0, 0], 1, &[0.8, 0.2, 0.6, 0.4], 2);
    assert!(BalanceLossConfig::default()
        .loss(&r, None)
        .unwrap()
        .is_none());
    let config = BalanceLossConfig {
        load_balance: 0.01,
        z_loss: 1e-3,
        device_balance: 0.5,
        expert_devices: vec![0, 1],
        per_sequence: false,
    };
    let want = 0.01 * scalar(&load_balance_loss(&r, None).unwrap())
        + 1e-3 * scalar(&router_z_loss(&r))
        + 0.5 * scalar(&device_balance_loss(&r, &[0, 1]).unwrap());
    let got = scalar(&config.loss(&r, None).unwrap().unwrap());
    assert_abs_diff_eq!(got, want, epsilon = 1e-7);
    let bad = BalanceLossConfig {
        device_balance: 0.1,
        ..Default::default()
    };
    assert!(matches!(bad.validate(2), Err(MoeError::Config(_))));
}

#[test]
fn capacity_drops_exactly_the_overflow_slots_hand_computed() {
    // N k = 8 slots over E = 3 experts, factor 1: C = floor(8 / 3) = 2.
    // Slot order (token-major): expert 0 gets t0, t1, t2, t3 -> t2 and t3 dropped;
    // expert 1 gets t0, t1, t2 -> t2 dropped; expert 2 gets t3 only.
    let r = routing(&[0, 1, 0, 1, 1, 0, 0, 2], 2, &[1. / 3.; 12], 3);
    let r = Routing {
        weight: Tensor::from_slice(&[0.6f32, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1]),
        ..r
    };
    let capped = apply_capacity(r, 1.0).unwrap();
    let dropped = Vec::<bool>::try_from(capped.dropped.as_ref().unwrap().flatten(0, -1)).unwrap();
    assert_eq!(
        dropped,
        [false, false, false, false, true, true, true, false]
    );
    // Dropped slots weigh 0; the others keep their weight (no renormalisation).
    let w = Vec::<f32>::try_from(&capped.weight).unwrap();
    assert_eq!(w, [0.6, 0.4, 0.7, 0.3, 0.0, 0.0, 0.0, 0.1]);
    assert_eq!(
        Vec::<i64>::try_from(capped.kept_counts()).unwrap(),
        [2, 2, 1]
    );
    let stats = RoutingStats::of(&capped).unwrap();
    assert_abs_diff_eq!(stats.dropped_fraction, 3.0 / 8.0);
    // Token 2 lost both of its slots; the others keep at least one.
    assert_abs_diff_eq!(stats.unrouted_fraction, 1.0 / 4.0);
}

#[test]
fn capacity_matches_a_plain_loop_on_random_routings() {
    tch::manual_seed(9);
    for (n, e, k, factor) in [(50, 8, 2, 1.0), (33, 5, 1, 1.25), (40, 4, 3, 0.5)] {
        let indices = Tensor::rand([n, e], (Kind::Float, Device::Cpu))
            .topk(k, -1, true, true)
            .1;
        let idx = Vec::<i64>::try_from(indices.flatten(0, -1)).unwrap();
        let r = routing(&idx, k, &vec![1.0 / e as f32; (n * e) as usize], e);
        let capped = apply_capacity(r, factor).unwrap();
        let capacity = ((n * k) as f64 / e as f64 * factor).floor() as i64;
        assert_eq!(capped.capacity, Some(capacity.max(1)));
        let mut seen = vec![0i64; e as usize];
        let want: Vec<bool> = idx
            .iter()
            .map(|&x| {
                seen[x as usize] += 1;
                seen[x as usize] > capacity
            })
            .collect();
        let got = Vec::<bool>::try_from(capped.dropped.unwrap().flatten(0, -1)).unwrap();
        assert_eq!(got, want, "N={n} E={e} k={k} factor={factor}");
    }
}

#[test]
fn routing_stats_hand_computed() {
    // Counts (3, 1): mean 2, std 1 -> cv 0.5, max violation (3 - 2) / 2 = 0.5.
    // Probabilities uniform over 2 experts -> entropy ln 2.
    let r = routing(&[0, 0, 0, 1], 1, &[0.5; 8], 2);
    let s = RoutingStats::of(&r).unwrap();
    assert_eq!(s.tokens_per_expert, vec![3, 1]);
    assert_abs_diff_eq!(s.cv, 0.5, epsilon = 1e-12);
    assert_abs_diff_eq!(s.max_violation, 0.5, epsilon = 1e-12);
    assert_abs_diff_eq!(s.dropped_fraction, 0.0);
    assert_abs_diff_eq!(s.unrouted_fraction, 0.0);
    assert_abs_diff_eq!(s.mean_entropy, 2f64.ln(), epsilon = 1e-6);
    // Two routings pool their counts: (3, 1) + (0, 2) = (3, 3), even.
    let other = routing(&[1, 1], 1, &[0.5; 4], 2);
    let pooled = RoutingStats::from_routings(&[&r, &other]).unwrap();
    assert_eq!(pooled.tokens_per_expert, vec![3, 3]);
    assert_abs_diff_eq!(pooled.cv, 0.0);
    assert!(RoutingStats::from_routings(&[]).is_err());
}
