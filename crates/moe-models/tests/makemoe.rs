#[path = "../../moe-train/tests/common.rs"]
mod common;

use common::tiny_config;
use moe_core::{DeviceChoice, MoeError};
use moe_data::{CharTokenizer, Dataset};
use moe_dispatch::{DispatchKind, DispatchSpec};
use moe_models::{generate, CausalLm, MakeMoeConfig, MakeMoeModel, Preset, Sampling};
use moe_routers::{Gate, RouterConfig};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn makemoe_config_has_8_996_545_parameters() {
    for preset in [Preset::MakeMoe, Preset::Default] {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = MakeMoeConfig {
            vocab_size: 65,
            ..MakeMoeConfig::preset(preset)
        };
        MakeMoeModel::new(&vs.root(), &config).unwrap();
        assert_eq!(parameter_count(&vs), 8_996_545, "{preset:?}");
        // 6 of 8 experts idle per token in each of the 8 layers.
        let idle = 8 * 6 * (2 * 128 * 512 + 512 + 128);
        assert_eq!(config.active_params(8_996_545).unwrap(), 8_996_545 - idle);
    }
}

#[test]
fn the_makemoe_preset_adds_router_noise_at_evaluation_and_dispatch_specs_set_capacity() {
    let preset = MakeMoeConfig::preset(Preset::MakeMoe);
    assert_eq!(
        preset.router.gate,
        Gate::NoisyTopK {
            noise_at_eval: true,
            norm_topk_prob: true,
        }
    );
    assert_eq!(
        MakeMoeConfig::preset(Preset::Default).router,
        RouterConfig::default()
    );
    // A preset only touches the noise of a noisy gate.
    let mut top_k = MakeMoeConfig {
        router: RouterConfig::with_gate(Gate::Attention {
            norm_topk_prob: true,
        }),
        ..MakeMoeConfig::default()
    };
    top_k.apply_preset(Preset::MakeMoe);
    assert_eq!(
        top_k.router.gate,
        Gate::Attention {
            norm_topk_prob: true,
        }
    );
    // `--dispatch capacity:0.5` sets the strategy and the router's factor.
    let mut config = MakeMoeConfig::default();
    config.set_dispatch("capacity:0.5".parse::<DispatchSpec>().unwrap());
    assert_eq!(config.dispatch, DispatchKind::Capacity);
    assert_eq!(config.router.capacity_factor, Some(0.5));
    let moe = config.moe_config().unwrap();
    assert_eq!(moe.router.capacity_factor, Some(0.5));
    assert!(config.validate().is_ok());
}

#[test]
fn changing_token_t_never_changes_logits_before_t() {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), tiny_config(20)).unwrap();
    let idx = Tensor::randint(20, [2, 16], (Kind::Int64, Device::Cpu));
    let logits = model.forward_t(&idx, false).unwrap().logits;
    for t in [0i64, 7, 15] {
        let changed = idx.copy();
        let old = changed.int64_value(&[0, t]);
        let _ = changed.narrow(1, t, 1).fill_((old + 1) % 20);
        let logits2 = model.forward_t(&changed, false).unwrap().logits;
        if t > 0 {
            let before = (logits.narrow(1, 0, t) - logits2.narrow(1, 0, t))
                .abs()
                .max()
                .double_value(&[]);
            assert!(before < 1e-5, "logits before {t} changed by {before}");
        }
        let at = (logits.narrow(1, t, 1) - logits2.narrow(1, t, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(at > 1e-4, "position {t} ignored its own token");
    }
}

#[test]
fn bad_token_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), tiny_config(20)).unwrap();
    let too_big = Tensor::from_slice(&[1i64, 2, 20]).view([1, 3]);
    match model.forward_t(&too_big, false) {
        Err(MoeError::TokenOutOfVocab {
            id: 20,
            vocab_size: 20,
        }) => {}
        other => panic!("expected TokenOutOfVocab, got {other:?}"),
    }
    let negative = Tensor::from_slice(&[-1i64, 2]).view([1, 2]);
    assert!(matches!(
        model.forward_t(&negative, false),
        Err(MoeError::TokenOutOfVocab { id: -1, .. })
    ));
    let too_long = Tensor::zeros([1, 17], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        model.forward_t(&too_long, false),
        Err(MoeError::SequenceTooLong {
            len: 17,
            block_size: 16
        })
    ));
    let floats = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
    assert!(matches!(
        model.forward_t(&floats, false),
        Err(MoeError::Kind { .. })
    ));
    let flat = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        model.forward_t(&flat, false),
        Err(MoeError::Shape { .. })
    ));
    let targets = Tensor::zeros([1, 3], (Kind::Int64, Device::Cpu));
    let idx = Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        model.loss(&idx, &targets, false),
        Err(MoeError::Shape { .. })
    ));
    let msg = model.forward_t(&too_big, false).unwrap_err().to_string();
    assert!(msg.contains("20") && msg.contains("vocabulary"), "{msg}");
}

