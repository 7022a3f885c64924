//! nanoGPT's training loop over any [`CausalLm`]: random batches, AdamW
//! (or any [`Optimizer`]) with a learning-rate schedule, gradient
//! accumulation and clipping, periodic evaluation, resumable checkpoints,
//! and typed [`TrainEvent`]s for whoever records the run.

use crate::checkpoint::{
    config_differences, copy_into, load_checkpoint_meta, named_variables, CONFIG_FILE,
};
use crate::data_parallel::DataParallel;
use crate::topology::{SimulatedRanks, Single, Topology};
use crate::{
    estimate_loss, estimate_routing_stats, parameter_count, AdamW, AdamWConfig, CheckpointMeta,
    DecayGroups, EvalLosses, Optimizer, TrainConfig, TrainEvent,
};
use moe_core::{MoeError, Result, Routing};
use moe_data::{Dataset, Tokenizer};
use moe_models::CausalLm;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Tensor};

/// Wall-clock seconds spent in each phase of [`Trainer::step`], summed over
/// the steps timed since [`Trainer::time_phases`] was called. On CUDA the
/// device is synchronised at each phase boundary, which itself costs time:
/// use it to see where a step goes, not to measure the step.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepPhases {
    /// Steps timed.
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

impl StepPhases {
    /// Adds the laps of one step.
    fn add(&mut self, step: &StepPhases) {
        self.steps += 1;
        self.batch_s += step.batch_s;
        self.forward_s += step.forward_s;
        self.backward_s += step.backward_s;
        self.optimizer_s += step.optimizer_s;
    }
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

/// nanoGPT's training loop: an optimizer on random batches, with periodic
/// evaluation of both splits and, optionally, periodic checkpoints.
///
/// One step, [`Trainer::step`]:
///
/// 1. re-seed libtorch's generators with `seed + step` (so a run resumed
///    at step `s` draws exactly what the uninterrupted run draws, without
///    saving generator state) and set the learning rate of the schedule;
/// 2. for each of `grad_accum_steps` micro-batches: draw a batch, forward,
///    backward of `loss / grad_accum_steps` (gradients add up);
/// 3. clip the gradients' global norm (if `grad_clip`), optimizer step;
/// 4. the model's post-step hook sees the step's routings (DeepSeek-V3's
///    balancing bias).
pub struct Trainer<'a, M: CausalLm + ?Sized, O: Optimizer = AdamW> {
    model: &'a M,
    data: &'a Dataset,
    config: TrainConfig,
    optimizer: O,
    variables: Vec<(String, Tensor)>,
    trainable: Vec<Tensor>,
    parameters: i64,
    step: i64,
    checkpointing: Option<Checkpointing>,
    /// Sum of the training losses not yet checked for finiteness (read
    /// back at logging and checkpoint times only, to avoid a sync per step).
    unchecked_loss: Option<Tensor>,
    /// Global gradient norm of the last step, when clipping is on.
    last_grad_norm: Option<Tensor>,
    last_saved: Option<i64>,
    phases: Option<StepPhases>,
    /// Where the steps run: one process, the ranks of a group, or one
    /// process standing in for them.
    topology: Box<dyn Topology>,
}

impl<'a, M: CausalLm + ?Sized> Trainer<'a, M, AdamW> {
    /// [`AdamW`] with PyTorch's defaults (betas 0.9/0.999, eps 1e-8) and
    /// `config`'s learning rate and weight decay, over every trainable
    /// variable of `vs`; with [`DecayGroups::Matrices`], the variables the
    /// model calls no-decay ([`CausalLm::is_no_decay`]) are not decayed.
    pub fn new(
        vs: &nn::VarStore,
        model: &'a M,
        data: &'a Dataset,
        config: TrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        let adamw = AdamWConfig {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..Default::default()
        };
        let optimizer = match config.weight_decay_on {
            DecayGroups::All => AdamW::new(vs, adamw)?,
            DecayGroups::Matrices => {
                AdamW::with_no_decay(vs, adamw, |name, shape| model.is_no_decay(name, shape))?
            }
        };
        Self::with_optimizer(vs, model, data, config, optimizer)
    }
}

