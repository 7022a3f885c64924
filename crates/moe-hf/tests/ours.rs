//! Folders our `save_pretrained` writes, for transformers to check:
//! `tests/data/hf/ours/<name>/` holds `config.json`, `model.safetensors`
//! (bf16), `generation_config.json`, `tokenizer.json` and `ours.json`
//! (`{"prompts", "logits"}`, the logits our decoder computes from exactly
//! the saved bf16 weights). `cargo xtask hf-fixtures -- --check-ours
//! tests/data/hf/ours/*` loads each folder with transformers and writes
//! `transformers_check.json` next to it: its verdict, the SHA-256 of the
//! files it checked and its own logits, which the test compares ours with.
//!
//! Regenerate the folders with
//! `cargo test -p moe-layers-hf --test ours -- --ignored write_ours`
//! (`OURS_CASE=<name>` writes that folder alone).

mod common;

use common::{expected, fixture, load};
use moe_hf::{save_pretrained_with, ExpertLayout, HfFamily, SaveOptions};
use moe_models::{
    CausalLm, DecoderConfig, DecoderModel, DecoderPreset, LatentAttention, LayerType,
};
use moe_nn::{QkNorm, RopeScaling};
use moe_routers::Gate;
use serde_json::json;
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

/// One folder: a model of ours in a family, and how it is saved.
struct Case {
    name: &'static str,
    family: HfFamily,
    config: DecoderConfig,
    layout: ExpertLayout,
}

