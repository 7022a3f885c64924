//! Our makeMoE model against makeMoE's own PyTorch code, step by step.
//!
//! The test builds the makeMoE preset (8,996,545 parameters, dropout 0),
//! draws a few training batches, and hands both, with the initial weights,
//! to `scripts/makemoe_reference.py --check`, which loads them into the
//! tutorial's modules (per-head attention, `NoisyTopkRouter`, the mask loop
//! over experts) and trains them with `torch.optim.AdamW`, recording each
//! step's loss, every parameter's gradient, the router noise it drew and the
//! experts it chose. Our model then takes the same steps from the same
//! weights with that noise as data ([`moe_routers::with_given_noise`]) and
//! our AdamW, and must route every token to the same experts, with losses
//! and gradients within the bound derived below.
//!
//! Nothing here is a number recorded on one machine: both sides compute in
//! the same process tree on the same CPU, so the test holds on any CPU
//! (and under `ATEN_CPU_CAPABILITY=default|avx2`).
//!
//! ## In f64, and the tolerance
//!
//! Both sides run in f64 ([`moe_core::Precision::Fp64`], the variables
//! converted with `VarStore::double`), so that the comparison checks the
//! functions (model, gradients, optimizer), not how a CPU's f32 kernels
//! round. In f32 that rounding decides discrete events: each step evaluates
//! ~500k ReLU pre-activations per layer, and the one that lies within
//! rounding of zero takes the other side of the kink in one implementation,
//! moving that expert's weight gradient by a whole token's term (~1e-3 of
//! its norm); AdamW then turns the difference into different updates. In
//! f64 (`u = 2^-53`) such an event needs a pre-activation below ~1e-16.
//!
//! Both sides evaluate the same function with different orders of
//! summation (one fused QKV product against 24 per-head ones, a grouped
//! expert product against a masked loop, other BLAS blockings). A sum of
//! `n` products computed in any order has a relative error of at most
//! `gamma_n = n u / (1 - n u)` against the sum of its terms' magnitudes
//! (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
//! §3.1). Taking each stage of the forward pass as adding its own `gamma_n`
//! to first order (LayerNorm before every sub-layer and the residual stream
//! keep each stage's gain near one), the reductions of one block are:
//! LayerNorm statistics (n = C = 128), the QKV projection (128), attention
//! scores (head size 16), the weighted sum of values (T = 32), the output
//! projection (128), LayerNorm (128), the router (128), the expert's input
//! (128) and output (4C = 512) layers and the sum over the k = 2 experts:
//! 1,350 terms; 8 blocks, then LayerNorm (128), the head (128), log-softmax
//! (V = 65) and the mean over the B T = 512 tokens:
//!
//! `eps_f <= (8 * 1350 + 128 + 128 + 65 + 512) u = 11,633 u = 1.3e-12`,
//!
//! a bound on the loss's relative error (the cross-entropy terms are all
//! positive, so the mean's relative error is that of its terms). Backward
//! runs the same reductions transposed, and each weight gradient adds a sum
//! over the 512 tokens: `eps_b <= eps_f + 512 u`. Those bounds hold against
//! the sum of the terms' magnitudes; a weight gradient's token terms differ
//! in sign, so its norm is smaller than that sum: we allow it to be down to
//! `1 / (B T)` of it, so a gradient tensor differs by at most
//! `(eps_f + eps_b) B T = 1.4e-9` of its norm. AdamW's update
//! `m / (sqrt(v) + eps)` carries a gradient's relative error into the
//! weights unchanged, so step `s` (from 0) may differ by `(s + 1)` times the
//! one-step bounds. A wrong layer, scale, bias or layout moves a loss or a
//! gradient by 1e-3 or far more.
//!
//! The routing is exact, not within a tolerance: the reference redraws the
//! noise of any token whose k-th and (k+1)-th noisy logits lie closer than
//! `MIN_ROUTER_GAP`, many orders of magnitude above the rounding error
//! `eps_f |logit|` of logits of size ~10, so both sides pick the same
//! experts.

mod common;

use moe_core::Precision;
use moe_data::{CharTokenizer, Split};
use moe_models::{CausalLm, MakeMoeConfig, MakeMoeModel, Preset};
use moe_train::{AdamW, AdamWConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

const STEPS: i64 = 3;
const LEARNING_RATE: f64 = 1e-3;
const WEIGHT_DECAY: f64 = 0.01;
const MIN_ROUTER_GAP: f64 = 1e-3;

/// `u = 2^-53`, the unit roundoff of f64.
const U: f64 = f64::EPSILON / 2.0;
/// Tokens per batch, `B T`.
const TOKENS: f64 = 16.0 * 32.0;
/// Relative bound on a loss after one step (see the module docs).
const LOSS_BOUND: f64 = (8.0 * 1350.0 + 128.0 + 128.0 + 65.0 + 512.0) * U;
/// Relative bound on a gradient tensor's norm after one step.
const GRAD_BOUND: f64 = (2.0 * LOSS_BOUND + TOKENS * U) * TOKENS;

/// The Python that runs the reference: `MOE_PYTHON`, else the virtual
/// environment `cargo xtask` made (`VIRTUAL_ENV`, whose torch is the
/// libtorch this crate links), else `python3`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MOE_PYTHON") {
        return p.into();
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        return Path::new(&venv).join("bin").join("python");
    }
    "python3".into()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/makemoe_reference.py")
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// `|a - b| / |b|` in the L2 norm (0 when both are zero).
fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).norm().double_value(&[]);
    let norm = b.norm().double_value(&[]);
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

