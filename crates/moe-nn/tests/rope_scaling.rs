//! RoPE scaling: each scheme's inverse frequencies against the formulas of
//! Hugging Face's `modeling_rope_utils.py` worked out here in f64, the
//! attention factors, the tables, and reading `rope_scaling` from JSON.

use approx::assert_abs_diff_eq;
use moe_core::MoeError;
use moe_nn::{default_inv_freq, GqaConfig, MlaConfig, Rope, RopeScaling};
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

const THETA: f64 = 10000.0;

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// `theta^(-2i/d)` for `i in 0..d/2`, in f64.
fn plain(d: i64, theta: f64) -> Vec<f64> {
    (0..d / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / d as f64))
        .collect()
}

fn inv_freq(scaling: &RopeScaling, d: i64, max_positions: i64) -> (Vec<f64>, f64) {
    let (inv, factor) = scaling
        .parameters(d, max_positions, THETA, Device::Cpu)
        .unwrap();
    assert_eq!(inv.size(), [d / 2]);
    assert_eq!(inv.kind(), Kind::Float);
    (values(&inv), factor)
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
            "component {i}: got {g}, want {w}"
        );
    }
}

/// YaRN's fields, so that tests can change some (`..Yarn::new(s)`).
struct Yarn {
    factor: f64,
    beta_fast: f64,
    beta_slow: f64,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    attention_factor: Option<f64>,
    truncate: bool,
}

impl Yarn {
    /// Hugging Face's defaults over 4096 original positions.
    fn new(factor: f64) -> Self {
        Yarn {
            factor,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        }
    }

    fn build(self) -> RopeScaling {
        RopeScaling::Yarn {
            factor: self.factor,
            original_max_position_embeddings: Some(4096),
            beta_fast: self.beta_fast,
            beta_slow: self.beta_slow,
            mscale: self.mscale,
            mscale_all_dim: self.mscale_all_dim,
            attention_factor: self.attention_factor,
            truncate: self.truncate,
        }
    }
}

fn yarn(factor: f64) -> RopeScaling {
    Yarn::new(factor).build()
}

#[test]
fn linear_divides_every_frequency_by_the_factor() {
    let scaling = RopeScaling::Linear { factor: 4.0 };
    let (inv, attention) = inv_freq(&scaling, 8, 64);
    let want: Vec<f64> = plain(8, THETA).iter().map(|f| f / 4.0).collect();
    assert_close(&inv, &want);
    assert_eq!(attention, 1.0);
    // Position 8 of the scaled tables is position 2 of the plain ones.
    let scaled = Rope::with_scaling(8, 64, THETA, Some(&scaling), Device::Cpu).unwrap();
    let plain_rope = Rope::new(8, 64, THETA, Device::Cpu).unwrap();
    let diff = (scaled.cos().get(8) - plain_rope.cos().get(2))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-6, "{diff}");
    assert_eq!(scaled.attention_factor(), 1.0);
}

#[test]
fn llama3_keeps_high_frequencies_divides_low_ones_and_smooths_between() {
    // head_dim 8: inv_freq = [1, 0.1, 0.01, 0.001], wavelengths 2 pi / inv_freq
    // = [6.3, 62.8, 628, 6283]. With L0 = 1000, low_freq_factor 1 and
    // high_freq_factor 4 the bands are wavelen < 250 (kept), > 1000 (divided)
    // and in between (smoothed).
    let (factor, low, high, original) = (8.0, 1.0, 4.0, 1000.0);
    let scaling = RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: Some(1000),
    };
    let (inv, attention) = inv_freq(&scaling, 8, 4000);
    let base = plain(8, THETA);
    let wavelen = 2.0 * PI / base[2];
    assert!(wavelen > original / high && wavelen < original / low);
    let smooth = (original / wavelen - low) / (high - low);
    let smoothed = (1.0 - smooth) * base[2] / factor + smooth * base[2];
    assert_close(&inv, &[base[0], base[1], smoothed, base[3] / factor]);
    assert!(inv[2] > base[2] / factor && inv[2] < base[2]);
    assert_eq!(attention, 1.0);
}

