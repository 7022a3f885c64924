//! Multi-head Latent Attention: against attention written out by hand from
//! its weights (keys and values expanded from the latent, RoPE as pairwise
//! rotations), incremental decoding from the cached latents against the full
//! forward, causality, parameter names, cache sizes and errors.

use approx::assert_abs_diff_eq;
use moe_core::{MoeError, WeightInit};
use moe_nn::{
    default_inv_freq, AttentionConfig, CausalSelfAttention, GqaConfig, GroupedQueryAttention,
    KvCache, MlaConfig, MultiHeadLatentAttention, RopeScaling,
};
use tch::{nn, Device, Kind, Tensor};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Value heads (10) narrower than query/key heads (8 + 6).
fn config() -> MlaConfig {
    MlaConfig {
        hidden_size: 32,
        num_attention_heads: 4,
        q_lora_rank: Some(24),
        kv_lora_rank: 16,
        qk_nope_head_dim: 8,
        qk_rope_head_dim: 6,
        v_head_dim: 10,
        max_position_embeddings: 24,
        rope_theta: 100.0,
        init: WeightInit::Xavier,
        ..Default::default()
    }
}

/// DeepSeek-style YaRN whose mscales differ, so that both the tables
/// (attention factor) and the softmax scale (mscale_all_dim) change.
fn yarn() -> RopeScaling {
    RopeScaling::Yarn {
        factor: 4.0,
        original_max_position_embeddings: Some(6),
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: Some(1.0),
        mscale_all_dim: Some(0.5),
        attention_factor: None,
        truncate: true,
    }
}

/// Every option on its own and several together.
fn variants() -> Vec<(&'static str, MlaConfig)> {
    vec![
        ("q_lora_rank, interleaved", config()),
        (
            "q_proj, halves",
            MlaConfig {
                q_lora_rank: None,
                rope_interleave: false,
                ..config()
            },
        ),
        (
            "yarn",
            MlaConfig {
                rope_scaling: Some(yarn()),
                ..config()
            },
        ),
        (
            "yarn, q_proj, bias",
            MlaConfig {
                rope_scaling: Some(yarn()),
                q_lora_rank: None,
                attention_bias: true,
                ..config()
            },
        ),
        (
            "bias, no nope part, halves",
            MlaConfig {
                attention_bias: true,
                qk_nope_head_dim: 0,
                rope_interleave: false,
                ..config()
            },
        ),
    ]
}

/// A layer whose norm weights are random rather than ones, so that a norm
/// applied in the wrong place shows.
fn layer(config: &MlaConfig, seed: i64) -> (nn::VarStore, MultiHeadLatentAttention) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let attn = MultiHeadLatentAttention::new(&(vs.root() / "attn"), config).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            if name.contains("norm") {
                var.copy_(&(Tensor::rand_like(&var) + 0.5));
            }
        }
    });
    (vs, attn)
}

