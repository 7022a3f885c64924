use approx::assert_abs_diff_eq;
use moe_aten::{fused_adamw_, AdamWConfig, AdamWTensors};
use moe_core::MoeError;
use tch::{Device, Kind, Tensor};

const HYPER: AdamWConfig = AdamWConfig {
    lr: 0.1,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
};

/// AdamW on one scalar, written out in f64 (the formula of `fused_adamw_`).
fn reference(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, t: i32, h: AdamWConfig) {
    *p *= 1.0 - h.lr * h.weight_decay;
    *m = h.beta1 * *m + (1.0 - h.beta1) * g;
    *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
    let m_hat = *m / (1.0 - h.beta1.powi(t));
    let v_hat = *v / (1.0 - h.beta2.powi(t));
    *p -= h.lr * m_hat / (v_hat.sqrt() + h.eps);
}

fn scalars(values: &[f32]) -> Vec<Tensor> {
    values.iter().map(|&x| Tensor::from_slice(&[x])).collect()
}

#[test]
fn one_step_by_hand_then_three_against_the_formula() {
    // Step 1 by hand for p = 1, g = 0.5: p <- 0.999; m = 0.05, v = 0.00025;
    // m_hat = 0.5, v_hat = 0.25; p <- 0.999 - 0.1 * 0.5 / 0.5 = 0.899.
    let params = scalars(&[1.0, -2.0]);
    let (exp_avgs, exp_avg_sqs) = (scalars(&[0.0, 0.0]), scalars(&[0.0, 0.0]));
    let steps = vec![Tensor::from(0f32), Tensor::from(0f32)];
    let grads_by_step = [[0.5f32, 0.25], [-0.5, 1.0], [2.0, -0.125], [0.1, 0.0]];
    let mut expected = [(1.0, 0.0, 0.0), (-2.0, 0.0, 0.0)];
    for (step, grads) in grads_by_step.iter().enumerate() {
        let grads = scalars(grads);
        let tensors = AdamWTensors {
            params: &params,
            grads: &grads,
            exp_avgs: &exp_avgs,
            exp_avg_sqs: &exp_avg_sqs,
            steps: &steps,
        };
        fused_adamw_(&tensors, &HYPER).unwrap();
        for (i, (p, m, v)) in expected.iter_mut().enumerate() {
            let g = grads[i].double_value(&[0]);
            reference(p, m, v, g, step as i32 + 1, HYPER);
            assert_abs_diff_eq!(params[i].double_value(&[0]), *p, epsilon = 1e-6);
            assert_abs_diff_eq!(exp_avgs[i].double_value(&[0]), *m, epsilon = 1e-7);
            assert_abs_diff_eq!(exp_avg_sqs[i].double_value(&[0]), *v, epsilon = 1e-7);
            assert_eq!(steps[i].double_value(&[]), step as f64 + 1.0);
        }
        if step == 0 {
            assert_abs_diff_eq!(params[0].double_value(&[0]), 0.899, epsilon = 1e-6);
        }
    }
}

#[test]
fn updates_whole_tensors_elementwise() {
    let p = Tensor::randn([37, 5], (Kind::Float, Device::Cpu));
    let g = Tensor::randn([37, 5], (Kind::Float, Device::Cpu));
    let (m, v) = (p.zeros_like(), p.zeros_like());
    let before: Vec<f32> = Vec::try_from(p.reshape([-1])).unwrap();
    let grads: Vec<f32> = Vec::try_from(g.reshape([-1])).unwrap();
    let tensors = AdamWTensors {
        params: &[p.shallow_clone()],
        grads: &[g],
        exp_avgs: &[m],
        exp_avg_sqs: &[v],
        steps: &[Tensor::from(0f32)],
    };
    fused_adamw_(&tensors, &HYPER).unwrap();
    let after: Vec<f32> = Vec::try_from(p.reshape([-1])).unwrap();
    for ((&b, &g), &a) in before.iter().zip(&grads).zip(&after) {
        let (mut p, mut m, mut v) = (f64::from(b), 0.0, 0.0);
        reference(&mut p, &mut m, &mut v, f64::from(g), 1, HYPER);
        assert_abs_diff_eq!(f64::from(a), p, epsilon = 1e-5);
    }
}

#[test]
fn mismatched_lists_and_dtypes_are_errors_not_crashes() {
    let params = scalars(&[1.0, 2.0]);
    let short = scalars(&[0.5]);
    let zeros = scalars(&[0.0, 0.0]);
    let steps = vec![Tensor::from(0f32), Tensor::from(0f32)];
    let err = fused_adamw_(
        &AdamWTensors {
            params: &params,
            grads: &short,
            exp_avgs: &zeros,
            exp_avg_sqs: &zeros,
            steps: &steps,
        },
        &HYPER,
    )
    .unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    assert!(
        err.to_string().contains("2 parameters, 1 gradients"),
        "{err}"
    );

    // libtorch rejects f64 gradients for f32 parameters: its exception
    // comes back as an error.
    let f64_grads: Vec<Tensor> = scalars(&[0.5, 0.5])
        .iter()
        .map(|g| g.to_kind(Kind::Double))
        .collect();
    let err = fused_adamw_(
        &AdamWTensors {
            params: &params,
            grads: &f64_grads,
            exp_avgs: &zeros,
            exp_avg_sqs: &zeros,
            steps: &steps,
        },
        &HYPER,
    )
    .unwrap_err();
    assert!(matches!(err, MoeError::Torch(_)), "{err}");
}

#[test]
fn cleared_gradients_are_undefined_and_the_next_backward_stores_fresh_ones() {
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
    let x = Tensor::from_slice(&[0.5f32, -1.0, 4.0]);
    (&w * &x).sum(Kind::Float).backward();
    (&w * &x).sum(Kind::Float).backward();
    // Two backwards accumulate: 2x.
    assert!(w.grad().allclose(&(&x * 2.0), 1e-6, 1e-6, false));
    moe_aten::clear_grads(&[w.shallow_clone()]).unwrap();
    assert!(!w.grad().defined(), "the gradient was dropped");
    (&w * &x).sum(Kind::Float).backward();
    assert!(
        w.grad().allclose(&x, 1e-6, 1e-6, false),
        "fresh, not accumulated"
    );
}
