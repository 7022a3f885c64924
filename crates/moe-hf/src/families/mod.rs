//! One table per Hugging Face family: how its `config.json` maps onto
//! [`DecoderConfig`] and how its checkpoint names the decoder's tensors.
//!
//! # The table model
//!
//! A [`Family`] is data: its `model_type` and architecture, transformers'
//! [`Defaults`], the [`Layers`] its decoder layers always have, its key
//! table ([`Entry`]s), the [`Check`]s that refuse a decoder config it cannot
//! express, and its [`Tensors`] names. Two generic interpreters read the
//! tables: [`crate::HfConfig::to_decoder`] walks [`rules::COMMON`] and then
//! the family's entries, reading each key into the decoder config, and
//! [`crate::HfConfig::from_decoder`] walks the same entries in the same
//! order, writing each key from the decoder config. An entry holds both
//! directions side by side (a [`Key`]'s [`Field`] is a getter and a setter
//! of one decoder field; a [`Rule`] a read and a write function), so the
//! two directions cannot drift apart. A later entry for the same key
//! overrides what an earlier one writes (Mixtral's `intermediate_size` is
//! the experts' width, the common entry's is the dense MLPs').
//!
//! # Key policy
//!
//! Every key of `config.json` is in one of four sets for its family:
//!
//! - **mapped**: read into [`DecoderConfig`] (`hidden_size`,
//!   `num_local_experts`, ...) by a [`Key`] or a [`Rule`]; a missing or
//!   `null` key takes transformers' default for that family;
//! - **fixed**: a key the decoder implements at one setting only
//!   ([`Fixed`]: `hidden_act: "silu"`, OLMoE's `clip_qkv: null`, Mixtral's
//!   `router_jitter_noise: 0`, `sliding_window` no shorter than the context,
//!   LLaMA's `mlp_bias: false`, ...): any other value is an error naming
//!   the key, the value and what is supported;
//! - **informational**: keys that do not change the computation of the
//!   model's logits ([`rules::INFORMATIONAL`] for every family:
//!   `architectures`, `torch_dtype`/`dtype`, `transformers_version`, token
//!   ids, `use_cache`, `initializer_range`, `output_router_logits`,
//!   generation defaults, label maps, ...; [`Entry::Info`] for a family's
//!   own): ignored;
//! - **unknown**: anything else is an error, because a key this reader does
//!   not know may change the model (`quantization_config`,
//!   `partial_rotary_factor`, ...). [`crate::LoadOptions::ignore_keys`] lets a
//!   caller who knows better ignore it.
//!
//! # Adding a family
//!
//! 1. Write `families/<model_type>.rs` with a `pub(crate) static FAMILY:
//!    Family`: transformers' defaults (its config class), the [`Layers`]
//!    (start from [`Layers::PLAIN`]), the key table (reuse the [`rules`]
//!    that fit, write a new [`Rule`] for a key that is no plain field), the
//!    checks, and the tensor names (start from [`Tensors::PLAIN`]).
//! 2. Add the module below, a variant to [`crate::HfFamily`] (and to its
//!    `ALL`) and its arm in `HfFamily::table`.
//! 3. Add a transformers fixture (`tests/data/hf`, `cargo xtask
//!    hf-fixtures`) and a case of `tests/ours.rs`, so that both directions
//!    are checked against transformers.

pub(crate) mod rules;

pub(crate) mod deepseek_v2;
pub(crate) mod deepseek_v3;
pub(crate) mod glm4_moe;
pub(crate) mod gpt_oss;
pub(crate) mod llama;
pub(crate) mod llama4;
pub(crate) mod llama4_text;
pub(crate) mod mixtral;
pub(crate) mod olmoe;
pub(crate) mod qwen2_moe;
pub(crate) mod qwen3_moe;

use crate::config::Reader;
use moe_core::Result;
use moe_models::DecoderConfig;
use moe_nn::QkNorm;
use moe_routers::Gate;
use serde_json::{json, Map, Value};

