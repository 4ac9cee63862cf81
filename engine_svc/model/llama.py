"""One plain-PyTorch decoder for the Llama family: Llama 2/3/3.x, Mistral, Qwen2 and Qwen3.

They share the pre-norm block (RMSNorm -> attention -> residual -> RMSNorm -> SiLU-gated MLP ->
residual) and rotate-half RoPE; they differ only in the switches of `LlamaConfig`:

    Llama 3.1/3.2   rope_type "llama3" (long-context frequency scaling)
    Mistral         sliding_window on every layer
    Qwen2           bias on q/k/v (not on o); optional sliding window on layers >= max_window_layers
    Qwen3           RMSNorm over head_dim on q and k before RoPE

Tokens are packed along dim 0 (no batch dim, no padding): a step's prefill chunks and decode tokens
form one [num_tokens] sequence, and attention goes through the AttentionBackend passed in, which
knows from the metadata where each sequence starts and where its cached K/V live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.attention.base import AttentionBackend, AttentionMetadata

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented; the message names it."""


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", "factor": ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (always), Llama with attention_bias
    o_bias: bool = False  # Llama/Qwen3 with attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer; None = full attention
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Read an HF config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and model_type not in SUPPORTED_ARCHITECTURES.values():
            raise UnsupportedModelError(
                f"unsupported architecture {archs or model_type!r}: kvmesh implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        model_type = SUPPORTED_ARCHITECTURES[arch] if arch else model_type
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}: only silu is implemented")

        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_type {rope_type!r}: kvmesh implements {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not implemented")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        rope["rope_type"] = rope_type

        num_layers = hf["num_hidden_layers"]
        window = hf.get("sliding_window")
        if model_type == "mistral":
            windows = [window] * num_layers
        elif model_type in ("qwen2", "qwen3"):
            layer_types = hf.get("layer_types")
            if not hf.get("use_sliding_window", False) or window is None:
                windows = [None] * num_layers
            elif layer_types is not None:
                windows = [window if t == "sliding_attention" else None for t in layer_types]
            else:
                first = hf.get("max_window_layers", num_layers)
                windows = [window if i >= first else None for i in range(num_layers)]
        else:
            windows = [None] * num_layers

        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf["max_position_embeddings"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=windows,
            model_type=model_type,
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], fp32, as transformers computes them for each rope_type."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        # Between the two wavelength bounds, interpolate smoothly between scaled and unscaled.
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the model dtype: transformers' order, so fp32 logits match it.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, heads, head_dim]; cos, sin: [T, head_dim // 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, head_dim // 2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # Fused q|k|v projection: one GEMM instead of three (the loader concatenates HF's q/k/v rows).
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = sliding_window

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # [T, H*D] -> [T, hidden]


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        # Fused gate|up projection (the loader concatenates HF's gate_proj and up_proj rows).
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, meta, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    """Packed-token decoder. forward() -> final hidden states; compute_logits() on the rows to sample."""

    def __init__(self, cfg: LlamaConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def init_rope(self) -> None:
        """Build the cos|sin table [max_positions, head_dim] (fp32 maths, then the model dtype).

        Call after the module has its final device and dtype (it is a non-persistent buffer)."""
        inv_freq = rope_inv_freq(self.cfg).to(self.embed_tokens.weight.device)
        pos = torch.arange(self.max_positions, device=inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2], the product transformers forms
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(self.embed_tokens.weight.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: [T] -> normed hidden states [T, hidden]."""
        cos, sin = self.cos_sin[positions].chunk(2, dim=-1)  # [T, D/2] each
        h = self.embed_tokens(input_ids)  # [T, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, kv_cache, meta, backend)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ---- weights: HF tensor names -> (parameter, row offset in a fused parameter) ----

    def weight_targets(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Every HF checkpoint tensor name this model needs, with its destination and row offset."""
        targets: dict[str, tuple[torch.Tensor, int]] = {"model.embed_tokens.weight": (self.embed_tokens.weight, 0),
                                                         "model.norm.weight": (self.norm.weight, 0)}
        if self.lm_head is not None:
            targets["lm_head.weight"] = (self.lm_head.weight, 0)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            offsets = {"q_proj": 0, "k_proj": attn.q_size, "v_proj": attn.q_size + attn.kv_size}
            for name, off in offsets.items():
                targets[f"{p}self_attn.{name}.weight"] = (attn.qkv_proj.weight, off)
                if attn.qkv_proj.bias is not None:
                    targets[f"{p}self_attn.{name}.bias"] = (attn.qkv_proj.bias, off)
            targets[f"{p}self_attn.o_proj.weight"] = (attn.o_proj.weight, 0)
            if attn.o_proj.bias is not None:
                targets[f"{p}self_attn.o_proj.bias"] = (attn.o_proj.bias, 0)
            if attn.q_norm is not None:
                targets[f"{p}self_attn.q_norm.weight"] = (attn.q_norm.weight, 0)
                targets[f"{p}self_attn.k_norm.weight"] = (attn.k_norm.weight, 0)
            for name, off in (("gate_proj", 0), ("up_proj", mlp.intermediate_size)):
                targets[f"{p}mlp.{name}.weight"] = (mlp.gate_up_proj.weight, off)
                if mlp.gate_up_proj.bias is not None:
                    targets[f"{p}mlp.{name}.bias"] = (mlp.gate_up_proj.bias, off)
            targets[f"{p}mlp.down_proj.weight"] = (mlp.down_proj.weight, 0)
            if mlp.down_proj.bias is not None:
                targets[f"{p}mlp.down_proj.bias"] = (mlp.down_proj.bias, 0)
            targets[f"{p}input_layernorm.weight"] = (layer.input_layernorm.weight, 0)
            targets[f"{p}post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, 0)
        return targets
