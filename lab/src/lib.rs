//! The lab of `moe-layers`: what the project runs to compare designs and
//! measure itself, kept out of the published crates. Its programs
//! (`src/bin/`) train many runs and time steps; this library holds what
//! they share:
//!
//! - [`processes`]: runs in child processes ([`ProcessPool`]), each
//!   printing its result as a last `RESULT {json}` line;
//! - [`markdown`]: the generated sections of hand-written Markdown files in
//!   `docs/` ([`write_generated_section`]);
//! - [`dispatch_cases`]: the MoE layers and their FLOP-matched dense FFNs
//!   that `dispatch_bench` and the `dispatch` criterion bench time.
//!
//! | program | what it measures |
//! |---|---|
//! | `compare_routers` | the router designs trained side by side (docs/routers.md) |
//! | `search_experts` | a Bayesian search over the experts' number, `k` and width (docs/search.md) |
//! | `train_bench` | ms per training step per dispatch strategy, and against makeMoE's PyTorch step |
//! | `dispatch_bench` | one MoE layer per dispatch strategy against a dense FFN |
//! | `ep_bench` | one expert-parallel layer at 1, 2 and 4 ranks (docs/scale-out.md) |
//! | `inference_bench` | decoding of a Hugging Face folder, for `scripts/inference_compare.py` |
//! | `kv_cache_bench` | KV-cached generation against recomputing the context per token |
//!
//! Run one with `cargo xtask run run --release -p moe-lab --bin NAME -- ARGS`.

pub mod dispatch_cases;
pub mod markdown;
pub mod processes;

pub use markdown::{given_args, write_generated_section};
pub use processes::{print_result, threads_per_run, Finished, ProcessPool, RESULT_PREFIX};
