//! Entries and rules more than one family shares: the keys every family
//! maps ([`COMMON`]), the informational keys of every family, fields that
//! are no plain decoder field, and the [`Rule`]s of keys that map onto
//! several fields (RoPE, windows, layer layouts, routers, latent attention).

use super::{field, Check, Entry, Field, Fixed, Gates, Key, KeyDefault, Layers, Lit, Rule};
use crate::config::Reader;
use moe_core::{MoeError, Result};
use moe_experts::Activation;
use moe_models::{DecoderConfig, LatentAttention, LayerType};
use moe_routers::Gate;
use serde_json::{json, Map, Value};

/// Keys of every family's `config.json` that do not change the logits.
pub(crate) const INFORMATIONAL: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "attn_implementation",
    "_attn_implementation_autoset",
    "auto_map",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "initializer_range",
    "output_router_logits",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    // Generation defaults (generation_config.json holds the ones that count).
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// The keys every family maps, walked before the family's own: the sizes,
/// the attention's shape, RoPE, the norms' epsilon, SiLU.
pub(crate) static COMMON: [Entry; 13] = [
    family_default!(Int, num_attention_heads),
    family_default!(Int, max_position_embeddings),
    Entry::Rule(&ROPE),
    family_default!(Int, vocab_size),
    family_default!(Int, hidden_size),
    // The dense MLPs' width ([`EXPERT_WIDTH`] where the experts have it).
    family_default!(Int, intermediate_size),
    family_default!(Int, num_hidden_layers),
    Entry::Int(Key::with(
        "num_key_value_heads",
        field!(num_key_value_heads),
        KeyDefault::Family(|d, c| d.num_key_value_heads.unwrap_or(c.num_attention_heads)),
    )),
    Entry::OptInt(Key::new("head_dim", field!(head_dim), None)),
    family_default!(Float, rms_norm_eps),
    Entry::Float(Key::new(
        "attention_dropout",
        field!(attention_dropout),
        0.0,
    )),
    Entry::Bool(Key::new(
        "tie_word_embeddings",
        field!(tie_word_embeddings),
        false,
    )),
    // SwiGLU experts and MLPs.
    Entry::Fixed(Fixed {
        key: "hidden_act",
        accepts: &[Lit::Str("silu"), Lit::Str("swish")],
        supported: "\"silu\" (SwiGLU)",
        written: true,
    }),
];

/// The entry of a key named as the decoder field it holds, whose default is
/// the family's [`super::Defaults`] field of that name.
macro_rules! family_default {
    ($kind:ident, $name:ident) => {
        Entry::$kind(Key::with(
            stringify!($name),
            field!($name),
            KeyDefault::Family(|d, _| d.$name),
        ))
    };
}
use family_default;

/// transformers 5's `layer_types` of a family without windows: every layer
/// `full_attention`.
pub(crate) const FULL_ATTENTION: Entry = Entry::Fixed(FULL_ATTENTION_LAYERS);

/// [`FULL_ATTENTION`]'s key.
const FULL_ATTENTION_LAYERS: Fixed = Fixed {
    key: "layer_types",
    accepts: &[Lit::EveryItem("full_attention")],
    supported: "full attention in every layer (layer_types all \"full_attention\")",
    written: false,
};

/// `router_jitter_noise` 0 (Mixtral, Llama 4).
pub(crate) const NO_ROUTER_JITTER: Entry = Entry::Fixed(Fixed {
    key: "router_jitter_noise",
    accepts: &[Lit::Float(0.0)],
    supported: "router_jitter_noise 0 (no jitter on the router input)",
    written: true,
});

/// `mlp_bias` false (LLaMA's and DeepSeek-V2's MLPs have no bias).
pub(crate) const NO_MLP_BIAS: Entry = Entry::Fixed(Fixed {
    key: "mlp_bias",
    accepts: &[Lit::Bool(false)],
    supported: "mlp_bias false",
    written: true,
});

