"""Writes a Hugging Face checkpoint folder with random weights, for benchmarks.

The model class is transformers' own, built on the `meta` device to learn
the state dict's names and shapes without allocating it; the names are then
mapped to the hub's on-disk layout with transformers' own reverse conversion
(`revert_weight_conversion`, what `save_pretrained` does: per-expert
`mlp.experts.N.{gate,up,down}_proj.weight` instead of the packed
`experts.gate_up_proj`). Every tensor is drawn from its own generator
(seeded by `--seed` and the tensor's name, so a tensor's values do not
depend on the sharding): matrices normal(0, config.initializer_range), 1-D
norm weights 1, other 1-D tensors (biases) 0. Shards of at most
`--max-shard-gb` are written one at a time (at most one shard in memory),
as `model-0000N-of-0000M.safetensors` with `metadata={"format": "pt"}` and
`model.safetensors.index.json`, plus `config.json` (`dtype` set) and
`generation_config.json`. No tokenizer: benchmarks feed token ids.

Presets (parameter counts as printed by the script):
- `olmoe-1b-7b`: allenai/OLMoE-1B-7B-0924's config.json values (hidden 2048,
  16 layers, 16 heads, 64 experts top-8 of width 1024, vocab 50304,
  QK-norm): 6,919,161,856 parameters, 13.8 GB in bf16.
- `olmoe-0.5b`: the same design scaled down (hidden 1024, 8 layers, 8 heads
  of 128, 64 experts top-8 of width 256): 539,788,288 parameters.
- `qwen1.5-moe-a2.7b`: Qwen/Qwen1.5-MoE-A2.7B's config (60 experts top-4 of
  width 1408, a shared expert of 5632): 14,315,784,192 parameters, 28.6 GB in bf16.
  Disk is tight: write it only when needed.

Usage (the folders live outside the repository):
    .venv/bin/python scripts/random_checkpoint.py --preset olmoe-0.5b --out /work/bench/olmoe-0.5b
    .venv/bin/python scripts/random_checkpoint.py --preset olmoe-1b-7b --out /work/bench/olmoe-1b-7b
    .venv/bin/python scripts/random_checkpoint.py --config-json cfg.json --out DIR --dtype float32
    .venv/bin/python scripts/random_checkpoint.py --preset olmoe-0.5b --dry-run   # names, shapes, count
    .venv/bin/python scripts/random_checkpoint.py --self-test

`--self-test` writes tiny OLMoE and Qwen2-MoE folders into a temporary
folder and checks them: transformers' `from_pretrained` finds exactly the
tensors it expects, with the values written (a packed expert against its
per-expert tensor); and, when `target/release/inference_bench`
is built, our `moe_hf::from_pretrained` loads them and its float32 greedy
tokens are transformers' (`scripts/hf_inference_bench.py`).
"""

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

