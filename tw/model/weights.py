"""Random model weights: full (unsharded) tensors from a fixed seed, and one TP rank's shard of them.

Scaling, so that activations stay O(1) through every layer: a linear layer with `fan_in` inputs draws
N(0, 1/fan_in), so an O(1) input gives an O(1) output (for row-parallel layers the fan-in is the full,
unsharded width: the sum over ranks has unit variance); norm weights are 1 + N(0, 0.1^2); the QKV bias
is N(0, 0.1^2); embeddings and the prefix K/V in the cache are N(0, 1). The residual stream then grows
like sqrt(layers) (std ~9 after 80 layers, well inside bf16's range) while every layer's input is
re-normalized by RMSNorm.

MoE layers (cfg.num_experts > 0) have no dense gate_up/down: a router [E, H] (N(0, 1/H), like every
linear) and, per expert e, its own gate_up [2F, H] and down [H, F] from the streams named
"expert<e>/gate_up" and "expert<e>/down", stacked as experts_gate_up [E, 2F, H] and experts_down
[E, H, F] (F: the expert FFN).

Every tensor has its own seed derived from (seed, layer, name), so a TP=1 model, a TP=2 model and the
float64 reference (tw/model/reference.py) all see the same numbers. The generator is the array library's own
(NumPy on CPU, CuPy on GPU), so CPU and GPU models have different (equally random) weights.
"""
from __future__ import annotations

import zlib

import numpy as np

from tw.runtime.arrays import xp_of
from tw.model.config import ModelConfig, ShardConfig


def _seed(seed: int, layer: int, name: str) -> int:
    return zlib.crc32(f"{seed}/{layer}/{name}".encode())


def normal(xp, shape, std: float, seed: int, layer: int, name: str, mean: float = 0.0):
    """float32 N(mean, std^2) of `shape` from the (seed, layer, name) stream of xp's generator."""
    rng = xp.random.default_rng(_seed(seed, layer, name))
    return (rng.standard_normal(shape, dtype=xp.float32) * np.float32(std) + np.float32(mean)).astype(xp.float32)


def full_layer(cfg: ModelConfig, layer: int, seed: int, xp) -> dict:
    """All weights of one decoder layer, unsharded, float32 (before rounding to the model dtype)."""
    h, hd = cfg.hidden, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    w = {
        "input_norm": input_norm(cfg, layer, seed, xp),
        "post_norm": normal(xp, (h,), 0.1, seed, layer, "post_norm", mean=1.0),
        "wqkv": normal(xp, (qkv, h), h ** -0.5, seed, layer, "wqkv"),                        # [qkv, H]
        "wo": normal(xp, (h, cfg.num_heads * hd), (cfg.num_heads * hd) ** -0.5, seed, layer, "wo"),
    }
    if cfg.num_experts:
        e_range, f = range(cfg.num_experts), cfg.ffn
        w["router"] = normal(xp, (cfg.num_experts, h), h ** -0.5, seed, layer, "router")    # [E, H]
        w["experts_gate_up"] = xp.stack([normal(xp, (2 * f, h), h ** -0.5, seed, layer, f"expert{e}/gate_up")
                                         for e in e_range])                                 # [E, 2F, H]
        w["experts_down"] = xp.stack([normal(xp, (h, f), f ** -0.5, seed, layer, f"expert{e}/down")
                                      for e in e_range])                                    # [E, H, F]
    else:
        w["wgate_up"] = normal(xp, (2 * cfg.ffn, h), h ** -0.5, seed, layer, "wgate_up")    # [2F, H]
        w["wdown"] = normal(xp, (h, cfg.ffn), cfg.ffn ** -0.5, seed, layer, "wdown")        # [H, F]
    if cfg.qkv_bias:
        w["bqkv"] = normal(xp, (qkv,), 0.1, seed, layer, "bqkv")
    return w


def input_norm(cfg: ModelConfig, layer: int, seed: int, xp):
    return normal(xp, (cfg.hidden,), 0.1, seed, layer, "input_norm", mean=1.0)


def embedding(cfg: ModelConfig, seed: int, xp):
    return normal(xp, (cfg.vocab, cfg.hidden), 1.0, seed, -1, "embedding")    # [vocab, H]


def final_norm(cfg: ModelConfig, seed: int, xp):
    return normal(xp, (cfg.hidden,), 0.1, seed, -1, "final_norm", mean=1.0)


def prefix_kv(cfg: ModelConfig, layer: int, capacity: int, seed: int, xp):
    """K and V cache contents for tokens already cached, full heads: 2 x [capacity, kv_heads, head_dim]."""
    shape = (capacity, cfg.num_kv_heads, cfg.head_dim)
    return normal(xp, shape, 1.0, seed, layer, "k_prefix"), normal(xp, shape, 1.0, seed, layer, "v_prefix")


def shard_layer(full: dict, shard: ShardConfig) -> dict:
    """One TP rank's slice: QKV and gate_up split by output rows (column-parallel), o_proj and down
    split by input columns (row-parallel), norms replicated. MoE: every expert split like the dense MLP
    (its gate_up by rows: experts_gate_up [E, 2 F/tp, H]; its down by columns: experts_down
    [E, H, F/tp]), the router replicated."""
    m, r, hd = shard.model, shard.rank, shard.model.head_dim
    q_rows = slice(r * shard.q_dim, (r + 1) * shard.q_dim)
    k0, v0 = m.num_heads * hd, (m.num_heads + m.num_kv_heads) * hd
    k_rows = slice(k0 + r * shard.kv_dim, k0 + (r + 1) * shard.kv_dim)
    v_rows = slice(v0 + r * shard.kv_dim, v0 + (r + 1) * shard.kv_dim)
    f_rows = slice(r * shard.ffn, (r + 1) * shard.ffn)
    up_rows = slice(m.ffn + r * shard.ffn, m.ffn + (r + 1) * shard.ffn)
    xp = xp_of(full["wqkv"])
    out = {
        "input_norm": full["input_norm"], "post_norm": full["post_norm"],
        "wqkv": xp.concatenate([full["wqkv"][q_rows], full["wqkv"][k_rows], full["wqkv"][v_rows]]),
        "wo": xp.ascontiguousarray(full["wo"][:, q_rows]),
    }
    if m.num_experts:
        g, d = full["experts_gate_up"], full["experts_down"]
        out["router"] = full["router"]
        out["experts_gate_up"] = xp.concatenate([g[:, f_rows], g[:, up_rows]], axis=1)
        out["experts_down"] = xp.ascontiguousarray(d[:, :, f_rows])
    else:
        out["wgate_up"] = xp.concatenate([full["wgate_up"][f_rows], full["wgate_up"][up_rows]])
        out["wdown"] = xp.ascontiguousarray(full["wdown"][:, f_rows])
    if "bqkv" in full:
        b = full["bqkv"]
        out["bqkv"] = xp.concatenate([b[q_rows], b[k_rows], b[v_rows]])
    return out


def shard_kv(kv, shard: ShardConfig):
    """This rank's KV heads of a full-heads cache tensor [capacity, kv_heads, head_dim]."""
    return kv[:, shard.rank * shard.num_kv_heads:(shard.rank + 1) * shard.num_kv_heads]