/// A Hugging Face family: everything the crate knows of one `model_type`.
pub(crate) struct Family {
    /// `config.json`'s `model_type`.
    pub model_type: &'static str,
    /// The causal-LM class transformers builds (`architectures`).
    pub architecture: &'static str,
    /// The family's name in messages (`GLM-4.5`).
    pub name: &'static str,
    /// transformers' defaults of the keys every family maps.
    pub defaults: Defaults,
    /// What every decoder layer of the family is, whatever its keys say.
    pub layers: Layers,
    /// The family's keys, walked after [`rules::COMMON`] in both directions.
    pub keys: &'static [Entry],
    /// Decoder configs the family cannot express, checked after the
    /// [`Layers`] by [`crate::HfConfig::from_decoder`].
    pub checks: &'static [Check],
    /// How its checkpoints name the decoder's tensors.
    pub tensors: Tensors,
    /// For a multimodal family, its text model (read, not written).
    pub multimodal: Option<Multimodal>,
}

/// A multimodal family whose text model is another family's (Llama 4's
/// `llama4`: a `llama4_text` config as `text_config`, its weights under
/// `language_model.`, a vision tower beside them). The text model is read
/// from it; saving writes the text model's own family.
pub(crate) struct Multimodal {
    /// The text model's `model_type`, what a save writes.
    pub text_model_type: &'static str,
    /// The keys beside `text_config` that do not change the text model's
    /// logits (the vision tower's, the image tokens').
    pub informational: &'static [&'static str],
}

/// transformers' defaults of the keys every family maps (its config class's
/// defaults), used when a key is missing or `null`.
pub(crate) struct Defaults {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// `None`: as many as the query heads.
    pub num_key_value_heads: Option<i64>,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
}

/// One entry of a key table, read by [`crate::HfConfig::to_decoder`] and
/// written by [`crate::HfConfig::from_decoder`].
pub(crate) enum Entry {
    /// An integer key.
    Int(Key<i64>),
    /// A number key.
    Float(Key<f64>),
    /// A boolean key.
    Bool(Key<bool>),
    /// An integer key that may be absent (written only when set).
    OptInt(Key<Option<i64>>),
    /// A key the decoder implements at one setting.
    Fixed(Fixed),
    /// Keys that do not change the logits: ignored, not written.
    Info(&'static [&'static str]),
    /// A key that does not change the logits, written with this value.
    Written(&'static str, Lit),
    /// Keys that are no plain field, read and written by one rule.
    Rule(&'static Rule),
    /// A shared run of entries, walked in place.
    Table(&'static [Entry]),
}

/// A key and the decoder field it holds.
pub(crate) struct Key<T: 'static> {
    /// The key in `config.json`.
    pub name: &'static str,
    /// Another name of the same setting (a config class's `attribute_map`),
    /// read too; both present must agree. Only `name` is written.
    pub alias: Option<&'static str>,
    /// The decoder field.
    pub field: Field<T>,
    /// The value of a missing or `null` key.
    pub default: KeyDefault<T>,
}

impl<T: Copy> Key<T> {
    /// `name` for `field`, `default` when missing.
    pub const fn new(name: &'static str, field: Field<T>, default: T) -> Self {
        Self::with(name, field, KeyDefault::Is(default))
    }

    /// `name` for `field`, with any [`KeyDefault`].
    pub const fn with(name: &'static str, field: Field<T>, default: KeyDefault<T>) -> Self {
        Key {
            name,
            alias: None,
            field,
            default,
        }
    }

    /// This key, also read as `alias`.
    pub const fn or(self, alias: &'static str) -> Self {
        let Key {
            name,
            field,
            default,
            ..
        } = self;
        Key {
            name,
            alias: Some(alias),
            field,
            default,
        }
    }
}

/// A decoder field, or a value derived from the decoder config: one getter
/// (writing) and one setter (reading) side by side. [`field!`] makes both
/// from one path.
pub(crate) struct Field<T> {
    /// The value to write.
    pub get: fn(&DecoderConfig) -> T,
    /// Stores a value read.
    pub set: fn(&mut DecoderConfig, T),
}

/// A decoder field as a [`Field`]: `field!(router.routed_scaling_factor)`.
macro_rules! field {
    ($($path:ident).+) => {
        $crate::families::Field {
            get: |c| c.$($path).+,
            set: |c, v| c.$($path).+ = v,
        }
    };
}
pub(crate) use field;

/// The value of a key when `config.json` lacks it (or has `null`).
pub(crate) enum KeyDefault<T: 'static> {
    /// This value.
    Is(T),
    /// The family's [`Defaults`], given the config read so far.
    Family(fn(&Defaults, &DecoderConfig) -> T),
    /// None: the key must be present; the message says so.
    Required(&'static str),
}

/// A JSON value a [`Key`] holds.
pub(crate) trait KeyValue: Copy + PartialEq + 'static {
    /// What the value must be, for messages ("an integer").
    const WHAT: &'static str;
    /// The value of a JSON value, when it has the right type.
    fn from_json(v: &Value) -> Option<Self>;
    /// The JSON value to write; `None`: the key is not written.
    fn to_json(self) -> Option<Value>;
}

