//! `ExpertBank::one_token`, the batch-1 decoding path, against a reference
//! computed in f64 from the same weights: `Σ_j w_j FFN_{e_j}(x)`.
//!
//! The bound. For a bf16 row on an AVX2 CPU the path multiplies bf16 (or
//! int8) weights by f32 copies of its inputs, accumulates every product and
//! sum in f32 and rounds once to bf16 at the end; elsewhere it is the
//! per-expert libtorch FFN, which rounds each intermediate to the
//! activations' dtype. So each of the three products carries at most
//! `u_f32 (K + 2) Σ|x w|` of f32 accumulation error, plus, on the
//! per-expert path, the dtype's rounding `u` of each product, activation
//! and weighted term; the end result is rounded once more. On the fused
//! path the difference is at most bf16's unit roundoff `u = 2^-8` times the
//! result plus
//! `3 (K + 8) u_f32` times the magnitude below; on the per-expert path
//! at most `(4 u + (K + 8) u_f32)` times the same computation on
//! absolute values (`|x| |W_in|`, `|SiLU(g)| |p|` widened by SiLU's
//! Lipschitz constant for the gate's error, `|h| |W_out|`, `Σ w_j`) — the
//! standard dot-product bound (Higham, eq. 3.5) carried through each step.

use moe_experts::{Activation, ExpertBank, ExpertConfig, ExpertQuantization};
use tch::{nn, Device, Kind, Tensor};

const F32_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

/// gpt-oss's clamped SwiGLU with a limit that these weights' products cross.
const CLAMPED: Activation = Activation::ClampedSwiGlu {
    alpha: 1.702,
    limit: 0.5,
};

