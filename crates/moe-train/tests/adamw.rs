//! Our AdamW against libtorch's (tch's `nn::AdamW`, PyTorch's C++ AdamW).

use moe_train::{AdamW, AdamWConfig};
use std::path::PathBuf;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

/// A small two-layer network's variables and a loss that gives every
/// parameter a non-trivial gradient.
fn store() -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = (&root / "a").randn("w", &[6, 4], 0.0, 1.0);
    let _ = (&root / "b").randn("w", &[3, 6], 0.0, 1.0);
    let _ = (&root / "b").zeros("bias", &[3]);
    vs
}

/// `store()` plus a parameter that the loss never uses, so it never gets a
/// gradient (the per-parameter path of the optimizer).
fn store_with_unused() -> nn::VarStore {
    let vs = store();
    let _ = (vs.root() / "unused").randn("w", &[2, 2], 0.0, 1.0);
    vs
}

fn loss(vs: &nn::VarStore, x: &Tensor) -> Tensor {
    let v = vs.variables();
    let h = x.linear::<Tensor>(&v["a.w"], None).tanh();
    h.linear(&v["b.w"], Some(&v["b.bias"]))
        .pow_tensor_scalar(2)
        .mean(Kind::Float)
}

#[test]
fn tensor_operations_match_libtorch_adamw_step_for_step() {
    let _ = matches_libtorch(store, false);
}

#[test]
fn the_fused_kernel_matches_libtorch_step_for_step() {
    let _ = matches_libtorch(store, true);
}

#[test]
fn skips_a_parameter_without_gradient_like_libtorch() {
    for fused in [true, false] {
        let (vs, initial) = matches_libtorch(store_with_unused, fused);
        assert!(
            vs.variables()["unused.w"].equal(&initial),
            "a parameter without gradient moved (fused: {fused})"
        );
    }
}

/// Runs ours (fused kernel or tensor operations) and libtorch's AdamW side by
/// side for 8 steps; returns ours and the initial value of `unused.w` (if
/// any). Snapshots rather than re-seeding: tests run in parallel threads
/// that share libtorch's generator.
fn matches_libtorch(store: fn() -> nn::VarStore, fused: bool) -> (nn::VarStore, Tensor) {
    tch::manual_seed(3);
    let ours_vs = store();
    let mut theirs_vs = store();
    theirs_vs.copy(&ours_vs).unwrap();
    let config = AdamWConfig {
        lr: 0.05,
        weight_decay: 0.1,
        ..Default::default()
    };
    let initial = ours_vs.variables()["b.w"].copy();
    let unused = ours_vs.variables().get("unused.w").map_or_else(
        || Tensor::zeros([0], (Kind::Float, Device::Cpu)),
        Tensor::copy,
    );
    let mut ours = AdamW::new(&ours_vs, config).unwrap();
    ours.set_fused(fused);
    assert_eq!(ours.fused(), fused);
    let mut theirs = nn::AdamW {
        wd: config.weight_decay,
        ..Default::default()
    }
    .build(&theirs_vs, config.lr)
    .unwrap();
    for step in 0..8 {
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        ours.zero_grad().unwrap();
        loss(&ours_vs, &x).backward();
        ours.step().unwrap();
        theirs.zero_grad();
        loss(&theirs_vs, &x).backward();
        theirs.step();
        let (a, b) = (ours_vs.variables(), theirs_vs.variables());
        for (name, t) in &a {
            let diff = (t - &b[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "step {step}, {name}: differs by {diff}");
        }
    }
    // The parameters moved: the comparison was not between two frozen copies.
    let moved = (&ours_vs.variables()["b.w"] - &initial).abs().max();
    assert!(moved.double_value(&[]) > 1e-3);
    assert_eq!(ours.steps(), 8);
    (ours_vs, unused)
}

#[test]
fn state_round_trips_through_a_file_and_rejects_other_shapes() {
    tch::manual_seed(4);
    let vs = store();
    let mut opt = AdamW::new(&vs, AdamWConfig::default()).unwrap();
    let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
    for _ in 0..3 {
        opt.zero_grad().unwrap();
        loss(&vs, &x).backward();
        opt.step().unwrap();
    }
    let path: PathBuf =
        std::env::temp_dir().join(format!("moe-adamw-{}.safetensors", std::process::id()));
    opt.save(&path).unwrap();

    // Two optimizers in the same state take the same next step.
    let mut vs2 = store();
    vs2.copy(&vs).unwrap();
    let mut restored = AdamW::new(&vs2, AdamWConfig::default()).unwrap();
    restored.load(&path).unwrap();
    assert_eq!(restored.steps(), 3);
    for (o, v) in [(&mut opt, &vs), (&mut restored, &vs2)] {
        o.zero_grad().unwrap();
        loss(v, &x).backward();
        o.step().unwrap();
    }
    assert!(vs.variables()["a.w"].equal(&vs2.variables()["a.w"]));

    let other = nn::VarStore::new(Device::Cpu);
    let _ = (other.root() / "a").zeros("w", &[2, 2]);
    let mut wrong = AdamW::new(&other, AdamWConfig::default()).unwrap();
    let err = wrong.load(&path).unwrap_err().to_string();
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert!(err.contains("`exp_avg.a.w` has shape [6, 4]"), "{err}");
    let _ = std::fs::remove_file(path);
}
