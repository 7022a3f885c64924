//! The decoder family through the same trainer as makeMoE's model: it
//! learns the corpus, and a resumed run repeats the uninterrupted one loss
//! for loss (the aux-free bias and the LR schedule included).

mod common;

use moe_data::CharTokenizer;
use moe_models::{DecoderConfig, DecoderPreset, LmConfig};
use moe_train::{estimate_loss, load_checkpoint, LrSchedule, TrainConfig, Trainer};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device};

/// libtorch's generator is global: tests that seed it run one at a time.
fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 4-layer Mixtral-style model over the corpus' characters.
fn config(vocab_size: i64, preset: DecoderPreset) -> DecoderConfig {
    DecoderConfig {
        vocab_size,
        num_hidden_layers: 4,
        max_position_embeddings: 32,
        ..DecoderConfig::preset(preset)
    }
}

/// Like makeMoE's 300-step test: from ~4.2 (uniform over 65 characters) to
/// below 2.6.
#[test]
fn three_hundred_steps_on_shakespeare_reach_val_loss_below_2_6() {
    let _rng = rng_lock();
    let text = common::corpus();
    let tok = CharTokenizer::from_text(&text).unwrap();
    tch::manual_seed(1337);
    let config = config(tok.vocab_size(), DecoderPreset::Mixtral);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = LmConfig::Decoder(config.clone()).build(&vs.root()).unwrap();
    let data = common::corpus_dataset(&tok, &text, config.max_position_embeddings);
    let train = TrainConfig {
        max_iters: 300,
        eval_interval: 300,
        eval_iters: 40,
        ..TrainConfig::default()
    };
    let before = estimate_loss(model.as_ref(), &data, &train).unwrap();
    assert!(before.val > 3.5, "untrained: {}", before.val);
    Trainer::new(&vs, model.as_ref(), &data, train.clone())
        .unwrap()
        .run(|_| Ok(()))
        .unwrap();
    let after = estimate_loss(model.as_ref(), &data, &train).unwrap();
    assert!(after.val < 2.6, "val loss after 300 steps: {}", after.val);
}

#[test]
fn a_resumed_decoder_run_repeats_the_straight_run() {
    let _rng = rng_lock();
    let text: String = common::corpus().chars().take(20_000).collect();
    let tok = CharTokenizer::from_text(&text).unwrap();
    let dir = std::env::temp_dir().join(format!("moe-decoder-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // DeepSeek-V3's design: the aux-free bias is state outside the
    // gradients that the checkpoint must carry.
    let config = DecoderConfig {
        hidden_size: 32,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: 2,
        max_position_embeddings: 16,
        ..config(tok.vocab_size(), DecoderPreset::DeepseekV3)
    };
    let train = TrainConfig {
        batch_size: 4,
        max_iters: 40,
        eval_interval: 1000,
        eval_iters: 1,
        grad_clip: Some(1.0),
        lr_schedule: LrSchedule::WarmupCosine {
            warmup_iters: 5,
            min_lr: 1e-4,
            decay_iters: None,
        },
        ..TrainConfig::default()
    };
    let data = common::corpus_dataset(&tok, &text, config.max_position_embeddings);
    let run = |seed: i64, resume: bool, steps: i64| {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = LmConfig::Decoder(config.clone()).build(&vs.root()).unwrap();
        let mut trainer = Trainer::new(&vs, model.as_ref(), &data, train.clone()).unwrap();
        if resume {
            trainer.resume(&dir).unwrap();
        }
        let losses: Vec<f64> = (trainer.steps_done()..steps)
            .map(|_| trainer.step().unwrap().double_value(&[]))
            .collect();
        if !resume {
            trainer.save_checkpoint(&dir, &tok.clone().into()).unwrap();
        }
        losses
    };
    let straight = run(7, false, 40);
    let first = run(7, false, 20);
    let second = run(99, true, 40);
    let resumed: Vec<f64> = first.into_iter().chain(second).collect();
    assert_eq!(resumed, straight);

    // The checkpoint loads as a decoder model by itself.
    let loaded = load_checkpoint(&dir, Device::Cpu).unwrap();
    assert_eq!(loaded.meta.model, LmConfig::Decoder(config.clone()));
    assert_eq!(loaded.model.num_moe_layers(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
