//! `config.json` to [`DecoderConfig`] and back: two generic interpreters
//! of the family tables ([`crate::families`], whose docs give the key
//! policy), [`HfConfig::to_decoder`] and [`HfConfig::from_decoder`].

use crate::families::{
    rules, Entry, Family, Fixed, KeyValue, Layers, Multimodal, QkNorms, Windows,
};
use crate::HfFamily;
use moe_core::{MoeError, Result};
use moe_experts::Activation;
use moe_models::{DecoderConfig, LayerType};
use moe_nn::{QkNorm, RopeScaling};
use moe_routers::WeightsOn;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A Hugging Face `config.json`: the family its `model_type` names and the
/// keys as read (or as [`HfConfig::from_decoder`] writes them).
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// The family of `model_type`.
    pub family: HfFamily,
    /// Every key of the file.
    pub json: Map<String, Value>,
    /// Where it was read from (`config.json` when built in memory); errors name it.
    pub path: PathBuf,
}

/// Reads the keys of one `config.json`, remembering which it has used.
pub(crate) struct Reader<'a> {
    /// The file's keys.
    pub json: &'a Map<String, Value>,
    path: &'a Path,
    /// The family's table.
    pub family: &'static Family,
    used: BTreeSet<String>,
}

impl<'a> Reader<'a> {
    /// An error naming the file and the family.
    pub fn err(&self, reason: impl std::fmt::Display) -> MoeError {
        MoeError::Checkpoint {
            path: self.path.to_path_buf(),
            reason: format!("model_type `{}`: {reason}", self.family.model_type),
        }
    }

