//! `qwen3_moe` (`Qwen3MoeForCausalLM`): Qwen2-MoE's layers without the
//! shared expert and the attention bias, with QK-norm per head
//! (`RMSNorm(head_dim)`) and a window in every layer or none.

use super::rules::{self, QWEN3_WINDOW, QWEN_LAYERS};
use super::{field, Check, Defaults, Entry, Family, Key, Layers, QkNorms, Tensors, Windows};
use moe_nn::QkNorm;

pub(crate) static FAMILY: Family = Family {
    model_type: "qwen3_moe",
    architecture: "Qwen3MoeForCausalLM",
    name: "Qwen3-MoE",
    defaults: Defaults {
        vocab_size: 151936,
        hidden_size: 2048,
        intermediate_size: 6144,
        num_hidden_layers: 24,
        num_attention_heads: 32,
        num_key_value_heads: Some(4),
        max_position_embeddings: 32768,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
    },
    layers: Layers {
        windows: Windows::EveryLayer,
        qk_norm: QkNorms::Is(QkNorm::Head),
        ..Layers::PLAIN
    },
    keys: &[
        rules::FULL_ATTENTION,
        // The hub's files say `num_experts`, what transformers 5 saves
        // says `num_local_experts`.
        Entry::Int(Key::new("num_experts", field!(num_local_experts), 128).or("num_local_experts")),
        rules::experts_per_token(8),
        rules::moe_width(768),
        rules::topk_norm(false),
        rules::aux_loss(0.001),
        // Qwen3MoeAttention gives o_proj the bias too.
        rules::no_attention_bias("attention_bias false (q/k/v/o without bias)"),
        Entry::Rule(&QWEN_LAYERS),
        Entry::Rule(&QWEN3_WINDOW),
    ],
    checks: &[
        Check {
            when: |c| c.shared_experts().is_some(),
            says: |_, _| {
                "Qwen3-MoE layers have no shared expert (shared_expert_intermediate_size)".into()
            },
        },
        rules::NO_O_PROJ_BIAS,
    ],
    tensors: Tensors::PLAIN,
    multimodal: None,
};
