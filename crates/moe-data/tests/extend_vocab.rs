//! Vocabulary extension of a pretrained BPE tokenizer (Chinese-LLaMA and
//! Chinese-Mixtral's recipe) on the Mixtral fixture's tokenizer: a BPE of
//! vocab 128 trained on tinyshakespeare, with `<unk>` (id 0) for characters
//! it lacks and no byte fallback.

use moe_core::MoeError;
use moe_data::{ExtendOptions, HfTokenizer};
use std::path::Path;

/// New-language text: Chinese sentences with a few English words and
/// digits mixed in, so the BPE trained on it also learns merges of
/// characters the old vocabulary has (which must be left out).
const CHINESE: &str = "\
我们今天在家里学习中文，中文的句子里没有空格。
这个模型有八个专家，每个词只去两个专家那里。
他们明天去北京，北京的秋天很美。
我们的模型叫 the model，它在中文上继续训练了 2000 步。
学习中文要每天读书，每天写字，每天说话。
这个分词器是新的，新的词片段让句子更短。
the expert 看到的词越多，它学到的东西就越多。
我们今天很高兴，因为天气很好，我们去公园散步。
中文的词和英文的词不一样，一个中文字常常就是一个词。
他说：我们的模型今天学会了中文。
";

fn fixture_tokenizer() -> HfTokenizer {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/hf/mixtral/tokenizer.json");
    HfTokenizer::from_file(&path).unwrap()
}

fn options(max_new_pieces: usize) -> ExtendOptions {
    ExtendOptions {
        max_new_pieces,
        ..ExtendOptions::default()
    }
}

/// Lines of the head of tinyshakespeare that the tokenizer covers (they
/// encode without `<unk>`), joined: at least 20,000 characters.
fn covered_text(tok: &HfTokenizer) -> String {
    let unk = tok.unk_token_id().unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/tinyshakespeare.txt"
    );
    let corpus = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = corpus
        .lines()
        .take(3000)
        .filter(|line| !tok.encode_plain(line).unwrap().contains(&unk))
        .collect();
    let text = lines.join("\n");
    assert!(text.chars().count() > 20_000, "{} chars", text.len());
    text
}

#[test]
fn covered_text_keeps_its_ids_and_new_text_encodes_without_unknown_tokens() {
    let old = fixture_tokenizer();
    let unk = old.unk_token_id().expect("the fixture has <unk>");
    assert_eq!(unk, 0);
    let ext = old.extend_vocab(CHINESE, &options(200)).unwrap();
    let new = &ext.tokenizer;

    // Old ids keep their tokens; new pieces come after them, contiguous.
    assert_eq!(ext.old_vocab_size, 128);
    assert_eq!(new.vocab_size(), ext.new_vocab_size());
    assert_eq!(ext.new_ids(), 128..ext.new_vocab_size());
    let old_vocab = old.inner().get_vocab(true);
    for (token, id) in &old_vocab {
        assert_eq!(new.token_to_id(token), Some(i64::from(*id)), "{token}");
    }
    for (piece, id) in ext.pieces.iter().zip(ext.new_ids()) {
        assert_eq!(new.token_to_id(piece), Some(id), "{piece}");
        assert!(!old_vocab.contains_key(piece), "{piece} was already there");
    }
    // Real BPE pieces: characters, and merges of them.
    assert!(ext.new_chars > 50, "{ext:?}");
    assert!(
        ext.merges > 10 && ext.pieces.len() > ext.new_chars,
        "{ext:?}"
    );
    assert!(
        ext.pieces.iter().any(|p| p.contains("中文")),
        "{:?}",
        ext.pieces
    );
    // The trained BPE also merged old characters ("▁the", "▁model"), and
    // those were left out.
    assert!(ext.skipped_covered > 0, "{ext:?}");

    // Text the old tokenizer covers is split exactly as before.
    let covered = covered_text(&old);
    assert_eq!(
        new.encode_plain(&covered).unwrap(),
        old.encode_plain(&covered).unwrap()
    );
    assert_eq!(new.encode(&covered).unwrap(), old.encode(&covered).unwrap());

    // New characters: unknown and lost before; known, lossless and merged after.
    let s = "我们今天学习中文，每天说话。";
    let before = old.encode_plain(s).unwrap();
    assert!(before.contains(&unk), "{before:?}");
    assert_ne!(old.decode(&before).unwrap(), s);
    let after = new.encode_plain(s).unwrap();
    assert_eq!(new.unk_token_id(), Some(unk));
    assert!(!after.contains(&unk), "{after:?}");
    assert!(after.iter().any(|&id| id >= 128), "{after:?}");
    assert_eq!(new.decode(&after).unwrap(), s);
    assert!(
        after.len() < s.chars().count(),
        "merges shorten it: {after:?}"
    );

    // The extended tokenizer survives tokenizer.json.
    let back: tokenizers::Tokenizer = new.to_json(true).unwrap().parse().unwrap();
    let back = HfTokenizer::new(back);
    assert_eq!(back.encode_plain(s).unwrap(), after);
    assert_eq!(back.vocab_size(), new.vocab_size());
}

