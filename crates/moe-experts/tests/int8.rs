//! Weight-only int8 experts: the quantisation's invariants; each int8
//! product and each expert's FFN against the float weights, within bounds
//! derived from the quantisation step and the dtype's rounding (below);
//! `_weight_int8pack_mm` against the dequantising kernel; every FFN entry
//! point of a quantised bank; freed memory; gradients to the input; and
//! (ignored, run by hand) the timing of one expert's GEMV.
//!
//! The bounds. A weight `w` of output channel `o` is stored as `q s_o`,
//! `s_o = max|w| / 127`, `q = round(w / s_o)` with `w / s_o` computed in
//! f32 (relative error `2^-24`, `|w / s_o| <= 127`), so
//! `|q s_o - w| <= s_o (1/2 + 127 * 2^-24) < s_o HALF_STEP`. The kernels use
//! the scale rounded to the activations' dtype, `s'_o`, which adds
//! `|q| |s'_o - s_o|`. Every kernel here accumulates in f32 and rounds the
//! result to the activations' dtype at most twice (`_weight_int8pack_mm`:
//! once; `(x q^T) * s'`: after the product and after the scaling; f16's
//! `x (q s')^T`: each dequantised weight, then the result), so with `u` the
//! dtype's unit roundoff (f32 `2^-24`, bf16 `2^-8`: 8 significant bits,
//! f16 `2^-11`) and the standard dot-product bound `gamma_K <= K 2^-24 (1 + small)`
//! for the f32 accumulation (Higham, Accuracy and Stability of Numerical
//! Algorithms, 2nd ed., eq. 3.5),
//!
//! `|y_o - (x W)_o| <= sum_k |x_k| (s_o HALF_STEP + |q_ok| |s'_o - s_o|)
//!                     + (3 u + (K + 2) 2^-24) sum_k |x_k| |q_ok| s'_o`.
//!
//! Through an expert, `p = x W_in (+ b_in)` and `g = x W_gate` carry such
//! bounds `dp`, `dg` (a bias add rounds once more: `u (|p| + dp)`); SwiGLU's
//! `h = SiLU(g) p` then moves by at most
//! `L dg (|p| + dp) + |SiLU(g)| dp + c (|SiLU(g)| + L dg)(|p| + dp)`, with
//! `L = 1.1 >= max |SiLU'| = 1.0998` and `c = 3 u + 16 * 2^-24` for the
//! rounding of SiLU (computed in f32, then rounded) and of the product;
//! ReLU moves by at most `dp`. Finally `y = h W_out (+ b_out)` moves by
//! `dh |W_out| +` the product bound above with `|h| + dh` for `|x|`.

use moe_core::MoeError;
use moe_experts::{
    int8_matmul, pack_mm_supported, Activation, BankWeights, ExpertBank, ExpertConfig,
    ExpertQuantization, Int8Experts, Int8Kernel, Int8Weight, ZERO_CHANNEL_SCALE,
};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

const F32_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

/// `|q - w / s| <= 1/2 + 127 * 2^-24 < HALF_STEP` (module docs).
const HALF_STEP: f64 = 0.5 + 1.0 / 65536.0;

/// A bound on `|SiLU'|`: its maximum is 1.0998, at `x = 2.3994`.
const SILU_LIPSCHITZ: f64 = 1.1;

fn unit_roundoff(kind: Kind) -> f64 {
    match kind {
        Kind::Float => F32_ROUNDOFF,
        Kind::BFloat16 => 2f64.powi(-8),
        Kind::Half => 2f64.powi(-11),
        other => panic!("no roundoff for {other:?}"),
    }
}

fn max(t: &Tensor) -> f64 {
    t.max().double_value(&[])
}

