//! The SwiGLU MLP against its formula written out.

use approx::assert_abs_diff_eq;
use moe_core::{MoeError, WeightInit};
use moe_nn::SwiGluMlp;
use tch::{nn, Device, Kind, Tensor};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn computes_down_of_silu_gate_times_up() {
    for bias in [false, true] {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let mlp = SwiGluMlp::new(&(vs.root() / "mlp"), 8, 12, bias, WeightInit::Xavier).unwrap();
        let vars = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let expected: &[&str] = if bias {
            &[
                "mlp.down_proj.bias",
                "mlp.down_proj.weight",
                "mlp.gate_proj.bias",
                "mlp.gate_proj.weight",
                "mlp.up_proj.bias",
                "mlp.up_proj.weight",
            ]
        } else {
            &[
                "mlp.down_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
            ]
        };
        assert_eq!(names, expected);
        assert_eq!(vars["mlp.gate_proj.weight"].size(), [12, 8]);
        assert_eq!(vars["mlp.down_proj.weight"].size(), [8, 12]);
        let layer = |name: &str, x: &Tensor| {
            let y = x.matmul(&vars[&format!("mlp.{name}.weight")].tr());
            match vars.get(&format!("mlp.{name}.bias")) {
                Some(b) => y + b,
                None => y,
            }
        };
        let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
        let g = layer("gate_proj", &x);
        let silu = &g * g.sigmoid();
        let want = layer("down_proj", &(silu * layer("up_proj", &x)));
        let got = mlp.forward(&x).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "bias {bias}");
    }
}

#[test]
fn a_hand_worked_unit() {
    // hidden 1, intermediate 1, weights 1, 2, 3 (gate, up, down), no bias:
    // y = 3 * silu(x) * 2x; at x = 1: 6 * sigmoid(1).
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = SwiGluMlp::new(&vs.root(), 1, 1, false, WeightInit::Kaiming).unwrap();
    tch::no_grad(|| {
        let vars = vs.variables();
        for (name, w) in [("gate_proj", 1.0), ("up_proj", 2.0), ("down_proj", 3.0)] {
            let _ = vars[&format!("{name}.weight")].shallow_clone().fill_(w);
        }
    });
    let x = Tensor::from_slice(&[1.0f32]).view([1, 1]);
    let y = mlp.forward(&x).unwrap().double_value(&[0, 0]);
    let sigmoid = 1.0 / (1.0 + (-1f64).exp());
    assert_abs_diff_eq!(y, 6.0 * sigmoid, epsilon = 1e-6);
}

#[test]
fn computes_in_the_input_dtype() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = SwiGluMlp::new(&vs.root(), 8, 16, true, WeightInit::Xavier).unwrap();
    let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    let y16 = mlp.forward(&x.to_kind(Kind::BFloat16)).unwrap();
    assert_eq!(y16.kind(), Kind::BFloat16);
    let y32 = mlp.forward(&x).unwrap();
    assert!(max_abs_diff(&y16.to_kind(Kind::Float), &y32) < 0.1);
}

#[test]
fn bad_sizes_and_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    for (h, i) in [(0, 4), (4, 0), (-1, 4)] {
        let err = SwiGluMlp::new(&vs.root(), h, i, false, WeightInit::Kaiming).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
    }
    let mlp = SwiGluMlp::new(&vs.root(), 4, 6, false, WeightInit::Kaiming).unwrap();
    let cases = [
        Tensor::zeros([2, 5], (Kind::Float, Device::Cpu)),
        Tensor::from(1.0f32),
        Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu)),
    ];
    assert!(matches!(
        mlp.forward(&cases[0]),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        mlp.forward(&cases[1]),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(mlp.forward(&cases[2]), Err(MoeError::Kind { .. })));
}