    /// The value of `key` (marked as used); `None` when missing or `null`.
    pub fn value(&mut self, key: &str) -> Option<&'a Value> {
        self.used.insert(key.to_string());
        self.json.get(key).filter(|v| !v.is_null())
    }

    /// The value of `key` as a `T`; `None` when missing or `null`.
    pub fn get<T: KeyValue>(&mut self, key: &str) -> Result<Option<T>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => T::from_json(v)
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be {}, got {v}", T::WHAT))),
        }
    }

    /// A value stored under either of two names (a config class's
    /// `attribute_map`: Qwen3-MoE's hub files say `num_experts`, what
    /// transformers 5 saves says `num_local_experts`); both present must
    /// agree.
    pub fn aliased<T: KeyValue>(&mut self, key: &str, alias: &str) -> Result<Option<T>> {
        match (self.get::<T>(key)?, self.get::<T>(alias)?) {
            (Some(a), Some(b)) if a != b => Err(self.err(format!(
                "`{key}` = {} and `{alias}` = {} name the same setting and must agree",
                a.to_json().unwrap_or(Value::Null),
                b.to_json().unwrap_or(Value::Null)
            ))),
            (a, b) => Ok(a.or(b)),
        }
    }

    /// An integer, `default` when missing.
    pub fn int(&mut self, key: &str, default: i64) -> Result<i64> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// An integer, `None` when missing.
    pub fn opt_int(&mut self, key: &str) -> Result<Option<i64>> {
        self.get(key)
    }

    /// A number, `default` when missing.
    pub fn float(&mut self, key: &str, default: f64) -> Result<f64> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// A boolean, `default` when missing.
    pub fn boolean(&mut self, key: &str, default: bool) -> Result<bool> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// A list of integers, empty when missing.
    pub fn int_list(&mut self, key: &str) -> Result<Vec<i64>> {
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        self.err(format!("`{key}` must be a list of integers, got {v}"))
                    })
                })
                .collect(),
            Some(v) => Err(self.err(format!("`{key}` must be a list of integers, got {v}"))),
        }
    }

    /// Marks keys that do not change the computation as used.
    pub fn informational(&mut self, keys: &[&str]) {
        self.used.extend(keys.iter().map(|k| k.to_string()));
    }

    /// A key the decoder implements at one setting: `ok(value)` must hold
    /// when it is present and not `null`.
    pub fn fixed(&mut self, key: &str, ok: impl Fn(&Value) -> bool, supported: &str) -> Result<()> {
        match self.value(key) {
            Some(v) if !ok(v) => Err(self.err(format!(
                "`{key}` = {v} is not supported: the decoder implements {supported} only"
            ))),
            _ => Ok(()),
        }
    }

    /// A [`Fixed`] key of a table.
    pub fn fixed_key(&mut self, f: &Fixed) -> Result<()> {
        self.fixed(
            f.key,
            |v| f.accepts.iter().any(|a| a.matches(v)),
            f.supported,
        )
    }

    /// `sliding_window` (`default` when missing or `null`) as the decoder's
    /// window: at least 1 (a query sees itself); `None` when it is at least
    /// the context, where it never hides a key.
    pub fn sliding_window(&mut self, default: Option<i64>, context: i64) -> Result<Option<i64>> {
        let Some(window) = self.opt_int("sliding_window")?.or(default) else {
            return Ok(None);
        };
        if window < 1 {
            return Err(self.err(format!(
                "`sliding_window` = {window}: a window holds at least the query's own position"
            )));
        }
        Ok((window < context).then_some(window))
    }

    /// transformers 5's `layer_types` (`full_attention`,
    /// `sliding_attention` or `chunked_attention` per layer), when present.
    pub fn layer_types(&mut self) -> Result<Option<Vec<LayerType>>> {
        let Some(v) = self.value("layer_types") else {
            return Ok(None);
        };
        serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            self.err(format!(
                "`layer_types` must list \"full_attention\", \"sliding_attention\" or \
                 \"chunked_attention\" per layer, got {v}: {e}"
            ))
        })
    }

    /// The RoPE base and scaling: `rope_theta` and `rope_scaling`
    /// (transformers 4) or `rope_parameters` (transformers 5: `rope_theta`,
    /// `rope_type` and the scheme's fields in one object). A scheme other
    /// than `linear`, `dynamic`, `yarn` or `llama3`, a key the scheme does
    /// not have, or two different schemes (or partial factors) in the two
    /// places is an error. Also returns `partial_rotary_factor` (top level or
    /// in `rope_parameters`; 1 when absent).
    pub fn rope(&mut self) -> Result<(f64, Option<RopeScaling>, f64)> {
        let mut theta = self.float("rope_theta", self.family.defaults.rope_theta)?;
        // GLM-4.5's hub files have it at the top level, transformers 5
        // writes it into `rope_parameters`.
        let mut partial = self.float("partial_rotary_factor", 1.0)?;
        let mut scaling = match self.value("rope_scaling") {
            Some(v) => self.rope_scaling(v, "rope_scaling")?,
            None => None,
        };
        if let Some(params) = self.value("rope_parameters") {
            if !params.is_object() {
                return Err(self.err(format!(
                    "`rope_parameters` must be an object with rope_type and rope_theta, got {params}"
                )));
            }
            if let Some(value) = params.get("rope_theta") {
                theta = value.as_f64().ok_or_else(|| {
                    self.err(format!(
                        "`rope_parameters.rope_theta` must be a number, got {value}"
                    ))
                })?;
            }
            if let Some(value) = params.get("partial_rotary_factor") {
                let inner = value.as_f64().ok_or_else(|| {
                    self.err(format!(
                        "`rope_parameters.partial_rotary_factor` must be a number, got {value}"
                    ))
                })?;
                let top_level = self.json.get("partial_rotary_factor");
                if top_level.is_some_and(|v| !v.is_null()) && inner != partial {
                    return Err(self.err(format!(
                        "`partial_rotary_factor` = {partial} and \
                         `rope_parameters.partial_rotary_factor` = {inner} disagree"
                    )));
                }
                partial = inner;
            }
            let from_parameters = self.rope_scaling(params, "rope_parameters")?;
            if scaling.is_some() && from_parameters.is_some() && scaling != from_parameters {
                return Err(self.err(format!(
                    "`rope_scaling` ({scaling:?}) and `rope_parameters` ({from_parameters:?}) \
                     disagree: give one RoPE scaling"
                )));
            }
            scaling = scaling.or(from_parameters);
        }
        Ok((theta, scaling, partial))
    }

    /// One RoPE settings object (`rope_scaling` or `rope_parameters`) as a
    /// scheme; `key` names it in errors.
    fn rope_scaling(&self, v: &Value, key: &str) -> Result<Option<RopeScaling>> {
        let Some(object) = v.as_object() else {
            return Err(self.err(format!("`{key}` must be an object, got {v}")));
        };
        let scaling = RopeScaling::from_json(v)
            .map_err(|e| self.err(format!("`{key}`: {}", strip_config_prefix(e))))?;
        let allowed = scaling.as_ref().map_or(&[][..], RopeScaling::field_names);
        for (field, value) in object {
            match field.as_str() {
                "rope_type" | "type" | "rope_theta" => {}
                // Read by `rope`.
                "partial_rotary_factor" if value.is_number() => {}
                f if allowed.contains(&f) => {}
                other => {
                    let kind = scaling.as_ref().map_or("default", RopeScaling::rope_type);
                    return Err(self.err(format!(
                        "`{key}.{other}` = {value} is not supported: rope_type `{kind}` takes \
                         rope_theta{}{}",
                        if allowed.is_empty() { "" } else { ", " },
                        allowed.join(", ")
                    )));
                }
            }
        }
        Ok(scaling)
    }

    /// Errors on the first key that is neither used nor in `ignore`.
    fn finish(&self, ignore: &[String]) -> Result<()> {
        let unknown: Vec<String> = self
            .json
            .iter()
            .filter(|(k, _)| !self.used.contains(*k) && !ignore.contains(*k))
            .map(|(k, v)| format!("`{k}` = {v}"))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(self.err(format!(
            "unknown key(s) {}: this reader does not know whether they change the model, so it \
             does not ignore them (LoadOptions::ignore_keys ignores keys known to be harmless)",
            unknown.join(", ")
        )))
    }
}