#[test]
fn yarn_blends_along_the_ramp_and_scales_the_tables() {
    // head_dim 8, theta 1e4, L0 4096: the correction dimensions
    // c(r) = d ln(L0 / (2 pi r)) / (2 ln theta) are 1.31 (r = 32) and 2.81
    // (r = 1), so the ramp runs from 1 to 3: [0, 0, 0.5, 1].
    let d = 8.0;
    let factor = 4.0;
    let correction = |r: f64| d * (4096.0 / (2.0 * PI * r)).ln() / (2.0 * THETA.ln());
    let (low, high) = (correction(32.0).floor(), correction(1.0).ceil());
    assert_eq!((low, high), (1.0, 3.0));
    let ramp: Vec<f64> = (0..4)
        .map(|i| ((i as f64 - low) / (high - low)).clamp(0.0, 1.0))
        .collect();
    assert_eq!(ramp, [0.0, 0.0, 0.5, 1.0]);
    let want: Vec<f64> = plain(8, THETA)
        .iter()
        .zip(&ramp)
        .map(|(f, r)| f / factor * r + f * (1.0 - r))
        .collect();
    let scaling = yarn(factor);
    let (inv, attention) = inv_freq(&scaling, 8, 16384);
    assert_close(&inv, &want);
    // The paper's sqrt(1/t) = 0.1 ln(s) + 1.
    let expected_attention = 0.1 * factor.ln() + 1.0;
    assert_abs_diff_eq!(attention, expected_attention, epsilon = 1e-12);
    assert_abs_diff_eq!(
        scaling.attention_factor(),
        expected_attention,
        epsilon = 1e-12
    );
    assert_eq!(scaling.softmax_scale_multiplier(), 1.0);
    // cos(0) = sin(pi / 2) = 1: the tables carry the attention factor.
    let rope = Rope::with_scaling(8, 64, THETA, Some(&scaling), Device::Cpu).unwrap();
    assert_abs_diff_eq!(rope.attention_factor(), expected_attention, epsilon = 1e-12);
    let cos0 = values(&rope.cos().get(0));
    assert!(cos0.iter().all(|c| (c - expected_attention).abs() < 1e-6));
    let sin = values(&rope.sin().get(5));
    assert_abs_diff_eq!(
        sin[0],
        expected_attention * (5.0 * want[0]).sin(),
        epsilon = 1e-5
    );

    // Without truncation the bounds stay fractional.
    let untruncated = Yarn {
        truncate: false,
        ..Yarn::new(factor)
    }
    .build();
    let (low, high) = (correction(32.0), correction(1.0));
    let want: Vec<f64> = plain(8, THETA)
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let r = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            f / factor * r + f * (1.0 - r)
        })
        .collect();
    assert_close(&inv_freq(&untruncated, 8, 16384).0, &want);
}

#[test]
fn yarn_attention_factor_follows_deepseek_mscales_or_an_explicit_value() {
    let factor: f64 = 40.0;
    let get_mscale = |m: f64| 0.1 * m * factor.ln() + 1.0;
    // DeepSeek-V3: mscale = mscale_all_dim = 1, so the tables are not scaled
    // and the softmax scale takes get_mscale(40, 1)^2 instead.
    let v3 = MlaConfig::deepseek_v3().rope_scaling.unwrap();
    assert_abs_diff_eq!(v3.attention_factor(), 1.0, epsilon = 1e-12);
    assert_abs_diff_eq!(
        v3.softmax_scale_multiplier(),
        get_mscale(1.0).powi(2),
        epsilon = 1e-12
    );
    let with = |mscale: Option<f64>, mscale_all_dim: Option<f64>, attention_factor| {
        Yarn {
            mscale,
            mscale_all_dim,
            attention_factor,
            ..Yarn::new(factor)
        }
        .build()
    };
    let ratio = with(Some(1.0), Some(0.5), None);
    assert_abs_diff_eq!(
        ratio.attention_factor(),
        get_mscale(1.0) / get_mscale(0.5),
        epsilon = 1e-12
    );
    assert_abs_diff_eq!(
        ratio.softmax_scale_multiplier(),
        get_mscale(0.5).powi(2),
        epsilon = 1e-12
    );
    // Only one of them (or a zero one): the default 0.1 ln(s) + 1.
    for only_one in [
        with(None, Some(0.5), None),
        with(Some(0.7), None, None),
        with(Some(0.0), Some(1.0), None),
    ] {
        assert_abs_diff_eq!(
            only_one.attention_factor(),
            get_mscale(1.0),
            epsilon = 1e-12
        );
    }
    assert_eq!(
        with(Some(1.0), Some(0.0), None).softmax_scale_multiplier(),
        1.0
    );
    assert_eq!(
        with(Some(1.0), Some(1.0), Some(1.7)).attention_factor(),
        1.7
    );
    // No extension, no scaling.
    assert_eq!(
        Yarn {
            mscale_all_dim: Some(1.0),
            ..Yarn::new(1.0)
        }
        .build()
        .softmax_scale_multiplier(),
        1.0
    );
}

