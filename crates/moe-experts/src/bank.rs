use crate::quantize::{int8_matmul_auto, tensor_bytes, ExpertQuantization, Int8Weight};
use crate::{Activation, BankWeights, ExpertConfig, ExpertKey, ExpertResidency};
use moe_core::gemv::{self, Product};
use moe_core::profile::span;
use moe_core::{
    as_kind_of, dropout, var_column_major_rows, var_rows, IntoChecked, MoeError, Result, WeightInit,
};
use tch::{nn, Device, Kind, Tensor};

/// `E` two-layer experts, stacked (makeMoE's `Expert`, or a SwiGLU FFN):
///
/// `FFN_e(x) = Dropout(act_e(x) W_out[e] (+ b_out[e]))`, with
/// `act_e(x) = ReLU(x W_in[e] (+ b_in[e]))`,
/// `act_e(x) = SiLU(x W_gate[e] (+ b_gate[e])) * (x W_in[e] (+ b_in[e]))` or
/// gpt-oss's clamped SwiGLU of the same two projections ([`Activation`]),
///
/// `W_in, W_gate: [E, d, h]`, `b_in, b_gate: [E, h]`, `W_out: [E, h, d]`,
/// `b_out: [E, d]`;
/// the biases exist only with [`ExpertConfig::bias`] (Mixtral, Qwen2-MoE,
/// DeepSeek and OLMoE experts have none).
/// `W_in[e]` is the transpose of PyTorch's `nn.Linear(d, h).weight`, so that
/// `x W_in[e]` needs no transpose and grouped GEMM reads the bank as it is.
/// Checkpoints store these tensors under `<layer>/experts/{w_in,b_in,w_gate,w_out,b_out}`.
///
/// A bank can be quantised for inference ([`ExpertBank::quantize`]): the
/// three weight matrices then live in int8 ([`Int8Experts`]), every FFN
/// entry point below computes with them, and `w_in`, `w_gate` and `w_out`
/// are emptied (see [`ExpertBank::quantize`]); the biases stay float.
#[derive(Debug)]
pub struct ExpertBank {
    /// Input projections `[E, d, h]`; `[0]` (same dtype and device) once
    /// the bank is quantised.
    pub w_in: Tensor,
    /// With [`ExpertConfig::bias`] only.
    pub b_in: Option<Tensor>,
    /// SwiGLU only; `[0]` once the bank is quantised.
    pub w_gate: Option<Tensor>,
    /// SwiGLU with [`ExpertConfig::bias`] only.
    pub b_gate: Option<Tensor>,
    /// Output projections `[E, h, d]`; `[0]` once the bank is quantised.
    pub w_out: Tensor,
    /// With [`ExpertConfig::bias`] only.
    pub b_out: Option<Tensor>,
    config: ExpertConfig,
    int8: Option<Int8Experts>,
    mapped: Option<MappedExperts>,
}

/// The weight matrices of a bank left in a checkpoint's memory-mapped
/// files ([`ExpertBank::map_experts`]): per expert, views of the files'
/// `nn.Linear` weights seen in the bank's orientation (`w_in[e]`,
/// `w_gate[e]`: `[d, h]`; `w_out[e]`: `[h, d]`; column-major), with the
/// [`ExpertResidency`] that decides which of them stay in memory.
#[derive(Debug)]
pub struct MappedExperts {
    w_in: Vec<Tensor>,
    w_gate: Option<Vec<Tensor>>,
    w_out: Vec<Tensor>,
    residency: ExpertResidency,
    /// This bank's layer, in the residency's keys.
    layer: usize,
}

impl MappedExperts {
    fn key(&self, e: usize) -> ExpertKey {
        ExpertKey {
            layer: self.layer,
            expert: e,
        }
    }

    /// Bytes of the weight matrices (all experts, resident or not).
    pub fn size_in_bytes(&self) -> i64 {
        self.w_in
            .iter()
            .chain(self.w_gate.iter().flatten())
            .chain(&self.w_out)
            .map(tensor_bytes)
            .sum()
    }

    /// The residency the experts are counted in.
    pub fn residency(&self) -> &ExpertResidency {
        &self.residency
    }
}

/// The weight matrices of a quantised bank ([`ExpertBank::quantize`] with
/// [`ExpertQuantization::Int8`]), each [`Int8Weight`] in libtorch's
/// `_weight_int8pack_mm` layout `[E, out, in]`: `w_in` and `w_gate`
/// `[E, h, d]` (out = h), `w_out` `[E, d, h]` (out = d), scales `[E, h]`
/// and `[E, d]` f32.
#[derive(Debug)]
pub struct Int8Experts {
    /// Input projections, `q: [E, h, d]`, `s: [E, h]`.
    pub w_in: Int8Weight,
    /// SwiGLU's gate, `q: [E, h, d]`, `s: [E, h]`.
    pub w_gate: Option<Int8Weight>,
    /// Output projections, `q: [E, d, h]`, `s: [E, d]`.
    pub w_out: Int8Weight,
}