/// Small models of every family, each with settings the transformers
/// fixtures do not have (tied embeddings, a dense first layer, renormalised
/// Qwen2 routing, multi-query attention, the packed expert layout, another
/// RoPE base).
fn cases() -> Vec<Case> {
    let small = |preset| DecoderConfig {
        vocab_size: 128,
        hidden_size: 32,
        intermediate_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        ..DecoderConfig::preset(preset)
    };
    let mixtral = DecoderConfig {
        num_local_experts: 4,
        ..small(DecoderPreset::Mixtral)
    };
    let mut qwen2 = DecoderConfig {
        num_hidden_layers: 3,
        intermediate_size: 64,
        num_local_experts: 8,
        num_experts_per_tok: 2,
        moe_intermediate_size: Some(16),
        shared_expert_intermediate_size: Some(24),
        first_k_dense_replace: 1,
        ..small(DecoderPreset::Qwen2Moe)
    };
    qwen2.router.gate = Gate::TopK {
        norm_topk_prob: true,
    };
    // Qwen3-MoE: every layer MoE, no renormalisation, tied embeddings,
    // head_dim from the width (the fixture has a dense layer 0,
    // renormalisation and a wider head_dim).
    let mut qwen3 = DecoderConfig {
        num_local_experts: 8,
        num_experts_per_tok: 2,
        moe_intermediate_size: Some(16),
        shared_expert_intermediate_size: None,
        attention_bias: false,
        qk_norm: QkNorm::Head,
        tie_word_embeddings: true,
        ..small(DecoderPreset::Qwen2Moe)
    };
    qwen3.router.gate = Gate::TopK {
        norm_topk_prob: false,
    };
    // GLM-4.5: every layer MoE, two shared experts, no QK-norm, no bias,
    // RoPE on a quarter of each head, no renormalisation (the fixture has a
    // dense layer 0, one shared expert, QK-norm, q/k/v biases and half).
    let mut glm = DecoderConfig {
        num_local_experts: 8,
        num_experts_per_tok: 2,
        moe_intermediate_size: Some(16),
        n_shared_experts: 2,
        partial_rotary_factor: 0.25,
        // GLM-4.5's config has no balance-loss key.
        router_aux_loss_coef: 0.0,
        ..small(DecoderPreset::Mixtral)
    };
    glm.router.routed_scaling_factor = 1.5;
    glm.router.gate = Gate::SigmoidAuxFree {
        norm_topk_prob: false,
        bias_update_rate: 1e-3,
        n_group: 2,
        topk_group: 1,
    };
    let olmoe = DecoderConfig {
        num_local_experts: 8,
        ..small(DecoderPreset::Olmoe)
    };
    let llama = DecoderConfig {
        intermediate_size: 64,
        num_key_value_heads: 1,
        tie_word_embeddings: true,
        rope_theta: 500_000.0,
        head_dim: Some(8),
        ..small(DecoderPreset::Llama)
    };
    // DeepSeek-V2-Lite's full q_proj, two shared experts, no
    // renormalisation, another scaling factor, YaRN with mscale.
    let mut deepseek = DecoderConfig {
        num_hidden_layers: 3,
        intermediate_size: 64,
        num_local_experts: 8,
        num_experts_per_tok: 2,
        moe_intermediate_size: Some(16),
        n_shared_experts: 2,
        latent_attention: Some(LatentAttention {
            q_lora_rank: None,
            kv_lora_rank: 16,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 8,
            v_head_dim: 8,
            rope_interleave: true,
        }),
        rope_scaling: Some(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: Some(16),
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(0.707),
            mscale_all_dim: Some(0.707),
            attention_factor: None,
            truncate: true,
        }),
        ..small(DecoderPreset::DeepseekV3)
    };
    deepseek.num_key_value_heads = deepseek.num_attention_heads;
    deepseek.router.routed_scaling_factor = 1.5;
    deepseek.router.gate = Gate::SigmoidAuxFree {
        norm_topk_prob: false,
        bias_update_rate: 1e-3,
        n_group: 4,
        topk_group: 2,
    };
    // DeepSeek-V2 with q_lora_rank, attention biases, every layer MoE, one
    // shared expert and the group-limited greedy router over two groups (the
    // fixtures have V2-Lite's full q_proj, a dense layer 0 and two shared).
    let mut deepseek_v2 = DecoderConfig {
        first_k_dense_replace: 0,
        n_shared_experts: 1,
        attention_bias: true,
        rope_scaling: None,
        latent_attention: Some(LatentAttention {
            q_lora_rank: Some(16),
            ..deepseek.latent_attention.unwrap()
        }),
        router_aux_loss_coef: 0.0,
        ..deepseek.clone()
    };
    deepseek_v2.router.routed_scaling_factor = 1.5;
    deepseek_v2.router.gate = Gate::GroupLimitedGreedy {
        norm_topk_prob: false,
        n_group: 2,
        topk_group: 1,
    };
    // Qwen2-MoE sliding over 3 positions in its last layer only (the
    // fixture slides in layer 0); Mixtral in every layer.
    let qwen2_window = DecoderConfig {
        sliding_window: Some(3),
        layer_types: vec![
            LayerType::FullAttention,
            LayerType::FullAttention,
            LayerType::SlidingAttention,
        ],
        ..qwen2.clone()
    };
    let mixtral_window = DecoderConfig {
        sliding_window: Some(5),
        ..mixtral.clone()
    };
    // gpt-oss without attention biases, the window in layer 1 and the hub's
    // clamp (the fixture: biases, the window in layer 0, limit 2).
    let mut gpt_oss = DecoderConfig {
        num_local_experts: 4,
        sliding_window: Some(3),
        layer_types: vec![LayerType::FullAttention, LayerType::SlidingAttention],
        attention_sinks: true,
        expert_bias: true,
        expert_activation: moe_experts::Activation::ClampedSwiGlu {
            alpha: 1.702,
            limit: 7.0,
        },
        head_dim: Some(16),
        ..small(DecoderPreset::Mixtral)
    };
    gpt_oss.router.bias = true;
    // Llama 4 with what its fixture lacks: a dense first layer, then MoE
    // in every layer (explicit `moe_layers`), top-2, a NoPE layer between
    // chunked ones (`no_rope_layers` off the default), chunks of 3, biases
    // on q, k, v and o, tied embeddings.
    let llama4 = DecoderConfig {
        num_hidden_layers: 3,
        intermediate_size: 48,
        moe_intermediate_size: Some(16),
        num_local_experts: 4,
        num_experts_per_tok: 2,
        first_k_dense_replace: 1,
        interleave_moe_layer_step: 1,
        attention_chunk_size: Some(3),
        nope_layers: vec![1],
        layer_types: vec![
            LayerType::ChunkedAttention,
            LayerType::FullAttention,
            LayerType::ChunkedAttention,
        ],
        attn_temperature_tuning: Some(moe_nn::TemperatureTuning {
            floor_scale: 3.0,
            attn_scale: 0.3,
        }),
        attention_bias: true,
        o_proj_bias: true,
        head_dim: Some(16),
        tie_word_embeddings: true,
        ..small(DecoderPreset::Llama4)
    };
    vec![
        Case {
            name: "llama4_text",
            family: HfFamily::Llama4Text,
            config: llama4,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "gpt_oss",
            family: HfFamily::GptOss,
            config: gpt_oss,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "qwen2_moe_window",
            family: HfFamily::Qwen2Moe,
            config: qwen2_window,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "mixtral_window",
            family: HfFamily::Mixtral,
            config: mixtral_window,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "deepseek_v2",
            family: HfFamily::DeepseekV2,
            config: deepseek_v2,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "deepseek_v3",
            family: HfFamily::DeepseekV3,
            config: deepseek,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "mixtral",
            family: HfFamily::Mixtral,
            config: mixtral.clone(),
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "mixtral_packed",
            family: HfFamily::Mixtral,
            config: mixtral,
            layout: ExpertLayout::Packed,
        },
        Case {
            name: "qwen2_moe",
            family: HfFamily::Qwen2Moe,
            config: qwen2,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "qwen3_moe",
            family: HfFamily::Qwen3Moe,
            config: qwen3,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "glm4_moe",
            family: HfFamily::Glm4Moe,
            config: glm,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "olmoe",
            family: HfFamily::Olmoe,
            config: olmoe,
            layout: ExpertLayout::PerExpert,
        },
        Case {
            name: "llama",
            family: HfFamily::Llama,
            config: llama,
            layout: ExpertLayout::PerExpert,
        },
    ]
}