/// `attention_bias` false where a bias would include `o_proj` (which the
/// decoder biases for gpt-oss only).
pub(crate) const NO_ATTENTION_BIAS: Entry =
    no_attention_bias("attention_bias false (o_proj has no bias)");

/// `attention_bias` false; `supported` names the projections.
pub(crate) const fn no_attention_bias(supported: &'static str) -> Entry {
    Entry::Fixed(Fixed {
        key: "attention_bias",
        accepts: &[Lit::Bool(false)],
        supported,
        written: true,
    })
}

/// The experts' width where `intermediate_size` is it (Mixtral, OLMoE,
/// gpt-oss: no dense MLP of another width); read as the common entry
/// reads it.
pub(crate) const EXPERT_WIDTH: Entry = Entry::Int(Key::with(
    "intermediate_size",
    Field {
        get: DecoderConfig::expert_width,
        set: |c, v| c.intermediate_size = v,
    },
    KeyDefault::Family(|d, _| d.intermediate_size),
));

/// `moe_intermediate_size`: the experts' width beside the dense MLPs'.
pub(crate) const fn moe_width(default: i64) -> Entry {
    Entry::Int(Key::new(
        "moe_intermediate_size",
        Field {
            get: DecoderConfig::expert_width,
            set: |c, v| c.moe_intermediate_size = Some(v),
        },
        default,
    ))
}

/// `head_dim` where the family's default is a number of its own, not
/// `hidden_size / num_attention_heads` (which the decoder's `None` means):
/// gpt-oss's 64, Llama 4's 128.
pub(crate) const fn head_dim(default: i64) -> Entry {
    Entry::Int(Key::new(
        "head_dim",
        Field {
            get: |c| c.attention_config().head_dim(),
            set: |c, h| {
                c.head_dim = (h * c.num_attention_heads != c.hidden_size).then_some(h);
            },
        },
        default,
    ))
}

/// `attention_bias` on q, k, v and o together (gpt-oss, Llama 4).
pub(crate) const fn qkvo_bias(default: bool) -> Entry {
    Entry::Bool(Key::new(
        "attention_bias",
        Field {
            get: |c| c.attention_bias,
            set: |c, bias| (c.attention_bias, c.o_proj_bias) = (bias, bias),
        },
        default,
    ))
}

/// `norm_topk_prob` of a softmax top-k router (`Gate::TopK`); a dense
/// config writes `true`.
pub(crate) const fn topk_norm(default: bool) -> Entry {
    Entry::Bool(Key::new(
        "norm_topk_prob",
        Field {
            get: norm_topk_prob,
            set: |c, v| c.router.gate = Gate::TopK { norm_topk_prob: v },
        },
        default,
    ))
}

/// Whether the router renormalises its top-k weights (`true` without
/// experts).
pub(crate) fn norm_topk_prob(c: &DecoderConfig) -> bool {
    match c.router.gate {
        _ if c.num_local_experts <= 0 => true,
        Gate::TopK { norm_topk_prob }
        | Gate::SigmoidAuxFree { norm_topk_prob, .. }
        | Gate::GroupLimitedGreedy { norm_topk_prob, .. } => norm_topk_prob,
        _ => true,
    }
}

/// `router_aux_loss_coef`.
pub(crate) const fn aux_loss(default: f64) -> Entry {
    Entry::Float(Key::new(
        "router_aux_loss_coef",
        field!(router_aux_loss_coef),
        default,
    ))
}

/// `num_experts_per_tok`.
pub(crate) const fn experts_per_token(default: i64) -> Entry {
    Entry::Int(Key::new(
        "num_experts_per_tok",
        field!(num_experts_per_tok),
        default,
    ))
}

/// transformers' defaults of the expert keys DeepSeek-V2, DeepSeek-V3 and
/// GLM-4.5 share.
pub(crate) struct ExpertDefaults {
    pub n_routed_experts: Key<i64>,
    pub num_experts_per_tok: KeyDefault<i64>,
    pub moe_intermediate_size: i64,
    pub n_shared_experts: i64,
    pub first_k_dense_replace: i64,
    pub routed_scaling_factor: f64,
}

