//! Ids at or past a tokenizer's vocabulary, which a model whose embedding
//! is padded past its tokenizer emits (OLMoE: 50304 rows for 50280
//! tokens), decode as nothing with one warning per decode call or stream,
//! as transformers' `decode` does; negative ids stay errors.

use moe_core::MoeError;
use moe_data::{BpeTokenizer, CharTokenizer, HfTokenizer, TextStream, Tokenizer};
use std::path::Path;

fn mixtral() -> HfTokenizer {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/hf/mixtral/tokenizer.json");
    HfTokenizer::from_file(&path).unwrap()
}

const TEXT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.";

/// `ids` with `extra` inserted after the first, the middle and the last.
fn padded(ids: &[i64], extra: [i64; 3]) -> Vec<i64> {
    let mut out = ids.to_vec();
    out.push(extra[2]);
    out.insert(ids.len() / 2, extra[1]);
    out.insert(1, extra[0]);
    out
}

#[test]
fn ids_past_the_vocabulary_decode_as_nothing_for_every_tokenizer() {
    let hf = mixtral();
    let tokenizers = [
        Tokenizer::Hf(hf.clone()),
        Tokenizer::Char(CharTokenizer::from_text(TEXT).unwrap()),
        Tokenizer::Bpe(BpeTokenizer::train(&TEXT.repeat(20), 300).unwrap()),
    ];
    for tok in &tokenizers {
        let v = tok.vocab_size();
        let ids = tok.encode(TEXT).unwrap();
        let with_padding = padded(&ids, [v, v + 23, v + 1]);
        assert_eq!(tok.decode(&with_padding).unwrap(), TEXT, "{tok:?}");
        // Streaming: the same text, the unknown ids counted.
        let mut stream = TextStream::new(tok);
        let mut streamed = String::new();
        for &id in &with_padding {
            streamed.push_str(&stream.push(id).unwrap());
        }
        assert_eq!(streamed, TEXT, "{tok:?}");
        assert_eq!(stream.unknown_ids(), 3, "{tok:?}");
        // Negative ids are no model's output: still an error.
        assert!(matches!(
            tok.decode(&[ids[0], -3]),
            Err(MoeError::TokenOutOfVocab { id: -3, .. })
        ));
        assert!(stream.push(-3).is_err());
    }
    // The pretrained tokenizer's own decoding does the same.
    let ids = hf.encode(TEXT).unwrap();
    let v = hf.vocab_size();
    assert_eq!(hf.decode(&padded(&ids, [v, v, v + 100])).unwrap(), TEXT);
    assert_eq!(
        hf.decode_all(&padded(&ids, [v, v, v + 100])).unwrap(),
        hf.decode_all(&ids).unwrap()
    );
    assert_eq!(hf.decode(&[v, v + 1]).unwrap(), "");
}

/// The child half of the test below: decodes with unknown ids twice and
/// streams them, with stderr not captured.
const CHILD: &str = "MOE_PADDED_VOCAB_CHILD";

#[test]
fn the_warning_comes_once_per_decode_call_and_once_per_stream() {
    let tok = Tokenizer::Hf(mixtral());
    let v = tok.vocab_size();
    if std::env::var_os(CHILD).is_some() {
        let ids = padded(&tok.encode(TEXT).unwrap(), [v, v + 5, v + 9]);
        tok.decode(&ids).unwrap();
        tok.decode(&ids).unwrap();
        tok.decode(&tok.encode(TEXT).unwrap()).unwrap(); // nothing to warn about
        let mut stream = TextStream::new(&tok);
        for &id in &ids {
            stream.push(id).unwrap();
        }
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_warning_comes_once_per_decode_call_and_once_per_stream",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(
        warnings.len(),
        3,
        "two decode calls and one stream:\n{stderr}"
    );
    let ids = format!("[{v}, {}, {}]", v + 5, v + 9);
    assert!(
        warnings[0].contains(&format!("3 token id(s) {ids}"))
            && warnings[0].contains(&format!("{v} tokens")),
        "{}",
        warnings[0]
    );
    // The stream names the first unknown id it met.
    assert!(
        warnings[2].contains(&format!("1 token id(s) [{v}]")),
        "{}",
        warnings[2]
    );
}