fn bank(kind: Kind, activation: Activation, bias: bool) -> (nn::VarStore, ExpertBank) {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let config = ExpertConfig {
        num_experts: 6,
        input_dim: 64,
        hidden_dim: 40,
        dropout: 0.0,
        activation,
        bias,
        ..Default::default()
    };
    let bank = ExpertBank::new(&vs.root(), &config).unwrap();
    if bias {
        // Non-zero biases, so that adding them is checked too.
        tch::no_grad(|| {
            for b in [&bank.b_in, &bank.b_gate, &bank.b_out]
                .into_iter()
                .flatten()
            {
                b.shallow_clone()
                    .copy_(&(Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        });
    }
    vs.set_kind(kind);
    (vs, bank)
}

/// `(reference, magnitude)` in f64 of `Σ_j w_j FFN_{e_j}(x)` with weights
/// `w_in`, `w_gate`, `w_out` (`[E, in, out]`, any dtype).
fn reference(
    bank: &ExpertBank,
    weights: (&Tensor, Option<&Tensor>, &Tensor),
    x: &Tensor,
    picked: &[(i64, f64)],
) -> (Tensor, Tensor) {
    let f = |t: &Tensor| t.to_kind(Kind::Double);
    let x = f(x);
    let (mut y, mut m) = (x.zeros_like(), x.zeros_like());
    for &(e, w) in picked {
        let bias = |b: &Option<Tensor>| b.as_ref().map(|b| f(&b.get(e)));
        let w_in = f(&weights.0.get(e));
        let w_out = f(&weights.2.get(e));
        let mut pre = x.matmul(&w_in);
        let mut pre_abs = x.abs().matmul(&w_in.abs());
        if let Some(b) = bias(&bank.b_in) {
            pre_abs += b.abs();
            pre += b;
        }
        // SiLU(g) and g sigmoid(alpha g) = SiLU(alpha g) / alpha have
        // slopes below 1.1; the clamps do not widen an error.
        let (h, h_abs) = match weights.1 {
            Some(g) => {
                let g_w = f(&g.get(e));
                let mut gate = x.matmul(&g_w);
                let mut gate_abs = x.abs().matmul(&g_w.abs());
                if let Some(b) = bias(&bank.b_gate) {
                    gate_abs += b.abs();
                    gate += b;
                }
                match bank.config().activation {
                    Activation::ClampedSwiGlu { alpha, limit } => {
                        let gate = gate.clamp_max(limit);
                        let glu = (&gate * alpha).sigmoid() * &gate;
                        let up = pre.clamp(-limit, limit) + 1.0;
                        (&glu * up, (glu.abs() + gate_abs * 1.1) * (pre_abs + 1.0))
                    }
                    _ => {
                        let silu = gate.silu();
                        (&silu * &pre, (silu.abs() + gate_abs * 1.1) * &pre_abs)
                    }
                }
            }
            None => (pre.relu(), pre_abs),
        };
        let mut out = h.matmul(&w_out);
        let mut out_abs = h_abs.matmul(&w_out.abs());
        if let Some(b) = bias(&bank.b_out) {
            out_abs += b.abs();
            out += b;
        }
        y += out * w;
        m += out_abs * w.abs();
    }
    (y, m)
}

fn check(bank: &ExpertBank, weights: (&Tensor, Option<&Tensor>, &Tensor), what: &str) {
    let x = (Tensor::randn([1, 64], (Kind::Float, Device::Cpu))).to_kind(Kind::BFloat16);
    let picked = [(4i64, 0.625f64), (1, 0.25), (5, 0.0), (2, 0.125)];
    let experts = Tensor::from_slice(&picked.map(|p| p.0));
    let slot_weights = Tensor::from_slice(&picked.map(|p| p.1 as f32));
    let got = tch::no_grad(|| bank.one_token(&x, &experts, &slot_weights));
    assert_eq!(got.size(), vec![1, 64], "{what}");
    assert_eq!(got.kind(), Kind::BFloat16, "{what}");
    let (want, magnitude) = reference(bank, weights, &x, &picked);
    let k = 64.0;
    let bound = if moe_core::gemv::available() {
        // The fused path: f32 throughout, one rounding to bf16 at the end
        // (bf16's unit roundoff 2^-8: 8 significant bits).
        want.abs() * 2f64.powi(-8) + &magnitude * (3.0 * (k + 8.0) * F32_ROUNDOFF)
    } else {
        &magnitude * (4.0 * 2f64.powi(-8) + (k + 8.0) * F32_ROUNDOFF)
    } + 1e-30;
    let excess = (got.to_kind(Kind::Double) - &want).abs() - &bound;
    let worst = excess.max().double_value(&[]);
    assert!(worst <= 0.0, "{what}: exceeds the bound by {worst:e}");
    // The slot of weight 0 is skipped, not computed: the result is the same
    // without it.
    let kept = Tensor::from_slice(&[4i64, 1, 2]);
    let kept_weights = Tensor::from_slice(&[0.625f32, 0.25, 0.125]);
    let again = tch::no_grad(|| bank.one_token(&x, &kept, &kept_weights));
    assert!(
        again.equal(&got),
        "{what}: a zero-weight slot changed the sum"
    );
}

#[test]
fn one_token_is_the_weighted_sum_of_its_experts_in_bf16() {
    for (activation, bias) in [
        (Activation::SwiGlu, false),
        (Activation::Relu, true),
        (CLAMPED, true),
    ] {
        let (_vs, bank) = bank(Kind::BFloat16, activation, bias);
        let what = format!("bf16 {activation:?}, bias {bias}");
        check(
            &bank,
            (&bank.w_in, bank.w_gate.as_ref(), &bank.w_out),
            &what,
        );
    }
}

#[test]
fn one_token_with_int8_experts_is_their_dequantised_sum() {
    for (activation, bias) in [
        (Activation::SwiGlu, false),
        (Activation::Relu, true),
        (CLAMPED, true),
    ] {
        let (_vs, mut bank) = bank(Kind::BFloat16, activation, bias);
        bank.quantize(ExpertQuantization::Int8).unwrap();
        // The reference uses the weights the int8 values stand for.
        let float = bank.int8_weights().unwrap().dequantize(Kind::Float);
        let what = format!("int8 {activation:?}, bias {bias}");
        check(
            &bank,
            (&float.w_in, float.w_gate.as_ref(), &float.w_out),
            &what,
        );
    }
}