/// MLA written out in f64 from the weights: queries, the latent's RMSNorm,
/// keys and values expanded through `kv_b_proj`, RoPE as rotations of
/// adjacent pairs (interleaved) or of halves, by angles `m inv_freq[i]` times
/// the attention factor, the DeepSeek softmax scale, the causal mask.
fn reference(vs: &nn::VarStore, cfg: &MlaConfig, x: &Tensor) -> Tensor {
    let vars = vs.variables();
    let param = |name: &str| {
        vars.get(&format!("attn.{name}"))
            .map(|t| t.to_kind(Kind::Double))
    };
    let lin = |x: &Tensor, name: &str| {
        let y = x.matmul(&param(&format!("{name}.weight")).unwrap().tr());
        match param(&format!("{name}.bias")) {
            Some(b) => y + b,
            None => y,
        }
    };
    let rms = |x: &Tensor, name: &str| {
        let ms = x.square().mean_dim(-1, true, Kind::Double);
        x * (ms + 1e-6).rsqrt() * param(&format!("{name}.weight")).unwrap()
    };
    let x = x.to_kind(Kind::Double);
    let (b, t, _) = x.size3().unwrap();
    let (h, d_n, d_r, d_v, r) = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let q = match cfg.q_lora_rank {
        Some(_) => lin(&rms(&lin(&x, "q_a_proj"), "q_a_layernorm"), "q_b_proj"),
        None => lin(&x, "q_proj"),
    }
    .view([b, t, h, d_n + d_r]);
    let kv_a = lin(&x, "kv_a_proj_with_mqa");
    let kv =
        lin(&rms(&kv_a.narrow(-1, 0, r), "kv_a_layernorm"), "kv_b_proj").view([b, t, h, d_n + d_v]);
    let k_pe = kv_a.narrow(-1, r, d_r).unsqueeze(2);

    let (inv_freq, attention_factor) = match &cfg.rope_scaling {
        Some(s) => s
            .parameters(
                d_r,
                cfg.max_position_embeddings,
                cfg.rope_theta,
                Device::Cpu,
            )
            .unwrap(),
        None => (
            default_inv_freq(d_r, cfg.rope_theta, Device::Cpu).unwrap(),
            1.0,
        ),
    };
    let angles = Tensor::arange(t, (Kind::Double, Device::Cpu)).unsqueeze(1)
        * inv_freq.to_kind(Kind::Double).unsqueeze(0);
    // [1, T, 1, d_r / 2]
    let (cos, sin) = (
        angles.cos().view([1, t, 1, d_r / 2]),
        angles.sin().view([1, t, 1, d_r / 2]),
    );
    let rotate = |x: &Tensor| {
        let (x1, x2) = if cfg.rope_interleave {
            let pairs = x.unflatten(-1, [d_r / 2, 2]);
            (pairs.select(-1, 0), pairs.select(-1, 1))
        } else {
            (x.narrow(-1, 0, d_r / 2), x.narrow(-1, d_r / 2, d_r / 2))
        };
        let (y1, y2) = (&x1 * &cos - &x2 * &sin, &x2 * &cos + &x1 * &sin);
        let y = if cfg.rope_interleave {
            Tensor::stack(&[y1, y2], -1).flatten(-2, -1)
        } else {
            Tensor::cat(&[y1, y2], -1)
        };
        y * attention_factor
    };
    let q = Tensor::cat(&[q.narrow(-1, 0, d_n), rotate(&q.narrow(-1, d_n, d_r))], -1);
    let k_pe = rotate(&k_pe).expand([b, t, h, d_r], false);
    let k = Tensor::cat(&[kv.narrow(-1, 0, d_n), k_pe], -1);
    let v = kv.narrow(-1, d_n, d_v);

    let mscale = match cfg.rope_scaling {
        Some(RopeScaling::Yarn {
            factor,
            mscale_all_dim: Some(m),
            ..
        }) => 0.1 * m * factor.ln() + 1.0,
        _ => 1.0,
    };
    let scale = ((d_n + d_r) as f64).powf(-0.5) * mscale * mscale;
    // [B, H, T, T]
    let scores = q.transpose(1, 2).matmul(&k.permute([0, 2, 3, 1])) * scale;
    let future = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
    let weights = scores
        .masked_fill(&future, f64::NEG_INFINITY)
        .softmax(-1, Kind::Double);
    let heads = weights.matmul(&v.transpose(1, 2)); // [B, H, T, d_v]
    lin(&heads.transpose(1, 2).reshape([b, t, h * d_v]), "o_proj")
}

#[test]
fn matches_attention_written_out_by_hand() {
    for (name, cfg) in variants() {
        let (vs, attn) = layer(&cfg, 1);
        let x = Tensor::randn([2, 9, 32], (Kind::Float, Device::Cpu));
        let y = attn.forward_t(&x, false).unwrap();
        assert_eq!(y.size(), [2, 9, 32]);
        assert_eq!(y.kind(), Kind::Float);
        let diff = max_abs_diff(&y, &reference(&vs, &cfg, &x));
        assert!(
            diff < 1e-5,
            "{name}: differs from the hand computation by {diff}"
        );
    }
}

#[test]
fn yarn_scales_the_softmax_and_the_tables() {
    let cfg = MlaConfig {
        rope_scaling: Some(yarn()),
        ..config()
    };
    let get_mscale = |m: f64| 0.1 * m * 4f64.ln() + 1.0;
    assert_abs_diff_eq!(
        cfg.softmax_scale(),
        14f64.powf(-0.5) * get_mscale(0.5).powi(2),
        epsilon = 1e-12
    );
    assert_abs_diff_eq!(config().softmax_scale(), 14f64.powf(-0.5), epsilon = 1e-12);
    let (_vs, attn) = layer(&cfg, 0);
    assert_abs_diff_eq!(
        attn.rope().attention_factor(),
        get_mscale(1.0) / get_mscale(0.5),
        epsilon = 1e-12
    );
    assert_eq!(attn.rope().head_dim(), 6);
    assert_eq!(attn.rope().max_positions(), 24);
}

