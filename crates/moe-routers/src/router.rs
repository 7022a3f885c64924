use crate::RouterConfig;
use moe_core::{check_float, check_rank, check_same_device, Result, Routing};
use tch::Tensor;

/// A gate network: scores every expert for every token and keeps `k`.
pub trait Router: std::fmt::Debug + Send {
    /// Routes `x` (`[N, d]`). `train` switches on training-only behaviour
    /// such as noise.
    fn route(&self, x: &Tensor, train: bool) -> Result<Routing>;

    /// The configuration the router was built from.
    fn config(&self) -> &RouterConfig;

    /// `E`, the number of experts routed over.
    fn num_experts(&self) -> i64 {
        self.config().num_experts
    }

    /// `k`, the experts chosen per token.
    fn top_k(&self) -> i64 {
        self.config().top_k
    }

    /// Width `d` of the tokens the router expects.
    fn input_dim(&self) -> i64 {
        self.config().input_dim
    }

    /// Called by the training loop after each optimizer step with the
    /// routing of that step's forward pass. Routers with state that is not
    /// learned by gradient (DeepSeek-V3's balancing bias) update it here;
    /// the others do nothing.
    fn after_step(&self, _routing: &Routing) -> Result<()> {
        Ok(())
    }

    /// The shape, dtype and device checks every router runs on its input.
    fn check_input(&self, x: &Tensor, device: tch::Device) -> Result<()> {
        check_rank(x, "router input [N, d]", 2, Some(self.input_dim()))?;
        check_float(x, "router input")?;
        check_same_device(x, "router input", device)
    }
}
