use super::expert_fractions;
use moe_core::{MoeError, Result, Routing};
use tch::{Kind, Tensor};

/// The device-level balance loss of DeepSeekMoE (arXiv 2401.06066, eq. 15-17),
/// without its coefficient: with the routed experts split into `D` groups
/// `E_d` (one per device),
///
/// `L = sum_d f'_d P'_d`, `f'_d = 1/|E_d| sum_{i in E_d} f_i`, `P'_d = sum_{i in E_d} P_i`,
///
/// `f_i` and `P_i` as in [`super::load_balance_loss`]. `expert_devices[i]` is
/// the device of expert `i`; devices are numbered `0..D` and none may be
/// empty. The minimum under an even load and uniform probabilities is 1.
pub fn device_balance_loss(routing: &Routing, expert_devices: &[i64]) -> Result<Tensor> {
    let e = routing.num_experts;
    if expert_devices.len() as i64 != e {
        return Err(MoeError::config(format!(
            "expert_devices must give a device for each of the {e} routed experts, got {} entries",
            expert_devices.len()
        )));
    }
    let num_devices = expert_devices.iter().max().map_or(0, |d| d + 1);
    for dev in 0..num_devices {
        if !expert_devices.contains(&dev) {
            return Err(MoeError::config(format!(
                "expert_devices must number devices 0..{num_devices} with at least one \
                 expert each; device {dev} has none"
            )));
        }
    }
    if expert_devices.iter().any(|&d| d < 0) {
        return Err(MoeError::config(
            "expert_devices must hold device numbers >= 0",
        ));
    }
    let device = routing.probs.device();
    // membership[i, d] = 1 where expert i lives on device d.
    let membership = Tensor::from_slice(expert_devices)
        .to_device(device)
        .one_hot(num_devices)
        .to_kind(Kind::Float);
    let experts_per_device = membership.sum_dim_intlist(0, false, Kind::Float);
    let f = expert_fractions(routing, None)?.squeeze_dim(0); // [E]
    let p = routing
        .probs
        .to_kind(Kind::Float)
        .mean_dim(0, false, Kind::Float);
    let f_device = f.unsqueeze(0).matmul(&membership).squeeze_dim(0) / experts_per_device;
    let p_device = p.unsqueeze(0).matmul(&membership).squeeze_dim(0);
    Ok((f_device * p_device).sum(Kind::Float))
}