/// `n_routed_experts` (the routed experts' count).
pub(crate) const fn routed_experts(default: i64) -> Key<i64> {
    Key::new("n_routed_experts", field!(num_local_experts), default)
}

/// The expert keys DeepSeek-V2, DeepSeek-V3 and GLM-4.5 share: routed and
/// shared experts, their width, the dense prefix, the routed scaling.
pub(crate) const fn deepseek_experts(d: ExpertDefaults) -> [Entry; 6] {
    [
        Entry::Int(d.n_routed_experts),
        Entry::Int(Key::with(
            "num_experts_per_tok",
            field!(num_experts_per_tok),
            d.num_experts_per_tok,
        )),
        moe_width(d.moe_intermediate_size),
        Entry::Int(Key::new(
            "n_shared_experts",
            field!(n_shared_experts),
            d.n_shared_experts,
        )),
        Entry::Int(Key::new(
            "first_k_dense_replace",
            field!(first_k_dense_replace),
            d.first_k_dense_replace,
        )),
        Entry::Float(Key::new(
            "routed_scaling_factor",
            field!(router.routed_scaling_factor),
            d.routed_scaling_factor,
        )),
    ]
}

/// The MoE layers of DeepSeek-V3 (and GLM-4.5): ungated shared experts,
/// routed scaling and the sigmoid router with the aux-free bias; DeepSeek-V2
/// changes the router, the DeepSeeks add latent attention.
pub(crate) const DEEPSEEK_MOE: Layers = Layers {
    ungated_shared_experts: true,
    routed_scaling: true,
    gates: Gates::SIGMOID_AUX_FREE,
    ..Layers::PLAIN
};

/// DeepSeek-V3's router (GLM-4.5's too): sigmoid scores with the aux-free
/// bias and group-limited top-k (`norm_topk_prob`, `n_group`,
/// `topk_group`).
pub(crate) const fn sigmoid_gate(n_group: i64, topk_group: i64) -> [Entry; 3] {
    [
        Entry::Bool(Key::new(
            "norm_topk_prob",
            Field {
                get: norm_topk_prob,
                set: |c, norm_topk_prob| {
                    c.router.gate = Gate::SigmoidAuxFree {
                        norm_topk_prob,
                        // A training setting of ours; Hugging Face has none.
                        bias_update_rate: 1e-3,
                        n_group: 1,
                        topk_group: 1,
                    }
                },
            },
            true,
        )),
        sigmoid_group!(n_group),
        sigmoid_group!(topk_group),
    ]
}

/// The entry of one of the sigmoid gate's group settings (`n_group`,
/// `topk_group`: the key, the gate's field and the default are alike
/// named).
macro_rules! sigmoid_group {
    ($part:ident) => {
        Entry::Int(Key::new(
            stringify!($part),
            Field {
                get: |c| match c.router.gate {
                    Gate::SigmoidAuxFree { $part, .. } => $part,
                    _ => 1,
                },
                set: |c, v| {
                    if let Gate::SigmoidAuxFree { $part, .. } = &mut c.router.gate {
                        *$part = v;
                    }
                },
            },
            $part,
        ))
    };
}
use sigmoid_group;

/// Keys of DeepSeek's original checkpoints (its own modeling code) that
/// transformers' classes do not read, after `scoring_func` (the family's
/// scores): every layer after the dense ones MoE, and settings that do not
/// change the causal LM (multi-token-prediction layers, which transformers
/// skips; expert-parallel size; training-only losses).
pub(crate) static DEEPSEEK_ORIGINALS: [Entry; 2] = [
    Entry::Fixed(Fixed {
        key: "moe_layer_freq",
        accepts: &[Lit::Int(1)],
        supported: "moe_layer_freq 1 (every layer after the dense ones is MoE)",
        written: false,
    }),
    Entry::Info(&[
        "num_nextn_predict_layers",
        "num_mtp_layers",
        "ep_size",
        "aux_loss_alpha",
        "seq_aux",
        "pretraining_tp",
    ]),
];

