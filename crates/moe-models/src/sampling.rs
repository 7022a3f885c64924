//! How the next token is drawn from the model's distribution: temperature,
//! top-k, top-p (nucleus) and a repetition penalty, applied in Hugging
//! Face's order (repetition penalty, temperature, top-k, top-p).

use moe_core::{MoeError, Result};
use tch::{Kind, Tensor};

/// The sampling settings of [`crate::generate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it; 1.0 is makeMoE's plain sampling.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all; `Some(1)`: greedy).
    pub top_k: Option<i64>,
    /// Nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751): keep the
    /// most likely tokens whose probabilities add up to at least `p`
    /// (always at least one); `None`: all.
    pub top_p: Option<f64>,
    /// CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858):
    /// the logit `l` of every token already in the context becomes `l / r`
    /// if `l > 0`, else `l * r`; 1.0: off.
    pub repetition_penalty: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
        }
    }
}

/// Sampling settings a program's flags give, each overriding its setting of
/// a base [`Sampling`] (a checkpoint's generation config) when given
/// ([`SamplingFlags::over`]); with the `clap` feature, the flags
/// `--temperature`, `--top-k`, `--top-p` and `--repetition-penalty`
/// (`#[command(flatten)]`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct SamplingFlags {
    /// Softmax temperature (default 1.0, or the checkpoint's generation config's)
    #[cfg_attr(feature = "clap", arg(long))]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens only (1: greedy)
    #[cfg_attr(feature = "clap", arg(long))]
    pub top_k: Option<i64>,
    /// Nucleus sampling: among the most likely tokens whose probabilities add up to P
    #[cfg_attr(feature = "clap", arg(long))]
    pub top_p: Option<f64>,
    /// CTRL's repetition penalty on tokens already in the text (1: off)
    #[cfg_attr(feature = "clap", arg(long))]
    pub repetition_penalty: Option<f64>,
}