fn ours_dir(name: &str) -> PathBuf {
    fixture("ours").join(name)
}

/// Unit-scale random weights, as the transformers fixtures draw them:
/// embeddings N(0, 1), matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.01),
/// biases N(0, 0.01), sinks N(0, 1), routers scaled by 4.
fn randomise(vs: &nn::VarStore) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let size = var.size();
            let noise = Tensor::randn(size.as_slice(), (Kind::Float, Device::Cpu));
            let value = if name.ends_with("norm.weight") {
                noise * 0.01 + 1.0
            } else if name.ends_with(".bias")
                || name.ends_with("expert_bias")
                || [".b_in", ".b_gate", ".b_out"]
                    .iter()
                    .any(|b| name.ends_with(b))
            {
                noise * 0.01
            } else if name.ends_with(".sinks") {
                // gpt-oss's sink logits, on the attention scores' scale.
                noise
            } else if name.contains("embed_tokens") {
                noise
            } else {
                // Both [out, in] linear weights and [E, in, out] expert
                // banks have their fan-in at dimension 1.
                let fan_in = size[1];
                let scale = if name.contains("router") { 4.0 } else { 1.0 };
                noise * (scale / (fan_in as f64).sqrt())
            };
            var.copy_(&value);
        }
    });
}

/// The smallest relative gap `(p_k - p_k+1) / p_k` between the k-th and
/// next softmax probability over every routed token.
fn min_router_gap(model: &DecoderModel, prompts: &[Vec<i64>]) -> f64 {
    let k = model.config().num_experts_per_tok;
    let mut gap = f64::INFINITY;
    for p in prompts {
        let idx = Tensor::from_slice(p).unsqueeze(0);
        let out = tch::no_grad(|| model.forward_t(&idx, false)).unwrap();
        for r in &out.routings {
            let probs = r.logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
            let (sorted, _) = probs.sort(-1, true);
            let kth = sorted.narrow(1, k - 1, 1);
            let next = sorted.narrow(1, k, 1);
            let g = ((&kth - next) / kth).min().double_value(&[]);
            gap = gap.min(g);
        }
    }
    gap
}

