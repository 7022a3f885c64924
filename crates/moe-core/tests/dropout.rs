use moe_core::{dropout, keep_mask};
use tch::{Device, Kind, Tensor};

fn fraction(mask: &Tensor) -> f64 {
    mask.to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

#[test]
fn keep_mask_keeps_one_minus_p_of_the_elements() {
    // 4M draws: the standard deviation of the kept fraction is below 2.5e-4.
    for p in [0.1, 0.25, 0.5, 0.9] {
        let mask = keep_mask(&[1024, 4096], p, Device::Cpu);
        assert_eq!(mask.size(), [1024, 4096]);
        assert_eq!(mask.kind(), Kind::Bool);
        let kept = fraction(&mask);
        assert!((kept - (1.0 - p)).abs() < 2e-3, "p = {p}: kept {kept}");
    }
    assert_eq!(fraction(&keep_mask(&[4096], 0.0, Device::Cpu)), 1.0);
    assert_eq!(fraction(&keep_mask(&[4096], 1.0, Device::Cpu)), 0.0);
}

#[test]
fn the_lanes_of_one_random_word_are_independent() {
    // Four mask elements come from one 64-bit word: neighbours in a word,
    // and the first lanes of neighbouring words, must be kept together with
    // probability (1 - p)^2.
    let p = 0.3;
    let mask = keep_mask(&[1 << 22], p, Device::Cpu)
        .view([-1, 4])
        .to_kind(Kind::Float);
    let both = |a: &Tensor, b: &Tensor| (a * b).mean(Kind::Float).double_value(&[]);
    let expected = (1.0 - p) * (1.0 - p);
    for (i, j) in [(0, 1), (1, 2), (2, 3), (0, 3)] {
        let together = both(&mask.select(1, i), &mask.select(1, j));
        assert!(
            (together - expected).abs() < 3e-3,
            "lanes {i} and {j}: {together} vs {expected}"
        );
    }
    let first = mask.select(1, 0);
    let n = first.size()[0];
    let together = both(&first.narrow(0, 0, n - 1), &first.narrow(0, 1, n - 1));
    assert!(
        (together - expected).abs() < 3e-3,
        "{together} vs {expected}"
    );
}

#[test]
fn odd_sizes_and_empty_tensors_get_masks_of_their_shape() {
    for shape in [vec![0], vec![1], vec![3, 5], vec![2, 3, 7]] {
        assert_eq!(keep_mask(&shape, 0.5, Device::Cpu).size(), shape);
    }
}

#[test]
fn dropout_zeroes_or_scales_each_element_and_its_gradient() {
    let p = 0.25;
    let x = Tensor::randn([64, 33], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let y = dropout(&x, p, true);
    let w = Tensor::randn([64, 33], (Kind::Float, Device::Cpu));
    let g = Tensor::run_backward(&[(&y * &w).sum(Kind::Float)], &[&x], false, false);
    let y = y.detach();
    let kept = y.ne(0.0);
    let scaled = x.detach() / (1.0 - p);
    // Kept elements are x / (1 - p), dropped ones exactly 0.
    let err = (y.masked_select(&kept) - scaled.masked_select(&kept))
        .abs()
        .max()
        .double_value(&[]);
    assert!(err < 1e-6, "kept elements off by {err}");
    let fraction_kept = fraction(&kept);
    assert!(
        fraction_kept > 0.6 && fraction_kept < 0.9,
        "{fraction_kept}"
    );
    // The gradient is w / (1 - p) where kept, 0 where dropped.
    let expected = (&w / (1.0 - p)) * kept.to_kind(Kind::Float);
    let err = (&g[0] - expected).abs().max().double_value(&[]);
    assert!(err < 1e-6, "gradient off by {err}");
}

#[test]
fn dropout_is_the_identity_in_evaluation_and_at_p_zero() {
    let x = Tensor::randn([8, 9], (Kind::Float, Device::Cpu));
    assert!(dropout(&x, 0.5, false).equal(&x));
    assert!(dropout(&x, 0.0, true).equal(&x));
    let bf16 = x.to_kind(Kind::BFloat16);
    let y = dropout(&bf16, 0.5, true);
    assert_eq!(y.kind(), Kind::BFloat16, "dropout keeps the dtype");
}
