use super::{device_balance_loss, load_balance_loss, load_balance_loss_over_ranks, router_z_loss};
use moe_core::{MoeError, Result, Routing};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Switch Transformer's load-balance coefficient `alpha` (arXiv 2101.03961, §2.2).
pub const SWITCH_ALPHA: f64 = 0.01;
/// ST-MoE's router z-loss coefficient (arXiv 2202.08906, §3.1).
pub const Z_LOSS_COEF: f64 = 1e-3;

/// Which balance losses a MoE layer returns, by coefficient (0 = off).
/// `Default` is makeMoE: none.
///
/// `L_aux = load_balance * L_bal + z_loss * L_z + device_balance * L_dev`
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BalanceLossConfig {
    /// `alpha` (Switch) or `alpha_1` (DeepSeekMoE's expert level) of
    /// [`load_balance_loss`]; Switch uses [`SWITCH_ALPHA`].
    pub load_balance: f64,
    /// Coefficient of [`router_z_loss`]; ST-MoE uses [`Z_LOSS_COEF`].
    pub z_loss: f64,
    /// `alpha_2` of [`device_balance_loss`].
    pub device_balance: f64,
    /// Device of each routed expert, for the device-level loss.
    pub expert_devices: Vec<i64>,
    /// Compute the load-balance loss per sequence and average.
    pub per_sequence: bool,
}

impl BalanceLossConfig {
    /// Switch Transformer's loss with `alpha = 0.01`.
    pub fn switch() -> Self {
        BalanceLossConfig {
            load_balance: SWITCH_ALPHA,
            ..Default::default()
        }
    }

    /// Whether any loss is on.
    pub fn is_active(&self) -> bool {
        self.load_balance != 0.0 || self.z_loss != 0.0 || self.device_balance != 0.0
    }

    /// Checks the weights and sizes against the layer's `num_routed_experts`.
    pub fn validate(&self, num_routed_experts: i64) -> Result<()> {
        for (name, v) in [
            ("load_balance", self.load_balance),
            ("z_loss", self.z_loss),
            ("device_balance", self.device_balance),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(MoeError::config(format!(
                    "balance coefficient {name} must be a finite number >= 0, got {v}"
                )));
            }
        }
        if self.device_balance != 0.0 && self.expert_devices.len() as i64 != num_routed_experts {
            return Err(MoeError::config(format!(
                "device_balance needs expert_devices with one device per routed expert \
                 ({num_routed_experts}), got {} entries",
                self.expert_devices.len()
            )));
        }
        Ok(())
    }

    /// The weighted sum of the active losses over `routing`, or `None` when
    /// none is active. `seq_len` is the sequence length of the routed tokens
    /// (consecutive groups of `seq_len`), needed by the per-sequence variant.
    pub fn loss(&self, routing: &Routing, seq_len: Option<i64>) -> Result<Option<Tensor>> {
        self.loss_with(routing, seq_len, None)
    }

    /// [`BalanceLossConfig::loss`] on one rank of an expert-parallel group
    /// of `world_size` ranks: the batch-level load-balance loss counts each
    /// expert's load over every rank (`global_counts`, `[E]`,
    /// [`load_balance_loss_over_ranks`]); the per-sequence variant, the
    /// z-loss and the device-level loss are per token or per sequence and
    /// stay local.
    pub fn loss_over_ranks(
        &self,
        routing: &Routing,
        seq_len: Option<i64>,
        global_counts: &Tensor,
        world_size: i64,
    ) -> Result<Option<Tensor>> {
        self.loss_with(routing, seq_len, Some((global_counts, world_size)))
    }

    fn loss_with(
        &self,
        routing: &Routing,
        seq_len: Option<i64>,
        over_ranks: Option<(&Tensor, i64)>,
    ) -> Result<Option<Tensor>> {
        let mut terms = Vec::new();
        if self.load_balance != 0.0 {
            let loss = match (self.per_sequence, over_ranks) {
                (false, Some((counts, world_size))) => {
                    load_balance_loss_over_ranks(routing, counts, world_size)
                }
                (true, _) => load_balance_loss(routing, seq_len)?,
                (false, None) => load_balance_loss(routing, None)?,
            };
            terms.push(loss * self.load_balance);
        }
        if self.z_loss != 0.0 {
            terms.push(router_z_loss(routing) * self.z_loss);
        }
        if self.device_balance != 0.0 {
            terms.push(device_balance_loss(routing, &self.expert_devices)? * self.device_balance);
        }
        Ok(terms.into_iter().reduce(|a, b| a + b))
    }
}
