mod common;

use approx::assert_abs_diff_eq;
use common::scaling_experts;
use moe_core::{expert_capacity, Routing};
use moe_dispatch::{Capacity, Dispatch};
use tch::{nn, Device, Kind, Tensor};

/// A routing whose router applied the capacity `capacity` (not marking the
/// drops: the strategy finds them itself).
fn routing(indices: &[i64], weights: &[f32], n: i64, k: i64, e: i64, capacity: i64) -> Routing {
    Routing {
        capacity: Some(capacity),
        ..Routing::token_choice(
            Tensor::from_slice(indices).view([n, k]),
            Tensor::from_slice(weights).view([n, k]),
            Tensor::zeros([n, e], (Kind::Float, Device::Cpu)),
            Tensor::full([n, e], 1.0 / e as f64, (Kind::Float, Device::Cpu)),
        )
    }
}

#[test]
fn overflowing_slots_are_dropped_in_token_order_without_renormalising() {
    // N = 3, k = 2, E = 3, factor 1: C = floor(6 / 3) = 2 rows per expert.
    // Expert 0 is chosen by tokens 0, 1 and 2: token 2's slot overflows.
    let vs = nn::VarStore::new(Device::Cpu);
    let experts = scaling_experts(&vs, &[1.0, 10.0, 100.0]);
    let r = routing(
        &[0, 1, 0, 2, 0, 1],
        &[0.75, 0.25, 0.5, 0.5, 0.6, 0.4],
        3,
        2,
        3,
        expert_capacity(3, 2, 3, 1.0),
    );
    let capacity = Capacity;
    let plan = capacity.plan(&r);
    assert_eq!(plan.capacity, 2);
    // Rows: expert * C + position, the spare row E * C = 6 for the dropped slot.
    assert_eq!(
        Vec::<i64>::try_from(&plan.row).unwrap(),
        vec![0, 2, 1, 4, 6, 3]
    );
    assert_eq!(capacity.dropped_slots(&r).int64_value(&[]), 1);

    let x = Tensor::from_slice(&[1f32, 2., 3.]).view([3, 1]);
    let y = Vec::<f32>::try_from(capacity.combine(&x, &r, &experts, false).view([-1])).unwrap();
    // y0 = 0.75 * 1 * 1 + 0.25 * 10 * 1; y1 = 0.5 * 1 * 2 + 0.5 * 100 * 2;
    // y2 = (expert 0 dropped) + 0.4 * 10 * 3, the 0.4 not renormalised to 1.
    for (got, want) in y.iter().zip([3.25f32, 101.0, 12.0]) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-5);
    }
}

#[test]
fn capacity_is_floor_of_the_fair_share_times_the_factor() {
    assert_eq!(expert_capacity(512, 2, 8, 1.25), 160);
    assert_eq!(expert_capacity(3, 1, 8, 1.25), 1, "at least one row");
    assert_eq!(expert_capacity(10, 1, 4, 1.0), 2);
    // The strategy reads the routing's capacity; without one, N rows.
    let r = routing(&[0, 1, 1], &[1.0; 3], 3, 1, 2, 2);
    assert_eq!(Capacity.capacity(&r), 2);
    let unlimited = Routing {
        capacity: None,
        ..routing(&[0, 1, 1], &[1.0; 3], 3, 1, 2, 2)
    };
    assert_eq!(Capacity.capacity(&unlimited), 3);
    assert_eq!(Capacity.dropped_slots(&unlimited).int64_value(&[]), 0);
}

#[test]
fn k1_all_tokens_on_one_expert_keeps_exactly_capacity_tokens() {
    let vs = nn::VarStore::new(Device::Cpu);
    let experts = scaling_experts(&vs, &[2.0, 3.0]);
    let r = routing(
        &[0, 0, 0, 0],
        &[1.0; 4],
        4,
        1,
        2,
        expert_capacity(4, 1, 2, 1.0),
    );
    let capacity = Capacity;
    let x = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([4, 1]);
    let y = Vec::<f32>::try_from(capacity.combine(&x, &r, &experts, false).view([-1])).unwrap();
    assert_eq!(y, vec![2.0, 4.0, 0.0, 0.0]);
    assert_eq!(capacity.dropped_slots(&r).int64_value(&[]), 2);
}

#[test]
fn dispatch_specs_carry_the_router_capacity_factor() {
    use moe_dispatch::{DispatchKind, DispatchSpec, DEFAULT_CAPACITY_FACTOR};
    let spec = |s: &str| s.parse::<DispatchSpec>().unwrap();
    assert_eq!(
        spec("capacity"),
        DispatchSpec {
            kind: DispatchKind::Capacity,
            capacity_factor: Some(DEFAULT_CAPACITY_FACTOR),
        }
    );
    assert_eq!(spec("capacity:0.5").capacity_factor, Some(0.5));
    assert_eq!(
        spec("indexed-loop"),
        DispatchSpec {
            kind: DispatchKind::IndexedLoop,
            capacity_factor: None,
        }
    );
    for bad in [
        "capacity:x",
        "capacity:0",
        "capacity:-1",
        "capacity:inf",
        "sorted",
    ] {
        let err = bad.parse::<DispatchSpec>().unwrap_err();
        assert!(matches!(err, moe_core::MoeError::Config(_)), "{bad}: {err}");
    }
    // A DispatchKind alone cannot hold a factor: the factor is the router's.
    let err = "capacity:2"
        .parse::<DispatchKind>()
        .unwrap_err()
        .to_string();
    assert!(err.contains("router"), "{err}");
    // Applying a spec: capacity[:F] sets both; another strategy keeps the factor.
    let (mut kind, mut factor) = (DispatchKind::Auto, None);
    spec("capacity:2").apply(&mut kind, &mut factor);
    assert_eq!((kind, factor), (DispatchKind::Capacity, Some(2.0)));
    spec("grouped").apply(&mut kind, &mut factor);
    assert_eq!((kind, factor), (DispatchKind::Grouped, Some(2.0)));
}
