//! Helpers of the moe-hf tests: fixture folders, expected outputs, temp
//! folders and safetensors files written byte by byte.

#![allow(dead_code)]

use moe_hf::{from_pretrained, LoadOptions, Pretrained};
use moe_models::DecoderConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Every fixture folder: one per family, two with RoPE scaling,
/// DeepSeek-V2's second router, three with sliding windows and gpt-oss's
/// MXFP4 experts.
pub const FAMILIES: [&str; 18] = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "glm4_moe",
    "deepseek_v3",
    "deepseek_v3_yarn",
    "deepseek_v2",
    "deepseek_v2_greedy",
    "olmoe",
    "llama",
    "llama_rope3",
    "mixtral_window",
    "qwen3_moe_window",
    "qwen2_moe_window",
    "gpt_oss",
    "gpt_oss_mxfp4",
    "llama4_text",
    "llama4",
];

/// `tests/data/hf/NAME` of the workspace.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/hf")
        .join(name)
}

/// What `expected.json` holds.
#[derive(Debug, Deserialize)]
pub struct Expected {
    pub prompts: Vec<Vec<i64>>,
    /// `[prompt][position][vocab]`.
    pub logits: Vec<Vec<Vec<f32>>>,
    pub moe_layers: Vec<i64>,
    /// `[prompt][moe layer][position][k]`, ascending.
    pub experts: Vec<Vec<Vec<Vec<i64>>>>,
    pub greedy: Vec<Vec<i64>>,
}

pub fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn load(dir: &Path) -> Pretrained {
    // f32, as the fixtures' logits were computed (the files hold bf16).
    let options = LoadOptions {
        dtype: Some(tch::Kind::Float),
        ..LoadOptions::default()
    };
    from_pretrained(dir, &options).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A fresh empty folder under the system's temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "moe-hf-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies the JSON files of fixture `name` (config, generation config,
/// tokenizer) into `dir`.
pub fn copy_json(name: &str, dir: &Path) {
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
}

/// A tensor of a safetensors file as raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Every tensor of a safetensors file, by name.
pub fn read_raw(path: &Path) -> BTreeMap<String, Raw> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            (
                name,
                Raw {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect()
}

/// `__metadata__` of a safetensors file.
pub fn read_metadata(path: &Path) -> Option<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone()
}

/// Writes `tensors` as a safetensors file with `{"format": "pt"}`.
pub fn write_raw(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.clone(), v)),
        Some(meta),
        path,
    )
    .unwrap();
}

/// The variables of a store, by name (deep copies).
pub fn snapshot(vs: &tch::nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect()
}

/// Asserts two snapshots hold the same names and bit-identical values.
pub fn assert_same_vars(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "variable names"
    );
    for (name, t) in a {
        assert!(t.equal(&b[name]), "variable `{name}` differs");
    }
}

/// Max |a - b| over two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// `u = 2^-24`, the unit roundoff of f32.
pub const F32_UNIT_ROUNDOFF: f64 = 5.960_464_477_539_063e-8;

/// The largest difference two correct f32 evaluations of the logits of the
/// decoder `config` with the weights of `vs` (ours and transformers', on
/// any CPU) can show for prompts of at most `len` tokens: a bound from the
/// arithmetic, not from a run.
///
/// A sum of `n` products computed in any order is off by at most
/// `gamma_n ~ n u` of the sum of its terms' magnitudes (Higham, *Accuracy
/// and Stability of Numerical Algorithms*, §3.1). Counting each reduction
/// of the forward pass as adding its own `gamma_n` to first order (RMSNorm
/// before every sub-layer keeps each stage's gain near one), a layer adds
/// RMSNorm (`d`), the query/key/value projections (`d`, and the latent
/// ranks with MLA), the scores (the query-key width), the weighted sum of
/// values (`len`), the output projection (heads times value width),
/// RMSNorm (`d`), the router (`d`), the expert's input (`d`) and output
/// (its width) layers and the sum over the routed and shared experts; the
/// final RMSNorm and the head add `2 d`. That relative error `eps` applies
/// to the sum of a logit's terms' magnitudes, at most
/// `||w_v|| ||h|| <= max_v ||w_v|| sqrt(d) max |g|` by Cauchy-Schwarz, with
/// `w_v` the head's rows and `h` the final RMSNorm's output (unit RMS
/// times its gain `g`). For these test models (d = 32, 1-3 layers) the
/// bound is a few 1e-4, ~1e-3 with tied N(0, 1) embeddings; differences
/// seen are ~1e-6, and a wrong weight, scale or layout moves logits by 1e-2
/// or more.
pub fn logit_tolerance(c: &DecoderConfig, vs: &tch::nn::VarStore, len: i64) -> f64 {
    logit_scale(vs) * stages(c, len) as f64 * F32_UNIT_ROUNDOFF
}

