//! A model whose embedding has more rows than its tokenizer has tokens (as
//! OLMoE's 50304 for 50280) can emit an id no tokenizer entry has: the
//! streamed text leaves it out and generation goes on to the end, as the
//! `generate` example streams it.

#[path = "../../moe-train/tests/common.rs"]
mod common;

use common::tiny_config;
use moe_data::{CharTokenizer, TextStream, Tokenizer};
use moe_models::{generate, MakeMoeModel, Sampling};
use tch::{nn, Device};

#[test]
fn ids_past_the_tokenizer_stream_as_nothing_and_generation_goes_on() {
    let tok = Tokenizer::Char(CharTokenizer::from_text("abcdefghij klmnopqrst").unwrap());
    assert_eq!(tok.vocab_size(), 21);
    // Nine padding rows past the tokenizer's 21 tokens.
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), tiny_config(30)).unwrap();
    let prompt = tok.encode("abc").unwrap();
    let clean = generate(&model, &prompt, 12, Sampling::greedy(), |_| {}).unwrap();
    // Make padding id 27 the greedy choice wherever the clean model chose
    // token `pick`: raise its logit by the bias of that token's row.
    let pick = clean[3];
    let vars = vs.variables();
    tch::no_grad(|| {
        let weight = vars["lm_head.weight"].shallow_clone();
        let bias = vars["lm_head.bias"].shallow_clone();
        weight.get(27).copy_(&weight.get(pick));
        bias.get(27).copy_(&(bias.get(pick) + 1.0));
    });
    let mut stream = TextStream::new(&tok);
    for &id in &prompt {
        stream.push(id).unwrap();
    }
    let mut text = String::new();
    let out = generate(&model, &prompt, 12, Sampling::greedy(), |id| {
        text.push_str(&stream.push(id).unwrap());
    })
    .unwrap();
    assert_eq!(out.len(), 12, "generation went to the end: {out:?}");
    let padding = out.iter().filter(|&&id| id >= tok.vocab_size()).count();
    assert!(padding >= 1, "the model emitted no padding id: {out:?}");
    assert_eq!(stream.unknown_ids(), padding);
    // The text is that of the tokenizer's ids alone.
    let known: Vec<i64> = out.iter().copied().filter(|&id| id < 21).collect();
    assert_eq!(text, tok.decode(&known).unwrap());
    assert_eq!(tok.decode(&out).unwrap(), text);
    assert_eq!(text.chars().count(), 12 - padding);
}
