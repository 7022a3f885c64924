//! `llama4` (`Llama4ForConditionalGeneration`, the Hub's Llama 4 Scout and
//! Maverick folders): the text model of [`super::llama4_text`] as
//! `text_config`, its weights under `language_model.`, beside a vision
//! tower this crate skips. Read for the text model; saved as `llama4_text`.

use super::llama4_text::{tensors, CHECKS, DEFAULTS, KEYS, LAYERS};
use super::{Family, Multimodal};

pub(crate) static FAMILY: Family = Family {
    model_type: "llama4",
    architecture: "Llama4ForConditionalGeneration",
    name: "Llama 4",
    defaults: DEFAULTS,
    layers: LAYERS,
    keys: &KEYS,
    checks: &CHECKS,
    tensors: tensors(
        "language_model.",
        &["vision_model.", "multi_modal_projector."],
    ),
    multimodal: Some(Multimodal {
        text_model_type: "llama4_text",
        informational: &[
            "vision_config",
            "boi_token_index",
            "eoi_token_index",
            "image_token_index",
            "tie_word_embeddings",
        ],
    }),
};
