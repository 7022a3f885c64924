//! [`RunArgs`]: the flags every training program shares, and the one order
//! in which a run's config is resolved from them: the config file (or the
//! program's base config), the training flags, the program's own flags (a
//! preset that replaces the model), the model and tokenizer flags, then
//! `--set` overrides of any field ([`RunConfig::with_overrides`]).

use crate::RunConfig;
use moe_core::{DeviceChoice, Precision, Result, WeightInit};
use moe_data::TokenizerKind;
use moe_models::CommonModelSettings;
use std::path::PathBuf;

/// The flags of a training program that every one of them has (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// TOML or JSON file with the model, train and tokenizer tables
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the resolved config (TOML) and exit
    #[arg(long)]
    pub print_config: bool,
    /// Set any field of the config, after the file and the flags:
    /// `--set train.max_iters=100 --set model.router.n_group=4` (a path as
    /// --print-config shows it, a TOML value; repeatable)
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Optimisation steps
    #[arg(long)]
    pub max_iters: Option<i64>,
    /// Evaluate both splits every this many steps
    #[arg(long)]
    pub eval_interval: Option<i64>,
    /// Batches per split in each evaluation
    #[arg(long)]
    pub eval_iters: Option<i64>,
    /// Sequences per batch
    #[arg(long)]
    pub batch_size: Option<i64>,
    /// Peak learning rate
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of libtorch's generator (weights, batches, dropout, router noise)
    #[arg(long)]
    pub seed: Option<i64>,
    /// Where to train
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Context length (makeMoE's block_size, the decoder's max_position_embeddings)
    #[arg(long)]
    pub block_size: Option<i64>,
    /// Weight initialisation
    #[arg(long, value_enum)]
    pub init: Option<WeightInit>,
    /// Compute dtype of attention and experts (mixed precision; parameters
    /// stay f32)
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// auto, mask_loop, indexed_loop, grouped, capacity:FACTOR or
    /// dense_reference; capacity:FACTOR also sets the router's capacity
    /// factor (capacity alone: 1.25)
    #[arg(long)]
    pub dispatch: Option<String>,
    /// The tokenizer trained on the corpus
    #[arg(long, value_enum)]
    pub tokenizer: Option<TokenizerKind>,
    /// Vocabulary size of the BPE tokenizer
    #[arg(long)]
    pub vocab_size: Option<usize>,
}

impl RunArgs {
    /// The run's config: `--config`'s file, else `base`; then the training
    /// flags; then the program's own flags (`program_flags`); then the
    /// model's and the tokenizer's flags; then the `--set` overrides.
    pub fn resolve(
        &self,
        base: impl FnOnce() -> RunConfig,
        program_flags: impl FnOnce(&mut RunConfig) -> Result<()>,
    ) -> Result<RunConfig> {
        let mut config = match &self.config {
            Some(path) => RunConfig::from_file(path)?,
            None => base(),
        };
        let t = &mut config.train;
        let set = |dst: &mut i64, src: Option<i64>| *dst = src.unwrap_or(*dst);
        set(&mut t.max_iters, self.max_iters);
        set(&mut t.eval_interval, self.eval_interval);
        set(&mut t.eval_iters, self.eval_iters);
        set(&mut t.batch_size, self.batch_size);
        set(&mut t.seed, self.seed);
        t.learning_rate = self.lr.unwrap_or(t.learning_rate);
        program_flags(&mut config)?;
        config.model.set_common(&CommonModelSettings {
            max_context: self.block_size,
            init: self.init,
            precision: self.precision,
            dispatch: self.dispatch.as_deref().map(str::parse).transpose()?,
        });
        let tokenizer = &mut config.tokenizer;
        tokenizer.kind = self.tokenizer.unwrap_or(tokenizer.kind);
        tokenizer.vocab_size = self.vocab_size.unwrap_or(tokenizer.vocab_size);
        config.with_overrides(&self.set)
    }
}
