"""Memory-bound operators (add + RMSNorm, SiLU*mul, embedding, RoPE + KV store) and the checks every
kernel wrapper makes, on the GPU (cuda/*.cu) or the CPU (NumPy). See tw/ops/__init__.py for the rules
every operator follows."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from tw.runtime import kernels

BF16 = np.dtype(ml_dtypes.bfloat16)


def is_cpu(x) -> bool:
    return isinstance(x, np.ndarray)


def check_bf16(name: str, x, contiguous: bool = True) -> None:
    """The checks every kernel wrapper makes: dtype, 16-byte alignment, contiguity."""
    if x.dtype != BF16:
        raise TypeError(f"{name} must be bfloat16, got {x.dtype}")
    if x.data.ptr % 16:
        raise ValueError(f"{name} must be 16-byte aligned (address {x.data.ptr:#x}); slice rows, not columns")
    if contiguous and not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {x.strides} for shape {x.shape}")
    if x.shape and x.shape[-1] % 8:
        raise ValueError(f"{name}: last dimension {x.shape[-1]} must be a multiple of 8 "
                         "(kernels move 16-byte vectors of 8 bf16)")


def add_rmsnorm(x, residual, weight, eps: float, out, stream=None):
    """residual += x (if x is not None); out = RMSNorm(residual) * weight. Shapes [rows, hidden]."""
    rows, hidden = residual.shape
    if out.shape != residual.shape or (x is not None and x.shape != residual.shape) or weight.shape != (hidden,):
        raise ValueError(f"add_rmsnorm: x {None if x is None else x.shape}, residual {residual.shape}, "
                         f"weight {weight.shape}, out {out.shape} must agree on [rows, hidden]")
    if is_cpu(residual):
        h = residual.astype(np.float32) if x is None else residual.astype(np.float32) + x
        if x is not None:
            residual[...] = h
        rstd = 1.0 / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)
        out[...] = h * rstd * weight
        return out
    for name, a in (("residual", residual), ("weight", weight), ("out", out)) + ((("x", x),) if x is not None else ()):
        check_bf16(f"add_rmsnorm {name}", a)
    if rows == 0:
        return out
    num_vec = hidden // 8  # ~4 vectors per thread, at most 8 (MAX_VEC in cuda/rmsnorm.cu)
    block = min(1024, max(32, ((num_vec + 3) // 4 + 31) // 32 * 32))
    if num_vec > block * 8:
        raise ValueError(f"add_rmsnorm supports hidden <= {1024 * 64}, got {hidden}")
    fn = kernels.function("rmsnorm", "add_rmsnorm_bf16")
    kernels.launch(fn, rows, block, (0 if x is None else x.data.ptr, residual.data.ptr, weight.data.ptr,
                                     out.data.ptr, np.int32(hidden), np.float32(eps)), stream=stream)
    return out


def num_sms() -> int:
    """SM count of the current GPU (grid-stride kernels launch 8 CTAs per SM at most)."""
    import cupy as cp
    return kernels.device_facts(cp.cuda.Device().id)[1]


def silu_mul(gate_up, out, stream=None):
    """out[r, :] = silu(gate_up[r, :F]) * gate_up[r, F:], F = out.shape[1]."""
    rows, ffn = out.shape
    if gate_up.shape != (rows, 2 * ffn):
        raise ValueError(f"silu_mul: gate_up {gate_up.shape} must be [rows, 2 * {ffn}] for out {out.shape}")
    if is_cpu(out):
        g, u = gate_up[:, :ffn], gate_up[:, ffn:]
        out[...] = g / (1 + np.exp(-g)) * u
        return out
    check_bf16("silu_mul gate_up", gate_up)
    check_bf16("silu_mul out", out)
    if rows:
        fn = kernels.function("activation", "silu_mul_bf16")
        kernels.launch(fn, min(num_sms() * 8, -(-rows * ffn // 8 // 256)), 256,
                       (gate_up.data.ptr, out.data.ptr, np.int32(rows), np.int32(ffn)), stream=stream)
    return out


def embedding(ids, table, out, stream=None):
    """out[t] = table[ids[t]]. ids are int32, checked to lie in [0, vocab) by whoever built them."""
    if is_cpu(out):
        np.take(table, ids, axis=0, out=out)
        return out
    check_bf16("embedding table", table)
    check_bf16("embedding out", out)
    if ids.dtype != np.int32:
        raise TypeError(f"embedding ids must be int32, got {ids.dtype}")
    if len(ids):
        fn = kernels.function("embedding", "embedding_bf16")
        kernels.launch(fn, len(ids), 128, (ids.data.ptr, table.data.ptr, out.data.ptr, np.int32(table.shape[1])),
                       stream=stream)
    return out


def rope_store_kv(qkv, bias, pos, slot, inv_freq, k_cache, v_cache, num_heads: int, num_kv_heads: int,
                  stream=None):
    """Add the QKV bias (if any), rotate q in place, store rotated k and v in the KV cache.

    qkv [T, (num_heads + 2 num_kv_heads) * head_dim]; k_cache/v_cache [slots, num_kv_heads, head_dim];
    pos/slot [T] int32; inv_freq [head_dim/2] float32.
    """
    head_dim = k_cache.shape[-1]
    tokens = qkv.shape[0]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"rope: qkv width {qkv.shape[1]} != ({num_heads} + 2*{num_kv_heads}) * {head_dim}")
    if is_cpu(qkv):
        x = qkv.reshape(tokens, num_heads + 2 * num_kv_heads, head_dim).astype(np.float32)
        if bias is not None:
            x = x + bias.reshape(1, -1, head_dim)
        angle = pos[:, None].astype(np.float32) * inv_freq[None, :]           # [T, d/2]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        half = head_dim // 2
        rot = x[:, :num_heads + num_kv_heads]
        x1, x2 = rot[..., :half].copy(), rot[..., half:].copy()
        rot[..., :half], rot[..., half:] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        qkv[:, :num_heads * head_dim] = x[:, :num_heads].reshape(tokens, -1)
        k_cache[slot] = x[:, num_heads:num_heads + num_kv_heads]
        v_cache[slot] = x[:, num_heads + num_kv_heads:]
        return
    for name, a in (("qkv", qkv), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_bf16(f"rope {name}", a)
    if tokens:
        fn = kernels.function("rope", "rope_store_kv_bf16")
        kernels.launch(fn, tokens, 256, (qkv.data.ptr, np.int32(qkv.shape[1]), 0 if bias is None else bias.data.ptr,
                                         pos.data.ptr, slot.data.ptr, inv_freq.data.ptr, k_cache.data.ptr,
                                         v_cache.data.ptr, np.int32(num_heads), np.int32(num_kv_heads),
                                         np.int32(head_dim)), stream=stream)
