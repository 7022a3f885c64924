use crate::SparseMoeConfig;
use moe_core::{check_float, check_same_device, MoeError, Result, Routing};
use moe_dispatch::Dispatch;
use moe_experts::ExpertBank;
use moe_routers::Router;
use tch::{nn, Tensor};

/// Sparse Mixture-of-Experts feed-forward layer (Shazeer et al. 2017;
/// Mixtral, arXiv 2401.04088):
///
/// `y(x) = sum_{e in TopK(x)} G(x)_e * FFN_e(x)`
///
/// The router picks `k` experts per token; the dispatch strategy runs only
/// those experts and sums their outputs weighted by the gate.
#[derive(Debug)]
pub struct SparseMoe {
    router: Box<dyn Router>,
    experts: ExpertBank,
    dispatch: Box<dyn Dispatch>,
    config: SparseMoeConfig,
}

/// The layer's output and the routing that produced it (for balance
/// losses and routing statistics).
#[derive(Debug)]
pub struct MoeOutput {
    /// Same shape as the input.
    pub output: Tensor,
    /// Routing of the flattened tokens, `N = x.numel() / d`.
    pub routing: Routing,
}

impl SparseMoe {
    /// Parameters: `p/router/...` and `p/experts/{w_in,b_in,w_out,b_out}`.
    pub fn new(p: &nn::Path, config: SparseMoeConfig) -> Result<Self> {
        config.validate()?;
        Ok(SparseMoe {
            router: config.router_config().build(&(p / "router"))?,
            experts: ExpertBank::new(&(p / "experts"), &config.expert_config())?,
            dispatch: config.dispatch.build(),
            config,
        })
    }

    pub fn config(&self) -> &SparseMoeConfig {
        &self.config
    }

    pub fn experts(&self) -> &ExpertBank {
        &self.experts
    }

    pub fn router(&self) -> &dyn Router {
        self.router.as_ref()
    }

    /// Replaces the dispatch strategy; the parameters stay.
    pub fn set_dispatch(&mut self, dispatch: Box<dyn Dispatch>) {
        self.dispatch = dispatch;
    }

    /// `x`: `[..., d]` (any leading dims) -> same shape.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<MoeOutput> {
        let d = self.config.n_embd;
        let shape = x.size();
        if shape.is_empty() || shape[shape.len() - 1] != d {
            return Err(MoeError::Shape {
                what: "MoE input".to_string(),
                expected: format!("[..., {d}]"),
                got: shape,
            });
        }
        check_float(x, "MoE input")?;
        check_same_device(x, "MoE input", self.experts.w_in.device())?;
        let flat = x.reshape([-1, d]);
        let routing = self.router.route(&flat, train)?;
        let output = self
            .dispatch
            .combine(&flat, &routing, &self.experts, train)
            .view(shape.as_slice());
        Ok(MoeOutput { output, routing })
    }
}