/// The bound on `|x (q s')^T - x W|` of the module docs, `[n, out]`, for
/// `x_abs: [n, K]` (f64), `q: [out, K]`, `s: [out]` f32.
fn product_bound(x_abs: &Tensor, q: &Tensor, s: &Tensor, kind: Kind) -> Tensor {
    let k = q.size()[1] as f64;
    let s64 = s.to_kind(Kind::Double).unsqueeze(1);
    let s_used = s.to_kind(kind).to_kind(Kind::Double).unsqueeze(1);
    let q_abs = q.to_kind(Kind::Double).abs();
    let step = &s64 * HALF_STEP + &q_abs * (&s_used - &s64).abs();
    let rounding = 3.0 * unit_roundoff(kind) + (k + 2.0) * F32_ROUNDOFF;
    x_abs.mm(&step.tr()) + x_abs.mm(&(q_abs * s_used).tr()) * rounding
}

/// Only the rounding part of [`product_bound`]: how far two kernels that
/// compute `x (q s')^T` with the same `q s'` may be from it.
fn rounding_bound(x_abs: &Tensor, q: &Tensor, s: &Tensor, kind: Kind) -> Tensor {
    let k = q.size()[1] as f64;
    let s_used = s.to_kind(kind).to_kind(Kind::Double).unsqueeze(1);
    let rounding = 3.0 * unit_roundoff(kind) + (k + 2.0) * F32_ROUNDOFF;
    x_abs.mm(&(q.to_kind(Kind::Double).abs() * s_used).tr()) * rounding
}

fn randn(shape: &[i64], kind: Kind) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(kind)
}

#[test]
fn quantisation_invariants() {
    tch::manual_seed(1);
    // [E, in, out] = [2, 32, 24]: output channel o of expert e is w[e, :, o].
    let w = Tensor::randn([2, 32, 24], (Kind::Float, Device::Cpu)) * 0.05;
    let _ = w.get(0).select(1, 3).fill_(0.0); // an all-zero channel
    let _ = w.get(1).select(1, 5).fill_(1e-4);
    let _ = w.get(1).select(1, 5).get(7).fill_(-3.0); // a negative outlier
    let int8 = Int8Weight::quantize(&w).unwrap();
    let (q, s) = (int8.values(), int8.scales());
    assert_eq!(q.size(), vec![2, 24, 32]);
    assert_eq!(q.kind(), Kind::Int8);
    assert!(q.is_contiguous());
    assert_eq!(s.size(), vec![2, 24]);
    assert_eq!(s.kind(), Kind::Float);
    assert_eq!(int8.size_in_bytes(), 2 * 24 * 32 + 4 * 2 * 24);

    let q64 = q.to_kind(Kind::Double);
    let rows = w.to_kind(Kind::Double).transpose(1, 2); // [E, out, in]
    assert!(max(&q64.abs()) <= 127.0);
    // The zero channel: scale ZERO_CHANNEL_SCALE, values 0, dequantised exactly 0.
    assert_eq!(s.double_value(&[0, 3]), ZERO_CHANNEL_SCALE);
    assert_eq!(max(&q64.get(0).get(3).abs()), 0.0);
    // Every other channel's largest |w| maps to +-127 with its sign, and the
    // scale is that |w| / 127 (one f32 rounding).
    let amax = rows.abs().amax([-1].as_slice(), false);
    let arg = rows.abs().argmax(-1, false);
    for e in 0..2 {
        for o in 0..24 {
            if e == 0 && o == 3 {
                continue;
            }
            let i = arg.int64_value(&[e, o]);
            let want = 127.0 * rows.double_value(&[e, o, i]).signum();
            assert_eq!(q64.double_value(&[e, o, i]), want, "expert {e} channel {o}");
            let scale = s.double_value(&[e, o]);
            let exact = amax.double_value(&[e, o]) / 127.0;
            assert!(
                (scale - exact).abs() <= exact * F32_ROUNDOFF,
                "{scale} vs {exact}"
            );
        }
    }
    assert_eq!(q64.double_value(&[1, 5, 7]), -127.0);
    // |q s - w| <= s HALF_STEP for every weight.
    let s64 = s.to_kind(Kind::Double).unsqueeze(-1);
    let err = (&q64 * &s64 - &rows).abs() - &s64 * HALF_STEP;
    assert!(max(&err) <= 0.0, "a weight moved more than half a step");
    // dequantize() is q s back in the bank's layout.
    let back = int8.dequantize(Kind::Double);
    assert_eq!(back.size(), w.size());
    // (computed in f32: one rounding of each q s, |q s| <= 127 s)
    let tolerance = 127.0 * max(&s64) * F32_ROUNDOFF;
    assert!(max(&(back - (&q64 * &s64).transpose(1, 2)).abs()) <= tolerance);
    // A non-float or non-[E, in, out] weight is refused.
    assert!(matches!(
        Int8Weight::quantize(&w.get(0)),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        Int8Weight::quantize(&w.to_kind(Kind::Int64)),
        Err(MoeError::Kind { .. })
    ));
}