impl<'a, M: CausalLm + ?Sized, O: Optimizer> Trainer<'a, M, O> {
    /// A trainer driving `optimizer`, which must hold the trainable
    /// variables of `vs`.
    pub fn with_optimizer(
        vs: &nn::VarStore,
        model: &'a M,
        data: &'a Dataset,
        config: TrainConfig,
        optimizer: O,
    ) -> Result<Self> {
        config.validate()?;
        if data.block_size() > model.max_context() {
            return Err(MoeError::config(format!(
                "the dataset's sequences ({} tokens) are longer than the model's context ({})",
                data.block_size(),
                model.max_context()
            )));
        }
        if data.vocab_size() > model.vocab_size() {
            return Err(MoeError::config(format!(
                "the dataset's vocabulary ({} tokens) is larger than the model's ({})",
                data.vocab_size(),
                model.vocab_size()
            )));
        }
        Ok(Trainer {
            model,
            data,
            config,
            optimizer,
            variables: named_variables(vs),
            trainable: vs.trainable_variables(),
            parameters: parameter_count(vs),
            step: 0,
            checkpointing: None,
            unchecked_loss: None,
            last_grad_norm: None,
            last_saved: None,
            phases: None,
            topology: Box::new(Single),
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

    /// Trains as one rank of `parallel`'s group: copies rank 0's replicated
    /// variables to every rank, then each step draws this rank's batches,
    /// averages the replicated gradients and scales the expert shards'
    /// ([`crate::data_parallel`]), clips by the norm over every rank, and
    /// reports the mean loss of the ranks. Evaluations average the ranks'
    /// losses and sum their routing loads; only rank 0 reports events and
    /// writes the checkpoint's weights (the expert shards gathered), each
    /// rank its optimizer state (`optimizer.rank{r}.safetensors`). The
    /// start event counts the whole model's parameters, every rank's expert
    /// shards included ([`DataParallel::global_parameter_count`]), and the
    /// active ones per token from that count.
    pub fn with_data_parallel(mut self, parallel: DataParallel) -> Result<Self> {
        parallel.broadcast_parameters(&self.variables)?;
        // This rank holds only its share of the experts: the start event
        // reports the whole model's count, and the active count from it.
        self.parameters = parallel.global_parameter_count(&self.variables)?;
        self.topology = Box::new(parallel);
        Ok(self)
    }

    /// One process computing what `ranks` data-parallel ranks compute
    /// ([`SimulatedRanks`]).
    pub fn with_simulated_ranks(mut self, ranks: i64) -> Result<Self> {
        self.topology = Box::new(SimulatedRanks::new(ranks)?);
        Ok(self)
    }

    /// This process's rank (0 without data parallelism).
    pub fn rank(&self) -> i64 {
        self.topology.rank()
    }

    /// Optimisation steps taken so far (including those before a resume).
    pub fn steps_done(&self) -> i64 {
        self.step
    }

    /// The optimizer, e.g. to switch AdamW's fused kernel off.
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The training config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Starts (or restarts from zero) timing the phases of each step.
    pub fn time_phases(&mut self) {
        self.phases = Some(StepPhases::default());
    }

    /// The phase times since [`Trainer::time_phases`], if it was called.
    pub fn phases(&self) -> Option<StepPhases> {
        self.phases
    }

    /// One optimisation step (see [`Trainer`]); returns the step's mean
    /// training loss, balance losses included, as a device scalar (not read
    /// back, so no host synchronisation). With data or expert parallelism a
    /// peer that died or timed out, in the forward pass, in the backward
    /// pass's all-to-all ([`moe_aten::backward`]) or in the gradients'
    /// all-reduce, is a [`MoeError::Distributed`] within the group's
    /// timeout; other libtorch errors of the backward are
    /// [`MoeError::Torch`].
    pub fn step(&mut self) -> Result<Tensor> {
        let mut clock = self.phases.map(|_| PhaseClock::start(self.model.device()));
        let mut laps = StepPhases::default();
        self.topology.seed_step(self.config.seed, self.step);
        let lr = self.config.lr_schedule.lr_at(
            self.step,
            self.config.learning_rate,
            self.config.max_iters,
        );
        self.optimizer.set_lr(lr);
        self.optimizer.zero_grad()?;

        let micro_batches = self.config.grad_accum_steps;
        let mut loss_sum: Option<Tensor> = None;
        let mut routings = Vec::with_capacity(micro_batches as usize);
        for micro in 0..micro_batches {
            let batch = self.topology.batch(
                self.data,
                self.config.batch_size,
                self.config.seed,
                self.step,
                micro,
            );
            laps.batch_s += clock.as_mut().map_or(0.0, PhaseClock::lap);
            let objective = self.model.batch_objective(&batch.x, &batch.y, true)?;
            laps.forward_s += clock.as_mut().map_or(0.0, PhaseClock::lap);
            // Fallible: under expert parallelism the backward exchanges with
            // the other ranks, and a peer that died is an error, not a panic.
            if micro_batches == 1 {
                moe_aten::backward(&objective.total)?;
            } else {
                moe_aten::backward(&(&objective.total / micro_batches as f64))?;
            }
            laps.backward_s += clock.as_mut().map_or(0.0, PhaseClock::lap);
            let loss = objective.total.detach();
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + loss,
                None => loss,
            });
            routings.push(objective.routings);
        }

        self.topology.reduce_gradients(&self.variables)?;
        if let Some(max_norm) = self.config.grad_clip {
            self.last_grad_norm = Some(self.topology.clip_grad_norm(
                &self.variables,
                &self.trainable,
                max_norm,
            )?);
        }
        self.optimizer.step()?;
        self.model
            .after_optimizer_step(&concat_micro_batches(routings)?)?;
        laps.optimizer_s += clock.as_mut().map_or(0.0, PhaseClock::lap);
        if let Some(phases) = self.phases.as_mut() {
            phases.add(&laps);
        }
        self.step += 1;
        let loss = self
            .topology
            .mean(loss_sum.expect("grad_accum_steps >= 1") / micro_batches as f64)?;
        self.unchecked_loss = Some(match self.unchecked_loss.take() {
            Some(sum) => sum + &loss,
            None => loss.shallow_clone(),
        });
        Ok(loss)
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
        self.topology
            .save_checkpoint(dir, &self.variables, &self.optimizer, &meta)?;
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
        let weights =
            self.topology
                .load_checkpoint(dir, &self.variables, &mut self.optimizer, meta.step)?;
        copy_into(&self.variables, weights);
        self.step = meta.step;
        self.unchecked_loss = None;
        self.last_saved = Some(meta.step);
        Ok(())
    }

    /// Runs from the current step to `max_iters`, reporting every
    /// [`TrainEvent`] to `on_event`; an error from `on_event` stops the run
    /// and is returned. Returns the losses of the last evaluation.
    pub fn run(
        &mut self,
        mut on_event: impl FnMut(&TrainEvent) -> Result<()>,
    ) -> Result<Option<EvalLosses>> {
        // With data parallelism only rank 0 reports.
        let main = self.rank() == 0;
        let mut on_event = |event: &TrainEvent| if main { on_event(event) } else { Ok(()) };
        let run_started = Instant::now();
        let cfg = self.config.clone();
        let tokens_per_step =
            (cfg.batch_size * cfg.grad_accum_steps * self.data.block_size()) as f64;
        let first = self.step;
        let last_step = (cfg.max_iters - 1).max(0);
        let is_eval_step = |s: i64| s % cfg.eval_interval == 0 || s == last_step;
        let evals_total = (first..cfg.max_iters).filter(|&s| is_eval_step(s)).count() as i64;
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
        let lm_config = self.model.lm_config();
        on_event(&TrainEvent::Start {
            step: first,
            parameters: self.parameters,
            active_parameters: lm_config.active_params(self.parameters)?,
            device: format!("{:?}", self.model.device()),
            model: lm_config,
            train: cfg.clone(),
        })?;
        for step in first..cfg.max_iters {
            if is_eval_step(step) {
                let started = Instant::now();
                let (losses, routing) = self.topology.combine_eval(
                    estimate_loss(self.model, self.data, &cfg)?,
                    estimate_routing_stats(self.model, self.data, &cfg)?,
                )?;
                let eval_s = started.elapsed().as_secs_f64();
                eval_s_total += eval_s;
                evals_done += 1;
                self.check_finite(step, losses.train)?;
                let (ms_per_step, tokens_per_s) = speed(step - first, train_s);
                let load_cv =
                    routing.iter().map(|s| s.cv).sum::<f64>() / routing.len().max(1) as f64;
                on_event(&TrainEvent::Eval {
                    step,
                    train_loss: losses.train,
                    val_loss: losses.val,
                    ms_per_step,
                    tokens_per_s,
                    eval_s,
                    load_cv,
                    routing,
                })?;
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
                on_event(&TrainEvent::Step {
                    step: step + 1,
                    loss,
                    lr: self.optimizer.lr(),
                    grad_norm: self.last_grad_norm.as_ref().map(|n| n.double_value(&[])),
                    ms_per_step,
                    tokens_per_s,
                    eta_s,
                })?;
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
        on_event(&TrainEvent::End {
            steps: self.step,
            train_loss: last.map(|l| l.train),
            val_loss: last.map(|l| l.val),
            wall_s: run_started.elapsed().as_secs_f64(),
        })?;
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

/// The routings of a step's micro-batches, layer by layer, as one routing
/// per layer over all their tokens (the aux-free bias update counts the
/// load of the whole step).
fn concat_micro_batches(mut micro: Vec<Vec<Routing>>) -> Result<Vec<Routing>> {
    if micro.len() == 1 {
        return Ok(micro.pop().unwrap_or_default());
    }
    let layers = micro.first().map_or(0, Vec::len);
    (0..layers)
        .map(|layer| Routing::concat(&micro.iter().map(|m| &m[layer]).collect::<Vec<_>>()))
        .collect()
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
