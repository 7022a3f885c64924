//! Data parallelism beside expert parallelism, ranks as threads of this
//! process over c10d's Gloo: 20 steps on 2 ranks give, loss by loss, what
//! one process computes on the same global batches; the checkpoint holds
//! the whole model (a single process loads it) and a run resumed from it on
//! the same ranks goes on as the uninterrupted one.

#[path = "common.rs"]
mod common;

use moe_aten::dist::{Group, GroupOptions};
use moe_data::{CharTokenizer, Tokenizer};
use moe_dispatch::{ExchangeMode, ExpertParallelism};
use moe_models::{CausalLm, DecoderConfig, DecoderModel};
use moe_train::{load_checkpoint, Checkpointing, DataParallel, TrainConfig, TrainEvent, Trainer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tch::{nn, Device, Tensor};

const P: i64 = 2;

/// The tests of this file draw from libtorch's one generator: one at a time.
static RNG: Mutex<()> = Mutex::new(());

fn model_config(vocab_size: i64) -> DecoderConfig {
    DecoderConfig {
        router_aux_loss_coef: 0.01,
        ..common::small_mixtral(vocab_size)
    }
}

fn train_config(max_iters: i64) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        max_iters,
        eval_interval: 10,
        eval_iters: 2,
        learning_rate: 3e-3,
        grad_clip: Some(1.0),
        log_interval: 1,
        ..TrainConfig::default()
    }
}

/// The model every run starts from: seed 3's initialisation.
fn initial(config: &DecoderConfig) -> BTreeMap<String, Tensor> {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    DecoderModel::new(&vs.root(), config).unwrap();
    vs.variables().into_iter().collect()
}

fn step_losses(events: &[TrainEvent]) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect()
}

/// One process on the global batches of `P` ranks.
fn reference(text: &str, steps: i64) -> (Vec<f64>, DecoderModel, nn::VarStore) {
    let tok = CharTokenizer::from_text(text).unwrap();
    let data = common::corpus_dataset(&tok, text, 16);
    let config = model_config(tok.vocab_size());
    let weights = initial(&config);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DecoderModel::new(&vs.root(), &config).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(&weights[&name]);
        }
    });
    let mut events = Vec::new();
    Trainer::new(&vs, &model, &data, train_config(steps))
        .unwrap()
        .with_simulated_ranks(P)
        .unwrap()
        .run(|e| {
            events.push(e.clone());
            Ok(())
        })
        .unwrap();
    (step_losses(&events), model, vs)
}

/// This rank's share of `config`'s model, its experts spread over
/// `group` (dropless exchange), with the model's data parallelism.
fn rank_model(
    group: Arc<Mutex<Group>>,
    config: &DecoderConfig,
) -> (nn::VarStore, DecoderModel, DataParallel) {
    let parallelism = ExpertParallelism {
        group: group.clone(),
        mode: ExchangeMode::Dropless,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DecoderModel::with_parallelism(&vs.root(), config, Some(&parallelism)).unwrap();
    let dp = DataParallel::new(group, &vs, &model);
    (vs, model, dp)
}

/// Rank `rank` of a parallel run: `steps` steps, optionally resumed from
/// and checkpointing into `dir`; rank 0's events.
fn rank_run(
    group: Group,
    text: String,
    weights: Vec<(String, Tensor)>,
    steps: i64,
    dir: PathBuf,
    resume: bool,
) -> Vec<TrainEvent> {
    let rank = group.rank();
    let tok = CharTokenizer::from_text(&text).unwrap();
    let data = common::corpus_dataset(&tok, &text, 16);
    let config = model_config(tok.vocab_size());
    let (vs, model, dp) = rank_model(Arc::new(Mutex::new(group)), &config);
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, value) in &weights {
            vars[name]
                .shallow_clone()
                .copy_(&dp.shard_of(name, value).unwrap());
        }
    });
    let mut trainer = Trainer::new(&vs, &model, &data, train_config(steps))
        .unwrap()
        .with_data_parallel(dp)
        .unwrap()
        .with_checkpointing(Checkpointing {
            dir: dir.clone(),
            interval: 10,
            tokenizer: Tokenizer::Char(tok),
        })
        .unwrap();
    if resume {
        trainer.resume(&dir).unwrap();
    }
    let mut events = Vec::new();
    trainer
        .run(|e| {
            assert_eq!(rank, 0, "only rank 0 reports");
            events.push(e.clone());
            Ok(())
        })
        .unwrap();
    events
}

