mod common;

use common::tiny_config;
use moe_core::MoeError;
use moe_data::CharTokenizer;
use moe_models::{CausalLm, LmConfig, MakeMoeModel};
use moe_train::{load_checkpoint, save_checkpoint, CheckpointMeta};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("moe-checkpoint-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn saved_model(dir: &Path) -> (nn::VarStore, MakeMoeModel, CheckpointMeta) {
    tch::manual_seed(11);
    let tokenizer = CharTokenizer::from_text("abcdefghij \n").unwrap();
    let config = tiny_config(tokenizer.vocab_size());
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    let meta = CheckpointMeta {
        model: config.into(),
        tokenizer: tokenizer.into(),
        train: None,
        step: 3,
    };
    save_checkpoint(dir, &vs, &meta).unwrap();
    (vs, model, meta)
}

/// The `__metadata__` of a safetensors file, read from its header (an
/// 8-byte little-endian length, then that many bytes of JSON).
fn safetensors_metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header["__metadata__"].clone()
}

#[test]
fn a_saved_model_loads_back_with_identical_outputs() {
    let dir = temp_dir("roundtrip");
    let (_vs, model, meta) = saved_model(&dir);
    assert!(dir.join("model.safetensors").is_file() && dir.join("config.json").is_file());
    assert_eq!(
        safetensors_metadata(&dir.join("model.safetensors")),
        serde_json::json!({"format": "pt"}),
        "the weights carry the metadata PyTorch's save_file writes"
    );
    let loaded = load_checkpoint(&dir, Device::Cpu).unwrap();
    assert_eq!(loaded.meta, meta);
    let idx = Tensor::randint(12, [2, 16], (Kind::Int64, Device::Cpu));
    let a = model.forward_t(&idx, false).unwrap().logits;
    let b = loaded.model.forward_t(&idx, false).unwrap().logits;
    assert!(a.equal(&b), "the loaded model computes other logits");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_corrupt_or_mismatched_checkpoints_are_clear_errors() {
    let dir = temp_dir("broken");
    let err = load_checkpoint(&dir, Device::Cpu).unwrap_err();
    assert!(matches!(err, MoeError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    let (_vs, _model, meta) = saved_model(&dir);
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();

    // Truncated weights.
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_checkpoint(&dir, Device::Cpu).unwrap_err();
    assert!(matches!(err, MoeError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // Weights of another architecture than the config says.
    std::fs::write(&weights, &bytes).unwrap();
    let mut wider = meta.clone();
    let LmConfig::MakeMoe(wider_model) = &mut wider.model else {
        panic!("a make_moe checkpoint")
    };
    wider_model.n_embd = 64;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&wider).unwrap(),
    )
    .unwrap();
    let err = load_checkpoint(&dir, Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("has shape [32], the config expects [64]"),
        "{err}"
    );
    assert!(err.contains("blocks.0.attn.proj.bias"), "{err}");

    // A corrupt config.
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let err = load_checkpoint(&dir, Device::Cpu).unwrap_err();
    assert!(matches!(err, MoeError::Checkpoint { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
