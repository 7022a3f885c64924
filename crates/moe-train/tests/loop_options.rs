//! The training loop's options beyond makeMoE's: the learning-rate
//! schedule, gradient clipping, gradient accumulation, weight-decay groups,
//! and callbacks that can stop a run.

mod common;

use approx::assert_relative_eq;
use moe_core::MoeError;
use moe_data::{Dataset, Split};
use moe_models::{CausalLm, MakeMoeConfig, MakeMoeModel};
use moe_routers::{Gate, RouterConfig};
use moe_train::{
    clip_grad_norm, AdamW, AdamWConfig, DecayGroups, LrSchedule, TrainConfig, TrainEvent, Trainer,
};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

/// libtorch's generator is global and the tests of a file run on parallel
/// threads: the tests that seed it and then draw from it take this lock.
static GENERATOR: Mutex<()> = Mutex::new(());

fn generator() -> MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

fn data(block_size: i64) -> Dataset {
    let tokens: Vec<i64> = (0..4000).map(|i| (i * 7 + i / 13) % 20).collect();
    Dataset::new(&tokens, 20, 0.9, block_size, Device::Cpu).unwrap()
}

/// No randomness inside the forward pass (no dropout, no router noise), so
/// that the same batch gives the same gradient whichever way it is fed.
fn deterministic() -> MakeMoeConfig {
    MakeMoeConfig {
        dropout: 0.0,
        router: RouterConfig {
            gate: Gate::TopK {
                norm_topk_prob: true,
            },
            ..RouterConfig::default()
        },
        ..common::tiny_config(20)
    }
}

/// A [`deterministic`] model and its data.
fn setup() -> (nn::VarStore, MakeMoeModel, Dataset) {
    let config = deterministic();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    (vs, model, data(config.block_size))
}

#[test]
fn warmup_cosine_follows_nanogpt_by_hand() {
    let schedule = LrSchedule::WarmupCosine {
        warmup_iters: 10,
        min_lr: 1e-4,
        decay_iters: Some(110),
    };
    let lr = |s| schedule.lr_at(s, 1e-3, 1000);
    assert_relative_eq!(lr(0), 1e-4); // (0 + 1) / 10 of the peak
    assert_relative_eq!(lr(4), 5e-4);
    assert_relative_eq!(lr(10), 1e-3); // cos(0): the peak
    assert_relative_eq!(lr(60), 1e-4 + 0.5 * 9e-4); // halfway: cos(pi / 2) = 0
    assert_relative_eq!(lr(110), 1e-4); // cos(pi): the floor
    assert_relative_eq!(lr(500), 1e-4);
    // Without decay_iters the decay ends at max_iters.
    let to_end = LrSchedule::WarmupCosine {
        warmup_iters: 0,
        min_lr: 0.0,
        decay_iters: None,
    };
    assert_relative_eq!(to_end.lr_at(50, 1.0, 100), 0.5, epsilon = 1e-12);
    assert_relative_eq!(LrSchedule::Constant.lr_at(7, 3e-4, 10), 3e-4);
    let bad = TrainConfig {
        lr_schedule: LrSchedule::WarmupCosine {
            warmup_iters: 10,
            min_lr: 1.0,
            decay_iters: None,
        },
        ..TrainConfig::default()
    };
    assert!(matches!(bad.validate(), Err(MoeError::Config(_))));
}

#[test]
fn the_trainer_sets_the_scheduled_rate_before_each_step() {
    let _generator = generator();
    let (vs, model, data) = setup();
    let train = TrainConfig {
        batch_size: 2,
        max_iters: 4,
        eval_interval: 100,
        eval_iters: 1,
        log_interval: 1,
        lr_schedule: LrSchedule::WarmupCosine {
            warmup_iters: 2,
            min_lr: 0.0,
            decay_iters: Some(4),
        },
        ..TrainConfig::default()
    };
    let mut lrs = Vec::new();
    Trainer::new(&vs, &model, &data, train)
        .unwrap()
        .run(|event| {
            if let TrainEvent::Step { lr, .. } = event {
                lrs.push(*lr);
            }
            Ok(())
        })
        .unwrap();
    // Steps 0..4: warmup (s + 1) / 2, then the cosine from the peak at s = 2
    // to 0 at s = 4: cos(0) at s = 2, 1/2 (1 + cos(pi / 2)) at s = 3.
    let want = [5e-4, 1e-3, 1e-3, 5e-4];
    assert_eq!(lrs.len(), 4);
    for (got, want) in lrs.iter().zip(want) {
        assert_relative_eq!(*got, want, epsilon = 1e-12);
    }
}

