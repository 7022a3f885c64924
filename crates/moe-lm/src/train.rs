use crate::{Dataset, MoeLanguageModel, Split, TrainConfig};
use moe_core::{MoeError, Result};
use moe_routers::RoutingStats;
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

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
pub fn estimate_loss(
    model: &MoeLanguageModel,
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
                total += model.batch_objective(&batch, false)?.cross_entropy * batches as f64;
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
pub fn estimate_routing_stats(
    model: &MoeLanguageModel,
    data: &Dataset,
    config: &TrainConfig,
) -> Result<Vec<RoutingStats>> {
    let rows = config.eval_rows.min(config.eval_iters * config.batch_size);
    model.routing_stats(&data.batch(Split::Val, rows))
}

/// nanoGPT's training loop: AdamW on random batches, with periodic
/// evaluation of both splits.
pub struct Trainer<'a> {
    model: &'a MoeLanguageModel,
    data: &'a Dataset,
    config: TrainConfig,
    optimizer: nn::Optimizer,
}

impl<'a> Trainer<'a> {
    /// AdamW (Loshchilov & Hutter 2019) with PyTorch's defaults
    /// (betas 0.9/0.999, eps 1e-8) over every trainable variable of `vs`.
    pub fn new(
        vs: &nn::VarStore,
        model: &'a MoeLanguageModel,
        data: &'a Dataset,
        config: TrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        if data.block_size() != model.config().block_size {
            return Err(MoeError::config(format!(
                "the dataset's block_size ({}) differs from the model's ({})",
                data.block_size(),
                model.config().block_size
            )));
        }
        let adamw = nn::AdamW {
            wd: config.weight_decay,
            ..Default::default()
        };
        let optimizer = adamw.build(vs, config.learning_rate)?;
        Ok(Trainer {
            model,
            data,
            config,
            optimizer,
        })
    }

    /// One optimisation step on a fresh training batch; returns the loss
    /// tensor, balance losses included (not read back, so no host
    /// synchronisation). After the optimizer step, the model's
    /// [`MoeLanguageModel::after_optimizer_step`] hook sees the step's routings.
    pub fn step(&mut self) -> Result<Tensor> {
        let batch = self.data.batch(Split::Train, self.config.batch_size);
        let objective = self.model.batch_objective(&batch, true)?;
        self.optimizer.zero_grad();
        objective.total.backward();
        self.optimizer.step();
        self.model.after_optimizer_step(&objective.routings)?;
        Ok(objective.total)
    }

    /// Runs `max_iters` steps, reporting through `on_event`; returns the
    /// losses of the last evaluation.
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
        let last_step = (cfg.max_iters - 1).max(0);
        let evals_total =
            last_step / cfg.eval_interval + 1 + i64::from(last_step % cfg.eval_interval != 0);
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
        for step in 0..cfg.max_iters {
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
                check_finite(step, losses.train)?;
                let (ms_per_step, tokens_per_s) = speed(step, train_s);
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
                check_finite(step, loss)?;
                let (ms_per_step, tokens_per_s) = speed(step + 1, train_s);
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
        }
        Ok(last)
    }
}

fn check_finite(step: i64, loss: f64) -> Result<()> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(MoeError::Diverged(format!(
            "the loss is {loss} at step {step}; lower the learning rate or check the data"
        )))
    }
}