#[test]
fn dynamic_rescales_the_base_past_the_original_length() {
    let d = 8;
    // No original length: the table's own length, where the base is unchanged.
    let plain_scaling = RopeScaling::Dynamic {
        factor: 2.0,
        original_max_position_embeddings: None,
    };
    assert_close(&inv_freq(&plain_scaling, d, 64).0, &plain(d, THETA));
    let defaults = values(&default_inv_freq(d, THETA, Device::Cpu).unwrap());
    assert_close(&inv_freq(&plain_scaling, d, 64).0, &defaults);
    // L = 64 over L0 = 32 with factor 2: theta' = theta (2 * 64 / 32 - 1)^(8 / 6).
    let scaling = RopeScaling::Dynamic {
        factor: 2.0,
        original_max_position_embeddings: Some(32),
    };
    let base = THETA * (2.0 * 64.0 / 32.0 - 1.0f64).powf(8.0 / 6.0);
    let (inv, attention) = inv_freq(&scaling, d, 64);
    assert_close(&inv, &plain(d, base));
    assert_eq!(attention, 1.0);
    // Tables shorter than L0 are computed at L0: the base is unchanged.
    assert_close(&inv_freq(&scaling, d, 16).0, &plain(d, THETA));
}

#[test]
fn reads_rope_type_and_the_older_type_key() {
    let yarn_json = serde_json::json!({
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096
    });
    assert_eq!(RopeScaling::from_json(&yarn_json).unwrap(), Some(yarn(4.0)));
    // DeepSeek-V3's config.json: `type`, integer factor.
    let v3 = serde_json::json!({
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
        "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"
    });
    assert_eq!(
        RopeScaling::from_json(&v3).unwrap(),
        MlaConfig::deepseek_v3().rope_scaling
    );
    // Llama 3.1's, with transformers 5's extra rope_theta ignored.
    let llama = serde_json::json!({
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3", "rope_theta": 500000.0
    });
    assert_eq!(
        RopeScaling::from_json(&llama).unwrap(),
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: Some(8192),
        })
    );
    let linear: RopeScaling = serde_json::from_str(r#"{"type": "linear", "factor": 2}"#).unwrap();
    assert_eq!(linear, RopeScaling::Linear { factor: 2.0 });
    let dynamic: RopeScaling =
        serde_json::from_str(r#"{"rope_type": "dynamic", "factor": 2.0}"#).unwrap();
    assert_eq!(
        dynamic,
        RopeScaling::Dynamic {
            factor: 2.0,
            original_max_position_embeddings: None
        }
    );
    // `rope_type` wins over `type`.
    let both: RopeScaling =
        serde_json::from_str(r#"{"rope_type": "linear", "type": "yarn", "factor": 2}"#).unwrap();
    assert_eq!(both.rope_type(), "linear");
    // No scaling.
    assert_eq!(
        RopeScaling::from_json(&serde_json::Value::Null).unwrap(),
        None
    );
    assert_eq!(
        RopeScaling::from_json(&serde_json::json!({"rope_type": "default", "rope_theta": 1e4}))
            .unwrap(),
        None
    );
    // Serialising writes `rope_type` and reads back.
    for scaling in [
        yarn(4.0),
        MlaConfig::deepseek_v3().rope_scaling.unwrap(),
        linear,
    ] {
        let value = serde_json::to_value(&scaling).unwrap();
        assert_eq!(value["rope_type"], scaling.rope_type());
        assert_eq!(RopeScaling::from_json(&value).unwrap(), Some(scaling));
    }
}

#[test]
fn configs_read_rope_scaling() {
    let config: GqaConfig =
        serde_json::from_str(r#"{"rope_scaling": {"type": "linear", "factor": 2.0}}"#).unwrap();
    assert_eq!(
        config.rope_scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
    for none in [
        r#"{}"#,
        r#"{"rope_scaling": null}"#,
        r#"{"rope_scaling": {"rope_type": "default"}}"#,
    ] {
        let config: GqaConfig = serde_json::from_str(none).unwrap();
        assert_eq!(config.rope_scaling, None, "{none}");
    }
    let config: MlaConfig =
        serde_json::from_str(r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}}"#)
            .unwrap();
    assert_eq!(config.rope_scaling, Some(yarn(4.0)));
    let round_trip: MlaConfig =
        serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
    assert_eq!(round_trip, config);
}

#[test]
fn an_unknown_rope_type_is_an_error_naming_it() {
    let err = RopeScaling::from_json(&serde_json::json!({"rope_type": "longrope", "factor": 4.0}))
        .unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("longrope") && msg.contains("yarn") && msg.contains("llama3"),
        "{msg}"
    );
    // Through serde, inside a config too.
    let err = serde_json::from_str::<RopeScaling>(r#"{"type": "su", "factor": 4.0}"#).unwrap_err();
    assert!(err.to_string().contains("`su`"), "{err}");
    let err =
        serde_json::from_str::<GqaConfig>(r#"{"rope_scaling": {"rope_type": "ntk"}}"#).unwrap_err();
    assert!(err.to_string().contains("`ntk`"), "{err}");
    // Missing type or required field.
    let err = RopeScaling::from_json(&serde_json::json!({"factor": 4.0})).unwrap_err();
    assert!(err.to_string().contains("rope_type"), "{err}");
    let err = RopeScaling::from_json(&serde_json::json!({"rope_type": "llama3", "factor": 8.0}))
        .unwrap_err();
    assert!(err.to_string().contains("low_freq_factor"), "{err}");
    let err = serde_json::from_str::<RopeScaling>(r#"{"rope_type": "default"}"#).unwrap_err();
    assert!(err.to_string().contains("default"), "{err}");
}

#[test]
fn bad_values_are_errors() {
    let bad = [
        RopeScaling::Linear { factor: 0.0 },
        RopeScaling::Dynamic {
            factor: f64::NAN,
            original_max_position_embeddings: None,
        },
        RopeScaling::Dynamic {
            factor: 2.0,
            original_max_position_embeddings: Some(0),
        },
        Yarn {
            beta_fast: 1.0,
            beta_slow: 32.0,
            ..Yarn::new(4.0)
        }
        .build(),
        Yarn {
            attention_factor: Some(-1.0),
            ..Yarn::new(4.0)
        }
        .build(),
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: None,
        },
    ];
    for scaling in bad {
        assert!(
            matches!(scaling.validate(), Err(MoeError::Config(_))),
            "{scaling:?}"
        );
        assert!(Rope::with_scaling(8, 16, THETA, Some(&scaling), Device::Cpu).is_err());
        let config = GqaConfig {
            rope_scaling: Some(scaling.clone()),
            ..Default::default()
        };
        assert!(config.validate().is_err(), "{scaling:?}");
    }
    let json = serde_json::json!({"rope_type": "linear", "factor": -2.0});
    assert!(RopeScaling::from_json(&json).is_err());
    // Sizes the formulas cannot take.
    let dynamic = RopeScaling::Dynamic {
        factor: 2.0,
        original_max_position_embeddings: None,
    };
    assert!(Rope::with_scaling(2, 16, THETA, Some(&dynamic), Device::Cpu).is_err());
    assert!(Rope::with_scaling(8, 16, 1.0, Some(&yarn(4.0)), Device::Cpu).is_err());
    assert!(Rope::with_scaling(7, 16, THETA, Some(&yarn(4.0)), Device::Cpu).is_err());
    assert!(Rope::with_scaling(8, 0, THETA, Some(&yarn(4.0)), Device::Cpu).is_err());
}
