//! LLaMA-MoE (Zhu et al. 2024, arXiv 2406.16554; seed document 002): a
//! dense decoder (LLaMA) becomes a decoder-family MoE model by turning each
//! layer's SwiGLU MLP into `E` experts and adding a new gate per layer.
//! Everything else (embeddings, attention, norms, head) is copied.

use super::{DecoderConfig, DecoderModel};
use crate::CausalLm;
use moe_core::{MoeError, Result};
use moe_experts::{
    split_dense_ffn, upcycle_dense_ffn, BankWeights, DenseFfnWeights, NeuronPartition,
};
use moe_routers::{Gate, RouterConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{nn, Tensor};

/// How the experts are made from a dense MLP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExpertConstruction {
    /// LLaMA-MoE's neuron split: the `h` hidden neurons are partitioned
    /// into `E` experts of `h / E` ([`moe_experts::split_dense_ffn`]), so
    /// the sum of all experts is the dense MLP.
    Split {
        /// Random or balanced-clustering partition.
        partition: NeuronPartition,
    },
    /// Upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every expert
    /// is a copy of the dense MLP.
    Upcycle,
}

impl std::str::FromStr for ExpertConstruction {
    type Err = MoeError;

    /// `split` (a random neuron split, seed 0), `balanced` (balanced
    /// k-means, 10 rounds, seed 0) or `upcycle`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "split" => Ok(ExpertConstruction::Split {
                partition: NeuronPartition::Random { seed: 0 },
            }),
            "balanced" => Ok(ExpertConstruction::Split {
                partition: NeuronPartition::BalancedKMeans {
                    iterations: 10,
                    seed: 0,
                },
            }),
            "upcycle" => Ok(ExpertConstruction::Upcycle),
            other => Err(MoeError::config(format!(
                "unknown expert construction `{other}`: expected split, balanced or upcycle"
            ))),
        }
    }
}

/// A dense-to-MoE conversion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConversion {
    /// Experts per layer `E`.
    pub num_experts: i64,
    /// Experts per token `k` of the converted model.
    pub top_k: i64,
    /// How the experts are made.
    pub construction: ExpertConstruction,
    /// Standard deviation of the new gates' weights; 0 gives zero gates,
    /// i.e. uniform routing at the start.
    pub gate_std: f64,
}

impl MoeConversion {
    /// The MoE model's config: the dense one's sizes, softmax top-k routing
    /// renormalised over the `k` chosen experts, and the routed scaling that
    /// keeps the dense MLP's output: with a split, `E` (all `E` experts at
    /// weight `1/E` each sum to the dense MLP; `k` of them at `1/k`, scaled
    /// by `E`, estimate it without bias, LLaMA-MoE's scale factor), with
    /// upcycling 1 (every expert is the MLP and the weights sum to 1).
    pub fn moe_config(&self, dense: &DecoderConfig) -> Result<DecoderConfig> {
        if dense.num_local_experts != 0 {
            return Err(MoeError::config(format!(
                "the model to convert must be dense (num_local_experts = 0), it has {} experts",
                dense.num_local_experts
            )));
        }
        if self.num_experts < 1 || self.top_k < 1 || self.top_k > self.num_experts {
            return Err(MoeError::config(format!(
                "a conversion needs 1 <= top_k <= num_experts, got top_k = {} of {}",
                self.top_k, self.num_experts
            )));
        }
        let h = dense.intermediate_size;
        let (width, scale) = match self.construction {
            ExpertConstruction::Split { .. } if h % self.num_experts != 0 => {
                return Err(MoeError::config(format!(
                    "splitting an MLP of {h} neurons into {} experts needs a divisor of {h}",
                    self.num_experts
                )))
            }
            ExpertConstruction::Split { .. } => (h / self.num_experts, self.num_experts as f64),
            ExpertConstruction::Upcycle => (h, 1.0),
        };
        if !(self.gate_std >= 0.0 && self.gate_std.is_finite()) {
            return Err(MoeError::config(format!(
                "gate_std must be a finite number >= 0, got {}",
                self.gate_std
            )));
        }
        let config = DecoderConfig {
            num_local_experts: self.num_experts,
            num_experts_per_tok: self.top_k,
            moe_intermediate_size: Some(width),
            n_shared_experts: 0,
            shared_expert_intermediate_size: None,
            first_k_dense_replace: 0,
            router: RouterConfig {
                gate: Gate::TopK {
                    norm_topk_prob: true,
                },
                bias: false,
                routed_scaling_factor: scale,
                ..RouterConfig::default()
            },
            ..dense.clone()
        };
        config.validate()?;
        Ok(config)
    }

