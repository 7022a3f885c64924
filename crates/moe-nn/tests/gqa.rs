//! Grouped-query attention: against attention written out by hand, against
//! multi-head attention with repeated key/value heads, incremental decoding
//! against the full forward, causality, and errors.

use moe_core::{MoeError, WeightInit};
use moe_nn::{GqaConfig, GroupedQueryAttention, KvCache, QkNorm, Rope, RopeScaling};
use tch::{nn, Device, Kind, Tensor};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn config() -> GqaConfig {
    GqaConfig {
        hidden_size: 32,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        max_position_embeddings: 16,
        init: WeightInit::Xavier,
        ..Default::default()
    }
}

/// A layer whose norm weights are random rather than ones, so that a norm
/// applied in the wrong place shows.
fn layer(config: &GqaConfig, seed: i64) -> (nn::VarStore, GroupedQueryAttention) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let attn = GroupedQueryAttention::new(&(vs.root() / "attn"), config).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            if name.contains("norm") {
                var.copy_(&(Tensor::rand_like(&var) + 0.5));
            }
            // Sinks of either sign, not the zeros they start from.
            if name.ends_with("sinks") {
                var.copy_(&Tensor::randn_like(&var));
            }
        }
    });
    (vs, attn)
}

/// YaRN over 4 original positions, so that the 16-position tables change.
fn yarn() -> RopeScaling {
    RopeScaling::Yarn {
        factor: 4.0,
        original_max_position_embeddings: Some(4),
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: None,
        mscale_all_dim: None,
        attention_factor: None,
        truncate: true,
    }
}

/// Every option on its own and all together.
fn variants() -> Vec<(&'static str, GqaConfig)> {
    vec![
        ("plain", config()),
        (
            "bias",
            GqaConfig {
                attention_bias: true,
                ..config()
            },
        ),
        (
            "qk-norm projection",
            GqaConfig {
                qk_norm: QkNorm::Projection,
                ..config()
            },
        ),
        (
            "qk-norm head",
            GqaConfig {
                qk_norm: QkNorm::Head,
                ..config()
            },
        ),
        (
            "localized filtering",
            GqaConfig {
                localized_filtering: true,
                ..config()
            },
        ),
        (
            "rope on half of each head",
            GqaConfig {
                partial_rotary_factor: 0.5,
                ..config()
            },
        ),
        (
            "yarn rope scaling",
            GqaConfig {
                rope_scaling: Some(yarn()),
                ..config()
            },
        ),
        (
            "sliding window 3",
            GqaConfig {
                sliding_window: Some(3),
                ..config()
            },
        ),
        (
            "attention sinks",
            GqaConfig {
                attention_sinks: true,
                ..config()
            },
        ),
        (
            "window and sinks, qk-norm head",
            GqaConfig {
                sliding_window: Some(4),
                attention_sinks: true,
                qk_norm: QkNorm::Head,
                attention_bias: true,
                ..config()
            },
        ),
        (
            "everything, head_dim 6",
            GqaConfig {
                head_dim: Some(6),
                attention_bias: true,
                qk_norm: QkNorm::Projection,
                localized_filtering: true,
                num_key_value_heads: 4,
                rope_scaling: Some(RopeScaling::Linear { factor: 2.0 }),
                ..config()
            },
        ),
    ]
}

