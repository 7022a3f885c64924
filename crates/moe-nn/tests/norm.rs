//! RMSNorm against hand-computed values.

use approx::assert_abs_diff_eq;
use moe_core::MoeError;
use moe_nn::RmsNorm;
use tch::{nn, Device, Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn normalises_by_the_root_mean_square() {
    let vs = nn::VarStore::new(Device::Cpu);
    let norm = RmsNorm::new(&vs.root(), 2, 0.0);
    // mean([9, 16]) = 12.5.
    let x = Tensor::from_slice(&[3.0f32, 4.0]).view([1, 2]);
    let y = values(&norm.forward(&x));
    let rms = 12.5f64.sqrt();
    assert_abs_diff_eq!(y[0], 3.0 / rms, epsilon = 1e-6);
    assert_abs_diff_eq!(y[1], 4.0 / rms, epsilon = 1e-6);
}

#[test]
fn eps_and_weight_enter_the_formula() {
    let vs = nn::VarStore::new(Device::Cpu);
    let norm = RmsNorm::new(&(vs.root() / "n"), 2, 0.5);
    let names: Vec<String> = vs.variables().into_keys().collect();
    assert_eq!(names, ["n.weight"]);
    assert_eq!(values(norm.weight()), [1.0, 1.0], "weight starts at ones");
    tch::no_grad(|| {
        norm.weight()
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[2.0f32, -1.0]))
    });
    // Rows [1, 1] (mean square 1) and [0, 2] (mean square 2), eps 0.5.
    let x = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 2.0]).view([2, 1, 2]);
    let y = values(&norm.forward(&x));
    let (a, b) = (1.5f64.sqrt(), 2.5f64.sqrt());
    let expected = [2.0 / a, -1.0 / a, 0.0, -2.0 / b];
    for (got, want) in y.iter().zip(expected) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
}

#[test]
fn bf16_input_gives_bf16_output_close_to_f32() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let norm = RmsNorm::new(&vs.root(), 16, 1e-6);
    let x = Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu));
    let y16 = norm.forward(&x.to_kind(Kind::BFloat16));
    assert_eq!(y16.kind(), Kind::BFloat16);
    let y32 = norm.forward(&x);
    assert_eq!(y32.kind(), Kind::Float);
    let diff = (y16.to_kind(Kind::Float) - &y32)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 0.05, "bf16 result off by {diff}");
}

#[test]
fn bad_sizes_and_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    for (dim, eps) in [(0, 1e-6), (-3, 1e-6), (4, -1.0), (4, f64::NAN)] {
        let err = RmsNorm::try_new(&vs.root(), dim, eps).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
    }
    let norm = RmsNorm::try_new(&vs.root(), 4, 1e-6).unwrap();
    let wide = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
    assert!(matches!(
        norm.try_forward(&wide),
        Err(MoeError::Shape { .. })
    ));
    let ints = Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        norm.try_forward(&ints),
        Err(MoeError::Kind { .. })
    ));
    let ok = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    for y in values(&norm.try_forward(&ok).unwrap()) {
        assert_abs_diff_eq!(y, 1.0, epsilon = 1e-6);
    }
}