#[test]
fn cached_chunks_equal_the_full_forward() {
    for (name, cfg) in variants() {
        let (_vs, attn) = layer(&cfg, 2);
        let x = Tensor::randn([2, 24, 32], (Kind::Float, Device::Cpu));
        let full = attn.forward_t(&x, false).unwrap();
        let mut cache = KvCache::new();
        // Prefill, single steps, and multi-position chunks after a non-empty
        // cache (the masked case), up to the full length.
        let mut parts = Vec::new();
        let mut start = 0;
        for len in [5, 1, 3, 1, 1, 2, 4, 1, 6] {
            parts.push(
                attn.forward_cached(&x.narrow(1, start, len), &mut cache)
                    .unwrap(),
            );
            start += len;
            assert_eq!(cache.len(), start);
        }
        assert_eq!(cache.batch_size(), Some(2));
        let diff = max_abs_diff(&Tensor::cat(&parts, 1), &full);
        assert!(diff < 1e-5, "{name}: cached output differs by {diff}");
        // The cache holds the latent and the RoPE key: r + d_r per position.
        assert_eq!(
            cache.stored_bytes(),
            2 * 24 * cfg.kv_cache_bytes_per_token(4)
        );
        assert_eq!(cfg.kv_cache_bytes_per_token(4), (16 + 6) * 4);
        // Full.
        assert!(matches!(
            attn.forward_cached(&x.narrow(1, 0, 1), &mut cache),
            Err(MoeError::SequenceTooLong {
                len: 25,
                block_size: 24
            })
        ));
    }
}

#[test]
fn bf16_follows_f32() {
    let (_vs, attn) = layer(&config(), 3);
    let x = Tensor::randn([2, 8, 32], (Kind::Float, Device::Cpu));
    let full = attn.forward_t(&x, false).unwrap();
    let x16 = x.to_kind(Kind::BFloat16);
    let y16 = attn.forward_t(&x16, false).unwrap();
    assert_eq!(y16.kind(), Kind::BFloat16);
    let diff = max_abs_diff(&y16, &full);
    assert!(diff < 0.1, "bf16 differs from f32 by {diff}");
    let mut cache = KvCache::new();
    let a = attn
        .forward_cached(&x16.narrow(1, 0, 5), &mut cache)
        .unwrap();
    let b = attn
        .forward_cached(&x16.narrow(1, 5, 3), &mut cache)
        .unwrap();
    assert_eq!(
        cache.stored_bytes(),
        2 * 8 * config().kv_cache_bytes_per_token(2)
    );
    let diff = max_abs_diff(&Tensor::cat(&[a, b], 1), &y16);
    assert!(diff < 0.1, "bf16 cached differs by {diff}");
    // The cache's dtype is the sequence's.
    assert!(matches!(
        attn.forward_cached(&x.narrow(1, 0, 1), &mut cache),
        Err(MoeError::Kind { .. })
    ));
}

#[test]
fn is_causal() {
    let (_vs, attn) = layer(&config(), 4);
    let x = Tensor::randn([1, 12, 32], (Kind::Float, Device::Cpu));
    let changed = Tensor::cat(
        &[
            x.narrow(1, 0, 7),
            Tensor::randn([1, 5, 32], (Kind::Float, Device::Cpu)),
        ],
        1,
    );
    let y = attn.forward_t(&x, false).unwrap();
    let y2 = attn.forward_t(&changed, false).unwrap();
    assert!(max_abs_diff(&y.narrow(1, 0, 7), &y2.narrow(1, 0, 7)) < 1e-6);
    assert!(max_abs_diff(&y.narrow(1, 7, 5), &y2.narrow(1, 7, 5)) > 1e-3);
}

