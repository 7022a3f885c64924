//! The decoder family: Hugging Face's parameter names, every preset's
//! structure, causality, KV-cached decoding equal to full recomputation,
//! and every config error.

mod support;

use moe_core::MoeError;
use moe_models::{CausalLm, DecoderConfig, DecoderModel, DecoderPreset, LmConfig, ModelCache};
use moe_nn::QkNorm;
use moe_routers::Gate;
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

/// libtorch's generator is global: tests that seed it run one at a time.
fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const PRESETS: [DecoderPreset; 11] = [
    DecoderPreset::Mixtral,
    DecoderPreset::Qwen2Moe,
    DecoderPreset::Qwen3Moe,
    DecoderPreset::Glm4Moe,
    DecoderPreset::DeepseekV3,
    DecoderPreset::DeepseekV2,
    DecoderPreset::GptOss,
    DecoderPreset::Llama4,
    DecoderPreset::Olmoe,
    DecoderPreset::Yuan,
    DecoderPreset::Llama,
];

fn build(config: &DecoderConfig, seed: i64) -> (nn::VarStore, DecoderModel) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DecoderModel::new(&vs.root(), config).unwrap();
    (vs, model)
}

fn names(vs: &nn::VarStore) -> Vec<String> {
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    names
}

#[test]
fn parameters_carry_hugging_face_names_and_no_biases() {
    let _rng = rng_lock();
    let (vs, _) = build(&support::small_decoder(DecoderPreset::Mixtral, 30), 0);
    let all = names(&vs);
    for want in [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.mlp.router.gate.weight",
        "model.layers.1.mlp.experts.w_in",
        "model.layers.1.mlp.experts.w_gate",
        "model.layers.1.mlp.experts.w_out",
        "model.norm.weight",
    ] {
        assert!(all.contains(&want.to_string()), "{want} missing: {all:?}");
    }
    // Bias-free projections, experts and gate; the head is tied.
    assert!(
        !all.iter()
            .any(|n| n.ends_with("bias") || n.contains("b_in") || n.contains("b_out")),
        "{all:?}"
    );
    assert!(!all.iter().any(|n| n.starts_with("lm_head")));
    let (vs, _) = build(
        &DecoderConfig {
            tie_word_embeddings: false,
            ..support::small_decoder(DecoderPreset::Mixtral, 30)
        },
        0,
    );
    assert!(names(&vs).contains(&"lm_head.weight".to_string()));
}

#[test]
fn each_preset_builds_its_familys_structure() {
    let _rng = rng_lock();
    let has = |preset, what: &str| {
        let (vs, _) = build(&support::small_decoder(preset, 30), 0);
        names(&vs).iter().any(|n| n.contains(what))
    };
    assert!(has(DecoderPreset::Qwen2Moe, "mlp.shared_expert_gate"));
    assert!(has(DecoderPreset::Qwen2Moe, "self_attn.q_proj.bias"));
    assert!(has(DecoderPreset::DeepseekV3, "layers.0.mlp.gate_proj"));
    assert!(has(
        DecoderPreset::DeepseekV3,
        "layers.1.mlp.router.expert_bias"
    ));
    assert!(has(
        DecoderPreset::DeepseekV3,
        "layers.1.mlp.shared_experts"
    ));
    assert!(has(DecoderPreset::Olmoe, "self_attn.q_norm"));
    assert!(has(DecoderPreset::Yuan, "self_attn.lf_gate.conv1"));
    assert!(has(DecoderPreset::Yuan, "mlp.router.query"));
    assert!(has(DecoderPreset::Llama, "layers.1.mlp.down_proj"));
    // Llama 4: layer 0 dense, layer 1 MoE with a shared expert; no QK-norm weights.
    assert!(has(DecoderPreset::Llama4, "layers.0.mlp.down_proj"));
    assert!(has(DecoderPreset::Llama4, "layers.1.mlp.shared_experts"));
    assert!(!has(DecoderPreset::Llama4, "layers.0.mlp.experts"));
    assert!(!has(DecoderPreset::Llama4, "q_norm"));
    assert!(!has(DecoderPreset::Llama, "experts"));
    for preset in PRESETS {
        let config = support::small_decoder(preset, 30);
        let (_vs, model) = build(&config, 1);
        let idx = Tensor::randint(30, [2, 10], (Kind::Int64, Device::Cpu));
        let out = model.forward_t(&idx, true).unwrap();
        assert_eq!(out.logits.size(), vec![2, 10, 30], "{preset:?}");
        assert_eq!(out.routings.len(), model.num_moe_layers(), "{preset:?}");
        assert_eq!(
            out.routings.len() as i64,
            config.num_moe_layers(),
            "{preset:?}"
        );
        assert!(
            out.logits.isfinite().all().int64_value(&[]) == 1,
            "{preset:?}"
        );
    }
    let deepseek = support::small_decoder(DecoderPreset::DeepseekV3, 30);
    assert_eq!(deepseek.num_moe_layers(), 1, "first_k_dense_replace = 1");
}

