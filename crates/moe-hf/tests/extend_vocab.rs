//! Chinese-Mixtral's vocabulary extension end to end on the Mixtral
//! fixture: pieces trained on `tests/data/vocab/zh_sample.txt` extend the
//! tokenizer, the model is resized, saved and loaded back; old text keeps
//! its ids and logits, Chinese text encodes without unknown tokens.

mod common;

use common::{expected, fixture, load, max_abs_diff, snapshot, temp_dir};
use moe_data::{ExtendOptions, HfTokenizer, Tokenizer, VocabExtension};
use moe_hf::{save_pretrained_with, SaveOptions};
use moe_models::{resize_vocab, CausalLm, DecoderModel};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// Covered by the fixture's tokenizer (no `<unk>`).
const ENGLISH: &str = "First Citizen:\nBefore we proceed any further, hear me speak.";
/// Every character of it is in the sample text.
const CHINESE: &str = "我们明天早上八点在学校门口见面。";

fn hf(tokenizer: &Option<Tokenizer>) -> HfTokenizer {
    match tokenizer {
        Some(Tokenizer::Hf(t)) => t.clone(),
        other => panic!("expected a tokenizer.json, got {other:?}"),
    }
}

fn sample() -> String {
    let path = fixture("mixtral").join("../../vocab/zh_sample.txt");
    std::fs::read_to_string(path).unwrap()
}

fn logits(model: &DecoderModel, ids: &[i64]) -> Tensor {
    let idx = Tensor::from_slice(ids).view([1, -1]);
    model.forward_t(&idx, false).unwrap().logits
}

/// The fixture, its extension and the resized model.
fn extended() -> (
    moe_hf::Pretrained,
    VocabExtension,
    nn::VarStore,
    DecoderModel,
) {
    let old = load(&fixture("mixtral"));
    let ext = hf(&old.tokenizer)
        .extend_vocab(&sample(), &ExtendOptions::default())
        .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = resize_vocab(&old.vs, &old.config, ext.new_vocab_size(), &vs).unwrap();
    (old, ext, vs, model)
}

fn save(
    old: &moe_hf::Pretrained,
    model: &DecoderModel,
    vs: &nn::VarStore,
    ext: &VocabExtension,
    dir: &Path,
    dtype: Option<Kind>,
) {
    let options = SaveOptions {
        dtype,
        generation: Some(old.generation.clone()),
        ..SaveOptions::default()
    };
    let tokenizer = Tokenizer::Hf(ext.tokenizer.clone());
    save_pretrained_with(model, vs, "mixtral", dir, Some(&tokenizer), &options).unwrap();
}

#[test]
fn the_extended_checkpoint_keeps_old_logits_and_reads_chinese() {
    let (old, ext, vs, model) = extended();
    let old_tok = hf(&old.tokenizer);
    let unk = old_tok.unk_token_id().unwrap();
    assert!(ext.pieces.len() > 300, "{}", ext.pieces.len());
    assert_eq!(model.vocab_size(), 128 + ext.pieces.len() as i64);

    // In memory: same ids, same logits over the old vocabulary, and still
    // transformers' logits of the fixture.
    let ids = old_tok.encode(ENGLISH).unwrap();
    assert!(!ids.contains(&unk));
    assert_eq!(ext.tokenizer.encode(ENGLISH).unwrap(), ids);
    let (a, b) = (logits(&old.model, &ids), logits(&model, &ids));
    let diff = max_abs_diff(&a, &b.narrow(2, 0, 128));
    assert!(diff <= 1e-6, "old logits differ by {diff}");
    let reference = expected("mixtral");
    let prompt = &reference.prompts[0];
    let want = Tensor::from_slice(&reference.logits[0].concat()).view([1, -1, 128]);
    let got = logits(&model, prompt).narrow(2, 0, 128);
    assert!(
        max_abs_diff(&got, &want) < 1e-5,
        "{}",
        max_abs_diff(&got, &want)
    );

    // Saved in f32 and loaded back: the same variables, logits and tokenizer.
    let dir = temp_dir("extend-f32");
    save(&old, &model, &vs, &ext, &dir, None);
    let back = load(&dir);
    assert_eq!(back.config.vocab_size, ext.new_vocab_size());
    assert_eq!(back.source.json["vocab_size"], ext.new_vocab_size());
    let (want, got) = (snapshot(&vs), snapshot(&back.vs));
    common::assert_same_vars(&want, &got);
    let zh_ids = ext.tokenizer.encode(CHINESE).unwrap();
    assert!(logits(&back.model, &zh_ids).equal(&logits(&model, &zh_ids)));
    let tok = hf(&back.tokenizer);
    assert_eq!(tok.vocab_size(), ext.new_vocab_size());
    for (piece, id) in ext.pieces.iter().zip(ext.new_ids()) {
        assert_eq!(tok.token_to_id(piece), Some(id), "{piece}");
    }
    assert_eq!(tok.encode(ENGLISH).unwrap(), ids);
    let before = old_tok.encode(CHINESE).unwrap();
    assert!(before.contains(&unk) && old_tok.decode(&before).unwrap() != CHINESE);
    let after = tok.encode(CHINESE).unwrap();
    assert_eq!(after, zh_ids);
    assert!(!after.contains(&unk), "{after:?}");
    assert_eq!(tok.decode(&after).unwrap(), CHINESE);
    assert!(after.len() < CHINESE.chars().count(), "{after:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn saved_in_the_checkpoints_bf16_the_old_rows_stay_exact() {
    let (old, ext, vs, model) = extended();
    assert_eq!(old.saved_dtype(), Some(Kind::BFloat16));
    let dir = temp_dir("extend-bf16");
    save(&old, &model, &vs, &ext, &dir, old.saved_dtype());
    let back = load(&dir);
    assert_eq!(back.saved_dtype(), Some(Kind::BFloat16));
    // The fixture's weights are bf16 values: old rows survive bf16 exactly.
    let ids = hf(&old.tokenizer).encode(ENGLISH).unwrap();
    let diff = max_abs_diff(
        &logits(&old.model, &ids),
        &logits(&back.model, &ids).narrow(2, 0, 128),
    );
    assert_eq!(diff, 0.0);
    // New rows: the mean, rounded to bf16.
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let rows = &back.vs.variables()[name];
        let mean = old.vs.variables()[name].mean_dim(0, true, Kind::Float);
        let mean = mean.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let new_rows = rows.narrow(0, 128, ext.pieces.len() as i64);
        assert_eq!(max_abs_diff(&new_rows, &mean), 0.0, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
