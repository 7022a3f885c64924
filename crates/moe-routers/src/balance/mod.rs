//! Auxiliary losses that push a router towards an even load, returned by the
//! MoE layer and added, with their coefficients, to the training loss.

mod config;
mod device_level;
mod load_balance;
mod z_loss;

pub use config::{BalanceLossConfig, SWITCH_ALPHA, Z_LOSS_COEF};
pub use device_level::device_balance_loss;
pub use load_balance::{expert_fractions, load_balance_loss, load_balance_loss_over_ranks};
pub use z_loss::router_z_loss;

use moe_core::{MoeError, Result, Routing};

/// `N / group`, checking that `group` tokens divide the `N` of `routing`.
fn groups(routing: &Routing, group: Option<i64>) -> Result<(i64, i64)> {
    let n = routing.num_tokens();
    let group = group.unwrap_or(n);
    if group <= 0 || n % group != 0 {
        return Err(MoeError::config(format!(
            "a per-sequence balance loss needs the sequence length to divide the \
             {n} routed tokens, got a sequence length of {group}"
        )));
    }
    Ok((n / group, group))
}
