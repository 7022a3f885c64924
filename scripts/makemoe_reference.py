"""makeMoE's model and training step in PyTorch, as the tutorial writes them
(seed 000: Head/MultiHeadAttention per head, NoisyTopkRouter, SparseMoE's
boolean-mask loop over experts, Kaiming-normal init, torch.optim.AdamW).

Two uses:

- Timing (issue #6): `train_bench --versus-makemoe` runs it with the `.venv`
  torch in rounds alternating with our own step, and prints both step times
  and their ratio. It prints one JSON line:
  {"impl":"makemoe-pytorch", "ms_per_step":..., ...}.

  Usage: python scripts/makemoe_reference.py [--steps 30] [--warmup 5]
         [--device cpu|cuda] [--eval-iters 0] [--data data/tinyshakespeare.txt]
         [--threads N]

- The reference of our makeMoE model (`--check DIR`, run by the test
  `moe-layers-train --test makemoe_pytorch`). DIR holds what the Rust test
  wrote: `init.safetensors` (our model's initial variables, under our names
  and layouts), `batches.safetensors` (`x.S`, `y.S`: the batch of step S) and
  `check.json` (`{"steps", "learning_rate", "weight_decay", "noise_seed",
  "min_router_gap"}`). With dropout 0 this script loads the weights into
  makeMoE's modules (in the weights' dtype), trains `steps` steps with
  torch.optim.AdamW and writes
  `reference.safetensors`: `loss` [steps], `grad.S.NAME` (the gradient of
  our variable NAME at step S, in our layout), and the router noise it drew,
  `noise.S.L` [B*T, E] for layer L at step S, with the experts it chose,
  `experts.S.L` [B*T, k] (ascending), plus `reference.json` (`parameters`,
  `losses`, `min_router_gap`). The noise is makeMoE's `randn_like`, except
  that a token whose k-th and (k+1)-th noisy logits are closer than
  `min_router_gap` draws again: the choice of experts then cannot depend on
  rounding, so both implementations route alike. Gradients are zeroed, not
  set to None, so that AdamW updates an expert that got no token, as ours
  does. Needs torch only (no numpy, no safetensors package).
"""

import argparse
import warnings
import json
import time
from pathlib import Path

# torch warns on import when numpy is absent; nothing here needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn as nn
from torch.nn import functional as F
from torch.nn import init

# makeMoE's hyper-parameters
batch_size = 16
block_size = 32
learning_rate = 1e-3
n_embd = 128
n_head = 8
n_layer = 8
dropout = 0.1
num_experts = 8
top_k = 2


class Head(nn.Module):
    def __init__(self, head_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)
        q = self.query(x)
        wei = q @ k.transpose(-2, -1) * C**-0.5  # makeMoE scales by n_embd^-0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)
        return wei @ v


class MultiHeadAttention(nn.Module):
    def __init__(self, num_heads, head_size):
        super().__init__()
        self.heads = nn.ModuleList([Head(head_size) for _ in range(num_heads)])
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout(self.proj(out))


