//! [`Run`]: the training recipe a program shares with every other, written
//! once. From a [`RunConfig`] and a corpus: the tokenizer (trained on the
//! corpus as the config says, the caller's, or the resumed run's), the
//! config completed with its vocabulary and validated ([`Run::prepare`]);
//! then the seeded model (under expert parallelism each rank draws only its
//! share of the model one process would draw) or the caller's, and the
//! dataset ([`PreparedRun::build`]); the trainer with its topology and
//! checkpoints, resumed ([`BuiltRun::trainer`]); and the run to `max_iters`
//! with every event handed to the caller's sinks ([`BuiltRun::train`], or
//! [`PreparedRun::train`] for all of it). A benchmark or a search that
//! drives the steps itself takes the trainer; every other program trains.

use crate::RunConfig;
use moe_core::{Checked, Result};
use moe_data::{Dataset, Tokenizer};
use moe_dispatch::ExpertParallelism;
use moe_models::{CausalLm, LmConfig};
use moe_train::{
    load_checkpoint_meta, Checkpointing, DataParallel, EvalLosses, TrainEvent, Trainer,
};
use std::path::PathBuf;
use tch::{nn, Device};

/// A training run's settings beside its config: where it runs, where its
/// checkpoints go, what it resumes.
#[derive(Debug)]
pub struct Run {
    config: RunConfig,
    device: Device,
    out: Option<PathBuf>,
    checkpoint_interval: Option<i64>,
    resume: Option<PathBuf>,
    parallelism: Option<ExpertParallelism>,
    simulated_ranks: Option<i64>,
    tokenizer: Option<Tokenizer>,
}

impl Run {
    /// A run of `config` on the CPU, without checkpoints.
    pub fn new(config: RunConfig) -> Self {
        Run {
            config,
            device: Device::Cpu,
            out: None,
            checkpoint_interval: None,
            resume: None,
            parallelism: None,
            simulated_ranks: None,
            tokenizer: None,
        }
    }

    /// Encodes the corpus with `tokenizer` instead of training one on it
    /// (a pretrained model's, say).
    pub fn tokenizer(self, tokenizer: Tokenizer) -> Self {
        Run {
            tokenizer: Some(tokenizer),
            ..self
        }
    }

    /// Trains on `device`.
    pub fn device(self, device: Device) -> Self {
        Run { device, ..self }
    }

    /// Saves a resumable checkpoint in `dir` every `interval` steps (`None`:
    /// at the end only) and after the last step.
    pub fn checkpoints(self, dir: impl Into<PathBuf>, interval: Option<i64>) -> Self {
        Run {
            out: Some(dir.into()),
            checkpoint_interval: interval,
            ..self
        }
    }

    /// Continues the run saved in `dir` (`None`: starts anew): its model and
    /// tokenizer, this config's training.
    pub fn resume(self, dir: Option<PathBuf>) -> Self {
        Run {
            resume: dir,
            ..self
        }
    }

    /// Trains as one rank of `parallelism`'s group (`None`: one process):
    /// the experts spread over the ranks, everything else data-parallel.
    pub fn expert_parallel(self, parallelism: Option<ExpertParallelism>) -> Self {
        Run {
            parallelism,
            ..self
        }
    }

    /// One process computing what `ranks` ranks compute (`None`: off).
    pub fn simulated_ranks(self, ranks: Option<i64>) -> Self {
        Run {
            simulated_ranks: ranks,
            ..self
        }
    }

    /// [`Run::prepare`] and [`PreparedRun::build`] on `corpus`: the run
    /// with its model and dataset, for a program that drives the steps.
    pub fn build(self, corpus: &str) -> Result<BuiltRun> {
        self.prepare(corpus)?.build(corpus)
    }

    /// The tokenizer of the run, trained on `corpus` (or the one given to
    /// [`Run::tokenizer`], or the resumed run's, with its model), and the
    /// config completed with its vocabulary and validated.
    pub fn prepare(mut self, corpus: &str) -> Result<PreparedRun> {
        let (tokenizer, first_step) = match (&self.resume, self.tokenizer.take()) {
            (Some(dir), _) => {
                let meta = load_checkpoint_meta(dir)?;
                self.config.model = meta.model;
                (meta.tokenizer, meta.step)
            }
            (None, Some(tokenizer)) => (tokenizer, 0),
            (None, None) => (Tokenizer::train(corpus, &self.config.tokenizer)?, 0),
        };
        self.config.model.set_vocab_size(tokenizer.vocab_size());
        // The one check of the model's config: the model takes it checked.
        let model = Checked::new(self.config.model.clone())?;
        self.config.train.validate()?;
        Ok(PreparedRun {
            run: self,
            model,
            tokenizer,
            first_step,
        })
    }
}

/// A run whose config is complete ([`Run::prepare`]).
#[derive(Debug)]
pub struct PreparedRun {
    run: Run,
    model: Checked<LmConfig>,
    tokenizer: Tokenizer,
    first_step: i64,
}