/// The RoPE base and scaling: `rope_theta` and `rope_scaling`
/// (transformers 4) or `rope_parameters` (transformers 5: `rope_theta`,
/// `rope_type` and the scheme's fields in one object), and
/// `partial_rotary_factor` (top level or in `rope_parameters`; 1 when
/// absent, another factor only where [`super::Layers::partial_rope`]).
/// Written as `rope_parameters`.
pub(crate) static ROPE: Rule = Rule {
    read: |r, c| {
        let (theta, scaling, partial) = r.rope()?;
        if partial != 1.0 && !r.family.layers.partial_rope {
            return Err(r.err(format!(
                "`partial_rotary_factor` = {partial} is not supported: the family turns every \
                 dimension of a head (1); glm4_moe takes other factors"
            )));
        }
        (c.rope_theta, c.rope_scaling, c.partial_rotary_factor) = (theta, scaling, partial);
        Ok(())
    },
    write: |c, j| {
        // transformers 5 keeps the RoPE settings in `rope_parameters` (and
        // still reads a top-level `rope_theta`, which transformers 4 wrote).
        j.insert("rope_parameters".into(), rope_parameters(c)?);
        Ok(())
    },
};

/// transformers 5's `rope_parameters` of `c`: `rope_theta`, `rope_type`,
/// the scaling scheme's fields (which transformers 4 read from
/// `rope_scaling`) and a `partial_rotary_factor` other than 1.
fn rope_parameters(c: &DecoderConfig) -> Result<Value> {
    let mut params = match &c.rope_scaling {
        None => json!({"rope_type": "default"}),
        Some(scaling) => serde_json::to_value(scaling)
            .map_err(|e| MoeError::config(format!("rope_scaling: {e}")))?,
    };
    params["rope_theta"] = json!(c.rope_theta);
    // GLM-4.5's partial RoPE (any other family has refused a factor != 1).
    if c.partial_rotary_factor != 1.0 {
        params["partial_rotary_factor"] = json!(c.partial_rotary_factor);
    }
    Ok(params)
}

