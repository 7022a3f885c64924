//! Rotary position embeddings against hand-worked rotations and the
//! relative-position property.

use approx::assert_abs_diff_eq;
use moe_core::MoeError;
use moe_nn::{default_inv_freq, rope_tables, Rope};
use tch::{Device, Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn rotates_pairs_i_and_i_plus_half_by_position_times_frequency() {
    // head_dim 4, theta 10000: inv_freq = [1, 10000^(-2/4)] = [1, 0.01];
    // at position 1 the pair (x0, x2) turns by 1 rad, (x1, x3) by 0.01 rad.
    let rope = Rope::new(4, 8, 10000.0, Device::Cpu).unwrap();
    let inv = values(&default_inv_freq(4, 10000.0, Device::Cpu).unwrap());
    assert_abs_diff_eq!(inv[0], 1.0, epsilon = 1e-7);
    assert_abs_diff_eq!(inv[1], 0.01, epsilon = 1e-7);
    // Positions 0 and 1 of one head: [1, 2, 3, 4] twice.
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]).view([1, 1, 2, 4]);
    let y = values(&rope.apply(&x, 0).unwrap());
    for (got, want) in y[..4].iter().zip([1.0, 2.0, 3.0, 4.0]) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    let (c1, s1) = (1f64.cos(), 1f64.sin());
    let (c2, s2) = (0.01f64.cos(), 0.01f64.sin());
    let expected = [
        1.0 * c1 - 3.0 * s1,
        2.0 * c2 - 4.0 * s2,
        3.0 * c1 + 1.0 * s1,
        4.0 * c2 + 2.0 * s2,
    ];
    for (got, want) in y[4..].iter().zip(expected) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    // The same position reached through `start`.
    let y1 = values(&rope.apply(&x.narrow(2, 1, 1), 1).unwrap());
    for (got, want) in y1.iter().zip(expected) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
}

#[test]
fn head_dim_two_turns_the_pair_by_the_position() {
    let rope = Rope::new(2, 4, 10000.0, Device::Cpu).unwrap();
    let x = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 1, 1, 2]);
    let y = values(&rope.apply(&x, 3).unwrap());
    assert_abs_diff_eq!(y[0], 3f64.cos(), epsilon = 1e-6);
    assert_abs_diff_eq!(y[1], 3f64.sin(), epsilon = 1e-6);
}

#[test]
fn scores_depend_only_on_the_relative_position() {
    tch::manual_seed(0);
    let rope = Rope::new(8, 16, 10000.0, Device::Cpu).unwrap();
    let q = Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu));
    let score = |i: i64, j: i64| {
        let a = rope.apply(&q, i).unwrap();
        let b = rope.apply(&k, j).unwrap();
        (a * b).sum(Kind::Float).double_value(&[])
    };
    let reference = score(3, 0);
    assert_abs_diff_eq!(score(5, 2), reference, epsilon = 1e-5);
    assert_abs_diff_eq!(score(8, 5), reference, epsilon = 1e-5);
    assert_abs_diff_eq!(score(15, 12), reference, epsilon = 1e-5);
    assert!(
        (score(5, 3) - reference).abs() > 1e-3,
        "another offset gives another score"
    );
}

#[test]
fn keeps_the_input_dtype() {
    let rope = Rope::new(4, 8, 10000.0, Device::Cpu).unwrap();
    assert_eq!(rope.cos().kind(), Kind::Float);
    assert_eq!(rope.cos().size(), [8, 4]);
    let x = Tensor::ones([2, 3, 5, 4], (Kind::BFloat16, Device::Cpu));
    let y = rope.apply(&x, 2).unwrap();
    assert_eq!(y.kind(), Kind::BFloat16);
    assert_eq!(y.size(), [2, 3, 5, 4]);
}