#[test]
fn the_cap_takes_the_most_frequent_new_characters_first() {
    let old = fixture_tokenizer();
    let ext = old.extend_vocab(CHINESE, &options(5)).unwrap();
    assert_eq!(ext.pieces.len(), 5);
    assert_eq!((ext.new_chars, ext.merges), (5, 0));
    assert_eq!(ext.tokenizer.vocab_size(), 133);
    // The most frequent characters of the text (all outside the old alphabet).
    let mut counts = std::collections::HashMap::new();
    for c in CHINESE.chars().filter(|c| !c.is_ascii()) {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let fifth = {
        let mut n: Vec<usize> = counts.values().copied().collect();
        n.sort_unstable_by(|a, b| b.cmp(a));
        n[4]
    };
    for piece in &ext.pieces {
        let c = piece.chars().next().unwrap();
        assert!(counts[&c] >= fifth, "{piece} occurs {} times", counts[&c]);
    }
    // A larger cap is filled with merges once the characters are in.
    let all_chars = old.extend_vocab(CHINESE, &options(1000)).unwrap();
    assert!(all_chars.pieces.len() < 1000, "the text runs out of pairs");
    let more = old
        .extend_vocab(CHINESE, &options(all_chars.new_chars + 3))
        .unwrap();
    assert_eq!(more.pieces.len(), all_chars.new_chars + 3);
    assert_eq!(more.pieces[..], all_chars.pieces[..all_chars.new_chars + 3]);
}

/// The fixture turned into a SentencePiece-style BPE with byte fallback
/// (as Mixtral's real tokenizer): `<0x00>`..`<0xFF>` at ids 128..384.
fn byte_fallback_tokenizer() -> HfTokenizer {
    let mut json: serde_json::Value =
        serde_json::from_str(&fixture_tokenizer().to_json(false).unwrap()).unwrap();
    let model = json["model"].as_object_mut().unwrap();
    model.insert("byte_fallback".into(), true.into());
    let vocab = model["vocab"].as_object_mut().unwrap();
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), (128 + b).into());
    }
    json["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    ]});
    HfTokenizer::new(json.to_string().parse().unwrap())
}

#[test]
fn with_byte_fallback_new_pieces_replace_byte_tokens() {
    let old = byte_fallback_tokenizer();
    assert_eq!(old.vocab_size(), 384);
    let s = "我们今天学习中文。";
    let before = old.encode_plain(s).unwrap();
    // Lossless already, but three byte tokens per character.
    assert_eq!(old.decode(&before).unwrap(), s);
    assert!(before.len() >= 3 * s.chars().count(), "{before:?}");
    let ext = old.extend_vocab(CHINESE, &options(300)).unwrap();
    assert_eq!(ext.new_ids().start, 384);
    let after = ext.tokenizer.encode_plain(s).unwrap();
    assert!(
        after.iter().all(|&id| !(128..384).contains(&id)),
        "no byte tokens: {after:?}"
    );
    assert_eq!(ext.tokenizer.decode(&after).unwrap(), s);
    assert!(after.len() < s.chars().count());
    let covered = covered_text(&fixture_tokenizer());
    assert_eq!(
        ext.tokenizer.encode_plain(&covered).unwrap(),
        old.encode_plain(&covered).unwrap()
    );
}

#[test]
fn bad_requests_are_errors() {
    let old = fixture_tokenizer();
    let err = old.extend_vocab(CHINESE, &options(0)).unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    assert!(err.to_string().contains("max_new_pieces"), "{err}");
    let err = old.extend_vocab("", &options(10)).unwrap_err();
    assert!(matches!(err, MoeError::Data(_)), "{err}");
    // Every character is in the vocabulary: nothing can be added without
    // re-splitting old text.
    let err = old
        .extend_vocab("the citizens are here, are they not?\n", &options(10))
        .unwrap_err();
    assert!(matches!(err, MoeError::Data(_)), "{err}");
    assert!(err.to_string().contains("no character outside"), "{err}");
    // A model without merges.
    let word_level: tokenizers::Tokenizer =
        r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1}, "unk_token": "[UNK]"}}"#
            .parse()
            .unwrap();
    let word_level = HfTokenizer::new(word_level);
    assert_eq!(word_level.unk_token_id(), Some(0));
    let err = word_level.extend_vocab(CHINESE, &options(10)).unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    assert!(err.to_string().contains("WordLevel"), "{err}");
    let unigram: tokenizers::Tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
        "post_processor": null, "decoder": null,
        "model": {"type": "Unigram", "unk_id": 1, "byte_fallback": false,
                  "vocab": [["a", -1.0], ["<unk>", 0.0], ["b", -2.0]]}}"#
        .parse()
        .unwrap();
    let unigram = HfTokenizer::new(unigram);
    assert_eq!(unigram.unk_token_id(), Some(1));
    let err = unigram.extend_vocab(CHINESE, &options(10)).unwrap_err();
    assert!(err.to_string().contains("Unigram"), "{err}");
}
