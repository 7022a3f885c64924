//! Character and byte-level BPE tokenizers.

use moe_data::{BpeTokenizer, Tokenizer, TokenizerConfig, TokenizerKind};

fn sample() -> String {
    corpus().chars().take(60_000).collect()
}

#[test]
fn bpe_round_trips_compresses_and_survives_serialisation() {
    let text = sample();
    let config = TokenizerConfig {
        kind: TokenizerKind::Bpe,
        vocab_size: 400,
    };
    let tok = Tokenizer::train(&text, &config).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    let probe = "First Citizen:\nBefore we proceed any further, hear me speak.\n";
    let ids = tok.encode(probe).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), probe);
    // Merges learned on this text make it shorter than its bytes, and more
    // merges make it shorter still.
    let all = tok.encode(&text).unwrap();
    let fewer = BpeTokenizer::train(&text, 300)
        .unwrap()
        .encode(&text)
        .unwrap();
    assert!(
        all.len() < fewer.len() && fewer.len() < text.len(),
        "{} tokens (400), {} tokens (300), {} bytes",
        all.len(),
        fewer.len(),
        text.len()
    );
    assert!(all.iter().all(|&id| (0..400).contains(&id)));
    // Byte-level: text the corpus never had still encodes and round-trips.
    let unseen = "naïve café ☃ {}";
    assert_eq!(tok.decode(&tok.encode(unseen).unwrap()).unwrap(), unseen);
    // A checkpoint's config.json stores it; reading it back gives the same ids.
    let json = serde_json::to_string(&tok).unwrap();
    let back: Tokenizer = serde_json::from_str(&json).unwrap();
    assert!(matches!(back, Tokenizer::Bpe(_)));
    assert_eq!(back.encode(&text).unwrap(), all);
    assert_eq!(back, tok);
}

#[test]
fn bad_bpe_settings_and_ids_are_errors() {
    assert!(BpeTokenizer::train("abc", 100).is_err());
    assert!(BpeTokenizer::train("", 300).is_err());
    let tok = BpeTokenizer::train(&sample(), 300).unwrap();
    assert!(tok.decode(&[300]).is_err());
    assert!(tok.decode(&[-1]).is_err());
}

#[test]
fn char_tokenizers_serialise_as_before_and_reject_unknown_characters() {
    let tok = Tokenizer::train("hello world", &TokenizerConfig::default()).unwrap();
    let json = serde_json::to_value(&tok).unwrap();
    assert_eq!(json["chars"].as_array().unwrap().len(), 8);
    let back: Tokenizer = serde_json::from_value(json).unwrap();
    assert_eq!(back, tok);
    let err = tok.encode("help").unwrap_err().to_string();
    assert!(err.contains("'p'"), "{err}");
}

/// The bundled tinyshakespeare.
fn corpus() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/tinyshakespeare.txt"
    );
    std::fs::read_to_string(path).expect("the bundled corpus data/tinyshakespeare.txt")
}

#[test]
fn pretrained_tokenizers_encode_decode_stream_and_serialise_distinctly() {
    use moe_data::{HfTokenizer, TextStream};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/hf/mixtral/tokenizer.json");
    let hf = HfTokenizer::from_file(&path).unwrap();
    let tok = Tokenizer::Hf(hf.clone());
    assert_eq!(tok.vocab_size(), 128);
    let text = "First Citizen:\nBefore we proceed";
    let ids = tok.encode(text).unwrap();
    assert_eq!(
        ids,
        hf.encode_plain(text).unwrap(),
        "no special tokens to add"
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Streaming gives the text piece by piece.
    let mut stream = TextStream::new(&tok);
    let streamed: String = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(streamed, text);
    // An id past the tokenizer (a padded embedding's) decodes as nothing.
    assert_eq!(tok.decode(&[128]).unwrap(), "");
    assert!(tok.decode(&[-1]).is_err());
    // Checkpoints store it tagged, so it reads back as a pretrained
    // tokenizer (a BPE tokenizer is the bare tokenizer.json).
    let json = serde_json::to_value(&tok).unwrap();
    assert!(json.get("hf_tokenizer").is_some());
    let back: Tokenizer = serde_json::from_value(json).unwrap();
    assert!(matches!(back, Tokenizer::Hf(_)));
    assert_eq!(back, tok);
    let bare: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let as_bpe: Tokenizer = serde_json::from_value(bare).unwrap();
    assert!(matches!(as_bpe, Tokenizer::Bpe(_)));
    assert_eq!(as_bpe.encode(text).unwrap(), ids);
    // A missing file names it.
    let err = HfTokenizer::from_file(&path.with_file_name("nope.json")).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
}

#[test]
fn streams_add_up_to_the_decoded_text_for_every_tokenizer() {
    use moe_data::TextStream;
    // Multi-byte characters split over byte-level tokens, and a long text.
    let mut text = corpus()[..20_000].to_string();
    text.push_str(" Hé said «ça» — 你好, naïve café.");
    let bpe = Tokenizer::Bpe(BpeTokenizer::train(&text, 400).unwrap());
    let chars = Tokenizer::Char(moe_data::CharTokenizer::from_text(&text).unwrap());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/hf/llama/tokenizer.json");
    let hf = Tokenizer::Hf(moe_data::HfTokenizer::from_file(&path).unwrap());
    for tok in [&bpe, &chars, &hf] {
        let sample = if matches!(tok, Tokenizer::Hf(_)) {
            &text[..20_000]
        } else {
            &text[..]
        };
        let ids = tok.encode(sample).unwrap();
        let mut stream = TextStream::new(tok);
        let mut streamed = String::new();
        let mut empty_chunks = 0;
        for &id in &ids {
            let chunk = stream.push(id).unwrap();
            empty_chunks += usize::from(chunk.is_empty());
            streamed.push_str(&chunk);
        }
        assert_eq!(streamed, tok.decode(&ids).unwrap(), "{tok:?}");
        assert!(
            empty_chunks < ids.len() / 10,
            "{tok:?}: {empty_chunks} empty chunks"
        );
        let mut stream = TextStream::new(tok);
        assert_eq!(stream.push(tok.vocab_size()).unwrap(), "");
        assert_eq!(stream.unknown_ids(), 1);
        assert!(stream.push(-1).is_err());
    }
    // A multi-byte character split over tokens comes out whole, once.
    let ids = bpe.encode("你").unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let mut stream = TextStream::new(&bpe);
    let chunks: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert!(
        chunks[..ids.len() - 1].iter().all(String::is_empty),
        "{chunks:?}"
    );
    assert_eq!(chunks.last().unwrap(), "你");
}
