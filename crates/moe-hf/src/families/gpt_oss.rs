//! `gpt_oss` (`GptOssForCausalLM`, gpt-oss-20b/120b): grouped-query
//! attention with biases on q, k, v and o, learned attention sinks and
//! sliding windows on alternate layers (`layer_types`); a biased router
//! whose top-k logits are softmaxed; experts with biases and the clamped
//! SwiGLU (`swiglu_alpha`, `swiglu_limit`), fused as `gate_up_proj`
//! `[E, H, 2I]` with gate and up columns interleaved, MXFP4 on the hub.

use super::rules::{
    self, norm_topk_prob, ALTERNATE_WINDOWS, CLAMPED_SWIGLU, EXPERT_WIDTH, MOE_ONLY,
};
use super::{
    field, Check, Defaults, Entry, ExpertTensors, Family, Key, Layers, Rule, Tensors, Windows,
};
use moe_experts::Activation;
use moe_nn::RopeScaling;
use serde_json::Value;

/// GptOssConfig's RoPE when the file has none: YaRN over 4096 original
/// positions, factor 32, not truncated (read after the common RoPE keys).
static DEFAULT_ROPE: Rule = Rule {
    read: |r, c| {
        if c.rope_scaling.is_none()
            && !r.json.contains_key("rope_parameters")
            && !r.json.contains_key("rope_scaling")
        {
            c.rope_scaling = Some(RopeScaling::Yarn {
                factor: 32.0,
                original_max_position_embeddings: Some(4096),
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: false,
            });
        }
        Ok(())
    },
    // `rope_parameters` says it.
    write: |_, _| Ok(()),
};

/// The hub's experts in MXFP4: the weight loader dequantises their
/// `*_blocks` and `*_scales`; nothing is written (we write floats).
static MXFP4: Rule = Rule {
    read: |r, _| {
        if let Some(q) = r.value("quantization_config") {
            let method = q.get("quant_method").and_then(Value::as_str);
            if method != Some("mxfp4") {
                return Err(r.err(format!(
                    "`quantization_config` = {q} is not supported: gpt-oss's MXFP4 experts \
                     (quant_method \"mxfp4\") are dequantised on load, other methods are not \
                     read"
                )));
            }
        }
        Ok(())
    },
    write: |_, _| Ok(()),
};

pub(crate) static FAMILY: Family = Family {
    model_type: "gpt_oss",
    architecture: "GptOssForCausalLM",
    name: "gpt-oss",
    defaults: Defaults {
        vocab_size: 201088,
        hidden_size: 2880,
        intermediate_size: 2880,
        num_hidden_layers: 36,
        num_attention_heads: 64,
        num_key_value_heads: Some(8),
        max_position_embeddings: 131072,
        rms_norm_eps: 1e-5,
        rope_theta: 150000.0,
    },
    layers: Layers {
        attention_sinks: true,
        biased_clamped_experts: true,
        o_proj_bias: true,
        windows: Windows::PerLayer,
        router_bias: true,
        ..Layers::PLAIN
    },
    keys: &[
        EXPERT_WIDTH,
        Entry::Int(Key::new("num_local_experts", field!(num_local_experts), 128).or("num_experts")),
        rules::experts_per_token(4),
        rules::aux_loss(0.001),
        rules::head_dim(64),
        Entry::Rule(&CLAMPED_SWIGLU),
        rules::qkvo_bias(true),
        Entry::Rule(&ALTERNATE_WINDOWS),
        Entry::Rule(&DEFAULT_ROPE),
        Entry::Rule(&MXFP4),
    ],
    checks: &[
        MOE_ONLY,
        Check {
            when: |c| !norm_topk_prob(c),
            says: |_, _| "gpt-oss softmaxes the top-k logits (norm_topk_prob = true)".into(),
        },
        Check {
            when: |c| !matches!(c.expert_activation, Activation::ClampedSwiGlu { .. }),
            says: |_, _| "gpt-oss's experts are clamped SwiGLUs".into(),
        },
    ],
    tensors: Tensors {
        router: ["mlp.router", "mlp.router"],
        experts: ExpertTensors::FusedInterleaved,
        mxfp4: true,
        ..Tensors::PLAIN
    },
    multimodal: None,
};
