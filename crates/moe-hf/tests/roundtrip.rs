//! save_pretrained writes what transformers writes (names, layout, dtype,
//! metadata) and reads back to the same model; the packed expert layout of
//! transformers 5 and sharded checkpoints load to the same weights.

mod common;

use common::{
    assert_same_vars, copy_json, expected, fixture, load, read_metadata, read_raw, snapshot,
    temp_dir, write_raw, Raw, FAMILIES,
};
use moe_hf::{save_pretrained, tensor_map, ExpertLayout, HfConfig, HfFamily, SaveOptions};
use moe_models::{CausalLm, DecoderConfig, DecoderModel, DecoderPreset};
use moe_nn::RopeScaling;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Kind, Tensor};

/// The logits of the fixture's prompts.
fn logits(model: &DecoderModel, name: &str) -> Vec<Tensor> {
    expected(name)
        .prompts
        .iter()
        .map(|p| {
            let idx = Tensor::from_slice(p).unsqueeze(0);
            tch::no_grad(|| model.forward_t(&idx, false))
                .unwrap()
                .logits
        })
        .collect()
}

#[test]
fn saved_folders_load_back_with_identical_logits() {
    for name in FAMILIES {
        let original = load(&fixture(name));
        // A multimodal folder (llama4) saves its text model's family.
        let family = original.family().saved_as();
        let model_type = family.model_type();
        let dir = temp_dir(&format!("save-{name}"));
        save_pretrained(
            &original.model,
            &original.vs,
            model_type,
            &dir,
            original.tokenizer.as_ref(),
        )
        .unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
        ] {
            assert!(dir.join(f).is_file(), "{name}: {f}");
        }
        let back = load(&dir);
        assert_eq!(back.config, original.config, "{name}: config");
        assert_eq!(back.tokenizer, original.tokenizer, "{name}: tokenizer");
        assert_same_vars(&snapshot(&original.vs), &snapshot(&back.vs));
        for (a, b) in logits(&original.model, name)
            .iter()
            .zip(logits(&back.model, name))
        {
            assert!(a.equal(&b), "{name}: logits after the round trip");
        }
        // f32 parameters are saved as f32; transformers' names and metadata.
        assert_eq!(
            read_metadata(&dir.join("model.safetensors")),
            Some([("format".to_string(), "pt".to_string())].into())
        );
        let saved = read_raw(&dir.join("model.safetensors"));
        // MXFP4 is read, not written: gpt-oss is saved with float experts,
        // under the names of `gpt_oss`'s fixture.
        let names_of = name.strip_suffix("_mxfp4").unwrap_or(name);
        let reference = text_model(read_raw(&fixture(names_of).join("model.safetensors")));
        assert_eq!(
            saved.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        assert!(saved.values().all(|t| t.dtype == safetensors::Dtype::F32));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], model_type);
        assert_eq!(config["architectures"][0], family.architecture());
        assert_eq!(config["dtype"], "float32");
        assert!(config.get("rope_parameters").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// JSON equality where numbers compare by value (`32` and `32.0` alike).
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_json(v, w))
        }
        _ => a == b,
    }
}

#[test]
fn saving_in_bf16_reproduces_transformers_files_byte_for_byte() {
    // Not MXFP4, which is read, not written (its float save is checked by
    // `saved_folders_load_back_with_identical_logits`).
    for name in FAMILIES.into_iter().filter(|n| !n.ends_with("_mxfp4")) {
        let original = load(&fixture(name));
        let dir = temp_dir(&format!("bf16-{name}"));
        original
            .save(
                &dir,
                &SaveOptions {
                    dtype: Some(Kind::BFloat16),
                    ..SaveOptions::default()
                },
            )
            .unwrap();
        let saved = read_raw(&dir.join("model.safetensors"));
        let reference = text_model(read_raw(&fixture(name).join("model.safetensors")));
        assert_eq!(
            saved, reference,
            "{name}: tensors (names, dtype, shape, bytes)"
        );
        // The config keys the fixtures hold, with their values, are ours too
        // (except those transformers adds on its own).
        let ours = HfConfig::read(&dir.join("config.json")).unwrap();
        let theirs = HfConfig::read(&fixture(name).join("config.json")).unwrap();
        let their_keys = match theirs.json.get("text_config") {
            Some(serde_json::Value::Object(text)) => text,
            _ => &theirs.json,
        };
        for (key, value) in &ours.json {
            if let Some(v) = their_keys.get(key) {
                assert!(
                    same_json(v, value),
                    "{name}: config.json key `{key}`: {v} there, {value} here"
                );
            }
        }
        assert_eq!(
            ours.to_decoder(&[]).unwrap(),
            theirs.to_decoder(&[]).unwrap(),
            "{name}"
        );
        let generation: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("generation_config.json")).unwrap(),
        )
        .unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("generation_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(generation, reference, "{name}: generation_config.json");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The tensors of a checkpoint's text model: a multimodal checkpoint's
/// `language_model.*` without the prefix (what its text family saves),
/// every tensor of a text model's own.
fn text_model(tensors: BTreeMap<String, Raw>) -> BTreeMap<String, Raw> {
    if !tensors.keys().any(|k| k.starts_with("language_model.")) {
        return tensors;
    }
    tensors
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("language_model.")?.to_string(), v)))
        .collect()
}

