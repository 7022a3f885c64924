//! `generation_config.json` as transformers writes it.

use moe_hf::GenerationConfig;
use moe_models::Sampling;
use serde_json::json;

fn parse(v: serde_json::Value) -> GenerationConfig {
    serde_json::from_value(v).unwrap()
}

#[test]
fn eos_is_an_integer_a_list_or_null() {
    assert_eq!(parse(json!({"eos_token_id": 2})).eos_token_id, vec![2]);
    assert_eq!(
        parse(json!({"eos_token_id": [2, 7]})).eos_token_id,
        vec![2, 7]
    );
    assert!(parse(json!({"eos_token_id": null})).eos_token_id.is_empty());
    assert!(parse(json!({})).eos_token_id.is_empty());
    // Written back in the same form, other keys kept.
    let g = parse(json!({"eos_token_id": 2, "bos_token_id": 1, "transformers_version": "5.23.0"}));
    assert!(g.is_eos(2) && !g.is_eos(1));
    assert_eq!(
        serde_json::to_value(&g).unwrap(),
        json!({"eos_token_id": 2, "bos_token_id": 1, "transformers_version": "5.23.0"})
    );
    let g = parse(json!({"eos_token_id": [2, 7]}));
    assert_eq!(
        serde_json::to_value(&g).unwrap(),
        json!({"eos_token_id": [2, 7]})
    );
    assert!(serde_json::from_value::<GenerationConfig>(json!({"eos_token_id": "x"})).is_err());
}

#[test]
fn sampling_follows_transformers_defaults() {
    assert_eq!(parse(json!({})).sampling(100), Sampling::greedy());
    assert_eq!(
        parse(json!({"do_sample": true})).sampling(100),
        Sampling {
            temperature: 1.0,
            top_k: Some(50),
            ..Sampling::default()
        }
    );
    assert_eq!(
        parse(json!({"do_sample": true, "temperature": 0.6, "top_k": 0, "top_p": 0.9}))
            .sampling(100),
        Sampling {
            temperature: 0.6,
            top_k: None,
            top_p: Some(0.9),
            repetition_penalty: 1.0,
        }
    );
    assert_eq!(
        parse(json!({"do_sample": true})).sampling(20).top_k,
        Some(20),
        "clamped to the vocabulary"
    );
    let g = parse(json!({"do_sample": true, "repetition_penalty": 1.1, "max_length": 64}));
    assert_eq!((g.repetition_penalty, g.max_length), (Some(1.1), Some(64)));
    assert_eq!(g.sampling(100).repetition_penalty, 1.1);
}

#[test]
fn without_a_file_the_model_config_gives_the_token_ids() {
    let config = json!({"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": null});
    let g = GenerationConfig::from_model_config(config.as_object().unwrap());
    assert_eq!(
        (g.bos_token_id, g.eos_token_id, g.pad_token_id),
        (Some(1), vec![2, 3], None)
    );
}