#[test]
fn custom_inverse_frequencies_build_the_tables() {
    // inv_freq = [0.5]: angle(m) = m / 2 on both components.
    let inv = Tensor::from_slice(&[0.5f32]);
    let (cos, sin) = rope_tables(&inv, 3).unwrap();
    assert_eq!(cos.size(), [3, 2]);
    let (c, s) = (values(&cos), values(&sin));
    for m in 0..3 {
        let angle = m as f64 * 0.5;
        for i in 0..2 {
            assert_abs_diff_eq!(c[2 * m + i], angle.cos(), epsilon = 1e-6);
            assert_abs_diff_eq!(s[2 * m + i], angle.sin(), epsilon = 1e-6);
        }
    }
    let rope = Rope::from_inv_freq(&inv, 3).unwrap();
    assert_eq!((rope.head_dim(), rope.max_positions()), (2, 3));
}

#[test]
fn bad_sizes_and_positions_are_errors() {
    for (head_dim, max, theta) in [(5, 8, 1e4), (0, 8, 1e4), (4, 0, 1e4), (4, 8, 0.0)] {
        let err = Rope::new(head_dim, max, theta, Device::Cpu).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
    }
    assert!(Rope::new(5, 8, 1e4, Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("even"));
    let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
    assert!(rope_tables(&empty, 4).is_err());
    let rope = Rope::new(4, 8, 10000.0, Device::Cpu).unwrap();
    let x = Tensor::zeros([1, 1, 3, 4], (Kind::Float, Device::Cpu));
    assert!(matches!(
        rope.apply(&x, 6),
        Err(MoeError::SequenceTooLong {
            len: 9,
            block_size: 8
        })
    ));
    assert!(rope.apply(&x, 5).is_ok());
    assert!(matches!(rope.apply(&x, -1), Err(MoeError::Config(_))));
    let wrong_width = Tensor::zeros([1, 1, 3, 6], (Kind::Float, Device::Cpu));
    assert!(matches!(
        rope.apply(&wrong_width, 0),
        Err(MoeError::Shape { .. })
    ));
    let wrong_rank = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
    assert!(matches!(
        rope.apply(&wrong_rank, 0),
        Err(MoeError::Shape { .. })
    ));
    let ints = Tensor::zeros([1, 1, 3, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(rope.apply(&ints, 0), Err(MoeError::Kind { .. })));
}

#[test]
fn interleaved_layout_rotates_adjacent_pairs_and_returns_evens_then_odds() {
    // head_dim 4, theta 10000: pairs (x0, x1) turn by m rad, (x2, x3) by
    // m / 100; the result lists the rotated first components, then the
    // second ones (Hugging Face's `apply_rotary_pos_emb_interleave`).
    let rope = Rope::new(4, 8, 10000.0, Device::Cpu).unwrap();
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([1, 1, 1, 4]);
    let m = 3.0f64;
    let y = values(&rope.apply_interleaved(&x, 3).unwrap());
    let (c1, s1) = (m.cos(), m.sin());
    let (c2, s2) = ((m / 100.0).cos(), (m / 100.0).sin());
    let expected = [
        1.0 * c1 - 2.0 * s1,
        3.0 * c2 - 4.0 * s2,
        2.0 * c1 + 1.0 * s1,
        4.0 * c2 + 3.0 * s2,
    ];
    for (got, want) in y.iter().zip(expected) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    // Scores equal those of the pairwise rotation: the layouts share the
    // permutation. And the relative-position property holds.
    tch::manual_seed(3);
    let q = Tensor::randn([1, 1, 1, 4], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([1, 1, 1, 4], (Kind::Float, Device::Cpu));
    let score = |i: i64, j: i64| {
        let a = rope.apply_interleaved(&q, i).unwrap();
        let b = rope.apply_interleaved(&k, j).unwrap();
        (a * b).sum(Kind::Float).double_value(&[])
    };
    assert_abs_diff_eq!(score(5, 2), score(7, 4), epsilon = 1e-5);
    assert!(matches!(
        rope.apply_interleaved(&q, 8),
        Err(MoeError::SequenceTooLong { .. })
    ));
}
