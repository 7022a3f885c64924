//! `llama4_text` (`Llama4ForCausalLM`, the text model of Llama 4 Scout and
//! Maverick): MoE layers (`interleave_moe_layer_step`, `moe_layers`) of a
//! sigmoid top-1 router whose weight scales the expert's input, with a
//! shared expert of the experts' width, between dense MLPs of
//! `intermediate_size_mlp`; grouped-query attention with RoPE on adjacent
//! pairs, chunked (`attention_chunk_size`) in the RoPE layers, which the
//! weightless L2 QK-norm normalises (`use_qk_norm`), and every
//! `no_rope_layer_interval`-th layer without RoPE, attending to all with
//! temperature-tuned queries (`attn_temperature_tuning`, `floor_scale`,
//! `attn_scale`); experts fused as `gate_up_proj` `[E, H, 2I]` (gate and up
//! halves) and `down_proj` `[E, I, H]`.

use super::rules::{self, is_moe, set_layer_kinds};
use super::{
    field, Check, Defaults, Entry, ExpertTensors, Family, Field, Gates, Key, Layers, QkNorms, Rule,
    Tensors,
};
use moe_models::{DecoderConfig, LayerType};
use moe_nn::{QkNorm, TemperatureTuning};
use moe_routers::{Gate, WeightsOn};
use serde_json::json;

/// Llama4TextConfig's `floor_scale` and `attn_scale`.
const TEMPERATURE: TemperatureTuning = TemperatureTuning {
    floor_scale: 8192.0,
    attn_scale: 0.1,
};

/// The router: the sigmoid of the top-k logits scaling the experts' inputs,
/// and the shared expert every MoE layer has (no keys).
static ROUTER: Rule = Rule {
    read: |_, c| {
        c.router.gate = Gate::SigmoidTopK;
        c.router.weights_on = WeightsOn::Input;
        c.n_shared_experts = i64::from(is_moe(c));
        Ok(())
    },
    write: |_, _| Ok(()),
};

/// The MoE layers: every `interleave_moe_layer_step`-th (layers `step - 1`,
/// `2 step - 1`, ...), or the list `moe_layers`, which must be the layers
/// past a dense prefix on such a step. Written as both.
static MOE_LAYERS: Rule = Rule {
    read: |r, c| {
        let step = r.int("interleave_moe_layer_step", 1)?;
        if step < 1 {
            return Err(r.err(format!(
                "`interleave_moe_layer_step` must be >= 1, got {step}"
            )));
        }
        c.interleave_moe_layer_step = step;
        let listed = r.json.get("moe_layers").is_some_and(|v| !v.is_null());
        let moe_layers = r.int_list("moe_layers")?;
        if !listed {
            return Ok(());
        }
        if moe_layers.is_empty() {
            (c.num_local_experts, c.interleave_moe_layer_step) = (0, 1);
            return Ok(());
        }
        let layers = c.num_hidden_layers;
        let prefix = (0..=layers).find(|&k| {
            let trial = DecoderConfig {
                first_k_dense_replace: k,
                ..c.clone()
            };
            (0..layers)
                .filter(|&i| trial.is_moe_layer(i))
                .eq(moe_layers.iter().copied())
        });
        match prefix {
            Some(k) => {
                c.first_k_dense_replace = k;
                Ok(())
            }
            None => Err(r.err(format!(
                "moe_layers = {moe_layers:?} with interleave_moe_layer_step = {step}: the \
                 decoder expresses every step-th layer past a dense prefix"
            ))),
        }
    },
    write: |c, j| {
        let moe_layers: Vec<i64> = (0..c.num_hidden_layers)
            .filter(|&i| c.is_moe_layer(i))
            .collect();
        j.insert(
            "interleave_moe_layer_step".into(),
            json!(c.interleave_moe_layer_step),
        );
        j.insert("moe_layers".into(), json!(moe_layers));
        Ok(())
    },
};