#[test]
fn clipping_scales_gradients_to_the_global_norm() {
    let a = Tensor::from_slice(&[1.0f32, 1.0]).set_requires_grad(true);
    let b = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
    // Gradients (3, 0) and (4): global norm 5.
    (&a * Tensor::from_slice(&[3.0f32, 0.0]))
        .sum(Kind::Float)
        .backward();
    (&b * 4.0).sum(Kind::Float).backward();
    let norm = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0);
    assert_relative_eq!(norm.double_value(&[]), 5.0, epsilon = 1e-6);
    assert_relative_eq!(a.grad().double_value(&[0]), 0.6, epsilon = 1e-5);
    assert_relative_eq!(b.grad().double_value(&[0]), 0.8, epsilon = 1e-5);
    // Under the limit nothing changes.
    let norm = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 10.0);
    assert_relative_eq!(norm.double_value(&[]), 1.0, epsilon = 1e-5);
    assert_relative_eq!(a.grad().double_value(&[0]), 0.6, epsilon = 1e-5);
}

#[test]
fn accumulated_micro_batches_step_like_one_batch_of_their_union() {
    let _generator = generator();
    let config = deterministic();
    let data = data(config.block_size);
    let train = TrainConfig {
        batch_size: 4,
        grad_accum_steps: 2,
        grad_clip: Some(0.5),
        ..TrainConfig::default()
    };
    tch::manual_seed(3);
    let vs_a = nn::VarStore::new(Device::Cpu);
    let model_a = MakeMoeModel::new(&vs_a.root(), &config).unwrap();
    let mut vs_b = nn::VarStore::new(Device::Cpu);
    let model_b = MakeMoeModel::new(&vs_b.root(), &config).unwrap();
    vs_b.copy(&vs_a).unwrap();

    let mut trainer = Trainer::new(&vs_a, &model_a, &data, train.clone()).unwrap();
    let loss = trainer.step().unwrap().double_value(&[]);

    // By hand: the same two micro-batches (same seed, same draws) as one
    // batch of 8, one backward of its mean loss, clipped, one AdamW step.
    tch::manual_seed(train.seed);
    let (b1, b2) = (data.batch(Split::Train, 4), data.batch(Split::Train, 4));
    let x = Tensor::cat(&[&b1.x, &b2.x], 0);
    let y = Tensor::cat(&[&b1.y, &b2.y], 0);
    let mut adamw = AdamW::new(
        &vs_b,
        AdamWConfig {
            lr: train.learning_rate,
            weight_decay: train.weight_decay,
            ..Default::default()
        },
    )
    .unwrap();
    let objective = model_b.batch_objective(&x, &y, true).unwrap();
    objective.total.backward();
    let _ = clip_grad_norm(&vs_b.trainable_variables(), 0.5);
    adamw.step().unwrap();

    assert_relative_eq!(loss, objective.total.double_value(&[]), epsilon = 1e-5);
    let (a, b) = (vs_a.variables(), vs_b.variables());
    for (name, value) in &a {
        let diff = (value - &b[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }
}

#[test]
fn matrices_only_decay_leaves_biases_norms_and_embeddings_alone() {
    let _generator = generator();
    let (vs, model, data) = setup();
    let train = TrainConfig {
        weight_decay_on: DecayGroups::Matrices,
        ..TrainConfig::default()
    };
    let trainer = Trainer::new(&vs, &model, &data, train).unwrap();
    let skipped = trainer.optimizer().no_decay_names();
    for name in [
        "tok_emb.weight",
        "pos_emb.weight",
        "ln_f.weight",
        "lm_head.bias",
    ] {
        assert!(
            skipped.contains(&name),
            "{name} should not decay: {skipped:?}"
        );
    }
    assert!(!skipped.contains(&"lm_head.weight"));
    assert!(!skipped.contains(&"blocks.0.moe.experts.w_in"));

    // With a zero gradient, a decayed matrix shrinks by (1 - lr wd) and an
    // undecayed bias does not move.
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().ones("w", &[2, 2]);
    let b = vs.root().ones("b", &[2]);
    let config = AdamWConfig {
        lr: 0.1,
        weight_decay: 0.5,
        ..Default::default()
    };
    let mut adamw = AdamW::with_no_decay(&vs, config, |_, shape| shape.len() < 2).unwrap();
    ((&w.sum(Kind::Float) + b.sum(Kind::Float)) * 0.0).backward();
    adamw.step().unwrap();
    assert_relative_eq!(w.double_value(&[0, 0]), 0.95, epsilon = 1e-6);
    assert_relative_eq!(b.double_value(&[0]), 1.0, epsilon = 1e-6);
}

#[test]
fn a_failing_callback_stops_the_run_with_its_error() {
    let _generator = generator();
    let (vs, model, data) = setup();
    let train = TrainConfig {
        batch_size: 2,
        max_iters: 50,
        eval_iters: 1,
        log_interval: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&vs, &model, &data, train).unwrap();
    let mut seen = Vec::new();
    let err = trainer
        .run(|event| {
            seen.push(event.clone());
            match event {
                TrainEvent::Step { step: 3, .. } => Err(MoeError::Data("disk full".into())),
                _ => Ok(()),
            }
        })
        .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!(trainer.steps_done(), 3);
    assert!(matches!(seen[0], TrainEvent::Start { step: 0, .. }));
    assert!(!seen.iter().any(|e| matches!(e, TrainEvent::End { .. })));
}