/// A rule of keys only read (checks of the file), nothing written.
const fn read_only(read: fn(&mut Reader<'_>, &mut DecoderConfig) -> Result<()>) -> Rule {
    Rule {
        read,
        write: |_, _| Ok(()),
    }
}

/// `sliding_window` `null` or at least the context (it then never masks
/// anything): full attention.
pub(crate) static NO_WINDOW: Rule = read_only(|r, c| {
    let context = c.max_position_embeddings;
    r.fixed(
        "sliding_window",
        |v| v.as_i64().is_some_and(|w| w >= context),
        &format!("full attention (sliding_window null or >= max_position_embeddings = {context})"),
    )
});

/// Mixtral's `sliding_window`: every layer slides (`null`: none).
pub(crate) static EVERY_LAYER_WINDOW: Rule = Rule {
    read: |r, c| {
        c.sliding_window = r.sliding_window(None, c.max_position_embeddings)?;
        Ok(())
    },
    write: |c, j| {
        j.insert("sliding_window".into(), json!(c.sliding_window));
        Ok(())
    },
};

/// Qwen2-MoE's and Qwen3-MoE's layer layout: `decoder_sparse_step` and
/// `mlp_only_layers` as a dense prefix ([`qwen2_dense_prefix`]; no routed
/// experts at all when every layer is dense), read after `num_experts`.
/// Written as `mlp_only_layers` and step 1.
pub(crate) static QWEN_LAYERS: Rule = Rule {
    read: |r, c| {
        let step = r.int("decoder_sparse_step", 1)?;
        let mlp_only = r.int_list("mlp_only_layers")?;
        c.first_k_dense_replace =
            qwen2_dense_prefix(r, c.num_hidden_layers, c.num_local_experts, step, &mlp_only)?;
        if c.first_k_dense_replace >= c.num_hidden_layers {
            c.num_local_experts = 0;
        }
        Ok(())
    },
    write: |c, j| {
        let dense = c.first_k_dense_replace.min(c.num_hidden_layers);
        let mlp_only: Vec<i64> = if c.num_local_experts > 0 {
            (0..dense).collect()
        } else {
            Vec::new()
        };
        j.insert("decoder_sparse_step".into(), json!(1));
        j.insert("mlp_only_layers".into(), json!(mlp_only));
        Ok(())
    },
};

/// Qwen2-MoE's sliding window (`use_sliding_window`; off, `sliding_window`
/// and `max_window_layers` do not apply): the layers of `layer_types`, or
/// transformers' default, every other layer below `max_window_layers`
/// (layers 0, 2, ...). Written with explicit `layer_types`, so that
/// `max_window_layers` does not apply.
pub(crate) static QWEN2_WINDOWS: Rule = Rule {
    read: |r, c| {
        if !qwen_window(r, c)? {
            return r.fixed_key(&FULL_ATTENTION_LAYERS);
        }
        let max_window_layers = r.int("max_window_layers", 28)?;
        let types = r.layer_types()?.unwrap_or_else(|| {
            (0..c.num_hidden_layers)
                .map(|i| {
                    if (i + 1) % 2 == 1 && i < max_window_layers {
                        LayerType::SlidingAttention
                    } else {
                        LayerType::FullAttention
                    }
                })
                .collect()
        });
        set_windowed_layers(c, types);
        Ok(())
    },
    write: |c, j| {
        write_qwen_window(c, j);
        if c.sliding_window.is_some() {
            j.insert("layer_types".into(), json!(layer_types(c)));
        }
        Ok(())
    },
};

/// Qwen3-MoE's sliding window: in every layer when `use_sliding_window`.
pub(crate) static QWEN3_WINDOW: Rule = Rule {
    read: |r, c| {
        if qwen_window(r, c)? {
            r.informational(&["max_window_layers"]);
        }
        Ok(())
    },
    write: |c, j| {
        write_qwen_window(c, j);
        Ok(())
    },
};

/// Qwen's `use_sliding_window` and `sliding_window` (default 4096): whether
/// the window is on (off, its keys do not apply).
fn qwen_window(r: &mut Reader<'_>, c: &mut DecoderConfig) -> Result<bool> {
    if !r.boolean("use_sliding_window", false)? {
        r.informational(&["sliding_window", "max_window_layers"]);
        return Ok(false);
    }
    c.sliding_window = r.sliding_window(Some(4096), c.max_position_embeddings)?;
    Ok(true)
}

fn write_qwen_window(c: &DecoderConfig, j: &mut Map<String, Value>) {
    j.insert(
        "use_sliding_window".into(),
        json!(c.sliding_window.is_some()),
    );
    if let Some(window) = c.sliding_window {
        j.insert("sliding_window".into(), json!(window));
    }
}

/// gpt-oss's windows: `sliding_window` (default 128) on the layers of
/// `layer_types`, by default layers 0, 2, ... Written with the window's
/// default when no layer slides (every layer then attends fully, the value
/// is never read).
pub(crate) static ALTERNATE_WINDOWS: Rule = Rule {
    read: |r, c| {
        c.sliding_window = r.sliding_window(Some(128), c.max_position_embeddings)?;
        let types = r.layer_types()?.unwrap_or_else(|| {
            (0..c.num_hidden_layers)
                .map(|i| match i % 2 {
                    0 => LayerType::SlidingAttention,
                    _ => LayerType::FullAttention,
                })
                .collect()
        });
        set_windowed_layers(c, types);
        Ok(())
    },
    write: |c, j| {
        j.insert(
            "sliding_window".into(),
            json!(c.sliding_window.unwrap_or(128)),
        );
        j.insert("layer_types".into(), json!(layer_types(c)));
        Ok(())
    },
};

/// Each layer's attention as transformers 5's `layer_types`.
fn layer_types(c: &DecoderConfig) -> Vec<LayerType> {
    (0..c.num_hidden_layers)
        .map(|i| match c.sliding_window_of(i) {
            Some(_) => LayerType::SlidingAttention,
            None => LayerType::FullAttention,
        })
        .collect()
}

/// Qwen2-MoE's layer layout as a dense prefix: layer `i` is dense when it
/// is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0` (or
/// there are no experts). Only "the first k layers dense" is expressible.
fn qwen2_dense_prefix(
    r: &Reader<'_>,
    layers: i64,
    num_experts: i64,
    step: i64,
    mlp_only: &[i64],
) -> Result<i64> {
    if step < 1 {
        return Err(r.err(format!("`decoder_sparse_step` must be >= 1, got {step}")));
    }
    let dense: Vec<i64> = (0..layers)
        .filter(|i| mlp_only.contains(i) || num_experts <= 0 || (i + 1) % step != 0)
        .collect();
    let k = dense.len() as i64;
    if dense.iter().copied().ne(0..k) {
        return Err(r.err(format!(
            "decoder_sparse_step = {step} and mlp_only_layers = {mlp_only:?} make layers \
             {dense:?} dense; the decoder expresses only every layer MoE or a dense prefix \
             (the first k layers)"
        )));
    }
    Ok(k)
}

/// A family's per-layer windows (`layer_types`, the window already read)
/// in the decoder's canonical form ([`set_layer_kinds`]).
fn set_windowed_layers(c: &mut DecoderConfig, types: Vec<LayerType>) {
    set_layer_kinds(
        c,
        LayerType::SlidingAttention,
        |c| &mut c.sliding_window,
        types,
    );
}

/// Per-layer attention kinds (`layer_types`) that mix `kind` (sliding or
/// chunked, of the size `size` gives) with full attention, in the decoder's
/// canonical form, so that a config survives a round trip unchanged: a mix
/// is kept; every layer of `kind` is the empty list; no layer of `kind` (or
/// no size) is no size and the empty list. A list of the wrong length is
/// kept for [`DecoderConfig::validate`] to name.
pub(crate) fn set_layer_kinds(
    c: &mut DecoderConfig,
    kind: LayerType,
    size: fn(&mut DecoderConfig) -> &mut Option<i64>,
    types: Vec<LayerType>,
) {
    let all = |k: LayerType| types.iter().all(|t| *t == k);
    c.layer_types = Vec::new();
    if types.len() as i64 != c.num_hidden_layers {
        c.layer_types = types;
    } else if size(c).is_none() || all(LayerType::FullAttention) {
        *size(c) = None;
    } else if !all(kind) {
        c.layer_types = types;
    }
}

/// DeepSeek's Multi-head Latent Attention keys (V2 and V3): the ranks
/// and head widths, `qk_head_dim` and `head_dim` (transformers derives
/// them; present, they must agree), every head with its own key. RoPE turns
/// adjacent pairs (V3's `rope_interleave`, read after this rule, may say
/// otherwise).
pub(crate) static LATENT_ATTENTION: Rule = Rule {
    read: |r, c| {
        let latent = LatentAttention {
            // `null` is a full `q_proj` (DeepSeek-V2-Lite); missing is the default.
            q_lora_rank: match r.json.get("q_lora_rank") {
                Some(Value::Null) => None,
                _ => Some(r.int("q_lora_rank", 1536)?),
            },
            kv_lora_rank: r.int("kv_lora_rank", 512)?,
            qk_nope_head_dim: r.int("qk_nope_head_dim", 128)?,
            qk_rope_head_dim: r.int("qk_rope_head_dim", 64)?,
            v_head_dim: r.int("v_head_dim", 128)?,
            rope_interleave: true,
        };
        r.informational(&["q_lora_rank"]);
        let qk_head_dim = latent.qk_nope_head_dim + latent.qk_rope_head_dim;
        r.fixed(
            "qk_head_dim",
            |v| v.as_i64() == Some(qk_head_dim),
            &format!("qk_head_dim = qk_nope_head_dim + qk_rope_head_dim = {qk_head_dim}"),
        )?;
        // transformers builds the RoPE tables `head_dim` wide.
        let rope_dim = latent.qk_rope_head_dim;
        r.fixed(
            "head_dim",
            |v| v.as_i64() == Some(rope_dim),
            &format!("head_dim = qk_rope_head_dim = {rope_dim} (the width RoPE turns)"),
        )?;
        c.head_dim = None;
        // Every head has its own key in MLA.
        c.num_key_value_heads = c.num_attention_heads;
        c.latent_attention = Some(latent);
        Ok(())
    },
    write: |c, j| {
        let latent = c.latent_attention.expect("checked by from_decoder");
        j.insert("q_lora_rank".into(), json!(latent.q_lora_rank));
        j.insert("kv_lora_rank".into(), json!(latent.kv_lora_rank));
        j.insert("qk_nope_head_dim".into(), json!(latent.qk_nope_head_dim));
        j.insert("qk_rope_head_dim".into(), json!(latent.qk_rope_head_dim));
        j.insert(
            "qk_head_dim".into(),
            json!(latent.qk_nope_head_dim + latent.qk_rope_head_dim),
        );
        j.insert("v_head_dim".into(), json!(latent.v_head_dim));
        j.insert("head_dim".into(), json!(latent.qk_rope_head_dim));
        j.insert("num_key_value_heads".into(), json!(c.num_attention_heads));
        Ok(())
    },
};

/// DeepSeek-V3's `rope_interleave` (after [`LATENT_ATTENTION`]).
pub(crate) const ROPE_INTERLEAVE: Entry = Entry::Bool(Key::new(
    "rope_interleave",
    Field {
        get: |c| c.latent_attention.is_none_or(|l| l.rope_interleave),
        set: |c, v| {
            if let Some(latent) = c.latent_attention.as_mut() {
                latent.rope_interleave = v;
            }
        },
    },
    true,
));

/// gpt-oss's clamped SwiGLU experts: `swiglu_alpha`, `swiglu_limit`.
pub(crate) static CLAMPED_SWIGLU: Rule = Rule {
    read: |r, c| {
        c.expert_activation = Activation::ClampedSwiGlu {
            alpha: r.float("swiglu_alpha", 1.702)?,
            limit: r.float("swiglu_limit", 7.0)?,
        };
        Ok(())
    },
    write: |c, j| {
        if let Activation::ClampedSwiGlu { alpha, limit } = c.expert_activation {
            j.insert("swiglu_alpha".into(), json!(alpha));
            j.insert("swiglu_limit".into(), json!(limit));
        }
        Ok(())
    },
};

/// A bias on q, k and v would bias `o_proj` too in transformers' class.
pub(crate) const NO_O_PROJ_BIAS: Check = Check {
    when: |c| c.attention_bias,
    says: |f, _| format!("{}'s attention bias would include o_proj", f.name),
};

/// Every layer MoE, no shared experts (OLMoE, gpt-oss).
pub(crate) const MOE_ONLY: Check = Check {
    when: |c| !is_moe(c) || c.first_k_dense_replace != 0 || c.shared_experts().is_some(),
    says: |f, c| {
        format!(
            "{} has MoE layers only, without shared experts (num_local_experts = {}, \
             first_k_dense_replace = {})",
            f.name, c.num_local_experts, c.first_k_dense_replace
        )
    },
};

/// Routed experts and DeepSeek's ungated shared ones (DeepSeek-V2/V3,
/// GLM-4.5).
pub(crate) const ROUTED_AND_UNGATED_SHARED: Check = Check {
    when: |c| !is_moe(c) || c.shared_expert_intermediate_size.is_some(),
    says: |f, c| {
        format!(
            "{} has routed experts and ungated shared ones (num_local_experts = {}, \
             shared_expert_intermediate_size = {:?})",
            f.name, c.num_local_experts, c.shared_expert_intermediate_size
        )
    },
};

/// Whether the decoder has routed experts.
pub(crate) fn is_moe(c: &DecoderConfig) -> bool {
    c.num_local_experts > 0
}