#[test]
fn bad_model_configs_are_errors() {
    let cases = [
        MakeMoeConfig {
            top_k: 9,
            ..MakeMoeConfig::default()
        },
        MakeMoeConfig {
            top_k: 0,
            ..MakeMoeConfig::default()
        },
        MakeMoeConfig {
            num_experts: 0,
            top_k: 0,
            ..MakeMoeConfig::default()
        },
        MakeMoeConfig {
            n_embd: 100,
            n_head: 8,
            ..MakeMoeConfig::default()
        },
        MakeMoeConfig {
            dropout: 1.5,
            ..MakeMoeConfig::default()
        },
        // m = 3 does not divide the expert width 512.
        MakeMoeConfig {
            segments: 3,
            ..MakeMoeConfig::default()
        },
        MakeMoeConfig {
            dispatch: DispatchKind::Capacity,
            ..MakeMoeConfig::default()
        },
    ];
    for config in cases {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = MakeMoeModel::new(&vs.root(), &config).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{config:?}: {err}");
    }
}

#[test]
fn tokenizer_round_trips_and_rejects_unknown_characters() {
    let tok = CharTokenizer::from_text("hello world").unwrap();
    assert_eq!(tok.chars(), &[' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
    let ids = tok.encode("world hello").unwrap();
    assert_eq!(ids[0], 7);
    assert_eq!(tok.decode(&ids).unwrap(), "world hello");
    let err = tok.encode("help").unwrap_err().to_string();
    assert!(err.contains("'p'"), "{err}");
    assert!(matches!(
        tok.decode(&[8]),
        Err(MoeError::TokenOutOfVocab {
            id: 8,
            vocab_size: 8
        })
    ));
}

#[test]
fn the_shakespeare_vocabulary_has_65_characters() {
    let tok = CharTokenizer::from_text(&common::corpus()).unwrap();
    assert_eq!(tok.vocab_size(), 65);
}

#[test]
fn a_corpus_too_short_for_the_context_is_an_error() {
    let tokens: Vec<i64> = (0..100).map(|i| i % 5).collect();
    // 90 train tokens, 10 validation tokens: validation cannot hold 17.
    let err = Dataset::new(&tokens, 5, 0.9, 16, Device::Cpu).unwrap_err();
    assert!(matches!(err, MoeError::Data(_)), "{err}");
    assert!(err.to_string().contains("block_size + 1 = 17"), "{err}");
    assert!(Dataset::new(&tokens, 5, 0.9, 8, Device::Cpu).is_ok());
    let err = Dataset::new(&[0, 1, 7], 5, 0.5, 1, Device::Cpu).unwrap_err();
    assert!(matches!(
        err,
        MoeError::TokenOutOfVocab {
            id: 7,
            vocab_size: 5
        }
    ));
}

#[test]
fn batches_are_windows_of_the_corpus_with_shifted_targets() {
    let tokens: Vec<i64> = (0..1000).map(|i| i % 50).collect();
    let data = Dataset::new(&tokens, 50, 0.9, 8, Device::Cpu).unwrap();
    let batch = data.batch(moe_data::Split::Train, 32);
    assert_eq!(batch.x.size(), vec![32, 8]);
    // Consecutive tokens differ by one (mod 50), and y is x shifted by one.
    let step = (batch.x.narrow(1, 1, 7) - batch.x.narrow(1, 0, 7)).remainder(50);
    assert!(step.eq(1).all().int64_value(&[]) == 1);
    let shift = (&batch.y - &batch.x).remainder(50);
    assert!(shift.eq(1).all().int64_value(&[]) == 1);
    let val = data.batch(moe_data::Split::Val, 4);
    assert!(val.x.max().int64_value(&[]) < 50);
}

#[test]
fn generation_returns_vocabulary_tokens_of_the_asked_length() {
    tch::manual_seed(5);
    let tok = CharTokenizer::from_text(&common::corpus()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), tiny_config(tok.vocab_size())).unwrap();
    let prompt = tok.encode("ROMEO:").unwrap();
    let mut streamed = Vec::new();
    // Longer than the context, so the window slides.
    let out = generate(&model, &prompt, 40, Sampling::default(), |t| {
        streamed.push(t)
    })
    .unwrap();
    assert_eq!(out.len(), 40);
    assert_eq!(out, streamed);
    let text = tok.decode(&out).unwrap();
    assert_eq!(text.chars().count(), 40);
    assert!(text.chars().all(|c| tok.chars().contains(&c)));
    let greedy = Sampling {
        top_k: Some(1),
        ..Sampling::default()
    };
    let a = generate(&model, &prompt, 10, greedy, |_| {}).unwrap();
    let b = generate(&model, &prompt, 10, greedy, |_| {}).unwrap();
    assert_eq!(a, b, "top-1 sampling is greedy and deterministic");
    assert!(matches!(
        generate(&model, &[99], 1, Sampling::default(), |_| {}),
        Err(MoeError::TokenOutOfVocab { id: 99, .. })
    ));
    let cold = Sampling {
        temperature: 0.0,
        ..Sampling::default()
    };
    assert!(matches!(
        generate(&model, &prompt, 1, cold, |_| {}),
        Err(MoeError::Config(_))
    ));
}

#[test]
fn devices_parse_and_cuda_without_a_gpu_is_an_error() {
    assert_eq!(
        "cpu".parse::<DeviceChoice>().unwrap().resolve().unwrap(),
        Device::Cpu
    );
    let err = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
    assert!(
        err.contains("tpu") && err.contains("auto, cpu, cuda"),
        "{err}"
    );
    if !tch::Cuda::is_available() {
        let err = DeviceChoice::Cuda.resolve().unwrap_err();
        assert!(matches!(err, MoeError::DeviceUnavailable(_)), "{err}");
        assert_eq!(DeviceChoice::Auto.resolve().unwrap(), Device::Cpu);
    }
}

/// Number of trainable parameters.
fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}