/// [`KeyValue`] for a JSON scalar type: what it must be, and its
/// `serde_json::Value::as_*` reader.
macro_rules! scalar_key_value {
    ($($t:ty: $what:literal, $as:ident;)*) => {$(
        impl KeyValue for $t {
            const WHAT: &'static str = $what;
            fn from_json(v: &Value) -> Option<Self> {
                v.$as()
            }
            fn to_json(self) -> Option<Value> {
                Some(json!(self))
            }
        }
    )*};
}

scalar_key_value! {
    i64: "an integer", as_i64;
    f64: "a number", as_f64;
    bool: "true or false", as_bool;
}

impl KeyValue for Option<i64> {
    const WHAT: &'static str = "an integer";
    fn from_json(v: &Value) -> Option<Self> {
        v.as_i64().map(Some)
    }
    fn to_json(self) -> Option<Value> {
        self.map(|v| json!(v))
    }
}

impl<T: KeyValue> Key<T> {
    /// Reads the key (or its default) into the decoder config.
    pub fn read(&self, r: &mut Reader<'_>, c: &mut DecoderConfig) -> Result<()> {
        let value = match self.alias {
            None => r.get::<T>(self.name)?,
            Some(alias) => r.aliased::<T>(self.name, alias)?,
        };
        let value = match (value, &self.default) {
            (Some(v), _) => v,
            (None, KeyDefault::Is(v)) => *v,
            (None, KeyDefault::Family(f)) => f(&r.family.defaults, c),
            (None, KeyDefault::Required(why)) => return Err(r.err(why)),
        };
        (self.field.set)(c, value);
        Ok(())
    }

    /// Writes the key from the decoder config.
    pub fn write(&self, c: &DecoderConfig, j: &mut Map<String, Value>) {
        if let Some(v) = (self.field.get)(c).to_json() {
            j.insert(self.name.into(), v);
        }
    }
}

