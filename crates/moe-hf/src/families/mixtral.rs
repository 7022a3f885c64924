//! `mixtral` (`MixtralForCausalLM`): softmax top-k over
//! `num_local_experts`, renormalised, in every layer; a window in every
//! layer or none.

use super::rules::{self, is_moe, norm_topk_prob, EVERY_LAYER_WINDOW, EXPERT_WIDTH};
use super::{field, Check, Defaults, Entry, Family, Key, Layers, Tensors, Windows};

pub(crate) static FAMILY: Family = Family {
    model_type: "mixtral",
    architecture: "MixtralForCausalLM",
    name: "Mixtral",
    defaults: Defaults {
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: Some(8),
        max_position_embeddings: 4096 * 32,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
    },
    layers: Layers {
        windows: Windows::EveryLayer,
        ..Layers::PLAIN
    },
    keys: &[
        rules::FULL_ATTENTION,
        // No dense layer: `intermediate_size` is the experts' width.
        EXPERT_WIDTH,
        Entry::Int(Key::new("num_local_experts", field!(num_local_experts), 8)),
        rules::experts_per_token(2),
        rules::aux_loss(0.001),
        rules::NO_ROUTER_JITTER,
        Entry::Rule(&EVERY_LAYER_WINDOW),
    ],
    checks: &[
        Check {
            when: |c| !is_moe(c) || c.first_k_dense_replace != 0 || c.shared_experts().is_some(),
            says: |_, c| {
                format!(
                    "Mixtral has MoE layers only, without shared experts (num_local_experts = \
                     {}, first_k_dense_replace = {}, shared_expert_intermediate_size = {:?})",
                    c.num_local_experts, c.first_k_dense_replace, c.shared_expert_intermediate_size
                )
            },
        },
        Check {
            when: |c| !norm_topk_prob(c),
            says: |_, _| "Mixtral renormalises the top-k weights (norm_topk_prob = true)".into(),
        },
        Check {
            when: |c| c.attention_bias,
            says: |_, _| "Mixtral's attention has no bias".into(),
        },
    ],
    tensors: Tensors {
        projections: ["w1", "w3", "w2"],
        per_expert_module: "block_sparse_moe",
        // transformers 5's packed checkpoints name it `mlp.gate`.
        router: ["block_sparse_moe.gate", "mlp.gate"],
        ..Tensors::PLAIN
    },
    multimodal: None,
};
