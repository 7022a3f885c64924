//! Under expert parallelism each rank holds `E / P` experts of every bank:
//! the trainer's start event still counts the whole model (what one process
//! holding every expert counts) and the active parameters per token from
//! it, for makeMoE and for the decoder family, ranks as threads over Gloo.

#[path = "common.rs"]
mod common;

use common::tiny_config;
use moe_aten::dist::{Group, GroupOptions};
use moe_data::CharTokenizer;
use moe_dispatch::{ExchangeMode, ExpertParallelism};
use moe_models::{DecoderConfig, LmConfig};
use moe_train::{parameter_count, DataParallel, TrainConfig, TrainEvent, Trainer};
use std::sync::{Arc, Mutex};
use tch::{nn, Device};

const P: i64 = 2;

fn decoder(vocab_size: i64) -> DecoderConfig {
    common::small_mixtral(vocab_size)
}

/// Rank `group.rank()`'s trainer over `config`: its own parameter count
/// and, on rank 0, the start event's counts.
fn rank_counts(group: Group, config: &LmConfig, text: &str) -> (i64, Option<(i64, i64)>) {
    let rank = group.rank();
    let group = Arc::new(Mutex::new(group));
    let parallelism = ExpertParallelism {
        group: group.clone(),
        mode: ExchangeMode::Dropless,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = LmConfig::build_with(config, &vs.root(), Some(&parallelism)).unwrap();
    let tok = CharTokenizer::from_text(text).unwrap();
    let data = common::corpus_dataset(&tok, text, 16);
    let train = TrainConfig {
        batch_size: 2,
        max_iters: 1,
        eval_interval: 1,
        eval_iters: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&vs, model.as_ref(), &data, train)
        .unwrap()
        .with_data_parallel(DataParallel::new(group, &vs, model.as_ref()))
        .unwrap();
    let mut start = None;
    trainer
        .run(|event| {
            if let TrainEvent::Start {
                parameters,
                active_parameters,
                ..
            } = event
            {
                start = Some((*parameters, *active_parameters));
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(start.is_some(), rank == 0, "only rank 0 reports");
    (parameter_count(&vs), start)
}

#[test]
fn the_start_event_counts_every_ranks_experts() {
    let text: String = common::corpus().chars().take(3_000).collect();
    let vocab_size = CharTokenizer::from_text(&text).unwrap().vocab_size();
    let configs = [
        LmConfig::MakeMoe(tiny_config(vocab_size)),
        LmConfig::Decoder(decoder(vocab_size)),
    ];
    for config in &configs {
        let whole = nn::VarStore::new(Device::Cpu);
        config.build(&whole.root()).unwrap();
        let total = parameter_count(&whole);
        let active = config.active_params(total).unwrap();
        assert!(0 < active && active < total, "{active} of {total}");

        let groups = Group::in_process(
            P,
            &GroupOptions {
                timeout: std::time::Duration::from_secs(60),
                ..GroupOptions::default()
            },
        )
        .unwrap();
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|g| {
                    let text = &text;
                    scope.spawn(move || rank_counts(g, config, text))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let family = config.family();
        // Each rank alone holds fewer parameters than the model...
        for (local, _) in &results {
            assert!(*local < total, "{family}: a rank holds {local} of {total}");
        }
        // ...but the start event counts all of them, and the active ones from that.
        assert_eq!(results[0].1, Some((total, active)), "{family}");
    }
}