#[test]
fn parameters_have_hugging_face_names() {
    let full = GqaConfig {
        attention_bias: true,
        qk_norm: QkNorm::Projection,
        localized_filtering: true,
        ..config()
    };
    let (vs, _attn) = layer(&full, 0);
    let vars = vs.variables();
    let shape = |name: &str| vars[&format!("attn.{name}")].size();
    assert_eq!(shape("q_proj.weight"), [32, 32]);
    assert_eq!(shape("q_proj.bias"), [32]);
    assert_eq!(shape("k_proj.weight"), [8, 32]);
    assert_eq!(shape("k_proj.bias"), [8]);
    assert_eq!(shape("v_proj.weight"), [8, 32]);
    assert_eq!(shape("v_proj.bias"), [8]);
    assert_eq!(shape("o_proj.weight"), [32, 32]);
    assert!(!vars.contains_key("attn.o_proj.bias"));
    assert_eq!(shape("q_norm.weight"), [32]);
    assert_eq!(shape("k_norm.weight"), [8]);
    assert_eq!(shape("lf_gate.conv1.weight"), [16, 32, 2, 1]);
    assert_eq!(vars.len(), 7 + 2 + 5);

    let head = GqaConfig {
        qk_norm: QkNorm::Head,
        head_dim: Some(6),
        ..config()
    };
    let (vs, _attn) = layer(&head, 0);
    let vars = vs.variables();
    assert_eq!(vars["attn.q_proj.weight"].size(), [48, 32]);
    assert_eq!(vars["attn.o_proj.weight"].size(), [32, 48]);
    assert_eq!(vars["attn.q_norm.weight"].size(), [6]);
    assert_eq!(vars["attn.k_norm.weight"].size(), [6]);
    assert!(!vars.contains_key("attn.q_proj.bias"));

    let sinks = GqaConfig {
        attention_sinks: true,
        ..config()
    };
    let (vs, _attn) = layer(&sinks, 0);
    assert_eq!(vs.variables()["attn.sinks"].size(), [8]);
}

/// RoPE makes a score depend on `i - j` alone and every other step acts on
/// one token, so position `i` under a window `W` computes what the layer
/// without a window computes at the last position of `x[i - W + 1 ..= i]`.
#[test]
fn a_sliding_window_sees_what_the_last_w_positions_alone_give() {
    for (window, sinks) in [(3, false), (4, true), (1, false)] {
        let windowed = GqaConfig {
            sliding_window: Some(window),
            attention_sinks: sinks,
            qk_norm: QkNorm::Head,
            ..config()
        };
        let (vs, attn) = layer(&windowed, 8);
        let full_view = GqaConfig {
            sliding_window: None,
            ..windowed.clone()
        };
        let mut vs_full = nn::VarStore::new(Device::Cpu);
        let unwindowed =
            GroupedQueryAttention::new(&(vs_full.root() / "attn"), &full_view).unwrap();
        vs_full.copy(&vs).unwrap();
        let x = Tensor::randn([2, 11, 32], (Kind::Float, Device::Cpu));
        let y = attn.forward_t(&x, false).unwrap();
        for i in 0..11 {
            let start = (i - window + 1).max(0);
            let alone = unwindowed
                .forward_t(&x.narrow(1, start, i - start + 1), false)
                .unwrap();
            let diff = max_abs_diff(&y.narrow(1, i, 1), &alone.narrow(1, i - start, 1));
            assert!(diff < 1e-5, "window {window}, position {i}: {diff}");
        }
        // The window changes what the later positions see.
        let y_full = unwindowed.forward_t(&x, false).unwrap();
        assert!(max_abs_diff(&y.narrow(1, 10, 1), &y_full.narrow(1, 10, 1)) > 1e-4);
    }
}

/// Sinks are trained: the loss reaches them; a very negative sink is no sink.
#[test]
fn sinks_take_gradients_and_vanish_at_minus_infinity() {
    let with_sinks = GqaConfig {
        attention_sinks: true,
        ..config()
    };
    let (vs, attn) = layer(&with_sinks, 9);
    let x = Tensor::randn([2, 6, 32], (Kind::Float, Device::Cpu));
    attn.forward_t(&x, true)
        .unwrap()
        .square()
        .sum(Kind::Float)
        .backward();
    let grad = vs.variables()["attn.sinks"].grad();
    assert!(grad.defined() && grad.abs().max().double_value(&[]) > 0.0);

    let plain = GqaConfig {
        attention_sinks: false,
        ..with_sinks.clone()
    };
    let mut vs_plain = nn::VarStore::new(Device::Cpu);
    let without = GroupedQueryAttention::new(&(vs_plain.root() / "attn"), &plain).unwrap();
    vs_plain.copy(&vs).unwrap();
    tch::no_grad(|| {
        let _ = vs.variables()["attn.sinks"].shallow_clone().fill_(-1e4);
    });
    let diff = max_abs_diff(
        &attn.forward_t(&x, false).unwrap(),
        &without.forward_t(&x, false).unwrap(),
    );
    assert!(diff < 1e-6, "{diff}");
}

