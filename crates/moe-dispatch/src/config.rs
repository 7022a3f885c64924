use crate::{DenseReference, Dispatch, MaskLoop};
use serde::{Deserialize, Serialize};

/// Which dispatch strategy a MoE layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchKind {
    /// makeMoE's loop over experts with a boolean mask per expert.
    #[default]
    MaskLoop,
    /// Every expert on every token (tests and small models only).
    DenseReference,
}

impl DispatchKind {
    pub fn build(self) -> Box<dyn Dispatch> {
        match self {
            DispatchKind::MaskLoop => Box::new(MaskLoop),
            DispatchKind::DenseReference => Box::new(DenseReference),
        }
    }
}

impl std::str::FromStr for DispatchKind {
    type Err = moe_core::MoeError;

    fn from_str(s: &str) -> moe_core::Result<Self> {
        match s {
            "mask_loop" | "mask-loop" => Ok(DispatchKind::MaskLoop),
            "dense_reference" | "dense-reference" | "dense" => Ok(DispatchKind::DenseReference),
            other => Err(moe_core::MoeError::config(format!(
                "unknown dispatch `{other}`: expected mask_loop or dense_reference"
            ))),
        }
    }
}