impl Int8Experts {
    /// Bytes held: `(2 or 3) E d h` int8 values plus `4 E (h (1 or 2) + d)`
    /// bytes of f32 scales.
    pub fn size_in_bytes(&self) -> i64 {
        self.w_in.size_in_bytes()
            + self.w_gate.as_ref().map_or(0, Int8Weight::size_in_bytes)
            + self.w_out.size_in_bytes()
    }

    /// The float weights they stand for, in the bank's layout and `kind`
    /// (biases `None`): `w[e, i, o] = q[e, o, i] s[e, o]`.
    pub fn dequantize(&self, kind: Kind) -> BankWeights {
        BankWeights {
            w_in: self.w_in.dequantize(kind),
            b_in: None,
            w_gate: self.w_gate.as_ref().map(|w| w.dequantize(kind)),
            b_gate: None,
            w_out: self.w_out.dequantize(kind),
            b_out: None,
        }
    }
}

/// `t + b` where there is a bias `b`, `t` itself where there is none.
pub fn plus_bias(t: Tensor, b: Option<Tensor>) -> Tensor {
    match b {
        Some(b) => t + b,
        None => t,
    }
}

impl ExpertBank {
    /// The bank's tensors: `w_in`, `w_gate`, `w_out` and the biases it has.
    pub fn tensors(&self) -> Vec<&Tensor> {
        [Some(&self.w_in), self.b_in.as_ref(), self.w_gate.as_ref()]
            .into_iter()
            .chain([self.b_gate.as_ref(), Some(&self.w_out), self.b_out.as_ref()])
            .flatten()
            .collect()
    }

    /// Parameters: `p/w_in`, `p/w_out` and, with a SwiGLU, `p/w_gate`, each
    /// weight drawn by `config.init` for its fans; with `config.bias`,
    /// `p/b_in`, `p/b_out` (and `p/b_gate` with a gate) drawn as PyTorch's
    /// `nn.Linear` biases.
    pub fn new(p: &nn::Path, config: impl IntoChecked<ExpertConfig>) -> Result<Self> {
        let config = config.into_checked()?;
        let experts = 0..config.num_experts;
        Self::new_shard(p, config, experts)
    }

    /// Experts `experts` of the bank `config` describes (an expert-parallel
    /// rank's share), as `experts.len()` experts: each tensor is drawn for
    /// the whole bank as [`ExpertBank::new`] draws it and only these
    /// experts' rows are kept ([`var_rows`]), so the ranks' shards together
    /// are the bank one process draws with the same seed. An empty range or
    /// one outside `0..num_experts` is an error.
    pub fn new_shard(
        p: &nn::Path,
        config: impl IntoChecked<ExpertConfig>,
        experts: std::ops::Range<i64>,
    ) -> Result<Self> {
        let config = config.into_checked()?.into_inner();
        let (e, d, h) = (config.num_experts, config.input_dim, config.hidden_dim);
        if experts.is_empty() || experts.start < 0 || experts.end > e {
            return Err(MoeError::config(format!(
                "a shard of a bank of {e} experts takes a non-empty range within 0..{e}, got \
                 {experts:?}"
            )));
        }
        let init = config.init;
        let gated = config.activation.is_gated();
        let bias = config.bias;
        let matrices =
            |name, dims, init| var_column_major_rows(p, name, dims, init, experts.clone());
        let biases = |name, width, fan_in| {
            let init = WeightInit::bias(fan_in);
            var_rows(p, name, &[e, width], init, experts.clone())
        };
        let w_gate = gated.then(|| matrices("w_gate", [e, d, h], init.weight(d, h)));
        Ok(ExpertBank {
            w_in: matrices("w_in", [e, d, h], init.weight(d, h)),
            b_in: bias.then(|| biases("b_in", h, d)),
            w_gate,
            b_gate: (bias && gated).then(|| biases("b_gate", h, d)),
            w_out: matrices("w_out", [e, h, d], init.weight(h, d)),
            b_out: bias.then(|| biases("b_out", d, h)),
            config: ExpertConfig {
                num_experts: experts.end - experts.start,
                ..config
            },
            int8: None,
            mapped: None,
        })
    }

