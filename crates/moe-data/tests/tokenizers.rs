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