impl HfConfig {
    /// Reads `path` (a `config.json`) and its `model_type`; an unreadable
    /// file, bad JSON or a missing or unknown `model_type` is a
    /// [`MoeError::Checkpoint`] naming the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot read the model config: {e}"),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(value, path)
    }

    /// [`HfConfig::read`] on JSON already in memory; `path` names it in errors.
    pub fn from_json(value: Value, path: &Path) -> Result<Self> {
        let err = |reason: String| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let Value::Object(json) = value else {
            return Err(err("a model config must be a JSON object".into()));
        };
        let model_type = match json.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(err(format!("`model_type` must be a string, got {other}"))),
            None => {
                return Err(err(format!(
                    "no `model_type`: expected one of {}",
                    HfFamily::supported_list()
                )))
            }
        };
        let family = model_type
            .parse::<HfFamily>()
            .map_err(|e| err(strip_config_prefix(e)))?;
        Ok(HfConfig {
            family,
            json,
            path: path.to_path_buf(),
        })
    }

    /// The decoder config of this `config.json` under the key policy (see
    /// `families/mod.rs`): every key is mapped onto the decoder, fixed at
    /// the one value the decoder implements, or informational; any other
    /// is an error. Keys in `ignore` are ignored. Errors (a
    /// [`MoeError::Checkpoint`] naming the file) on a key set to a value the
    /// decoder does not implement, an unknown key, a layer layout it cannot
    /// express, or sizes the decoder rejects.
    ///
    /// Walks the keys every family maps and the family's key table, reading
    /// each entry into the decoder config, after the settings its layers
    /// always have.
    pub fn to_decoder(&self, ignore: &[String]) -> Result<DecoderConfig> {
        let family = self.family.table();
        let json = match &family.multimodal {
            Some(multimodal) => self.text_config(multimodal, ignore)?,
            None => &self.json,
        };
        let mut r = Reader {
            json,
            path: self.path.as_path(),
            family,
            used: BTreeSet::new(),
        };
        r.informational(rules::INFORMATIONAL);
        let layers = &family.layers;
        let mut c = DecoderConfig {
            moe_intermediate_size: None,
            attention_bias: false,
            qk_norm: match layers.qk_norm {
                QkNorms::Is(norm) => norm,
                QkNorms::OrNone(_) => QkNorm::None,
            },
            localized_filtering: false,
            attention_sinks: layers.attention_sinks,
            expert_bias: layers.biased_clamped_experts,
            num_local_experts: 0,
            num_experts_per_tok: 2,
            n_shared_experts: 0,
            shared_expert_intermediate_size: None,
            first_k_dense_replace: 0,
            // The router is the decoder's default (softmax top-k,
            // renormalised) with the family's bias; the keys change the rest.
            router_aux_loss_coef: 0.0,
            ..DecoderConfig::default()
        };
        c.router.bias = layers.router_bias;
        if layers.weights_on_input {
            c.router.weights_on = WeightsOn::Input;
        }
        for entry in rules::COMMON.iter().chain(family.keys) {
            read_entry(entry, &mut r, &mut c)?;
        }
        r.finish(ignore)?;
        c.validate().map_err(|e| r.err(strip_config_prefix(e)))?;
        Ok(c)
    }

    /// The `config.json` of `config` for `family`: `model_type`,
    /// `architectures` and Hugging Face's keys for that family (the inverse
    /// of [`HfConfig::to_decoder`]). A config the family cannot express
    /// (another router, capacity limits, localized filtering, a gate bias,
    /// a dense layer in Mixtral, ...) is a [`MoeError::Config`] naming the
    /// setting.
    ///
    /// Checks what the family's layers always are and the family's checks,
    /// then walks the same entries as [`HfConfig::to_decoder`], writing
    /// each.
    pub fn from_decoder(family: HfFamily, c: &DecoderConfig) -> Result<Self> {
        c.validate()?;
        let table = family.table();
        if let Some(multimodal) = &table.multimodal {
            return Err(MoeError::config(format!(
                "model_type `{family}` is a multimodal folder, read for its text model: write \
                 the text model as `{}`",
                multimodal.text_model_type
            )));
        }
        let refused = check_layers(table, c).or_else(|| {
            table
                .checks
                .iter()
                .find(|check| (check.when)(c))
                .map(|check| (check.says)(table, c))
        });
        if let Some(what) = refused {
            return Err(MoeError::config(format!(
                "model_type `{family}` cannot express this decoder config: {what}"
            )));
        }
        let mut j = Map::new();
        j.insert("model_type".into(), json!(table.model_type));
        j.insert("architectures".into(), json!([table.architecture]));
        for entry in rules::COMMON.iter().chain(table.keys) {
            write_entry(entry, c, &mut j)?;
        }
        Ok(HfConfig {
            family,
            json: j,
            path: PathBuf::from(crate::CONFIG_FILE),
        })
    }

    /// The JSON object of the file.
    pub fn to_json(&self) -> Value {
        Value::Object(self.json.clone())
    }

    /// A multimodal file's `text_config`, after checking that every key
    /// beside it (but those in `ignore`) leaves the text model's logits
    /// alone and that it is a config of the text model's family.
    fn text_config(
        &self,
        multimodal: &Multimodal,
        ignore: &[String],
    ) -> Result<&Map<String, Value>> {
        let err = |reason: String| MoeError::Checkpoint {
            path: self.path.clone(),
            reason: format!("model_type `{}`: {reason}", self.family),
        };
        let beside: Vec<String> = self
            .json
            .iter()
            .filter(|(k, _)| {
                k.as_str() != "text_config"
                    && !rules::INFORMATIONAL.contains(&k.as_str())
                    && !multimodal.informational.contains(&k.as_str())
                    && !ignore.contains(*k)
            })
            .map(|(k, v)| format!("`{k}` = {v}"))
            .collect();
        if !beside.is_empty() {
            return Err(err(format!(
                "unknown key(s) {} beside text_config: this reader does not know whether they \
                 change the text model (LoadOptions::ignore_keys ignores keys known to be \
                 harmless)",
                beside.join(", ")
            )));
        }
        let Some(Value::Object(text)) = self.json.get("text_config") else {
            return Err(err(
                "a multimodal config needs its text model's config as the object `text_config`"
                    .into(),
            ));
        };
        match text.get("model_type").and_then(Value::as_str) {
            None => Ok(text),
            Some(t) if t == multimodal.text_model_type => Ok(text),
            Some(other) => Err(err(format!(
                "text_config has model_type `{other}`, expected `{}`",
                multimodal.text_model_type
            ))),
        }
    }
}

