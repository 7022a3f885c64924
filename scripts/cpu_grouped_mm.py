"""CPU timing behind `Grouped`'s CPU segment loop and `ExpertBank::views`:
the expert GEMMs of a sorted MoE layer done three ways, forward and
forward + backward, against the FLOP-matched dense FFN (d -> k h -> d):

- grouped_mm: libtorch's `_grouped_mm` over the sorted segments;
- loop_select: one GEMM per expert, weights indexed `w_in[e]` and segments
  sliced (each backward writes a zero-filled gradient of the whole bank);
- loop_views: one `addmm` per expert through `split` / `unbind` views
  (what crates/moe-experts/src/bank.rs `views` + grouped.rs do on CPU).

Prints one JSON line per (case, variant, mode). Usage:
  .venv/bin/python scripts/cpu_grouped_mm.py [THREADS]
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
torch.manual_seed(0)


def moe(variant, x, idx, wts, w_in, b_in, w_out, b_out, e, k):
    flat = idx.flatten()
    expert, order = torch.sort(flat, stable=True)
    counts = torch.zeros(e, dtype=torch.long).scatter_add(0, flat, torch.ones_like(flat))
    token = torch.div(order, k, rounding_mode="trunc")
    xs = x.index_select(0, token)
    if variant == "grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)
        pre = torch._grouped_mm(xs, w_in, offs) + b_in.index_select(0, expert)
        out = torch._grouped_mm(F.relu(pre), w_out, offs) + b_out.index_select(0, expert)
    elif variant == "loop_select":
        parts, start = [], 0
        for i, n in enumerate(counts.tolist()):
            if n:
                seg = xs[start : start + n]
                parts.append(F.relu(seg @ w_in[i] + b_in[i]) @ w_out[i] + b_out[i])
            start += n
        out = torch.cat(parts)
    else:
        sizes = counts.tolist()
        wi, bi, wo, bo = w_in.unbind(0), b_in.unbind(0), w_out.unbind(0), b_out.unbind(0)
        parts = [
            torch.addmm(bo[i], F.relu(torch.addmm(bi[i], seg, wi[i])), wo[i])
            for i, seg in enumerate(xs.split(sizes))
            if sizes[i]
        ]
        out = torch.cat(parts)
    position = torch.zeros_like(order).scatter(0, order, torch.arange(order.numel()))
    n, d = x.shape
    return (out.index_select(0, position) * wts.flatten().unsqueeze(1)).view(n, k, d).sum(1)


def timed(f, backward, reps=5):
    def once():
        if backward:
            f().sum().backward()
        else:
            with torch.no_grad():
                f()

    once()
    once()
    start = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - start) / reps * 1e3


cases = [("makemoe", 512, 128, 512, 8, 2), ("mid", 4096, 256, 1024, 8, 2), ("fine_grained", 4096, 256, 256, 64, 8)]
for case, n, d, h, e, k in cases:
    x = torch.randn(n, d, requires_grad=True)
    params = [
        (torch.randn(e, d, h) * d**-0.5).requires_grad_(),
        torch.zeros(e, h, requires_grad=True),
        (torch.randn(e, h, d) * h**-0.5).requires_grad_(),
        torch.zeros(e, d, requires_grad=True),
    ]
    top, idx = torch.randn(n, e).topk(k, -1)
    wts = top.softmax(-1)
    up = torch.randn(d, k * h, requires_grad=True)
    down = torch.randn(k * h, d, requires_grad=True)
    for backward in (False, True):
        dense = timed(lambda: F.relu(x @ up) @ down, backward)
        for variant in ("grouped_mm", "loop_select", "loop_views"):
            ms = timed(lambda: moe(variant, x, idx, wts, *params, e, k), backward)
            print(json.dumps({
                "case": case, "variant": variant, "mode": "fwd_bwd" if backward else "fwd",
                "ms": round(ms, 2), "dense_ms": round(dense, 2), "ratio": round(ms / dense, 3),
                "threads": torch.get_num_threads(),
            }), flush=True)