class Expert(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


def draw_noise(logits, noise_logits):
    """makeMoE's `torch.randn_like(logits)`; `--check` replaces it with a
    recorder (`GivenNoise`) whose draws are handed to the Rust model."""
    return torch.randn_like(logits)


class NoisyTopkRouter(nn.Module):
    def __init__(self, n_embed, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.topkroute_linear = nn.Linear(n_embed, num_experts)
        self.noise_linear = nn.Linear(n_embed, num_experts)

    def forward(self, mh_output):
        logits = self.topkroute_linear(mh_output)
        noise_logits = self.noise_linear(mh_output)
        noise = draw_noise(logits, noise_logits) * F.softplus(noise_logits)
        noisy_logits = logits + noise
        top_k_logits, indices = noisy_logits.topk(self.top_k, dim=-1)
        zeros = torch.full_like(noisy_logits, float("-inf"))
        sparse_logits = zeros.scatter(-1, indices, top_k_logits)
        return F.softmax(sparse_logits, dim=-1), indices


class SparseMoE(nn.Module):
    def __init__(self, n_embed, num_experts, top_k):
        super().__init__()
        self.router = NoisyTopkRouter(n_embed, num_experts, top_k)
        self.experts = nn.ModuleList([Expert(n_embed) for _ in range(num_experts)])
        self.top_k = top_k

    def forward(self, x):
        gating_output, indices = self.router(x)
        final_output = torch.zeros_like(x)
        flat_x = x.view(-1, x.size(-1))
        flat_gating_output = gating_output.view(-1, gating_output.size(-1))
        for i, expert in enumerate(self.experts):
            expert_mask = (indices == i).any(dim=-1)
            flat_mask = expert_mask.view(-1)
            if flat_mask.any():
                expert_input = flat_x[flat_mask]
                expert_output = expert(expert_input)
                gating_scores = flat_gating_output[flat_mask, i].unsqueeze(1)
                weighted_output = expert_output * gating_scores
                final_output[expert_mask] += weighted_output.squeeze(1)
        return final_output


class Block(nn.Module):
    def __init__(self, n_embed, n_head, num_experts, top_k):
        super().__init__()
        head_size = n_embed // n_head
        self.sa = MultiHeadAttention(n_head, head_size)
        self.smoe = SparseMoE(n_embed, num_experts, top_k)
        self.ln1 = nn.LayerNorm(n_embed)
        self.ln2 = nn.LayerNorm(n_embed)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.smoe(self.ln2(x))


class SparseMoELanguageModel(nn.Module):
    def __init__(self, vocab_size, device):
        super().__init__()
        self.device = device
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(
            *[Block(n_embd, n_head, num_experts, top_k) for _ in range(n_layer)]
        )
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(
            torch.arange(T, device=self.device)
        )
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


# ---------------------------------------------------------------------------
# --check: the reference of our model, step by step

SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}


def read_safetensors(path):
    """The tensors of a safetensors file (8-byte header length, JSON header, data)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        flat = torch.frombuffer(bytearray(raw[base + a : base + b]), dtype=SAFETENSORS_DTYPES[meta["dtype"]])
        out[name] = flat.reshape(meta["shape"])
    return out


def write_safetensors(path, tensors):
    """Writes `tensors` (name -> tensor) as a safetensors file, through a
    file-backed tensor (`torch.from_file(shared=True)`) instead of numpy."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    items = [(k, t.detach().cpu().contiguous()) for k, t in tensors.items()]
    header, offset = {}, 0
    for k, t in items:
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.truncate(base + offset)
    buf = torch.from_file(str(path), shared=True, size=base + offset, dtype=torch.uint8)
    for k, t in items:
        a, b = header[k]["data_offsets"]
        buf[base + a : base + b].copy_(t.reshape(-1).view(torch.uint8))
    del buf


class GivenNoise:
    """makeMoE's router noise, drawn and recorded: `randn_like`, redrawn for
    each token whose k-th and (k+1)-th noisy logits lie closer than `gap`."""

    def __init__(self, gap, seed):
        self.gap = gap
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = []
        self.experts = []
        self.min_gap = float("inf")

    def __call__(self, logits, noise_logits):
        logits, scale = logits.detach(), F.softplus(noise_logits.detach())
        shape = (-1, logits.size(-1))
        logits, scale = logits.reshape(shape), scale.reshape(shape)
        eps = torch.randn(logits.shape, generator=self.generator, dtype=logits.dtype)
        for _ in range(1000):
            top = (logits + eps * scale).topk(top_k + 1, dim=-1).values
            close = top[:, top_k - 1] - top[:, top_k] < self.gap
            if not close.any():
                break
            eps[close] = torch.randn((int(close.sum()), logits.size(-1)), generator=self.generator, dtype=logits.dtype)
        else:
            raise RuntimeError(f"no noise clears the router gap {self.gap} after 1000 draws")
        self.min_gap = min(self.min_gap, float((top[:, top_k - 1] - top[:, top_k]).min()))
        self.draws.append(eps)
        chosen = (logits + eps * scale).topk(top_k, dim=-1).indices
        self.experts.append(chosen.sort(dim=-1).values)
        return eps.reshape(noise_logits.shape)


def our_layout(get):
    """Our variables (name -> tensor) from makeMoE's (`get(makeMoE name)`):
    the heads' query/key/value rows stacked into `attn.qkv` [3C, C], and
    the experts' `nn.Linear` weights transposed and stacked into banks
    `w_in` [E, C, 4C], `w_out` [E, 4C, C]."""
    ours = {
        "tok_emb.weight": get("token_embedding_table.weight"),
        "pos_emb.weight": get("position_embedding_table.weight"),
        "ln_f.weight": get("ln_f.weight"),
        "ln_f.bias": get("ln_f.bias"),
        "lm_head.weight": get("lm_head.weight"),
        "lm_head.bias": get("lm_head.bias"),
    }
    for i in range(n_layer):
        b = f"blocks.{i}."
        ours[b + "attn.qkv"] = torch.cat(
            [get(f"{b}sa.heads.{h}.{part}.weight") for part in ("query", "key", "value") for h in range(n_head)]
        )
        for ours_name, theirs in [
            ("attn.proj", "sa.proj"),
            ("ln1", "ln1"),
            ("ln2", "ln2"),
            ("moe.router.gate", "smoe.router.topkroute_linear"),
            ("moe.router.noise", "smoe.router.noise_linear"),
        ]:
            for p in ("weight", "bias"):
                ours[f"{b}{ours_name}.{p}"] = get(f"{b}{theirs}.{p}")
        experts = [f"{b}smoe.experts.{e}.net." for e in range(num_experts)]
        ours[b + "moe.experts.w_in"] = torch.stack([get(e + "0.weight").t() for e in experts])
        ours[b + "moe.experts.b_in"] = torch.stack([get(e + "0.bias") for e in experts])
        ours[b + "moe.experts.w_out"] = torch.stack([get(e + "2.weight").t() for e in experts])
        ours[b + "moe.experts.b_out"] = torch.stack([get(e + "2.bias") for e in experts])
    return ours


def load_ours(model, ours):
    """Copies our variables into makeMoE's parameters: the inverse of
    `our_layout`, checked by reading the parameters back through it."""
    params = dict(model.named_parameters())
    C, hs = n_embd, n_embd // n_head
    plain = {
        "tok_emb.weight": "token_embedding_table.weight",
        "pos_emb.weight": "position_embedding_table.weight",
    }
    renames = [
        ("attn.proj.", "sa.proj."),
        ("moe.router.gate.", "smoe.router.topkroute_linear."),
        ("moe.router.noise.", "smoe.router.noise_linear."),
    ]
    bank = {"w_in": "0.weight", "b_in": "0.bias", "w_out": "2.weight", "b_out": "2.bias"}
    with torch.no_grad():
        for name, value in ours.items():
            if name.endswith(".attn.qkv"):
                b = name[: -len("attn.qkv")]
                for j, part in enumerate(("query", "key", "value")):
                    for h in range(n_head):
                        rows = value[j * C + h * hs : j * C + (h + 1) * hs]
                        params[f"{b}sa.heads.{h}.{part}.weight"].copy_(rows)
            elif ".moe.experts." in name:
                b, kind = name.split(".moe.experts.")
                for e in range(num_experts):
                    v = value[e].t() if kind.startswith("w_") else value[e]
                    params[f"{b}.smoe.experts.{e}.net.{bank[kind]}"].copy_(v)
            else:
                theirs = plain.get(name, name)
                for a, b in renames:
                    theirs = theirs.replace(a, b)
                params[theirs].copy_(value)
    back = our_layout(lambda n: params[n].detach())
    if set(back) != set(ours) or any(not torch.equal(back[k], ours[k]) for k in ours):
        raise ValueError(f"our variables do not map onto makeMoE's: {sorted(set(back) ^ set(ours))}")


def check(folder):
    folder = Path(folder)
    spec = json.loads((folder / "check.json").read_text())
    init_ours = read_safetensors(folder / "init.safetensors")
    batches = read_safetensors(folder / "batches.safetensors")
    global dropout, draw_noise
    dropout = 0.0
    noise = GivenNoise(spec["min_router_gap"], spec["noise_seed"])
    draw_noise = noise
    vocab_size = init_ours["lm_head.bias"].numel()
    # In the dtype of the weights given (the test's: f64, see its docs).
    model = SparseMoELanguageModel(vocab_size, "cpu").to(init_ours["lm_head.bias"].dtype)
    load_ours(model, init_ours)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec["learning_rate"], weight_decay=spec["weight_decay"]
    )
    model.train()
    params = dict(model.named_parameters())
    # makeMoE's loop sets gradients to None, so AdamW skips (does not decay)
    # an expert that got no token; ours updates every parameter, as an
    # optimizer over all of them does. Zero gradients instead of None make
    # both optimizers see the same parameters.
    for p in params.values():
        p.grad = torch.zeros_like(p)
    out, losses = {}, []
    for step in range(spec["steps"]):
        noise.draws, noise.experts = [], []
        loss = model(batches[f"x.{step}"], batches[f"y.{step}"])
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        losses.append(loss.item())
        grads = our_layout(lambda name: params[name].grad.clone())
        out.update({f"grad.{step}.{k}": v for k, v in grads.items()})
        for layer, eps in enumerate(noise.draws):
            out[f"noise.{step}.{layer}"] = eps
        for layer, chosen in enumerate(noise.experts):
            out[f"experts.{step}.{layer}"] = chosen
        optimizer.step()
    out["loss"] = torch.tensor(losses, dtype=torch.float64)
    write_safetensors(folder / "reference.safetensors", out)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "losses": losses,
        "min_router_gap": noise.min_gap,
        "torch": torch.__version__,
    }
    (folder / "reference.json").write_text(json.dumps(summary))
    print(json.dumps(summary))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-iters", type=int, default=0)
    parser.add_argument("--data", default="data/tinyshakespeare.txt")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument("--check", metavar="DIR", help="train from DIR's weights and batches, write the reference")
    args = parser.parse_args()
    if args.check:
        torch.set_num_threads(1)
        check(args.check)
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(1337)
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - block_size, (batch_size,))
        x = torch.stack([d[i : i + block_size] for i in ix])
        y = torch.stack([d[i + 1 : i + block_size + 1] for i in ix])
        return x.to(args.device), y.to(args.device)

    model = SparseMoELanguageModel(len(chars), args.device)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            init.kaiming_normal_(m.weight)
    model = model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        xb, yb = get_batch("train")
        loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    model.train()
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    result = {
        "impl": "makemoe-pytorch",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "ms_per_step": 1e3 * seconds / args.steps,
        "tokens_per_s": batch_size * block_size * args.steps / seconds,
        "last_loss": loss.item(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if args.eval_iters > 0:
        # makeMoE's estimate_loss: eval mode, one batch at a time, both splits.
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for split in ("train", "val"):
                for _ in range(args.eval_iters):
                    model(*get_batch(split))
        sync()
        result["eval_iters"] = args.eval_iters
        result["eval_s"] = time.perf_counter() - start
    print(json.dumps(result))


if __name__ == "__main__":
    main()
