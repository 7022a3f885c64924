//! Training checkpoints: resuming gives the uninterrupted run's losses, bad
//! checkpoints are clear errors that change nothing, divergence stops.

mod common;

use common::tiny_config;
use moe_core::MoeError;
use moe_data::{CharTokenizer, Dataset, Tokenizer};
use moe_models::MakeMoeModel;
use moe_train::{Checkpointing, TrainConfig, Trainer, OPTIMIZER_FILE, WEIGHTS_FILE};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Tensor};

/// libtorch's generator is global: tests that seed it run one at a time.
fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const TEXT: &str =
    "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

struct Setup {
    vs: nn::VarStore,
    model: MakeMoeModel,
    data: Dataset,
    tokenizer: Tokenizer,
}

fn setup(seed: i64) -> Setup {
    let corpus = TEXT.repeat(20);
    let tok = CharTokenizer::from_text(&corpus).unwrap();
    tch::manual_seed(seed);
    // Smaller than tiny_config: 400 steps must take seconds.
    let config = moe_models::MakeMoeConfig {
        n_embd: 16,
        n_head: 2,
        n_layer: 1,
        block_size: 8,
        ..tiny_config(tok.vocab_size())
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    let data = common::corpus_dataset(&tok, &corpus, config.block_size);
    Setup {
        vs,
        model,
        data,
        tokenizer: tok.into(),
    }
}

fn train_config(max_iters: i64) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        max_iters,
        eval_interval: 1000,
        eval_iters: 1,
        ..TrainConfig::default()
    }
}

/// The loss of every step from the trainer's current step to `max_iters`.
fn losses(trainer: &mut Trainer<MakeMoeModel>, max_iters: i64) -> Vec<f64> {
    (trainer.steps_done()..max_iters)
        .map(|_| trainer.step().unwrap().double_value(&[]))
        .collect()
}

#[test]
fn resuming_at_step_100_gives_the_losses_of_200_straight_steps() {
    let _lock = rng_lock();
    let dir = temp_dir("exact");
    let straight = {
        let s = setup(21);
        let mut t = Trainer::new(&s.vs, &s.model, &s.data, train_config(200)).unwrap();
        losses(&mut t, 200)
    };
    let first_half = {
        let s = setup(21);
        let mut t = Trainer::new(&s.vs, &s.model, &s.data, train_config(200)).unwrap();
        let l = losses(&mut t, 100);
        t.save_checkpoint(&dir, &s.tokenizer).unwrap();
        l
    };
    // A fresh process: other initial weights, the checkpoint restores them.
    let s = setup(999);
    let mut t = Trainer::new(&s.vs, &s.model, &s.data, train_config(200)).unwrap();
    t.resume(&dir).unwrap();
    assert_eq!(t.steps_done(), 100);
    let second_half = losses(&mut t, 200);
    let resumed: Vec<f64> = first_half.into_iter().chain(second_half).collect();
    assert_eq!(resumed.len(), 200);
    assert_eq!(resumed, straight);
    assert!(
        straight[199] < straight[0] - 0.5,
        "the model learned nothing"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn file_bytes(dir: &Path) -> Vec<Vec<u8>> {
    [WEIGHTS_FILE, OPTIMIZER_FILE, "config.json"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

fn params(vs: &nn::VarStore) -> Vec<Tensor> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter().map(|(_, t)| t.copy()).collect()
}

#[test]
fn bad_checkpoints_are_errors_that_name_the_file_and_change_nothing() {
    let _lock = rng_lock();
    let dir = temp_dir("bad");
    let s = setup(5);
    let mut t = Trainer::new(&s.vs, &s.model, &s.data, train_config(10)).unwrap();
    losses(&mut t, 3);
    t.save_checkpoint(&dir, &s.tokenizer).unwrap();
    let saved = file_bytes(&dir);

    let other = setup(6);
    let mut fresh = Trainer::new(&other.vs, &other.model, &other.data, train_config(10)).unwrap();
    let before = params(&other.vs);
    let unchanged = |fresh: &Trainer<MakeMoeModel>| {
        assert_eq!(fresh.steps_done(), 0);
        for (a, b) in before.iter().zip(params(&other.vs)) {
            assert!(a.equal(&b), "a failed resume changed the weights");
        }
    };

    // Truncated optimizer state.
    let opt = dir.join(OPTIMIZER_FILE);
    std::fs::write(&opt, &saved[1][..saved[1].len() / 3]).unwrap();
    let err = fresh.resume(&dir).unwrap_err();
    assert!(matches!(err, MoeError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains(OPTIMIZER_FILE), "{err}");
    unchanged(&fresh);
    std::fs::write(&opt, &saved[1]).unwrap();

    // Corrupt weights.
    let weights = dir.join(WEIGHTS_FILE);
    let mut garbage = saved[0].clone();
    garbage[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&weights, &garbage).unwrap();
    let err = fresh.resume(&dir).unwrap_err().to_string();
    assert!(err.contains(WEIGHTS_FILE), "{err}");
    unchanged(&fresh);
    std::fs::write(&weights, &saved[0]).unwrap();

    // A checkpoint of another model.
    let mut meta: serde_json::Value = serde_json::from_slice(&saved[2]).unwrap();
    meta["model"]["n_layer"] = 3.into();
    std::fs::write(dir.join("config.json"), meta.to_string()).unwrap();
    let err = fresh.resume(&dir).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("n_layer: 3 (checkpoint) vs 1 (model)"),
        "{err}"
    );
    unchanged(&fresh);

    // A config from another step than the optimizer state (interrupted save).
    meta["model"]["n_layer"] = 1.into();
    meta["step"] = 7.into();
    std::fs::write(dir.join("config.json"), meta.to_string()).unwrap();
    let err = fresh.resume(&dir).unwrap_err().to_string();
    assert!(
        err.contains("from step 3 but config.json says step 7"),
        "{err}"
    );
    unchanged(&fresh);

    std::fs::write(dir.join("config.json"), &saved[2]).unwrap();
    fresh.resume(&dir).unwrap();
    assert_eq!(fresh.steps_done(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_nan_stops_training_and_keeps_the_last_good_checkpoint() {
    let _lock = rng_lock();
    let dir = temp_dir("nan");
    let s = setup(8);
    let mut cfg = train_config(40);
    cfg.log_interval = 1;
    let trainer = Trainer::new(&s.vs, &s.model, &s.data, cfg).unwrap();
    let mut trainer = trainer
        .with_checkpointing(Checkpointing {
            dir: dir.clone(),
            interval: 10,
            tokenizer: s.tokenizer.clone(),
        })
        .unwrap();
    let poison = s.vs.variables()["lm_head.bias"].shallow_clone();
    let err = trainer
        .run(|event| {
            if let moe_train::TrainEvent::Step { step: 15, .. } = event {
                tch::no_grad(|| {
                    let _ = poison.shallow_clone().fill_(f64::NAN);
                });
            }
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, MoeError::Diverged(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("NaN") && msg.contains("step 10"), "{msg}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 10);
    let loaded = moe_train::load_checkpoint(&dir, Device::Cpu).unwrap();
    let bias = &loaded.vs.variables()["lm_head.bias"];
    assert!(bias.isfinite().all().int64_value(&[]) == 1);
    let _ = std::fs::remove_dir_all(&dir);
}