#[test]
fn parameters_have_hugging_face_names() {
    let full = MlaConfig {
        attention_bias: true,
        ..config()
    };
    let (vs, _attn) = layer(&full, 0);
    let vars = vs.variables();
    let shape = |name: &str| vars[&format!("attn.{name}")].size();
    assert_eq!(shape("q_a_proj.weight"), [24, 32]);
    assert_eq!(shape("q_a_proj.bias"), [24]);
    assert_eq!(shape("q_a_layernorm.weight"), [24]);
    assert_eq!(shape("q_b_proj.weight"), [4 * 14, 24]);
    assert_eq!(shape("kv_a_proj_with_mqa.weight"), [16 + 6, 32]);
    assert_eq!(shape("kv_a_proj_with_mqa.bias"), [16 + 6]);
    assert_eq!(shape("kv_a_layernorm.weight"), [16]);
    assert_eq!(shape("kv_b_proj.weight"), [4 * (8 + 10), 16]);
    assert_eq!(shape("o_proj.weight"), [32, 4 * 10]);
    assert_eq!(shape("o_proj.bias"), [32]);
    for absent in ["q_proj.weight", "q_b_proj.bias", "kv_b_proj.bias"] {
        assert!(!vars.contains_key(&format!("attn.{absent}")), "{absent}");
    }
    assert_eq!(vars.len(), 10);

    let (vs, _attn) = layer(
        &MlaConfig {
            q_lora_rank: None,
            ..config()
        },
        0,
    );
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "attn.kv_a_layernorm.weight",
            "attn.kv_a_proj_with_mqa.weight",
            "attn.kv_b_proj.weight",
            "attn.o_proj.weight",
            "attn.q_proj.weight",
        ]
    );
    assert_eq!(vs.variables()["attn.q_proj.weight"].size(), [56, 32]);
}

#[test]
fn trains_with_dropout() {
    let cfg = MlaConfig {
        attention_dropout: 0.5,
        ..config()
    };
    let (vs, attn) = layer(&cfg, 5);
    let x = Tensor::randn([2, 6, 32], (Kind::Float, Device::Cpu));
    let eval = attn.forward_t(&x, false).unwrap();
    let train = attn.forward_t(&x, true).unwrap();
    assert_eq!(train.size(), [2, 6, 32]);
    assert!(max_abs_diff(&eval, &train) > 1e-4);
    train.square().sum(Kind::Float).backward();
    for (name, var) in vs.variables() {
        let grad = var.grad();
        assert!(grad.defined(), "{name} has no gradient");
        assert!(
            grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}"
        );
    }
}

#[test]
fn caches_of_other_layers_are_errors() {
    let (_vs, mla) = layer(&config(), 6);
    let vs = nn::VarStore::new(Device::Cpu);
    let gqa = GroupedQueryAttention::new(
        &(vs.root() / "gqa"),
        &GqaConfig {
            hidden_size: 32,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 24,
            ..Default::default()
        },
    )
    .unwrap();
    let csa = CausalSelfAttention::new(
        &(vs.root() / "csa"),
        AttentionConfig {
            n_embd: 32,
            n_head: 4,
            block_size: 24,
            ..Default::default()
        },
    )
    .unwrap();
    let x = Tensor::randn([1, 3, 32], (Kind::Float, Device::Cpu));

    let mut latent_cache = KvCache::new();
    let _ = mla.forward_cached(&x, &mut latent_cache).unwrap();
    for result in [
        gqa.forward_cached(&x, &mut latent_cache),
        csa.forward_cached(&x, &mut latent_cache),
    ] {
        let err = result.unwrap_err();
        assert!(err.to_string().contains("Latent"), "{err}");
    }
    assert_eq!(latent_cache.len(), 3);

    let mut kv_cache = KvCache::new();
    let _ = gqa.forward_cached(&x, &mut kv_cache).unwrap();
    // GQA: 2 key/value heads of 8.
    assert_eq!(kv_cache.stored_bytes(), 3 * 2 * 2 * 8 * 4);
    let err = mla.forward_cached(&x, &mut kv_cache).unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    assert_eq!(kv_cache.len(), 3);

    // Another batch size, or a layer of other widths.
    let other_batch = Tensor::randn([2, 1, 32], (Kind::Float, Device::Cpu));
    assert!(matches!(
        mla.forward_cached(&other_batch, &mut latent_cache),
        Err(MoeError::Shape { .. })
    ));
    let (_vs2, wider) = layer(
        &MlaConfig {
            kv_lora_rank: 12,
            ..config()
        },
        6,
    );
    assert!(matches!(
        wider.forward_cached(&x, &mut latent_cache),
        Err(MoeError::Shape { .. })
    ));
    latent_cache.clear();
    assert!(latent_cache.is_empty());
    assert_eq!(latent_cache.stored_bytes(), 0);
    let _ = gqa.forward_cached(&x, &mut latent_cache).unwrap();
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let bad = [
        MlaConfig {
            kv_lora_rank: 0,
            ..config()
        },
        MlaConfig {
            q_lora_rank: Some(0),
            ..config()
        },
        MlaConfig {
            qk_rope_head_dim: 5,
            ..config()
        },
        MlaConfig {
            qk_rope_head_dim: 0,
            ..config()
        },
        MlaConfig {
            qk_nope_head_dim: -1,
            ..config()
        },
        MlaConfig {
            v_head_dim: 0,
            ..config()
        },
        MlaConfig {
            num_attention_heads: 0,
            ..config()
        },
        MlaConfig {
            max_position_embeddings: 0,
            ..config()
        },
        MlaConfig {
            rope_theta: -1.0,
            ..config()
        },
        MlaConfig {
            rms_norm_eps: -1.0,
            ..config()
        },
        MlaConfig {
            attention_dropout: 1.0,
            ..config()
        },
        MlaConfig {
            rope_scaling: Some(RopeScaling::Linear { factor: 0.0 }),
            ..config()
        },
    ];
    for cfg in bad {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = MultiHeadLatentAttention::new(&vs.root(), &cfg).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{cfg:?}: {err}");
    }
    let err = MlaConfig {
        qk_rope_head_dim: 5,
        ..config()
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().contains("even"), "{err}");

    let (_vs, attn) = layer(&config(), 0);
    let f = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    assert!(matches!(
        attn.forward_t(&f(&[1, 3, 31]), false),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        attn.forward_t(&f(&[3, 32]), false),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        attn.forward_t(&f(&[1, 0, 32]), false),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        attn.forward_t(&f(&[1, 25, 32]), false),
        Err(MoeError::SequenceTooLong {
            len: 25,
            block_size: 24
        })
    ));
    let ints = Tensor::zeros([1, 3, 32], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        attn.forward_t(&ints, false),
        Err(MoeError::Kind { .. })
    ));
}

