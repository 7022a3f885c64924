//! The makeMoE model's numbers must not move when the code around it does:
//! a fixed-seed 50-step training run of the makeMoE preset (one thread, so
//! that BLAS sums in one order) gives the loss sequence recorded in
//! `tests/data/makemoe_50_losses.json` before the workspace was split into
//! model, data and training crates. `MOE_RECORD_LOSSES=1` rewrites the file.

mod common;

use moe_data::CharTokenizer;
use moe_models::{MakeMoeConfig, MakeMoeModel, Preset};
use moe_train::{TrainConfig, Trainer};
use tch::{nn, Device};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/makemoe_50_losses.json"
);

#[test]
fn makemoe_preset_fifty_step_losses_match_the_recorded_sequence() {
    tch::set_num_threads(1);
    let text = common::corpus();
    let tok = CharTokenizer::from_text(&text).unwrap();
    tch::manual_seed(1337);
    let config = MakeMoeConfig {
        vocab_size: tok.vocab_size(),
        ..MakeMoeConfig::preset(Preset::MakeMoe)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    let data = common::corpus_dataset(&tok, &text, config.block_size);
    let mut trainer = Trainer::new(&vs, &model, &data, TrainConfig::default()).unwrap();
    let losses: Vec<f64> = (0..50)
        .map(|_| trainer.step().unwrap().double_value(&[]))
        .collect();
    if std::env::var_os("MOE_RECORD_LOSSES").is_some() {
        std::fs::write(FIXTURE, serde_json::to_string_pretty(&losses).unwrap()).unwrap();
    }
    let recorded: Vec<f64> =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    assert_eq!(losses.len(), recorded.len());
    let max_diff = losses
        .iter()
        .zip(&recorded)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("50 makeMoE losses: max |now - recorded| = {max_diff:e}");
    for (step, (now, then)) in losses.iter().zip(&recorded).enumerate() {
        assert!(
            (now - then).abs() <= 1e-5,
            "step {step}: loss {now} now, {then} recorded"
        );
    }
}