#[test]
fn products_are_within_the_quantisation_bound_and_the_kernels_agree() {
    tch::manual_seed(2);
    let (k, out) = (64, 48);
    let w = randn(&[1, k, out], Kind::Float) * 0.1;
    let int8 = Int8Weight::quantize(&w).unwrap();
    let (q, s) = (int8.values().get(0), int8.scales().get(0));
    let w64 = w.get(0).to_kind(Kind::Double);
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        for rows in [1, 5, 17] {
            let x = randn(&[rows, k], kind);
            let x64 = x.to_kind(Kind::Double);
            let exact = x64.mm(&w64);
            let bound = product_bound(&x64.abs(), &q, &s, kind);
            assert!(pack_mm_supported(&x, &q));
            let mut results = Vec::new();
            for kernel in [Int8Kernel::PackMm, Int8Kernel::Dequantize, Int8Kernel::Auto] {
                let y = int8_matmul(&x, &q, &s, kernel).unwrap();
                assert_eq!(y.kind(), kind);
                assert_eq!(y.size(), vec![rows, out]);
                let err = (y.to_kind(Kind::Double) - &exact).abs();
                let ratio = max(&(&err / &bound));
                println!(
                    "{kind:?} rows {rows} {kernel:?}: max |err| {:.3e}, max err / bound {ratio:.3}",
                    max(&err)
                );
                assert!(ratio <= 1.0, "{kind:?} {kernel:?}: error beyond the bound");
                results.push(y.to_kind(Kind::Double));
            }
            // Both kernels compute x (q s')^T: they differ by rounding only.
            let apart = (&results[0] - &results[1]).abs();
            let rounding = rounding_bound(&x64.abs(), &q, &s, kind) * 2.0;
            let ratio = max(&(&apart / &rounding));
            println!("{kind:?} rows {rows}: |pack_mm - dequantize| / rounding bound {ratio:.3}");
            assert!(
                ratio <= 1.0,
                "{kind:?}: the kernels disagree beyond rounding"
            );
        }
    }
    // Where `_weight_int8pack_mm` cannot run, asking for it is an error.
    let x = randn(&[2, k], Kind::Float).set_requires_grad(true);
    assert!(!pack_mm_supported(&x, &q));
    assert!(int8_matmul(&x, &q, &s, Int8Kernel::PackMm).is_err());
    let w12 = randn(&[1, 12, 8], Kind::Float);
    let odd = Int8Weight::quantize(&w12).unwrap();
    let x = randn(&[2, 12], Kind::BFloat16);
    let (q12, s12) = (odd.values().get(0), odd.scales().get(0));
    assert!(
        !pack_mm_supported(&x, &q12),
        "K = 12 is not a multiple of 16"
    );
    assert!(int8_matmul(&x, &q12, &s12, Int8Kernel::PackMm).is_err());
    let auto = int8_matmul(&x, &q12, &s12, Int8Kernel::Auto).unwrap();
    let bound = product_bound(&x.to_kind(Kind::Double).abs(), &q12, &s12, Kind::BFloat16);
    let exact = x
        .to_kind(Kind::Double)
        .mm(&w12.get(0).to_kind(Kind::Double));
    assert!(max(&((auto.to_kind(Kind::Double) - exact).abs() / bound)) <= 1.0);
    // A misaligned activation (a view one element into a buffer) is copied.
    let buffer = randn(&[1 + 3 * k], Kind::BFloat16);
    let x = buffer.narrow(0, 1, 3 * k).view([3, k]);
    let y = int8_matmul(&x, &q, &s, Int8Kernel::PackMm).unwrap();
    let want = int8_matmul(&x.copy(), &q, &s, Int8Kernel::PackMm).unwrap();
    assert!(y.equal(&want));
}

