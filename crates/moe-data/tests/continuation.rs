//! [`Continuation`]: a generated sequence's text, decoded in context and
//! ended by a stop string.

use moe_data::{CharTokenizer, Continuation, Tokenizer};
use std::ops::ControlFlow;

#[test]
fn a_continuation_decodes_after_its_prompt_and_stops_at_a_stop_string() {
    let tokenizer = Tokenizer::Char(CharTokenizer::from_text("ab:\n").unwrap());
    let ids = tokenizer.encode("ab:\nba\nab").unwrap();
    let (prompt, generated) = ids.split_at(4);
    let stop = vec!["\nab".to_string()];
    let mut row = Continuation::new(&tokenizer, prompt, &stop).unwrap();
    let flows: Vec<_> = generated.iter().map(|&id| row.push(id)).collect();
    // "ba\nab": the stop string is complete at the last token only.
    assert_eq!(flows[..4], [ControlFlow::Continue(()); 4]);
    assert_eq!(flows[4], ControlFlow::Break(()));
    assert_eq!(row.text(), "ba\nab");
    assert_eq!(row.finish().unwrap(), "ba\nab");

    // Without stop strings it goes on; a negative id is an error that ends it.
    let mut row = Continuation::new(&tokenizer, prompt, &[]).unwrap();
    assert_eq!(row.push(ids[0]), ControlFlow::Continue(()));
    assert_eq!(row.push(-1), ControlFlow::Break(()));
    assert!(row.finish().is_err());
}

#[test]
fn a_stop_string_across_tokens_and_characters_is_found() {
    // Multi-byte characters: the tail searched starts on a character.
    let text = "éàü stop";
    let tokenizer = Tokenizer::Char(CharTokenizer::from_text(text).unwrap());
    let ids = tokenizer.encode(text).unwrap();
    let stop = vec!["ü st".to_string()];
    let mut row = Continuation::new(&tokenizer, &[], &stop).unwrap();
    let pushed = ids
        .iter()
        .take_while(|&&id| row.push(id).is_continue())
        .count();
    // The sixth token ("t") completes the stop string.
    assert_eq!(pushed, 5);
    assert_eq!(row.text(), "éàü st");
}