impl SamplingFlags {
    /// `base` with every setting these flags give.
    pub fn over(&self, base: Sampling) -> Sampling {
        Sampling {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.or(base.top_k),
            top_p: self.top_p.or(base.top_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(base.repetition_penalty),
        }
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Sampling {
            top_k: Some(1),
            ..Sampling::default()
        }
    }

    /// Checks the settings against the vocabulary size.
    pub fn validate(&self, vocab_size: i64) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(MoeError::config(format!(
                "temperature must be a positive number, got {}",
                self.temperature
            )));
        }
        if let Some(k) = self.top_k {
            if k < 1 || k > vocab_size {
                return Err(MoeError::config(format!(
                    "sampling top_k must be in 1..={vocab_size}, got {k}"
                )));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(MoeError::config(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(MoeError::config(format!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }

    /// Whether these settings always take the most likely token: `top_k`
    /// of 1 (what [`Sampling::greedy`] and a generation config without
    /// `do_sample` give; a temperature of 0 is not a setting, see
    /// [`Sampling::validate`]). Greedy decoding is a plain argmax of the
    /// logits after the repetition penalty (temperature and top-p cannot
    /// change which token is largest), never a draw.
    pub fn is_greedy(&self) -> bool {
        self.top_k == Some(1)
    }

    /// The probabilities the next token is drawn from, `[1, V]` (0 for
    /// excluded tokens), given the model's `logits` (`[1, V]`) and the
    /// `context` so far (prompt and generated tokens).
    ///
    /// After the repetition penalty the largest logit is subtracted before
    /// dividing by the temperature: softmax, top-k and top-p do not change
    /// when every logit moves by one amount, and `(l - max) / T <= 0`
    /// cannot overflow however small `T` is (where `l / T` would, making
    /// the softmax NaN). The logits must be finite or `-inf` (see
    /// [`Sampling::sample`], which checks them).
    pub fn distribution(&self, logits: &Tensor, context: &[i64]) -> Tensor {
        let mut logits = self.penalised(logits, context);
        let (max, _) = logits.max_dim(-1, true);
        logits = (logits - max) / self.temperature;
        if let Some(k) = self.top_k {
            let (top, _) = logits.topk(k, -1, true, true);
            let threshold = top.select(1, k - 1).unsqueeze(1);
            logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
        }
        if let Some(p) = self.top_p {
            // Sorted descending, a token stays while the probability mass
            // before it is below p: the first token always stays.
            let (sorted, order) = logits.sort(-1, true);
            let probs = sorted.softmax(-1, Kind::Float);
            let before = probs.cumsum(-1, Kind::Float) - &probs;
            let drop_sorted = before.ge(p);
            let drop = drop_sorted.zeros_like().scatter(-1, &order, &drop_sorted);
            logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
        }
        logits.softmax(-1, Kind::Float)
    }

    /// The logits in f32 after CTRL's repetition penalty.
    fn penalised(&self, logits: &Tensor, context: &[i64]) -> Tensor {
        let logits = logits.to_kind(Kind::Float);
        if self.repetition_penalty == 1.0 || context.is_empty() {
            return logits;
        }
        let seen = Tensor::from_slice(context)
            .to_device(logits.device())
            .unsqueeze(0);
        let l = logits.gather(1, &seen, false);
        let r = self.repetition_penalty;
        let penalised = (&l * r).where_self(&l.lt(0.0), &(&l / r));
        logits.scatter(1, &seen, &penalised)
    }

    /// Draws one token from `logits` (`[1, V]`): the argmax after the
    /// repetition penalty when the settings are greedy
    /// ([`Sampling::is_greedy`]), else a draw from
    /// [`Sampling::distribution`].
    ///
    /// Errors instead of panicking: settings that [`Sampling::validate`]
    /// rejects for `V` tokens, logits that are not one row of `V`, a
    /// context id outside `0..V`, and logits that name no token: a NaN or
    /// `+inf` anywhere, or every logit `-inf`, is a [`MoeError::NonFinite`]
    /// naming the row (a lone `-inf` is an excluded token, as masks write
    /// it). [`crate::generate`] and its variants name the generation step
    /// too.
    pub fn sample(&self, logits: &Tensor, context: &[i64]) -> Result<i64> {
        self.draw(logits, context, &|| "the logits of row 0".into())
    }

    /// [`Sampling::sample`] for generation: an error names `step` (0 for
    /// the first new token, as the message counts) and the batch `row` the
    /// logits belong to.
    pub(crate) fn sample_step(
        &self,
        logits: &Tensor,
        context: &[i64],
        step: usize,
        row: usize,
    ) -> Result<i64> {
        self.draw(logits, context, &|| {
            format!("the logits at generation step {step}, batch row {row}")
        })
    }

    fn draw(&self, logits: &Tensor, context: &[i64], at: &dyn Fn() -> String) -> Result<i64> {
        let size = logits.size();
        let &[1, vocab_size] = size.as_slice() else {
            return Err(MoeError::Shape {
                what: "the logits a token is sampled from".into(),
                expected: "[1, vocab_size]: one row".into(),
                got: size,
            });
        };
        self.validate(vocab_size)?;
        if let Some(&id) = context.iter().find(|&&t| t < 0 || t >= vocab_size) {
            return Err(MoeError::TokenOutOfVocab { id, vocab_size });
        }
        // One read-back per token: the checks travel with the result.
        if self.is_greedy() {
            let penalised = self.penalised(logits, context);
            let token = penalised.argmax(-1, false).to_kind(Kind::Double);
            let [pos_inf, nan, finite, token] = read(&counts(&penalised), &token)?;
            if pos_inf > 0.0 || nan > 0.0 || finite == 0.0 {
                // The model's logits, or finite ones the penalty overflowed
                // (a tiny repetition_penalty divides positive ones into +inf).
                let [pos_inf, nan, finite] = read3(&counts(logits))?;
                check_logits(pos_inf, nan, finite, logits.numel(), at)?;
                return Err(overflow(self, at));
            }
            return Ok(token as i64);
        }
        let probs = self.distribution(logits, context);
        let [pos_inf, nan, finite, total] = read(&counts(logits), &probs.sum(Kind::Double))?;
        check_logits(pos_inf, nan, finite, logits.numel(), at)?;
        if !(total.is_finite() && total > 0.0) {
            return Err(overflow(self, at));
        }
        Ok(probs.f_multinomial(1, false)?.int64_value(&[0, 0]))
    }
}

/// Checks that logits with these counts of `+inf`, NaN and finite values
/// (of `vocab_size`) name a token: no NaN, no `+inf`, not every one `-inf`;
/// else a [`MoeError::NonFinite`] naming `at()` and what was found.
fn check_logits(
    pos_inf: f64,
    nan: f64,
    finite: f64,
    vocab_size: usize,
    at: &dyn Fn() -> String,
) -> Result<()> {
    let found = if nan > 0.0 {
        format!("hold NaN ({nan} of {vocab_size} logits)")
    } else if pos_inf > 0.0 {
        format!("hold +inf ({pos_inf} of {vocab_size} logits)")
    } else if finite == 0.0 {
        format!("are all -inf ({vocab_size} logits)")
    } else {
        return Ok(());
    };
    Err(MoeError::NonFinite(format!(
        "{} {found}, so no token can be chosen: expected finite logits (a lone -inf excludes a \
         token); the model's weights or activations are not finite (a diverged or corrupt \
         checkpoint?)",
        at()
    )))
}

/// How many of `logits` are `+inf`, NaN and finite, `[3]` f64 on their device.
fn counts(logits: &Tensor) -> Tensor {
    Tensor::stack(
        &[
            logits.isposinf().sum(Kind::Double),
            logits.isnan().sum(Kind::Double),
            logits.isfinite().sum(Kind::Double),
        ],
        0,
    )
}

/// `counts` and one more scalar, in one read-back.
fn read(counts: &Tensor, scalar: &Tensor) -> Result<[f64; 4]> {
    let all = Tensor::cat(&[counts.shallow_clone(), scalar.reshape([1])], 0);
    let v = Vec::<f64>::try_from(&all)?;
    Ok([v[0], v[1], v[2], v[3]])
}

/// `counts` alone, read back.
fn read3(counts: &Tensor) -> Result<[f64; 3]> {
    let v = Vec::<f64>::try_from(counts)?;
    Ok([v[0], v[1], v[2]])
}

/// The error of settings that turn finite logits into no distribution.
fn overflow(sampling: &Sampling, at: &dyn Fn() -> String) -> MoeError {
    MoeError::config(format!(
        "{}: temperature {} and repetition_penalty {} overflow finite logits into values no \
         token can be drawn from: expected settings nearer 1",
        at(),
        sampling.temperature,
        sampling.repetition_penalty
    ))
}
