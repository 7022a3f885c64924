//! Everything a user can get wrong in a checkpoint folder is an error that
//! names the file (and the tensor or key), found before any variable changes.

mod common;

use common::{
    assert_same_vars, copy_json, fixture, load, read_raw, snapshot, temp_dir, write_raw, Raw,
};
use moe_core::MoeError;
use moe_hf::{from_pretrained, load_weights, HfConfig, LoadOptions, Pretrained};
use moe_nn::RopeScaling;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A copy of fixture `name` whose weights are `edit`ed.
fn edited(name: &str, tag: &str, edit: impl FnOnce(&mut BTreeMap<String, Raw>)) -> PathBuf {
    let dir = temp_dir(tag);
    copy_json(name, &dir);
    let mut tensors = read_raw(&fixture(name).join("model.safetensors"));
    edit(&mut tensors);
    write_raw(&dir.join("model.safetensors"), &tensors);
    dir
}

/// A copy of fixture `name` whose `config.json` is `edit`ed.
fn edited_config(
    name: &str,
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let dir = temp_dir(tag);
    copy_json(name, &dir);
    std::fs::copy(
        fixture(name).join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    dir
}

/// Loading `dir`'s weights into `target` fails with a checkpoint error
/// naming `file` and containing every needle, and leaves every variable as
/// it was.
fn assert_weights_rejected(dir: &Path, target: &Pretrained, file: &str, needles: &[&str]) {
    let before = snapshot(&target.vs);
    let err = load_weights(dir, target.family(), &target.config, &target.vs).unwrap_err();
    let msg = err.to_string();
    match &err {
        MoeError::Checkpoint { path, .. } => {
            assert!(path.ends_with(file), "{msg}")
        }
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
    for needle in needles {
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    assert_same_vars(&before, &snapshot(&target.vs));
    // from_pretrained reports the same.
    let err = from_pretrained(dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";

#[test]
fn a_missing_tensor_is_named() {
    let target = load(&fixture("mixtral"));
    let dir = edited("mixtral", "missing", |t| {
        t.remove(Q);
    });
    assert_weights_rejected(&dir, &target, "model.safetensors", &["missing tensor", Q]);
    let expert = "model.layers.0.block_sparse_moe.experts.3.w2.weight";
    let dir = edited("mixtral", "missing-expert", |t| {
        t.remove(expert);
    });
    assert_weights_rejected(
        &dir,
        &target,
        "model.safetensors",
        &[
            "missing tensor",
            expert,
            "model.layers.0.mlp.experts.w_out",
            "gate_up_proj",
        ],
    );
}

#[test]
fn an_unexpected_tensor_is_named() {
    let target = load(&fixture("qwen2_moe"));
    let extra = "model.layers.0.mlp.extra.weight";
    let dir = edited("qwen2_moe", "unexpected", |t| {
        let q = t[Q].clone();
        t.insert(extra.into(), q);
    });
    assert_weights_rejected(
        &dir,
        &target,
        "model.safetensors",
        &["unexpected tensor", extra],
    );
    // Rotary tables are skipped.
    let dir = edited("qwen2_moe", "inv-freq", |t| {
        t.insert(
            "model.rotary_emb.inv_freq".into(),
            Raw {
                dtype: safetensors::Dtype::F32,
                shape: vec![4],
                data: vec![0; 16],
            },
        );
    });
    load_weights(&dir, target.family(), &target.config, &target.vs).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // GLM-4.5's (and DeepSeek-V3's) next-token-prediction layers, stored past
    // the last decoder layer, are skipped, as transformers skips them; in
    // another family such a layer is unexpected.
    let glm = load(&fixture("glm4_moe"));
    let mtp = format!(
        "model.layers.{}.self_attn.q_proj.weight",
        glm.config.num_hidden_layers
    );
    let dir = edited("glm4_moe", "mtp", |t| {
        let q = t["model.layers.0.self_attn.q_proj.weight"].clone();
        t.insert(mtp.clone(), q);
    });
    load_weights(&dir, glm.family(), &glm.config, &glm.vs).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let past = format!(
        "model.layers.{}.self_attn.q_proj.weight",
        target.config.num_hidden_layers
    );
    let dir = edited("qwen2_moe", "past-last", |t| {
        let q = t[Q].clone();
        t.insert(past.clone(), q);
    });
    assert_weights_rejected(
        &dir,
        &target,
        "model.safetensors",
        &["unexpected tensor", &past],
    );
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let target = load(&fixture("olmoe"));
    let dir = edited("olmoe", "shape", |t| {
        let q = t.get_mut(Q).unwrap();
        q.shape = vec![16, 32];
        q.data.truncate(16 * 32 * 2);
    });
    assert_weights_rejected(
        &dir,
        &target,
        "model.safetensors",
        &[Q, "[16, 32]", "expected [32, 32]"],
    );
}

#[test]
fn a_tensor_of_integers_is_rejected() {
    let target = load(&fixture("llama"));
    let dir = edited("llama", "dtype", |t| {
        let q = t.get_mut(Q).unwrap();
        q.dtype = safetensors::Dtype::I16;
    });
    assert_weights_rejected(
        &dir,
        &target,
        "model.safetensors",
        &[Q, "dtype I16", "F32, F16, BF16"],
    );
}

#[test]
fn a_truncated_file_names_the_first_tensor_cut_off() {
    let target = load(&fixture("mixtral"));
    let dir = temp_dir("truncated");
    copy_json("mixtral", &dir);
    let bytes = std::fs::read(fixture("mixtral").join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    assert_weights_rejected(
        &dir,
        &target,
        "model.safetensors",
        &["truncated", "tensor `model."],
    );
    // A file cut inside its header, and one that is not safetensors at all.
    for (tag, content) in [
        ("cut-header", bytes[..100].to_vec()),
        ("garbage", b"not a checkpoint".to_vec()),
    ] {
        let dir = temp_dir(tag);
        copy_json("mixtral", &dir);
        std::fs::write(dir.join("model.safetensors"), content).unwrap();
        assert_weights_rejected(&dir, &target, "model.safetensors", &["truncated"]);
    }
}

#[test]
fn sharded_index_problems_name_the_shard() {
    let target = load(&fixture("llama"));
    let dir = temp_dir("shard-missing");
    copy_json("llama", &dir);
    let index = serde_json::json!({"weight_map": {Q: "model-00001-of-00002.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_weights_rejected(
        &dir,
        &target,
        "model-00001-of-00002.safetensors",
        &["does not exist"],
    );
    let dir = temp_dir("no-weights");
    copy_json("llama", &dir);
    assert_weights_rejected(&dir, &target, "model.safetensors", &["no weights"]);
}

/// `from_pretrained` of `dir` fails with an error of `config.json` holding every needle.
fn assert_config_rejected(dir: &Path, needles: &[&str]) {
    let err = from_pretrained(dir, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, MoeError::Checkpoint { path, .. } if path.ends_with("config.json")),
        "{msg}"
    );
    for needle in needles {
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unknown_model_type_names_the_supported_ones() {
    let dir = edited_config("mixtral", "model-type", |c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    assert_config_rejected(
        &dir,
        &[
            "`gpt2`",
            "mixtral, qwen2_moe, qwen3_moe, deepseek_v3, deepseek_v2, glm4_moe, gpt_oss, llama4_text, \
             llama4, olmoe, llama",
        ],
    );
}

#[test]
fn rope_scaling_is_read_from_either_place() {
    // transformers 4's `rope_scaling` (with the older `type`) next to a top-level `rope_theta`.
    let dir = edited_config("llama", "rope-scaling", |c| {
        c.remove("rope_parameters");
        c.insert("rope_theta".into(), 500_000.0.into());
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "linear", "factor": 2.0}),
        );
    });
    let pretrained = load(&dir);
    assert_eq!(pretrained.config.rope_theta, 500_000.0);
    assert_eq!(
        pretrained.config.rope_scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // The same scheme in both places is fine.
    let dir = edited_config("llama_rope3", "rope-both", |c| {
        let params = c["rope_parameters"].clone();
        c.insert("rope_scaling".into(), params);
    });
    assert_eq!(
        load(&dir).config.rope_scaling.map(|s| s.rope_type()),
        Some("llama3")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rope_settings_the_decoder_does_not_implement_are_named() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4}),
            "unsupported rope_type `longrope`: expected one of linear, dynamic, yarn, llama3",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4}),
            "rope_type `yarn` needs `factor`",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}),
            "`rope_parameters.low_freq_factor` = 1.0 is not supported: rope_type `linear` takes \
             rope_theta, factor",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "default", "rope_theta": 1e4,
                               "partial_rotary_factor": 0.5}),
            "`partial_rotary_factor` = 0.5 is not supported",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
            "disagree",
        ),
    ];
    for (key, value, needle) in cases {
        let dir = edited_config("llama_rope3", "rope-bad", |c| {
            c.insert(key.into(), value);
        });
        assert_config_rejected(&dir, &[needle]);
    }
}

