"""Causal attention over the KV cache: varlen batches, prefixes in the cache, GQA, decode tokens.

Layout (shared by the NumPy reference and the kernel, cuda/attention.cu):
    q        [T, num_heads, head_dim]          rows may be strided (q inside a fused qkv buffer)
    k_cache  [kv_capacity, num_kv_heads, head_dim], v_cache the same
    out      [T, num_heads, head_dim]          contiguous
    cu_seqlens_q int32 [S + 1]  token offsets of each sequence's new tokens (T = cu_seqlens_q[S])
    kv_start     int32 [S]      cache slot of sequence s's position 0
    prefix_len   int32 [S]      tokens of sequence s already in the cache before this batch
New token j of sequence s has position p = prefix_len[s] + j; its K/V are already at slot
kv_start[s] + p and it attends to slots kv_start[s] + 0 .. kv_start[s] + p. Query head h reads kv head
h // (num_heads // num_kv_heads).

GPU use: build the metadata once per batch on the host (`attention_meta`, which uploads a few small
arrays), then call `attention_cuda` as often as needed: it only launches one kernel, with no
host<->device traffic and no allocation, so it can be captured in a CUDA graph on any stream.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from tw.runtime import kernels

BF16 = np.dtype(ml_dtypes.bfloat16)
HEAD_DIMS = (64, 128)       # head_dim values with a compiled kernel
BLOCK_MS = (64, 128)        # query rows per CTA: 4 or 8 warps of 16 rows
DEFAULT_BLOCK_M = 128
# "mma": mma.sync kernels, any sm_80+ GPU, head_dim 64/128, block_m 64/128.
# "wgmma": Hopper (sm_90a) warpgroup kernel, head_dim 128, block_m 128 only.
# "auto": wgmma where it applies, else mma.
KERNELS = ("auto", "mma", "wgmma")
MAX_WORK_ITEMS = 65535      # gridDim.y limit


# ---------------------------------------------------------------- NumPy reference

def attention_numpy(q, k_cache, v_cache, cu_seqlens_q, kv_start, prefix_len, scale, out=None,
                    query_chunk: int = 256):
    """Reference causal attention in the dtype of `q` (float64 in tests, float32 in the CPU model).

    Shapes as in the module docstring; the int arrays are host numpy arrays. Writes and returns `out`
    ([T, num_heads, head_dim], allocated if None). Queries are processed `query_chunk` at a time only
    to bound the size of the score matrix.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    dtype = q.dtype
    if out is None:
        out = np.empty(q.shape, dtype=dtype)
    cu = np.asarray(cu_seqlens_q)
    if int(cu[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens_q[-1] = {int(cu[-1])} but q has {num_tokens} tokens")
    for s in range(len(cu) - 1):
        t0, t1 = int(cu[s]), int(cu[s + 1])
        prefix, slot0 = int(prefix_len[s]), int(kv_start[s])
        kv_len = prefix + (t1 - t0)
        k = np.repeat(k_cache[slot0:slot0 + kv_len].astype(dtype), group, axis=1)  # [kv_len, H, D]
        v = np.repeat(v_cache[slot0:slot0 + kv_len].astype(dtype), group, axis=1)  # [kv_len, H, D]
        kt, vh = k.transpose(1, 2, 0), v.transpose(1, 0, 2)                          # [H, D, kv], [H, kv, D]
        for c0 in range(t0, t1, query_chunk):
            c1 = min(c0 + query_chunk, t1)
            pos = prefix + np.arange(c0 - t0, c1 - t0)                              # [n]
            # batched matmuls (BLAS) rather than einsum, which would loop in C without BLAS
            scores = np.matmul(q[c0:c1].astype(dtype).transpose(1, 0, 2), kt) * dtype.type(scale)  # [H, n, kv]
            scores = np.where(np.arange(kv_len)[None, None, :] > pos[None, :, None], -np.inf, scores)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)                             # [H, n, kv_len]
            out[c0:c1] = np.matmul(scores, vh).transpose(1, 0, 2)
    return out


# ---------------------------------------------------------------- metadata (host -> device, once per batch)

@dataclass(frozen=True)
class AttentionMeta:
    """Everything the kernel needs about a batch, already on the device.

    work: int32 [num_items, 2] = (sequence, first query row of the block), heaviest blocks first.
    """
    cu_seqlens_q: object   # cupy int32 [S + 1]
    kv_start: object       # cupy int32 [S]
    prefix_len: object     # cupy int32 [S]
    work: object           # cupy int32 [num_items, 2]
    num_seqs: int
    num_tokens: int
    num_items: int
    block_m: int
    kv_slots_needed: int   # max over s of kv_start + prefix_len + new tokens: cache rows read
    kernel: str = "auto"   # one of KERNELS


def work_items(cu_seqlens_q, prefix_len, block_m: int) -> np.ndarray:
    """int32 [num_items, 2]: one (sequence, q0) per block of `block_m` new tokens, sorted by the number
    of keys the block reads, largest first (a longest-processing-time-first schedule)."""
    cu = np.asarray(cu_seqlens_q, dtype=np.int64)
    items, cost = [], []
    for s in range(len(cu) - 1):
        n = int(cu[s + 1] - cu[s])
        for q0 in range(0, n, block_m):
            items.append((s, q0))
            cost.append(int(prefix_len[s]) + min(q0 + block_m, n))
    if not items:
        return np.zeros((0, 2), dtype=np.int32)
    order = np.argsort(-np.array(cost), kind="stable")
    return np.array(items, dtype=np.int32)[order]


def attention_meta(cu_seqlens_q, kv_start, prefix_len, block_m: int = DEFAULT_BLOCK_M,
                   kernel: str = "auto") -> AttentionMeta:
    """Check a batch's host int arrays, build the tile schedule and upload both (one host->device copy
    each). Call once per batch, outside any CUDA graph capture; `attention_cuda` then reuses it.
    block_m (64 or 128) = query rows per CTA; kernel = 'auto', 'mma' or 'wgmma' (see KERNELS)."""
    import cupy as cp
    cu = np.ascontiguousarray(cu_seqlens_q, dtype=np.int32)
    start = np.ascontiguousarray(kv_start, dtype=np.int32)
    prefix = np.ascontiguousarray(prefix_len, dtype=np.int32)
    num_seqs = len(cu) - 1
    if cu.ndim != 1 or num_seqs < 0 or start.shape != (num_seqs,) or prefix.shape != (num_seqs,):
        raise ValueError(f"cu_seqlens_q must be [S+1] and kv_start, prefix_len [S]; got shapes "
                         f"{cu.shape}, {start.shape}, {prefix.shape}")
    if cu[0] != 0 or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_seqlens_q must start at 0 and never decrease, got {cu.tolist()}")
    if np.any(start < 0) or np.any(prefix < 0):
        raise ValueError("kv_start and prefix_len must be >= 0")
    if block_m not in BLOCK_MS:
        raise ValueError(f"block_m must be one of {BLOCK_MS}, got {block_m}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "wgmma" and block_m != 128:
        raise ValueError(f"the wgmma kernel works on 128 query rows per CTA; got block_m={block_m}")
    work = work_items(cu, prefix, block_m)
    if len(work) > MAX_WORK_ITEMS:
        raise ValueError(f"{len(work)} query blocks exceed the grid limit {MAX_WORK_ITEMS}; "
                         f"split the batch or use block_m=128")
    new = np.diff(cu).astype(np.int64)
    slots = int(np.max(start.astype(np.int64) + prefix + new)) if num_seqs else 0
    return AttentionMeta(cp.asarray(cu), cp.asarray(start), cp.asarray(prefix), cp.asarray(work),
                         num_seqs=num_seqs, num_tokens=int(cu[-1]), num_items=len(work),
                         block_m=block_m, kv_slots_needed=slots, kernel=kernel)


# ---------------------------------------------------------------- GPU wrapper

def _check_aligned(name, x):
    if x.data.ptr % 16:
        raise ValueError(f"attention: {name} must be 16-byte aligned (address {x.data.ptr:#x})")


def attention_cuda(q, k_cache, v_cache, meta: AttentionMeta, out, scale: float, stream=None):
    """out = causal attention of q over the cache, per the layout in the module docstring (GPU, bf16).

    q:        cupy bf16 [T, num_heads, head_dim]; heads contiguous within a row (strides
              (row_stride, head_dim, 1) elements), row_stride a multiple of 8: a view into a fused
              qkv buffer [T, (num_heads + 2 * num_kv_heads) * head_dim] is fine.
    k_cache, v_cache: cupy bf16 [kv_capacity, num_kv_heads, head_dim], C-contiguous.
    meta:     from attention_meta(cu_seqlens_q, kv_start, prefix_len) for this batch.
    out:      cupy bf16 [T, num_heads, head_dim], C-contiguous; every element is written.
    scale:    softmax scale, normally 1 / sqrt(head_dim).
    stream:   cupy stream (None = current). No sync, no allocation: capturable in a CUDA graph.
    head_dim in (64, 128); num_heads % num_kv_heads == 0; all base pointers 16-byte aligned.
    """
    if q.ndim != 3 or k_cache.ndim != 3 or v_cache.ndim != 3 or out.ndim != 3:
        raise ValueError(f"attention: q, k_cache, v_cache, out must be 3-D; got {q.shape}, "
                         f"{k_cache.shape}, {v_cache.shape}, {out.shape}")
    num_tokens, num_heads, head_dim = q.shape
    kv_capacity, num_kv_heads = k_cache.shape[:2]
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if x.dtype != BF16:
            raise TypeError(f"attention: {name} must be bfloat16, got {x.dtype}")
        _check_aligned(name, x)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"attention: head_dim {head_dim} not supported; compiled for {HEAD_DIMS}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"attention: num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if k_cache.shape[2] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: caches must both be [kv_capacity, num_kv_heads, {head_dim}]; got "
                         f"k {k_cache.shape}, v {v_cache.shape}")
    if out.shape != q.shape:
        raise ValueError(f"attention: out {out.shape} must have q's shape {q.shape}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if not x.flags.c_contiguous:
            raise ValueError(f"attention: {name} must be C-contiguous, got strides {x.strides} for {x.shape}")
    item = q.itemsize
    if q.strides[2] != item or q.strides[1] != head_dim * item:
        raise ValueError(f"attention: q's heads must be contiguous within a row (strides (row, "
                         f"{head_dim * item}, {item}) bytes), got {q.strides}")
    row_stride = q.strides[0] // item
    if num_tokens > 1 and (q.strides[0] % 16 or row_stride < num_heads * head_dim):
        raise ValueError(f"attention: q's row stride {q.strides[0]} bytes must be a multiple of 16 and "
                         f">= num_heads * head_dim * 2 = {num_heads * head_dim * item}")
    if meta.num_tokens != num_tokens:
        raise ValueError(f"attention: meta describes {meta.num_tokens} tokens but q has {num_tokens}")
    if meta.kv_slots_needed > kv_capacity:
        raise ValueError(f"attention: the batch reads cache slots up to {meta.kv_slots_needed - 1} but the "
                         f"cache holds {kv_capacity}")
    if meta.num_items == 0:
        return out
    if _use_wgmma(meta, head_dim):
        fn = kernels.function("attention", "attention_fwd_bf16_d128_wgmma")
        block, shared = 256, (128 * 128 + 4 * 128 * 128) * item + 1024  # Q, 2x(K, V) of 128 keys, align
    else:
        num_warps = meta.block_m // 16
        fn = kernels.function("attention", f"attention_fwd_bf16_d{head_dim}_w{num_warps}")
        block, shared = 32 * num_warps, (meta.block_m * head_dim + 4 * 64 * head_dim) * item  # Q, 2x(K, V)
    args = (q.data.ptr, np.int64(max(row_stride, num_heads * head_dim)), k_cache.data.ptr,
            v_cache.data.ptr, out.data.ptr, meta.cu_seqlens_q.data.ptr, meta.kv_start.data.ptr,
            meta.prefix_len.data.ptr, meta.work.data.ptr, np.int32(num_heads), np.int32(num_kv_heads),
            np.float32(scale * np.log2(np.e)))
    kernels.launch(fn, (num_heads, meta.num_items), (block,), args, shared_mem=shared, stream=stream)
    return out


@functools.lru_cache(maxsize=None)
def _is_sm90a(device_id: int) -> bool:
    return kernels.device_arch(device_id) == "sm_90a"


def _use_wgmma(meta: AttentionMeta, head_dim: int) -> bool:
    import cupy as cp
    if meta.kernel == "mma":
        return False
    fits = head_dim == 128 and meta.block_m == 128
    on_hopper = _is_sm90a(cp.cuda.Device().id)
    if meta.kernel == "wgmma" and not (fits and on_hopper):
        raise ValueError(f"attention: the wgmma kernel needs head_dim 128 (got {head_dim}), block_m 128 "
                         f"(got {meta.block_m}) and an sm_90a GPU (this is {'' if on_hopper else 'not '}one)")
    return fits and on_hopper
