//! gpt-oss's clamped SwiGLU with gate biases, every float entry point of the
//! bank against the formula written out in f64 (`GptOssExperts` in
//! transformers): `g = min(x W_gate + b_gate, limit)`,
//! `u = clamp(x W_in + b_in, -limit, limit)`,
//! `FFN(x) = ((u + 1) g sigmoid(alpha g)) W_out + b_out`. Both sides
//! compute in f64 (differences are rounding, below 1e-12).

use moe_experts::{Activation, ExpertBank, ExpertConfig};
use tch::{nn, Device, Kind, Tensor};

const ALPHA: f64 = 1.702;
const LIMIT: f64 = 0.8;

fn bank() -> (nn::VarStore, ExpertBank) {
    tch::manual_seed(11);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let config = ExpertConfig {
        num_experts: 3,
        input_dim: 6,
        hidden_dim: 5,
        dropout: 0.0,
        activation: Activation::ClampedSwiGlu {
            alpha: ALPHA,
            limit: LIMIT,
        },
        bias: true,
        ..Default::default()
    };
    let bank = ExpertBank::new(&vs.root(), &config).unwrap();
    vs.set_kind(Kind::Double);
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            v.copy_(&Tensor::randn(v.size(), (Kind::Double, Device::Cpu)));
        }
    });
    (vs, bank)
}

fn reference(bank: &ExpertBank, e: i64, x: &Tensor) -> Tensor {
    let b = |t: &Option<Tensor>| t.as_ref().unwrap().get(e);
    let gate = (x.matmul(&bank.w_gate.as_ref().unwrap().get(e)) + b(&bank.b_gate)).clamp_max(LIMIT);
    let up = (x.matmul(&bank.w_in.get(e)) + b(&bank.b_in)).clamp(-LIMIT, LIMIT);
    let hidden = (up + 1.0) * &gate * (&gate * ALPHA).sigmoid();
    hidden.matmul(&bank.w_out.get(e)) + b(&bank.b_out)
}

#[test]
fn every_entry_point_computes_the_clamped_swiglu_with_its_biases() {
    let (vs, bank) = bank();
    assert_eq!(vs.variables()["b_gate"].size(), [3, 5]);
    assert_eq!(bank.config().params_per_expert(), 3 * 6 * 5 + 2 * 5 + 6);
    let x = Tensor::randn([7, 6], (Kind::Double, Device::Cpu)) * 2.0;
    // The clamps matter here: some pre-activations lie beyond the limit.
    let pre = x.matmul(&bank.w_in.get(0)) + bank.b_in.as_ref().unwrap().get(0);
    assert!(pre.abs().max().double_value(&[]) > 2.0 * LIMIT);
    let views = bank.views(&x);
    let all = tch::no_grad(|| bank.batched_ffn(&x));
    for e in 0..3 {
        let want = reference(&bank, e, &x);
        let paths = [
            ("ffn", tch::no_grad(|| bank.ffn(e, &x))),
            (
                "ffn_view",
                tch::no_grad(|| bank.ffn_view(&views, e as usize, &x)),
            ),
            ("batched_ffn", all.get(e)),
        ];
        for (what, got) in paths {
            let diff = (got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "expert {e}, {what}: {diff:e}");
        }
    }
}

#[test]
fn bad_clamps_are_config_errors() {
    for (alpha, limit) in [(1.0, 0.0), (f64::NAN, 7.0), (1.0, f64::INFINITY)] {
        let config = ExpertConfig {
            activation: Activation::ClampedSwiGlu { alpha, limit },
            ..Default::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("clamped SwiGLU"), "{err}");
    }
}
