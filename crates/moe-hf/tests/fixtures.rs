//! Checkpoints written by transformers 5.23.0 (`tests/data/hf`, see its
//! README): our decoder loaded from them computes transformers' fp32 logits
//! (within [`common::logit_tolerance`], the bound of f32 arithmetic at these
//! sizes), routes every token to the same experts and continues every
//! prompt greedily with the same 20 tokens.

mod common;

use common::{expected, fixture, load, FAMILIES};
use moe_models::{generate, CausalLm, Sampling};
use tch::Tensor;

/// Checks one fixture folder and returns the largest logit difference.
fn check(name: &str) -> f64 {
    let dir = fixture(name);
    let want = expected(name);
    let pretrained = load(&dir);
    let model = &pretrained.model;
    let moe_layers: Vec<i64> = (0..pretrained.config.num_hidden_layers)
        .filter(|&i| pretrained.config.is_moe_layer(i))
        .collect();
    assert_eq!(moe_layers, want.moe_layers, "{name}: MoE layers");
    let mut worst = 0.0f64;
    for (p, prompt) in want.prompts.iter().enumerate() {
        let idx = Tensor::from_slice(prompt).unsqueeze(0);
        let out = tch::no_grad(|| model.forward_t(&idx, false)).unwrap();
        let logits = out.logits.squeeze_dim(0);
        let reference = Tensor::from_slice(
            &want.logits[p]
                .iter()
                .flatten()
                .copied()
                .collect::<Vec<f32>>(),
        )
        .view([prompt.len() as i64, -1]);
        assert_eq!(logits.size(), reference.size(), "{name}: logits shape");
        let diff = common::max_abs_diff(&logits, &reference);
        let tolerance =
            common::logit_tolerance(&pretrained.config, &pretrained.vs, prompt.len() as i64);
        println!("{name}, prompt {p}: max |logit diff| {diff:e}, bound {tolerance:e}");
        assert!(
            diff <= tolerance,
            "{name}, prompt {p}: max |logit diff| {diff:e} > {tolerance:e}"
        );
        worst = worst.max(diff);
        assert_eq!(
            out.routings.len(),
            want.moe_layers.len(),
            "{name}: routings"
        );
        for (m, routing) in out.routings.iter().enumerate() {
            let (sorted, _) = routing.indices().unwrap().sort(-1, false);
            let got: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&sorted).unwrap();
            assert_eq!(
                got, want.experts[p][m],
                "{name}, prompt {p}, MoE layer {m}: experts per token"
            );
        }
        let greedy = generate(model, prompt, 20, Sampling::greedy(), |_| {}).unwrap();
        assert_eq!(
            greedy, want.greedy[p],
            "{name}, prompt {p}: greedy continuation"
        );
    }
    println!("{name}: max |logit diff| = {worst:e}");
    worst
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check("qwen3_moe");
}

#[test]
fn glm4_moe_matches_transformers() {
    check("glm4_moe");
}

#[test]
fn olmoe_matches_transformers() {
    check("olmoe");
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check("deepseek_v3");
}

/// A fixture with RoPE scaling loads with its scheme and matches.
fn check_scaled(name: &str, rope_type: &str) {
    let pretrained = load(&fixture(name));
    let scheme = pretrained
        .config
        .rope_scaling
        .as_ref()
        .map(|s| s.rope_type());
    assert_eq!(scheme, Some(rope_type), "{name}");
    check(name);
}

#[test]
fn deepseek_v3_with_yarn_matches_transformers() {
    check_scaled("deepseek_v3_yarn", "yarn");
}

/// DeepSeek-V2-Lite's shape: no q_lora_rank, the group-limited greedy
/// router, YaRN with V2's mscale.
#[test]
fn deepseek_v2_matches_transformers() {
    let pretrained = load(&fixture("deepseek_v2"));
    let latent = pretrained.config.latent_attention.expect("MLA");
    assert_eq!(latent.q_lora_rank, None);
    assert!(matches!(
        pretrained.config.router.gate,
        moe_routers::Gate::GroupLimitedGreedy {
            norm_topk_prob: false,
            n_group: 4,
            topk_group: 2
        }
    ));
    check_scaled("deepseek_v2", "yarn");
}

/// DeepSeek-V2 with `q_lora_rank`, attention biases and the plain greedy router.
#[test]
fn deepseek_v2_greedy_matches_transformers() {
    let pretrained = load(&fixture("deepseek_v2_greedy"));
    assert!(pretrained.config.attention_bias);
    assert_eq!(
        pretrained.config.router.gate,
        moe_routers::Gate::TopK {
            norm_topk_prob: false
        }
    );
    check("deepseek_v2_greedy");
}

