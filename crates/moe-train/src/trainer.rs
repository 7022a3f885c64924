use crate::checkpoint::{
    config_differences, copy_into, load_checkpoint_meta, named_variables, read_weights, save_files,
    CONFIG_FILE, OPTIMIZER_FILE,
};
use crate::{AdamW, AdamWConfig, CheckpointMeta, TrainConfig};
use moe_core::{MoeError, Result};
use moe_data::{Dataset, Split, Tokenizer};
use moe_models::CausalLm;
use moe_routers::RoutingStats;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Kind, Tensor};

/// Mean loss of each split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalLosses {
    pub train: f64,
    pub val: f64,
}

/// What the training loop reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrainEvent {
    /// Every `log_interval` steps: the loss of the last step and the speed
    /// of the steps since the start (evaluation excluded).
    Step {
        step: i64,
        loss: f64,
        ms_per_step: f64,
        tokens_per_s: f64,
        /// Seconds left, training and remaining evaluations included.
        eta_s: f64,
    },
    /// Every `eval_interval` steps and at the last step, before that step trains.
    Eval {
        step: i64,
        losses: EvalLosses,
        ms_per_step: f64,
        tokens_per_s: f64,
        eval_s: f64,
    },
}

/// Wall-clock seconds spent in each phase of [`Trainer::step`], summed over
/// the steps timed since [`Trainer::time_phases`] was called. On CUDA the
/// device is synchronised at each phase boundary, which itself costs time:
/// use it to see where a step goes, not to measure the step.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepPhases {
    pub steps: i64,
    /// Sampling the batch (and re-seeding).
    pub batch_s: f64,
    /// Forward pass and losses.
    pub forward_s: f64,
    /// `backward()`.
    pub backward_s: f64,
    /// Zeroing gradients, the AdamW update and the model's post-step hook.
    pub optimizer_s: f64,
}

/// Number of trainable parameters.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// makeMoE's `estimate_loss`: the mean cross-entropy (balance losses
/// excluded, so that runs with and without them compare) over `eval_iters` random
/// batches of each split, in evaluation mode and without gradients. The
/// batches are stacked into forward passes of up to `eval_rows` sequences
/// (same expectation, far fewer kernel launches) and the sum is read back
/// once per split.
pub fn estimate_loss<M: CausalLm + ?Sized>(
    model: &M,
    data: &Dataset,
    config: &TrainConfig,
) -> Result<EvalLosses> {
    let per_chunk = (config.eval_rows / config.batch_size).max(1);
    let mean = |split: Split| -> Result<f64> {
        tch::no_grad(|| {
            let mut total = Tensor::zeros([], (Kind::Float, model.device()));
            let mut done = 0;
            while done < config.eval_iters {
                let batches = per_chunk.min(config.eval_iters - done);
                let batch = data.batch(split, batches * config.batch_size);
                total += model
                    .batch_objective(&batch.x, &batch.y, false)?
                    .cross_entropy
                    * batches as f64;
                done += batches;
            }
            Ok(total.double_value(&[]) / config.eval_iters as f64)
        })
    };
    Ok(EvalLosses {
        train: mean(Split::Train)?,
        val: mean(Split::Val)?,
    })
}

/// Routing statistics of each MoE layer over one evaluation-mode forward
/// pass of `min(eval_rows, eval_iters * batch_size)` random validation sequences.
pub fn estimate_routing_stats<M: CausalLm + ?Sized>(
    model: &M,
    data: &Dataset,
    config: &TrainConfig,
) -> Result<Vec<RoutingStats>> {
    let rows = config.eval_rows.min(config.eval_iters * config.batch_size);
    model.routing_stats(&data.batch(Split::Val, rows).x)
}

/// Where and how often [`Trainer::run`] saves training checkpoints.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// The folder; each save replaces its files atomically.
    pub dir: PathBuf,
    /// Save every this many steps, and after the last step.
    pub interval: i64,
    /// Saved in `config.json` so that the checkpoint can generate text.
    pub tokenizer: Tokenizer,
}

