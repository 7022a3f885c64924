//! The Hugging Face model types this crate reads and writes.

use crate::families::{self, Family};
use moe_core::{MoeError, Result};
use std::fmt;
use std::str::FromStr;

/// A `model_type` of Hugging Face's `config.json` that maps onto the decoder
/// family ([`moe_models::DecoderModel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HfFamily {
    /// `mixtral` (`MixtralForCausalLM`): softmax top-k over
    /// `num_local_experts`, renormalised.
    Mixtral,
    /// `qwen2_moe` (`Qwen2MoeForCausalLM`): q/k/v bias, fine-grained experts
    /// and a sigmoid-gated shared expert.
    Qwen2Moe,
    /// `qwen3_moe` (`Qwen3MoeForCausalLM`): Qwen2-MoE's layers without the
    /// shared expert, with QK-norm per head (`RMSNorm(head_dim)`).
    Qwen3Moe,
    /// `olmoe` (`OlmoeForCausalLM`): QK-norm over the projections.
    Olmoe,
    /// `llama` (`LlamaForCausalLM`): dense.
    Llama,
    /// `deepseek_v3` (`DeepseekV3ForCausalLM`): Multi-head Latent
    /// Attention, a sigmoid router with the aux-free bias
    /// (`e_score_correction_bias`) and group-limited top-k, routed scaling,
    /// shared experts and a dense prefix (`first_k_dense_replace`).
    DeepseekV3,
    /// `deepseek_v2` (`DeepseekV2ForCausalLM`, V2 and V2-Lite): DeepSeek-V3's
    /// attention and layer layout with a softmax router, `greedy` or
    /// `group_limited_greedy` (groups scored by their best probability),
    /// weights not renormalised, times `routed_scaling_factor`.
    DeepseekV2,
    /// `glm4_moe` (`Glm4MoeForCausalLM`, GLM-4.5/4.6/4.7): DeepSeek-V3's
    /// router, shared experts and dense prefix under grouped-query attention
    /// with q/k/v biases, optional QK-norm per head and RoPE on part of each
    /// head (`partial_rotary_factor`).
    Glm4Moe,
    /// `gpt_oss` (`GptOssForCausalLM`, gpt-oss-20b/120b): grouped-query
    /// attention with biases on q, k, v and o, learned attention sinks and
    /// sliding windows on alternate layers (`layer_types`); a biased
    /// router whose top-k logits are softmaxed; experts with biases and the
    /// clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`), fused as
    /// `gate_up_proj` `[E, H, 2I]` with gate and up columns interleaved.
    GptOss,
    /// `llama4_text` (`Llama4ForCausalLM`, Llama 4's text model): MoE
    /// layers between dense ones, a sigmoid top-1 router scaling the
    /// expert's input and a shared expert; RoPE on adjacent pairs with the
    /// L2 QK-norm and chunked attention, every fourth layer without RoPE
    /// with temperature-tuned queries; experts fused as `gate_up_proj`
    /// `[E, H, 2I]` in gate and up halves.
    Llama4Text,
    /// `llama4` (`Llama4ForConditionalGeneration`, the Hub's Llama 4
    /// folders): its `text_config` and the weights under `language_model.`
    /// are read as [`HfFamily::Llama4Text`], the vision tower skipped; a
    /// save writes `llama4_text`.
    Llama4,
}

impl HfFamily {
    /// Every model type this crate reads and writes.
    pub const ALL: [HfFamily; 11] = [
        HfFamily::Mixtral,
        HfFamily::Qwen2Moe,
        HfFamily::Qwen3Moe,
        HfFamily::DeepseekV3,
        HfFamily::DeepseekV2,
        HfFamily::Glm4Moe,
        HfFamily::GptOss,
        HfFamily::Llama4Text,
        HfFamily::Llama4,
        HfFamily::Olmoe,
        HfFamily::Llama,
    ];

    /// The family's table: its keys, defaults, checks and tensor names.
    pub(crate) fn table(self) -> &'static Family {
        match self {
            HfFamily::Mixtral => &families::mixtral::FAMILY,
            HfFamily::Qwen2Moe => &families::qwen2_moe::FAMILY,
            HfFamily::Qwen3Moe => &families::qwen3_moe::FAMILY,
            HfFamily::Olmoe => &families::olmoe::FAMILY,
            HfFamily::Llama => &families::llama::FAMILY,
            HfFamily::DeepseekV3 => &families::deepseek_v3::FAMILY,
            HfFamily::DeepseekV2 => &families::deepseek_v2::FAMILY,
            HfFamily::Glm4Moe => &families::glm4_moe::FAMILY,
            HfFamily::GptOss => &families::gpt_oss::FAMILY,
            HfFamily::Llama4Text => &families::llama4_text::FAMILY,
            HfFamily::Llama4 => &families::llama4::FAMILY,
        }
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        self.table().model_type
    }

    /// The class transformers builds (`config.json`'s `architectures`).
    pub fn architecture(self) -> &'static str {
        self.table().architecture
    }

    /// The family a model loaded from this one saves as: its own, or a
    /// multimodal family's text model (`llama4` -> `llama4_text`).
    pub fn saved_as(self) -> HfFamily {
        match &self.table().multimodal {
            Some(m) => m.text_model_type.parse().unwrap_or(self),
            None => self,
        }
    }

    /// Whether the family has MoE layers (LLaMA is dense).
    pub fn is_moe(self) -> bool {
        self != HfFamily::Llama
    }

    /// The model types, for messages: "mixtral, qwen2_moe, qwen3_moe,
    /// deepseek_v3, deepseek_v2, glm4_moe, gpt_oss, llama4_text, llama4,
    /// olmoe, llama".
    pub fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|f| f.model_type())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for HfFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.model_type())
    }
}

impl FromStr for HfFamily {
    type Err = MoeError;

    /// A `model_type` of [`HfFamily::ALL`]; any other is an error naming
    /// the supported ones.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.model_type() == s)
            .ok_or_else(|| {
                MoeError::config(format!(
                    "model_type `{s}` is not supported: expected one of {}",
                    Self::supported_list()
                ))
            })
    }
}