#[test]
fn later_tokens_never_change_earlier_logits() {
    let _rng = rng_lock();
    for preset in PRESETS {
        let (_vs, model) = build(&support::small_decoder(preset, 30), 2);
        let idx = Tensor::randint(30, [1, 12], (Kind::Int64, Device::Cpu));
        let changed = idx.copy();
        let _ = changed.narrow(1, 8, 4).fill_(7);
        let a = model.forward_t(&idx, false).unwrap().logits.narrow(1, 0, 8);
        let b = model
            .forward_t(&changed, false)
            .unwrap()
            .logits
            .narrow(1, 0, 8);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{preset:?}: earlier logits moved by {diff}");
    }
}

/// Two rows of 20 random tokens fed through the KV cache in chunks of 7,
/// 1, 5, 1 and 6 (prefill, single steps, several positions after a
/// non-empty cache): the logits equal the full forward's.
fn assert_cached_chunks_equal_the_full_forward(label: &str, model: &DecoderModel) {
    let idx = Tensor::randint(30, [2, 20], (Kind::Int64, Device::Cpu));
    let full = model.forward_t(&idx, false).unwrap().logits;
    let mut cache = ModelCache::default();
    let mut parts = Vec::new();
    for (start, len) in [(0, 7), (7, 1), (8, 5), (13, 1), (14, 6)] {
        let chunk = idx.narrow(1, start, len);
        parts.push(model.forward_cached(&chunk, &mut cache).unwrap().logits);
    }
    let diff = (Tensor::cat(&parts, 1) - &full)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-4, "{label}: cached logits differ by {diff}");
}

#[test]
fn cached_logits_and_greedy_generation_equal_full_recomputation() {
    let _rng = rng_lock();
    for preset in PRESETS {
        let (_vs, model) = build(&support::small_decoder(preset, 30), 3);
        assert_cached_chunks_equal_the_full_forward(&format!("{preset:?}"), &model);

        // Greedy decoding within the context, token for token.
        let prompt = [3i64, 14, 15, 9];
        support::assert_cached_greedy_is_argmax(&format!("{preset:?}"), &model, &prompt, 16);
    }
}

/// Sliding windows (in the second layer only) and attention sinks: KV-cached
/// chunks equal the full forward, greedy decoding is the argmax of full
/// recomputation, a left-padded batch generates what each prompt alone does.
#[test]
fn sliding_windows_and_sinks_decode_like_full_recomputation() {
    use moe_models::LayerType;
    let _rng = rng_lock();
    for (window, sinks) in [(3, false), (5, true), (1, true)] {
        let config = DecoderConfig {
            sliding_window: Some(window),
            layer_types: vec![LayerType::FullAttention, LayerType::SlidingAttention],
            attention_sinks: sinks,
            ..support::small_decoder(DecoderPreset::Mixtral, 30)
        };
        let (vs, model) = build(&config, 4);
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                if name.ends_with("sinks") {
                    var.copy_(&Tensor::randn_like(&var));
                }
            }
        });
        let label = format!("window {window}, sinks {sinks}");
        assert_cached_chunks_equal_the_full_forward(&label, &model);
        support::assert_cached_greedy_is_argmax(&label, &model, &[3, 14, 15, 9], 16);

        assert_batch_generates_each_prompt_alone(&label, &model, &[&[4, 9, 2, 7, 7, 1], &[1, 5]]);
    }
    // A window without sliding layers to apply to, or layer kinds for
    // other layers, are config errors.
    let bad = DecoderConfig {
        layer_types: vec![LayerType::SlidingAttention, LayerType::FullAttention],
        ..support::small_decoder(DecoderPreset::Mixtral, 30)
    };
    assert!(matches!(bad.validate(), Err(MoeError::Config(_))));
    let bad = DecoderConfig {
        sliding_window: Some(2),
        ..support::small_decoder(DecoderPreset::DeepseekV3, 30)
    };
    assert!(matches!(bad.validate(), Err(MoeError::Config(_))));
}