/// Reads one entry of a key table (a shared table entry by entry).
fn read_entry(entry: &Entry, r: &mut Reader<'_>, c: &mut DecoderConfig) -> Result<()> {
    match entry {
        Entry::Int(key) => key.read(r, c),
        Entry::Float(key) => key.read(r, c),
        Entry::Bool(key) => key.read(r, c),
        Entry::OptInt(key) => key.read(r, c),
        Entry::Fixed(fixed) => r.fixed_key(fixed),
        Entry::Info(keys) => {
            r.informational(keys);
            Ok(())
        }
        Entry::Written(key, _) => {
            r.informational(&[key]);
            Ok(())
        }
        Entry::Rule(rule) => (rule.read)(r, c),
        Entry::Table(entries) => entries.iter().try_for_each(|e| read_entry(e, r, c)),
    }
}

/// Writes one entry of a key table (a shared table entry by entry).
fn write_entry(entry: &Entry, c: &DecoderConfig, j: &mut Map<String, Value>) -> Result<()> {
    match entry {
        Entry::Int(key) => key.write(c, j),
        Entry::Float(key) => key.write(c, j),
        Entry::Bool(key) => key.write(c, j),
        Entry::OptInt(key) => key.write(c, j),
        Entry::Fixed(fixed) => {
            if fixed.written {
                j.insert(fixed.key.into(), fixed.accepts[0].to_json());
            }
        }
        Entry::Info(_) => {}
        Entry::Written(key, value) => {
            j.insert((*key).into(), value.to_json());
        }
        Entry::Rule(rule) => (rule.write)(c, j)?,
        Entry::Table(entries) => {
            return entries.iter().try_for_each(|e| write_entry(e, c, j));
        }
    }
    Ok(())
}

