//! Every router, expert shape and balancing scheme inside the language
//! model: the training loss carries the balance losses, the aux-free bias
//! is updated after each step, and evaluations report routing statistics.

mod common;

use moe_data::{Dataset, Split};
use moe_models::{CausalLm, MakeMoeConfig, MakeMoeModel};
use moe_routers::{BalanceLossConfig, Gate, RouterConfig};
use moe_train::{TrainConfig, TrainEvent, Trainer};
use tch::{nn, Device};

fn data(config: &MakeMoeConfig) -> Dataset {
    let tokens: Vec<i64> = (0..4000).map(|i| (i * 7 + i / 13) % 20).collect();
    Dataset::new(&tokens, 20, 0.9, config.block_size, Device::Cpu).unwrap()
}

fn tiny() -> MakeMoeConfig {
    common::tiny_config(20)
}

fn train_config(steps: i64) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        max_iters: steps,
        eval_interval: steps,
        eval_iters: 2,
        ..TrainConfig::default()
    }
}

#[test]
fn the_training_loss_adds_the_configured_balance_losses() {
    tch::manual_seed(0);
    let base = tiny();
    let data = data(&base);
    let batch = data.batch(Split::Train, 4);
    // makeMoE's default: no balance loss, the loss is the cross-entropy.
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &base).unwrap();
    let out = model.batch_objective(&batch.x, &batch.y, false).unwrap();
    assert!(out.aux.is_none());
    assert!(out.total.equal(&out.cross_entropy));

    let config = MakeMoeConfig {
        router: RouterConfig::with_gate(Gate::TopK {
            norm_topk_prob: true,
        }),
        balance: BalanceLossConfig {
            load_balance: 0.5,
            z_loss: 0.1,
            ..Default::default()
        },
        ..base
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    let out = model.batch_objective(&batch.x, &batch.y, false).unwrap();
    // Each layer's loss is >= 0.5 * 1 (the load-balance minimum), two layers.
    let aux = out.aux.as_ref().unwrap().double_value(&[]);
    let want: f64 = out
        .routings
        .iter()
        .map(|r| {
            config
                .balance
                .loss(r, Some(16))
                .unwrap()
                .unwrap()
                .double_value(&[])
        })
        .sum();
    assert!((aux - want).abs() < 1e-6, "{aux} vs {want}");
    assert!(aux >= 2.0 * 0.5 - 1e-6);
    let total = out.total.double_value(&[]);
    assert!((total - out.cross_entropy.double_value(&[]) - aux).abs() < 1e-5);
}

#[test]
fn trainer_steps_update_the_aux_free_bias() {
    tch::manual_seed(1);
    let config = MakeMoeConfig {
        router: RouterConfig {
            bias: false,
            ..RouterConfig::with_gate(Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: 0.01,
                n_group: 1,
                topk_group: 1,
            })
        },
        ..tiny()
    };
    let data = data(&config);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    let bias_name = "blocks.0.moe.router.expert_bias";
    let before = vs.variables()[bias_name].copy();
    let mut trainer = Trainer::new(&vs, &model, &data, train_config(3)).unwrap();
    let _loss = trainer.step().unwrap();
    let after = vs.variables()[bias_name].copy();
    // Every entry moved by exactly +-gamma (or 0 for an expert at the mean load).
    let moved = (&after - &before).abs();
    assert!(moved.max().double_value(&[]) <= 0.01 + 1e-7);
    assert!(moved.sum(tch::Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn every_design_trains_and_reports_routing_stats_at_evaluations() {
    let designs = [
        ("top_k", 1, 0, None),
        ("noisy_top_k", 1, 0, Some(1.0)),
        ("attention", 1, 0, None),
        ("deepseek_moe", 2, 1, None),
        ("sigmoid_aux_free", 1, 0, None),
        ("expert_choice", 1, 0, None),
    ];
    for (router, segments, shared, capacity) in designs {
        tch::manual_seed(2);
        let config = MakeMoeConfig {
            router: RouterConfig {
                capacity_factor: capacity,
                ..RouterConfig::with_gate(router.parse().unwrap())
            },
            segments,
            shared_experts: shared,
            balance: BalanceLossConfig::switch(),
            ..tiny()
        };
        let data = data(&config);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
        let mut evals = 0;
        let last = Trainer::new(&vs, &model, &data, train_config(3))
            .unwrap()
            .run(|event| {
                if let TrainEvent::Eval { routing: stats, .. } = event {
                    assert_eq!(stats.len(), config.n_layer as usize);
                    for s in stats {
                        let routed = config.moe_config().unwrap().num_experts as usize;
                        assert_eq!(s.tokens_per_expert.len(), routed);
                        assert!(s.cv.is_finite() && s.mean_entropy > 0.0);
                        if capacity.is_none() {
                            assert_eq!(s.dropped_fraction, 0.0);
                        }
                        if router == "expert_choice" {
                            // Every expert takes as many tokens at each position.
                            assert_eq!(s.cv, 0.0, "{s:?}");
                        }
                    }
                    evals += 1;
                }
                Ok(())
            })
            .unwrap()
            .unwrap();
        assert!(last.val.is_finite(), "{router}");
        assert_eq!(
            evals, 2,
            "{router}: evaluations at step 0 and the last step"
        );
    }
}
