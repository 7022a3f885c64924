//! RoPE scaling: the `rope_scaling` block of a Hugging Face `config.json`,
//! and the inverse frequencies and attention factor each scheme gives
//! (transformers' `modeling_rope_utils.py`, 5.x: `_compute_*_parameters`).

use crate::rope::{default_inv_freq, rope_pos_freqs};
use moe_core::{MoeError, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// The `rope_type`s [`RopeScaling`] reads, for error messages.
const SUPPORTED: &str = "linear, dynamic, yarn, llama3 (or default: no scaling)";

/// A RoPE scaling scheme, as Hugging Face's `config.json` writes it under
/// `rope_scaling`: internally tagged by `rope_type` (older configs say
/// `type`; both are read, `rope_type` first), with Hugging Face's field
/// names, e.g. DeepSeek-V3's
///
/// ```json
/// {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
///  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
/// ```
///
/// Every scheme changes only the inverse frequencies of the rotation (and
/// YaRN the scale of the `cos`/`sin` tables); [`RopeScaling::parameters`]
/// computes them as transformers 5.23's `ROPE_INIT_FUNCTIONS` do, in f32, and
/// [`crate::Rope::with_scaling`] builds the tables. Fields missing from a
/// config take Hugging Face's defaults; other keys (`rope_theta`,
/// `partial_rotary_factor` of transformers 5's `rope_parameters`) are
/// ignored. A `rope_type` other than these four is an error naming it
/// (`"default"` means no scaling: see [`RopeScaling::from_json`] and
/// [`RopeScaling::deserialize_option`], which read it as `None`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum RopeScaling {
    /// Position interpolation (kaiokendev 2023; Chen et al. 2023, arXiv
    /// 2306.15595), `_compute_linear_scaling_rope_parameters`: positions
    /// divided by `factor`, i.e. `inv_freq[i] = theta^(-2i/d) / factor`.
    Linear {
        /// The divisor of the positions.
        factor: f64,
    },
    /// Dynamic NTK-aware scaling (bloc97 and emozilla 2023),
    /// `_compute_dynamic_ntk_parameters`: the base grows with the sequence
    /// length `L` once it exceeds the original length `L0`,
    ///
    /// `theta' = theta * (factor * L / L0 - (factor - 1))^(d / (d - 2))`,
    /// `inv_freq[i] = theta'^(-2i/d)`.
    ///
    /// Hugging Face recomputes the frequencies as a sequence grows; the
    /// tables here are computed once, for `L = max(max_positions, L0)` with
    /// `L0 = original_max_position_embeddings`, or `max_positions` when that
    /// is absent (Hugging Face's `L0` is `max_position_embeddings`, and at
    /// `L = L0` the base is unchanged: plain RoPE for every length a layer
    /// accepts). So a layer gives Hugging Face's numbers for sequences of
    /// length `max_positions`, and for shorter ones when `L0` is absent or
    /// equal to `max_positions`.
    Dynamic {
        /// The scaling factor.
        factor: f64,
        /// The pre-training context length `L0` (default: the table's
        /// length).
        #[serde(skip_serializing_if = "Option::is_none")]
        original_max_position_embeddings: Option<i64>,
    },
    /// YaRN (Peng et al. 2023, arXiv 2309.00071), `_compute_yarn_parameters`:
    /// with `d` the rotated width, `L0 = original_max_position_embeddings`
    /// and `c(r) = d ln(L0 / (2 pi r)) / (2 ln theta)` the dimension whose
    /// wavelength fits `r` rotations in `L0`, the ramp runs from
    /// `low = max(floor(c(beta_fast)), 0)` to `high = min(ceil(c(beta_slow)),
    /// d - 1)` (no floor/ceil when `truncate` is false; `high += 0.001` when
    /// `low == high`),
    ///
    /// `ramp[i] = clamp((i - low) / (high - low), 0, 1)`,
    /// `inv_freq[i] = theta^(-2i/d) / factor * ramp[i] + theta^(-2i/d) *
    /// (1 - ramp[i])`:
    ///
    /// high-frequency pairs (`i <= low`) keep their frequency, low-frequency
    /// ones (`i >= high`) are interpolated by `factor`. The `cos`/`sin`
    /// tables are multiplied by the attention factor
    /// ([`RopeScaling::attention_factor`]), which scales every score by its
    /// square.
    Yarn {
        /// The context extension factor `s`.
        factor: f64,
        /// The pre-training context length `L0` (default: the table's
        /// length, as transformers' `standardize_rope_params` sets it).
        #[serde(skip_serializing_if = "Option::is_none")]
        original_max_position_embeddings: Option<i64>,
        /// Rotations that bound the extrapolated band (32).
        beta_fast: f64,
        /// Rotations that bound the interpolated band (1).
        beta_slow: f64,
        /// DeepSeek's numerator `mscale` of the attention factor (absent by
        /// default, like Hugging Face's `None`).
        #[serde(skip_serializing_if = "Option::is_none")]
        mscale: Option<f64>,
        /// DeepSeek's denominator `mscale_all_dim` of the attention factor;
        /// Multi-head Latent Attention also multiplies its softmax scale by
        /// `get_mscale(factor, mscale_all_dim)^2`
        /// ([`RopeScaling::softmax_scale_multiplier`]).
        #[serde(skip_serializing_if = "Option::is_none")]
        mscale_all_dim: Option<f64>,
        /// An explicit attention factor, overriding the computed one.
        #[serde(skip_serializing_if = "Option::is_none")]
        attention_factor: Option<f64>,
        /// Whether the ramp bounds are rounded to whole dimensions (true;
        /// gpt-oss sets false). Written only when false, as Hugging Face's
        /// configs do.
        #[serde(skip_serializing_if = "is_true")]
        truncate: bool,
    },
    /// Llama 3.1's scaling (Meta 2024), `_compute_llama3_parameters`: with
    /// `wavelen = 2 pi / inv_freq`, `L0 = original_max_position_embeddings`,
    /// pairs with `wavelen < L0 / high_freq_factor` keep their frequency,
    /// pairs with `wavelen > L0 / low_freq_factor` are divided by `factor`,
    /// and in between
    ///
    /// `smooth = (L0 / wavelen - low_freq_factor) / (high_freq_factor -
    /// low_freq_factor)`,
    /// `inv_freq' = (1 - smooth) * inv_freq / factor + smooth * inv_freq`.
    Llama3 {
        /// The divisor of the low frequencies (8 for Llama 3.1).
        factor: f64,
        /// `L0 / low_freq_factor` is the longest kept-by-smoothing
        /// wavelength (1).
        low_freq_factor: f64,
        /// `L0 / high_freq_factor` is the longest unchanged wavelength (4).
        high_freq_factor: f64,
        /// `L0`, the pre-training context length (8192 for Llama 3.1;
        /// default: the table's length).
        #[serde(skip_serializing_if = "Option::is_none")]
        original_max_position_embeddings: Option<i64>,
    },
}

