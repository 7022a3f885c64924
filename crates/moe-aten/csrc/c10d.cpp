// Process groups of libtorch's c10d (the engine of torch.distributed) for
// Rust: stores (TCPStore for torchrun, HashStore for ranks that are threads
// of one process), Gloo process groups, and their collectives. The
// all-to-all is autograd-aware: its backward is the reverse exchange.
//
// Gloo's own types are touched only through c10d's helpers
// (ProcessGroupGloo::Options, createDeviceForHostname): the Gloo headers
// this compiles against may be older than the Gloo inside libtorch.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  std::string name;
  std::chrono::milliseconds timeout;
};

// Runs `f`, turning a C++ exception into a message and status 1.
template <typename F>
int guarded(char *error, size_t error_len, F &&f) {
  try {
    f();
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 1;
  } catch (...) {
    std::snprintf(error, error_len, "unknown C++ exception");
    return 1;
  }
}

// c10d records every collective it enqueues in a process-wide flight
// recorder that expects one thread to issue them; ranks that are threads
// of one process issue theirs concurrently, so issuing (not waiting) goes
// through this lock. Across processes it is never contended.
std::mutex issue_mutex;

template <typename F>
c10::intrusive_ptr<c10d::Work> issue(F &&f) {
  std::lock_guard<std::mutex> lock(issue_mutex);
  return f();
}

// The prefix of the message of a collective that failed inside autograd's
// backward; moe_aten::backward (src/lib.rs) looks for it.
constexpr const char *COLLECTIVE_FAILED = "moe_c10d collective failed: ";

// Waits for a collective, with the group's timeout.
void wait(const c10::intrusive_ptr<c10d::Work> &work, const Group &group) {
  if (!work->wait(group.timeout)) {
    throw std::runtime_error("collective did not complete within the timeout");
  }
}

// One uneven all-to-all: `input`'s rows are cut into `in_splits` blocks,
// block r goes to rank r; the result stacks the `out_splits` blocks
// received, rank by rank.
at::Tensor exchange(const Group &group, const at::Tensor &input,
                    const std::vector<int64_t> &out_splits,
                    const std::vector<int64_t> &in_splits) {
  int64_t rows = 0;
  for (auto s : out_splits) rows += s;
  auto sizes = input.sizes().vec();
  sizes[0] = rows;
  auto input_c = input.contiguous();
  auto output = at::empty(sizes, input.options());
  // alltoall_base takes the split vectors by reference and moves them away.
  std::vector<int64_t> out_copy = out_splits;
  std::vector<int64_t> in_copy = in_splits;
  auto work = issue([&] { return group.pg->alltoall_base(output, input_c, out_copy, in_copy); });
  wait(work, group);
  return output;
}

// The all-to-all as an autograd function: the gradient of the output
// goes back through the reverse exchange (splits swapped).
struct AllToAll : public torch::autograd::Function<AllToAll> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx,
                            const at::Tensor &input, const Group *group,
                            std::vector<int64_t> out_splits,
                            std::vector<int64_t> in_splits) {
    // By name: a group freed before the backward is then an error, not a
    // dangling pointer.
    ctx->saved_data["group"] = group->name;
    ctx->saved_data["timeout_ms"] = static_cast<int64_t>(group->timeout.count());
    ctx->saved_data["out_splits"] = out_splits;
    ctx->saved_data["in_splits"] = in_splits;
    return exchange(*group, input, out_splits, in_splits);
  }

  // A failure here (a peer that died, the timeout, a group freed since the
  // forward) reaches the caller of backward through the autograd engine;
  // it is rethrown with the prefix COLLECTIVE_FAILED, by which the Rust side
  // (moe_aten::backward) tells it from other libtorch errors.
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext *ctx,
      torch::autograd::variable_list grad_out) {
    auto name = ctx->saved_data["group"].toStringRef();
    auto timeout_ms = ctx->saved_data["timeout_ms"].toInt();
    std::string where = "all_to_all backward (group " + name + ", timeout " +
                        std::to_string(timeout_ms) + " ms)";
    try {
      Group group{c10d::resolve_process_group(name), name,
                  std::chrono::milliseconds(timeout_ms)};
      where = "all_to_all backward on rank " + std::to_string(group.pg->getRank()) + " of " +
              std::to_string(group.pg->getSize()) + " (group " + name + ", timeout " +
              std::to_string(timeout_ms) + " ms)";
      auto out_splits = ctx->saved_data["out_splits"].toIntVector();
      auto in_splits = ctx->saved_data["in_splits"].toIntVector();
      auto grad = exchange(group, grad_out[0], in_splits, out_splits);
      return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
    } catch (const std::exception &e) {
      throw std::runtime_error(std::string(COLLECTIVE_FAILED) + where + ": " + e.what());
    }
  }
};

std::atomic<int64_t> next_group_id{0};

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
      return c10d::ReduceOp(c10d::ReduceOp::RedOpType::SUM);
    case 1:
      return c10d::ReduceOp(c10d::ReduceOp::RedOpType::MAX);
    case 2:
      return c10d::ReduceOp(c10d::ReduceOp::RedOpType::MIN);
    default:
      throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

