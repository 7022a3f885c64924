//! [`Run`]: the training recipe a program shares with every other, written
//! once. From a [`RunConfig`] and a corpus: the tokenizer (trained on the
//! corpus as the config says, or the resumed run's), the config completed
//! with its vocabulary and validated ([`Run::prepare`]); then the seeded
//! model (under expert parallelism each rank takes its share of the model
//! one process would draw), the dataset, the trainer with its topology and
//! checkpoints, the resume, and the run to `max_iters` with every event
//! handed to the caller's sinks ([`PreparedRun::train`]).

use crate::RunConfig;
use moe_core::Result;
use moe_data::{Dataset, Tokenizer};
use moe_dispatch::ExpertParallelism;
use moe_models::CausalLm;
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

    /// The tokenizer of the run, trained on `corpus` (or the resumed run's,
    /// with its model), and the config completed with its vocabulary and
    /// validated.
    pub fn prepare(mut self, corpus: &str) -> Result<PreparedRun> {
        let (tokenizer, first_step) = match &self.resume {
            Some(dir) => {
                let meta = load_checkpoint_meta(dir)?;
                self.config.model = meta.model;
                (meta.tokenizer, meta.step)
            }
            None => (Tokenizer::train(corpus, &self.config.tokenizer)?, 0),
        };
        self.config.model.set_vocab_size(tokenizer.vocab_size());
        self.config.model.validate()?;
        self.config.train.validate()?;
        Ok(PreparedRun {
            run: self,
            tokenizer,
            first_step,
        })
    }
}

/// A run whose config is complete ([`Run::prepare`]).
#[derive(Debug)]
pub struct PreparedRun {
    run: Run,
    tokenizer: Tokenizer,
    first_step: i64,
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

    /// Builds the model, the dataset of `corpus` and the trainer, resumes,
    /// and trains to `max_iters`, handing every event to `on_event` (on
    /// the reporting process, [`Self::reports`]). A failed step, save or
    /// sink stops the run with its error.
    pub fn train(
        self,
        corpus: &str,
        on_event: impl FnMut(&TrainEvent) -> Result<()>,
    ) -> Result<TrainedRun> {
        let PreparedRun { run, tokenizer, .. } = self;
        let (model_config, train) = (&run.config.model, &run.config.train);
        tch::manual_seed(train.seed);
        let vs = nn::VarStore::new(run.device);
        let model = model_config.build_with(&vs.root(), run.parallelism.as_ref())?;
        let data_parallel = run
            .parallelism
            .as_ref()
            .map(|p| DataParallel::new(p.group.clone(), &vs, model.as_ref()));
        if let Some(data_parallel) = &data_parallel {
            // Every rank starts from the model one process would draw: the
            // whole model with the same seed, of which each rank takes its share.
            tch::manual_seed(train.seed);
            let whole = nn::VarStore::new(run.device);
            model_config.build(&whole.root())?;
            data_parallel.copy_from_whole(&whole, &vs)?;
        }
        let data = Dataset::new(
            &tokenizer.encode(corpus)?,
            tokenizer.vocab_size(),
            train.train_fraction,
            model_config.max_context(),
            run.device,
        )?;
        let mut trainer = Trainer::new(&vs, model.as_ref(), &data, train.clone())?;
        if let Some(dir) = &run.out {
            trainer = trainer.with_checkpointing(Checkpointing {
                dir: dir.clone(),
                interval: run.checkpoint_interval.unwrap_or(train.max_iters.max(1)),
                tokenizer: tokenizer.clone(),
            })?;
        }
        if let Some(data_parallel) = data_parallel {
            trainer = trainer.with_data_parallel(data_parallel)?;
        }
        if let Some(ranks) = run.simulated_ranks {
            trainer = trainer.with_simulated_ranks(ranks)?;
        }
        if let Some(dir) = &run.resume {
            trainer.resume(dir)?;
        }
        let last_eval = trainer.run(on_event)?;
        let steps = trainer.steps_done();
        drop(trainer);
        Ok(TrainedRun {
            vs,
            model,
            tokenizer,
            steps,
            last_eval,
        })
    }
}