/// Expert `e`'s float weights in f64.
struct Float64Expert {
    w_in: Tensor,
    b_in: Option<Tensor>,
    w_gate: Option<Tensor>,
    w_out: Tensor,
    b_out: Option<Tensor>,
}

fn float64(bank: &ExpertBank) -> Vec<Float64Expert> {
    let f = |t: &Tensor, e: i64| t.get(e).to_kind(Kind::Double);
    (0..bank.num_experts())
        .map(|e| Float64Expert {
            w_in: f(&bank.w_in, e),
            b_in: bank.b_in.as_ref().map(|b| f(b, e)),
            w_gate: bank.w_gate.as_ref().map(|g| f(g, e)),
            w_out: f(&bank.w_out, e),
            b_out: bank.b_out.as_ref().map(|b| f(b, e)),
        })
        .collect()
}

/// The exact (f64) FFN of the float expert on `x` and the bound of the
/// module docs on the quantised expert's distance from it.
fn reference_and_bound(
    w: &Float64Expert,
    int8: &Int8Experts,
    e: i64,
    x: &Tensor,
) -> (Tensor, Tensor) {
    let kind = x.kind();
    let u = unit_roundoff(kind);
    let x64 = x.to_kind(Kind::Double);
    let x_abs = x64.abs();
    let qs = |w: &Int8Weight| (w.values().get(e), w.scales().get(e));
    let (q_in, s_in) = qs(&int8.w_in);
    let mut p = x64.mm(&w.w_in);
    let mut dp = product_bound(&x_abs, &q_in, &s_in, kind);
    if let Some(b) = &w.b_in {
        p += b;
        dp = &dp + (p.abs() + &dp) * u;
    }
    let (h, dh) = match (&w.w_gate, &int8.w_gate) {
        (Some(w_gate), Some(q_gate)) => {
            let (q_g, s_g) = qs(q_gate);
            let g = x64.mm(w_gate);
            let dg = product_bound(&x_abs, &q_g, &s_g, kind);
            let silu = g.silu();
            let p_abs = p.abs() + &dp;
            let c = 3.0 * u + 16.0 * F32_ROUNDOFF;
            let dh = &dg * SILU_LIPSCHITZ * &p_abs
                + silu.abs() * &dp
                + (silu.abs() + &dg * SILU_LIPSCHITZ) * &p_abs * c;
            (silu * &p, dh)
        }
        _ => (p.relu(), dp),
    };
    let (q_out, s_out) = qs(&int8.w_out);
    let mut y = h.mm(&w.w_out);
    let mut dy = dh.mm(&w.w_out.abs()) + product_bound(&(h.abs() + &dh), &q_out, &s_out, kind);
    if let Some(b) = &w.b_out {
        y += b;
        dy = &dy + (y.abs() + &dy) * u;
    }
    (y, dy)
}

fn bank_config(activation: Activation, bias: bool) -> ExpertConfig {
    ExpertConfig {
        num_experts: 4,
        input_dim: 64,
        hidden_dim: 96,
        dropout: 0.0,
        activation,
        bias,
        ..Default::default()
    }
}

/// A random bank in `kind` (its variables converted, as a bf16 checkpoint
/// would load them).
fn random_bank(config: &ExpertConfig, kind: Kind, seed: i64) -> (nn::VarStore, ExpertBank) {
    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let bank = ExpertBank::new(&vs.root(), config).unwrap();
    vs.set_kind(kind);
    if config.bias {
        // nn.Linear's biases are as large as the products: give them a
        // share of the output that the bound's bias terms must cover.
        tch::no_grad(|| {
            for b in [&bank.b_in, &bank.b_out].into_iter().flatten() {
                let _ = b.shallow_clone().uniform_(-0.5, 0.5);
            }
        });
    }
    (vs, bank)
}

