//! `glm4_moe` (`Glm4MoeForCausalLM`, GLM-4.5/4.6/4.7): DeepSeek-V3's
//! router, shared experts and dense prefix under grouped-query attention
//! with q/k/v biases, optional QK-norm per head and RoPE on part of each
//! head (`partial_rotary_factor`).

use super::rules::{self, ExpertDefaults, NO_WINDOW, ROUTED_AND_UNGATED_SHARED};
use super::{
    field, Defaults, Entry, Family, Field, Key, KeyDefault, Layers, Lit, QkNorms, Tensors,
};
use moe_nn::QkNorm;

static EXPERTS: [Entry; 6] = rules::deepseek_experts(ExpertDefaults {
    n_routed_experts: rules::routed_experts(128),
    num_experts_per_tok: KeyDefault::Is(8),
    moe_intermediate_size: 1408,
    n_shared_experts: 1,
    first_k_dense_replace: 1,
    routed_scaling_factor: 1.0,
});

static GATE: [Entry; 3] = rules::sigmoid_gate(1, 1);

pub(crate) static FAMILY: Family = Family {
    model_type: "glm4_moe",
    architecture: "Glm4MoeForCausalLM",
    name: "GLM-4.5",
    defaults: Defaults {
        vocab_size: 151552,
        hidden_size: 4096,
        intermediate_size: 10944,
        num_hidden_layers: 46,
        num_attention_heads: 96,
        num_key_value_heads: Some(8),
        max_position_embeddings: 131072,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
    },
    layers: Layers {
        partial_rope: true,
        qk_norm: QkNorms::OrNone(QkNorm::Head),
        ..rules::DEEPSEEK_MOE
    },
    keys: &[
        rules::FULL_ATTENTION,
        Entry::Table(&EXPERTS),
        Entry::Table(&GATE),
        // q/k/v only: Glm4MoeAttention's o_proj has no bias.
        Entry::Bool(Key::new("attention_bias", field!(attention_bias), false)),
        Entry::Bool(Key::new(
            "use_qk_norm",
            Field {
                get: |c| c.qk_norm == QkNorm::Head,
                set: |c, v| {
                    if v {
                        c.qk_norm = QkNorm::Head;
                    }
                },
            },
            false,
        )),
        // Multi-token prediction layers (their weights past the last layer
        // are skipped on load, as transformers does).
        Entry::Written("num_nextn_predict_layers", Lit::Int(0)),
        Entry::Info(&["num_mtp_layers"]),
        Entry::Rule(&NO_WINDOW),
    ],
    checks: &[ROUTED_AND_UNGATED_SHARED],
    tensors: Tensors {
        extra_layers_skipped: true,
        ..Tensors::PLAIN
    },
    multimodal: None,
};