/// Writes every folder (ignored by default: it rewrites files of the repository).
#[test]
#[ignore]
fn write_ours() {
    let prompts = expected("mixtral").prompts;
    let tokenizer = load(&fixture("mixtral")).tokenizer;
    let only = std::env::var("OURS_CASE").ok();
    for case in cases() {
        if only.as_deref().is_some_and(|name| name != case.name) {
            continue;
        }
        let dir = ours_dir(case.name);
        let mut seed = 100;
        loop {
            tch::manual_seed(seed);
            let vs = nn::VarStore::new(Device::Cpu);
            let model = DecoderModel::new(&vs.root(), &case.config).unwrap();
            randomise(&vs);
            let _ = std::fs::remove_dir_all(&dir);
            let options = SaveOptions {
                dtype: Some(Kind::BFloat16),
                layout: case.layout,
                generation: None,
            };
            save_pretrained_with(
                &model,
                &vs,
                case.family.model_type(),
                &dir,
                tokenizer.as_ref(),
                &options,
            )
            .unwrap();
            // Our logits from exactly the saved bf16 weights.
            let back = load(&dir);
            let gap = if case.config.num_local_experts > 0 {
                min_router_gap(&back.model, &prompts)
            } else {
                f64::INFINITY
            };
            if gap < 1e-3 {
                seed += 1;
                continue;
            }
            let logits: Vec<Vec<Vec<f32>>> = prompts
                .iter()
                .map(|p| {
                    let idx = Tensor::from_slice(p).unsqueeze(0);
                    let l = tch::no_grad(|| back.model.forward_t(&idx, false))
                        .unwrap()
                        .logits;
                    Vec::<Vec<f32>>::try_from(&l.squeeze_dim(0)).unwrap()
                })
                .collect();
            let ours = json!({
                "model_type": case.family.model_type(),
                "layout": format!("{:?}", case.layout),
                "seed": seed,
                "min_router_gap": if gap.is_finite() { json!(gap) } else { json!(null) },
                "prompts": prompts,
                "logits": logits,
            });
            std::fs::write(dir.join("ours.json"), ours.to_string()).unwrap();
            println!("{}: seed {seed}, min router gap {gap:.4}", case.name);
            break;
        }
    }
}

/// What `scripts/hf_fixtures.py --check-ours` wrote: transformers' verdict
/// on exactly the files whose SHA-256 it records, and its own logits.
#[derive(serde::Deserialize)]
struct TransformersCheck {
    ok: bool,
    weights_sha256: String,
    config_sha256: String,
    prompts: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f32>>>,
}

fn sha256(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The committed folders load, transformers accepted exactly these files
/// (`transformers_check.json` names their hashes), and our logits agree
/// with transformers' own within the bound of f32 arithmetic
/// ([`common::logit_tolerance`]), on whatever CPU this runs.
#[test]
fn ours_folders_compute_transformers_logits() {
    for case in cases() {
        let dir = ours_dir(case.name);
        let check: TransformersCheck = serde_json::from_str(
            &std::fs::read_to_string(dir.join("transformers_check.json")).unwrap(),
        )
        .unwrap_or_else(|e| panic!("{}: transformers_check.json: {e}", case.name));
        assert!(
            check.ok,
            "{}: transformers did not accept the folder",
            case.name
        );
        assert_eq!(
            sha256(&dir.join("model.safetensors")),
            check.weights_sha256,
            "{}: model.safetensors is not the file transformers checked \
             (run `cargo xtask hf-fixtures -- --check-ours tests/data/hf/ours/*`)",
            case.name
        );
        assert_eq!(
            sha256(&dir.join("config.json")),
            check.config_sha256,
            "{}: config.json is not the file transformers checked",
            case.name
        );
        let pretrained = load(&dir);
        assert_eq!(pretrained.family(), case.family, "{}", case.name);
        let mut want = case.config.clone();
        want.init = pretrained.config.init;
        assert_eq!(pretrained.config, want, "{}: config", case.name);
        for (p, logits) in check.prompts.iter().zip(&check.logits) {
            let idx = Tensor::from_slice(p).unsqueeze(0);
            let got = tch::no_grad(|| pretrained.model.forward_t(&idx, false))
                .unwrap()
                .logits
                .squeeze_dim(0);
            let want = Tensor::from_slice(&logits.concat()).view([p.len() as i64, -1]);
            let diff = common::max_abs_diff(&got, &want);
            let tolerance =
                common::logit_tolerance(&pretrained.config, &pretrained.vs, p.len() as i64);
            println!(
                "{}, prompt of {}: max |logit diff| {diff:e}, bound {tolerance:e}",
                case.name,
                p.len()
            );
            assert!(
                diff <= tolerance,
                "{}: our logits differ from transformers' by {diff:e} > {tolerance:e}",
                case.name
            );
        }
    }
}