/// Every key a `rope_scaling` block may hold, before the `rope_type` picks
/// the variant.
#[derive(Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<i64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    attention_factor: Option<f64>,
    truncate: Option<bool>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
}

impl RawRopeScaling {
    /// The scheme, `None` for `"default"`, or a message naming what is
    /// wrong.
    fn into_scaling(self) -> std::result::Result<Option<RopeScaling>, String> {
        let Some(rope_type) = self.rope_type.or(self.legacy_type) else {
            return Err(format!(
                "rope_scaling needs a `rope_type` (or `type`): one of {SUPPORTED}"
            ));
        };
        let required = |value: Option<f64>, key: &str| {
            value.ok_or_else(|| format!("rope_type `{rope_type}` needs `{key}`"))
        };
        let original = self.original_max_position_embeddings;
        Ok(Some(match rope_type.as_str() {
            "default" => return Ok(None),
            "linear" => RopeScaling::Linear {
                factor: required(self.factor, "factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: required(self.factor, "factor")?,
                original_max_position_embeddings: original,
            },
            // Hugging Face: `beta_fast or 32`, `beta_slow or 1`.
            "yarn" => RopeScaling::Yarn {
                factor: required(self.factor, "factor")?,
                original_max_position_embeddings: original,
                beta_fast: self.beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: self.beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0),
                mscale: self.mscale,
                mscale_all_dim: self.mscale_all_dim,
                attention_factor: self.attention_factor,
                truncate: self.truncate.unwrap_or(true),
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required(self.factor, "factor")?,
                low_freq_factor: required(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: required(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: original,
            },
            other => {
                return Err(format!(
                    "unsupported rope_type `{other}`: expected one of {SUPPORTED}"
                ))
            }
        }))
    }
}

impl<'de> Deserialize<'de> for RopeScaling {
    /// Reads a `rope_scaling` block (`rope_type` or `type`); `"default"` is
    /// an error here, since it is no scaling: an `Option<RopeScaling>` field
    /// reads it as `None` through [`RopeScaling::deserialize_option`].
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        RawRopeScaling::deserialize(deserializer)?
            .into_scaling()
            .map_err(serde::de::Error::custom)?
            .ok_or_else(|| {
                serde::de::Error::custom(
                    "rope_type `default` is plain RoPE, not a scaling: leave rope_scaling out \
                     (or null)",
                )
            })
    }
}

/// Whether a flag is at its default `true` (for `skip_serializing_if`).
fn is_true(flag: &bool) -> bool {
    *flag
}

/// `get_mscale` / `yarn_get_mscale` of transformers: `0.1 m ln(s) + 1`, or 1
/// when `s <= 1`.
fn get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// Reads the `rope_scaling` value of a Hugging Face `config.json`:
    /// `null` and `{"rope_type": "default"}` are `None`; an unknown
    /// `rope_type`, a missing required field or a bad value is a
    /// [`MoeError::Config`] that names it.
    pub fn from_json(value: &serde_json::Value) -> Result<Option<Self>> {
        if value.is_null() {
            return Ok(None);
        }
        let raw = RawRopeScaling::deserialize(value)
            .map_err(|e| MoeError::config(format!("rope_scaling: {e}")))?;
        let scaling = raw
            .into_scaling()
            .map_err(|e| MoeError::config(format!("rope_scaling: {e}")))?;
        if let Some(s) = &scaling {
            s.validate()?;
        }
        Ok(scaling)
    }