    /// Computes from `w_in`, `w_gate` and `w_out` given per expert as views
    /// of a checkpoint's memory-mapped files instead of the bank's own
    /// matrices, for inference: nothing is copied, the pages are read from
    /// the files when an expert runs, and `residency` keeps at most its
    /// capacity of experts in memory (this bank's are its `layer`'s keys).
    /// Each `w_in[e]` and `w_gate[e]` is `[d, h]`, each `w_out[e]` `[h, d]`,
    /// in the bank's dtype, on the CPU, in a file-backed map (checked by
    /// [`ExpertResidency::register`]). The bank's own matrices are freed
    /// (set to `[0]`, as [`ExpertBank::quantize`] does); biases stay.
    /// Quantising a mapped bank copies its experts into int8 (resident).
    pub fn map_experts(
        &mut self,
        w_in: Vec<Tensor>,
        w_gate: Option<Vec<Tensor>>,
        w_out: Vec<Tensor>,
        residency: &ExpertResidency,
        layer: usize,
    ) -> Result<()> {
        if self.int8.is_some() || self.mapped.is_some() {
            return Err(MoeError::config(
                "only a bank holding its own float matrices can take mapped experts",
            ));
        }
        let c = &self.config;
        let (e, d, h) = (c.num_experts, c.input_dim, c.hidden_dim);
        let kind = self.w_in.kind();
        if w_gate.is_some() != self.w_gate.is_some() {
            return Err(MoeError::config(format!(
                "mapped experts {} a gate matrix but the bank's activation is {:?}",
                if w_gate.is_some() { "have" } else { "lack" },
                c.activation
            )));
        }
        let check = |what: &str, list: &[Tensor], shape: [i64; 2]| -> Result<()> {
            if list.len() as i64 != e {
                return Err(MoeError::config(format!(
                    "mapped `{what}`: {} matrices for a bank of {e} experts",
                    list.len()
                )));
            }
            for t in list {
                if t.size() != shape || t.kind() != kind {
                    return Err(MoeError::Shape {
                        what: format!("mapped expert matrix `{what}` ({kind:?})"),
                        expected: format!("{shape:?} of {kind:?}"),
                        got: t.size(),
                    });
                }
            }
            Ok(())
        };
        check("w_in", &w_in, [d, h])?;
        if let Some(g) = &w_gate {
            check("w_gate", g, [d, h])?;
        }
        check("w_out", &w_out, [h, d])?;
        for expert in 0..e as usize {
            let mut matrices = vec![&w_in[expert], &w_out[expert]];
            if let Some(g) = &w_gate {
                matrices.push(&g[expert]);
            }
            residency.register(ExpertKey { layer, expert }, &matrices)?;
        }
        self.free_float_matrices();
        self.mapped = Some(MappedExperts {
            w_in,
            w_gate,
            w_out,
            residency: residency.clone(),
            layer,
        });
        Ok(())
    }

    /// The mapped experts of [`ExpertBank::map_experts`], if any.
    pub fn mapped_experts(&self) -> Option<&MappedExperts> {
        self.mapped.as_ref()
    }

    /// Asks the residency to read `experts`' pages ahead of their use (a
    /// mapped bank; nothing otherwise).
    pub fn prefetch(&self, experts: &[i64]) {
        if let Some(m) = &self.mapped {
            for &e in experts {
                m.residency.prefetch(m.key(e as usize));
            }
        }
    }

    /// Sets `w_in`, `w_gate` and `w_out` to `[0]` tensors of their dtype
    /// and device (the `VarStore`'s entries see it too).
    fn free_float_matrices(&mut self) {
        tch::no_grad(|| {
            for w in [
                Some(&mut self.w_in),
                self.w_gate.as_mut(),
                Some(&mut self.w_out),
            ]
            .into_iter()
            .flatten()
            {
                w.set_data(&Tensor::empty([0], (w.kind(), w.device())));
            }
        });
    }

