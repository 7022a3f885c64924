//! What a checkpoint folder needs in memory, read from `config.json` and
//! the weight files' headers alone (no weight is loaded): the memory plan
//! of seed 003, for choosing a dtype and a context before loading.

use crate::pretrained::{compute_precision, CONFIG_FILE};
use crate::weights::tensor_sizes;
use crate::{HfConfig, HfFamily};
use moe_core::{MoeError, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use tch::Kind;

/// The memory a checkpoint needs, before loading it ([`memory_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The checkpoint's family.
    pub family: HfFamily,
    /// Parameters in the weight files (every tensor of every shard).
    pub total_params: i64,
    /// Parameters one token passes through: the total less the routed
    /// experts a token does not use in each MoE layer
    /// ([`moe_models::DecoderConfig::active_params`]).
    pub active_params: i64,
    /// Bytes in the files by dtype name (`BF16`, `F32`, ...), as stored.
    pub file_bytes: BTreeMap<String, u64>,
    /// The dtype the parameters are planned in.
    pub dtype: Kind,
    /// The parameters' bytes in that dtype.
    pub weight_bytes: u64,
    /// Bytes one token of one sequence adds to the KV cache over every layer
    /// (keys and values, or MLA's latents), in the compute dtype of the
    /// planned one (f32 for f16 parameters, see [`crate::from_pretrained`]).
    pub kv_bytes_per_token: u64,
    /// The context the plan is for (`max_position_embeddings`).
    pub context: i64,
}

impl MemoryPlan {
    /// The KV cache of `batch` sequences of the whole context.
    pub fn kv_bytes_at_context(&self, batch: i64) -> u64 {
        self.kv_bytes_per_token * (self.context.max(0) as u64) * (batch.max(0) as u64)
    }

    /// Weights plus the KV cache of one sequence of the whole context.
    pub fn resident_bytes(&self) -> u64 {
        self.weight_bytes + self.kv_bytes_at_context(1)
    }

    /// Whether [`MemoryPlan::resident_bytes`] fit in `budget` bytes.
    pub fn fits(&self, budget: u64) -> bool {
        self.resident_bytes() <= budget
    }

    /// One line: what the plan needs ([`MemoryPlan::resident_bytes`]) of
    /// `budget` bytes, and whether it fits.
    pub fn verdict(&self, budget: u64) -> String {
        format!(
            "needs:               {:.2} GiB (weights and one sequence's KV cache at the full \
             context) of {:.2} GiB: {}",
            self.resident_bytes() as f64 / GIB,
            budget as f64 / GIB,
            if self.fits(budget) {
                "fits"
            } else {
                "does not fit"
            }
        )
    }

    /// Bytes a decoded token reads at least (every active weight once):
    /// with a memory bandwidth in bytes/s, the floor of its time.
    pub fn active_bytes(&self) -> u64 {
        self.active_params as u64 * self.dtype.elt_size_in_bytes() as u64
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The memory this machine has available, bytes (`/proc/meminfo`'s
/// `MemAvailable`; `None` where there is none to read).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: u64| b as f64 / GIB;
        writeln!(f, "family:              {}", self.family.model_type())?;
        writeln!(
            f,
            "parameters:          {} total ({:.3} B), {} active per token ({:.3} B)",
            self.total_params,
            self.total_params as f64 / 1e9,
            self.active_params,
            self.active_params as f64 / 1e9
        )?;
        let files: Vec<String> = self
            .file_bytes
            .iter()
            .map(|(dtype, bytes)| format!("{dtype} {:.2} GiB", gib(*bytes)))
            .collect();
        writeln!(f, "in the files:        {}", files.join(", "))?;
        writeln!(
            f,
            "weights as {:?}: {:.2} GiB; a decoded token reads >= {:.2} GiB of them",
            self.dtype,
            gib(self.weight_bytes),
            gib(self.active_bytes())
        )?;
        write!(
            f,
            "KV cache:            {} bytes per token, {:.2} GiB at the context of {} tokens",
            self.kv_bytes_per_token,
            gib(self.kv_bytes_at_context(1)),
            self.context
        )
    }
}

/// The [`MemoryPlan`] of the checkpoint folder `dir` with its parameters
/// in `dtype` (`None`: the dtype of its files, as transformers'
/// `dtype="auto"`: the dtype holding most of their bytes), read from `config.json` and
/// the safetensors headers. `ignore_keys` are `config.json` keys to accept
/// unread, as [`crate::LoadOptions::ignore_keys`]. Errors are those of
/// [`crate::from_pretrained`] for the same files.
pub fn memory_plan(dir: &Path, dtype: Option<Kind>, ignore_keys: &[String]) -> Result<MemoryPlan> {
    let source = HfConfig::read(&dir.join(CONFIG_FILE))?;
    let config = source.to_decoder(ignore_keys)?;
    // What loading skips (another tower, multi-token-prediction layers)
    // is not planned.
    let sizes: Vec<_> = tensor_sizes(dir)?
        .into_iter()
        .filter(|s| !crate::names::ignorable(&s.name, source.family, &config))
        .collect();
    let total_params: usize = sizes.iter().map(|s| s.params).sum();
    let mut file_bytes: BTreeMap<String, u64> = BTreeMap::new();
    for s in &sizes {
        *file_bytes.entry(format!("{:?}", s.dtype)).or_default() += s.bytes as u64;
    }
    let dtype = match dtype {
        Some(kind) => kind,
        None => crate::checkpoint_dtype(dir)?,
    };
    if !matches!(
        dtype,
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
    ) {
        return Err(MoeError::config(format!(
            "a memory plan in {dtype:?}: expected a floating-point dtype (Float, Half, \
             BFloat16 or Double)"
        )));
    }
    let bytes = dtype.elt_size_in_bytes() as u64;
    // The cache holds what attention computes, in the compute dtype.
    let cached = compute_precision(dtype, config.precision)
        .kind()
        .elt_size_in_bytes() as i64;
    let per_layer = match config.latent_attention_config() {
        Some(mla) => mla.kv_cache_bytes_per_token(cached),
        None => config.attention_config().kv_cache_bytes_per_token(cached),
    };
    let total_params = total_params as i64;
    Ok(MemoryPlan {
        family: source.family,
        total_params,
        active_params: config.active_params(total_params),
        file_bytes,
        dtype,
        weight_bytes: total_params as u64 * bytes,
        kv_bytes_per_token: (per_layer * config.num_hidden_layers) as u64,
        context: config.max_position_embeddings,
    })
}