/// The attention of each layer: RoPE or not (`no_rope_layers`, 1 where a
/// layer turns positions; by default every `no_rope_layer_interval`-th
/// layer, 4, turns none), chunked or full (`layer_types`, by default
/// chunked where RoPE turns; chunks of `attention_chunk_size`, 8192, `null`
/// none), the L2 QK-norm of the RoPE layers (`use_qk_norm`) and the
/// temperature of the others' queries.
static ATTENTION: Rule = Rule {
    read: |r, c| {
        let layers = c.num_hidden_layers;
        let interval = r.int("no_rope_layer_interval", 4)?;
        let mut flags = r.int_list("no_rope_layers")?;
        if flags.is_empty() {
            if interval < 1 {
                return Err(r.err(format!(
                    "`no_rope_layer_interval` must be >= 1, got {interval}"
                )));
            }
            flags = (0..layers)
                .map(|i| i64::from((i + 1) % interval != 0))
                .collect();
        }
        if flags.len() as i64 != layers || flags.iter().any(|f| !matches!(f, 0 | 1)) {
            return Err(r.err(format!(
                "`no_rope_layers` must flag each of the {layers} layers 1 (RoPE) or 0 (none), \
                 got {flags:?}"
            )));
        }
        c.rope_interleave = true;
        c.nope_layers = (0..layers).filter(|&i| flags[i as usize] == 0).collect();
        let chunk = match r.json.get("attention_chunk_size") {
            None => Some(8192),
            Some(_) => r.opt_int("attention_chunk_size")?,
        };
        let types = r.layer_types()?.unwrap_or_else(|| {
            flags
                .iter()
                .map(|&rope| match rope {
                    1 => LayerType::ChunkedAttention,
                    _ => LayerType::FullAttention,
                })
                .collect()
        });
        if types.contains(&LayerType::SlidingAttention) {
            return Err(r.err(format!(
                "layer_types = {types:?}: Llama 4's layers attend in chunks or fully, none slides"
            )));
        }
        // No chunk when none applies (`null`, or at least the context).
        c.attention_chunk_size = chunk.filter(|&size| size < c.max_position_embeddings);
        set_layer_kinds(
            c,
            LayerType::ChunkedAttention,
            |c| &mut c.attention_chunk_size,
            types,
        );
        c.qk_norm = match r.boolean("use_qk_norm", true)? {
            true => QkNorm::L2,
            false => QkNorm::None,
        };
        let tuning = r.boolean("attn_temperature_tuning", true)?;
        let floor_scale = r.float("floor_scale", TEMPERATURE.floor_scale)?;
        let attn_scale = r.float("attn_scale", TEMPERATURE.attn_scale)?;
        c.attn_temperature_tuning =
            (tuning && !c.nope_layers.is_empty()).then_some(TemperatureTuning {
                floor_scale,
                attn_scale,
            });
        Ok(())
    },
    write: |c, j| {
        let rope: Vec<i64> = (0..c.num_hidden_layers)
            .map(|i| i64::from(c.uses_rope(i)))
            .collect();
        let types: Vec<LayerType> = (0..c.num_hidden_layers)
            .map(|i| match c.attention_chunk_of(i) {
                Some(_) => LayerType::ChunkedAttention,
                None => LayerType::FullAttention,
            })
            .collect();
        let t = c.attn_temperature_tuning.unwrap_or(TEMPERATURE);
        j.insert("no_rope_layers".into(), json!(rope));
        j.insert("layer_types".into(), json!(types));
        j.insert("attention_chunk_size".into(), json!(c.attention_chunk_size));
        j.insert("use_qk_norm".into(), json!(c.qk_norm == QkNorm::L2));
        j.insert(
            "attn_temperature_tuning".into(),
            json!(c.attn_temperature_tuning.is_some()),
        );
        // Llama4TextConfig types `floor_scale` as an integer.
        let floor = t.floor_scale;
        j.insert(
            "floor_scale".into(),
            match floor.fract() == 0.0 {
                true => json!(floor as i64),
                false => json!(floor),
            },
        );
        j.insert("attn_scale".into(), json!(t.attn_scale));
        Ok(())
    },
};

/// The keys of Llama 4's text model; the multimodal family reads them too.
pub(crate) static KEYS: [Entry; 11] = [
    // The experts' (and shared expert's) width; the dense MLPs' is
    // `intermediate_size_mlp`.
    Entry::Int(Key::new(
        "intermediate_size",
        Field {
            get: DecoderConfig::expert_width,
            set: |c, v| c.moe_intermediate_size = Some(v),
        },
        8192,
    )),
    Entry::Int(Key::new(
        "intermediate_size_mlp",
        field!(intermediate_size),
        16384,
    )),
    Entry::Int(Key::new("num_local_experts", field!(num_local_experts), 16)),
    rules::experts_per_token(1),
    rules::aux_loss(0.001),
    rules::NO_ROUTER_JITTER,
    Entry::Rule(&MOE_LAYERS),
    Entry::Rule(&ROUTER),
    rules::head_dim(128),
    rules::qkvo_bias(false),
    Entry::Rule(&ATTENTION),
];

/// Llama 4's text model's layers.
pub(crate) const LAYERS: Layers = Layers {
    o_proj_bias: true,
    ungated_shared_experts: true,
    qk_norm: QkNorms::OrNone(QkNorm::L2),
    gates: Gates::SIGMOID_TOP_K,
    weights_on_input: true,
    interleaved_moe: true,
    llama4_attention: true,
    ..Layers::PLAIN
};

/// What Llama 4's MoE layers cannot be.
pub(crate) static CHECKS: [Check; 1] = [Check {
    when: |c| is_moe(c) && (c.n_shared_experts != 1 || c.shared_expert_intermediate_size.is_some()),
    says: |f, c| {
        format!(
            "{}'s MoE layers have one ungated shared expert of the experts' width \
             (n_shared_experts = {}, shared_expert_intermediate_size = {:?})",
            f.name, c.n_shared_experts, c.shared_expert_intermediate_size
        )
    },
}];

/// Llama 4's tensor names under `prefix`.
pub(crate) const fn tensors(
    prefix: &'static str,
    other_towers: &'static [&'static str],
) -> Tensors {
    Tensors {
        prefix,
        mlp_module: "feed_forward",
        router: ["feed_forward.router", "feed_forward.router"],
        shared_experts: "feed_forward.shared_expert",
        experts: ExpertTensors::FusedHalves,
        other_towers,
        ..Tensors::PLAIN
    }
}

/// Llama4TextConfig's defaults (Llama 4 Scout's text model).
pub(crate) const DEFAULTS: Defaults = Defaults {
    vocab_size: 202048,
    hidden_size: 5120,
    intermediate_size: 8192,
    num_hidden_layers: 48,
    num_attention_heads: 40,
    num_key_value_heads: Some(8),
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-5,
    rope_theta: 500000.0,
};

pub(crate) static FAMILY: Family = Family {
    model_type: "llama4_text",
    architecture: "Llama4ForCausalLM",
    name: "Llama 4",
    defaults: DEFAULTS,
    layers: LAYERS,
    keys: &KEYS,
    checks: &CHECKS,
    tensors: tensors("", &[]),
    multimodal: None,
};