#[test]
fn every_entry_point_of_a_quantised_bank_is_within_the_propagated_bound() {
    for (activation, bias) in [(Activation::SwiGlu, false), (Activation::Relu, true)] {
        for kind in [Kind::Float, Kind::BFloat16] {
            let config = bank_config(activation, bias);
            let (_vs, mut bank) = random_bank(&config, kind, 3);
            let float = float64(&bank);
            bank.quantize(ExpertQuantization::Int8).unwrap();
            let int8 = bank.int8_weights().unwrap();
            let e_count = bank.num_experts();
            let mut worst = 0f64;
            let mut check = |label: &str, e: i64, x: &Tensor, y: &Tensor| {
                assert_eq!(y.kind(), kind, "{label}");
                let (exact, bound) = reference_and_bound(&float[e as usize], int8, e, x);
                let ratio = max(&((y.to_kind(Kind::Double) - exact).abs() / bound));
                assert!(
                    ratio <= 1.0,
                    "{activation:?} bias {bias} {kind:?} {label} expert {e}: error / bound {ratio}"
                );
                worst = worst.max(ratio);
            };
            // One row (a decoded token) and several.
            for rows in [1, 7] {
                tch::manual_seed(10 + rows);
                let x = randn(&[rows, 64], kind);
                let views = bank.views(&x);
                let all = bank.batched_ffn(&x);
                let all_dropout = bank.forward_all(&x, false);
                assert_eq!(all.size(), vec![e_count, rows, 64]);
                for e in 0..e_count {
                    check("ffn", e, &x, &bank.ffn(e, &x));
                    check("forward_expert", e, &x, &bank.forward_expert(e, &x, false));
                    check("ffn_view", e, &x, &bank.ffn_view(&views, e as usize, &x));
                    check("batched_ffn [N, d]", e, &x, &all.get(e));
                    check("forward_all", e, &x, &all_dropout.get(e));
                }
                // A buffer of rows per expert (the capacity strategy's layout).
                let per_expert = randn(&[e_count, rows, 64], kind);
                let out = bank.batched_ffn(&per_expert);
                for e in 0..e_count {
                    check("batched_ffn [E, C, d]", e, &per_expert.get(e), &out.get(e));
                }
                // Leading dimensions are kept: [2, rows, d].
                let x3 = randn(&[2, rows, 64], kind);
                let y3 = bank.ffn(1, &x3);
                assert_eq!(y3.size(), vec![2, rows, 64]);
                check("ffn [2, n, d]", 1, &x3.get(1), &y3.get(1));
            }
            println!("{activation:?} bias {bias} {kind:?}: max error / bound {worst:.3}");
        }
    }
}

#[test]
fn pack_mm_and_the_dequantising_fallback_agree_through_the_bank() {
    // A bank's products take `_weight_int8pack_mm` for bf16 activations that
    // need no gradient and the dequantising kernel for activations that do:
    // both stay within the bound, and apart by at most twice of it.
    let (_vs, mut bank) = random_bank(&bank_config(Activation::SwiGlu, false), Kind::BFloat16, 4);
    let float = float64(&bank);
    bank.quantize(ExpertQuantization::Int8).unwrap();
    let int8 = bank.int8_weights().unwrap();
    tch::manual_seed(5);
    let x = randn(&[3, 64], Kind::BFloat16);
    let q = int8.w_in.values().get(0);
    assert!(pack_mm_supported(&x, &q));
    assert!(!pack_mm_supported(&x.detach().set_requires_grad(true), &q));
    for e in 0..bank.num_experts() {
        let fast = bank.ffn(e, &x).to_kind(Kind::Double);
        let grad_x = x.detach().set_requires_grad(true);
        let fallback = bank.ffn(e, &grad_x).detach().to_kind(Kind::Double);
        let (exact, bound) = reference_and_bound(&float[e as usize], int8, e, &x);
        assert!(max(&((&fast - &exact).abs() / &bound)) <= 1.0);
        assert!(max(&((&fallback - &exact).abs() / &bound)) <= 1.0);
        let apart = max(&((&fast - &fallback).abs() / (&bound * 2.0)));
        println!("expert {e}: |pack_mm - fallback| / (2 bound) {apart:.4}");
        assert!(apart <= 1.0);
    }
}

