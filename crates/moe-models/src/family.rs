//! [`LmConfig`]: which model family, with that family's config. Checkpoints
//! and run configs store it; [`LmConfig::build`] makes the model.

use crate::decoder::{DecoderConfig, DecoderModel};
use crate::makemoe::{MakeMoeConfig, MakeMoeModel, Preset};
use crate::CausalLm;
use moe_core::{Checked, IntoChecked, MoeError, Precision, Result, WeightInit};
use moe_dispatch::{DispatchSpec, ExpertParallelism};
use serde::{Deserialize, Deserializer, Serialize};
use tch::nn;

/// A model family and its config, tagged by `family` in JSON and TOML
/// (`family = "make_moe"`). A config without the tag is makeMoE's, as
/// checkpoints written before there were families are.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "family", rename_all = "snake_case")]
#[non_exhaustive]
// A config is built once per run and read by reference: boxing the
// decoder's would save a few hundred bytes once and cost every match a `Box`.
#[allow(clippy::large_enum_variant)]
pub enum LmConfig {
    /// makeMoE's character model ([`MakeMoeModel`]).
    MakeMoe(MakeMoeConfig),
    /// The Mixtral-style decoder family ([`DecoderModel`]).
    Decoder(DecoderConfig),
}

impl Default for LmConfig {
    fn default() -> Self {
        LmConfig::MakeMoe(MakeMoeConfig::default())
    }
}

impl<'de> Deserialize<'de> for LmConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(deserializer)?;
        let family = match value.as_object_mut() {
            Some(fields) => match fields.remove("family") {
                Some(serde_json::Value::String(f)) => f,
                Some(other) => {
                    return Err(D::Error::custom(format!(
                        "`family` must be a string, got {other}"
                    )))
                }
                None => "make_moe".to_string(),
            },
            None => return Err(D::Error::custom("a model config must be a table")),
        };
        let bad = D::Error::custom;
        match family.as_str() {
            "make_moe" => serde_json::from_value(value)
                .map(LmConfig::MakeMoe)
                .map_err(bad),
            "decoder" => serde_json::from_value(value)
                .map(LmConfig::Decoder)
                .map_err(bad),
            other => Err(D::Error::custom(format!(
                "unknown model family `{other}`: expected {}",
                LmConfig::FAMILIES.join(" or ")
            ))),
        }
    }
}

impl moe_core::Validate for LmConfig {
    fn validate(&self) -> Result<()> {
        LmConfig::validate(self)
    }
}

