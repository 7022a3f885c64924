// Drops the gradients of tensors (PyTorch's `zero_grad(set_to_none=True)`).
// tch can only zero a gradient in place; an undefined one lets the next
// backward store its result directly instead of adding it into zeros.
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdio>
#include <exception>

extern "C" int moe_aten_clear_grads(at::Tensor *const *tensors, size_t n,
                                    char *error, size_t error_len) {
  try {
    for (size_t i = 0; i < n; ++i) tensors[i]->mutable_grad().reset();
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  }
}