#[test]
fn deepseek_v3_sizes() {
    let v3 = MlaConfig::deepseek_v3();
    v3.validate().unwrap();
    assert_eq!(v3.qk_head_dim(), 192);
    // bf16: (512 + 64) * 2 bytes per token and layer.
    assert_eq!(v3.kv_cache_bytes_per_token(2), 1152);
    assert_eq!(v3.kv_cache_bytes_per_token(4), 2304);
    // The same 128 heads as multi-head attention with 128-wide keys and values.
    let mha = GqaConfig {
        hidden_size: 7168,
        num_attention_heads: 128,
        num_key_value_heads: 128,
        head_dim: Some(128),
        ..Default::default()
    };
    assert_eq!(mha.kv_cache_bytes_per_token(2), 65536);
    assert_abs_diff_eq!(
        mha.kv_cache_bytes_per_token(2) as f64 / v3.kv_cache_bytes_per_token(2) as f64,
        56.888,
        epsilon = 1e-3
    );
    // Mixtral 8x7B: 8 key/value heads of 128.
    let mixtral = GqaConfig {
        hidden_size: 4096,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        ..Default::default()
    };
    assert_eq!(mixtral.kv_cache_bytes_per_token(2), 4096);
    // 192^-0.5 * (0.1 ln 40 + 1)^2.
    let mscale = 0.1 * 40f64.ln() + 1.0;
    assert_abs_diff_eq!(
        v3.softmax_scale(),
        192f64.powf(-0.5) * mscale * mscale,
        epsilon = 1e-15
    );
    assert_abs_diff_eq!(v3.softmax_scale(), 0.135_233_8, epsilon = 1e-7);
}

#[test]
fn reads_deepseek_v3_config_json() {
    // An excerpt of DeepSeek-V3's config.json; other keys are ignored.
    let json = r#"{
        "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
        "rope_theta": 10000, "rms_norm_eps": 1e-06, "attention_bias": false,
        "attention_dropout": 0.0, "n_routed_experts": 256,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}
    }"#;
    let config: MlaConfig = serde_json::from_str(json).unwrap();
    assert_eq!(config, MlaConfig::deepseek_v3());
    let lite: MlaConfig = serde_json::from_str(r#"{"q_lora_rank": null}"#).unwrap();
    assert_eq!(lite.q_lora_rank, None);
    assert!(lite.rope_interleave);
}