impl LmConfig {
    /// The `family` tags.
    pub const FAMILIES: [&'static str; 2] = ["make_moe", "decoder"];

    /// Builds the model under `p`.
    pub fn build(&self, p: &nn::Path) -> Result<Box<dyn CausalLm>> {
        Self::build_with(self, p, None)
    }

    /// [`LmConfig::build`] with every MoE layer's experts spread over the
    /// ranks of `parallelism`, when given; a [`Checked`] config is not
    /// checked again.
    pub fn build_with(
        config: impl IntoChecked<LmConfig>,
        p: &nn::Path,
        parallelism: Option<&ExpertParallelism>,
    ) -> Result<Box<dyn CausalLm>> {
        Ok(match config.into_checked()?.into_inner() {
            LmConfig::MakeMoe(c) => {
                let c = Checked::derived(c);
                Box::new(MakeMoeModel::with_parallelism(p, c, parallelism)?)
            }
            LmConfig::Decoder(c) => {
                let c = Checked::derived(c);
                Box::new(DecoderModel::with_parallelism(p, c, parallelism)?)
            }
        })
    }

    /// The config a program's `--family` and `--preset` choose, starting
    /// from `self` (a config file's, or the program's base): another family
    /// than `self`'s starts from that family's preset (`preset`, else
    /// makeMoE's `makemoe` or the decoder's `mixtral`); then `preset`, if
    /// given, applies to the family ([`LmConfig::apply_preset`]). `family`
    /// is one of [`LmConfig::FAMILIES`] (or `makemoe`).
    pub fn choose(&mut self, family: Option<&str>, preset: Option<&str>) -> Result<()> {
        match (family, &*self) {
            (None, _)
            | (Some("make_moe" | "makemoe"), LmConfig::MakeMoe(_))
            | (Some("decoder"), LmConfig::Decoder(_)) => {}
            (Some("decoder"), _) => {
                let name = preset.unwrap_or("mixtral");
                *self = LmConfig::Decoder(DecoderConfig::preset(name.parse()?));
            }
            (Some("make_moe" | "makemoe"), _) => {
                *self = LmConfig::MakeMoe(MakeMoeConfig::preset(Preset::MakeMoe));
            }
            (Some(other), _) => {
                return Err(MoeError::config(format!(
                    "unknown model family `{other}`: expected {}",
                    LmConfig::FAMILIES.join(" or ")
                )))
            }
        }
        preset.map_or(Ok(()), |name| self.apply_preset(name))
    }

    /// The preset `name` on this config's family: makeMoE's presets
    /// (`makemoe`, `default`) change its options; a decoder preset
    /// (`mixtral`, `deepseek_v3`, ...) replaces the config but its
    /// vocabulary and context.
    pub fn apply_preset(&mut self, name: &str) -> Result<()> {
        match self {
            LmConfig::MakeMoe(m) => m.apply_preset(name.parse()?),
            LmConfig::Decoder(d) => {
                *d = DecoderConfig {
                    vocab_size: d.vocab_size,
                    max_position_embeddings: d.max_position_embeddings,
                    ..DecoderConfig::preset(name.parse()?)
                }
            }
        }
        Ok(())
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<()> {
        match self {
            LmConfig::MakeMoe(c) => c.validate(),
            LmConfig::Decoder(c) => c.validate(),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        match self {
            LmConfig::MakeMoe(c) => c.vocab_size,
            LmConfig::Decoder(c) => c.vocab_size,
        }
    }

    /// Sets the vocabulary size (to the tokenizer's).
    pub fn set_vocab_size(&mut self, vocab_size: i64) {
        match self {
            LmConfig::MakeMoe(c) => c.vocab_size = vocab_size,
            LmConfig::Decoder(c) => c.vocab_size = vocab_size,
        }
    }

    /// Sets what every family has: the longest sequence (makeMoE's
    /// `block_size`, the decoder's `max_position_embeddings`), the weight
    /// initialisation, the compute precision and the dispatch strategy
    /// (`capacity[:F]` also the router's capacity factor). `None` leaves a
    /// setting as it is.
    pub fn set_common(&mut self, common: &CommonModelSettings) {
        let (context, init, precision) = match self {
            LmConfig::MakeMoe(c) => (&mut c.block_size, &mut c.init, &mut c.precision),
            LmConfig::Decoder(c) => (
                &mut c.max_position_embeddings,
                &mut c.init,
                &mut c.precision,
            ),
        };
        *context = common.max_context.unwrap_or(*context);
        *init = common.init.unwrap_or(*init);
        *precision = common.precision.unwrap_or(*precision);
        if let Some(spec) = common.dispatch {
            match self {
                LmConfig::MakeMoe(c) => c.set_dispatch(spec),
                LmConfig::Decoder(c) => c.set_dispatch(spec),
            }
        }
    }

    /// The longest sequence the model takes.
    pub fn max_context(&self) -> i64 {
        match self {
            LmConfig::MakeMoe(c) => c.block_size,
            LmConfig::Decoder(c) => c.max_position_embeddings,
        }
    }

    /// Parameters a token passes through, given the model's `total`.
    pub fn active_params(&self, total: i64) -> Result<i64> {
        match self {
            LmConfig::MakeMoe(c) => c.active_params(total),
            LmConfig::Decoder(c) => Ok(c.active_params(total)),
        }
    }

    /// The family's tag.
    pub fn family(&self) -> &'static str {
        match self {
            LmConfig::MakeMoe(_) => "make_moe",
            LmConfig::Decoder(_) => "decoder",
        }
    }

    /// The makeMoE config, or an error naming the family.
    pub fn as_make_moe(&self) -> Result<&MakeMoeConfig> {
        match self {
            LmConfig::MakeMoe(c) => Ok(c),
            other => Err(MoeError::config(format!(
                "expected a make_moe config, got a {} one",
                other.family()
            ))),
        }
    }

    /// The decoder config, or an error naming the family.
    pub fn as_decoder(&self) -> Result<&DecoderConfig> {
        match self {
            LmConfig::Decoder(c) => Ok(c),
            other => Err(MoeError::config(format!(
                "expected a decoder config, got a {} one",
                other.family()
            ))),
        }
    }
}

impl From<DecoderConfig> for LmConfig {
    fn from(c: DecoderConfig) -> Self {
        LmConfig::Decoder(c)
    }
}

impl From<MakeMoeConfig> for LmConfig {
    fn from(c: MakeMoeConfig) -> Self {
        LmConfig::MakeMoe(c)
    }
}

/// The settings every model family has, as a program's common flags give
/// them ([`LmConfig::set_common`]); `None` leaves the config's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommonModelSettings {
    /// The longest sequence.
    pub max_context: Option<i64>,
    /// The weight initialisation.
    pub init: Option<WeightInit>,
    /// The compute precision.
    pub precision: Option<Precision>,
    /// The dispatch strategy.
    pub dispatch: Option<DispatchSpec>,
}