    /// Quantises the weight matrices `w_in`, `w_gate` and `w_out` for
    /// inference (weight-only; biases stay float): with
    /// [`ExpertQuantization::Int8`], per expert and output channel,
    /// `s = max|w| / 127`, `q = clamp(round(w / s), -127, 127)` (see
    /// [`Int8Weight::quantize`]). The bank then holds `(2 or 3) E d h`
    /// bytes of weights plus 4 bytes of scale per expert and output channel
    /// ([`Int8Experts::size_in_bytes`]) instead of `(2 or 3) E d h` times
    /// the float dtype's size.
    ///
    /// The float matrices are freed: their tensors (shared with the
    /// `VarStore` that created them, whose entries see the same change) are
    /// set to empty `[0]` tensors of the same dtype and device, so that a
    /// checkpoint load into the bank fails its shape check and nothing
    /// keeps the float storage alive. Quantise after loading weights; a
    /// quantised bank cannot be saved as a float checkpoint or trained:
    /// every forward entry point computes with the int8 weights and passes
    /// gradients to its input only (through [`crate::Int8Kernel::Dequantize`]),
    /// and `moe_block::SparseMoe::forward_t` refuses `train = true`.
    ///
    /// An error if the bank is already quantised or a weight is not float.
    pub fn quantize(&mut self, quantization: ExpertQuantization) -> Result<()> {
        if let Some(current) = self.quantization() {
            return Err(MoeError::config(format!(
                "the expert bank is already quantised ({current})"
            )));
        }
        match quantization {
            ExpertQuantization::Int8 => {
                let int8 = match self.mapped.take() {
                    // Expert by expert from the files' pages, which then
                    // leave this process.
                    Some(m) => {
                        let int8 = Int8Experts {
                            w_in: Int8Weight::from_experts(&m.w_in),
                            w_gate: m.w_gate.as_deref().map(Int8Weight::from_experts),
                            w_out: Int8Weight::from_experts(&m.w_out),
                        };
                        (0..m.w_in.len()).for_each(|e| m.residency.release(m.key(e)));
                        int8
                    }
                    None => Int8Experts {
                        w_in: Int8Weight::quantize(&self.w_in)?,
                        w_gate: self.w_gate.as_ref().map(Int8Weight::quantize).transpose()?,
                        w_out: Int8Weight::quantize(&self.w_out)?,
                    },
                };
                self.free_float_matrices();
                self.int8 = Some(int8);
            }
        }
        Ok(())
    }

    /// How the weight matrices are quantised; `None` for float weights.
    pub fn quantization(&self) -> Option<ExpertQuantization> {
        self.int8.as_ref().map(|_| ExpertQuantization::Int8)
    }

    /// The int8 weight matrices of a bank quantised with
    /// [`ExpertQuantization::Int8`].
    pub fn int8_weights(&self) -> Option<&Int8Experts> {
        self.int8.as_ref()
    }

    /// Bytes held by the weight matrices (`w_in`, `w_gate`, `w_out`; the
    /// biases not counted): `(2 or 3) E d h` times the float dtype's size,
    /// or, quantised, [`Int8Experts::size_in_bytes`].
    pub fn weight_bytes(&self) -> i64 {
        if let Some(m) = &self.mapped {
            return m.size_in_bytes();
        }
        match &self.int8 {
            Some(int8) => int8.size_in_bytes(),
            None => [Some(&self.w_in), self.w_gate.as_ref(), Some(&self.w_out)]
                .into_iter()
                .flatten()
                .map(tensor_bytes)
                .sum(),
        }
    }

    /// The bank's configuration.
    pub fn config(&self) -> &ExpertConfig {
        &self.config
    }

    /// Number of experts `E` in the bank.
    pub fn num_experts(&self) -> i64 {
        self.config.num_experts
    }

    /// Overwrites the bank's weights with `weights` (e.g. from
    /// [`crate::split_dense_ffn`] or [`crate::upcycle_dense_ffn`]); shapes
    /// and the presence of a gate and of biases must match the bank's config.
    /// An error on a quantised bank: load first, then quantise.
    pub fn load(&mut self, weights: &BankWeights) -> Result<()> {
        if self.mapped.is_some() {
            return Err(MoeError::config(
                "cannot load float weights into an expert bank that computes from mapped files",
            ));
        }
        if let Some(q) = self.quantization() {
            return Err(MoeError::config(format!(
                "cannot load float weights into an expert bank quantised to {q}: load them \
                 first, then quantise"
            )));
        }
        let mut pairs = vec![
            ("w_in", &mut self.w_in, &weights.w_in),
            ("w_out", &mut self.w_out, &weights.w_out),
        ];
        let optional = [
            ("w_gate", "SwiGLU gate", &mut self.w_gate, &weights.w_gate),
            ("b_in", "input bias", &mut self.b_in, &weights.b_in),
            ("b_out", "output bias", &mut self.b_out, &weights.b_out),
            ("b_gate", "gate bias", &mut self.b_gate, &weights.b_gate),
        ];
        for (name, meaning, dst, src) in optional {
            match (dst, src) {
                (Some(dst), Some(src)) => pairs.push((name, dst, src)),
                (None, None) => {}
                (dst, src) => {
                    return Err(MoeError::config(format!(
                        "expert weights {} `{name}` ({meaning}) but the bank {} (activation \
                         {:?}, bias {})",
                        if src.is_some() { "have" } else { "lack" },
                        if dst.is_some() { "has one" } else { "has none" },
                        self.config.activation,
                        self.config.bias
                    )))
                }
            }
        }
        for (name, dst, src) in &pairs {
            if dst.size() != src.size() {
                return Err(MoeError::Shape {
                    what: format!("expert weights {name}"),
                    expected: format!("{:?}", dst.size()),
                    got: src.size(),
                });
            }
        }
        tch::no_grad(|| {
            for (_, dst, src) in pairs {
                dst.copy_(src);
            }
        });
        Ok(())
    }