#[test]
fn matches_attention_written_out_by_hand() {
    let cfg = config();
    let (vs, attn) = layer(&cfg, 1);
    let vars = vs.variables();
    let w = |name: &str| vars[&format!("attn.{name}.weight")].shallow_clone();
    let (b, t, d) = (2, 7, 4);
    let x = Tensor::randn([b, t, 32], (Kind::Float, Device::Cpu));
    let heads = |y: Tensor, n: i64| y.view([b, t, n, d]).transpose(1, 2);
    let q = heads(x.matmul(&w("q_proj").tr()), 8);
    let k = heads(x.matmul(&w("k_proj").tr()), 2);
    let v = heads(x.matmul(&w("v_proj").tr()), 2);
    let q = attn.rope().apply(&q, 0).unwrap();
    let k = attn.rope().apply(&k, 0).unwrap();
    // Query head h reads key/value head h / 4.
    let k = k.repeat_interleave_self_int(4, 1, None);
    let v = v.repeat_interleave_self_int(4, 1, None);
    let future = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
    let weights = (q.matmul(&k.transpose(-2, -1)) / (d as f64).sqrt())
        .masked_fill(&future, f64::NEG_INFINITY)
        .softmax(-1, Kind::Float);
    let want = weights
        .matmul(&v)
        .transpose(1, 2)
        .reshape([b, t, 32])
        .matmul(&w("o_proj").tr());
    let got = attn.forward_t(&x, false).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "differs by {diff}");
}

#[test]
fn equals_multi_head_attention_with_repeated_key_value_heads() {
    for (name, gqa_config) in variants() {
        let (gqa_vs, gqa) = layer(&gqa_config, 2);
        let groups = gqa_config.num_key_value_groups();
        let mha_config = GqaConfig {
            num_key_value_heads: gqa_config.num_attention_heads,
            ..gqa_config.clone()
        };
        let (mha_vs, mha) = layer(&mha_config, 3);
        let d = gqa_config.head_dim();
        let source = gqa_vs.variables();
        tch::no_grad(|| {
            for (key, mut var) in mha_vs.variables() {
                let src = &source[&key];
                let value = if key.contains("k_proj") || key.contains("v_proj") {
                    // Rows of key/value head g, repeated for its query heads.
                    let rows = src.size()[0];
                    let rest: Vec<i64> = src.size()[1..].to_vec();
                    let mut grouped = vec![rows / d, d];
                    grouped.extend(&rest);
                    src.view(grouped.as_slice())
                        .repeat_interleave_self_int(groups, 0, None)
                        .reshape(var.size().as_slice())
                } else if key.contains("k_norm") && gqa_config.qk_norm == QkNorm::Projection {
                    src.view([-1, d])
                        .repeat_interleave_self_int(groups, 0, None)
                        .reshape([-1])
                } else {
                    src.shallow_clone()
                };
                var.copy_(&value);
            }
        });
        if gqa_config.qk_norm == QkNorm::Projection {
            // OLMoE's k_norm normalises over all key heads at once, so the
            // mean square over repeated heads equals the original one only
            // because every head is repeated the same number of times.
            assert_eq!(
                mha_vs.variables()["attn.k_norm.weight"].size()[0],
                gqa_config.num_attention_heads * d
            );
        }
        let x = Tensor::randn([2, 9, 32], (Kind::Float, Device::Cpu));
        let diff = max_abs_diff(
            &gqa.forward_t(&x, false).unwrap(),
            &mha.forward_t(&x, false).unwrap(),
        );
        assert!(diff < 1e-5, "{name}: GQA and repeated MHA differ by {diff}");
    }
}