/// Why `c` differs from what every layer of `family` is ([`Layers`]), if
/// it does.
fn check_layers(family: &Family, c: &DecoderConfig) -> Option<String> {
    let layers: &Layers = &family.layers;
    if c.partial_rotary_factor != 1.0 && !layers.partial_rope {
        return Some(format!(
            "partial_rotary_factor = {} (GLM-4.5's RoPE on part of each head)",
            c.partial_rotary_factor
        ));
    }
    if c.localized_filtering {
        return Some("localized filtering (Yuan 2.0) has no counterpart".into());
    }
    if c.attention_sinks != layers.attention_sinks {
        return Some(format!(
            "attention_sinks = {}; gpt-oss's attention has them, no other family's",
            c.attention_sinks
        ));
    }
    let gpt_oss = layers.biased_clamped_experts;
    let clamped = matches!(c.expert_activation, Activation::ClampedSwiGlu { .. });
    if c.num_local_experts > 0 && (c.expert_bias && clamped) != gpt_oss
        || (!gpt_oss && (c.expert_bias || c.expert_activation != Activation::SwiGlu))
    {
        return Some(format!(
            "expert_activation = {:?}, expert_bias = {}; gpt-oss's experts have biases and the \
             clamped SwiGLU, the other families' neither",
            c.expert_activation, c.expert_bias
        ));
    }
    if c.o_proj_bias != (layers.o_proj_bias && c.attention_bias) {
        return Some(format!(
            "o_proj_bias = {} with attention_bias = {}; only gpt-oss biases o_proj, as its q, k \
             and v",
            c.o_proj_bias, c.attention_bias
        ));
    }
    if let Some(window) = c.sliding_window {
        let every_layer = (0..c.num_hidden_layers).all(|i| c.sliding_window_of(i).is_some());
        let expressible = match layers.windows {
            Windows::EveryLayer => every_layer,
            Windows::PerLayer => true,
            Windows::None => false,
        };
        if !expressible {
            return Some(format!(
                "sliding_window = {window} on layers {:?}; mixtral and qwen3_moe slide in every \
                 layer, qwen2_moe in any (layer_types), the others in none",
                (0..c.num_hidden_layers)
                    .filter(|&i| c.sliding_window_of(i).is_some())
                    .collect::<Vec<_>>()
            ));
        }
    }
    let llama4_attention = c.attention_chunk_size.is_some()
        || !c.nope_layers.is_empty()
        || c.attn_temperature_tuning.is_some();
    if (llama4_attention && !layers.llama4_attention)
        || c.rope_interleave != layers.llama4_attention
    {
        return Some(format!(
            "attention_chunk_size = {:?}, nope_layers = {:?}, attn_temperature_tuning = {:?}, \
             rope_interleave = {}; Llama 4's attention (RoPE on adjacent pairs, chunks, NoPE \
             layers) has no counterpart in the family",
            c.attention_chunk_size, c.nope_layers, c.attn_temperature_tuning, c.rope_interleave
        ));
    }
    if c.interleave_moe_layer_step != 1 && !layers.interleaved_moe {
        return Some(format!(
            "interleave_moe_layer_step = {} (Llama 4's MoE layers between dense ones)",
            c.interleave_moe_layer_step
        ));
    }
    if c.latent_attention.is_some() != layers.latent_attention {
        return Some(if layers.latent_attention {
            "DeepSeek's attention is Multi-head Latent Attention (latent_attention)".into()
        } else {
            "latent_attention (Multi-head Latent Attention) is DeepSeek's".into()
        });
    }
    if c.n_shared_experts != 0 && !layers.ungated_shared_experts {
        return Some(format!(
            "n_shared_experts = {} (DeepSeek's shared experts)",
            c.n_shared_experts
        ));
    }
    let expected_qk = match layers.qk_norm {
        QkNorms::Is(norm) => norm,
        QkNorms::OrNone(norm) if c.qk_norm != norm && c.qk_norm != QkNorm::None => {
            return Some(format!(
                "qk_norm = {:?}; {}'s QK-norm is {norm:?} or none",
                c.qk_norm, family.name
            ));
        }
        QkNorms::OrNone(_) => c.qk_norm,
    };
    if c.qk_norm != expected_qk {
        return Some(format!(
            "qk_norm = {:?}, the family has {expected_qk:?}",
            c.qk_norm
        ));
    }
    if c.num_local_experts <= 0 {
        return None;
    }
    let r = &c.router;
    if r.bias != layers.router_bias || r.capacity_factor.is_some() {
        return Some(format!(
            "router bias = {}, capacity_factor = {:?}; the family's router has {} bias and no \
             capacity limit",
            r.bias,
            r.capacity_factor,
            if layers.router_bias { "a" } else { "no" }
        ));
    }
    if (r.weights_on == WeightsOn::Input) != layers.weights_on_input {
        return Some(format!(
            "router weights_on = {:?}; Llama 4's weights scale the experts' inputs, the other \
             families' their outputs",
            r.weights_on
        ));
    }
    if !layers.routed_scaling && r.routed_scaling_factor != 1.0 {
        return Some(format!(
            "routed_scaling_factor = {} (DeepSeek's); the family does not scale the expert \
             weights",
            r.routed_scaling_factor
        ));
    }
    (!(layers.gates.accepts)(&r.gate)).then(|| {
        format!(
            "router gate {:?}; the family's router is {}",
            r.gate, layers.gates.are
        )
    })
}

/// The message of a [`MoeError::Config`] without its "invalid configuration: " prefix.
fn strip_config_prefix(e: MoeError) -> String {
    match e {
        MoeError::Config(msg) => msg,
        other => other.to_string(),
    }
}
