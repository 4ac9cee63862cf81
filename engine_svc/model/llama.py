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
from engine_svc.model.ops import TorchOps

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
    """Holds the weight; the maths is ops.rms_norm (fused with the residual add where there is one)."""

    def __init__(self, dim: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [..., dim]. Without residual -> normed x; with it -> (normed(x + residual), x + residual)."""
        if residual is None:
            shape = x.shape
            return self.ops.rms_norm(x.reshape(-1, shape[-1]), self.weight, self.eps)[0].view(shape)
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, sliding_window: int | None, ops):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # Fused q|k|v projection: one GEMM instead of three (the loader concatenates HF's q/k/v rows).
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = sliding_window
        self.ops = ops

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rotary(q, k, positions, cos_sin)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # [T, H*D] -> [T, hidden]


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, ops):
        super().__init__()
        # Fused gate|up projection (the loader concatenates HF's gate_proj and up_proj rows).
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int, ops):
        super().__init__()
        window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, window, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                cos_sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (mlp output, residual stream before it); the next norm adds the two.

        Deferring each residual add into the following norm lets ops fuse the add and the norm."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, positions, cos_sin, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Packed-token decoder. forward() -> final hidden states; compute_logits() on the rows to sample.

    `ops` supplies rms_norm / rotary / silu_and_mul (engine_svc/model/ops.py): plain PyTorch by
    default, fused Triton kernels on CUDA."""

    def __init__(self, cfg: LlamaConfig, max_positions: int | None = None, ops=None):
        super().__init__()
        ops = ops or TorchOps()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ops) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def init_rope(self) -> None:
        """Build the fp32 cos|sin table [max_positions, head_dim] on the model's device.

        Call once the module has its final device (a non-persistent buffer). fp32 whatever the
        model dtype: transformers also forms cos/sin in fp32 and rounds them only where used."""
        inv_freq = rope_inv_freq(self.cfg).to(self.embed_tokens.weight.device)
        pos = torch.arange(self.max_positions, device=inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2], the product transformers forms
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: [T] -> normed hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, self.cos_sin, kv_cache, meta, backend)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ---- weights: HF tensor names -> (parameter, first row, number of rows) ----

    def weight_targets(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Every HF checkpoint tensor name this model needs -> where its rows go (fused params take
        several HF tensors: q|k|v rows in qkv_proj, gate|up rows in gate_up_proj)."""
        def whole(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
            return p, 0, p.shape[0]

        targets = {"model.embed_tokens.weight": whole(self.embed_tokens.weight),
                   "model.norm.weight": whole(self.norm.weight)}
        if self.lm_head is not None:
            targets["lm_head.weight"] = whole(self.lm_head.weight)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            qkv = {"q_proj": (0, attn.q_size), "k_proj": (attn.q_size, attn.kv_size),
                   "v_proj": (attn.q_size + attn.kv_size, attn.kv_size)}
            gate_up = {"gate_proj": (0, mlp.intermediate_size),
                       "up_proj": (mlp.intermediate_size, mlp.intermediate_size)}
            for prefix, fused, parts in ((f"{p}self_attn.", attn.qkv_proj, qkv), (f"{p}mlp.", mlp.gate_up_proj, gate_up)):
                for name, (first, rows) in parts.items():
                    targets[f"{prefix}{name}.weight"] = (fused.weight, first, rows)
                    if fused.bias is not None:
                        targets[f"{prefix}{name}.bias"] = (fused.bias, first, rows)
            plain = {"self_attn.o_proj": attn.o_proj, "mlp.down_proj": mlp.down_proj,
                     "input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm}
            if attn.q_norm is not None:
                plain.update({"self_attn.q_norm": attn.q_norm, "self_attn.k_norm": attn.k_norm})
            for name, module in plain.items():
                targets[f"{p}{name}.weight"] = whole(module.weight)
                if getattr(module, "bias", None) is not None:
                    targets[f"{p}{name}.bias"] = whole(module.bias)
        return targets
