//! `llama` (`LlamaForCausalLM`): dense.

use super::rules::{self, is_moe, NO_MLP_BIAS, NO_O_PROJ_BIAS, NO_WINDOW};
use super::{Check, Defaults, Entry, Family, Layers, Tensors};

/// LlamaConfig's defaults (DeepSeek-V2's too, but the vocabulary).
pub(crate) const DEFAULTS: Defaults = Defaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 11008,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: None,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
};

pub(crate) static FAMILY: Family = Family {
    model_type: "llama",
    architecture: "LlamaForCausalLM",
    name: "LLaMA",
    defaults: DEFAULTS,
    layers: Layers::PLAIN,
    keys: &[
        rules::FULL_ATTENTION,
        rules::NO_ATTENTION_BIAS,
        NO_MLP_BIAS,
        // Splitting the matmuls over `pretraining_tp` slices is the same function.
        Entry::Info(&["pretraining_tp"]),
        Entry::Rule(&NO_WINDOW),
    ],
    checks: &[
        Check {
            when: is_moe,
            says: |_, c| {
                format!(
                    "LLaMA is dense (num_local_experts = {})",
                    c.num_local_experts
                )
            },
        },
        NO_O_PROJ_BIAS,
    ],
    tensors: Tensors::PLAIN,
    multimodal: None,
};