// Registers `backend` as the only backend of a new process group.
Group register_group(const c10::intrusive_ptr<c10d::Store> &store, int rank, int size,
                            c10::DeviceType device, c10d::ProcessGroup::BackendType type,
                            const c10::intrusive_ptr<c10d::Backend> &backend,
                            std::chrono::milliseconds timeout) {
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  pg->setBackend(device, type, backend);
  pg->setDefaultBackend(type);
  // Unique in the process: in-process ranks each hold a group.
  std::string name = "moe_layers_" + std::to_string(next_group_id++);
  pg->setGroupName(name);
  c10d::register_process_group(name, pg);
  return Group{pg, name, timeout};
}

}  // namespace

extern "C" {

int moe_c10d_tcp_store(const char *host, int port, int world_size, bool is_server,
                       int64_t timeout_ms, const char *prefix, void **out,
                       char *error, size_t error_len) {
  return guarded(error, error_len, [&] {
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(port);
    options.isServer = is_server;
    options.numWorkers = is_server ? std::optional<std::size_t>(world_size) : std::nullopt;
    options.waitWorkers = false;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    *out = new Store{store};
  });
}

int moe_c10d_hash_store(void **out, char *error, size_t error_len) {
  return guarded(error, error_len, [&] {
    *out = new Store{c10::make_intrusive<c10d::HashStore>()};
  });
}

void moe_c10d_store_free(void *store) { delete static_cast<Store *>(store); }

// A Gloo process group of `size` ranks over `store`, this one `rank`;
// blocks until every rank has joined (or the timeout).
int moe_c10d_gloo_group(void *store, int rank, int size, int64_t timeout_ms,
                        const char *hostname, void **out, char *error,
                        size_t error_len) {
  return guarded(error, error_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto base = static_cast<Store *>(store)->store;
    base->setTimeout(timeout);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gloo/", base);
    auto backend =
        c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
    *out = new Group(register_group(prefixed, rank, size, c10::DeviceType::CPU,
                                    c10d::ProcessGroup::BackendType::GLOO, backend, timeout));
  });
}

#ifdef USE_C10D_NCCL
// An NCCL process group of `size` ranks over `store` for CUDA tensors on
// this rank's device (set by the caller); NCCL connects lazily, at the
// first collective.
int moe_c10d_nccl_group(void *store, int rank, int size, int64_t timeout_ms, void **out,
                        char *error, size_t error_len) {
  return guarded(error, error_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto base = static_cast<Store *>(store)->store;
    base->setTimeout(timeout);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("nccl/", base);
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options);
    *out = new Group(register_group(prefixed, rank, size, c10::DeviceType::CUDA,
                                    c10d::ProcessGroup::BackendType::NCCL, backend, timeout));
  });
}
#endif

void moe_c10d_group_free(void *group) {
  auto g = static_cast<Group *>(group);
  try {
    c10d::unregister_process_group(g->name);
  } catch (...) {
  }
  delete g;
}

int moe_c10d_all_to_all(void *group, const at::Tensor *input, const int64_t *out_splits,
                        const int64_t *in_splits, size_t n, at::Tensor **out, char *error,
                        size_t error_len) {
  return guarded(error, error_len, [&] {
    auto g = static_cast<const Group *>(group);
    std::vector<int64_t> outs(out_splits, out_splits + n);
    std::vector<int64_t> ins(in_splits, in_splits + n);
    *out = new at::Tensor(AllToAll::apply(*input, g, outs, ins));
  });
}

int moe_c10d_all_reduce(void *group, at::Tensor *tensor, int op, char *error,
                        size_t error_len) {
  return guarded(error, error_len, [&] {
    auto g = static_cast<const Group *>(group);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = reduce_op(op);
    wait(issue([&] { return g->pg->allreduce(tensors, options); }), *g);
  });
}

int moe_c10d_broadcast(void *group, at::Tensor *tensor, int root, char *error,
                       size_t error_len) {
  return guarded(error, error_len, [&] {
    auto g = static_cast<const Group *>(group);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    wait(issue([&] { return g->pg->broadcast(tensors, options); }), *g);
  });
}

int moe_c10d_all_gather(void *group, const at::Tensor *input, at::Tensor **out,
                        char *error, size_t error_len) {
  return guarded(error, error_len, [&] {
    auto g = static_cast<const Group *>(group);
    // Gloo gathers flat buffers end to end; the result gets a rank dimension.
    auto flat = input->contiguous().reshape({-1});
    auto output = at::empty({g->pg->getSize() * flat.numel()}, flat.options());
    wait(issue([&] { return g->pg->_allgather_base(output, flat); }), *g);
    auto sizes = input->sizes().vec();
    sizes.insert(sizes.begin(), g->pg->getSize());
    *out = new at::Tensor(output.view(sizes));
  });
}

int moe_c10d_barrier(void *group, char *error, size_t error_len) {
  return guarded(error, error_len, [&] {
    auto g = static_cast<const Group *>(group);
    wait(issue([&] { return g->pg->barrier(); }), *g);
  });
}

}  // extern "C"