/// A constant JSON value of a table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Lit {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number (an integer of the same value matches too).
    Float(f64),
    /// A string.
    Str(&'static str),
    /// A list whose items are all this string (written as an empty list).
    EveryItem(&'static str),
}

impl Lit {
    /// Whether `v` is this value.
    pub fn matches(self, v: &Value) -> bool {
        match self {
            Lit::Null => v.is_null(),
            Lit::Bool(b) => v.as_bool() == Some(b),
            Lit::Int(i) => v.as_i64() == Some(i),
            Lit::Float(f) => v.as_f64() == Some(f),
            Lit::Str(s) => v.as_str() == Some(s),
            Lit::EveryItem(s) => v
                .as_array()
                .is_some_and(|items| items.iter().all(|t| t.as_str() == Some(s))),
        }
    }

    /// The JSON value.
    pub fn to_json(self) -> Value {
        match self {
            Lit::Null => Value::Null,
            Lit::Bool(b) => json!(b),
            Lit::Int(i) => json!(i),
            Lit::Float(f) => json!(f),
            Lit::Str(s) => json!(s),
            Lit::EveryItem(_) => json!([]),
        }
    }
}

/// A key the decoder implements at one setting: when present and not
/// `null`, it must be one of `accepts`.
pub(crate) struct Fixed {
    /// The key.
    pub key: &'static str,
    /// The values the decoder implements.
    pub accepts: &'static [Lit],
    /// What the error says the decoder implements.
    pub supported: &'static str,
    /// Whether [`crate::HfConfig::from_decoder`] writes the first accepted value.
    pub written: bool,
}

/// Keys that are no plain field (a layer layout, a router, RoPE): how they
/// are read and how they are written, side by side.
pub(crate) struct Rule {
    /// Reads the keys into the decoder config.
    pub read: fn(&mut Reader<'_>, &mut DecoderConfig) -> Result<()>,
    /// Writes them from a decoder config the family's checks passed.
    pub write: fn(&DecoderConfig, &mut Map<String, Value>) -> Result<()>,
}

/// A decoder config a family cannot express: `when` it holds,
/// [`crate::HfConfig::from_decoder`] refuses with `says`.
pub(crate) struct Check {
    /// Whether the config is refused.
    pub when: fn(&DecoderConfig) -> bool,
    /// Why (the family names itself).
    pub says: fn(&Family, &DecoderConfig) -> String,
}

/// What every decoder layer of a family is: the reader sets it, the writer
/// refuses a decoder config that differs.
#[derive(Clone, Copy)]
pub(crate) struct Layers {
    /// RoPE may turn part of each head (`partial_rotary_factor`).
    pub partial_rope: bool,
    /// The attention has learned sinks.
    pub attention_sinks: bool,
    /// The experts have biases and the clamped SwiGLU (gpt-oss).
    pub biased_clamped_experts: bool,
    /// `o_proj` has a bias with q, k and v.
    pub o_proj_bias: bool,
    /// Which layers may slide.
    pub windows: Windows,
    /// Multi-head Latent Attention (DeepSeek).
    pub latent_attention: bool,
    /// DeepSeek's ungated shared experts (`n_shared_experts`).
    pub ungated_shared_experts: bool,
    /// The QK-norm.
    pub qk_norm: QkNorms,
    /// The router's gate has a bias.
    pub router_bias: bool,
    /// The expert weights may be scaled (`routed_scaling_factor`).
    pub routed_scaling: bool,
    /// The router's gates.
    pub gates: Gates,
    /// The router's weights scale the experts' inputs (Llama 4).
    pub weights_on_input: bool,
    /// MoE layers may alternate with dense ones
    /// (`interleave_moe_layer_step`).
    pub interleaved_moe: bool,
    /// Llama 4's attention: RoPE on adjacent pairs, chunked layers, NoPE
    /// layers with temperature tuning.
    pub llama4_attention: bool,
}

impl Layers {
    /// Grouped-query attention without bias on o_proj, SwiGLU experts, a
    /// softmax top-k router without bias: Mixtral's, LLaMA's.
    pub const PLAIN: Layers = Layers {
        partial_rope: false,
        attention_sinks: false,
        biased_clamped_experts: false,
        o_proj_bias: false,
        windows: Windows::None,
        latent_attention: false,
        ungated_shared_experts: false,
        qk_norm: QkNorms::Is(QkNorm::None),
        router_bias: false,
        routed_scaling: false,
        gates: Gates::TOP_K,
        weights_on_input: false,
        interleaved_moe: false,
        llama4_attention: false,
    };
}

/// Which layers of a family may have a sliding window.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Windows {
    /// None.
    None,
    /// Every layer or none.
    EveryLayer,
    /// Any (`layer_types`).
    PerLayer,
}

/// A family's QK-norm.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum QkNorms {
    /// Always this one.
    Is(QkNorm),
    /// This one or none (a key says which: GLM-4.5's per head, Llama 4's
    /// L2).
    OrNone(QkNorm),
}

/// The router gates a family has.
#[derive(Clone, Copy)]
pub(crate) struct Gates {
    /// Whether the family's router is this gate.
    pub accepts: fn(&Gate) -> bool,
    /// The family's router, for messages.
    pub are: &'static str,
}

impl Gates {
    /// Softmax top-k (`Gate::TopK`).
    pub const TOP_K: Gates = Gates {
        accepts: |g| matches!(g, Gate::TopK { .. }),
        are: "softmax top-k",
    };

    /// Softmax top-k, group-limited or not (DeepSeek-V2).
    pub const TOP_K_OR_GROUP_LIMITED: Gates = Gates {
        accepts: |g| matches!(g, Gate::TopK { .. } | Gate::GroupLimitedGreedy { .. }),
        are: "softmax top-k (TopK), group-limited or not (GroupLimitedGreedy)",
    };

