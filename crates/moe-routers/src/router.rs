use crate::{RouterConfig, RouterDims};
use moe_core::{check_float, check_rank, check_same_device, Result, Routing};
use tch::Tensor;

/// A gate network: scores every expert for every token and keeps `k`.
pub trait Router: std::fmt::Debug + Send {
    /// The gate's own choice for `x` (`[N, d]`): the experts and their
    /// weights before the routed scaling factor and the capacity limit of
    /// [`Router::config`]. `train` switches on training-only behaviour such
    /// as noise.
    fn select(&self, x: &Tensor, train: bool) -> Result<Routing>;

    /// [`Router::select`] for `x` holding sequences of `seq_len` tokens
    /// (`N = B T`, sequence-major: row `b T + t` is position `t` of
    /// sequence `b`); `None`: one sequence of `N` tokens. Only gates that
    /// choose among tokens read it (expert choice per position,
    /// [`crate::ExpertChoiceScope::PerPosition`]); the others choose per
    /// token and ignore it.
    fn select_sequences(&self, x: &Tensor, seq_len: Option<i64>, train: bool) -> Result<Routing> {
        let _ = seq_len;
        self.select(x, train)
    }

    /// Routes `x` (`[N, d]`, one sequence): [`Router::route_sequences`]
    /// with `seq_len = None`.
    fn route(&self, x: &Tensor, train: bool) -> Result<Routing> {
        self.route_sequences(x, None, train)
    }

    /// Routes `x` (`[N, d]`, sequences of `seq_len` tokens, see
    /// [`Router::select_sequences`]): the gate's selection, then
    /// [`RouterConfig::finish`] (scaling, capacity).
    fn route_sequences(&self, x: &Tensor, seq_len: Option<i64>, train: bool) -> Result<Routing> {
        self.config()
            .finish(self.select_sequences(x, seq_len, train)?)
    }

    /// The sizes the router was built for.
    fn dims(&self) -> RouterDims;

    /// The settings the router was built from.
    fn config(&self) -> &RouterConfig;

    /// `E`, the number of experts routed over.
    fn num_experts(&self) -> i64 {
        self.dims().num_experts
    }

    /// `k`, the experts chosen per token.
    fn top_k(&self) -> i64 {
        self.dims().top_k
    }

    /// Width `d` of the tokens the router expects.
    fn input_dim(&self) -> i64 {
        self.dims().input_dim
    }

    /// Called by the training loop after each optimizer step with the
    /// routing of that step's forward pass. Routers with state that is not
    /// learned by gradient (DeepSeek-V3's balancing bias) update it here;
    /// the others do nothing.
    fn after_step(&self, routing: &Routing) -> Result<()> {
        self.after_step_with_counts(&routing.expert_counts())
    }

    /// [`Router::after_step`] from the slots each expert got, `[E]` (over
    /// every rank of an expert-parallel group, so that every rank's copy of
    /// the router's state changes alike).
    fn after_step_with_counts(&self, _counts: &Tensor) -> Result<()> {
        Ok(())
    }

    /// The shape, dtype and device checks every router runs on its input.
    fn check_input(&self, x: &Tensor, device: tch::Device) -> Result<()> {
        check_rank(x, "router input [N, d]", 2, Some(self.input_dim()))?;
        check_float(x, "router input")?;
        check_same_device(x, "router input", device)
    }
}
