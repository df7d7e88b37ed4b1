"""Model presets and tensor-parallel shard shapes.

Shapes are those of the public model configs; weights are random (see tw/model/weights.py). Llama-3 RoPE
frequency scaling (Llama-3.1/3.3 `rope_scaling`) is applied when `rope_scaling` is set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int                 # intermediate size of the MLP (of each expert in an MoE model)
    num_layers: int
    vocab: int
    rope_theta: float
    eps: float
    qkv_bias: bool = False
    rope_scaling: tuple | None = None   # (factor, low_freq_factor, high_freq_factor, original_max_pos)
    num_experts: int = 0     # > 0: mixture of experts (tw/model/moe.py)
    top_k: int = 2           # experts per token (MoE models only)
    max_context: int = 131072  # tokens one sequence may hold (cached + new): the public config's context

    def __post_init__(self):
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"{self.name}: need num_experts >= 0 and 1 <= top_k <= num_experts, got "
                             f"num_experts={self.num_experts}, top_k={self.top_k}")
        for f in ("hidden", "num_heads", "num_kv_heads", "head_dim", "ffn", "num_layers", "vocab"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{self.name}: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads {self.num_heads} must be a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.hidden % 8 or self.head_dim % 8:
            raise ValueError(f"{self.name}: hidden ({self.hidden}) and head_dim ({self.head_dim}) must be "
                             "multiples of 8 (the kernels move 8 bf16 = 16 bytes at a time)")

    def with_layers(self, num_layers: int) -> "ModelConfig":
        return replace(self, num_layers=num_layers)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], float64 (Llama-3 scaling applied if set)."""
        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        if self.rope_scaling is None:
            return inv
        factor, low, high, orig = self.rope_scaling
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


@dataclass(frozen=True)
class ShardConfig:
    """What one TP rank holds of a model: the column/row-parallel split of heads and FFN."""
    model: ModelConfig
    tp: int
    rank: int

    def __post_init__(self):
        m, tp = self.model, self.tp
        if tp < 1 or not 0 <= self.rank < tp:
            raise ValueError(f"bad TP rank {self.rank} of {tp}")
        if m.num_heads % tp or m.num_kv_heads % tp:
            raise ValueError(f"{m.name}: TP={tp} must divide num_heads ({m.num_heads}) and num_kv_heads "
                             f"({m.num_kv_heads}); valid TP degrees: {valid_tp(m)}")
        if m.ffn % tp or (m.ffn // tp) % 8:
            what = "every expert's ffn" if m.num_experts else "ffn"
            raise ValueError(f"{m.name}: TP={tp} must divide {what} ({m.ffn}) into multiples of 8")

    num_heads = property(lambda s: s.model.num_heads // s.tp)
    num_kv_heads = property(lambda s: s.model.num_kv_heads // s.tp)
    ffn = property(lambda s: s.model.ffn // s.tp)   # MoE: of each expert (every expert is TP-sharded)
    q_dim = property(lambda s: s.num_heads * s.model.head_dim)
    kv_dim = property(lambda s: s.num_kv_heads * s.model.head_dim)
    qkv_dim = property(lambda s: s.q_dim + 2 * s.kv_dim)


def valid_tp(m: ModelConfig) -> list[int]:
    return [t for t in range(1, m.num_kv_heads + 1)
            if m.num_heads % t == 0 and m.num_kv_heads % t == 0 and m.ffn % t == 0 and (m.ffn // t) % 8 == 0]


_LLAMA3_SCALING = (8.0, 1.0, 4.0, 8192)

PRESETS = {
    "llama3-70b": ModelConfig("llama3-70b", hidden=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                              ffn=28672, num_layers=80, vocab=128256, rope_theta=500000.0, eps=1e-5,
                              rope_scaling=_LLAMA3_SCALING),
    # Qwen2.5-72B's context: the model card's 131,072 tokens (with YaRN; its config.json says 32,768).
    "qwen2.5-72b": ModelConfig("qwen2.5-72b", hidden=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                               ffn=29568, num_layers=80, vocab=152064, rope_theta=1e6, eps=1e-6,
                               qkv_bias=True),
    "llama3-8b": ModelConfig("llama3-8b", hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                             ffn=14336, num_layers=32, vocab=128256, rope_theta=500000.0, eps=1e-5,
                             rope_scaling=_LLAMA3_SCALING),
    "mixtral-8x22b": ModelConfig("mixtral-8x22b", hidden=6144, num_heads=48, num_kv_heads=8, head_dim=128,
                                 ffn=16384, num_layers=56, vocab=32768, rope_theta=1e6, eps=1e-5,
                                 num_experts=8, top_k=2, max_context=65536),
    # CPU-sized: every code path of the big models (GQA, RoPE, TP up to 4), seconds on a laptop. These and
    # `small` are ours: their context, 8192 tokens, is what a CPU run covers in seconds.
    "tiny": ModelConfig("tiny", hidden=256, num_heads=8, num_kv_heads=4, head_dim=32, ffn=512,
                        num_layers=2, vocab=1000, rope_theta=10000.0, eps=1e-5, max_context=8192),
    # GPU-test-sized with the real head_dim (the attention kernel needs head_dim 128).
    "small": ModelConfig("small", hidden=2048, num_heads=16, num_kv_heads=8, head_dim=128, ffn=5632,
                         num_layers=2, vocab=4096, rope_theta=500000.0, eps=1e-5,
                         rope_scaling=_LLAMA3_SCALING, max_context=8192),
    # CPU-sized with 8 KV heads, for TP=8 code paths on a laptop.
    "tiny-tp8": ModelConfig("tiny-tp8", hidden=256, num_heads=16, num_kv_heads=8, head_dim=16, ffn=512,
                            num_layers=2, vocab=1000, rope_theta=10000.0, eps=1e-5, max_context=8192),
    "tiny-qwen": ModelConfig("tiny-qwen", hidden=256, num_heads=8, num_kv_heads=4, head_dim=32, ffn=640,
                             num_layers=2, vocab=1000, rope_theta=1e6, eps=1e-6, qkv_bias=True, max_context=8192),
    # CPU-sized mixture of experts: router, top-2, 4 TP-sharded experts (TP up to 4).
    "tiny-moe": ModelConfig("tiny-moe", hidden=512, num_heads=8, num_kv_heads=8, head_dim=64, ffn=512,
                            num_layers=2, vocab=1000, rope_theta=1e6, eps=1e-5, num_experts=4, top_k=2,
                            max_context=8192),
}


def get(name: str, num_layers: int | None = None) -> ModelConfig:
    """A preset by name, optionally with fewer layers."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"--layers must be >= 1, got {num_layers}")
        cfg = cfg.with_layers(num_layers)
    return cfg