PRESETS = {
    # allenai/OLMoE-1B-7B-0924 config.json (transformers' OlmoeConfig defaults
    # are this model's, except intermediate_size: 2048 there, 1024 here).
    "olmoe-1b-7b": {
        "model_type": "olmoe",
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "clip_qkv": None,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 50279,
        "pad_token_id": 1,
    },
    # Qwen/Qwen1.5-MoE-A2.7B config.json.
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
}
# OLMoE's design at ~0.54 B: 64 experts top-8, head_dim 128, QK-norm, same vocab.
PRESETS["olmoe-0.5b"] = {
    **PRESETS["olmoe-1b-7b"],
    "hidden_size": 1024,
    "intermediate_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}

TINY = {
    "olmoe": {"model_type": "olmoe", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
              "num_experts_per_tok": 2, "max_position_embeddings": 256, "eos_token_id": 299, "pad_token_id": 1},
    "qwen2_moe": {"model_type": "qwen2_moe", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2,
                  "max_position_embeddings": 256},
}

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def make_config(args):
    from transformers import AutoConfig

    if args.config_json:
        values = json.loads(Path(args.config_json).read_text())
    else:
        values = dict(PRESETS[args.preset])
    values = {k: v for k, v in values.items() if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    config.dtype = DTYPES[args.dtype]
    return config


def hub_tensors(config):
    """The hub layout's (name, shape) list, in save order, and the class name."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        state = {k: v for k, v in state.items() if not k.endswith(("lm_head.weight",))}
    hub = revert_weight_conversion(model, state)
    names = sorted(hub, key=dot_natural_key)
    return [(n, tuple(hub[n].shape)) for n in names], type(model).__name__


def random_tensor(name, shape, std, seed, dtype):
    if len(shape) == 1:
        fill = 1.0 if "norm" in name else 0.0
        return torch.full(shape, fill, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std).to(dtype)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(tensors, itemsize, max_bytes):
    """Consecutive groups of tensors of at most max_bytes each (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = numel(shape) * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def self_test():
    """Writes the TINY folders and checks them against transformers and, if built, ours."""
    import subprocess
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parent.parent
    ours = root / "target" / "release" / "examples" / "inference_bench"
    with tempfile.TemporaryDirectory() as tmp:
        for name, values in TINY.items():
            folder, config_json = Path(tmp) / name, Path(tmp) / f"{name}.json"
            config_json.write_text(json.dumps(values))
            # Small shards, so the index and several files are exercised.
            subprocess.run([sys.executable, __file__, "--config-json", str(config_json), "--out", str(folder),
                            "--max-shard-gb", "0.0001"], check=True, stdout=subprocess.DEVNULL)
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
            problems = {k: v for k, v in info.items() if v}
            assert not problems, f"{name}: transformers reports {problems}"
            files = {}
            for f in sorted(folder.glob("model-*.safetensors")):
                files.update(load_file(f))
            state = model.state_dict()
            gate = files["model.layers.1.mlp.experts.3.gate_proj.weight"].float()
            packed = state["model.layers.1.mlp.experts.gate_up_proj"][3][: gate.shape[0]]
            assert torch.equal(packed, gate), f"{name}: expert 3's gate differs after loading"
            assert torch.equal(files["model.norm.weight"].float(), torch.ones(values["hidden_size"]))
            std = files["model.layers.0.self_attn.q_proj.weight"].float().std().item()
            assert abs(std - 0.02) < 0.002, f"{name}: std {std}"
            print(f"{name}: transformers loads it, {len(files)} tensors")
            if not ours.is_file():
                print(f"  {ours} not built: our side not checked")
                continue
            tokens = []
            for cmd in ([sys.executable, str(root / "scripts" / "hf_inference_bench.py"), "--dtype", "float32"],
                        [str(ours), "--dtype", "f32"]):
                out = Path(tmp) / "bench.json"
                subprocess.run(cmd + ["--model", str(folder), "--prompt-len", "16", "--new-tokens", "8", "--threads", "1",
                                      "--no-generate", "--out", str(out)], check=True, capture_output=True)
                tokens.append(json.loads(out.read_text())["tokens"])
            assert tokens[0] == tokens[1], f"{name}: greedy tokens differ: transformers {tokens[0]}, ours {tokens[1]}"
            print(f"  ours loads it, same float32 greedy tokens {tokens[1]}")
    print("self-test passed")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test", action="store_true", help="check the writer on tiny folders (alone)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS))
    source.add_argument("--config-json", help="a transformers config.json (model_type and its keys)")
    parser.add_argument("--out", help="the folder to write (must not exist unless --force)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size limit, 1e9 bytes")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--dry-run", action="store_true", help="print the tensors and the count, write nothing")
    args = parser.parse_args()

    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config = make_config(args)
    tensors, class_name = hub_tensors(config)
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(numel(s) for _, s in tensors)
    print(f"{class_name}: {len(tensors)} tensors, {total:,} parameters, {total * itemsize / 1e9:.2f} GB in {args.dtype}")
    if args.dry_run:
        for name, shape in tensors:
            print(f"  {name} {list(shape)}")
        return
    if not args.out:
        parser.error("--out is required unless --dry-run")
    out = Path(args.out)
    if out.exists():
        if not args.force:
            sys.exit(f"{out} exists: pass --force to replace it")
        shutil.rmtree(out)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free
    if free < total * itemsize * 1.02:
        sys.exit(f"not enough disk: {total * itemsize / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    out.mkdir(parents=True)

    std = config.initializer_range
    shards = shard_plan(tensors, itemsize, int(args.max_shard_gb * 1e9))
    weight_map, started = {}, time.time()
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        data = {name: random_tensor(name, shape, std, args.seed, dtype) for name, shape in shard}
        save_file(data, str(out / file), metadata={"format": "pt"})
        del data
        weight_map.update({name: file for name, _ in shard})
        print(f"  {file}: {len(shard)} tensors ({time.time() - started:.0f} s)", flush=True)
    index = {"metadata": {"total_parameters": total, "total_size": total * itemsize}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.architectures = [class_name]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    print(f"wrote {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