/// nanoGPT's training loop: AdamW on random batches, with periodic
/// evaluation of both splits and, optionally, periodic checkpoints.
///
/// Randomness: step `s` (counted from 0) re-seeds libtorch's generators
/// with `seed + s` before it draws its batch, dropout masks and router
/// noise. A run resumed from a checkpoint at step `s` therefore draws
/// exactly what the uninterrupted run draws, without saving generator state.
pub struct Trainer<'a, M: CausalLm + ?Sized> {
    model: &'a M,
    data: &'a Dataset,
    config: TrainConfig,
    optimizer: AdamW,
    variables: Vec<(String, Tensor)>,
    step: i64,
    checkpointing: Option<Checkpointing>,
    /// Sum of the training losses not yet checked for finiteness (read
    /// back at logging and checkpoint times only, to avoid a sync per step).
    unchecked_loss: Option<Tensor>,
    last_saved: Option<i64>,
    phases: Option<StepPhases>,
}

impl<'a, M: CausalLm + ?Sized> Trainer<'a, M> {
    /// [`AdamW`] with PyTorch's defaults (betas 0.9/0.999, eps 1e-8) and
    /// `config`'s learning rate and weight decay, over every trainable
    /// variable of `vs`.
    pub fn new(
        vs: &nn::VarStore,
        model: &'a M,
        data: &'a Dataset,
        config: TrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        if data.block_size() > model.max_context() {
            return Err(MoeError::config(format!(
                "the dataset's sequences ({} tokens) are longer than the model's context ({})",
                data.block_size(),
                model.max_context()
            )));
        }
        let optimizer = AdamW::new(
            vs,
            AdamWConfig {
                lr: config.learning_rate,
                weight_decay: config.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Trainer {
            model,
            data,
            config,
            optimizer,
            variables: named_variables(vs),
            step: 0,
            checkpointing: None,
            unchecked_loss: None,
            last_saved: None,
            phases: None,
        })
    }

    /// Saves a training checkpoint every `checkpointing.interval` steps.
    pub fn with_checkpointing(mut self, checkpointing: Checkpointing) -> Result<Self> {
        if checkpointing.interval <= 0 {
            return Err(MoeError::config(format!(
                "the checkpoint interval must be positive, got {}",
                checkpointing.interval
            )));
        }
        if checkpointing.tokenizer.vocab_size() != self.model.vocab_size() {
            return Err(MoeError::config(format!(
                "the tokenizer has {} tokens, the model's vocab_size is {}",
                checkpointing.tokenizer.vocab_size(),
                self.model.vocab_size()
            )));
        }
        self.checkpointing = Some(checkpointing);
        Ok(self)
    }

    /// Optimisation steps taken so far (including those before a resume).
    pub fn steps_done(&self) -> i64 {
        self.step
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Starts (or restarts from zero) timing the phases of each step.
    pub fn time_phases(&mut self) {
        self.phases = Some(StepPhases::default());
    }

    /// The phase times since [`Trainer::time_phases`], if it was called.
    pub fn phases(&self) -> Option<StepPhases> {
        self.phases
    }

    /// One optimisation step on a fresh training batch; returns the loss
    /// tensor, balance losses included (not read back, so no host
    /// synchronisation). After the optimizer step, the model's
    /// [`CausalLm::after_optimizer_step`] hook sees the step's routings.
    pub fn step(&mut self) -> Result<Tensor> {
        let mut clock = self.phases.map(|_| PhaseClock::start(self.model.device()));
        tch::manual_seed(self.config.seed + self.step);
        let batch = self.data.batch(Split::Train, self.config.batch_size);
        let batch_s = clock.as_mut().map(PhaseClock::lap);
        let objective = self.model.batch_objective(&batch.x, &batch.y, true)?;
        let forward_s = clock.as_mut().map(PhaseClock::lap);
        self.optimizer.zero_grad()?;
        objective.total.backward();
        let backward_s = clock.as_mut().map(PhaseClock::lap);
        self.optimizer.step()?;
        self.model.after_optimizer_step(&objective.routings)?;
        let optimizer_s = clock.as_mut().map(PhaseClock::lap);
        if let Some(phases) = self.phases.as_mut() {
            phases.steps += 1;
            phases.batch_s += batch_s.unwrap_or(0.0);
            phases.forward_s += forward_s.unwrap_or(0.0);
            phases.backward_s += backward_s.unwrap_or(0.0);
            phases.optimizer_s += optimizer_s.unwrap_or(0.0);
        }
        self.step += 1;
        let detached = objective.total.detach();
        self.unchecked_loss = Some(match self.unchecked_loss.take() {
            Some(sum) => sum + &detached,
            None => detached,
        });
        Ok(objective.total)
    }

    /// Writes a training checkpoint (weights, optimizer state, configs,
    /// step) to `dir`, after checking that no loss since the last check and
    /// no parameter is NaN or infinite.
    pub fn save_checkpoint(&mut self, dir: &Path, tokenizer: &Tokenizer) -> Result<()> {
        self.check_losses()?;
        self.check_parameters()?;
        let meta = CheckpointMeta {
            model: self.model.lm_config(),
            tokenizer: tokenizer.clone(),
            train: Some(self.config.clone()),
            step: self.step,
        };
        save_files(dir, &self.variables, Some(&self.optimizer), &meta)?;
        self.last_saved = Some(self.step);
        Ok(())
    }

    /// Continues from a training checkpoint written by
    /// [`Trainer::save_checkpoint`]: weights, optimizer state and step. The
    /// checkpoint's model config must equal this model's. Everything is read
    /// and checked before anything is changed.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let meta = load_checkpoint_meta(dir)?;
        let diffs = config_differences(&meta.model, &self.model.lm_config());
        if !diffs.is_empty() {
            return Err(MoeError::Checkpoint {
                path: dir.join(CONFIG_FILE),
                reason: format!(
                    "the checkpoint's model config differs from this model's: {}",
                    diffs.join(", ")
                ),
            });
        }
        let weights = read_weights(dir, &self.variables)?;
        let optimizer_path = dir.join(OPTIMIZER_FILE);
        let state = self.optimizer.read_state(&optimizer_path)?;
        if state.steps() != meta.step {
            return Err(MoeError::Checkpoint {
                path: optimizer_path,
                reason: format!(
                    "the optimizer state is from step {} but {CONFIG_FILE} says step {} \
                     (an interrupted save?)",
                    state.steps(),
                    meta.step
                ),
            });
        }
        copy_into(&self.variables, weights);
        self.optimizer.apply_state(state);
        self.step = meta.step;
        self.unchecked_loss = None;
        self.last_saved = Some(meta.step);
        Ok(())
    }

    /// Runs from the current step to `max_iters`, reporting through
    /// `on_event`; returns the losses of the last evaluation.
    pub fn run(&mut self, mut on_event: impl FnMut(&TrainEvent)) -> Result<Option<EvalLosses>> {
        self.run_inner(false, |event, _| on_event(event))
    }

    /// [`Trainer::run`], also computing [`estimate_routing_stats`] at each
    /// evaluation and passing them (one per layer) with the `Eval` event;
    /// `None` with `Step` events. For `metrics.jsonl`.
    pub fn run_with_routing_stats(
        &mut self,
        on_event: impl FnMut(&TrainEvent, Option<&[RoutingStats]>),
    ) -> Result<Option<EvalLosses>> {
        self.run_inner(true, on_event)
    }

    fn run_inner(
        &mut self,
        with_stats: bool,
        mut on_event: impl FnMut(&TrainEvent, Option<&[RoutingStats]>),
    ) -> Result<Option<EvalLosses>> {
        let cfg = self.config.clone();
        let tokens_per_step = (cfg.batch_size * self.data.block_size()) as f64;
        let first = self.step;
        let last_step = (cfg.max_iters - 1).max(0);
        let evals_total = (first..cfg.max_iters)
            .filter(|s| s % cfg.eval_interval == 0 || *s == last_step)
            .count() as i64;
        let (mut train_s, mut eval_s_total, mut evals_done) = (0.0f64, 0.0f64, 0i64);
        let mut last = None;
        let speed = |steps: i64, secs: f64| {
            let ms = if steps > 0 {
                1e3 * secs / steps as f64
            } else {
                0.0
            };
            let tps = if secs > 0.0 {
                tokens_per_step * steps as f64 / secs
            } else {
                0.0
            };
            (ms, tps)
        };
        for step in first..cfg.max_iters {
            if step % cfg.eval_interval == 0 || step == cfg.max_iters - 1 {
                let started = Instant::now();
                let losses = estimate_loss(self.model, self.data, &cfg)?;
                let stats = if with_stats {
                    Some(estimate_routing_stats(self.model, self.data, &cfg)?)
                } else {
                    None
                };
                let eval_s = started.elapsed().as_secs_f64();
                eval_s_total += eval_s;
                evals_done += 1;
                self.check_finite(step, losses.train)?;
                let (ms_per_step, tokens_per_s) = speed(step - first, train_s);
                on_event(
                    &TrainEvent::Eval {
                        step,
                        losses,
                        ms_per_step,
                        tokens_per_s,
                        eval_s,
                    },
                    stats.as_deref(),
                );
                last = Some(losses);
            }
            let started = Instant::now();
            let loss = self.step()?;
            let log_now = (step + 1) % cfg.log_interval == 0;
            let loss_value = log_now.then(|| loss.double_value(&[]));
            train_s += started.elapsed().as_secs_f64();
            if let Some(loss) = loss_value {
                self.check_losses()?;
                let (ms_per_step, tokens_per_s) = speed(step + 1 - first, train_s);
                let evals_left = (evals_total - evals_done) as f64;
                let eta_s = (cfg.max_iters - step - 1) as f64 * ms_per_step / 1e3
                    + evals_left * eval_s_total / evals_done.max(1) as f64;
                on_event(
                    &TrainEvent::Step {
                        step: step + 1,
                        loss,
                        ms_per_step,
                        tokens_per_s,
                        eta_s,
                    },
                    None,
                );
            }
            let save_now = self
                .checkpointing
                .as_ref()
                .is_some_and(|c| (step + 1) % c.interval == 0 || step + 1 == cfg.max_iters);
            if let Some(ckpt) = save_now.then(|| self.checkpointing.clone()).flatten() {
                self.save_checkpoint(&ckpt.dir, &ckpt.tokenizer)?;
            }
        }
        self.check_losses()?;
        if let Some(ckpt) = self.checkpointing.clone() {
            if self.last_saved != Some(self.step) {
                self.save_checkpoint(&ckpt.dir, &ckpt.tokenizer)?;
            }
        }
        Ok(last)
    }

    /// Reads back the sum of the losses since the last check.
    fn check_losses(&mut self) -> Result<()> {
        match self.unchecked_loss.take() {
            Some(sum) => self.check_finite(self.step, sum.double_value(&[])),
            None => Ok(()),
        }
    }

    fn check_parameters(&self) -> Result<()> {
        let bad = self
            .variables
            .iter()
            .find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0);
        match bad {
            Some((name, _)) => Err(self.diverged(format!(
                "parameter `{name}` holds NaN or infinite values at step {}",
                self.step
            ))),
            None => Ok(()),
        }
    }

    fn check_finite(&self, step: i64, loss: f64) -> Result<()> {
        if loss.is_finite() {
            Ok(())
        } else {
            Err(self.diverged(format!(
                "the loss is {loss} at or before step {step}; lower the learning rate or check the data"
            )))
        }
    }

    fn diverged(&self, what: String) -> MoeError {
        let kept = match (&self.checkpointing, self.last_saved) {
            (Some(c), Some(s)) => format!(
                "; the last good checkpoint (step {s}) is in {}",
                c.dir.display()
            ),
            _ => String::new(),
        };
        MoeError::Diverged(format!("{what}{kept}"))
    }
}

/// Lap timer for [`StepPhases`]; waits for the device so that each lap
/// holds the kernels launched in it.
struct PhaseClock {
    device: tch::Device,
    last: Instant,
}

impl PhaseClock {
    fn start(device: tch::Device) -> Self {
        let mut clock = PhaseClock {
            device,
            last: Instant::now(),
        };
        clock.lap();
        clock
    }

    fn lap(&mut self) -> f64 {
        if let tch::Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        secs
    }
}
