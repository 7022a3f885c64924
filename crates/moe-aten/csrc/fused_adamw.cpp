// C entry points into ATen for operators that tch's generated bindings
// leave out (they return nothing and take tensor lists). Tensors arrive as
// tch's handles, which are `at::Tensor*`. No exception crosses the C
// boundary: errors come back as a message in the caller's buffer.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> gather(at::Tensor *const *handles, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*handles[i]);
  return out;
}

}  // namespace

// One AdamW step over n parameters with libtorch's fused kernel (a
// multi-tensor CUDA kernel, a vectorised single pass per tensor on CPU):
// increments every step counter (f32 scalars on the parameters' device),
// then updates params, exp_avgs and exp_avg_sqs in place.
extern "C" int moe_aten_fused_adamw(at::Tensor *const *params,
                                    at::Tensor *const *grads,
                                    at::Tensor *const *exp_avgs,
                                    at::Tensor *const *exp_avg_sqs,
                                    at::Tensor *const *steps, size_t n,
                                    double lr, double beta1, double beta2,
                                    double weight_decay, double eps,
                                    char *error, size_t error_len) {
  try {
    auto state_steps = gather(steps, n);
    at::_foreach_add_(state_steps, 1.0);
    at::_fused_adamw_(gather(params, n), gather(grads, n), gather(exp_avgs, n),
                      gather(exp_avg_sqs, n), {}, state_steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
}