#[test]
fn cached_chunks_equal_the_full_forward() {
    for (name, cfg) in variants() {
        let (_vs, attn) = layer(&cfg, 4);
        let x = Tensor::randn([2, 12, 32], (Kind::Float, Device::Cpu));
        let full = attn.forward_t(&x, false).unwrap();
        let mut cache = KvCache::new();
        let mut parts = Vec::new();
        let mut start = 0;
        // Prefill, one step, a multi-position chunk after a non-empty
        // cache (the masked case), then single steps and a pair.
        for len in [5, 1, 3, 1, 2] {
            parts.push(
                attn.forward_cached(&x.narrow(1, start, len), &mut cache)
                    .unwrap(),
            );
            start += len;
            assert_eq!(cache.len(), start);
            assert_eq!(cache.batch_size(), Some(2));
        }
        let diff = max_abs_diff(&Tensor::cat(&parts, 1), &full);
        assert!(diff < 1e-5, "{name}: cached output differs by {diff}");

        // A cleared cache starts a new sequence at position 0.
        cache.clear();
        assert!(cache.is_empty());
        let again = attn.forward_cached(&x.narrow(1, 0, 4), &mut cache).unwrap();
        let diff = max_abs_diff(&again, &full.narrow(1, 0, 4));
        assert!(diff < 1e-5, "{name}: after clear, differs by {diff}");
    }
}

#[test]
fn changing_a_token_never_changes_earlier_outputs() {
    for (name, cfg) in variants() {
        let (_vs, attn) = layer(&cfg, 5);
        let x = Tensor::randn([2, 10, 32], (Kind::Float, Device::Cpu));
        let y = attn.forward_t(&x, false).unwrap();
        for t in [0i64, 4, 9] {
            let x2 = x.copy();
            let _ = x2.narrow(1, t, 1).fill_(3.0);
            let y2 = attn.forward_t(&x2, false).unwrap();
            if t > 0 {
                let before = max_abs_diff(&y.narrow(1, 0, t), &y2.narrow(1, 0, t));
                assert!(before < 1e-6, "{name}: position < {t} changed by {before}");
            }
            let at = max_abs_diff(&y.narrow(1, t, 1), &y2.narrow(1, t, 1));
            assert!(at > 1e-4, "{name}: position {t} ignored its own input");
        }
    }
}

#[test]
fn dropout_only_in_training() {
    let tiny = GqaConfig {
        attention_dropout: 1e-9,
        ..config()
    };
    let (_vs, attn) = layer(&tiny, 6);
    let x = Tensor::randn([2, 8, 32], (Kind::Float, Device::Cpu));
    // A probability that rounds to "keep everything" takes the CPU math
    // path (with repeated key/value heads) and must match the fused kernel.
    let diff = max_abs_diff(
        &attn.forward_t(&x, true).unwrap(),
        &attn.forward_t(&x, false).unwrap(),
    );
    assert!(diff < 1e-5, "math path differs by {diff}");

    let half = GqaConfig {
        attention_dropout: 0.5,
        ..config()
    };
    let (_vs, attn) = layer(&half, 6);
    let eval = attn.forward_t(&x, false).unwrap();
    assert!(max_abs_diff(&eval, &attn.forward_t(&x, false).unwrap()) == 0.0);
    assert!(max_abs_diff(&eval, &attn.forward_t(&x, true).unwrap()) > 1e-3);
}

