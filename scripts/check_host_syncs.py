"""Checks on a GPU that the libtorch operators behind `Grouped` and `Capacity`
never synchronise with the host, forward and backward.

tch does not expose `c10::cuda::warning_state()`, so the check runs the same
ATen operators, in the same order and with the same arguments as
crates/moe-dispatch/src/{sorted_slots,grouped,capacity}.rs and
crates/moe-core/src/routing.rs do, under PyTorch's sync debug mode "error"
(`torch.cuda.set_sync_debug_mode`), which raises on any operator that waits
for the device (an `.item()`, a `.cpu()`, a `nonzero`, `bincount` sizing its
output...). The Rust side reads nothing back in those files outside the
segment-loop fallback (`expert_segments_looped`), which the code review
keeps out of the CUDA paths.

Prints one line per (strategy, dtype): "ok" or the operator that synchronised.
Usage (on the GPU machine): python3 scripts/check_host_syncs.py
"""

import torch
import torch.nn.functional as F


def counts(expert, num_experts):
    # Routing::count_slots: a scatter-add, not bincount.
    return torch.zeros(num_experts, dtype=torch.long, device=expert.device).scatter_add(
        0, expert, torch.ones_like(expert)
    )


def grouped(x, indices, weights, w_in, b_in, w_out, b_out):
    n, k = indices.shape
    flat = indices.flatten()
    expert, order = torch.sort(flat, stable=True)
    offsets = counts(flat, w_in.shape[0]).cumsum(0, dtype=torch.int32)
    token = torch.div(order, k, rounding_mode="trunc")
    weight = weights.flatten().index_select(0, order)
    xs = x.index_select(0, token)
    pre = torch._grouped_mm(xs, w_in.to(x.dtype), offsets) + b_in.index_select(0, expert).to(x.dtype)
    out = torch._grouped_mm(F.relu(pre), w_out.to(x.dtype), offsets) + b_out.index_select(0, expert).to(x.dtype)
    weighted = out * weight.unsqueeze(1).to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, weighted)


def capacity(x, indices, weights, w_in, b_in, w_out, b_out, factor=1.25):
    n, k = indices.shape
    e = w_in.shape[0]
    d = x.shape[1]
    c = int(n * k / e * factor)  # expert_capacity (a host-side integer)
    expert = indices.flatten()
    position = (F.one_hot(expert, e).cumsum(0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)
    keep = position < c
    spare = torch.full_like(expert, e * c)
    row = torch.where(keep, expert * c + position, spare)
    slots = n * k
    ar = torch.arange(slots, device=x.device)
    slot_of_row = torch.full((e * c + 1,), slots, device=x.device).scatter(0, row, ar)[: e * c]
    token_of_slot = torch.cat([torch.div(ar, k, rounding_mode="trunc"), torch.full((1,), n, device=x.device)])
    x_or_zero = torch.cat([x, x.new_zeros(1, d)])
    buffer = x_or_zero.index_select(0, token_of_slot.index_select(0, slot_of_row)).view(e, c, d)
    pre = buffer.matmul(w_in.to(x.dtype)) + b_in.to(x.dtype).unsqueeze(1)
    out = F.relu(pre).matmul(w_out.to(x.dtype)) + b_out.to(x.dtype).unsqueeze(1)
    out = torch.cat([out.reshape(e * c, d), x.new_zeros(1, d)])
    per_slot = out.index_select(0, row) * (weights.flatten() * keep).unsqueeze(1).to(x.dtype)
    return per_slot.view(n, k, d).sum(1)


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    torch.manual_seed(0)
    n, d, h, e, k = 512, 128, 512, 8, 2
    for dtype in (torch.bfloat16, torch.float32):
        for name, fn in (("grouped", grouped), ("capacity", capacity)):
            dev = "cuda"
            x = torch.randn(n, d, device=dev, dtype=dtype, requires_grad=True)
            logits = torch.randn(n, e, device=dev, requires_grad=True)
            top, indices = logits.topk(k, dim=-1)
            weights = top.softmax(-1)
            params = [
                torch.randn(e, d, h, device=dev, requires_grad=True),
                torch.zeros(e, h, device=dev, requires_grad=True),
                torch.randn(e, h, d, device=dev, requires_grad=True),
                torch.zeros(e, d, device=dev, requires_grad=True),
            ]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                y = fn(x, indices, weights, *params)
                y.float().square().mean().backward()
                verdict = "ok: no host synchronisation, forward and backward"
            except RuntimeError as err:
                verdict = "SYNCHRONISES: " + str(err).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            print(f"{name} {str(dtype).removeprefix('torch.')}: {verdict}")


if __name__ == "__main__":
    main()