/// Windows of 4 positions under prompts of 5 to 9 and 20 greedy tokens:
/// in every layer (Mixtral, Qwen3-MoE) or in layer 0 alone (Qwen2-MoE's
/// `layer_types`).
#[test]
fn sliding_windows_match_transformers() {
    use moe_models::LayerType::{FullAttention, SlidingAttention};
    for (name, layer_types) in [
        ("mixtral_window", vec![]),
        ("qwen3_moe_window", vec![]),
        ("qwen2_moe_window", vec![SlidingAttention, FullAttention]),
    ] {
        let config = load(&fixture(name)).config;
        assert_eq!(config.sliding_window, Some(4), "{name}");
        assert_eq!(config.layer_types, layer_types, "{name}");
        check(name);
    }
}

/// gpt-oss: sinks, a window in layer 0, q/k/v/o biases, the biased router,
/// biased experts with the clamped SwiGLU, interleaved fused experts, YaRN.
#[test]
fn gpt_oss_matches_transformers() {
    use moe_models::LayerType::{FullAttention, SlidingAttention};
    let config = load(&fixture("gpt_oss")).config;
    assert!(config.attention_sinks && config.o_proj_bias && config.expert_bias);
    assert_eq!(config.layer_types, [SlidingAttention, FullAttention]);
    assert_eq!(
        config.expert_activation,
        moe_experts::Activation::ClampedSwiGlu {
            alpha: 1.702,
            limit: 2.0
        }
    );
    check_scaled("gpt_oss", "yarn");
}

/// The hub's format: experts as MXFP4 blocks and scales, dequantised on
/// load (the values transformers dequantises to).
#[test]
fn gpt_oss_with_mxfp4_experts_matches_transformers() {
    let pretrained = load(&fixture("gpt_oss_mxfp4"));
    assert_eq!(pretrained.config.expert_width(), 32);
    check("gpt_oss_mxfp4");
}

#[test]
fn llama_with_llama3_rope_scaling_matches_transformers() {
    check_scaled("llama_rope3", "llama3");
}

/// Llama 4's text model: MoE layers 1 and 3 between dense ones (a sigmoid
/// top-1 router scaling the expert's input, a shared expert), chunks of 4
/// positions with RoPE on adjacent pairs and the L2 QK-norm in layers 0-2,
/// layer 3 without RoPE attending to all with temperature-tuned queries
/// (floor scale 4), Llama 3's RoPE scaling, fused `[E, H, 2I]` experts.
#[test]
fn llama4_text_matches_transformers() {
    use moe_models::LayerType::{ChunkedAttention, FullAttention};
    let config = load(&fixture("llama4_text")).config;
    assert_eq!(config.interleave_moe_layer_step, 2);
    assert_eq!(config.nope_layers, [3]);
    assert_eq!(config.attention_chunk_size, Some(4));
    assert_eq!(
        config.layer_types,
        [
            ChunkedAttention,
            ChunkedAttention,
            ChunkedAttention,
            FullAttention
        ]
    );
    assert_eq!(config.qk_norm, moe_nn::QkNorm::L2);
    assert_eq!(
        config.attn_temperature_tuning.map(|t| t.floor_scale),
        Some(4.0)
    );
    check_scaled("llama4_text", "llama3");
}

/// The Hub's Llama 4 folders: the multimodal class, its text model under
/// `language_model.` read (without the QK-norm, as Maverick), the vision
/// tower skipped; a save writes the text model's family.
#[test]
fn llama4_multimodal_folder_reads_its_text_model() {
    let pretrained = load(&fixture("llama4"));
    assert_eq!(pretrained.family(), moe_hf::HfFamily::Llama4);
    assert_eq!(pretrained.family().saved_as(), moe_hf::HfFamily::Llama4Text);
    assert_eq!(pretrained.config.qk_norm, moe_nn::QkNorm::None);
    check("llama4");
}

#[test]
fn every_supported_fixture_is_checked() {
    // A family folder the fixtures add later must get its test above.
    for name in FAMILIES {
        assert!(fixture(name).join("expected.json").is_file(), "{name}");
    }
}

#[test]
fn the_fixture_tokenizer_and_generation_config_load() {
    let pretrained = load(&fixture("mixtral"));
    let tokenizer = pretrained.tokenizer.as_ref().expect("tokenizer.json");
    let want = expected("mixtral");
    // The prompts are the first tokens of these lines (the README's).
    let ids = tokenizer
        .encode("First Citizen:\nBefore we proceed")
        .unwrap();
    assert_eq!(&ids[..5], &want.prompts[0][..]);
    assert_eq!(
        tokenizer.decode(&want.prompts[0]).unwrap(),
        tokenizer.decode(&ids[..5]).unwrap()
    );
    assert!(tokenizer.vocab_size() <= pretrained.config.vocab_size);
    // No eos in these files: generation runs to its length.
    assert!(pretrained.generation.eos_token_id.is_empty());
    assert_eq!(
        pretrained.generation.other.get("transformers_version"),
        Some(&serde_json::json!("5.23.0"))
    );
}
