//! `deepseek_v3` (`DeepseekV3ForCausalLM`): Multi-head Latent Attention, a
//! sigmoid router with the aux-free bias (`e_score_correction_bias`) and
//! group-limited top-k, routed scaling, shared experts and a dense prefix
//! (`first_k_dense_replace`).

use super::rules::{self, ExpertDefaults, LATENT_ATTENTION, ROUTED_AND_UNGATED_SHARED};
use super::{field, Defaults, Entry, Family, Fixed, Key, KeyDefault, Layers, Lit, Tensors};

static EXPERTS: [Entry; 6] = rules::deepseek_experts(ExpertDefaults {
    n_routed_experts: rules::routed_experts(256),
    num_experts_per_tok: KeyDefault::Is(8),
    moe_intermediate_size: 2048,
    n_shared_experts: 1,
    first_k_dense_replace: 3,
    routed_scaling_factor: 2.5,
});

static GATE: [Entry; 3] = rules::sigmoid_gate(8, 4);

pub(crate) static FAMILY: Family = Family {
    model_type: "deepseek_v3",
    architecture: "DeepseekV3ForCausalLM",
    name: "DeepSeek-V3",
    defaults: Defaults {
        vocab_size: 129280,
        hidden_size: 7168,
        intermediate_size: 18432,
        num_hidden_layers: 61,
        num_attention_heads: 128,
        num_key_value_heads: Some(128),
        max_position_embeddings: 4096,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
    },
    layers: Layers {
        latent_attention: true,
        ..rules::DEEPSEEK_MOE
    },
    keys: &[
        rules::FULL_ATTENTION,
        Entry::Table(&EXPERTS),
        Entry::Table(&GATE),
        Entry::Bool(Key::new("attention_bias", field!(attention_bias), false)),
        Entry::Rule(&LATENT_ATTENTION),
        rules::ROPE_INTERLEAVE,
        // The original checkpoints' keys (DeepSeek's own modeling code).
        Entry::Fixed(Fixed {
            key: "topk_method",
            accepts: &[Lit::Str("noaux_tc")],
            supported: "\"noaux_tc\" (group-limited top-k on the bias-corrected scores)",
            written: false,
        }),
        Entry::Fixed(Fixed {
            key: "scoring_func",
            accepts: &[Lit::Str("sigmoid")],
            supported: "\"sigmoid\" scores",
            written: false,
        }),
        Entry::Table(&rules::DEEPSEEK_ORIGINALS),
        Entry::Written("num_nextn_predict_layers", Lit::Int(0)),
    ],
    checks: &[ROUTED_AND_UNGATED_SHARED],
    tensors: Tensors {
        extra_layers_skipped: true,
        ..Tensors::PLAIN
    },
    multimodal: None,
};
