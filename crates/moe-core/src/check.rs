//! Input validation shared by every module's `forward`, so that a wrong
//! tensor is reported as a [`MoeError`] instead of a libtorch panic.

use crate::{MoeError, Result};
use tch::{Device, Tensor};

/// Checks that `t` has `rank` dimensions and, where `last` is given, that its
/// last dimension has that size.
pub fn check_rank(t: &Tensor, what: &str, rank: usize, last: Option<i64>) -> Result<()> {
    let size = t.size();
    let rank_ok = size.len() == rank;
    let last_ok = last.is_none_or(|d| size.last() == Some(&d));
    if rank_ok && last_ok {
        return Ok(());
    }
    let expected = match last {
        Some(d) => format!("{rank} dimensions with last dimension {d}"),
        None => format!("{rank} dimensions"),
    };
    Err(MoeError::Shape {
        what: what.to_string(),
        expected,
        got: size,
    })
}

/// Checks that `t` holds floating-point values.
pub fn check_float(t: &Tensor, what: &str) -> Result<()> {
    if t.is_floating_point() {
        Ok(())
    } else {
        Err(MoeError::Kind {
            what: what.to_string(),
            expected: "a floating-point dtype (f32, f16, bf16, f64)".to_string(),
            got: t.kind(),
        })
    }
}

/// Checks that `t` lives on `device`.
pub fn check_same_device(t: &Tensor, what: &str, device: Device) -> Result<()> {
    if t.device() == device {
        Ok(())
    } else {
        Err(MoeError::Device {
            what: what.to_string(),
            expected: device,
            got: t.device(),
        })
    }
}
