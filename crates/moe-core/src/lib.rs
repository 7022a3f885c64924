//! Shared foundations of `moe-layers`: the [`MoeError`] type every crate
//! returns, weight-initialisation schemes, device selection, dropout, the [`Routing`]
//! that routers produce and dispatchers consume, small tensor checks, the
//! one-row CPU kernels of batch-1 decoding ([`gemv`]), the spans that
//! time a forward pass ([`profile`]), and configs checked once where they
//! enter ([`Checked`], [`IntoChecked`]).
//!
//! Every other crate of the workspace depends on this one and on nothing
//! above it.
#![warn(missing_docs)]

mod atomic_file;
mod check;
mod checked;
mod device;
mod dropout;
mod error;
pub mod gemv;
mod init;
mod precision;
pub mod profile;
mod routing;
mod safetensors_file;

pub use atomic_file::{commit, temp_path, write_atomic};
pub use check::{check_float, check_rank, check_same_device};
pub use checked::{Checked, IntoChecked, Validate};
pub use device::DeviceChoice;
pub use dropout::{dropout, keep_mask};
pub use error::{MoeError, Result};
pub use init::{
    allocate_only, linear, var, var_column_major, var_column_major_rows, var_rows, variables_drawn,
    WeightInit,
};
pub use precision::{
    accumulation_kind, as_kind_of, linear_in_input_dtype, router_logits, Precision,
};
pub use routing::{expert_capacity, Routing};
pub use safetensors_file::{safetensors_dtype, write_safetensors};
