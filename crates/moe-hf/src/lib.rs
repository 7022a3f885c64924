//! Hugging Face checkpoints in and out: [`from_pretrained`] reads a folder
//! as transformers' `save_pretrained` writes it (`config.json`,
//! `model.safetensors` or a sharded index, `generation_config.json`,
//! `tokenizer.json`) into the decoder family of `moe-models`, and
//! [`save_pretrained`] writes a decoder back as such a folder.
//!
//! - `family.rs`: [`HfFamily`], the supported `model_type`s;
//! - `families/`: one table per family (`families/<model_type>.rs`): its
//!   `config.json` keys, transformers' defaults, the decoder configs it
//!   cannot express and its tensor names, with the key policy (unknown
//!   keys that may change the model are errors);
//! - `config.rs`: [`HfConfig`], `config.json` to
//!   [`DecoderConfig`](moe_models::DecoderConfig) and back, two
//!   interpreters of the tables;
//! - `names.rs`: [`tensor_map`], which checkpoint tensor fills which
//!   variable, for both [`ExpertLayout`]s, from the tables' names;
//! - `weights.rs`: [`load_weights`] (memory-mapped, checked whole before any
//!   copy) and the safetensors writer;
//! - `generation.rs`: [`GenerationConfig`];
//! - `plan.rs`: [`memory_plan`], what a folder needs in memory, from its
//!   config and its files' headers, before loading;
//! - `pretrained.rs`: [`from_pretrained`], [`save_pretrained`],
//!   [`Pretrained`], [`LoadOptions`], [`SaveOptions`].
//!
//! # Tensor names
//!
//! Our variables carry Hugging Face's names where the layer is the same;
//! `N` is a layer, `e` an expert, `I` the expert width, `H` the model width:
//!
//! | Hugging Face | ours | how |
//! |---|---|---|
//! | `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (untied) | same | as is |
//! | `model.layers.N.{input,post_attention}_layernorm.weight` | same | as is |
//! | `model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `{q,k,v}_proj.bias` (Qwen2-MoE), `{q,k}_norm.weight` (OLMoE) | same | as is |
//! | `model.layers.N.mlp.{gate,up,down}_proj.weight` (dense layers) | same | as is |
//! | Mixtral `model.layers.N.block_sparse_moe.gate.weight` (or transformers 5's `mlp.gate.weight`); others `model.layers.N.mlp.gate.weight` | `model.layers.N.mlp.router.gate.weight` | as is, `[E, H]` |
//! | Mixtral `...block_sparse_moe.experts.e.w1.weight`; others `...mlp.experts.e.gate_proj.weight` (`[I, H]`) | `model.layers.N.mlp.experts.w_gate[e]` (`[H, I]`) | transposed |
//! | Mixtral `...experts.e.w3.weight`; others `...experts.e.up_proj.weight` | `...mlp.experts.w_in[e]` | transposed |
//! | Mixtral `...experts.e.w2.weight`; others `...experts.e.down_proj.weight` (`[H, I]`) | `...mlp.experts.w_out[e]` (`[I, H]`) | transposed |
//! | packed: `model.layers.N.mlp.experts.gate_up_proj` `[E, 2I, H]` | `w_gate` (rows `0..I`), `w_in` (rows `I..2I`) | `transpose(1, 2)` of each half |
//! | packed: `model.layers.N.mlp.experts.down_proj` `[E, H, I]` | `w_out` `[E, I, H]` | `transpose(1, 2)` |
//! | Qwen2-MoE `model.layers.N.mlp.shared_expert.{gate,up,down}_proj.weight` | `...mlp.shared_experts.{w_gate,w_in,w_out}[0]` | transposed |
//! | Qwen2-MoE `model.layers.N.mlp.shared_expert_gate.weight` | same | as is, `[1, H]` |
//! | DeepSeek-V2/V3 `model.layers.N.self_attn.{q_a_proj,q_a_layernorm,q_b_proj,kv_a_proj_with_mqa,kv_a_layernorm,kv_b_proj,o_proj}.weight` (or `q_proj` without `q_lora_rank`), biases with `attention_bias` | same | as is |
//! | DeepSeek-V3, GLM-4.5 `...mlp.gate.e_score_correction_bias` | `...mlp.router.expert_bias` | as is, `[E]` |
//! | DeepSeek-V2/V3, GLM-4.5 `...mlp.shared_experts.{gate,up,down}_proj.weight` | `...mlp.shared_experts.{w_gate,w_in,w_out}[0]` | transposed |
//! | gpt-oss `...self_attn.o_proj.bias`, `...self_attn.sinks` (`[H]`) | same | as is |
//! | gpt-oss `...mlp.router.{weight,bias}` | `...mlp.router.gate.{weight,bias}` | as is |
//! | gpt-oss `...mlp.experts.gate_up_proj` `[E, H, 2I]`, `..._bias` `[E, 2I]` | `w_gate` / `b_gate` (even columns), `w_in` / `b_in` (odd) | every other column |
//! | gpt-oss `...mlp.experts.down_proj` `[E, I, H]`, `..._bias` `[E, H]` | `w_out`, `b_out` | as is |
//! | gpt-oss (hub) `...experts.{gate_up,down}_proj_blocks` `[E, out, in/32, 16]` U8 and `..._scales` `[E, out, in/32]` U8 | as the float tensors above | MXFP4 dequantised on read (never written) |
//!
//! `...rotary_emb.inv_freq` buffers (recomputed), with tied embeddings a
//! stored `lm_head.weight`, and DeepSeek-V3's and GLM-4.5's multi-token-prediction layers
//! (`model.layers.N` past `num_hidden_layers`) are skipped on reading.
//!
//! RoPE settings are read from transformers 4's `rope_theta` +
//! `rope_scaling` or transformers 5's `rope_parameters` (types `linear`,
//! `dynamic`, `yarn`, `llama3`; any other is an error naming it) and written
//! as `rope_parameters`.
//!
//! # Example
//!
//! ```no_run
//! use moe_hf::{from_pretrained, LoadOptions};
//! use moe_models::{generate, Sampling};
//!
//! # fn main() -> moe_core::Result<()> {
//! let pretrained = from_pretrained("tests/data/hf/mixtral".as_ref(), &LoadOptions::default())?;
//! let prompt = [1, 415, 2936];
//! let tokens = generate(&pretrained.model, &prompt, 20, Sampling::greedy(), |_| {})?;
//! # let _ = tokens;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod config;
mod families;
mod family;
mod fs;
mod generation;
mod names;
mod plan;
mod pretrained;
mod weights;

pub use config::HfConfig;
pub use family::HfFamily;
pub use generation::GenerationConfig;
pub use names::{tensor_map, ExpertLayout, HfTensor, Placement, TensorPart};
pub use plan::{available_memory, memory_plan, MemoryPlan};
pub use pretrained::{
    checkpoint_dtype, dtype_by_name, from_pretrained, save_pretrained, save_pretrained_with,
    ExpertStorage, LoadOptions, Pretrained, SaveOptions, CONFIG_FILE, GENERATION_FILE,
    TOKENIZER_FILE,
};
pub use weights::{load_weights, LoadStats, INDEX_FILE, WEIGHTS_FILE};