    /// The conversion's own check: the largest difference between the
    /// logits of the dense model `dense` (its variables `vs`) and those of
    /// this conversion with every expert active and zero gates (uniform
    /// routing), on the token ids `probe`. Split experts sum to the dense
    /// MLP (scaled by `E`) and upcycled ones average to it, so the
    /// difference is rounding only.
    pub fn all_active_error(
        &self,
        dense: &dyn CausalLm,
        vs: &nn::VarStore,
        probe: &Tensor,
    ) -> Result<f64> {
        let all_active = MoeConversion {
            top_k: self.num_experts,
            gate_std: 0.0,
            ..self.clone()
        };
        let check_vs = nn::VarStore::new(vs.device());
        let dense_config = dense.lm_config();
        let check = all_active.convert(vs, dense_config.as_decoder()?, &check_vs)?;
        tch::no_grad(|| {
            let (a, b) = (
                dense.forward_t(probe, false)?,
                check.forward_t(probe, false)?,
            );
            Ok((a.logits - b.logits).abs().max().double_value(&[]))
        })
    }

    /// Builds the MoE model in `vs` from the dense model's variables
    /// `dense` (the store of a [`DecoderModel`] with `num_local_experts = 0`
    /// and config `dense_config`): every variable of the same name is
    /// copied, each layer's `mlp.{gate,up,down}_proj` becomes the expert
    /// bank, and the new gates are drawn from N(0, gate_std^2).
    pub fn convert(
        &self,
        dense: &nn::VarStore,
        dense_config: &DecoderConfig,
        vs: &nn::VarStore,
    ) -> Result<DecoderModel> {
        let config = self.moe_config(dense_config)?;
        let model = DecoderModel::new(&vs.root(), &config)?;
        let source = dense.variables();
        // In name order: the new gates are drawn one after the other, and a
        // seeded conversion draws the same gates in every process.
        let target: std::collections::BTreeMap<_, _> = vs.variables().into_iter().collect();
        let take = |name: &str| {
            source.get(name).ok_or_else(|| {
                MoeError::config(format!("the dense model has no variable `{name}`"))
            })
        };
        let mut banks = HashMap::new();
        for layer in 0..config.num_hidden_layers {
            let mlp = format!("model.layers.{layer}.mlp");
            let ffn = DenseFfnWeights {
                w_gate: Some(take(&format!("{mlp}.gate_proj.weight"))?.tr()),
                w_in: take(&format!("{mlp}.up_proj.weight"))?.tr(),
                w_out: take(&format!("{mlp}.down_proj.weight"))?.tr(),
                b_in: None,
                b_gate: None,
                b_out: None,
            };
            let bank = match self.construction {
                ExpertConstruction::Split { partition } => {
                    split_dense_ffn(&ffn, self.num_experts, partition)?
                }
                ExpertConstruction::Upcycle => upcycle_dense_ffn(&ffn, self.num_experts)?,
            };
            banks.insert(mlp, bank);
        }
        tch::no_grad(|| -> Result<()> {
            for (name, var) in &target {
                let value = match expert_tensor(&banks, name) {
                    Some(t) => t.shallow_clone(),
                    None if name.ends_with(".mlp.router.gate.weight") => {
                        var.randn_like() * self.gate_std
                    }
                    None => take(name)?.shallow_clone(),
                };
                if value.size() != var.size() {
                    return Err(MoeError::Shape {
                        what: format!("converted variable {name}"),
                        expected: format!("{:?}", var.size()),
                        got: value.size(),
                    });
                }
                var.shallow_clone().copy_(&value);
            }
            Ok(())
        })?;
        Ok(model)
    }
}

/// The stacked expert tensor `name` refers to, if it is one.
fn expert_tensor<'a>(banks: &'a HashMap<String, BankWeights>, name: &str) -> Option<&'a Tensor> {
    let (mlp, tensor) = name.split_once(".experts.")?;
    let bank = banks.get(mlp)?;
    match tensor {
        "w_in" => Some(&bank.w_in),
        "w_gate" => bank.w_gate.as_ref(),
        "w_out" => Some(&bank.w_out),
        _ => None,
    }
}