/// `2^-9`, the unit roundoff of bf16 (8 significant bits, round to nearest).
pub const BF16_UNIT_ROUNDOFF: f64 = 1.953_125e-3;

/// Values a decoder layer computing in bf16 rounds to bf16 on their way:
/// the query, key and value projections, the attention probabilities, the
/// attention output and its projection, the residual sum, the RMSNorm
/// output, the router's logits, the expert's two input projections, its
/// activation product and output, and the weighted sum with the residual.
pub const BF16_ROUNDINGS_PER_LAYER: i64 = 14;

/// The largest difference between the logits of one model computed in bf16
/// (parameters held in bf16 exactly, as the bf16 fixtures store them) and
/// in f32, for prompts of at most `len` tokens, when both route every token
/// to the same experts: [`logit_tolerance`]'s f32 accumulation bound plus,
/// to first order, one bf16 rounding (relative `2^-9`) of every value the
/// bf16 pass stores ([`BF16_ROUNDINGS_PER_LAYER`] per layer, then the final
/// norm and the head), each applying to the sum of a logit's terms'
/// magnitudes as there.
pub fn bf16_logit_tolerance(c: &DecoderConfig, vs: &tch::nn::VarStore, len: i64) -> f64 {
    let roundings = c.num_hidden_layers * BF16_ROUNDINGS_PER_LAYER + 2;
    logit_tolerance(c, vs, len) + logit_scale(vs) * roundings as f64 * BF16_UNIT_ROUNDOFF
}

/// The reductions of a forward pass, each adding its `gamma_n` to first
/// order (see [`logit_tolerance`]).
fn stages(c: &DecoderConfig, len: i64) -> i64 {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let (qk_width, v_width, latent) = match &c.latent_attention {
        Some(mla) => (
            mla.qk_nope_head_dim + mla.qk_rope_head_dim,
            mla.v_head_dim,
            mla.kv_lora_rank + mla.q_lora_rank.unwrap_or(0),
        ),
        None => {
            let head_dim = c.head_dim.unwrap_or(d / heads);
            (head_dim, head_dim, 0)
        }
    };
    let experts = c.num_experts_per_tok + c.n_shared_experts + 1;
    let width = c
        .expert_width()
        .max(c.intermediate_size)
        .max(c.shared_expert_intermediate_size.unwrap_or(0));
    let per_layer = d + d + latent + qk_width + len + heads * v_width + d + d + d + width + experts;
    c.num_hidden_layers * per_layer + 2 * d
}

/// `max_v ||w_v|| sqrt(d) max |g|`: the bound on the sum of a logit's
/// terms' magnitudes (see [`logit_tolerance`]).
fn logit_scale(vs: &tch::nn::VarStore) -> f64 {
    let vars = vs.variables();
    let head = vars
        .get("lm_head.weight")
        .or_else(|| vars.get("model.embed_tokens.weight"))
        .expect("a decoder has an lm_head or tied embeddings");
    let max_row = head
        .to_kind(tch::Kind::Double)
        .norm_scalaropt_dim(2, [1], false)
        .max()
        .double_value(&[]);
    let gain = vars["model.norm.weight"]
        .abs()
        .max()
        .to_kind(tch::Kind::Double)
        .double_value(&[]);
    let d = vars["model.norm.weight"].size()[0];
    max_row * (d as f64).sqrt() * gain
}