/// `(gate, up, down)` per-expert names of a family, and the prefix of
/// layer `l`'s experts and router.
fn per_expert_names(family: &str, l: usize) -> ([&'static str; 3], String, String) {
    if family == "mixtral" {
        (
            ["w1", "w3", "w2"],
            format!("model.layers.{l}.block_sparse_moe.experts"),
            format!("model.layers.{l}.block_sparse_moe.gate.weight"),
        )
    } else {
        (
            ["gate_proj", "up_proj", "down_proj"],
            format!("model.layers.{l}.mlp.experts"),
            format!("model.layers.{l}.mlp.gate.weight"),
        )
    }
}

/// transformers 5's packed layout of a per-expert file, built from the
/// bytes alone: `gate_up_proj[e]` is expert e's gate rows then its up rows
/// (`[2I, H]`), `down_proj[e]` its down projection (`[H, I]`).
fn to_packed(
    family: &str,
    tensors: &BTreeMap<String, Raw>,
    moe_layers: &[usize],
    experts: usize,
) -> BTreeMap<String, Raw> {
    let mut out = tensors.clone();
    for &l in moe_layers {
        let (names, prefix, router) = per_expert_names(family, l);
        let mut gate_up = Vec::new();
        let mut down = Vec::new();
        let (mut i_dim, mut h_dim, mut dtype) = (0, 0, safetensors::Dtype::F32);
        for e in 0..experts {
            let take = |out: &mut BTreeMap<String, Raw>, proj: &str| {
                out.remove(&format!("{prefix}.{e}.{proj}.weight"))
                    .unwrap_or_else(|| panic!("{prefix}.{e}.{proj}.weight"))
            };
            let gate = take(&mut out, names[0]);
            let up = take(&mut out, names[1]);
            let dn = take(&mut out, names[2]);
            (i_dim, h_dim, dtype) = (gate.shape[0], gate.shape[1], gate.dtype);
            gate_up.extend(gate.data);
            gate_up.extend(up.data);
            down.extend(dn.data);
        }
        let packed = format!("model.layers.{l}.mlp.experts");
        out.insert(
            format!("{packed}.gate_up_proj"),
            Raw {
                dtype,
                shape: vec![experts, 2 * i_dim, h_dim],
                data: gate_up,
            },
        );
        out.insert(
            format!("{packed}.down_proj"),
            Raw {
                dtype,
                shape: vec![experts, h_dim, i_dim],
                data: down,
            },
        );
        let gate = out.remove(&router).unwrap();
        out.insert(format!("model.layers.{l}.mlp.gate.weight"), gate);
    }
    out
}

#[test]
fn packed_and_per_expert_layouts_load_to_the_same_weights() {
    // Every MoE family, dense first layers (qwen3_moe, glm4_moe,
    // deepseek_v3, deepseek_v2) included.
    for name in [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "glm4_moe",
        "deepseek_v3",
        "deepseek_v2",
        "olmoe",
    ] {
        let original = load(&fixture(name));
        let c = &original.config;
        let tensors = read_raw(&fixture(name).join("model.safetensors"));
        let moe_layers: Vec<usize> = (0..c.num_hidden_layers)
            .filter(|&l| c.is_moe_layer(l))
            .map(|l| l as usize)
            .collect();
        let packed = to_packed(name, &tensors, &moe_layers, c.num_local_experts as usize);
        let dir = temp_dir(&format!("packed-{name}"));
        copy_json(name, &dir);
        write_raw(&dir.join("model.safetensors"), &packed);
        let from_packed = load(&dir);
        assert_same_vars(&snapshot(&original.vs), &snapshot(&from_packed.vs));
        // Our writer's packed layout is the same file.
        let written = temp_dir(&format!("packed-written-{name}"));
        original
            .save(
                &written,
                &SaveOptions {
                    dtype: Some(Kind::BFloat16),
                    layout: ExpertLayout::Packed,
                    generation: None,
                },
            )
            .unwrap();
        assert_eq!(
            read_raw(&written.join("model.safetensors")),
            packed,
            "{name}"
        );
        if name == "mixtral" {
            // transformers 5 names Mixtral's packed router `mlp.gate`.
            let names: Vec<String> = tensor_map(HfFamily::Mixtral, c, ExpertLayout::Packed)
                .into_iter()
                .map(|t| t.name)
                .collect();
            assert!(names.contains(&"model.layers.0.mlp.experts.gate_up_proj".to_string()));
            assert!(names.contains(&"model.layers.0.mlp.gate.weight".to_string()));
        }
        for dir in [dir, written] {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// Splits a file into two shards and an index, as transformers does.
fn shard(name: &str, dir: &Path) {
    let tensors = read_raw(&fixture(name).join("model.safetensors"));
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    let mut shards = [BTreeMap::new(), BTreeMap::new()];
    for (i, (k, v)) in tensors.into_iter().enumerate() {
        let s = usize::from(i >= half);
        weight_map.insert(
            k.clone(),
            format!("model-0000{}-of-00002.safetensors", s + 1).into(),
        );
        shards[s].insert(k, v);
    }
    for (s, tensors) in shards.iter().enumerate() {
        write_raw(
            &dir.join(format!("model-0000{}-of-00002.safetensors", s + 1)),
            tensors,
        );
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn sharded_checkpoints_load_to_the_same_weights() {
    for name in FAMILIES {
        let original = load(&fixture(name));
        let dir = temp_dir(&format!("sharded-{name}"));
        copy_json(name, &dir);
        shard(name, &dir);
        let sharded = load(&dir);
        assert_same_vars(&snapshot(&original.vs), &snapshot(&sharded.vs));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bf16_parameters_can_be_kept() {
    let dir = fixture("mixtral");
    let f32 = load(&dir);
    let bf16 = moe_hf::from_pretrained(
        &dir,
        &moe_hf::LoadOptions {
            dtype: Some(Kind::BFloat16),
            ..Default::default()
        },
    )
    .unwrap();
    for (name, t) in bf16.vs.variables() {
        assert_eq!(t.kind(), Kind::BFloat16, "{name}");
        // The file is bf16: keeping it loses nothing.
        assert!(
            t.to_kind(Kind::Float).equal(&f32.vs.variables()[&name]),
            "{name}"
        );
    }
    let a = logits(&f32.model, "mixtral");
    let b = logits(&bf16.model, "mixtral");
    for (a, b) in a.iter().zip(b) {
        // bf16 compute: the residual stream is rounded to 8 bits of
        // mantissa, enough to flip a routing choice whose margin is 0.2%
        // (the fixtures' smallest), so only a loose bound holds.
        let b = b.to_kind(Kind::Float);
        assert!(b.isfinite().all().int64_value(&[]) == 1);
        let diff = common::max_abs_diff(a, &b);
        assert!(diff < 0.5, "bf16 compute drifts by {diff}");
    }
}

#[test]
fn configs_a_family_cannot_express_are_errors_before_anything_is_written() {
    let cases: [(DecoderPreset, &str, &str); 12] = [
        (DecoderPreset::Yuan, "mixtral", "localized filtering"),
        (
            DecoderPreset::DeepseekV3,
            "qwen2_moe",
            "latent_attention (Multi-head Latent Attention) is DeepSeek's",
        ),
        (
            DecoderPreset::Mixtral,
            "deepseek_v3",
            "DeepSeek's attention is Multi-head Latent Attention",
        ),
        (DecoderPreset::Llama, "mixtral", "MoE layers only"),
        (DecoderPreset::Mixtral, "llama", "dense"),
        (DecoderPreset::Mixtral, "qwen2_moe", "shared expert"),
        (DecoderPreset::Qwen2Moe, "olmoe", "qk_norm"),
        (
            DecoderPreset::Qwen2Moe,
            "qwen3_moe",
            "qk_norm = None, the family has Head",
        ),
        (
            DecoderPreset::Qwen3Moe,
            "qwen2_moe",
            "qk_norm = Head, the family has None",
        ),
        (
            DecoderPreset::DeepseekV3,
            "glm4_moe",
            "latent_attention (Multi-head Latent Attention) is DeepSeek's",
        ),
        (
            DecoderPreset::DeepseekV3,
            "deepseek_v2",
            "the family's router is softmax top-k (TopK), group-limited or not",
        ),
        (
            DecoderPreset::DeepseekV2,
            "deepseek_v3",
            "the family's router is sigmoid with the aux-free bias",
        ),
    ];
    for (preset, model_type, needle) in cases {
        let config = DecoderConfig {
            num_hidden_layers: 2,
            ..DecoderConfig::preset(preset)
        };
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = DecoderModel::new(&vs.root(), &config).unwrap();
        let dir = temp_dir(&format!("cannot-{model_type}"));
        let target = dir.join("out");
        let err = save_pretrained(&model, &vs, model_type, &target, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, moe_core::MoeError::Config(_)), "{msg}");
        assert!(msg.contains(needle), "{preset:?} as {model_type}: {msg}");
        assert!(!target.exists(), "{preset:?} as {model_type}: wrote files");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // An unknown model type, and a tokenizer without a tokenizer.json form.
    let pretrained = load(&fixture("mixtral"));
    let dir = temp_dir("cannot-other");
    let err = save_pretrained(
        &pretrained.model,
        &pretrained.vs,
        "gpt2",
        &dir.join("x"),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "expected one of mixtral, qwen2_moe, qwen3_moe, deepseek_v3, deepseek_v2, glm4_moe, \
             gpt_oss, llama4_text, llama4, olmoe, llama"
        ),
        "{err}"
    );
    let chars = moe_data::Tokenizer::Char(moe_data::CharTokenizer::from_text("ab").unwrap());
    let err = save_pretrained(
        &pretrained.model,
        &pretrained.vs,
        "mixtral",
        &dir.join("x"),
        Some(&chars),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("character tokenizer"), "{err}");
    assert!(!dir.join("x").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn our_presets_round_trip_through_every_family_that_expresses_them() {
    // A model of ours (random weights) saved and loaded is the same model.
    let cases = [
        (DecoderPreset::Mixtral, "mixtral"),
        (DecoderPreset::Qwen2Moe, "qwen2_moe"),
        (DecoderPreset::Qwen3Moe, "qwen3_moe"),
        (DecoderPreset::Glm4Moe, "glm4_moe"),
        (DecoderPreset::Olmoe, "olmoe"),
        (DecoderPreset::Llama, "llama"),
        (DecoderPreset::DeepseekV3, "deepseek_v3"),
        (DecoderPreset::DeepseekV2, "deepseek_v2"),
        (DecoderPreset::GptOss, "gpt_oss"),
        (DecoderPreset::Llama4, "llama4_text"),
    ];
    for (preset, model_type) in cases {
        tch::manual_seed(7);
        let mut config = DecoderConfig {
            num_hidden_layers: 3,
            hidden_size: 32,
            intermediate_size: 48,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            ..DecoderConfig::preset(preset)
        };
        if matches!(
            preset,
            DecoderPreset::DeepseekV3 | DecoderPreset::DeepseekV2
        ) {
            // Every head has its own key in Multi-head Latent Attention.
            config.num_key_value_heads = config.num_attention_heads;
        }
        if preset == DecoderPreset::Llama4 {
            // Layers 0 and 1 chunked with RoPE, layer 2 NoPE (the preset's
            // lists are for its 8 layers); MoE in layer 1 only.
            use moe_models::LayerType::{ChunkedAttention, FullAttention};
            config.layer_types = vec![ChunkedAttention, ChunkedAttention, FullAttention];
            config.nope_layers = vec![2];
            config.moe_intermediate_size = Some(16);
        }
        if preset == DecoderPreset::Qwen2Moe {
            // A dense first layer: mlp_only_layers [0].
            config.first_k_dense_replace = 1;
            config.moe_intermediate_size = Some(16);
            config.shared_expert_intermediate_size = Some(24);
        }
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = DecoderModel::new(&vs.root(), &config).unwrap();
        let dir = temp_dir(&format!("preset-{model_type}"));
        save_pretrained(&model, &vs, model_type, &dir, None).unwrap();
        let back = load(&dir);
        assert_eq!(back.family().model_type(), model_type);
        assert_same_vars(&snapshot(&vs), &snapshot(&back.vs));
        let mut want = config.clone();
        want.init = back.config.init;
        if preset == DecoderPreset::DeepseekV2 {
            // transformers' DeepSeek-V2 config has no balance-loss key.
            want.router_aux_loss_coef = 0.0;
        }
        assert_eq!(back.config, want, "{model_type}: config");
        let hf = HfConfig::read(&dir.join("config.json")).unwrap();
        if preset == DecoderPreset::Qwen2Moe {
            assert_eq!(hf.json["mlp_only_layers"], serde_json::json!([0]));
            assert_eq!(back.config.first_k_dense_replace, 1);
        }
        let idx = Tensor::from_slice(&[1i64, 5, 9, 3]).unsqueeze(0);
        let a = tch::no_grad(|| model.forward_t(&idx, false))
            .unwrap()
            .logits;
        let b = tch::no_grad(|| back.model.forward_t(&idx, false))
            .unwrap()
            .logits;
        assert!(a.equal(&b), "{model_type}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn every_rope_scaling_round_trips() {
    let schemes = [
        RopeScaling::Linear { factor: 2.0 },
        RopeScaling::Dynamic {
            factor: 2.0,
            original_max_position_embeddings: None,
        },
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: Some(16),
            beta_fast: 16.0,
            beta_slow: 2.0,
            mscale: Some(1.0),
            mscale_all_dim: None,
            attention_factor: None,
            truncate: false,
        },
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: Some(16),
        },
    ];
    for scaling in schemes {
        let config = DecoderConfig {
            num_hidden_layers: 1,
            hidden_size: 32,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            rope_theta: 5e5,
            rope_scaling: Some(scaling.clone()),
            ..DecoderConfig::preset(DecoderPreset::Llama)
        };
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = DecoderModel::new(&vs.root(), &config).unwrap();
        let dir = temp_dir(&format!("rope-{}", scaling.rope_type()));
        save_pretrained(&model, &vs, "llama", &dir, None).unwrap();
        let hf = HfConfig::read(&dir.join("config.json")).unwrap();
        assert_eq!(hf.json["rope_parameters"]["rope_type"], scaling.rope_type());
        assert_eq!(hf.json["rope_parameters"]["rope_theta"], 5e5);
        let back = load(&dir);
        assert_eq!(back.config.rope_scaling, Some(scaling.clone()));
        assert_eq!(back.config.rope_theta, 5e5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn windows_and_sinks_a_family_cannot_express_are_errors() {
    use moe_models::LayerType::{FullAttention, SlidingAttention};
    let windowed = |preset| DecoderConfig {
        num_hidden_layers: 2,
        sliding_window: Some(4),
        ..DecoderConfig::preset(preset)
    };
    let cases = [
        (
            windowed(DecoderPreset::Olmoe),
            HfFamily::Olmoe,
            "sliding_window = 4",
        ),
        (
            DecoderConfig {
                layer_types: vec![FullAttention, SlidingAttention],
                ..windowed(DecoderPreset::Mixtral)
            },
            HfFamily::Mixtral,
            "on layers [1]; mixtral and qwen3_moe slide in every layer",
        ),
        (
            DecoderConfig {
                attention_sinks: true,
                ..DecoderConfig::preset(DecoderPreset::Qwen2Moe)
            },
            HfFamily::Qwen2Moe,
            "attention_sinks = true",
        ),
    ];
    for (config, family, needle) in cases {
        let err = HfConfig::from_decoder(family, &config).unwrap_err();
        assert!(matches!(err, moe_core::MoeError::Config(_)), "{err}");
        assert!(err.to_string().contains(needle), "{family}: {err}");
    }
    // What they can express survives the trip.
    let qwen2 = DecoderConfig {
        layer_types: vec![FullAttention, SlidingAttention],
        ..windowed(DecoderPreset::Qwen2Moe)
    };
    let json = HfConfig::from_decoder(HfFamily::Qwen2Moe, &qwen2).unwrap();
    let back = json.to_decoder(&[]).unwrap();
    assert_eq!(
        (back.sliding_window, back.layer_types),
        (Some(4), qwen2.layer_types)
    );
}