/// A run with its model and dataset ([`PreparedRun::build`]), ready to
/// train.
pub struct BuiltRun {
    /// The parameters (under expert parallelism, this rank's share of the
    /// experts).
    pub vs: nn::VarStore,
    /// The model, in `vs`.
    pub model: Box<dyn CausalLm>,
    /// The corpus, tokenized and split.
    pub data: Dataset,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    run: Run,
}

/// What a run leaves: its model (in `vs`) and tokenizer, the steps done.
pub struct TrainedRun {
    /// The parameters.
    pub vs: nn::VarStore,
    /// The model, in `vs`.
    pub model: Box<dyn CausalLm>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Optimisation steps done (those before a resume included).
    pub steps: i64,
    /// The losses of the last evaluation.
    pub last_eval: Option<EvalLosses>,
}

impl PreparedRun {
    /// The complete config.
    pub fn config(&self) -> &RunConfig {
        &self.run.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Whether this process reports the run's events (rank 0, or the one
    /// process).
    pub fn reports(&self) -> bool {
        self.run.parallelism.as_ref().is_none_or(|p| p.rank() == 0)
    }

    /// The saved run it continues, if any.
    pub fn resumes(&self) -> Option<&std::path::Path> {
        self.run.resume.as_deref()
    }

    /// The step it starts at: the saved run's, or 0.
    pub fn first_step(&self) -> i64 {
        self.first_step
    }

    /// Draws the model with the run's seed (under expert parallelism each
    /// rank draws its share only: the replicated variables whole, its
    /// experts as rows of the banks one process draws) and tokenizes
    /// `corpus` into the dataset.
    pub fn build(self, corpus: &str) -> Result<BuiltRun> {
        let run = &self.run;
        tch::manual_seed(run.config.train.seed);
        let vs = nn::VarStore::new(run.device);
        let model = LmConfig::build_with(&self.model, &vs.root(), run.parallelism.as_ref())?;
        self.build_from(vs, model, corpus)
    }

    /// The run of a model the caller built in `vs` (converted, loaded):
    /// the config's model becomes the model's own; the corpus is tokenized
    /// into the dataset. Under expert parallelism `model` must be this
    /// rank's share, built with the run's `ExpertParallelism` (as
    /// [`PreparedRun::build`] builds it).
    pub fn build_from(
        self,
        vs: nn::VarStore,
        model: Box<dyn CausalLm>,
        corpus: &str,
    ) -> Result<BuiltRun> {
        let PreparedRun {
            mut run, tokenizer, ..
        } = self;
        run.config.model = model.lm_config();
        let data = Dataset::new(
            &tokenizer.encode(corpus)?,
            tokenizer.vocab_size(),
            run.config.train.train_fraction,
            run.config.model.max_context(),
            run.device,
        )?;
        Ok(BuiltRun {
            vs,
            model,
            data,
            tokenizer,
            run,
        })
    }

    /// Builds the model and the dataset of `corpus` and trains
    /// ([`PreparedRun::build`], [`BuiltRun::train`]).
    pub fn train(
        self,
        corpus: &str,
        on_event: impl FnMut(&TrainEvent) -> Result<()>,
    ) -> Result<TrainedRun> {
        self.build(corpus)?.train(on_event)
    }
}

impl BuiltRun {
    /// The complete config (the model's own after
    /// [`PreparedRun::build_from`]).
    pub fn config(&self) -> &RunConfig {
        &self.run.config
    }

    /// The trainer of the run: its topology (one process, a rank of the
    /// expert-parallel group, or simulated ranks), its checkpoints, and the
    /// saved run's weights and optimizer state when it resumes.
    pub fn trainer(&self) -> Result<Trainer<'_, dyn CausalLm>> {
        let (run, train) = (&self.run, &self.run.config.train);
        let mut trainer = Trainer::new(&self.vs, self.model.as_ref(), &self.data, train.clone())?;
        if let Some(dir) = &run.out {
            trainer = trainer.with_checkpointing(Checkpointing {
                dir: dir.clone(),
                interval: run.checkpoint_interval.unwrap_or(train.max_iters.max(1)),
                tokenizer: self.tokenizer.clone(),
            })?;
        }
        if let Some(parallelism) = &run.parallelism {
            let group = parallelism.group.clone();
            let data_parallel = DataParallel::new(group, &self.vs, self.model.as_ref());
            trainer = trainer.with_data_parallel(data_parallel)?;
        }
        if let Some(ranks) = run.simulated_ranks {
            trainer = trainer.with_simulated_ranks(ranks)?;
        }
        if let Some(dir) = &run.resume {
            trainer.resume(dir)?;
        }
        Ok(trainer)
    }

    /// Trains to `max_iters`, handing every event to `on_event` (on the
    /// reporting process, [`PreparedRun::reports`]). A failed step, save or
    /// sink stops the run with its error.
    pub fn train(self, on_event: impl FnMut(&TrainEvent) -> Result<()>) -> Result<TrainedRun> {
        let (last_eval, steps) = {
            let mut trainer = self.trainer()?;
            (trainer.run(on_event)?, trainer.steps_done())
        };
        Ok(TrainedRun {
            vs: self.vs,
            model: self.model,
            tokenizer: self.tokenizer,
            steps,
            last_eval,
        })
    }
}
