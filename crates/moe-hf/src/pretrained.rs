//! `from_pretrained` and `save_pretrained`: whole checkpoint folders.

use crate::fs::write_json;
use crate::weights::{dtype_of, load_weights, write_weights, WEIGHTS_FILE};
use crate::{ExpertLayout, GenerationConfig, HfConfig, HfFamily};
use moe_core::write_atomic;
use moe_core::{MoeError, Precision, Result};
use moe_data::{HfTokenizer, Tokenizer};
use moe_models::{DecoderConfig, DecoderModel};
use serde_json::json;
use std::path::Path;
use tch::{nn, Device, Kind};

/// The model config of a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// The generation defaults of a checkpoint folder.
pub const GENERATION_FILE: &str = "generation_config.json";
/// The tokenizer of a checkpoint folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// How [`from_pretrained`] builds the model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// The parameters' dtype: `None` for f32 (the library's parameters are
    /// f32, whatever the checkpoint holds); `Some(Kind::BFloat16)` (or
    /// `Half`, `Double`) to keep or choose another floating-point dtype.
    /// With bf16 or f64 parameters the model computes in that dtype too
    /// (its config's `precision`): attention, experts and the KV cache;
    /// f16 parameters are cast to f32 at use.
    pub dtype: Option<Kind>,
    /// Where the parameters live.
    pub device: Device,
    /// `config.json` keys to ignore although this reader does not know
    /// them (see the key policy of [`HfConfig::to_decoder`]).
    pub ignore_keys: Vec<String>,
    /// A shorter context than the checkpoint's `max_position_embeddings`
    /// (the rotary tables of every layer are built for the whole context);
    /// `None` keeps the checkpoint's.
    pub max_position_embeddings: Option<i64>,
}

impl Default for LoadOptions {
    /// f32 parameters on the CPU, the checkpoint's context.
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: Device::Cpu,
            ignore_keys: Vec::new(),
            max_position_embeddings: None,
        }
    }
}

/// How [`save_pretrained_with`] writes the folder.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SaveOptions {
    /// The dtype of the saved tensors; `None` keeps the parameters' dtype.
    pub dtype: Option<Kind>,
    /// How MoE layers store their experts (per expert by default, as
    /// transformers writes them).
    pub layout: ExpertLayout,
    /// `generation_config.json`'s contents (`None`: an empty one; its token
    /// ids also go into `config.json`).
    pub generation: Option<GenerationConfig>,
}

/// A checkpoint folder loaded: the model, the store owning its parameters,
/// its config and what came with it.
#[derive(Debug)]
pub struct Pretrained {
    /// The parameters.
    pub vs: nn::VarStore,
    /// The model, built from `config` in `vs`.
    pub model: DecoderModel,
    /// The decoder config `config.json` maps to.
    pub config: DecoderConfig,
    /// `generation_config.json`, or the token ids of `config.json` without it.
    pub generation: GenerationConfig,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer: Option<Tokenizer>,
    /// `config.json` as read, with its family.
    pub source: HfConfig,
}

impl Pretrained {
    /// The checkpoint's model type.
    pub fn family(&self) -> HfFamily {
        self.source.family
    }

    /// The dtype `config.json` says the weights were saved in (`dtype`, or
    /// transformers 4's `torch_dtype`), when it names a floating-point one
    /// (`float32`, `float16`, `bfloat16`, `float64`): the dtype to save a
    /// changed copy in, whatever dtype the parameters were loaded in.
    pub fn saved_dtype(&self) -> Option<Kind> {
        let json = &self.source.json;
        let name = json.get("dtype").or_else(|| json.get("torch_dtype"))?;
        [Kind::Float, Kind::Half, Kind::BFloat16, Kind::Double]
            .into_iter()
            .find(|&kind| name.as_str() == Some(dtype_name(kind)))
    }

    /// Writes the model back as a folder of its own family, with its
    /// tokenizer and (unless `options` gives one) its generation config.
    pub fn save(&self, dir: &Path, options: &SaveOptions) -> Result<()> {
        let options = SaveOptions {
            generation: options
                .generation
                .clone()
                .or_else(|| Some(self.generation.clone())),
            ..options.clone()
        };
        save_pretrained_with(
            &self.model,
            &self.vs,
            self.family().model_type(),
            dir,
            self.tokenizer.as_ref(),
            &options,
        )
    }
}

/// transformers' name of a dtype (`config.json`'s `dtype`).
fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// The compute dtype of a model whose parameters are `kind`: theirs for
/// bf16 and f64 (attention, experts and the KV cache in that dtype; norms,
/// softmaxes and the loss accumulate in f32 or f64), `configured` for f32,
/// and f32 for f16 parameters (cast at use: f16 products are not computed
/// on every CPU).
pub(crate) fn compute_precision(kind: Kind, configured: Precision) -> Precision {
    match kind {
        Kind::BFloat16 => Precision::Bf16,
        Kind::Double => Precision::Fp64,
        Kind::Half => Precision::Fp32,
        _ => configured,
    }
}

/// Checks that `kind` is one a model's parameters can have.
fn float_dtype(kind: Kind, what: &str) -> Result<()> {
    dtype_of(kind).map(|_| ()).ok_or_else(|| {
        MoeError::config(format!(
            "{what} must be a floating-point kind (Float, Half, BFloat16 or Double), got {kind:?}"
        ))
    })
}