    /// A `#[serde(deserialize_with = "RopeScaling::deserialize_option")]`
    /// for `Option<RopeScaling>` config fields: `null` and `"default"` are
    /// `None`, the other types as [`RopeScaling`]'s `Deserialize`.
    pub fn deserialize_option<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Option<Self>, D::Error> {
        match Option::<RawRopeScaling>::deserialize(deserializer)? {
            None => Ok(None),
            Some(raw) => raw.into_scaling().map_err(serde::de::Error::custom),
        }
    }

    /// Hugging Face's name of the scheme (`linear`, `dynamic`, `yarn`,
    /// `llama3`).
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// The Hugging Face keys this scheme reads besides `rope_type` (what a
    /// `rope_scaling` block of its type may hold).
    pub fn field_names(&self) -> &'static [&'static str] {
        match self {
            RopeScaling::Linear { .. } => &["factor"],
            RopeScaling::Dynamic { .. } => &["factor", "original_max_position_embeddings"],
            RopeScaling::Yarn { .. } => &[
                "factor",
                "original_max_position_embeddings",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "attention_factor",
                "truncate",
            ],
            RopeScaling::Llama3 { .. } => &[
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ],
        }
    }

    /// The scheme's `factor`.
    pub fn factor(&self) -> f64 {
        match *self {
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor, .. }
            | RopeScaling::Yarn { factor, .. }
            | RopeScaling::Llama3 { factor, .. } => factor,
        }
    }

    /// Checks the values: factors positive and finite, lengths positive,
    /// `beta_fast >= beta_slow > 0`, `high_freq_factor > low_freq_factor >
    /// 0`, finite `mscale`s and a positive `attention_factor` (Hugging Face
    /// only warns about some of these).
    pub fn validate(&self) -> Result<()> {
        let kind = self.rope_type();
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(MoeError::config(format!(
                    "rope_scaling ({kind}): {name} must be positive and finite, got {v}"
                )))
            }
        };
        positive("factor", self.factor())?;
        let original = match *self {
            RopeScaling::Linear { .. } => None,
            RopeScaling::Dynamic {
                original_max_position_embeddings,
                ..
            }
            | RopeScaling::Yarn {
                original_max_position_embeddings,
                ..
            }
            | RopeScaling::Llama3 {
                original_max_position_embeddings,
                ..
            } => original_max_position_embeddings,
        };
        if let Some(len) = original.filter(|&len| len <= 0) {
            return Err(MoeError::config(format!(
                "rope_scaling ({kind}): original_max_position_embeddings must be positive, got {len}"
            )));
        }
        match *self {
            RopeScaling::Yarn {
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                ..
            } => {
                positive("beta_fast", beta_fast)?;
                positive("beta_slow", beta_slow)?;
                if beta_fast < beta_slow {
                    return Err(MoeError::config(format!(
                        "rope_scaling (yarn): beta_fast ({beta_fast}) must be at least beta_slow \
                         ({beta_slow})"
                    )));
                }
                for (name, v) in [("mscale", mscale), ("mscale_all_dim", mscale_all_dim)] {
                    if let Some(v) = v.filter(|v| !v.is_finite()) {
                        return Err(MoeError::config(format!(
                            "rope_scaling (yarn): {name} must be finite, got {v}"
                        )));
                    }
                }
                if let Some(a) = attention_factor {
                    positive("attention_factor", a)?;
                }
            }
            RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } => {
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(MoeError::config(format!(
                        "rope_scaling (llama3): high_freq_factor ({high_freq_factor}) must exceed \
                         low_freq_factor ({low_freq_factor})"
                    )));
                }
            }
            RopeScaling::Linear { .. } | RopeScaling::Dynamic { .. } => {}
        }
        Ok(())
    }

    /// The factor the `cos`/`sin` tables are multiplied by (Hugging Face's
    /// `attention_scaling`): 1 except for YaRN, where it is
    /// `attention_factor` if given, else `get_mscale(factor, mscale) /
    /// get_mscale(factor, mscale_all_dim)` when both are given and non-zero
    /// (DeepSeek), else `get_mscale(factor, 1) = 0.1 ln(factor) + 1` (the
    /// paper's `sqrt(1/t)`), with `get_mscale(s, m) = 0.1 m ln(s) + 1` for
    /// `s > 1` and 1 otherwise.
    pub fn attention_factor(&self) -> f64 {
        let RopeScaling::Yarn {
            factor,
            mscale,
            mscale_all_dim,
            attention_factor,
            ..
        } = *self
        else {
            return 1.0;
        };
        match (attention_factor, mscale, mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                get_mscale(factor, m) / get_mscale(factor, m_all)
            }
            _ => get_mscale(factor, 1.0),
        }
    }

    /// What DeepSeek's attention (Hugging Face's `DeepseekV3Attention`,
    /// `yarn_apply_mscale`) multiplies its softmax scale by:
    /// `get_mscale(factor, mscale_all_dim)^2` for YaRN with a non-zero
    /// `mscale_all_dim`, else 1. Llama-style attention
    /// ([`crate::GroupedQueryAttention`]) does not apply it.
    pub fn softmax_scale_multiplier(&self) -> f64 {
        match *self {
            RopeScaling::Yarn {
                factor,
                mscale_all_dim: Some(m_all),
                ..
            } if m_all != 0.0 => get_mscale(factor, m_all).powi(2),
            _ => 1.0,
        }
    }

    /// The inverse frequencies (`[head_dim / 2]`, f32, on `device`) and the
    /// attention factor of this scheme for heads of width `head_dim`, tables
    /// of `max_positions` positions and RoPE base `theta`: what Hugging
    /// Face's `rope_init_fn(config)` returns for a config with
    /// `max_position_embeddings = max_positions` (see the variants for the
    /// formulas, and [`RopeScaling::Dynamic`] for its one length).
    ///
    /// Errors on invalid values ([`Self::validate`]), an odd or
    /// non-positive `head_dim`, a non-positive `theta` or `max_positions`,
    /// `head_dim = 2` for dynamic scaling (the exponent `d / (d - 2)`) and
    /// `theta <= 1` for YaRN (`ln theta` divides).
    pub fn parameters(
        &self,
        head_dim: i64,
        max_positions: i64,
        theta: f64,
        device: Device,
    ) -> Result<(Tensor, f64)> {
        self.validate()?;
        if max_positions <= 0 {
            return Err(MoeError::config(format!(
                "RoPE max_positions must be positive, got {max_positions}"
            )));
        }
        let inv_freq = default_inv_freq(head_dim, theta, device)?;
        let d = head_dim as f64;
        match *self {
            RopeScaling::Linear { factor } => Ok((inv_freq / factor, 1.0)),
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => {
                if head_dim <= 2 {
                    return Err(MoeError::config(
                        "dynamic NTK scaling needs head_dim > 2 (its exponent is d / (d - 2))",
                    ));
                }
                let original = original_max_position_embeddings.unwrap_or(max_positions) as f64;
                let len = (max_positions as f64).max(original);
                let base = theta * (factor * len / original - (factor - 1.0)).powf(d / (d - 2.0));
                Ok((default_inv_freq(head_dim, base, device)?, 1.0))
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                if theta <= 1.0 {
                    return Err(MoeError::config(format!(
                        "YaRN needs rope_theta > 1, got {theta}"
                    )));
                }
                let original = original_max_position_embeddings.unwrap_or(max_positions) as f64;
                let correction_dim = |rotations: f64| {
                    d * (original / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let ramp = ((Tensor::arange(head_dim / 2, (Kind::Float, device)) - low)
                    / (high - low))
                    .clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                let pos_freqs = rope_pos_freqs(head_dim, theta, device);
                let extrapolation = pos_freqs.reciprocal();
                let interpolation = (pos_freqs * factor).reciprocal();
                let inv_freq = interpolation * (1.0 - &extrapolation_factor)
                    + extrapolation * extrapolation_factor;
                Ok((inv_freq, self.attention_factor()))
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = original_max_position_embeddings.unwrap_or(max_positions) as f64;
                let (low_freq_wavelen, high_freq_wavelen) =
                    (original / low_freq_factor, original / high_freq_factor);
                let wavelen = inv_freq.reciprocal() * (2.0 * PI);
                let divided =
                    (&inv_freq / factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
                let smooth = (wavelen.reciprocal() * original - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (1.0 - &smooth) * &divided / factor + smooth * &divided;
                let medium = wavelen
                    .lt(high_freq_wavelen)
                    .logical_not()
                    .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
                Ok((smoothed.where_self(&medium, &divided), 1.0))
            }
        }
    }
}

/// The settings every rotary attention layer checks: `rope_theta` positive
/// and finite, the scaling's own values, `rms_norm_eps >= 0` and finite,
/// `attention_dropout` in `[0, 1)`.
pub(crate) fn check_rope_norm_dropout(
    rope_theta: f64,
    rope_scaling: Option<&RopeScaling>,
    rms_norm_eps: f64,
    attention_dropout: f64,
) -> Result<()> {
    if !(rope_theta > 0.0 && rope_theta.is_finite()) {
        return Err(MoeError::config(format!(
            "rope_theta must be positive and finite, got {rope_theta}"
        )));
    }
    if let Some(scaling) = rope_scaling {
        scaling.validate()?;
    }
    if !(rms_norm_eps >= 0.0 && rms_norm_eps.is_finite()) {
        return Err(MoeError::config(format!(
            "rms_norm_eps must be finite and non-negative, got {rms_norm_eps}"
        )));
    }
    if !(0.0..1.0).contains(&attention_dropout) {
        return Err(MoeError::config(format!(
            "attention_dropout must be in [0, 1), got {attention_dropout}"
        )));
    }
    Ok(())
}
