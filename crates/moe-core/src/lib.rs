//! Shared foundations of `moe-layers`: the [`MoeError`] type every crate
//! returns, weight-initialisation schemes, device selection, dropout, the [`Routing`]
//! that routers produce and dispatchers consume, and small tensor checks.
//!
//! Every other crate of the workspace depends on this one and on nothing
//! above it.
#![warn(missing_docs)]

mod atomic_file;
mod check;
mod device;
mod dropout;
mod error;
mod init;
mod precision;
mod routing;
mod safetensors_file;

pub use atomic_file::{commit, temp_path, write_atomic};
pub use check::{check_float, check_rank, check_same_device};
pub use device::DeviceChoice;
pub use dropout::{dropout, keep_mask};
pub use error::{MoeError, Result};
pub use init::{linear, WeightInit};
pub use precision::{accumulation_kind, as_kind_of, linear_in_input_dtype, Precision};
pub use routing::{expert_capacity, Routing};
pub use safetensors_file::{safetensors_dtype, write_safetensors};