    /// The hidden activation from the two pre-activations: `ReLU(pre)`,
    /// `SiLU(gate) * pre` or the clamped SwiGLU ([`Activation`]). Shared by
    /// every dispatch strategy, whatever way it computed
    /// `pre = x W_in (+ b_in)` and `gate = x W_gate (+ b_gate)`.
    pub fn activate(&self, pre: Tensor, gate: Option<Tensor>) -> Tensor {
        match (self.config.activation, gate) {
            (Activation::SwiGlu, Some(gate)) => gate.silu() * pre,
            (Activation::ClampedSwiGlu { alpha, limit }, Some(gate)) => {
                let gate = gate.clamp_max(limit);
                let glu = (&gate * alpha).sigmoid() * gate;
                (pre.clamp(-limit, limit) + 1.0) * glu
            }
            _ => pre.relu(),
        }
    }

    /// [`ExpertBank::activate`] on one row on the host (f32).
    fn activate_row(&self, pre: &[f32], gate: &[f32]) -> Vec<f32> {
        match self.config.activation {
            Activation::SwiGlu => pre
                .iter()
                .zip(gate)
                .map(|(&p, &g)| g / (1.0 + (-g).exp()) * p)
                .collect(),
            Activation::ClampedSwiGlu { alpha, limit } => {
                let (alpha, limit) = (alpha as f32, limit as f32);
                pre.iter()
                    .zip(gate)
                    .map(|(&p, &g)| {
                        let g = g.min(limit);
                        (p.clamp(-limit, limit) + 1.0) * g / (1.0 + (-alpha * g).exp())
                    })
                    .collect()
            }
            Activation::Relu => pre.iter().map(|&p| p.max(0.0)).collect(),
        }
    }

    /// Output dropout, applied to each (token, expert) output before weighting.
    pub fn output_dropout(&self, out: Tensor, train: bool) -> Tensor {
        dropout(&out, self.config.dropout, train)
    }

    /// Expert `e` on its tokens `x: [n, d]` -> `[n, d]`, dropout included.
    pub fn forward_expert(&self, e: i64, x: &Tensor, train: bool) -> Tensor {
        self.output_dropout(self.ffn(e, x), train)
    }

    /// The bank split along the expert axis (`unbind`), in `like`'s dtype,
    /// for strategies that loop over experts. Taking `w_in[e]` once per
    /// expert would give each expert's backward its own zero-filled
    /// gradient of the whole bank (`select`'s backward), `E` times the
    /// bank's size in memory traffic; `unbind`'s backward stacks the `E`
    /// gradients once. A quantised bank's views are its int8 matrices
    /// (views, no copy) with the scales converted to `like`'s dtype once.
    pub fn views(&self, like: &Tensor) -> ExpertViews {
        let split = |t: &Tensor| as_kind_of(t, like).unbind(0);
        let float_list = |list: &[Tensor]| -> Vec<ExpertMatrix> {
            list.iter()
                .map(|t| ExpertMatrix::Float(as_kind_of(t, like)))
                .collect()
        };
        let (w_in, w_gate, w_out) = match (&self.int8, &self.mapped) {
            (None, Some(m)) => (
                float_list(&m.w_in),
                m.w_gate.as_deref().map(float_list),
                float_list(&m.w_out),
            ),
            (None, None) => {
                let float = |t: &Tensor| -> Vec<ExpertMatrix> {
                    split(t).into_iter().map(ExpertMatrix::Float).collect()
                };
                (
                    float(&self.w_in),
                    self.w_gate.as_ref().map(float),
                    float(&self.w_out),
                )
            }
            (Some(int8), _) => {
                let quantized = |w: &Int8Weight| -> Vec<ExpertMatrix> {
                    let (values, scales) = w.unbind(like.kind());
                    values
                        .into_iter()
                        .zip(scales)
                        .map(|(values, scales)| ExpertMatrix::Int8 { values, scales })
                        .collect()
                };
                (
                    quantized(&int8.w_in),
                    int8.w_gate.as_ref().map(quantized),
                    quantized(&int8.w_out),
                )
            }
        };
        ExpertViews {
            w_in,
            b_in: self.b_in.as_ref().map(split),
            w_gate,
            b_gate: self.b_gate.as_ref().map(split),
            w_out,
            b_out: self.b_out.as_ref().map(split),
        }
    }

