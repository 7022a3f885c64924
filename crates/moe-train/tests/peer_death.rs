//! A training step under expert parallelism whose peer dies between the
//! forward and the backward pass: the survivor's `Trainer::step` returns a
//! `MoeError::Distributed` from the backward's all-to-all within the
//! group's timeout, instead of tch's `backward` panicking. Rank 1 is this
//! test binary run again, which takes part in the parameter broadcast and
//! the forward pass and then exits, as a crashed or killed process does.

#[path = "common.rs"]
mod common;

use moe_aten::dist::{Group, GroupOptions, LaunchEnv};
use moe_core::MoeError;
use moe_data::{CharTokenizer, Dataset, Split};
use moe_dispatch::{ExchangeMode, ExpertParallelism};
use moe_models::{CausalLm, DecoderConfig, DecoderModel};
use moe_train::{DataParallel, TrainConfig, Trainer};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{nn, Device};

const TEST: &str = "a_peer_that_dies_after_the_forward_fails_the_step_within_the_timeout";
const PEER: &str = "MOE_PEER_DEATH_PORT";
const TIMEOUT: Duration = Duration::from_secs(5);

fn model_config(vocab_size: i64) -> DecoderConfig {
    common::small_mixtral(vocab_size)
}

fn train_config() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        max_iters: 5,
        eval_interval: 5,
        eval_iters: 1,
        ..TrainConfig::default()
    }
}

/// This rank's model, dataset and data-parallel handle over a TCPStore on
/// 127.0.0.1:`port`.
fn rank(rank: i64, port: u16) -> (nn::VarStore, DecoderModel, Dataset, DataParallel) {
    let launch = LaunchEnv {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world_size: 2,
        local_rank: rank,
        agent_store: false,
    };
    let options = GroupOptions {
        timeout: TIMEOUT,
        ..GroupOptions::default()
    };
    let group = Arc::new(Mutex::new(Group::from_launch(&launch, &options).unwrap()));
    let text: String = common::corpus().chars().take(5_000).collect();
    let tok = CharTokenizer::from_text(&text).unwrap();
    let data = common::corpus_dataset(&tok, &text, 16);
    let parallelism = ExpertParallelism {
        group: group.clone(),
        mode: ExchangeMode::Dropless,
    };
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = model_config(tok.vocab_size());
    let model = DecoderModel::with_parallelism(&vs.root(), &config, Some(&parallelism)).unwrap();
    let dp = DataParallel::new(group, &vs, &model);
    (vs, model, data, dp)
}

#[test]
fn a_peer_that_dies_after_the_forward_fails_the_step_within_the_timeout() {
    tch::set_num_threads(1);
    if let Ok(port) = std::env::var(PEER) {
        // Rank 1: the broadcast of the replicated weights, one forward
        // pass with its collectives, then gone without a destructor.
        let (vs, model, data, dp) = rank(1, port.parse().unwrap());
        let _trainer = Trainer::new(&vs, &model, &data, train_config())
            .unwrap()
            .with_data_parallel(dp)
            .unwrap();
        let batch = data.batch(Split::Train, train_config().batch_size);
        model.batch_objective(&batch.x, &batch.y, true).unwrap();
        std::process::exit(0);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut peer = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
        .env(PEER, port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (vs, model, data, dp) = rank(0, port);
    let mut trainer = Trainer::new(&vs, &model, &data, train_config())
        .unwrap()
        .with_data_parallel(dp)
        .unwrap();
    let start = Instant::now();
    let result = trainer.step();
    let took = start.elapsed();
    let status = peer.wait().unwrap();
    assert!(
        status.success(),
        "the peer failed before its exit: {status}"
    );
    let err = result.expect_err("a step without its peer succeeded");
    let message = err.to_string();
    println!("after {took:?}: {message}");
    assert!(matches!(err, MoeError::Distributed(_)), "{err:?}");
    // The forward pass went through with the peer; the backward's
    // all-to-all is what failed.
    assert!(
        message.contains("backward pass") && message.contains("all_to_all backward on rank 0"),
        "{message}"
    );
    assert!(
        took < TIMEOUT + Duration::from_secs(20),
        "{took:?}: {message}"
    );
    assert_eq!(trainer.steps_done(), 0, "the failed step is not counted");
}