/// Loads a folder as transformers' `save_pretrained` writes it:
///
/// - `config.json`, mapped to a [`DecoderConfig`] by its `model_type`
///   (`mixtral`, `qwen2_moe`, `olmoe`, `llama`; see [`HfConfig::to_decoder`]
///   for the key policy; `deepseek_v3` is an error until the decoder has
///   Multi-head Latent Attention);
/// - the weights, `model.safetensors` or the shards of
///   `model.safetensors.index.json`, memory-mapped, checked whole, then
///   copied into the parameters ([`load_weights`]), in either expert layout;
/// - `generation_config.json` when present;
/// - `tokenizer.json` when present, as [`Tokenizer::Hf`].
///
/// Errors are [`MoeError::Checkpoint`]s naming the file (and the tensor or
/// key), or [`MoeError::Config`] for bad `options`.
pub fn from_pretrained(dir: &Path, options: &LoadOptions) -> Result<Pretrained> {
    let kind = options.dtype.unwrap_or(Kind::Float);
    float_dtype(kind, "LoadOptions::dtype")?;
    let source = HfConfig::read(&dir.join(CONFIG_FILE))?;
    let mut config = source.to_decoder(&options.ignore_keys)?;
    if let Some(n) = options.max_position_embeddings {
        if n <= 0 {
            return Err(MoeError::config(format!(
                "LoadOptions::max_position_embeddings must be positive, got {n}"
            )));
        }
        config.max_position_embeddings = n;
    }
    let generation_path = dir.join(GENERATION_FILE);
    let generation = if generation_path.is_file() {
        GenerationConfig::read(&generation_path)?
    } else {
        GenerationConfig::from_model_config(&source.json)
    };
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer = if tokenizer_path.is_file() {
        Some(Tokenizer::Hf(HfTokenizer::from_file(&tokenizer_path)?))
    } else {
        None
    };
    config.precision = compute_precision(kind, config.precision);
    let mut vs = nn::VarStore::new(options.device);
    let model = DecoderModel::new(&vs.root(), &config)?;
    match kind {
        Kind::Float => {}
        Kind::Half => vs.half(),
        Kind::BFloat16 => vs.bfloat16(),
        _ => vs.double(),
    }
    load_weights(dir, source.family, &config, &vs)?;
    Ok(Pretrained {
        vs,
        model,
        config,
        generation,
        tokenizer,
        source,
    })
}

/// [`save_pretrained_with`] with the default [`SaveOptions`]: the
/// parameters' dtype, experts stored per expert, an empty generation config.
pub fn save_pretrained(
    model: &DecoderModel,
    vs: &nn::VarStore,
    model_type: &str,
    dir: &Path,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    save_pretrained_with(
        model,
        vs,
        model_type,
        dir,
        tokenizer,
        &SaveOptions::default(),
    )
}

/// Writes `model` (whose parameters `vs` holds) as a `model_type` folder
/// that transformers' `from_pretrained` loads: `config.json` with
/// `model_type`, `architectures` and the family's keys
/// ([`HfConfig::from_decoder`]), `model.safetensors` with transformers'
/// tensor names and `__metadata__ {"format": "pt"}`,
/// `generation_config.json`, and `tokenizer.json` when a tokenizer is given
/// (a BPE or pretrained one; a character tokenizer has no such form).
///
/// Everything that can be checked is checked before the first file is
/// written (a config the family cannot express is a [`MoeError::Config`]);
/// each file is written atomically, `config.json` last.
pub fn save_pretrained_with(
    model: &DecoderModel,
    vs: &nn::VarStore,
    model_type: &str,
    dir: &Path,
    tokenizer: Option<&Tokenizer>,
    options: &SaveOptions,
) -> Result<()> {
    let family: HfFamily = model_type.parse()?;
    let config = model.config();
    let mut hf = HfConfig::from_decoder(family, config)?;
    let kind = match options.dtype {
        Some(kind) => kind,
        None => vs
            .variables()
            .get("model.embed_tokens.weight")
            .map_or(Kind::Float, |t| t.kind()),
    };
    float_dtype(kind, "the saved dtype")?;
    hf.json.insert("dtype".into(), json!(dtype_name(kind)));
    let generation = options.generation.clone().unwrap_or_default();
    if let Some(id) = generation.bos_token_id {
        hf.json.insert("bos_token_id".into(), json!(id));
    }
    match generation.eos_token_id.as_slice() {
        [] => {}
        [id] => {
            hf.json.insert("eos_token_id".into(), json!(id));
        }
        ids => {
            hf.json.insert("eos_token_id".into(), json!(ids));
        }
    }
    if let Some(id) = generation.pad_token_id {
        hf.json.insert("pad_token_id".into(), json!(id));
    }
    let tokenizer_json = match tokenizer {
        None => None,
        Some(Tokenizer::Hf(t)) => Some(t.to_json(true)?),
        Some(Tokenizer::Bpe(t)) => Some(
            serde_json::to_string_pretty(t)
                .map_err(|e| MoeError::Data(format!("cannot serialise the tokenizer: {e}")))?,
        ),
        // A character tokenizer (and any other kind).
        Some(_) => {
            return Err(MoeError::config(
                "only BPE and pretrained tokenizers have a tokenizer.json form (a character \
                 tokenizer has none); save without it or train a BPE tokenizer",
            ))
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
    let weights_kind = options.dtype;
    write_weights(
        &dir.join(WEIGHTS_FILE),
        family,
        config,
        vs,
        options.layout,
        weights_kind,
    )?;
    write_json(&dir.join(GENERATION_FILE), &generation)?;
    if let Some(text) = tokenizer_json {
        write_atomic(&dir.join(TOKENIZER_FILE), text.as_bytes())?;
    }
    write_json(&dir.join(CONFIG_FILE), &hf.to_json())
}
