//! `from_pretrained` and `save_pretrained`: whole checkpoint folders.

use crate::fs::write_json;
#[cfg(doc)]
use crate::weights::load_weights;
use crate::weights::{
    dtype_of, load_weights_as, tensor_sizes, write_weights, Fill, LoadStats,
    MappedExperts as MappedExpertMatrices, WEIGHTS_FILE,
};
use crate::{ExpertLayout, GenerationConfig, HfConfig, HfFamily};
use moe_core::write_atomic;
use moe_core::{MoeError, Precision, Result};
use moe_data::{HfTokenizer, Tokenizer};
use moe_experts::{ExpertQuantization, ExpertResidency};
use moe_models::decoder::FeedForward;
use moe_models::{DecoderConfig, DecoderModel};
use serde_json::json;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// The model config of a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// The generation defaults of a checkpoint folder.
pub const GENERATION_FILE: &str = "generation_config.json";
/// The tokenizer of a checkpoint folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// How [`from_pretrained`] builds the model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// The parameters' dtype: `None` for the checkpoint's own (the dtype
    /// holding most of its weight bytes, as transformers' `dtype="auto"`);
    /// `Some(Kind::Float)`, `BFloat16`, `Half` or `Double` to choose one.
    /// With bf16 or f64 parameters the model computes in that dtype too
    /// (its config's `precision`): attention, experts and the KV cache,
    /// while norms, softmaxes and router logits accumulate in f32 (f64);
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
    /// Where the routed experts' weights live.
    pub experts: ExpertStorage,
    /// Weight-only quantisation of the routed experts after loading
    /// ([`DecoderModel::quantize_experts`]); `None` keeps them as loaded.
    pub quantize_experts: Option<ExpertQuantization>,
}

/// Where [`from_pretrained`] puts the routed experts' weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertStorage {
    /// Copied into the model's expert banks: trainable, any dtype and
    /// device.
    #[default]
    Resident,
    /// Left in the checkpoint's memory-mapped files, for inference on the
    /// CPU in the files' dtype: nothing is copied, an expert's pages are
    /// read when it runs, and at most `cache_bytes` of experts stay in
    /// memory, least recently used out first, with the next layer's likely
    /// experts read ahead while a token is decoded
    /// ([`moe_experts::ExpertResidency`]). For checkpoints larger than the
    /// memory. `cache_bytes` must hold at least one layer's `top_k`
    /// experts.
    Mapped {
        /// The most bytes of experts kept in memory.
        cache_bytes: u64,
    },
}

impl ExpertStorage {
    /// A command line's expert cache: none ([`ExpertStorage::Resident`]),
    /// or [`ExpertStorage::Mapped`] with `gib` GiB (a positive number).
    pub fn with_cache_gib(gib: Option<f64>) -> Result<Self> {
        match gib {
            None => Ok(ExpertStorage::Resident),
            Some(gib) if gib > 0.0 && gib.is_finite() => Ok(ExpertStorage::Mapped {
                cache_bytes: (gib * (1u64 << 30) as f64) as u64,
            }),
            Some(gib) => Err(MoeError::config(format!(
                "an expert cache must be a positive number of GiB, got {gib}"
            ))),
        }
    }
}

/// A command line's dtype name as [`LoadOptions::dtype`]: `auto` (the
/// files' dtype, `None`), `f32`, `bf16`, `f16` or `f64` (and their long
/// names: `float32`, `bfloat16`, ...).
pub fn dtype_by_name(name: &str) -> Result<Option<Kind>> {
    Ok(Some(match name.to_ascii_lowercase().as_str() {
        "auto" => return Ok(None),
        "f32" | "fp32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "fp16" | "float16" => Kind::Half,
        "f64" | "fp64" | "float64" => Kind::Double,
        other => {
            return Err(MoeError::config(format!(
                "dtype {other}: expected f32, bf16, f16, f64 or auto"
            )))
        }
    }))
}

impl Default for LoadOptions {
    /// The checkpoint's dtype, on the CPU, the checkpoint's context.
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: Device::Cpu,
            ignore_keys: Vec::new(),
            max_position_embeddings: None,
            experts: ExpertStorage::Resident,
            quantize_experts: None,
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
    /// How the weights were put into the parameters.
    pub load: LoadStats,
    /// The resident set of experts left in the files
    /// ([`ExpertStorage::Mapped`]): its hit rate and bytes read.
    pub residency: Option<ExpertResidency>,
}