    /// The sigmoid of the top-k logits (Llama 4).
    pub const SIGMOID_TOP_K: Gates = Gates {
        accepts: |g| matches!(g, Gate::SigmoidTopK),
        are: "the sigmoid of the top-k logits (SigmoidTopK)",
    };

    /// Sigmoid with the aux-free bias (DeepSeek-V3).
    pub const SIGMOID_AUX_FREE: Gates = Gates {
        accepts: |g| matches!(g, Gate::SigmoidAuxFree { .. }),
        are: "sigmoid with the aux-free bias (SigmoidAuxFree)",
    };
}

/// How a family's checkpoints name the decoder's tensors (see the crate
/// docs' table).
pub(crate) struct Tensors {
    /// Put before every name of the checkpoint (a multimodal class's
    /// `language_model.`; empty for a causal LM's own checkpoint).
    pub prefix: &'static str,
    /// The module of a layer's feed-forward network, dense or MoE (`mlp`;
    /// Llama 4's `feed_forward`).
    pub mlp_module: &'static str,
    /// A per-expert checkpoint's names of an expert's gate, up and down
    /// projections.
    pub projections: [&'static str; 3],
    /// The module of a layer holding the per-expert experts (`mlp`,
    /// Mixtral's `block_sparse_moe`).
    pub per_expert_module: &'static str,
    /// The router's module in a per-expert checkpoint and in a packed one
    /// (one group when they are the same).
    pub router: [&'static str; 2],
    /// The shared experts' module.
    pub shared_experts: &'static str,
    /// The shared experts' gate (Qwen2-MoE's `shared_expert_gate`), if any.
    pub shared_expert_gate: Option<&'static str>,
    /// The routed experts' layouts.
    pub experts: ExpertTensors,
    /// Layers past the last (multi-token prediction) are skipped on load.
    pub extra_layers_skipped: bool,
    /// Expert matrices may be stored in MXFP4 (`X_blocks`, `X_scales`).
    pub mxfp4: bool,
    /// Modules of other towers in the checkpoint (a multimodal class's
    /// vision tower), skipped on load.
    pub other_towers: &'static [&'static str],
}

impl Tensors {
    /// transformers' usual names: `mlp.experts.N.{gate,up,down}_proj`,
    /// `mlp.gate`, `mlp.shared_experts`.
    pub const PLAIN: Tensors = Tensors {
        prefix: "",
        mlp_module: "mlp",
        projections: ["gate_proj", "up_proj", "down_proj"],
        per_expert_module: "mlp",
        router: ["mlp.gate", "mlp.gate"],
        shared_experts: "mlp.shared_experts",
        shared_expert_gate: None,
        experts: ExpertTensors::PerExpertOrPacked,
        extra_layers_skipped: false,
        mxfp4: false,
        other_towers: &[],
    };
}

/// How the routed experts of an MoE layer are stored.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpertTensors {
    /// Per expert, or packed by transformers 5 ([`crate::ExpertLayout`]).
    PerExpertOrPacked,
    /// gpt-oss's: one layout, the router with a bias, the experts fused
    /// (`experts.gate_up_proj` `[E, H, 2I]`, gate and up columns
    /// interleaved; `experts.down_proj` `[E, I, H]`) with biases.
    FusedInterleaved,
    /// Llama 4's: one layout, the experts fused without biases
    /// (`experts.gate_up_proj` `[E, H, 2I]`, the gate's `I` columns then
    /// the up projection's; `experts.down_proj` `[E, I, H]`).
    FusedHalves,
}

#[cfg(test)]
mod tests {
    use crate::HfFamily;

    #[test]
    fn each_variant_has_its_own_table() {
        for family in HfFamily::ALL {
            let table = family.table();
            assert_eq!(table.model_type.parse::<HfFamily>().unwrap(), family);
            let class = match table.multimodal {
                Some(_) => "ForConditionalGeneration",
                None => "ForCausalLM",
            };
            assert!(table.architecture.ends_with(class), "{family}");
        }
    }
}
