use crate::{Auto, Capacity, DenseReference, Dispatch, Grouped, IndexedLoop, MaskLoop};
use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};

/// The capacity factor `capacity` without `:F` stands for (GShard's 1.25).
pub const DEFAULT_CAPACITY_FACTOR: f64 = 1.25;

/// Which dispatch strategy a MoE layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
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
    /// Fixed capacity per expert, overflow dropped ([`Capacity`]); the
    /// capacity comes from the router's `capacity_factor`, which must be set.
    Capacity,
    /// Every expert on every token (tests and small models only).
    DenseReference,
}

impl DispatchKind {
    /// The strategy this kind names, ready to run.
    pub fn build(self) -> Box<dyn Dispatch> {
        match self {
            DispatchKind::Auto => Box::new(Auto),
            DispatchKind::MaskLoop => Box::new(MaskLoop),
            DispatchKind::IndexedLoop => Box::new(IndexedLoop),
            DispatchKind::Grouped => Box::new(Grouped),
            DispatchKind::Capacity => Box::new(Capacity),
            DispatchKind::DenseReference => Box::new(DenseReference),
        }
    }

    /// Every strategy, for benchmarks and tests.
    pub fn all() -> [DispatchKind; 6] {
        [
            DispatchKind::Auto,
            DispatchKind::MaskLoop,
            DispatchKind::IndexedLoop,
            DispatchKind::Grouped,
            DispatchKind::Capacity,
            DispatchKind::DenseReference,
        ]
    }
}

impl std::str::FromStr for DispatchKind {
    type Err = MoeError;

    /// `auto`, `mask_loop`, `indexed_loop`, `grouped`, `capacity` or
    /// `dense_reference` (`-` may replace `_`). `capacity:F` is a
    /// [`DispatchSpec`], since `F` is the router's setting.
    fn from_str(s: &str) -> Result<Self> {
        match s.replace('-', "_").as_str() {
            "auto" => Ok(DispatchKind::Auto),
            "mask_loop" => Ok(DispatchKind::MaskLoop),
            "indexed_loop" => Ok(DispatchKind::IndexedLoop),
            "grouped" => Ok(DispatchKind::Grouped),
            "capacity" => Ok(DispatchKind::Capacity),
            "dense_reference" | "dense" => Ok(DispatchKind::DenseReference),
            other if other.starts_with("capacity:") => Err(MoeError::config(format!(
                "`{other}` names a capacity factor, which is the router's setting: parse it \
                 as a DispatchSpec, or set router.capacity_factor and dispatch `capacity`"
            ))),
            other => Err(MoeError::config(format!(
                "unknown dispatch `{other}`: expected auto, mask_loop, indexed_loop, grouped, \
                 capacity or dense_reference"
            ))),
        }
    }
}

/// A dispatch strategy as a command line names it: `capacity[:F]` is the
/// capacity strategy together with the router's capacity factor `F`
/// (default [`DEFAULT_CAPACITY_FACTOR`]); the other names are a strategy
/// alone. [`DispatchSpec::apply`] writes both settings into a config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DispatchSpec {
    /// The strategy.
    pub kind: DispatchKind,
    /// The router capacity factor the spec sets (`capacity[:F]` only).
    pub capacity_factor: Option<f64>,
}

impl DispatchSpec {
    /// Sets `dispatch` to the strategy and, for `capacity[:F]`, the router's
    /// `capacity_factor` to `F`; other strategies leave the capacity factor
    /// as it was (a capacity limit works with every strategy).
    pub fn apply(&self, dispatch: &mut DispatchKind, capacity_factor: &mut Option<f64>) {
        *dispatch = self.kind;
        if let Some(f) = self.capacity_factor {
            *capacity_factor = Some(f);
        }
    }
}

impl std::str::FromStr for DispatchSpec {
    type Err = MoeError;

    /// `auto`, `mask_loop`, `indexed_loop`, `grouped`, `capacity` (factor
    /// 1.25) or `capacity:F` (`F` a positive number), `dense_reference`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.replace('-', "_");
        let Some(factor) = s.strip_prefix("capacity:") else {
            let kind: DispatchKind = s.parse()?;
            let capacity_factor =
                (kind == DispatchKind::Capacity).then_some(DEFAULT_CAPACITY_FACTOR);
            return Ok(DispatchSpec {
                kind,
                capacity_factor,
            });
        };
        let factor: f64 = factor
            .parse()
            .map_err(|_| MoeError::config(format!("capacity factor `{factor}` is not a number")))?;
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(MoeError::config(format!(
                "capacity factor must be a positive number, got {factor}"
            )));
        }
        Ok(DispatchSpec {
            kind: DispatchKind::Capacity,
            capacity_factor: Some(factor),
        })
    }
}
