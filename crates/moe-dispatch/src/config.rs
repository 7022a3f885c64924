use crate::{Auto, Capacity, DenseReference, Dispatch, Grouped, IndexedLoop, MaskLoop};
use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};

/// Which dispatch strategy a MoE layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchKind {
    /// Picks a dropless strategy by device ([`Auto`]).
    #[default]
    Auto,
    /// makeMoE's loop over experts with a boolean mask per expert.
    MaskLoop,
    /// Mixtral's loop with `where` / `index_select` / `index_add`.
    IndexedLoop,
    /// Sort by expert + grouped GEMM, dropless, no host sync.
    Grouped,
    /// Fixed capacity per expert, overflow dropped.
    Capacity { capacity_factor: f64 },
    /// Every expert on every token (tests and small models only).
    DenseReference,
}

impl DispatchKind {
    pub fn build(self) -> Box<dyn Dispatch> {
        match self {
            DispatchKind::Auto => Box::new(Auto),
            DispatchKind::MaskLoop => Box::new(MaskLoop),
            DispatchKind::IndexedLoop => Box::new(IndexedLoop),
            DispatchKind::Grouped => Box::new(Grouped),
            DispatchKind::Capacity { capacity_factor } => Box::new(Capacity { capacity_factor }),
            DispatchKind::DenseReference => Box::new(DenseReference),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            DispatchKind::Capacity { capacity_factor }
                if !(capacity_factor > 0.0 && capacity_factor.is_finite()) =>
            {
                Err(MoeError::config(format!(
                    "capacity_factor must be a positive number, got {capacity_factor}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Every strategy, for benchmarks and tests (capacity at factor 1.25).
    pub fn all() -> [DispatchKind; 6] {
        [
            DispatchKind::Auto,
            DispatchKind::MaskLoop,
            DispatchKind::IndexedLoop,
            DispatchKind::Grouped,
            DispatchKind::Capacity {
                capacity_factor: 1.25,
            },
            DispatchKind::DenseReference,
        ]
    }
}

impl std::str::FromStr for DispatchKind {
    type Err = MoeError;

    /// `auto`, `mask_loop`, `indexed_loop`, `grouped`, `capacity` (factor
    /// 1.25) or `capacity:F`, `dense_reference`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.replace('-', "_");
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s.as_str(), None),
        };
        let kind = match (name, arg) {
            ("auto", None) => DispatchKind::Auto,
            ("mask_loop", None) => DispatchKind::MaskLoop,
            ("indexed_loop", None) => DispatchKind::IndexedLoop,
            ("grouped", None) => DispatchKind::Grouped,
            ("dense_reference" | "dense", None) => DispatchKind::DenseReference,
            ("capacity", None) => DispatchKind::Capacity {
                capacity_factor: 1.25,
            },
            ("capacity", Some(f)) => DispatchKind::Capacity {
                capacity_factor: f.parse().map_err(|_| {
                    MoeError::config(format!("capacity factor `{f}` is not a number"))
                })?,
            },
            _ => {
                return Err(MoeError::config(format!(
                    "unknown dispatch `{s}`: expected auto, mask_loop, indexed_loop, grouped, \
                     capacity[:FACTOR] or dense_reference"
                )))
            }
        };
        kind.validate()?;
        Ok(kind)
    }
}