    /// Expert `e`'s FFN (no output dropout) through `views`, with the biases
    /// fused into the GEMMs: `act(b_in + x W_in) W_out + b_out` as two `addmm`
    /// (two `mm` without biases; int8 products plus the bias when quantised).
    pub fn ffn_view(&self, views: &ExpertViews, e: usize, x: &Tensor) -> Tensor {
        fn bias(b: &Option<Vec<Tensor>>, e: usize) -> Option<&Tensor> {
            b.as_ref().map(|b| &b[e])
        }
        if let Some(m) = &self.mapped {
            m.residency.use_expert(m.key(e));
        }
        let pre = views.w_in[e].affine(x, bias(&views.b_in, e));
        let gate = views
            .w_gate
            .as_ref()
            .map(|g| g[e].affine(x, bias(&views.b_gate, e)));
        views.w_out[e].affine(&self.activate(pre, gate), bias(&views.b_out, e))
    }

    /// Expert `e`'s FFN without the output dropout (for strategies that
    /// apply dropout once to all slots), `x: [..., d]` -> `[..., d]`.
    pub fn ffn(&self, e: i64, x: &Tensor) -> Tensor {
        let w = |t: &Tensor| as_kind_of(&t.get(e), x);
        if let Some(m) = &self.mapped {
            m.residency.use_expert(m.key(e as usize));
            let at = |list: &[Tensor]| as_kind_of(&list[e as usize], x);
            let pre = plus_bias(times(x, &at(&m.w_in)), self.b_in.as_ref().map(w));
            let gate = m
                .w_gate
                .as_ref()
                .map(|g| plus_bias(times(x, &at(g)), self.b_gate.as_ref().map(w)));
            return plus_bias(
                times(&self.activate(pre, gate), &at(&m.w_out)),
                self.b_out.as_ref().map(w),
            );
        }
        let Some(int8) = &self.int8 else {
            let pre = plus_bias(times(x, &w(&self.w_in)), self.b_in.as_ref().map(w));
            let gate = self
                .w_gate
                .as_ref()
                .map(|g| plus_bias(times(x, &w(g)), self.b_gate.as_ref().map(w)));
            return plus_bias(
                times(&self.activate(pre, gate), &w(&self.w_out)),
                self.b_out.as_ref().map(w),
            );
        };
        let mm = |x: &Tensor, weight: &Int8Weight| {
            let (values, scales) = weight.expert(e, x.kind());
            int8_matmul_auto(x, &values, &scales)
        };
        let pre = plus_bias(mm(x, &int8.w_in), self.b_in.as_ref().map(w));
        let gate = int8
            .w_gate
            .as_ref()
            .map(|g| plus_bias(mm(x, g), self.b_gate.as_ref().map(w)));
        plus_bias(
            mm(&self.activate(pre, gate), &int8.w_out),
            self.b_out.as_ref().map(w),
        )
    }

    /// One token's output `Σ_j w_j · FFN_{e_j}(x)` over its routed slots
    /// (`experts`, `weights`: `[S]`, read to the host once), `x: [1, d]`:
    /// only those experts' weights are read, with a few ops each (the
    /// batch-1 decoding path, without output dropout). The weighted sum is
    /// the dispatch strategies' (`gather_weighted_sum`): weights in `x`'s
    /// dtype, one sum over the slots. Slots of weight 0 (dropped by a
    /// capacity limit) are skipped.
    ///
    /// A bf16 row on the CPU takes [`moe_core::gemv`]'s kernels: the chosen
    /// experts' input (and gate) projections in one parallel pass, the
    /// activation on the host, their output projections in a second, and
    /// the weighted sum, all in f32 with one rounding to bf16 at the end.
    pub fn one_token(&self, x: &Tensor, experts: &Tensor, weights: &Tensor) -> Tensor {
        let chosen = Vec::<i64>::try_from(experts).unwrap_or_default();
        let weights = weights.to_kind(x.kind());
        let kept = Vec::<f64>::try_from(weights.to_kind(Kind::Double)).unwrap_or_default();
        let slots: Vec<i64> = (0..chosen.len() as i64)
            .filter(|&s| kept.get(s as usize).is_some_and(|&w| w != 0.0))
            .collect();
        if slots.is_empty() {
            return x.zeros_like();
        }
        let picked: Vec<(i64, f32)> = slots
            .iter()
            .map(|&s| (chosen[s as usize], kept[s as usize] as f32))
            .collect();
        if let Some(y) = self.one_token_fused(x, &picked) {
            return y;
        }
        let outputs: Vec<Tensor> = slots
            .iter()
            .map(|&s| self.ffn(chosen[s as usize], x))
            .collect();
        let slot_weights = weights.index_select(0, &Tensor::from_slice(&slots));
        (Tensor::stack(&outputs, 0) * slot_weights.view([-1, 1, 1])).sum_dim_intlist(0, false, None)
    }