#[test]
fn bf16_inputs_compute_in_bf16() {
    let cfg = GqaConfig {
        qk_norm: QkNorm::Head,
        localized_filtering: true,
        ..config()
    };
    let (_vs, attn) = layer(&cfg, 7);
    let x = Tensor::randn([1, 6, 32], (Kind::Float, Device::Cpu));
    let y16 = attn.forward_t(&x.to_kind(Kind::BFloat16), false).unwrap();
    assert_eq!(y16.kind(), Kind::BFloat16);
    let y32 = attn.forward_t(&x, false).unwrap();
    let scale = y32.abs().max().double_value(&[]);
    let diff = max_abs_diff(&y16.to_kind(Kind::Float), &y32);
    assert!(diff < 0.1 * scale, "bf16 off by {diff} (scale {scale})");
}

#[test]
fn bad_configs_are_errors() {
    let cases = [
        (
            GqaConfig {
                num_key_value_heads: 3,
                ..config()
            },
            "must divide",
        ),
        (
            GqaConfig {
                sliding_window: Some(0),
                ..config()
            },
            "sliding_window must be at least 1",
        ),
        (
            GqaConfig {
                hidden_size: 0,
                ..config()
            },
            "hidden_size must be positive",
        ),
        (
            GqaConfig {
                num_attention_heads: 0,
                ..config()
            },
            "num_attention_heads must be positive",
        ),
        (
            GqaConfig {
                num_key_value_heads: 0,
                ..config()
            },
            "num_key_value_heads must be positive",
        ),
        (
            GqaConfig {
                head_dim: Some(0),
                ..config()
            },
            "head_dim must be positive",
        ),
        (
            GqaConfig {
                max_position_embeddings: 0,
                ..config()
            },
            "max_position_embeddings must be positive",
        ),
        (
            GqaConfig {
                hidden_size: 36,
                ..config()
            },
            "divisible",
        ),
        (
            GqaConfig {
                head_dim: Some(5),
                ..config()
            },
            "even",
        ),
        (
            GqaConfig {
                hidden_size: 33,
                head_dim: Some(4),
                localized_filtering: true,
                ..config()
            },
            "even hidden_size",
        ),
        (
            GqaConfig {
                attention_dropout: 1.0,
                ..config()
            },
            "attention_dropout",
        ),
        (
            GqaConfig {
                attention_dropout: -0.1,
                ..config()
            },
            "attention_dropout",
        ),
        (
            GqaConfig {
                rope_theta: 0.0,
                ..config()
            },
            "rope_theta",
        ),
        (
            GqaConfig {
                rms_norm_eps: -1.0,
                ..config()
            },
            "rms_norm_eps",
        ),
        // head_dim 4: 0, more than all, and one (odd) dimension to turn.
        (
            GqaConfig {
                partial_rotary_factor: 0.0,
                ..config()
            },
            "partial_rotary_factor",
        ),
        (
            GqaConfig {
                partial_rotary_factor: 1.5,
                ..config()
            },
            "partial_rotary_factor",
        ),
        (
            GqaConfig {
                partial_rotary_factor: 0.25,
                ..config()
            },
            "even, positive number of the head's 4 dimensions (got 1)",
        ),
    ];
    let vs = nn::VarStore::new(Device::Cpu);
    for (cfg, needle) in cases {
        let err = GroupedQueryAttention::new(&vs.root(), &cfg).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
        assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
    }
    // An odd hidden size is fine without the filter.
    let odd = GqaConfig {
        hidden_size: 33,
        head_dim: Some(4),
        ..config()
    };
    assert!(GroupedQueryAttention::new(&vs.root(), &odd).is_ok());
}

#[test]
fn bad_inputs_are_errors() {
    let (_vs, attn) = layer(&config(), 8);
    let f32s = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let shape_errors = [f32s(&[4, 32]), f32s(&[1, 4, 31]), f32s(&[1, 0, 32])];
    for x in &shape_errors {
        let err = attn.forward_t(x, false).unwrap_err();
        assert!(matches!(err, MoeError::Shape { .. }), "{err}");
    }
    let ints = Tensor::zeros([1, 4, 32], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        attn.forward_t(&ints, false),
        Err(MoeError::Kind { .. })
    ));
    assert!(matches!(
        attn.forward_t(&f32s(&[1, 17, 32]), false),
        Err(MoeError::SequenceTooLong {
            len: 17,
            block_size: 16
        })
    ));
}

