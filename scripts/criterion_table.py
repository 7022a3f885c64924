"""Markdown table of the criterion dispatch benchmarks (`cargo xtask run bench
--bench dispatch`), read from target/criterion/*/new/estimates.json: mean
time per call and its ratio to the FLOP-matched dense FFN of the same group.

Usage: python3 scripts/criterion_table.py [target/criterion]
"""

import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
strategies = ["dense_ffn", "mask_loop", "indexed_loop", "grouped", "capacity", "auto"]
print("| case | mode | " + " | ".join(strategies) + " |")
print("|---|---|" + "---|" * len(strategies))
for case in ["makemoe", "mid", "fine_grained"]:
    for mode in ["fwd", "fwd_bwd"]:
        group = root / f"{case}_{mode}"
        if not group.is_dir():
            group = root / f"{case}/{mode}"
        ms = {}
        for s in strategies:
            est = group / s / "new" / "estimates.json"
            if est.is_file():
                ms[s] = json.loads(est.read_text())["mean"]["point_estimate"] / 1e6
        if "dense_ffn" not in ms:
            continue
        dense = ms["dense_ffn"]
        cells = [f"{ms[s]:.2f}" + ("" if s == "dense_ffn" else f" ({ms[s] / dense:.2f}x)") if s in ms else "" for s in strategies]
        print(f"| {case} | {mode} | " + " | ".join(cells) + " |")