    /// [`ExpertBank::one_token`] through the one-row kernels, `picked`:
    /// (expert, weight) pairs; `None` where they do not apply.
    fn one_token_fused(&self, x: &Tensor, picked: &[(i64, f32)]) -> Option<Tensor> {
        if x.kind() != Kind::BFloat16 || x.device() != Device::Cpu || !gemv::available() {
            return None;
        }
        let x32 = gemv::row_f32(x);
        let rows: Vec<ExpertRows> = picked
            .iter()
            .map(|&(e, _)| self.expert_rows(e))
            .collect::<Option<_>>()?;
        let h = rows[0].w_in.0.size()[0] as usize;
        let (k, d) = (rows.len(), x32.len());
        let mut pre = vec![vec![0f32; h]; k];
        let mut gate = vec![vec![0f32; h]; k];
        let mut products = Vec::with_capacity(2 * k);
        for (r, (p, g)) in rows.iter().zip(pre.iter_mut().zip(gate.iter_mut())) {
            products.push(Product {
                weight: &r.w_in.0,
                x: &x32,
                y: p,
            });
            if let Some(RowMatrix(w, _)) = &r.w_gate {
                products.push(Product {
                    weight: w,
                    x: &x32,
                    y: g,
                });
            }
        }
        if !span("expert_gemv", || gemv::gemv_batch(&mut products)) {
            return None;
        }
        drop(products);
        let hidden: Vec<Vec<f32>> = rows
            .iter()
            .zip(pre.iter_mut().zip(&mut gate))
            .zip(picked)
            .map(|((r, (p, g)), &(e, _))| {
                r.w_in.scale(p);
                add_bias(p, self.b_in.as_ref(), e);
                if let Some(w) = &r.w_gate {
                    w.scale(g);
                    add_bias(g, self.b_gate.as_ref(), e);
                }
                self.activate_row(p, g)
            })
            .collect();
        let mut outs = vec![vec![0f32; d]; k];
        let mut products: Vec<Product<'_>> = rows
            .iter()
            .zip(&hidden)
            .zip(outs.iter_mut())
            .map(|((r, h), y)| Product {
                weight: &r.w_out.0,
                x: h,
                y,
            })
            .collect();
        if !span("expert_gemv", || gemv::gemv_batch(&mut products)) {
            return None;
        }
        drop(products);
        // Counted once computed (the per-expert path counts its own uses).
        if let Some(m) = &self.mapped {
            picked
                .iter()
                .for_each(|&(e, _)| m.residency.use_expert(m.key(e as usize)));
        }
        let mut y = vec![0f32; d];
        for ((r, out), &(e, weight)) in rows.iter().zip(&mut outs).zip(picked) {
            r.w_out.scale(out);
            add_bias(out, self.b_out.as_ref(), e);
            y.iter_mut()
                .zip(out.iter())
                .for_each(|(y, o)| *y += weight * o);
        }
        Some(gemv::bf16_tensor(&y, &x.size()))
    }