/// Llama 4's attention (chunks of 3 with RoPE on adjacent pairs and the L2
/// QK-norm in layer 0; no RoPE and temperature-tuned queries in layer 1,
/// with a floor scale of 2 so that the temperature changes every other
/// position), with its input-weighted sigmoid experts: KV-cached chunks
/// equal the full forward, greedy decoding is the argmax of full
/// recomputation, and a left-padded batch generates what each prompt alone
/// does (chunks and temperatures count positions from the first real token).
#[test]
fn chunks_and_nope_layers_decode_like_full_recomputation() {
    use moe_nn::TemperatureTuning;
    let _rng = rng_lock();
    let config = DecoderConfig {
        attention_chunk_size: Some(3),
        attn_temperature_tuning: Some(TemperatureTuning {
            floor_scale: 2.0,
            attn_scale: 0.5,
        }),
        ..support::small_decoder(DecoderPreset::Llama4, 30)
    };
    let (_vs, model) = build(&config, 5);
    assert_cached_chunks_equal_the_full_forward("llama4", &model);
    support::assert_cached_greedy_is_argmax("llama4", &model, &[3, 14, 15, 9], 16);
    assert_batch_generates_each_prompt_alone(
        "llama4",
        &model,
        &[&[4, 9, 2, 7, 7, 1, 3], &[1, 5], &[6, 6, 2, 8]],
    );
}

/// A left-padded batch of `prompts` generates, greedily for 8 tokens, what
/// each prompt alone does.
fn assert_batch_generates_each_prompt_alone(label: &str, model: &DecoderModel, prompts: &[&[i64]]) {
    use moe_models::{generate_batch, GenerateOptions, Sampling};
    use std::ops::ControlFlow;
    let prompts: Vec<Vec<i64>> = prompts.iter().map(|p| p.to_vec()).collect();
    let options = GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::greedy(),
        eos_token_ids: Vec::new(),
    };
    let batched =
        generate_batch(model, &prompts, &options, |_, _| ControlFlow::Continue(())).unwrap();
    for (prompt, got) in prompts.iter().zip(&batched) {
        let alone = moe_models::generate(model, prompt, 8, Sampling::greedy(), |_| {}).unwrap();
        assert_eq!(got, &alone, "{label}: prompt {prompt:?}");
    }
}

#[test]
fn wrong_inputs_are_errors() {
    let _rng = rng_lock();
    let (_vs, model) = build(&support::small_decoder(DecoderPreset::Mixtral, 30), 4);
    let too_long = Tensor::zeros([1, 25], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        model.forward_t(&too_long, false),
        Err(MoeError::SequenceTooLong { len: 25, .. })
    ));
    let out_of_vocab = Tensor::from_slice(&[1i64, 30]).unsqueeze(0);
    assert!(matches!(
        model.forward_t(&out_of_vocab, false),
        Err(MoeError::TokenOutOfVocab { id: 30, .. })
    ));
    let floats = Tensor::zeros([1, 3], (Kind::Float, Device::Cpu));
    assert!(matches!(
        model.forward_t(&floats, false),
        Err(MoeError::Kind { .. })
    ));
    let mut cache = ModelCache::default();
    let prefix = Tensor::zeros([1, 20], (Kind::Int64, Device::Cpu));
    model.forward_cached(&prefix, &mut cache).unwrap();
    let more = Tensor::zeros([1, 5], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        model.forward_cached(&more, &mut cache),
        Err(MoeError::SequenceTooLong { len: 25, .. })
    ));
}

