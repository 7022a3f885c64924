"""Side-by-side batch-1 greedy inference: transformers against moe-layers.

For each checkpoint folder, runs `scripts/hf_inference_bench.py` (transformers)
and `target/release/inference_bench` (ours), each in a process of
its own with the same flags and `OMP_NUM_THREADS`, in the order
transformers, ours (once per `--ours-run`), transformers (a noisy machine's drift shows as the gap
between the two transformers runs), then prints a table: load s, prefill
tok/s, decode ms/token (the per-step loop's mean and median; `generate`'s
beside it), peak RSS GiB, each ours/transformers ratio (against the better of the
transformers runs), whether the greedy tokens agree (at float32 they
must; at bfloat16 the first position that differs is reported), and the
machine's 1-minute load average before and after the run (other work on a
shared machine: compare runs made under similar load). Every run's
JSON goes to `--out-dir`, and the table to `--out-dir/table.md`.

Build ours first (release, for timings):
    cargo build --release -p moe-lab --bin inference_bench

transformers runs in this interpreter: another version installed beside
`.venv` (`pip install --target /work/tf/5.25.0 transformers==5.25.0`) is
taken with `PYTHONPATH=/work/tf/5.25.0`; the table names each run's version.

Usage:
    .venv/bin/python scripts/inference_compare.py /work/bench/olmoe-0.5b --dtype bfloat16 --threads 2
    .venv/bin/python scripts/inference_compare.py /work/bench/olmoe-0.5b --dtype float32 --only ours
    .venv/bin/python scripts/inference_compare.py /work/bench/olmoe-1b-7b --ours-run '' --ours-run '--quantize-experts int8'
    .venv/bin/python scripts/inference_compare.py /work/bench/olmoe-1b-7b --only transformers --hf-runs 1
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / "target" / "release" / "inference_bench"
HF = ROOT / "scripts" / "hf_inference_bench.py"
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "f32", "auto": "auto"}


def run_one(impl, args, model, out, extra=()):
    common = ["--model", str(model), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
              "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(out)]
    if args.no_generate:
        common.append("--no-generate")
    if impl == "transformers":
        cmd = [sys.executable, str(HF), "--dtype", args.dtype, *common]
    else:
        cmd = [str(args.ours), "--dtype", SHORT_DTYPE[args.dtype], *common, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print("$", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        print(f"  {impl} failed (exit {done.returncode}):\n{tail}", flush=True)
        return {"impl": impl, "error": tail or f"exit {done.returncode}"}
    result = json.loads(out.read_text())
    result["extra_args"] = " ".join(extra)
    # The machine's 1-minute load average before and after: other work on a shared machine.
    result["loadavg"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    out.write_text(json.dumps(result) + "\n")
    print(f"  load {result['load_s']:.2f} s, prefill {result['prefill_tok_s']:.1f} tok/s, "
          f"decode {result['decode_ms_per_token']:.1f} ms/token, peak {result['peak_rss_gib']:.2f} GiB", flush=True)
    return result


def agreement(ours, ref):
    """'yes', or where the greedy tokens first differ."""
    if ours.get("prompt_ids") != ref.get("prompt_ids"):
        return "different prompts!"
    a, b = ours["tokens"], ref["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) == len(b):
        return "yes"
    return f"no: first differs at {first if first is not None else min(len(a), len(b))} of {len(a)}"


# Table columns: (header, key, format, lower is better).
COLUMNS = [
    ("load s", "load_s", ".2f", True),
    ("prefill tok/s", "prefill_tok_s", ".1f", False),
    ("decode ms/token", "decode_ms_per_token", ".1f", True),
    ("decode median", "decode_ms_median", ".1f", True),
    ("generate ms/token", "generate_decode_ms_per_token", ".1f", True),
    ("generate median", "generate_decode_ms_median", ".1f", True),
    ("peak RSS GiB", "peak_rss_gib", ".2f", True),
]


def table(model, args, runs):
    ok = [r for r in runs if "error" not in r]
    hf = [r for r in ok if r["impl"] == "transformers"]
    best = {}  # the better transformers run, column by column
    for _, key, _, lower in COLUMNS:
        values = [r[key] for r in hf if r.get(key) is not None]
        if values:
            best[key] = min(values) if lower else max(values)
    lines = [f"### {model} ({args.dtype}, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens)", "",
             "| run | params | " + " | ".join(c[0] for c in COLUMNS) + " | same tokens | load avg |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error'].splitlines()[-1][:120]} |" + " |" * (len(COLUMNS) + 2))
            continue
        same = "-" if r["impl"] == "transformers" or not hf else agreement(r, hf[0])
        cells = ["-" if r.get(key) is None else format(r[key], spec) for _, key, spec, _ in COLUMNS]
        version = r.get("versions", {}).get("transformers") if r["impl"] == "transformers" else None
        name = f"{r['impl']}{' ' + version if version else ''} ({r['dtype']}{', ' + r['build'] if 'build' in r else ''})"
        if r.get("extra_args"):
            name += f" `{r['extra_args']}`"
        lines.append(f"| {name} | {r['params']:,} | " + " | ".join(cells) + f" | {same} | {r['loadavg'][0]}, {r['loadavg'][1]} |")
    for r in ok:
        if r["impl"] != "transformers" and best:
            cells = ["-" if key not in best or r.get(key) is None else f"{r[key] / best[key]:.2f}x" for _, key, _, _ in COLUMNS]
            label = f"`{r['extra_args']}`" if r.get("extra_args") else ""
            lines.append(f"| ours {label} / transformers | | " + " | ".join(cells) + " | | |")
    if len(hf) > 1 and hf[0]["tokens"] != hf[1]["tokens"]:
        lines.append("\nwarning: the two transformers runs chose different tokens")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Hugging Face checkpoint folders")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "auto"], default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["transformers", "ours"], help="run one side only")
    parser.add_argument("--hf-runs", type=int, choices=[1, 2], default=2, help="transformers runs (before and after ours)")
    parser.add_argument("--no-generate", action="store_true", help="skip both sides' generate() check")
    parser.add_argument("--ours", type=Path, default=OURS, help="our benchmark binary")
    parser.add_argument("--ours-run", action="append", default=None, metavar="ARGS",
                        help="extra flags of one run of ours (repeat for several runs, '' for none; "
                             "e.g. --ours-run '' --ours-run '--quantize-experts int8')")
    parser.add_argument("--out-dir", type=Path, default=Path("/work/bench/results"))
    args = parser.parse_args()
    if args.only != "transformers" and not args.ours.is_file():
        sys.exit(f"{args.ours} is missing: cargo build --release -p moe-lab --bin inference_bench")

    ours_runs = [tuple(a.split()) for a in (args.ours_run or [""])]
    order = [("transformers", ())] + [("ours", extra) for extra in ours_runs]
    if args.hf_runs == 2:
        order.append(("transformers", ()))
    if args.only:
        order = [(impl, extra) for impl, extra in order if impl == args.only]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = ""
    for model in args.models:
        name = Path(model).name
        runs = [run_one(impl, args, model, args.out_dir / f"{name}.{args.dtype}.{impl}.{i}.json", extra)
                for i, (impl, extra) in enumerate(order)]
        report += table(model, args, runs) + "\n"
    print("\n" + report)
    with open(args.out_dir / "table.md", "a") as f:
        f.write(report)


if __name__ == "__main__":
    main()
