use moe_core::{check_float, check_rank, check_same_device, Result, Routing};
use tch::{Kind, Tensor};

/// A gate network: scores every expert for every token and keeps `k`.
pub trait Router: std::fmt::Debug + Send {
    /// Routes `x` (`[N, d]`). `train` switches on training-only behaviour
    /// such as noise.
    fn route(&self, x: &Tensor, train: bool) -> Result<Routing>;

    /// `E`, the number of experts routed over.
    fn num_experts(&self) -> i64;

    /// `k`, the experts chosen per token.
    fn top_k(&self) -> i64;

    /// Width `d` of the tokens the router expects.
    fn input_dim(&self) -> i64;

    /// The shape, dtype and device checks every router runs on its input.
    fn check_input(&self, x: &Tensor, device: tch::Device) -> Result<()> {
        check_rank(x, "router input [N, d]", 2, Some(self.input_dim()))?;
        check_float(x, "router input")?;
        check_same_device(x, "router input", device)
    }
}

/// Keeps the `k` largest `logits` per row and softmaxes over them alone:
///
/// `G(x) = softmax(KeepTopK(l, k))`, with `KeepTopK` setting every other
/// entry to `-inf` (Shazeer et al. 2017, arXiv 1701.06538, eq. 3-5). The
/// weights `[N, k]` are that softmax read at the chosen experts; they sum to 1.
pub fn top_k_softmax(logits: Tensor, k: i64) -> Routing {
    let num_experts = logits.size()[1];
    let (values, indices) = logits.topk(k, -1, true, true);
    let weights = values.softmax(-1, Kind::Float).to_kind(logits.kind());
    Routing {
        indices,
        weights,
        logits,
        num_experts,
    }
}
