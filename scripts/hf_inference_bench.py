"""Batch-1 greedy inference benchmark of Hugging Face transformers on a checkpoint folder.

The transformers side of `scripts/inference_compare.py` (our side is
`lab/src/bin/inference_bench.rs`, same flags, same JSON fields). One process,
one run, on the CPU:

- `load_s`: `from_pretrained(dir, dtype=...)` of the config's causal-LM class,
  eval mode (`import_s`: importing torch, transformers and the model's module
  before that, not counted);
- `prefill_s`, `prefill_tok_s`: one forward pass over the prompt
  (`use_cache=True`, building the KV cache), the first token its argmax;
- `decode_ms_per_token`: the `new_tokens - 1` following greedy steps, each a
  forward pass of the one last token with that cache plus its argmax, timed
  step by step (mean; `decode_ms_median` and `decode_ms_min` the median and
  fastest step: on a shared machine other work inflates the mean);
- `generate_*` (unless `--no-generate`): `model.generate(do_sample=False,
  min_new_tokens=max_new_tokens=new_tokens)` on the same prompt, timed by a
  streamer that stamps every token: `generate_prefill_s` to the first new
  token, `generate_decode_ms_per_token` between the first and the last
  (`generate_decode_ms_median`: the median interval);
  `generate_tokens_match` says whether it chose the loop's tokens;
- `rss_after_load_gib` (VmRSS), `peak_rss_gib` (ru_maxrss, the whole run);
- `tokens`: the greedy continuation (for the same-tokens check), `prompt_ids`.

The prompt is `--prompt-len` token ids from a 64-bit LCG seeded by `--seed`
(`x = x * 6364136223846793005 + 1442695040888963407 mod 2^64`, id =
`(x >> 33) % vocab_size`; the Rust side draws the same), or the JSON list in
`--prompt-ids FILE`. Prints one JSON line; `--out FILE` also writes it.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python scripts/hf_inference_bench.py --model /work/bench/olmoe-0.5b \
        --dtype bfloat16 --prompt-len 128 --new-tokens 64 --threads 2 --out /tmp/hf.json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

GIB = 1024**3
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32", "auto": "auto"}


def lcg_prompt(seed, n, vocab_size):
    """The benchmark prompt: n ids from the LCG of the module doc."""
    mask, x, ids = (1 << 64) - 1, seed & ((1 << 64) - 1), []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & mask
        ids.append((x >> 33) % vocab_size)
    return ids


def proc_status_gib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    return None


class Stamps:
    """A `generate` streamer that records when each new token arrives."""

    def __init__(self):
        self.times, self.tokens, self.prompt_seen = [], [], False

    def put(self, value):
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(t) for t in value.reshape(-1))

    def end(self):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face checkpoint folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-ids", help="a JSON list of token ids, instead of the LCG prompt")
    parser.add_argument("--experts-implementation", choices=["eager", "batched_mm", "grouped_mm"],
                        help="transformers' MoE experts kernel (default: its own choice, grouped_mm on CPU in 5.23)")
    parser.add_argument("--no-generate", action="store_true", help="skip the model.generate check")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.prompt_len < 1:
        parser.error("--new-tokens must be at least 2 and --prompt-len at least 1")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    # Importing the model's module is not loading it: resolved before the clock.
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.model))]
    import_s = time.perf_counter() - started
    started = time.perf_counter()
    extra = {"experts_implementation": args.experts_implementation} if args.experts_implementation else {}
    model = model_class.from_pretrained(args.model, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **extra)
    model.eval()
    load_s = time.perf_counter() - started
    rss_after_load = proc_status_gib("VmRSS")
    vocab = model.config.vocab_size
    if args.prompt_ids:
        prompt = json.loads(Path(args.prompt_ids).read_text())
    else:
        prompt = lcg_prompt(args.seed, args.prompt_len, vocab)
    input_ids = torch.tensor([prompt], dtype=torch.long)

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        tokens = [int(token)]
        prefill_s = time.perf_counter() - t0
        past, steps = out.past_key_values, []
        for _ in range(args.new_tokens - 1):
            t = time.perf_counter()
            out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
            tokens.append(int(token))
            steps.append(time.perf_counter() - t)
        del out, past

        result_generate = {}
        if not args.no_generate:
            stamps = Stamps()
            t0 = time.perf_counter()
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                streamer=stamps,
            )
            result_generate = {
                "generate_prefill_s": stamps.times[0] - t0,
                "generate_decode_ms_per_token": 1e3 * (stamps.times[-1] - stamps.times[0]) / (len(stamps.times) - 1),
                "generate_decode_ms_median": 1e3 * statistics.median(b - a for a, b in zip(stamps.times, stamps.times[1:])),
                "generate_tokens_match": stamps.tokens == tokens,
            }

    result = {
        "impl": "transformers",
        "model": str(args.model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": args.threads,
        "params": sum(p.numel() for p in model.parameters()),
        "prompt_len": len(prompt),
        "new_tokens": args.new_tokens,
        "import_s": import_s,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_ms_per_token": 1e3 * sum(steps) / len(steps),
        "decode_ms_median": 1e3 * statistics.median(steps),
        "decode_ms_min": 1e3 * min(steps),
        **result_generate,
        "rss_after_load_gib": rss_after_load,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": model.config._attn_implementation,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "prompt_ids": prompt,
        "tokens": tokens,
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