/// Runs `P` ranks as threads; rank 0's events.
fn parallel_run(text: &str, steps: i64, dir: &Path, resume: bool) -> Vec<TrainEvent> {
    let config = model_config(CharTokenizer::from_text(text).unwrap().vocab_size());
    let groups = Group::in_process(
        P,
        &GroupOptions {
            timeout: std::time::Duration::from_secs(120),
            ..GroupOptions::default()
        },
    )
    .unwrap();
    let inputs: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let weights: Vec<(String, Tensor)> = initial(&config)
                .into_iter()
                .map(|(n, t)| (n, t.detach().copy()))
                .collect();
            (g, weights)
        })
        .collect();
    let results: Vec<Vec<TrainEvent>> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .into_iter()
            .map(|(g, weights)| {
                let (text, dir) = (text.to_string(), dir.to_path_buf());
                scope.spawn(move || rank_run(g, text, weights, steps, dir, resume))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    results.into_iter().next().unwrap()
}

#[test]
fn two_ranks_train_as_one_process_on_the_same_global_batches() {
    let _rng = RNG.lock().unwrap_or_else(|p| p.into_inner());
    let text: String = common::corpus().chars().take(20_000).collect();
    let dir = std::env::temp_dir().join(format!("moe-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (want, model, vs) = reference(&text, 20);
    let events = parallel_run(&text, 20, &dir, false);
    let got = step_losses(&events);
    assert_eq!(got.len(), 20);
    for (step, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() < 1e-4,
            "step {}: {a} on 2 ranks, {b} in one process",
            step + 1
        );
    }
    assert!(want[19] < want[0] - 0.2, "it learns: {want:?}");
    // Rank 0 reports global routing loads: tokens of both ranks.
    let loads = events.iter().find_map(|e| match e {
        TrainEvent::Eval { routing, .. } => Some(routing[0].tokens_per_expert.iter().sum::<i64>()),
        _ => None,
    });
    assert!(loads.is_some_and(|slots| slots > 0));

    // The checkpoint holds the whole model: one process loads it and
    // computes what the reference computes.
    let loaded = load_checkpoint(&dir, Device::Cpu).unwrap();
    assert_eq!(loaded.meta.step, 20);
    // The ranks held half of each bank; the file holds them whole.
    let whole = loaded.vs.variables();
    let experts = model.config().num_local_experts;
    let banks = (0..model.config().num_hidden_layers)
        .flat_map(|i| {
            ["w_gate", "w_in", "w_out"].map(|w| format!("model.layers.{i}.mlp.experts.{w}"))
        })
        .filter(|name| whole.get(name).is_some_and(|t| t.size()[0] == experts))
        .count();
    assert_eq!(banks, 2 * 3, "two layers of w_gate, w_in, w_out");
    let idx = Tensor::from_slice(&[1i64, 5, 9, 3, 7, 2]).view([2, 3]);
    let a = tch::no_grad(|| model.forward_t(&idx, false))
        .unwrap()
        .logits;
    let b = tch::no_grad(|| loaded.model.forward_t(&idx, false))
        .unwrap()
        .logits;
    let diff = (a - b).abs().max().double_value(&[]);
    assert!(
        diff < 1e-3,
        "logits of the loaded checkpoint differ by {diff}"
    );
    drop(vs);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resumed_parallel_run_goes_on_as_the_uninterrupted_one() {
    let _rng = RNG.lock().unwrap_or_else(|p| p.into_inner());
    let text: String = common::corpus().chars().take(20_000).collect();
    let dir = std::env::temp_dir().join(format!("moe-dp-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (want, _, _) = reference(&text, 20);
    let first = step_losses(&parallel_run(&text, 10, &dir, false));
    let rest = step_losses(&parallel_run(&text, 20, &dir, true));
    assert_eq!(first.len() + rest.len(), 20);
    for (step, (a, b)) in first.iter().chain(&rest).zip(&want).enumerate() {
        assert!(
            (a - b).abs() < 1e-4,
            "step {}: {a} resumed, {b} straight",
            step + 1
        );
    }
    for rank in 0..P {
        assert!(dir
            .join(format!("optimizer.rank{rank}.safetensors"))
            .is_file());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The expert shards are what the layers register, not what the names
/// look like: a model without expert parallelism has none (its banks,
/// named `...mlp.experts.w_in`, are replicated like any variable), one
/// with it has its routed banks, and not its shared experts.
#[test]
fn expert_shards_are_registered_by_their_layers() {
    let _rng = RNG.lock().unwrap_or_else(|p| p.into_inner());
    let config = DecoderConfig {
        n_shared_experts: 1,
        ..model_config(30)
    };
    let group = Group::in_process(1, &GroupOptions::default())
        .unwrap()
        .pop()
        .unwrap();
    let group = Arc::new(Mutex::new(group));
    let vs = nn::VarStore::new(Device::Cpu);
    let plain = DecoderModel::new(&vs.root(), &config).unwrap();
    let dp = DataParallel::new(group.clone(), &vs, &plain);
    assert!(vs
        .variables()
        .keys()
        .any(|n| n.ends_with("mlp.experts.w_in")));
    assert!(vs.variables().keys().all(|n| !dp.is_expert_shard(n)));

    let (vs, _sharded, dp) = rank_model(group, &config);
    let mut shards: Vec<String> = vs
        .variables()
        .into_keys()
        .filter(|n| dp.is_expert_shard(n))
        .collect();
    shards.sort();
    let want: Vec<String> = (0..config.num_hidden_layers)
        .flat_map(|i| {
            ["w_gate", "w_in", "w_out"].map(|w| format!("model.layers.{i}.mlp.experts.{w}"))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(shards, want);
}

/// Each rank draws only its share of the model, and the shares are the
/// model one process draws with the same seed: the replicated variables
/// equal, each rank's expert banks the rows of the whole banks it owns.
#[test]
fn each_rank_draws_its_share_of_the_model_one_process_draws() {
    let _rng = RNG.lock().unwrap_or_else(|p| p.into_inner());
    let config = model_config(40);
    let whole = initial(&config);
    let groups = Group::in_process(P, &GroupOptions::default()).unwrap();
    // The ranks draw from the process's one generator: one after the other.
    let drawing = Mutex::new(());
    let shares: Vec<i64> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let whole: BTreeMap<String, Tensor> = (whole.iter())
                    .map(|(n, t)| (n.clone(), t.detach().copy()))
                    .collect();
                let (config, drawing) = (&config, &drawing);
                scope.spawn(move || {
                    let (vs, _model, dp) = {
                        let _turn = drawing.lock().unwrap();
                        tch::manual_seed(3);
                        rank_model(Arc::new(Mutex::new(group)), config)
                    };
                    let mut sharded = 0;
                    for (name, value) in vs.variables() {
                        let want = dp.shard_of(&name, &whole[&name]).unwrap();
                        sharded += i64::from(want.size() != whole[&name].size());
                        assert!(
                            value.size() == want.size() && value.equal(&want),
                            "{name} on rank {}",
                            dp.rank()
                        );
                    }
                    sharded
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Two MoE layers of w_gate, w_in and w_out on each rank.
    assert_eq!(shares, vec![6; P as usize]);
}
