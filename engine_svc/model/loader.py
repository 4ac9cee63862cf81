"""Build a model from an HF directory (safetensors, sharded or not), random weights, or the demo config.

Weights are memory-mapped with safetensors' `safe_open` and copied once, straight into their
destination (a slice of a fused qkv / gate_up parameter where the model fuses projections), so a
checkpoint is never held twice in host memory.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors import safe_open

from engine_svc.model.llama import LlamaConfig, LlamaForCausalLM, UnsupportedModelError
from kvmesh import demo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightsError(ValueError):
    """The checkpoint directory is incomplete or inconsistent; the message names the files/tensors."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    cfg: LlamaConfig
    hf_config: dict[str, Any]
    name: str
    eos_token_ids: list[int]
    bos_token_id: int | None
    dtype: torch.dtype


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def read_hf_config(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (config.json, generation_config.json or {}) of an HF directory, or of the demo model."""
    if model == "demo":
        return dict(demo.DEMO_MODEL_CONFIG), {}
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"{path} not found: --model must be an HF model directory or 'demo'")
    with open(path) as f:
        hf = json.load(f)
    gen_path = os.path.join(model, "generation_config.json")
    gen: dict[str, Any] = {}
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
    return hf, gen


def stop_ids(hf: dict[str, Any], gen: dict[str, Any]) -> list[int]:
    """Every EOS id of config.json and generation_config.json, deduplicated, config.json's first."""
    ids: list[int] = []
    for tid in _as_list(hf.get("eos_token_id")) + _as_list(gen.get("eos_token_id")):
        if tid not in ids:
            ids.append(tid)
    return ids


def resolve_dtype(requested: str, hf: dict[str, Any], device: torch.device) -> torch.dtype:
    """auto = the checkpoint's dtype on CUDA, float32 on CPU (bf16 matmuls are slow there)."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    return DTYPES.get(name, torch.bfloat16)


def safetensors_files(model_dir: str) -> dict[str, list[str]]:
    """file -> tensor names to read from it (from model.safetensors.index.json when sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = defaultdict(list)
        for name, fname in weight_map.items():
            files[os.path.join(model_dir, fname)].append(name)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise WeightsError(f"{index} lists shards that are missing: {', '.join(sorted(missing))}")
        return dict(files)
    names = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not names:
        raise WeightsError(f"no *.safetensors in {model_dir} (kvmesh loads safetensors only)")
    out = {}
    for fname in names:
        path = os.path.join(model_dir, fname)
        with safe_open(path, framework="pt") as f:
            out[path] = list(f.keys())
    return out


def load_safetensors(model: LlamaForCausalLM, model_dir: str,
                     on_progress: Callable[[float], None] | None = None) -> None:
    """Copy every needed tensor into the model; raise WeightsError naming missing/misshapen tensors."""
    targets = model.weight_targets()
    done: set[str] = set()
    unexpected: list[str] = []
    files = safetensors_files(model_dir)
    total = sum(len(v) for v in files.values())
    seen = 0
    with torch.no_grad():
        for path, names in files.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    seen += 1
                    target = targets.get(name)
                    if target is None:
                        # rotary_emb.inv_freq buffers and a tied model's lm_head copy are harmless;
                        # anything else means the config does not describe these weights.
                        if not (name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"):
                            unexpected.append(name)
                        continue
                    param, first, rows = target
                    tensor = f.get_tensor(name)  # a view of the memory-mapped file
                    dest = param.narrow(0, first, rows)
                    if tuple(dest.shape) != tuple(tensor.shape):
                        raise WeightsError(f"{name} in {path} has shape {tuple(tensor.shape)}, "
                                           f"the config implies {tuple(dest.shape)}")
                    dest.copy_(tensor)
                    done.add(name)
                if on_progress is not None:
                    on_progress(seen / max(total, 1))
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise WeightsError(f"{model_dir} has tensors its config.json does not describe: {shown}")
    missing = sorted(set(targets) - done)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise WeightsError(f"{model_dir} lacks tensors the config needs: {shown}")


def init_random(model: LlamaForCausalLM, seed: int, device: torch.device) -> None:
    """Seeded random weights whose activations stay O(1): linear weights ~ N(0, 1/fan_in), residual
    outputs further scaled by 1/sqrt(2 * num_layers), norms at 1, embeddings ~ N(0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    residual_scale = 1.0 / math.sqrt(2 * model.cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif name == "embed_tokens.weight":
                p.normal_(0.0, 1.0, generator=gen)
            else:
                std = 1.0 / math.sqrt(p.shape[1])
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std *= residual_scale
                p.normal_(0.0, std, generator=gen)


def build_model(cfg: LlamaConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, ops=None) -> LlamaForCausalLM:
    """Allocate the model on `device` without running nn.Module's (slow, useless) default init."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions, ops)
    # Cast on the meta device (free), then allocate once in the final dtype: no fp32 copy on the GPU.
    model = model.to(dtype).to_empty(device=device)
    model.init_rope()
    return model.eval().requires_grad_(False)


def load(model: str, load_format: str = "auto", dtype: str = "auto", device: str | torch.device = "cpu",
         seed: int = 0, max_positions: int | None = None,
         on_progress: Callable[[float], None] | None = None, ops=None) -> LoadedModel:
    """Build the model named by `model` (HF directory or "demo") with the requested weights.

    ops: the model's pointwise layers (engine_svc/model/ops.py); None = plain PyTorch.

    Raises:
        UnsupportedModelError: the architecture / rope type is not implemented (named).
        WeightsError: files or tensors are missing or misshapen (named).
    """
    device = torch.device(device)
    hf, gen = read_hf_config(model)
    cfg = LlamaConfig.from_hf(hf)
    torch_dtype = resolve_dtype(dtype, hf, device)
    net = build_model(cfg, torch_dtype, device, max_positions or cfg.max_position_embeddings, ops)
    if model == "demo":
        # Generated on the CPU so the demo model is the same on every device.
        cpu = build_model(cfg, torch.float32, torch.device("cpu"), 1)
        init_random(cpu, demo.DEMO_SEED, torch.device("cpu"))
        with torch.no_grad():
            for dst, src in zip(net.parameters(), cpu.parameters()):
                dst.copy_(src)
    elif load_format == "dummy":
        init_random(net, seed, device)
    elif load_format == "auto":
        load_safetensors(net, model, on_progress)
    else:
        raise ValueError(f"load_format={load_format!r}: use auto or dummy")
    if on_progress is not None:
        on_progress(1.0)
    name = demo.DEMO_MODEL_NAME if model == "demo" else os.path.basename(os.path.normpath(model))
    bos = gen.get("bos_token_id", hf.get("bos_token_id"))
    return LoadedModel(net, cfg, hf, name, stop_ids(hf, gen), None if bos is None else int(bos), torch_dtype)


__all__ = ["load", "LoadedModel", "WeightsError", "UnsupportedModelError", "read_hf_config", "stop_ids"]