#[test]
fn bad_caches_are_errors_and_leave_the_cache_alone() {
    let (_vs, attn) = layer(&config(), 9);
    let x = Tensor::randn([2, 12, 32], (Kind::Float, Device::Cpu));
    let mut cache = KvCache::new();
    let _ = attn.forward_cached(&x, &mut cache).unwrap();
    let five = x.narrow(1, 0, 5);
    assert!(matches!(
        attn.forward_cached(&five, &mut cache),
        Err(MoeError::SequenceTooLong {
            len: 17,
            block_size: 16
        })
    ));
    let other_batch = Tensor::randn([3, 1, 32], (Kind::Float, Device::Cpu));
    assert!(matches!(
        attn.forward_cached(&other_batch, &mut cache),
        Err(MoeError::Shape { .. })
    ));
    let bf16 = x.narrow(1, 0, 1).to_kind(Kind::BFloat16);
    assert!(matches!(
        attn.forward_cached(&bf16, &mut cache),
        Err(MoeError::Kind { .. })
    ));
    assert_eq!(cache.len(), 12, "failed calls must not touch the cache");

    // A cache filled by a layer with other key/value heads.
    let mha = GqaConfig {
        num_key_value_heads: 8,
        ..config()
    };
    let (_vs2, other) = layer(&mha, 10);
    let mut other_cache = KvCache::new();
    let _ = other
        .forward_cached(&x.narrow(1, 0, 3), &mut other_cache)
        .unwrap();
    assert!(matches!(
        attn.forward_cached(&x.narrow(1, 3, 1), &mut other_cache),
        Err(MoeError::Shape { .. })
    ));

    // A cache without the localized filter's state.
    let lf = GqaConfig {
        localized_filtering: true,
        ..config()
    };
    let (_vs3, lf_attn) = layer(&lf, 11);
    let mut plain_cache = KvCache::new();
    let _ = attn
        .forward_cached(&x.narrow(1, 0, 3), &mut plain_cache)
        .unwrap();
    assert!(matches!(
        lf_attn.forward_cached(&x.narrow(1, 3, 1), &mut plain_cache),
        Err(MoeError::Config(_))
    ));
}

#[test]
fn default_config_is_valid_and_derives_its_sizes() {
    let cfg = GqaConfig::default();
    assert!(cfg.validate().is_ok());
    assert_eq!(cfg.head_dim(), 16);
    assert_eq!(cfg.num_key_value_groups(), 2);
    assert!((cfg.scale_factor() - 0.25).abs() < 1e-12);
    let explicit = GqaConfig {
        head_dim: Some(12),
        num_key_value_heads: 1,
        ..cfg
    };
    assert_eq!(explicit.head_dim(), 12);
    assert_eq!(explicit.num_key_value_groups(), 4);
}

#[test]
fn rope_scaling_sets_the_tables() {
    for scaling in [yarn(), RopeScaling::Linear { factor: 2.0 }] {
        let cfg = GqaConfig {
            rope_scaling: Some(scaling.clone()),
            ..config()
        };
        let (_vs, attn) = layer(&cfg, 0);
        let scaled = Rope::with_scaling(4, 16, 10000.0, Some(&scaling), Device::Cpu).unwrap();
        let plain = Rope::new(4, 16, 10000.0, Device::Cpu).unwrap();
        assert!(max_abs_diff(attn.rope().cos(), scaled.cos()) < 1e-7);
        assert!(max_abs_diff(attn.rope().sin(), scaled.sin()) < 1e-7);
        assert!(max_abs_diff(attn.rope().sin(), plain.sin()) > 1e-3);
        assert_eq!(attn.rope().attention_factor(), scaling.attention_factor());
        // Llama-style attention keeps head_dim^-0.5.
        assert_eq!(cfg.scale_factor(), 0.5);
    }
    assert!((yarn().attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
}
