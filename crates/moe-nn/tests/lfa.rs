//! Yuan 2.0's localized filtering against a hand-worked case.

use approx::assert_abs_diff_eq;
use moe_core::{MoeError, WeightInit};
use moe_nn::LocalizedFiltering;
use tch::{nn, Device, Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// C = 2 with hand-set weights (eps 0):
///
/// - conv1 (2 -> 1): `h[t] = x[t-1][0] + x[t][1] + 0.5`,
/// - conv2 (1 -> 2): `g[t] = [2 h[t-1], h[t] - 1]`,
/// - output_layernorm weight `[1, 2]`.
fn hand_set_filter() -> (nn::VarStore, LocalizedFiltering) {
    let vs = nn::VarStore::new(Device::Cpu);
    let lf =
        LocalizedFiltering::new(&(vs.root() / "lf_gate"), 2, 0.0, WeightInit::Kaiming).unwrap();
    let vars = vs.variables();
    let set = |name: &str, data: &[f32]| {
        let var = &vars[name];
        let value = Tensor::from_slice(data).view(var.size().as_slice());
        tch::no_grad(|| var.shallow_clone().copy_(&value));
    };
    // conv1.weight [1, 2, 2, 1]: [out][in][tap]; tap 0 reads x[t-1].
    set("lf_gate.conv1.weight", &[1.0, 0.0, 0.0, 1.0]);
    set("lf_gate.conv1.bias", &[0.5]);
    // conv2.weight [2, 1, 2, 1].
    set("lf_gate.conv2.weight", &[2.0, 0.0, 0.0, 1.0]);
    set("lf_gate.conv2.bias", &[0.0, -1.0]);
    set("lf_gate.output_layernorm.weight", &[1.0, 2.0]);
    (vs, lf)
}

#[test]
fn parameters_have_yuans_names_and_conv2d_shapes() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _lf =
        LocalizedFiltering::new(&(vs.root() / "lf_gate"), 6, 1e-6, WeightInit::Kaiming).unwrap();
    let vars = vs.variables();
    let shape = |name: &str| vars[name].size();
    assert_eq!(vars.len(), 5);
    assert_eq!(shape("lf_gate.conv1.weight"), [3, 6, 2, 1]);
    assert_eq!(shape("lf_gate.conv1.bias"), [3]);
    assert_eq!(shape("lf_gate.conv2.weight"), [6, 3, 2, 1]);
    assert_eq!(shape("lf_gate.conv2.bias"), [6]);
    assert_eq!(shape("lf_gate.output_layernorm.weight"), [6]);
}

#[test]
fn a_hand_worked_sequence_with_zero_padding() {
    let (_vs, lf) = hand_set_filter();
    // x = [1, 2], [3, -1], [0, 1]:
    // h = [0 + 2 + .5, 1 - 1 + .5, 3 + 1 + .5] = [2.5, 0.5, 4.5];
    // g[0] = [2 * 0, 1.5] (conv2 sees 0 before the start, not conv1 of the
    // padding, which would be 0.5), g[1] = [5, -0.5], g[2] = [1, 3.5];
    // r = g + x = [1, 3.5], [8, -1.5], [1, 4.5].
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0]).view([1, 3, 2]);
    let y = values(&lf.forward(&x).unwrap());
    let residuals = [[1.0, 3.5], [8.0, -1.5], [1.0, 4.5]];
    for (t, r) in residuals.iter().enumerate() {
        let rms = ((r[0] * r[0] + r[1] * r[1]) / 2.0f64).sqrt();
        assert_abs_diff_eq!(y[2 * t], r[0] / rms, epsilon = 1e-6);
        assert_abs_diff_eq!(y[2 * t + 1], 2.0 * r[1] / rms, epsilon = 1e-6);
    }
}

#[test]
fn only_the_previous_position_reaches_the_output() {
    tch::manual_seed(6);
    let vs = nn::VarStore::new(Device::Cpu);
    let lf = LocalizedFiltering::new(&vs.root(), 8, 1e-6, WeightInit::Kaiming).unwrap();
    let x = Tensor::randn([2, 7, 8], (Kind::Float, Device::Cpu));
    let y = lf.forward(&x).unwrap();
    let x2 = x.copy();
    let _ = x2.narrow(1, 3, 1).fill_(2.0);
    let y2 = lf.forward(&x2).unwrap();
    let diff = |t: i64| {
        (y.select(1, t) - y2.select(1, t))
            .abs()
            .max()
            .double_value(&[])
    };
    // Position t reads x[t], x[t-1] (both convolutions) and x[t-2] (conv2
    // of conv1's output at t-1).
    assert!(diff(0) < 1e-6 && diff(1) < 1e-6 && diff(2) < 1e-6);
    assert!(diff(3) > 1e-4 && diff(4) > 1e-4 && diff(5) > 1e-4);
    assert!(diff(6) < 1e-6);
}

#[test]
fn bad_sizes_and_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    for c in [0, 3, -2] {
        let err = LocalizedFiltering::new(&vs.root(), c, 1e-6, WeightInit::Kaiming).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
    }
    let lf = LocalizedFiltering::new(&vs.root(), 4, 1e-6, WeightInit::Kaiming).unwrap();
    let cases = [
        Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)),
        Tensor::zeros([1, 3, 6], (Kind::Float, Device::Cpu)),
        Tensor::zeros([1, 0, 4], (Kind::Float, Device::Cpu)),
    ];
    for x in &cases {
        assert!(matches!(lf.forward(x), Err(MoeError::Shape { .. })));
    }
    let ints = Tensor::zeros([1, 3, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(lf.forward(&ints), Err(MoeError::Kind { .. })));
}