impl Pretrained {
    /// The checkpoint's `tokenizer.json`, taken out: an error naming the
    /// file when the folder has none.
    pub fn take_tokenizer(&mut self) -> Result<Tokenizer> {
        self.tokenizer.take().ok_or_else(|| MoeError::Checkpoint {
            path: self.source.path.with_file_name(TOKENIZER_FILE),
            reason: "the checkpoint has no tokenizer.json (a program that encodes text needs it)"
                .into(),
        })
    }

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

    /// Writes the model back as a folder of its own family (a multimodal
    /// folder's text model as its text family, [`HfFamily::saved_as`]), with its
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
            self.family().saved_as().model_type(),
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
///   (one of [`HfFamily::ALL`]; see [`HfConfig::to_decoder`] for the key
///   policy);
/// - the weights, `model.safetensors` or the shards of
///   `model.safetensors.index.json`, memory-mapped and checked whole
///   ([`load_weights`]), in either expert layout;
/// - `generation_config.json` when present;
/// - `tokenizer.json` when present, as [`Tokenizer::Hf`].
///
/// The model is built without drawing a single initial value
/// ([`moe_core::allocate_only`]): its parameters are allocated in the
/// chosen dtype ([`LoadOptions::dtype`], the checkpoint's by default) and
/// filled from the files once everything is checked. A tensor stored as
/// the parameter holds it (same dtype, the CPU, not transposed or stacked:
/// embeddings, attention, norms, dense MLPs) is used from the memory map
/// without a copy; the others (expert banks, other dtypes or devices) are
/// copied, and their pages released as they are. So a bf16 model loaded as
/// bf16 takes about its weights' bytes in memory ([`Pretrained::load`]
/// says how many were mapped and how many copied).
///
/// Errors are [`MoeError::Checkpoint`]s naming the file (and the tensor or
/// key), or [`MoeError::Config`] for bad `options`.
pub fn from_pretrained(dir: &Path, options: &LoadOptions) -> Result<Pretrained> {
    let source = HfConfig::read(&dir.join(CONFIG_FILE))?;
    if let Some(kind) = options.dtype {
        float_dtype(kind, "LoadOptions::dtype")?;
    }
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
    let kind = match options.dtype {
        Some(kind) => kind,
        None => checkpoint_dtype(dir)?,
    };
    config.precision = compute_precision(kind, config.precision);
    check_computable(config.precision.kind(), options.device)?;
    let cache_bytes = match options.experts {
        ExpertStorage::Resident => None,
        ExpertStorage::Mapped { cache_bytes } => {
            check_mappable(
                dir,
                source.family,
                &config,
                kind,
                options.device,
                cache_bytes,
            )?;
            Some(cache_bytes)
        }
    };
    if options.quantize_experts.is_some() && config.num_moe_layers() == 0 {
        return Err(MoeError::config(format!(
            "quantize_experts: this {} checkpoint has no routed experts (no MoE layer) to \
             quantise; load it without quantisation",
            source.family.model_type()
        )));
    }
    // Experts to be quantised are read from the files' pages when they can
    // be: the float experts are then never all in memory at once.
    let quantize_from_files = cache_bytes.is_none()
        && options.quantize_experts.is_some()
        && check_mappable(dir, source.family, &config, kind, options.device, u64::MAX).is_ok();
    let mut vs = nn::VarStore::new(options.device);
    vs.set_kind(kind);
    let mut model = moe_core::allocate_only(|| DecoderModel::new(&vs.root(), &config))?;
    let (load, mapped) = load_weights_as(
        dir,
        source.family,
        &config,
        &vs,
        Fill::MapWhereStored {
            experts: cache_bytes.is_some() || quantize_from_files,
        },
    )?;
    let mut residency = match (cache_bytes, quantize_from_files) {
        (Some(bytes), _) => Some(map_experts(&mut model, mapped, bytes)?),
        (None, true) => Some(map_experts(&mut model, mapped, u64::MAX)?),
        (None, false) => None,
    };
    if let Some(q) = options.quantize_experts {
        model.quantize_experts(q)?;
        if quantize_from_files {
            residency = None;
        }
    }
    Ok(Pretrained {
        vs,
        model,
        config,
        generation,
        tokenizer,
        source,
        load,
        residency,
    })
}

/// That the routed experts of `dir` can stay in its files
/// ([`ExpertStorage::Mapped`]): on the CPU, in the files' dtype, with a
/// cache of at least one layer's `top_k` experts, stored so that each
/// expert's matrices are views of the files
/// ([`crate::names::experts_stay_in_files`]).
fn check_mappable(
    dir: &Path,
    family: HfFamily,
    config: &DecoderConfig,
    kind: Kind,
    device: Device,
    cache_bytes: u64,
) -> Result<()> {
    if !crate::names::experts_stay_in_files(family, config) {
        return Err(MoeError::config(format!(
            "model_type `{family}` stores its experts so that they cannot compute from the files \
             in place (gpt-oss interleaves each expert's gate and up columns): load them \
             resident (without an expert cache)"
        )));
    }
    if device != Device::Cpu {
        return Err(MoeError::config(format!(
            "experts left in the checkpoint's files are read through CPU memory maps; \
             {device:?} was asked for: load them resident on that device"
        )));
    }
    let stored = checkpoint_dtype(dir)?;
    if kind != stored {
        return Err(MoeError::config(format!(
            "experts left in the checkpoint's files compute in the files' dtype {stored:?}; \
             {kind:?} was asked for: load with dtype {stored:?} (auto) or resident experts"
        )));
    }
    if config.num_moe_layers() == 0 {
        return Err(MoeError::config(
            "this checkpoint has no routed experts to leave in its files",
        ));
    }
    let matrices = 3 * config.hidden_size * config.expert_width();
    let per_expert = (matrices * kind.elt_size_in_bytes() as i64) as u64;
    let needed = per_expert * config.num_experts_per_tok as u64;
    if cache_bytes < needed {
        return Err(MoeError::config(format!(
            "an expert cache of {cache_bytes} bytes cannot hold one layer's top-{} experts \
             ({needed} bytes, {per_expert} each): give it at least that",
            config.num_experts_per_tok
        )));
    }
    Ok(())
}

/// Hands each MoE layer its routed experts' mapped matrices, counted in
/// one residency of `cache_bytes`.
fn map_experts(
    model: &mut DecoderModel,
    mut mapped: MappedExpertMatrices,
    cache_bytes: u64,
) -> Result<ExpertResidency> {
    let residency = ExpertResidency::new(cache_bytes);
    for (i, layer) in model.layers_mut().iter_mut().enumerate() {
        let FeedForward::Moe(moe) = layer.feed_forward_network_mut() else {
            continue;
        };
        let bank = moe.experts_mut();
        let mut take = |name: &str| -> Result<Option<Vec<Tensor>>> {
            let var = format!("model.layers.{i}.mlp.experts.{name}");
            let Some(list) = mapped.remove(&var) else {
                return Ok(None);
            };
            list.into_iter()
                .enumerate()
                .map(|(e, t)| {
                    t.ok_or_else(|| {
                        MoeError::config(format!("expert {e} of `{var}` was not mapped"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        };
        let missing = || MoeError::config(format!("layer {i}: its routed experts were not mapped"));
        let w_in = take("w_in")?.ok_or_else(missing)?;
        let w_gate = take("w_gate")?;
        let w_out = take("w_out")?.ok_or_else(missing)?;
        bank.map_experts(w_in, w_gate, w_out, &residency, i)?;
    }
    Ok(residency)
}

/// That `device` multiplies matrices in `kind` (a GPU before Ampere has
/// no bf16 products, for one): a 2 x 2 product tried there, so that a
/// model is not loaded only to fail at its first token.
fn check_computable(kind: Kind, device: Device) -> Result<()> {
    let tried = Tensor::f_ones([2, 2], (kind, device)).and_then(|a| a.f_matmul(&a));
    tried.map(|_| ()).map_err(|e| {
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default();
        MoeError::config(format!(
            "this {device:?} device cannot compute in {kind:?} ({first}); load with another \
             LoadOptions::dtype (`--dtype`): Float works everywhere, BFloat16 on CPUs and on \
             GPUs from compute capability 8.0"
        ))
    })
}

/// The floating-point dtype holding most of the weight bytes of `dir`
/// (read from the safetensors headers): what `dtype="auto"` loads.
pub fn checkpoint_dtype(dir: &Path) -> Result<Kind> {
    let mut bytes: Vec<(Kind, usize)> = Vec::new();
    for size in tensor_sizes(dir)? {
        let Some(kind) = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double]
            .into_iter()
            .find(|&k| dtype_of(k) == Some(size.dtype))
        else {
            continue;
        };
        match bytes.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, total)) => *total += size.bytes,
            None => bytes.push((kind, size.bytes)),
        }
    }
    bytes
        .into_iter()
        .max_by_key(|&(_, total)| total)
        .map(|(kind, _)| kind)
        .ok_or_else(|| MoeError::Checkpoint {
            path: dir.to_path_buf(),
            reason: "no floating-point tensor in the weights: cannot tell their dtype".into(),
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