#[test]
fn keys_that_change_the_model_are_not_ignored() {
    let cases: [(&str, &str, serde_json::Value, &str); 18] = [
        // RoPE on part of each head is GLM-4.5's; its two places must agree.
        (
            "llama",
            "partial_rotary_factor",
            0.5.into(),
            "`partial_rotary_factor` = 0.5 is not supported",
        ),
        ("glm4_moe", "partial_rotary_factor", 0.25.into(), "disagree"),
        ("olmoe", "clip_qkv", 8.0.into(), "clip_qkv"),
        // Qwen3-MoE: o_proj would take a bias too; its two names for the
        // expert count must agree.
        ("qwen3_moe", "attention_bias", true.into(), "attention_bias"),
        (
            "qwen3_moe",
            "num_experts",
            4.into(),
            "`num_experts` = 4 and `num_local_experts` = 8",
        ),
        (
            "qwen3_moe",
            "mlp_only_layers",
            serde_json::json!([1]),
            "dense prefix",
        ),
        (
            "mixtral",
            "router_jitter_noise",
            0.1.into(),
            "router_jitter_noise",
        ),
        // A window must hold the query; OLMoE has none to give.
        (
            "mixtral",
            "sliding_window",
            0.into(),
            "`sliding_window` = 0",
        ),
        (
            "olmoe",
            "sliding_window",
            16.into(),
            "`sliding_window` = 16",
        ),
        ("llama", "mlp_bias", true.into(), "mlp_bias"),
        ("llama", "hidden_act", "gelu".into(), "hidden_act"),
        (
            "qwen2_moe",
            "mlp_only_layers",
            serde_json::json!([1]),
            "dense prefix",
        ),
        // DeepSeek-V2: its two selection methods only, with their groups;
        // no top-k default; softmax scores.
        (
            "deepseek_v2",
            "topk_method",
            "noaux_tc".into(),
            "`topk_method` = \"noaux_tc\" is not supported",
        ),
        (
            "deepseek_v2",
            "n_group",
            serde_json::Value::Null,
            "`group_limited_greedy` needs `n_group`",
        ),
        (
            "deepseek_v2",
            "num_experts_per_tok",
            serde_json::Value::Null,
            "`num_experts_per_tok` is missing",
        ),
        (
            "deepseek_v2",
            "scoring_func",
            "sigmoid".into(),
            "`scoring_func`",
        ),
        // gpt-oss: MXFP4 is read, other quantisations are named.
        (
            "gpt_oss",
            "quantization_config",
            serde_json::json!({"quant_method": "bitsandbytes"}),
            "quant_method \"mxfp4\"",
        ),
        (
            "gpt_oss",
            "sliding_window",
            0.into(),
            "`sliding_window` = 0",
        ),
    ];
    for (name, key, value, needle) in cases {
        let dir = edited_config(name, &format!("key-{key}"), |c| {
            c.insert(key.into(), value.clone());
        });
        assert_config_rejected(&dir, &[needle, &format!("model_type `{name}`")]);
    }
    // Qwen2-MoE's layer_types must name every layer with a known kind.
    let dir = edited_config("qwen2_moe_window", "key-layer-types", |c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!(["sliding_attention", "chunked"]),
        );
    });
    assert_config_rejected(&dir, &["`layer_types` must list", "model_type `qwen2_moe`"]);
    let dir = edited_config("qwen2_moe_window", "key-layer-count", |c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!(["sliding_attention"]),
        );
    });
    assert_config_rejected(
        &dir,
        &["layer_types lists 1 layers", "num_hidden_layers = 2"],
    );
    // DeepSeek-V2's groups must split the experts evenly, and leave k experts.
    let dir = edited_config("deepseek_v2", "key-groups", |c| {
        c.insert("n_group".into(), 3.into());
    });
    assert_config_rejected(&dir, &["n_group", "model_type `deepseek_v2`"]);
    let dir = edited_config("deepseek_v2", "key-topk-group", |c| {
        c.insert("n_group".into(), 8.into());
        c.insert("topk_group".into(), 1.into());
    });
    assert_config_rejected(&dir, &["topk_group", "model_type `deepseek_v2`"]);
    // An unknown key is an error, unless the caller ignores it.
    let dir = edited_config("mixtral", "unknown-key", |c| {
        c.insert("quantization_config".into(), serde_json::json!({"bits": 4}));
    });
    let err = from_pretrained(&dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown key(s) `quantization_config`"),
        "{err}"
    );
    from_pretrained(
        &dir,
        &LoadOptions {
            ignore_keys: vec!["quantization_config".into()],
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Llama 4's keys the decoder cannot express, and a multimodal folder's
/// keys beside its text model, are named; its MoE layers may follow a dense
/// prefix.
#[test]
fn llama4_configs_the_decoder_cannot_express_are_named() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        // Layers 0 and 3 MoE: no dense prefix and step give them.
        (
            "moe_layers",
            serde_json::json!([0, 3]),
            "moe_layers = [0, 3]",
        ),
        (
            "no_rope_layers",
            serde_json::json!([1, 1, 0]),
            "`no_rope_layers` must flag",
        ),
        (
            "no_rope_layers",
            serde_json::json!([1, 1, 2, 0]),
            "`no_rope_layers` must flag",
        ),
        (
            "layer_types",
            serde_json::json!([
                "sliding_attention",
                "full_attention",
                "full_attention",
                "full_attention"
            ]),
            "none slides",
        ),
        (
            "interleave_moe_layer_step",
            0.into(),
            "`interleave_moe_layer_step` must be >= 1",
        ),
    ];
    for (key, value, needle) in cases {
        let dir = edited_config("llama4_text", &format!("llama4-{key}"), |c| {
            c.insert(key.into(), value.clone());
        });
        assert_config_rejected(&dir, &[needle, "model_type `llama4_text`"]);
    }
    // A dense first layer, then MoE every layer: moe_layers [1, 2, 3].
    let dir = edited_config("llama4_text", "llama4-prefix", |c| {
        c.insert("moe_layers".into(), serde_json::json!([1, 2, 3]));
        c.insert("interleave_moe_layer_step".into(), 1.into());
    });
    let config = moe_hf::HfConfig::read(&dir.join("config.json"))
        .unwrap()
        .to_decoder(&[])
        .unwrap();
    assert_eq!(
        (
            config.first_k_dense_replace,
            config.interleave_moe_layer_step
        ),
        (1, 1)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // The multimodal folder: an unknown key beside text_config, a text
    // model of another family, no text model.
    let dir = edited_config("llama4", "llama4-beside", |c| {
        c.insert("audio_config".into(), serde_json::json!({}));
    });
    assert_config_rejected(&dir, &["`audio_config`", "beside text_config"]);
    let dir = edited_config("llama4", "llama4-text-type", |c| {
        c["text_config"]["model_type"] = "mixtral".into();
    });
    assert_config_rejected(&dir, &["text_config has model_type `mixtral`"]);
    let dir = edited_config("llama4", "llama4-no-text", |c| {
        c.remove("text_config");
    });
    assert_config_rejected(&dir, &["`text_config`", "model_type `llama4`"]);
    // Writing: the multimodal family is read only, and another family
    // refuses Llama 4's attention.
    let llama4 = load(&fixture("llama4_text")).config;
    for (family, needle) in [
        (
            moe_hf::HfFamily::Llama4,
            "write the text model as `llama4_text`",
        ),
        (moe_hf::HfFamily::Mixtral, "attention_chunk_size = Some(4)"),
    ] {
        let err = moe_hf::HfConfig::from_decoder(family, &llama4).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
}

#[test]
fn qwen2_layouts_map_to_a_dense_prefix() {
    let read = |patch: serde_json::Value| {
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("qwen2_moe").join("config.json")).unwrap(),
        )
        .unwrap();
        for (k, v) in patch.as_object().unwrap() {
            json[k] = v.clone();
        }
        HfConfig::from_json(json, Path::new("config.json"))
            .unwrap()
            .to_decoder(&[])
    };
    let c = read(serde_json::json!({"mlp_only_layers": [0]})).unwrap();
    assert_eq!((c.first_k_dense_replace, c.num_local_experts), (1, 8));
    // Every second layer MoE with two layers: layer 0 dense, layer 1 MoE.
    let c = read(serde_json::json!({"decoder_sparse_step": 2})).unwrap();
    assert_eq!(c.first_k_dense_replace, 1);
    let c = read(serde_json::json!({"num_experts": 0})).unwrap();
    assert_eq!(c.num_local_experts, 0);
    assert!(read(serde_json::json!({"num_hidden_layers": 4, "decoder_sparse_step": 2})).is_err());
}

#[test]
fn bad_options_and_bad_json_are_errors() {
    let err = from_pretrained(
        &fixture("llama"),
        &LoadOptions {
            dtype: Some(tch::Kind::Int64),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    let dir = temp_dir("bad-json");
    copy_json("llama", &dir);
    std::fs::write(
        dir.join("generation_config.json"),
        "{\"eos_token_id\": \"x\"}",
    )
    .unwrap();
    let err = from_pretrained(&dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("generation_config.json"), "{err}");
    std::fs::write(dir.join("config.json"), "{").unwrap();
    let err = from_pretrained(&dir, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("not valid JSON"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