#[test]
fn every_config_error_is_a_moe_error() {
    let base = support::small_decoder(DecoderPreset::Mixtral, 30);
    let deepseek = support::small_decoder(DecoderPreset::DeepseekV3, 30);
    let llama4 = support::small_decoder(DecoderPreset::Llama4, 30);
    let with_gate = |gate: Gate| DecoderConfig {
        router: moe_routers::RouterConfig {
            gate,
            ..deepseek.router.clone()
        },
        ..deepseek.clone()
    };
    let cases = [
        (
            DecoderConfig {
                num_key_value_heads: 3,
                ..base.clone()
            },
            "num_key_value_heads",
        ),
        (
            DecoderConfig {
                num_experts_per_tok: 9,
                ..base.clone()
            },
            "top_k",
        ),
        (
            DecoderConfig {
                hidden_size: 0,
                ..base.clone()
            },
            "hidden_size",
        ),
        (
            DecoderConfig {
                n_shared_experts: 1,
                shared_expert_intermediate_size: Some(8),
                ..base.clone()
            },
            "not both",
        ),
        (
            with_gate(Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: 1e-3,
                n_group: 4,
                topk_group: 5,
            }),
            "topk_group",
        ),
        (
            with_gate(Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: 1e-3,
                n_group: 3,
                topk_group: 1,
            }),
            "n_group",
        ),
        (
            // 4 experts per group of 16/4; one group holds fewer than k = 8.
            DecoderConfig {
                num_experts_per_tok: 8,
                ..with_gate(Gate::SigmoidAuxFree {
                    norm_topk_prob: true,
                    bias_update_rate: 1e-3,
                    n_group: 4,
                    topk_group: 1,
                })
            },
            "top",
        ),
        (
            DecoderConfig {
                qk_norm: QkNorm::Projection,
                hidden_size: 30,
                ..base.clone()
            },
            "",
        ),
        (
            DecoderConfig {
                attention_chunk_size: None,
                ..llama4.clone()
            },
            "attention_chunk_size",
        ),
        (
            DecoderConfig {
                attention_chunk_size: Some(0),
                ..llama4.clone()
            },
            "attention_chunk_size",
        ),
        (
            DecoderConfig {
                nope_layers: vec![2],
                ..llama4.clone()
            },
            "nope_layers",
        ),
        (
            DecoderConfig {
                interleave_moe_layer_step: 0,
                ..llama4.clone()
            },
            "interleave_moe_layer_step",
        ),
        (
            DecoderConfig {
                layer_types: Vec::new(),
                sliding_window: Some(4),
                ..llama4.clone()
            },
            "layer_types",
        ),
        (
            DecoderConfig {
                partial_rotary_factor: 0.5,
                ..llama4.clone()
            },
            "rope_interleave",
        ),
        (
            DecoderConfig {
                attn_temperature_tuning: Some(moe_nn::TemperatureTuning {
                    floor_scale: 0.0,
                    attn_scale: 0.1,
                }),
                ..llama4.clone()
            },
            "floor_scale",
        ),
        (
            DecoderConfig {
                nope_layers: vec![1],
                ..deepseek.clone()
            },
            "latent attention",
        ),
    ];
    for (config, needle) in cases {
        let err = config.validate().unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
        let vs = nn::VarStore::new(Device::Cpu);
        assert!(DecoderModel::new(&vs.root(), &config).is_err());
    }
}

#[test]
fn configs_round_trip_through_json_with_the_family_tag() {
    let config = LmConfig::Decoder(support::small_decoder(DecoderPreset::DeepseekV3, 30));
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["family"], "decoder");
    assert_eq!(json["hidden_size"], 32);
    let back: LmConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, config);
    let c: DecoderConfig =
        serde_json::from_value(serde_json::json!({"num_local_experts": 4, "rope_theta": 1e6}))
            .unwrap();
    assert_eq!((c.num_local_experts, c.rope_theta), (4, 1e6));
    let unknown = serde_json::json!({"family": "gpt5"});
    let err = serde_json::from_value::<LmConfig>(unknown).unwrap_err();
    assert!(err.to_string().contains("unknown model family"), "{err}");
}

/// The settings every family has land in each family's own fields.
#[test]
fn common_settings_reach_every_family() {
    use moe_core::{Precision, WeightInit};
    use moe_models::{CommonModelSettings, LmConfig, MakeMoeConfig};
    let common = CommonModelSettings {
        max_context: Some(48),
        init: Some(WeightInit::Xavier),
        precision: Some(Precision::Bf16),
        dispatch: Some("capacity:2".parse().unwrap()),
    };
    let mut decoder = LmConfig::Decoder(DecoderConfig::default());
    decoder.set_common(&common);
    let LmConfig::Decoder(d) = &decoder else {
        unreachable!()
    };
    assert_eq!(d.max_position_embeddings, 48);
    assert_eq!((d.init, d.precision), (WeightInit::Xavier, Precision::Bf16));
    assert_eq!(d.router.capacity_factor, Some(2.0));
    let mut make_moe = LmConfig::MakeMoe(MakeMoeConfig::default());
    make_moe.set_common(&common);
    assert_eq!(make_moe.max_context(), 48);
    // Nothing set leaves the config as it was.
    let before = decoder.clone();
    decoder.set_common(&CommonModelSettings::default());
    assert_eq!(decoder, before);
}
