//! `qwen2_moe` (`Qwen2MoeForCausalLM`): q/k/v bias, fine-grained experts
//! and a sigmoid-gated shared expert, a dense prefix, windows on any layers.

use super::rules::{self, is_moe, QWEN2_WINDOWS, QWEN_LAYERS};
use super::{field, Check, Defaults, Entry, Family, Field, Key, Layers, Tensors, Windows};

pub(crate) static FAMILY: Family = Family {
    model_type: "qwen2_moe",
    architecture: "Qwen2MoeForCausalLM",
    name: "Qwen2-MoE",
    defaults: Defaults {
        vocab_size: 151936,
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_key_value_heads: Some(16),
        max_position_embeddings: 32768,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
    },
    layers: Layers {
        windows: Windows::PerLayer,
        ..Layers::PLAIN
    },
    keys: &[
        Entry::Int(Key::new("num_experts", field!(num_local_experts), 60)),
        rules::experts_per_token(4),
        rules::moe_width(1408),
        Entry::Int(Key::new(
            "shared_expert_intermediate_size",
            Field {
                get: |c| c.shared_expert_intermediate_size.unwrap_or(0),
                set: |c, v| c.shared_expert_intermediate_size = Some(v),
            },
            5632,
        )),
        rules::topk_norm(false),
        rules::aux_loss(0.001),
        // transformers 4 always gives q/k/v a bias; 5 has `qkv_bias`
        // (default true). Qwen2MoeAttention ignores `attention_bias`.
        Entry::Bool(Key::new("qkv_bias", field!(attention_bias), true)),
        Entry::Info(&["attention_bias"]),
        Entry::Rule(&QWEN_LAYERS),
        Entry::Rule(&QWEN2_WINDOWS),
    ],
    checks: &[Check {
        when: |c| is_moe(c) && c.shared_expert_intermediate_size.is_none(),
        says: |_, _| {
            "Qwen2-MoE layers have a gated shared expert (shared_expert_intermediate_size)".into()
        },
    }],
    tensors: Tensors {
        shared_experts: "mlp.shared_expert",
        shared_expert_gate: Some("mlp.shared_expert_gate"),
        ..Tensors::PLAIN
    },
    multimodal: None,
};