    /// Expert `e`'s matrices as row-major `[out, in]` (int8 ones with their
    /// row scales), `None` where the storage is not that (an f32 bank, a
    /// bank in row-major order).
    fn expert_rows<'a>(&'a self, e: i64) -> Option<ExpertRows<'a>> {
        let rows = |w: Tensor| w.is_contiguous().then_some(RowMatrix(w, None));
        if let Some(int8) = &self.int8 {
            // The scales are read in place: no copy per token.
            let q = |w: &'a Int8Weight| -> Option<RowMatrix<'a>> {
                Some(RowMatrix(w.values().get(e), Some(w.row_scales(e)?)))
            };
            return Some(ExpertRows {
                w_in: q(&int8.w_in)?,
                w_gate: match &int8.w_gate {
                    Some(w) => Some(q(w)?),
                    None => None,
                },
                w_out: q(&int8.w_out)?,
            });
        }
        let (w_in, w_gate, w_out) = match &self.mapped {
            Some(m) => {
                let at = |list: &[Tensor]| list[e as usize].tr();
                (at(&m.w_in), m.w_gate.as_deref().map(at), at(&m.w_out))
            }
            None => (
                self.w_in.get(e).tr(),
                self.w_gate.as_ref().map(|g| g.get(e).tr()),
                self.w_out.get(e).tr(),
            ),
        };
        Some(ExpertRows {
            w_in: rows(w_in)?,
            w_gate: match w_gate {
                Some(g) => Some(rows(g)?),
                None => None,
            },
            w_out: rows(w_out)?,
        })
    }

    /// Every expert at once as batched matmuls, without the output dropout:
    /// `x: [N, d]` (every expert on the same tokens) or `x: [E, C, d]` (one
    /// buffer of rows per expert) -> `[E, N or C, d]`, in `x`'s dtype. A
    /// quantised or mapped bank runs its experts one after the other
    /// ([`ExpertBank::ffn`]), so that at most one expert's matrix is ever
    /// converted to `x`'s dtype.
    pub fn batched_ffn(&self, x: &Tensor) -> Tensor {
        if self.int8.is_some() || self.mapped.is_some() {
            let per_expert = (0..self.num_experts())
                .map(|e| match x.dim() {
                    3 => self.ffn(e, &x.get(e)),
                    _ => self.ffn(e, x),
                })
                .collect::<Vec<_>>();
            return Tensor::stack(&per_expert, 0);
        }
        let w = |t: &Tensor| as_kind_of(t, x);
        let b = |t: &Tensor| w(t).unsqueeze(1);
        let pre = plus_bias(x.matmul(&w(&self.w_in)), self.b_in.as_ref().map(b));
        let gate = self
            .w_gate
            .as_ref()
            .map(|g| plus_bias(x.matmul(&w(g)), self.b_gate.as_ref().map(b)));
        plus_bias(
            self.activate(pre, gate).matmul(&w(&self.w_out)),
            self.b_out.as_ref().map(b),
        )
    }

    /// Every expert on every token, `x: [N, d]` -> `[E, N, d]`: the dense
    /// reference computation.
    pub fn forward_all(&self, x: &Tensor, train: bool) -> Tensor {
        self.output_dropout(self.batched_ffn(x), train)
    }
}

/// `x w` for one expert's `w: [in, out]`: through [`moe_core::gemv`] for
/// one bf16 row over column-major storage (`wᵀ` contiguous, as the banks
/// store it), a libtorch `matmul` otherwise.
fn times(x: &Tensor, w: &Tensor) -> Tensor {
    moe_core::gemv::linear(x, &w.tr(), None).unwrap_or_else(|| x.matmul(w))
}

/// One expert's matrices for the one-row kernels ([`ExpertBank::expert_rows`]).
struct ExpertRows<'a> {
    w_in: RowMatrix<'a>,
    w_gate: Option<RowMatrix<'a>>,
    w_out: RowMatrix<'a>,
}

/// `[out, in]` row-major, with an int8 matrix's per-row scales.
struct RowMatrix<'a>(Tensor, Option<&'a [f32]>);

impl RowMatrix<'_> {
    /// Applies the row scales (if any) to this matrix's products `y`.
    fn scale(&self, y: &mut [f32]) {
        if let Some(s) = self.1 {
            y.iter_mut().zip(s).for_each(|(y, s)| *y *= s);
        }
    }
}

/// `y += b[e]` where the bank has biases `b: [E, n]`.
fn add_bias(y: &mut [f32], b: Option<&Tensor>, e: i64) {
    if let Some(b) = b {
        y.iter_mut()
            .zip(gemv::row_f32(&b.get(e)))
            .for_each(|(y, b)| *y += b);
    }
}

/// One expert's weight matrix as the per-expert GEMMs read it.
#[derive(Debug)]
enum ExpertMatrix {
    /// `[in, out]` in the activations' dtype.
    Float(Tensor),
    /// `values: [out, in]` int8, `scales: [out]` in the activations' dtype.
    Int8 { values: Tensor, scales: Tensor },
}

impl ExpertMatrix {
    /// `x W (+ b)`, `x: [n, in]`.
    fn affine(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        if let ExpertMatrix::Float(w) = self {
            // `w` is `[in, out]` over column-major storage: `wᵀ` is the
            // contiguous `[out, in]` the one-row kernel streams.
            if let Some(y) = moe_core::gemv::linear(x, &w.tr(), bias) {
                return y;
            }
        }
        match (self, bias) {
            (ExpertMatrix::Float(w), Some(b)) => b.addmm(x, w),
            (ExpertMatrix::Float(w), None) => x.mm(w),
            (ExpertMatrix::Int8 { values, scales }, b) => plus_bias(
                int8_matmul_auto(x, values, scales),
                b.map(Tensor::shallow_clone),
            ),
        }
    }
}

/// One view per expert of each stacked parameter ([`ExpertBank::views`]).
#[derive(Debug)]
pub struct ExpertViews {
    w_in: Vec<ExpertMatrix>,
    b_in: Option<Vec<Tensor>>,
    w_gate: Option<Vec<ExpertMatrix>>,
    b_gate: Option<Vec<Tensor>>,
    w_out: Vec<ExpertMatrix>,
    b_out: Option<Vec<Tensor>>,
}