#[test]
fn gradients_reach_the_input_through_the_int8_weights() {
    let config = bank_config(Activation::SwiGlu, false);
    let (_vs, mut bank) = random_bank(&config, Kind::Float, 6);
    bank.quantize(ExpertQuantization::Int8).unwrap();
    // The same function with float weights: the dequantised ones.
    let dequantised = bank.int8_weights().unwrap().dequantize(Kind::Float);
    let (_vs2, mut float_bank) = random_bank(&config, Kind::Float, 7);
    float_bank.load(&dequantised).unwrap();
    tch::manual_seed(8);
    let x = randn(&[5, 64], Kind::Float);
    for e in 0..bank.num_experts() {
        let xq = x.detach().set_requires_grad(true);
        bank.ffn(e, &xq).square().sum(Kind::Float).backward();
        let xf = x.detach().set_requires_grad(true);
        float_bank.ffn(e, &xf).square().sum(Kind::Float).backward();
        let (gq, gf) = (xq.grad(), xf.grad());
        let rel = max(&(&gq - &gf).abs()) / max(&gf.abs());
        assert!(
            rel < 1e-4,
            "expert {e}: gradients differ by {rel} (relative)"
        );
    }
    // The int8 weights themselves get no gradient.
    let int8 = bank.int8_weights().unwrap();
    assert!(!int8.w_in.values().requires_grad());
    assert!(!int8.w_in.scales().requires_grad());
}

#[test]
fn quantising_frees_the_float_weights_and_halves_a_bf16_bank() {
    let config = bank_config(Activation::SwiGlu, false);
    let (e, d, h) = (4, 64, 96);
    let (vs, mut bank) = random_bank(&config, Kind::BFloat16, 9);
    assert_eq!(bank.quantization(), None);
    assert!(bank.int8_weights().is_none());
    let bf16_bytes = bank.weight_bytes();
    assert_eq!(bf16_bytes, 3 * e * d * h * 2);
    bank.quantize(ExpertQuantization::Int8).unwrap();
    assert_eq!(bank.quantization(), Some(ExpertQuantization::Int8));
    // 3 E d h int8 values + f32 scales: E h (w_in) + E h (w_gate) + E d (w_out).
    let int8_bytes = bank.weight_bytes();
    assert_eq!(int8_bytes, 3 * e * d * h + 4 * e * (2 * h + d));
    let counted: i64 = {
        let int8 = bank.int8_weights().unwrap();
        [&int8.w_in, int8.w_gate.as_ref().unwrap(), &int8.w_out]
            .iter()
            .map(|w| {
                let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
                bytes(w.values()) + bytes(w.scales())
            })
            .sum()
    };
    assert_eq!(counted, int8_bytes);
    println!("bf16 {bf16_bytes} bytes -> int8 {int8_bytes} bytes");
    // int8 / bf16 = (3 d h + 4 (2 h + d)) / (6 d h) = 1/2 + 4 / (3 d) + 2 / (3 h):
    // half, plus the scales' 4 bytes per channel over the channel's 2 d or 2 h bytes.
    let ratio = int8_bytes as f64 / bf16_bytes as f64;
    let want = 0.5 + 4.0 / (3.0 * d as f64) + 2.0 / (3.0 * h as f64);
    assert!((ratio - want).abs() < 1e-12, "{ratio} vs {want}");
    // The float storage is gone, for the bank and its VarStore alike.
    for name in ["w_in", "w_gate", "w_out"] {
        let var = &vs.variables()[name];
        assert_eq!(var.size(), vec![0], "{name}");
        assert_eq!(var.kind(), Kind::BFloat16, "{name}");
    }
    assert_eq!(bank.w_in.numel(), 0);
    // Quantising twice and loading float weights are errors.
    assert!(matches!(
        bank.quantize(ExpertQuantization::Int8),
        Err(MoeError::Config(_))
    ));
    let weights = BankWeights {
        w_in: Tensor::zeros([e, d, h], (Kind::Float, Device::Cpu)),
        b_in: None,
        w_gate: Some(Tensor::zeros([e, d, h], (Kind::Float, Device::Cpu))),
        b_gate: None,
        w_out: Tensor::zeros([e, h, d], (Kind::Float, Device::Cpu)),
        b_out: None,
    };
    assert!(matches!(bank.load(&weights), Err(MoeError::Config(_))));
}

