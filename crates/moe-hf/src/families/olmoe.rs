//! `olmoe` (`OlmoeForCausalLM`): every layer MoE, QK-norm over the
//! projections.

use super::rules::{self, EXPERT_WIDTH, MOE_ONLY, NO_O_PROJ_BIAS, NO_WINDOW};
use super::{field, Check, Defaults, Entry, Family, Fixed, Key, Layers, Lit, QkNorms, Tensors};
use moe_nn::QkNorm;

pub(crate) static FAMILY: Family = Family {
    model_type: "olmoe",
    architecture: "OlmoeForCausalLM",
    name: "OLMoE",
    defaults: Defaults {
        vocab_size: 50304,
        hidden_size: 2048,
        intermediate_size: 2048,
        num_hidden_layers: 16,
        num_attention_heads: 16,
        num_key_value_heads: None,
        max_position_embeddings: 4096,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
    },
    layers: Layers {
        qk_norm: QkNorms::Is(QkNorm::Projection),
        ..Layers::PLAIN
    },
    keys: &[
        rules::FULL_ATTENTION,
        EXPERT_WIDTH,
        Entry::Int(Key::new("num_experts", field!(num_local_experts), 64)),
        rules::experts_per_token(8),
        rules::topk_norm(false),
        rules::aux_loss(0.01),
        Entry::Fixed(Fixed {
            key: "clip_qkv",
            accepts: &[Lit::Null],
            supported: "clip_qkv null (no clipping of q, k, v)",
            written: true,
        }),
        rules::NO_ATTENTION_BIAS,
        Entry::Rule(&NO_WINDOW),
    ],
    checks: &[
        MOE_ONLY,
        NO_O_PROJ_BIAS,
        Check {
            when: |c| {
                c.head_dim
                    .is_some_and(|h| h * c.num_attention_heads != c.hidden_size)
            },
            says: |_, _| {
                "OLMoE's q_norm spans hidden_size, so head_dim must be hidden_size / \
                 num_attention_heads"
                    .into()
            },
        },
    ],
    tensors: Tensors::PLAIN,
    multimodal: None,
};
