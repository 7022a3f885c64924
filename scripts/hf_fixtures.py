"""Reference fixtures from Hugging Face transformers for our decoder families.

Builds tiny random models with transformers' own classes (no Hub access: every
model comes from a config class), saves them with `save_pretrained` in
bfloat16, and records what transformers computes with exactly those weights,
into `tests/data/hf/<name>/`:

- `config.json`, `model.safetensors`, `generation_config.json`: what
  `model.to(torch.bfloat16).save_pretrained(dir)` writes;
- `tokenizer.json`: one small BPE tokenizer (vocab 128) trained on the head of
  `data/tinyshakespeare.txt`, the same file in every folder;
- `expected.json`: the prompts, the fp32 logits, the experts chosen per token
  and MoE layer, the greedy continuations and the routing and argmax margins.

The reference numbers are computed in float32 from the bf16-rounded weights
(every parameter and buffer that is saved is rounded to bf16 and back before
anything is computed), so the fp32 reference and the bf16 file hold the same
numbers. `tests/data/hf/README.md` (written here too) lists every tensor the
files hold.

Usage:
    python scripts/hf_fixtures.py              # (re)write tests/data/hf
    python scripts/hf_fixtures.py --check-ours DIR...

`--check-ours` is the other direction: each DIR is written by our Rust
`save_pretrained` (`config.json`, `model.safetensors`) with an `ours.json`
holding `{"prompts": [[ids...]...], "logits": [[[f32 x vocab] x seq] x
prompt]}` that our code computed. transformers loads the folder in float32,
computes the logits of the same prompts and writes `transformers_check.json`
(`{"transformers_version", "max_abs_diff", "ok"}`, ok when the difference is at
most 1e-4 and transformers found exactly the tensors it expects; otherwise also
`missing_keys` / `unexpected_keys` / `mismatched_keys`, or `error` when it
cannot load the folder; `weights_sha256` and `config_sha256`, the SHA-256 of the
`model.safetensors` and `config.json` it checked; `prompts` and `logits`,
transformers' own fp32 logits of them) into DIR; the exit status is 1 when any folder is not
ok.

Run it through `cargo xtask hf-fixtures [-- ARGS]`, which installs the pinned
transformers into `.venv` first. The output is deterministic: one CPU thread,
fixed seeds, fixed prompts.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

TRANSFORMERS_VERSION = "5.23.0"

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "hf"
TEXT = ROOT / "data" / "tinyshakespeare.txt"

VOCAB = 128
HIDDEN = 32
MAX_POS = 64
NEW_TOKENS = 20
TOKENIZER_TEXT_CHARS = 4096
# Prompts: the first N tokens of these lines of the play.
PROMPTS = [("First Citizen:\nBefore we proceed", 5), ("All:\nSpeak, speak.", 7), ("You are all resolved rather to die", 9)]
# Margins every routing and greedy choice must clear (see check_margins).
MIN_ROUTER_GAP = 1e-3  # relative: (s_k - s_{k+1}) / s_k of the router's selection scores
MIN_LOGIT_GAP = 1e-3  # absolute: top-1 minus top-2 logit at each greedy step
CHECK_TOLERANCE = 1e-4
MAX_SEED_TRIES = 64


def import_transformers():
    import transformers

    version = transformers.__version__
    if version != TRANSFORMERS_VERSION:
        sys.exit(
            f"hf_fixtures.py needs transformers=={TRANSFORMERS_VERSION}, found {version} "
            "(run it through `cargo xtask hf-fixtures`)"
        )
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ---------------------------------------------------------------------------
# Families


def common_config():
    """The config arguments every fixture shares."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        max_position_embeddings=MAX_POS,
        bos_token_id=None,  # no eos: greedy generation always runs NEW_TOKENS steps
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
        experts_implementation="eager",  # the per-expert loop (the default is grouped_mm)
    )