#[test]
fn quantization_names_parse_and_print() {
    assert_eq!(
        "int8".parse::<ExpertQuantization>().unwrap(),
        ExpertQuantization::Int8
    );
    assert_eq!(
        "INT8".parse::<ExpertQuantization>().unwrap(),
        ExpertQuantization::Int8
    );
    assert_eq!(ExpertQuantization::Int8.to_string(), "int8");
    assert!(matches!(
        "int4".parse::<ExpertQuantization>(),
        Err(MoeError::Config(_))
    ));
}

/// Minimum and median seconds of `f` over `reps` runs after 3 warm-up
/// runs (the minimum is the least disturbed by other processes).
fn time(reps: usize, mut f: impl FnMut() -> Tensor) -> (f64, f64) {
    for _ in 0..3 {
        let _ = f();
    }
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            let _ = f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[reps / 2])
}

/// One expert's GEMV (a decoded token) with a 2048 x 1024 weight, float
/// against int8, on one thread (`MOE_TIMING_THREADS` to change it):
/// `cargo test -p moe-layers-experts --test int8 -- --ignored --nocapture gemv_timing`.
/// More rows and f32 show where `_weight_int8pack_mm` pays
/// ([`Int8Kernel::Auto`] takes it for bf16 only).
#[test]
#[ignore = "timing, run by hand"]
fn gemv_timing() {
    let threads = std::env::var("MOE_TIMING_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    println!("threads: {threads}; times: min / median in us");
    for (d_in, d_out) in [(2048, 1024), (1024, 2048)] {
        let w = randn(&[1, d_in, d_out], Kind::Float) * 0.02;
        let int8 = Int8Weight::quantize(&w).unwrap();
        for kind in [Kind::BFloat16, Kind::Float] {
            // The bank's layout [in, out] (what the float bank multiplies by)
            // and nn.Linear's [out, in] transposed, as a check of BLAS's
            // preferred layout.
            let wk = w.get(0).to_kind(kind);
            let wt = wk.tr().contiguous();
            let (q, s) = (int8.values().get(0), int8.scales().get(0).to_kind(kind));
            for rows in [1, 4, 16, 64] {
                let x = randn(&[rows, d_in], kind);
                let reps = if rows >= 16 { 31 } else { 201 };
                let us =
                    |(min, median): (f64, f64)| format!("{:.0} / {:.0}", min * 1e6, median * 1e6);
                let float = us(time(reps, || x.mm(&wk)));
                let linear = us(time(reps, || x.mm(&wt.tr())));
                let pack = us(time(reps, || {
                    int8_matmul(&x, &q, &s, Int8Kernel::PackMm).unwrap()
                }));
                let deq = us(time(reps, || {
                    int8_matmul(&x, &q, &s, Int8Kernel::Dequantize).unwrap()
                }));
                println!(
                    "[{rows} x {d_in}] x [{d_in} x {d_out}] {kind:?}: float x W {float}, \
                     float x (W^T)^T {linear}, int8 _weight_int8pack_mm {pack}, int8 \
                     dequantise + mm {deq}"
                );
            }
        }
    }
}