#[test]
fn makemoe_matches_makemoes_pytorch_code_step_by_step() {
    tch::set_num_threads(1);
    let dir = std::env::temp_dir().join(format!("makemoe_pytorch_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The exchanged files (276 MB) leave with the test, passed or failed.
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveOnDrop(dir.clone());

    // Our model at makeMoE's sizes, with makeMoE's quirks and no dropout.
    let text = common::corpus();
    let tok = CharTokenizer::from_text(&text).unwrap();
    tch::manual_seed(1337);
    let config = MakeMoeConfig {
        vocab_size: tok.vocab_size(),
        dropout: 0.0,
        precision: Precision::Fp64,
        ..MakeMoeConfig::preset(Preset::MakeMoe)
    };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    vs.double();
    let parameters: i64 = vs
        .trainable_variables()
        .iter()
        .map(Tensor::numel)
        .sum::<usize>() as i64;
    assert_eq!(
        parameters, 8_996_545,
        "makeMoE reports 8,996,545 parameters"
    );

    // The inputs of the reference: weights, batches, settings.
    // Contiguous copies: the expert banks are column-major, which tch's
    // safetensors writer refuses.
    let init: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.contiguous()))
        .collect();
    Tensor::write_safetensors(&init, dir.join("init.safetensors")).unwrap();
    let data = common::corpus_dataset(&tok, &text, config.block_size);
    let batches: Vec<_> = (0..STEPS).map(|_| data.batch(Split::Train, 16)).collect();
    let named: Vec<(String, Tensor)> = batches
        .iter()
        .enumerate()
        .flat_map(|(s, b)| {
            [
                (format!("x.{s}"), b.x.shallow_clone()),
                (format!("y.{s}"), b.y.shallow_clone()),
            ]
        })
        .collect();
    Tensor::write_safetensors(&named, dir.join("batches.safetensors")).unwrap();
    let check = serde_json::json!({
        "steps": STEPS,
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "noise_seed": 7,
        "min_router_gap": MIN_ROUTER_GAP,
    });
    std::fs::write(dir.join("check.json"), check.to_string()).unwrap();

    let run = Command::new(python())
        .arg(script())
        .arg("--check")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} (the reference needs PyTorch: run the tests through \
                 `cargo xtask test`, or set MOE_PYTHON): {e}",
                python().display()
            )
        });
    assert!(
        run.status.success(),
        "makemoe_reference.py --check failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    assert_eq!(summary["parameters"], 8_996_545, "makeMoE's own count");
    let reference = read(&dir.join("reference.safetensors"));
    let losses = Vec::<f64>::try_from(&reference["loss"]).unwrap();

    // Our steps, with the reference's noise.
    let mut optimizer = AdamW::new(
        &vs,
        AdamWConfig {
            lr: LEARNING_RATE,
            weight_decay: WEIGHT_DECAY,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut worst_loss, mut worst_grad) = (0.0f64, 0.0f64);
    for (step, batch) in batches.iter().enumerate() {
        let noise =
            (0..config.n_layer).map(|l| reference[&format!("noise.{step}.{l}")].shallow_clone());
        optimizer.zero_grad().unwrap();
        let (objective, unused) = moe_routers::with_given_noise(noise, || {
            model.batch_objective(&batch.x, &batch.y, true)
        })
        .unwrap();
        let objective = objective.unwrap();
        assert!(
            unused.is_empty(),
            "step {step}: {} noise draws unused",
            unused.len()
        );
        objective.total.backward();

        for (layer, routing) in objective.routings.iter().enumerate() {
            let (ours, _) = routing.indices().unwrap().sort(-1, false);
            let theirs = &reference[&format!("experts.{step}.{layer}")];
            assert!(
                ours.to_kind(Kind::Int64).equal(theirs),
                "step {step}, layer {layer}: tokens routed to other experts than makeMoE's"
            );
        }

        let bound = (step + 1) as f64;
        let (ours, theirs) = (objective.total.double_value(&[]), losses[step]);
        let loss_rel = (ours - theirs).abs() / theirs;
        assert!(
            loss_rel <= bound * LOSS_BOUND,
            "step {step}: loss {ours} against makeMoE's {theirs} (relative {loss_rel:e} > {:e})",
            bound * LOSS_BOUND
        );
        worst_loss = worst_loss.max(loss_rel);
        for (name, var) in vs.variables() {
            let theirs = reference
                .get(&format!("grad.{step}.{name}"))
                .unwrap_or_else(|| panic!("the reference has no gradient for {name}"));
            let rel = relative_diff(&var.grad(), theirs);
            assert!(
                rel <= bound * GRAD_BOUND,
                "step {step}: gradient of {name} differs by {rel:e} of its norm (> {:e})",
                bound * GRAD_BOUND
            );
            worst_grad = worst_grad.max(rel);
        }
        optimizer.step().unwrap();
        println!("step {step}: loss {ours:.6} (makeMoE {theirs:.6})");
    }
    println!(
        "makeMoE vs its PyTorch code over {STEPS} steps: largest relative loss difference \
         {worst_loss:e} (bound {LOSS_BOUND:e} per step), largest relative gradient difference \
         {worst_grad:e} (bound {GRAD_BOUND:e} per step), min router gap {}",
        summary["min_router_gap"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