def family_specs(tf):
    """(folder, config class, model class, config kwargs, router weight scale)."""
    common = common_config()
    deepseek = dict(
        common,
        num_hidden_layers=3,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        num_mtp_layers=0,  # written as num_nextn_predict_layers; the files hold no MTP layer
    )
    deepseek_v2 = dict(
        common,
        num_hidden_layers=3,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )
    llama = dict(common, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    specs = [
        (
            "mixtral",
            tf.MixtralConfig,
            tf.MixtralForCausalLM,
            dict(
                common,
                num_hidden_layers=2,
                intermediate_size=16,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=8,
                num_experts_per_tok=2,
            ),
            4.0,
        ),
        (
            "qwen2_moe",
            tf.Qwen2MoeConfig,
            tf.Qwen2MoeForCausalLM,
            dict(
                common,
                num_hidden_layers=2,
                intermediate_size=64,  # unused: every layer is sparse (decoder_sparse_step 1, no mlp_only_layers)
                num_attention_heads=4,
                num_key_value_heads=2,
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=48,
                norm_topk_prob=False,
                qkv_bias=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
            4.0,
        ),
        ("deepseek_v3", tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, deepseek, 2.0),
        (
            "deepseek_v3_yarn",
            tf.DeepseekV3Config,
            tf.DeepseekV3ForCausalLM,
            dict(
                deepseek,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 16,
                    "beta_fast": 32,
                    "beta_slow": 1,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                },
            ),
            2.0,
        ),
        (
            "olmoe",
            tf.OlmoeConfig,
            tf.OlmoeForCausalLM,
            dict(
                common,
                num_hidden_layers=2,
                intermediate_size=16,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                clip_qkv=None,
            ),
            4.0,
        ),
        ("llama", tf.LlamaConfig, tf.LlamaForCausalLM, llama, None),
        (
            "llama_rope3",
            tf.LlamaConfig,
            tf.LlamaForCausalLM,
            dict(
                llama,
                rope_parameters={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            ),
            None,
        ),
        (
            "qwen3_moe",
            tf.Qwen3MoeConfig,
            tf.Qwen3MoeForCausalLM,
            dict(
                common,
                num_hidden_layers=3,
                intermediate_size=64,  # layer 0's dense MLP (mlp_only_layers)
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,  # not hidden_size / num_attention_heads (8), as in the hub's Qwen3 configs
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                norm_topk_prob=True,
                attention_bias=False,
                decoder_sparse_step=1,
                mlp_only_layers=[0],
            ),
            4.0,
        ),
        (
            "glm4_moe",
            tf.Glm4MoeConfig,
            tf.Glm4MoeForCausalLM,
            dict(
                common,
                num_hidden_layers=3,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                partial_rotary_factor=0.5,  # RoPE on the first 8 of each head's 16 dimensions
                attention_bias=True,  # q/k/v (o_proj never)
                use_qk_norm=True,
                n_routed_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                num_mtp_layers=0,  # written as num_nextn_predict_layers
            ),
            2.0,
        ),
        (
            "deepseek_v2",
            tf.DeepseekV2Config,
            tf.DeepseekV2ForCausalLM,
            dict(
                deepseek_v2,
                q_lora_rank=None,  # a full q_proj, as V2-Lite
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.0,
                rope_parameters={  # V2's YaRN with its mscale (0.707 on the hub)
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 16,
                    "beta_fast": 32,
                    "beta_slow": 1,
                    "mscale": 0.707,
                    "mscale_all_dim": 0.707,
                },
            ),
            2.0,
        ),
        (
            "deepseek_v2_greedy",
            tf.DeepseekV2Config,
            tf.DeepseekV2ForCausalLM,
            dict(
                deepseek_v2,
                q_lora_rank=32,
                topk_method="greedy",
                attention_bias=True,  # q_a_proj, kv_a_proj_with_mqa and o_proj
            ),
            2.0,
        ),
    ]
    by_folder = {spec[0]: spec for spec in specs}

    def variant(base, folder, **settings):
        _, config_cls, model_cls, kwargs, router_scale = by_folder[base]
        return (folder, config_cls, model_cls, dict(kwargs, **settings), router_scale)

    # Sliding windows shorter than every prompt with its continuation.
    specs = specs + [
        variant("mixtral", "mixtral_window", sliding_window=4),  # every layer
        variant("qwen3_moe", "qwen3_moe_window", use_sliding_window=True, sliding_window=4),  # every layer
        # layer_types from max_window_layers: layer 0 slides, layer 1 attends to all
        variant("qwen2_moe", "qwen2_moe_window", use_sliding_window=True, sliding_window=4, max_window_layers=2),
        (
            "gpt_oss",
            tf.GptOssConfig,
            tf.GptOssForCausalLM,
            dict(
                common,
                num_hidden_layers=2,  # layer_types' default: layer 0 slides, layer 1 attends to all
                intermediate_size=16,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,  # not hidden_size / num_attention_heads (8)
                num_local_experts=8,
                num_experts_per_tok=2,
                sliding_window=4,
                attention_bias=True,
                swiglu_limit=2.0,  # a limit these activations cross (the hub's: 7)
            ),
            4.0,
        ),
    ]
    # The hub's format: experts in MXFP4 (widths that are multiples of its
    # 32-value blocks), everything else in bf16.
    specs.append(variant_of(specs[-1], "gpt_oss_mxfp4", intermediate_size=32))
    llama4_text = dict(
        common,
        num_hidden_layers=4,  # layers 0-2 chunked with RoPE, layer 3 NoPE (no_rope_layer_interval 4)
        intermediate_size=16,  # experts and the shared expert
        intermediate_size_mlp=48,  # the dense layers
        interleave_moe_layer_step=2,  # layers 1 and 3 MoE, 0 and 2 dense
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # not hidden_size / num_attention_heads (8)
        num_local_experts=8,
        num_experts_per_tok=1,
        attention_chunk_size=4,  # shorter than every prompt
        floor_scale=4,  # the temperature changes within the prompts (the hub's: 8192)
        attn_scale=0.5,
        rope_parameters={  # Scout's llama3 scaling, on this context
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    specs.append(("llama4_text", tf.Llama4TextConfig, tf.Llama4ForCausalLM, llama4_text, 4.0))
    # The hub's Llama 4 folders are the multimodal model: its text model
    # under `language_model.`, a vision tower beside it (tiny here); without
    # the QK-norm, as Maverick.
    text_only = {k: v for k, v in llama4_text.items() if k not in ("attn_implementation", "experts_implementation")}
    text_only["use_qk_norm"] = False
    specs.append(
        (
            "llama4",
            tf.Llama4Config,
            tf.Llama4ForConditionalGeneration,
            dict(
                text_config=text_only,
                vision_config=dict(
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                    image_size=28,
                    patch_size=14,
                    vision_output_dim=32,
                    projector_input_dim=32,
                    projector_output_dim=32,
                    pixel_shuffle_ratio=0.5,
                ),
                tie_word_embeddings=False,
                attn_implementation="eager",
                experts_implementation="eager",
            ),
            4.0,
        )
    )
    return specs


def variant_of(spec, folder, **settings):
    _, config_cls, model_cls, kwargs, router_scale = spec
    return (folder, config_cls, model_cls, dict(kwargs, **settings), router_scale)


# ---------------------------------------------------------------------------
# MXFP4 (OCP Microscaling, E2M1 values in blocks of 32 with an E8M0 scale)

FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def to_mxfp4(w):
    """[..., K] -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8) by
    the format's rules: per block of 32, the shared exponent
    e = floor(log2(max |v|)) - 2 (E2M1's largest exponent), values v / 2^e
    rounded to the nearest E2M1 value (magnitudes clamped to 6), two codes a
    byte, the first in the low nibble; the scale byte is e + 127."""
    *prefix, k = w.shape
    assert k % 32 == 0, k
    groups = w.float().reshape(*prefix, k // 32, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0**-126)
    exponent = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    index = (scaled.abs().clamp_max(6.0)[..., None] - FP4_MAGNITUDES).abs().argmin(-1)
    codes = index + 8 * (scaled < 0).long()
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def from_mxfp4(blocks, scales):
    """The inverse of to_mxfp4's encoding: [..., G, 16], [..., G] -> [..., 32 G]."""
    signed = torch.cat([FP4_MAGNITUDES, -FP4_MAGNITUDES])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).reshape(*blocks.shape[:-1], 32).long()
    values = signed[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


@torch.no_grad()
def round_experts_to_mxfp4(model):
    """Every expert matrix replaced by the MXFP4 values it quantises to, so
    that the float model is what the MXFP4 files hold. gpt-oss stores
    gate_up_proj [E, H, 2I] and down_proj [E, I, H]; the blocks run along
    the input dimension (H, I), as the hub's `*_blocks` [E, out, in/32, 16]."""
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            blocks, scales = to_mxfp4(p.transpose(1, 2))
            p.copy_(from_mxfp4(blocks, scales).transpose(1, 2))


def write_mxfp4_weights(path):
    """Rewrites the saved folder in the hub's layout: the experts' matrices
    as `*_blocks` and `*_scales`, `quantization_config` in config.json."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj")]:
        saved = tensors.pop(name)
        blocks, scales = to_mxfp4(saved.float().transpose(1, 2))
        assert torch.equal(from_mxfp4(blocks, scales).transpose(1, 2).bfloat16(), saved)  # lossless
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks.contiguous(), scales.contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    write_json(path / "config.json", config)


def is_router(module):
    name = type(module).__name__
    return name.endswith("TopKRouter") or name.endswith("TopkRouter") or name == "Llama4Router"


def routers(model):
    """The router modules in layer order, with their layer index."""
    found = []
    for name, module in model.named_modules():
        if is_router(module):
            layer = int(name.split(".layers.")[1].split(".")[0])
            found.append((layer, module))
    return found


@torch.no_grad()
def randomize(model, router_scale, seed):
    """Weights with unit-scale activations: embeddings N(0, 1), matrices
    N(0, 1/fan_in) (routers times `router_scale`), norm weights 1 + N(0, 0.1^2),
    biases N(0, 0.1^2), DeepSeek's e_score_correction_bias U[0, 0.05]; then
    everything saved is rounded to bf16 and back."""
    gen = torch.Generator().manual_seed(seed)
    router_weights = {id(m.weight) for _, m in routers(model)}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "embed_tokens" in name:
            p.copy_(noise)
        elif p.ndim >= 2:
            scale = router_scale if id(p) in router_weights else 1.0
            p.copy_(noise * scale / math.sqrt(p.shape[-1]))
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("sinks"):  # gpt-oss: a sink logit per head, on the scores' scale
            p.copy_(noise)
        else:
            p.copy_(0.1 * noise)
    for _, module in routers(model):
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.rand(bias.shape, generator=gen) * 0.05)
    persistent = set(model.state_dict().keys())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in persistent and t.is_floating_point():
            t.copy_(t.to(torch.bfloat16).to(torch.float32))


# ---------------------------------------------------------------------------
# Routing capture and margins


class RouterCapture:
    """Forward hooks on the router modules. Each router of transformers 5.23
    returns (router_logits, top_k_weights, top_k_indices); we keep the fp32
    logits and the indices of every call, per MoE layer."""

    def __init__(self, model):
        self.layers = [layer for layer, _ in routers(model)]
        self.modules = [m for _, m in routers(model)]
        self.calls = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def _hook(self, module, inputs, output):
        if type(module).__name__ == "Llama4Router":  # (scores, logits): the top-k of the logits
            _, logits = output
            indices = logits.topk(module.top_k, dim=-1).indices
        else:
            logits, _, indices = output
        self.calls.append((module, logits.detach().float().clone(), indices.detach().clone()))

    def take(self):
        calls, self.calls = self.calls, []
        assert len(calls) == len(self.modules), (len(calls), len(self.modules))
        return calls

    def remove(self):
        for h in self.handles:
            h.remove()


def selection(module, logits):
    """What the router ranks, recomputed from its logits [T, E]: returns
    (scores [T, E] the top-k is taken over, with unchosen groups at -inf;
    group scores [T, G] or None)."""
    if hasattr(module, "e_score_correction_bias"):  # DeepSeek-V3: sigmoid + bias, group-limited
        scores = logits.sigmoid() + module.e_score_correction_bias.float()
        t, e = scores.shape
        g = module.num_group
        groups = scores.view(t, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)
        chosen = groups.topk(module.topk_group, dim=-1)[1]
        mask = torch.zeros_like(groups).scatter_(1, chosen, 1.0).bool()
        mask = mask.unsqueeze(-1).expand(t, g, e // g).reshape(t, e)
        return scores.masked_fill(~mask, float("-inf")), groups
    if getattr(module, "topk_method", None) == "group_limited_greedy":  # DeepSeek-V2: softmax, best per group
        scores = torch.softmax(logits, dim=-1)
        t, e = scores.shape
        g = module.num_group
        groups = scores.view(t, g, e // g).max(dim=-1).values
        chosen = groups.topk(module.topk_group, dim=-1)[1]
        mask = torch.zeros_like(groups).scatter_(1, chosen, 1.0).bool()
        mask = mask.unsqueeze(-1).expand(t, g, e // g).reshape(t, e)
        return scores.masked_fill(~mask, float("-inf")), groups
    return torch.softmax(logits, dim=-1), None


def relative_gap(sorted_scores, k):
    """(s_k - s_{k+1}) / s_k per row, for scores sorted descending."""
    return (sorted_scores[:, k - 1] - sorted_scores[:, k]) / sorted_scores[:, k - 1].abs()


def routing(calls):
    """Per MoE layer: the chosen experts [T][k] (ascending ids) and the smallest
    relative gap of this forward."""
    experts, gap = [], math.inf
    for module, logits, indices in calls:
        scores, groups = selection(module, logits)
        k = indices.shape[-1]
        top = scores.sort(dim=-1, descending=True)
        mine = top.indices[:, :k].sort(dim=-1).values
        theirs = indices.sort(dim=-1).values
        assert torch.equal(mine, theirs), "recomputed routing differs from transformers'"
        gap = min(gap, relative_gap(top.values, k).min().item())
        if groups is not None:
            gap = min(gap, relative_gap(groups.sort(dim=-1, descending=True).values, module.topk_group).min().item())
        experts.append(theirs.tolist())
    return experts, gap


def logit_gap(logits):
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).min().item()


# ---------------------------------------------------------------------------
# One fixture


class Retry(Exception):
    pass


@torch.no_grad()
def reference(model, prompts):
    """The numbers expected.json records; raises Retry when a margin is too small."""
    capture = RouterCapture(model)
    logits, experts, greedy = [], [], []
    min_router, min_logit = math.inf, math.inf
    try:
        for ids in prompts:
            x = torch.tensor([ids])
            out = model(input_ids=x)
            if capture.modules:
                e, g = routing(capture.take())
                experts.append(e)
                min_router = min(min_router, g)
            else:
                experts.append([])
            logits.append(out.logits[0].float())

            capture.calls = []
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                return_dict_in_generate=True,
                output_logits=True,
            )
            capture.calls = []
            new = gen.sequences[0, len(ids) :]
            assert len(new) == NEW_TOKENS, len(new)
            step_logits = torch.cat([l.float() for l in gen.logits])
            assert torch.equal(step_logits.argmax(-1), new)
            min_logit = min(min_logit, logit_gap(step_logits))
            greedy.append(new.tolist())

            # The whole sequence in one forward: every routing choice of prompt
            # and continuation, and the greedy choices without the KV cache.
            full = gen.sequences
            out = model(input_ids=full)
            if capture.modules:
                _, g = routing(capture.take())
                min_router = min(min_router, g)
            steps = out.logits[0, len(ids) - 1 : -1].float()
            if not torch.equal(steps.argmax(-1), new):
                raise Retry("full forward and cached generation choose different tokens")
            min_logit = min(min_logit, logit_gap(steps))
    finally:
        capture.remove()
    if capture.modules and min_router < MIN_ROUTER_GAP:
        raise Retry(f"router gap {min_router:.2e}")
    if min_logit < MIN_LOGIT_GAP:
        raise Retry(f"logit gap {min_logit:.2e}")
    return dict(
        logits=logits,
        experts=experts,
        greedy=greedy,
        moe_layers=capture.layers,
        min_router_gap=None if not capture.modules else min_router,
        min_logit_gap=min_logit,
    )


def build(tf, spec, seed):
    folder, config_cls, model_cls, kwargs, router_scale = spec
    torch.manual_seed(seed)
    config = config_cls(**copy.deepcopy(kwargs))  # configs add keys to a rope_parameters dict
    model = model_cls(config).eval()
    randomize(model, router_scale if router_scale is not None else 1.0, seed)
    if folder.endswith("_mxfp4"):
        round_experts_to_mxfp4(model)
    return model


def write_fixture(tf, spec, prompts, tokenizer_file):
    folder = spec[0]
    base = 1000 * (1 + [s[0] for s in family_specs(tf)].index(folder))
    for seed in range(base, base + MAX_SEED_TRIES):
        model = build(tf, spec, seed)
        try:
            ref = reference(model, prompts)
            break
        except Retry as why:
            print(f"  {folder}: seed {seed} rejected ({why})", file=sys.stderr)
    else:
        raise SystemExit(f"{folder}: no seed in {MAX_SEED_TRIES} tries clears the margins")

    path = OUT / folder
    if path.exists():
        shutil.rmtree(path)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    if folder.endswith("_mxfp4"):
        write_mxfp4_weights(path)

    all_logits = torch.cat([l.flatten() for l in ref["logits"]])
    expected = {
        "transformers_version": tf.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_type": model.config.model_type,
        "seed": seed,
        "moe_layers": ref["moe_layers"],
        "prompts": prompts,
        "logits": [[[float(v) for v in row] for row in l.tolist()] for l in ref["logits"]],
        "experts": ref["experts"],
        "greedy": ref["greedy"],
        "max_abs_logit": float(all_logits.abs().max()),
        "min_router_gap": ref["min_router_gap"],
        "min_logit_gap": ref["min_logit_gap"],
    }
    write_json(path / "expected.json", expected)

    # The saved folder, loaded back by transformers, gives the same logits.
    reloaded, problems = load_fp32(tf, path)
    assert not problems, f"{folder}: {problems}"
    diff = max_abs_diff(reloaded, prompts, ref["logits"])
    assert diff == 0.0, f"{folder}: reloaded bf16 folder differs from the reference by {diff}"
    print(
        f"  {folder}: seed {seed}, min router gap {ref['min_router_gap']}, "
        f"min logit gap {ref['min_logit_gap']:.4g}",
        file=sys.stderr,
    )
    return seed


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = TEXT.read_text()[:TOKENIZER_TEXT_CHARS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(path))
    prompts = []
    for line, n in PROMPTS:
        ids = tok.encode(line).ids
        assert len(ids) >= n, (line, ids)
        prompts.append(ids[:n])
    return prompts


# ---------------------------------------------------------------------------
# Loading and comparing


def load_fp32(tf, path):
    """The folder loaded by transformers in float32, eval mode, with the names
    of the tensors it expected and did not find, or found and did not expect."""
    config = json.loads((Path(path) / "config.json").read_text())
    quantized = "quantization_config" in config
    extra = dict(quantization_config=tf.Mxfp4Config(dequantize=True)) if quantized else {}
    # A multimodal folder as the class that wrote it (AutoModelForCausalLM
    # would take its text model and leave the vision tower unexpected).
    auto = tf.Llama4ForConditionalGeneration if config["model_type"] == "llama4" else tf.AutoModelForCausalLM
    model, info = auto.from_pretrained(
        path,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
        **extra,
    )
    problems = {
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": sorted(str(k) for k in info["mismatched_keys"]),
    }
    return model.eval(), {k: v for k, v in problems.items() if v}


@torch.no_grad()
def max_abs_diff(model, prompts, logits):
    diff = 0.0
    for ids, want in zip(prompts, logits):
        got = model(input_ids=torch.tensor([ids])).logits[0].float()
        want = torch.as_tensor(want, dtype=torch.float32)
        if got.shape != want.shape:
            return math.inf
        diff = max(diff, (got - want).abs().max().item())
    return diff


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@torch.no_grad()
def prompt_logits(model, prompts):
    return [model(input_ids=torch.tensor([ids])).logits[0].float().tolist() for ids in prompts]


def check_ours(tf, dirs):
    ok_all = True
    for d in dirs:
        d = Path(d)
        result = {"transformers_version": tf.__version__}
        try:
            ours = json.loads((d / "ours.json").read_text())
            # The verdict belongs to these exact files: the test checks the hashes.
            result.update(weights_sha256=sha256(d / "model.safetensors"), config_sha256=sha256(d / "config.json"))
            model, problems = load_fp32(tf, d)
            diff = max_abs_diff(model, ours["prompts"], ours["logits"])
            result.update(max_abs_diff=diff, ok=diff <= CHECK_TOLERANCE and not problems, **problems)
            # transformers' own logits: the test compares ours with them on
            # whatever CPU it runs on.
            result.update(prompts=ours["prompts"], logits=prompt_logits(model, ours["prompts"]))
        except Exception as e:  # a folder transformers cannot load is a failed check
            result.update(max_abs_diff=None, ok=False, error=f"{type(e).__name__}: {e}")
        write_json(d / "transformers_check.json", result)
        print(f"{d}: {json.dumps({k: v for k, v in result.items() if k not in ('transformers_version', 'prompts', 'logits')})}")
        ok_all &= result["ok"]
    return 0 if ok_all else 1


# ---------------------------------------------------------------------------
# README


def tensor_table(path):
    from safetensors import safe_open

    rows = []
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            rows.append(f"{key} {list(s.get_shape())} {s.get_dtype()}")
    return rows


README_HEAD = """\
# Hugging Face reference fixtures

Written by `scripts/hf_fixtures.py` (run `cargo xtask hf-fixtures`, which
installs `transformers=={version}` into `.venv`); do not edit by hand. Tiny
random models built with transformers' own classes (torch {torch}), saved with
`model.to(torch.bfloat16).save_pretrained(dir)`, and what transformers computes
with them in float32 from exactly those bf16 weights.

## Folders

Each folder holds `config.json`, `model.safetensors`, `generation_config.json`
(as `save_pretrained` writes them), `tokenizer.json` (one BPE tokenizer of
vocab 128 trained on the head of `data/tinyshakespeare.txt`, the same file in
every folder) and `expected.json`:

- `transformers_version`, `torch_version`, `model_type`, `seed`;
- `prompts`: 3 prompts of 5, 7 and 9 token ids (the same in every folder):
  the first tokens of {prompt_texts};
- `logits` `[prompt][position][128]`: fp32 logits of each prompt (one forward
  of the prompt alone, batch 1, eval mode), written as Python floats of the
  fp32 values (nothing rounded);
- `moe_layers`: the indices of the decoder layers that are MoE layers;
- `experts` `[prompt][moe layer][position][k]`: the experts each token is
  routed to, as a set: ids in ascending order (the order within the top-k
  carries no meaning);
- `greedy` `[prompt][20]`: `model.generate(ids, do_sample=False,
  max_new_tokens=20)`, new tokens only (there is no eos token, so always 20);
- `max_abs_logit`: the largest |logit| in `logits`;
- `min_router_gap`: the smallest relative gap `(s_k - s_k+1) / s_k` between the
  k-th and (k+1)-th selection scores (softmax probabilities; for DeepSeek-V3
  sigmoid + `e_score_correction_bias` among the experts of the chosen groups,
  and likewise between the `topk_group`-th and next group score) over every
  token of the prompts and of their greedy continuations, in every MoE layer
  (null for dense models); at least {router_gap} by construction;
- `min_logit_gap`: the smallest top-1 minus top-2 logit over every greedy step
  (both in cached generation and in one forward of the whole sequence); at
  least {logit_gap} by construction.

Every model: hidden {hidden}, vocab {vocab}, max_position_embeddings
{max_pos}, eager attention, no bos/eos/pad token, untied embeddings (the
settings below are the config arguments besides these). Weights are random
with unit-scale activations (embeddings N(0,1), matrices N(0,1/fan_in), norm
weights 1 + N(0,0.01), biases N(0,0.01)); router weights are scaled up
(factor in the table) and the seed is retried until every routing and greedy
choice clears the margins above, so fp32 rounding elsewhere cannot flip a
choice. The sizes are smaller than real ones (hidden {hidden}, expert width 16)
to keep this folder small.

| folder | class | router x | seed | settings |
|---|---|---|---|---|
{table}
Notes on the families:

- Mixtral: softmax over the experts, top-k, the k weights renormalised to sum 1.
- Qwen2-MoE: softmax, top-k, not renormalised (norm_topk_prob false); plus a
  shared expert of width shared_expert_intermediate_size whose output is
  multiplied by sigmoid(shared_expert_gate(x)); q/k/v projections have biases.
- DeepSeek-V3: layer 0 is dense (first_k_dense_replace 1, width
  intermediate_size), the others MoE; selection scores sigmoid(logits) +
  e_score_correction_bias, 4 groups of 2 experts scored by the sum of their
  top-2, the best topk_group groups kept, top-k experts among those; weights
  are the sigmoids without the bias, renormalised (norm_topk_prob) and times
  routed_scaling_factor; one shared expert added. Attention is MLA.
- Qwen3-MoE: softmax, top-k, renormalised (norm_topk_prob true), no shared
  expert; layer 0 is dense (mlp_only_layers [0], width intermediate_size);
  q_norm / k_norm are RMSNorms over head_dim applied to every head before the
  rope; head_dim 16 while hidden_size / num_attention_heads is 8.
- GLM-4.5 (`glm4_moe`): DeepSeek-V3's router, shared expert and dense layer 0
  under grouped-query attention with q/k/v biases, QK-norm per head
  (use_qk_norm) and RoPE on the first half of each head (partial_rotary_factor
  0.5, written into `rope_parameters`).
- DeepSeek-V2 (`deepseek_v2`, `deepseek_v2_greedy`): DeepSeek-V3's latent
  attention (a full q_proj without q_lora_rank, as V2-Lite; biases with
  attention_bias) and layer layout with a softmax router: `greedy` top-k, or
  `group_limited_greedy` (the topk_group groups of highest best probability
  first); the chosen probabilities are never renormalised, then times
  routed_scaling_factor; two ungated shared experts; RoPE on adjacent pairs.
- Sliding windows (`mixtral_window`, `qwen3_moe_window`, `qwen2_moe_window`):
  a query sees its 4 latest positions, itself included, in every layer
  (Mixtral, Qwen3-MoE) or in the layers `layer_types` names (Qwen2-MoE: layer
  0, from max_window_layers 2).
- gpt-oss (`gpt_oss`): q/k/v/o biases, a learned sink logit per head, a window
  of 4 in layer 0 (layer_types' default), a biased router whose top-2 logits are
  softmaxed, experts with biases and the clamped SwiGLU (limit 2 here), fused
  as `gate_up_proj` `[E, H, 2I]` with gate and up columns interleaved; RoPE is
  GptOssConfig's default YaRN (factor 32 over 4096 positions, not truncated).
- OLMoE: softmax, top-k, not renormalised; q_norm / k_norm are RMSNorms over
  the whole projected q (heads x head_dim) and k (kv heads x head_dim) before
  the rope.
- Llama: dense SwiGLU MLP.

## What transformers {version} writes

- **Experts are saved per expert**, in the original checkpoints' names, although
  the modules hold them packed in memory (`experts.gate_up_proj [E, 2I, H]`,
  `experts.down_proj [E, H, I]`, gate = the first I rows of `gate_up_proj`).
  `save_pretrained` reverts that packing by default (`save_original_format=True`):
  - Mixtral: `model.layers.L.block_sparse_moe.experts.N.{{w1,w2,w3}}.weight`, w1 =
    gate `[I, H]`, w3 = up `[I, H]`, w2 = down `[H, I]`; router
    `model.layers.L.block_sparse_moe.gate.weight [E, H]` (in memory the module
    is `mlp`, not `block_sparse_moe`).
  - Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3:
    `model.layers.L.mlp.experts.N.{{gate_proj,up_proj,down_proj}}.weight`; router
    `model.layers.L.mlp.gate.weight [E, H]`.
  - Qwen2-MoE's shared expert: `mlp.shared_expert.{{gate,up,down}}_proj.weight`
    and its gate `mlp.shared_expert_gate.weight [1, H]` (sigmoid).
    DeepSeek-V3's shared experts are one MLP `mlp.shared_experts.{{gate,up,down}}_proj.weight`
    of width `n_shared_experts * moe_intermediate_size`.
  - DeepSeek-V3's `e_score_correction_bias` is `model.layers.L.mlp.gate.e_score_correction_bias [E]`
    (saved bf16 here like everything else; transformers keeps it in fp32 when
    loading, `_keep_in_fp32_modules_strict`).
  - transformers {version} loads both this per-expert layout and the packed one
    (`save_pretrained(..., save_original_format=False)` writes
    `model.layers.L.mlp.experts.gate_up_proj [E, 2I, H]` and
    `model.layers.L.mlp.experts.down_proj [E, H, I]`, for Mixtral too).
- **RoPE settings live in `rope_parameters`**, not in `rope_scaling` and
  `rope_theta`: config.json holds e.g. `"rope_parameters": {{"rope_theta":
  10000.0, "rope_type": "default"}}`, with the scaling keys (`factor`, ...) in
  the same dict; there is no top-level `rope_theta`. transformers still accepts
  `rope_scaling` (and `"type"` for `"rope_type"`) as input. Mixtral's default
  rope_theta is 1e6, the others' 1e4.
- DeepSeek-V3 writes `head_dim` (= qk_rope_head_dim), `qk_head_dim`,
  `rope_interleave: true` (the rope part of q and k is rotated in interleaved
  pairs) and `num_nextn_predict_layers` (0 here: no MTP layer in the files).
  With yarn, the rope's cos/sin scale is `mscale(factor, mscale) /
  mscale(factor, mscale_all_dim)` = 1 here, and the attention's softmax scale is
  `qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2` with `mscale(s, m) =
  0.1 m ln(s) + 1`.
- DeepSeek-V3's router masks the experts of unchosen groups with -inf (not 0.0)
  before its top-k; its selection scores here are positive either way.
- Qwen2-MoE has a `qkv_bias` config key (true) and writes `layer_types`
  (all `full_attention`) and `sliding_window: 0` next to
  `use_sliding_window: false`; OLMoE writes `clip_qkv`. Qwen3-MoE writes
  its expert count as `num_local_experts` (its `attribute_map` of the hub
  files' `num_experts`). The RMSNorm eps
  differ: 1e-5 for Mixtral and OLMoE, 1e-6 for the others (in config.json).
- `config.json` holds `"dtype": "bfloat16"` (the v5 name of `torch_dtype`).
- How expert choices were captured: forward hooks on the router modules
  (`MixtralTopKRouter`, `Qwen2MoeTopKRouter`, `Qwen3MoeTopKRouter`, `OlmoeTopKRouter`,
  `DeepseekV3TopkRouter`, `Glm4MoeTopkRouter`), whose forward returns `(router_logits,
  top_k_weights, top_k_indices)`; the indices are recorded, and the script
  recomputes the choice from the logits (and asserts it agrees) to measure the
  margins. (`output_router_logits=True` gives only the raw logits, which for
  DeepSeek-V3 do not determine the choice without the bias and the groups.)

## Tensors per folder

Name, shape, dtype, as `model.safetensors` holds them.
"""


def settings_text(kwargs):
    common = set(common_config())
    parts = []
    for key, value in kwargs.items():
        if key in common:
            continue
        if isinstance(value, dict):
            value = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
        parts.append(f"{key} {value}")
    return ", ".join(parts)


def write_readme(tf, specs, seeds):
    rows = []
    for folder, _, model_cls, kwargs, router_scale in specs:
        scale = "" if router_scale is None else f"{router_scale:g}"
        rows.append(f"| {folder} | `{model_cls.__name__}` | {scale} | {seeds[folder]} | {settings_text(kwargs)} |")
    text = README_HEAD.format(
        version=tf.__version__,
        torch=torch.__version__.split("+")[0],
        router_gap=MIN_ROUTER_GAP,
        logit_gap=MIN_LOGIT_GAP,
        hidden=HIDDEN,
        vocab=VOCAB,
        max_pos=MAX_POS,
        table="\n".join(rows) + "\n",
        prompt_texts=", ".join(f"`{json.dumps(text)}`" for text, _ in PROMPTS),
    )
    for spec in specs:
        folder = spec[0]
        text += f"\n### {folder}\n\n```\n" + "\n".join(tensor_table(OUT / folder)) + "\n```\n"
    (OUT / "README.md").write_text(text)


# ---------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-ours", nargs="+", metavar="DIR", help="check folders our Rust code wrote")
    args = parser.parse_args()

    torch.set_num_threads(1)
    tf = import_transformers()
    if args.check_ours:
        sys.exit(check_ours(tf, args.check_ours))

    specs = family_specs(tf)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():  # folders of families no longer written (`ours` is the Rust side's)
        if old.is_dir() and old.name not in {spec[0] for spec in specs} | {"ours"}:
            shutil.rmtree(old)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = Path(tmp) / "tokenizer.json"
        prompts = train_tokenizer(tokenizer_file)
        print(f"prompts {prompts}", file=sys.stderr)
        seeds = {spec[0]: write_fixture(tf, spec, prompts, tokenizer_file) for spec in specs}
    write_readme(tf, specs, seeds)


if __name__ == "__main__":
    main()
