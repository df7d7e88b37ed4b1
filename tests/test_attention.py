"""Attention: the NumPy reference against a per-query loop (CPU), the CUDA kernel against the NumPy
reference in float64 (GPU, skipped without one)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_gpu
from tw.runtime import dist
from tw.ops.attention import BF16, attention_numpy, work_items

HAS_GPU = dist.gpu_count() > 0


def attention_loop(q, k_cache, v_cache, cu_seqlens_q, kv_start, prefix_len, scale):
    """The definition, one query and one head at a time, in float64."""
    num_tokens, num_heads, _ = q.shape
    group = num_heads // k_cache.shape[1]
    out = np.zeros(q.shape, dtype=np.float64)
    for s in range(len(cu_seqlens_q) - 1):
        for t in range(cu_seqlens_q[s], cu_seqlens_q[s + 1]):
            pos = prefix_len[s] + (t - cu_seqlens_q[s])
            slots = kv_start[s] + np.arange(pos + 1)            # keys 0 .. pos, causal
            for h in range(num_heads):
                k = k_cache[slots, h // group].astype(np.float64)
                v = v_cache[slots, h // group].astype(np.float64)
                scores = k @ q[t, h].astype(np.float64) * scale
                w = np.exp(scores - scores.max())
                out[t, h] = (w / w.sum()) @ v
    return out


def make_batch(rng, new, prefix, num_heads, num_kv_heads, head_dim, gap=3):
    """Random q and caches for sequences with `new` new tokens after `prefix` cached ones. Sequences sit
    in the cache in reverse order with `gap` unused slots between them (filled with random junk), so a
    kernel that reads the wrong sequence's slots or ignores kv_start is caught."""
    new, prefix = np.array(new, np.int32), np.array(prefix, np.int32)
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    kv_start, slot = np.zeros(len(new), np.int32), gap
    for s in reversed(range(len(new))):
        kv_start[s] = slot
        slot += prefix[s] + new[s] + gap
    capacity = slot
    q = rng.standard_normal((int(cu[-1]), num_heads, head_dim))
    k_cache = rng.standard_normal((capacity, num_kv_heads, head_dim))
    v_cache = rng.standard_normal((capacity, num_kv_heads, head_dim))
    return q, k_cache, v_cache, cu, kv_start, prefix


# ---------------------------------------------------------------- CPU

@pytest.mark.parametrize("new,prefix,num_heads,num_kv_heads,head_dim", [
    ([1], [0], 2, 1, 8),                       # a single token
    ([5, 1, 7], [0, 0, 0], 4, 4, 16),          # varlen prefill, MHA
    ([3, 1, 1, 6], [4, 9, 0, 2], 8, 2, 16),    # prefixes in the cache, decode tokens, GQA 4:1
    ([1, 1], [13, 30], 6, 3, 8),               # decode only
])
def test_numpy_reference_matches_loop(new, prefix, num_heads, num_kv_heads, head_dim):
    rng = np.random.default_rng(1)
    q, k, v, cu, start, pre = make_batch(rng, new, prefix, num_heads, num_kv_heads, head_dim)
    scale = 1 / np.sqrt(head_dim)
    want = attention_loop(q, k, v, cu, start, pre, scale)
    got = attention_numpy(q, k, v, cu, start, pre, scale, query_chunk=2)  # chunking exercised
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    got32 = attention_numpy(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), cu, start, pre,
                            scale)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-5)


def test_work_items_cover_every_block_heaviest_first():
    cu, prefix = np.array([0, 300, 301, 301, 429]), np.array([0, 5000, 7, 0])
    items = work_items(cu, prefix, 128)
    assert sorted(map(tuple, items.tolist())) == [(0, 0), (0, 128), (0, 256), (1, 0), (3, 0)]
    cost = [prefix[s] + min(q0 + 128, cu[s + 1] - cu[s]) for s, q0 in items]
    assert cost == sorted(cost, reverse=True) and tuple(items[0]) == (1, 0)


# ---------------------------------------------------------------- GPU

def to_device_bf16(x):
    """float64 host array -> cupy bf16 (and the bf16-rounded float64 values the reference should use)."""
    import cupy as cp
    xb = x.astype(BF16)
    return cp.asarray(xb.view(np.uint16)).view(BF16), xb.astype(np.float64)


def to_host_f64(x):
    import cupy as cp
    return cp.asnumpy(x.view(cp.uint16)).view(BF16).astype(np.float64)


def rel_err_report(got, want):
    err = np.abs(got - want)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    return rel, f"rel norm err {rel:.3e}, max abs err {err.max():.3e}, mean abs err {err.mean():.3e}"


def error_pattern(got, want):
    """Where the error is: per 8-dim chunk of head_dim, and per token row modulo 128 (tile layout bugs)."""
    err = np.abs(got - want)
    by_chunk = err.reshape(err.shape[0], err.shape[1], -1, 8).max(axis=(0, 1, 3))
    by_row = np.array([err[r::128].max() if len(err[r::128]) else 0 for r in range(min(128, len(err)))])
    bad_rows = np.nonzero(by_row > 0.05)[0]
    return (f"\n  max err per 8-dim chunk: {np.array2string(by_chunk, precision=2)}"
            f"\n  rows (mod 128) with err > 0.05: {bad_rows.tolist()[:64]}")


def run_gpu_case(new, prefix, num_heads, num_kv_heads, head_dim, block_m=128, strided_q=True, seed=0,
                 kernel="auto"):
    import cupy as cp
    from tw.ops.attention import attention_cuda, attention_meta
    rng = np.random.default_rng(seed)
    q, k, v, cu, start, pre = make_batch(rng, new, prefix, num_heads, num_kv_heads, head_dim)
    num_tokens = q.shape[0]
    if strided_q:  # q as the first columns of a fused qkv buffer [T, (H + 2 Hkv) * D]
        qkv = rng.standard_normal((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim))
        qkv[:, :num_heads * head_dim] = q.reshape(num_tokens, -1)
        qkv_d, qkv64 = to_device_bf16(qkv)
        q_d = qkv_d[:, :num_heads * head_dim].reshape(num_tokens, num_heads, head_dim)
        q64 = qkv64[:, :num_heads * head_dim].reshape(num_tokens, num_heads, head_dim)
        assert num_tokens == 1 or not q_d.flags.c_contiguous
    else:
        q_d, q64 = to_device_bf16(q)
    k_d, k64 = to_device_bf16(k)
    v_d, v64 = to_device_bf16(v)
    scale = 1 / np.sqrt(head_dim)
    # Inputs are exact bf16 values, so the float64 reference is the exact answer for them.
    want = attention_numpy(q64, k64, v64, cu, start, pre, scale)

    out = cp.empty((num_tokens, num_heads, head_dim), dtype=BF16)
    out.view(cp.uint16).fill(0x7FC0)  # NaN: any element the kernel fails to write shows up
    meta = attention_meta(cu, start, pre, block_m=block_m, kernel=kernel)
    stream = cp.cuda.Stream(non_blocking=True)
    attention_cuda(q_d, k_d, v_d, meta, out, scale, stream=stream)
    stream.synchronize()
    got = to_host_f64(out)
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} of {got.size} outputs not written"
    # bf16 tolerance: the reference is exact for the bf16 inputs; the kernel rounds P (in [0,1]) to bf16
    # before the PV mma and the output to bf16, each a relative error of ~2^-8 = 4e-3; fp32 accumulation
    # adds nothing visible. 1e-2 in relative norm leaves room for that and catches any wrong key/row.
    rel, report = rel_err_report(got, want)
    assert rel <= 1e-2, report + error_pattern(got, want)
    return rel




def kernels_here():
    """(kernel, block_m) variants this GPU runs: the mma.sync ones everywhere, wgmma on sm_90a."""
    from tw.runtime.kernels import device_arch
    variants = [("mma", 128), ("mma", 64)]
    return variants + [("wgmma", 128)] if device_arch() == "sm_90a" else variants


VARIANTS = [("mma", 128), ("mma", 64), ("wgmma", 128)]


def skip_unless_here(kernel, block_m):
    if (kernel, block_m) not in kernels_here():
        pytest.skip(f"{kernel} kernel not available on this GPU")


@requires_gpu
@pytest.mark.parametrize("kernel,block_m", VARIANTS)
def test_cuda_mixed_batch(kernel, block_m):
    # Long prefill (not a multiple of 64 or 128), short prefill, decode tokens with long prefixes,
    # chunked-prefill continuation (prefix + several new tokens), a single-token sequence.
    skip_unless_here(kernel, block_m)
    new = [777, 1, 130, 1, 64, 5, 1]
    prefix = [0, 1000, 200, 0, 64, 3001, 77]
    run_gpu_case(new, prefix, num_heads=8, num_kv_heads=2, head_dim=128, block_m=block_m, kernel=kernel)


@requires_gpu
@pytest.mark.parametrize("kernel,block_m", VARIANTS)
def test_cuda_gqa_64_8(kernel, block_m):
    skip_unless_here(kernel, block_m)
    run_gpu_case([300, 1, 129], [0, 513, 40], num_heads=64, num_kv_heads=8, head_dim=128, seed=1,
                 block_m=block_m, kernel=kernel)


@requires_gpu
@pytest.mark.parametrize("kernel,block_m", VARIANTS)
def test_cuda_one_long_prefill(kernel, block_m):
    skip_unless_here(kernel, block_m)
    run_gpu_case([2000], [0], num_heads=4, num_kv_heads=1, head_dim=128, seed=6, block_m=block_m, kernel=kernel)


@requires_gpu
@pytest.mark.parametrize("block_m", [128, 64])
def test_cuda_head_dim_64(block_m):
    run_gpu_case([200, 1, 65], [0, 300, 10], num_heads=4, num_kv_heads=4, head_dim=64, block_m=block_m,
                 strided_q=False, seed=2)


@requires_gpu
@pytest.mark.parametrize("kernel,block_m", VARIANTS)
def test_cuda_decode_only_and_single_token(kernel, block_m):
    skip_unless_here(kernel, block_m)
    run_gpu_case([1] * 9, [0, 1, 63, 64, 65, 127, 128, 1999, 4096], num_heads=32, num_kv_heads=4,
                 head_dim=128, seed=3, block_m=block_m, kernel=kernel)
    run_gpu_case([1], [0], num_heads=2, num_kv_heads=1, head_dim=128, seed=4, block_m=block_m, kernel=kernel)


@requires_gpu
def test_cuda_graph_capture():
    """attention_cuda does no sync and no allocation: it replays from a CUDA graph."""
    import cupy as cp
    from tw.ops.attention import attention_cuda, attention_meta
    from tw.runtime.graph import Graph
    rng = np.random.default_rng(5)
    q, k, v, cu, start, pre = make_batch(rng, [100, 1], [0, 50], 8, 2, 128)
    (q_d, q64), (k_d, k64), (v_d, v64) = map(to_device_bf16, (q, k, v))
    out = cp.empty(q_d.shape, dtype=BF16)
    meta = attention_meta(cu, start, pre)
    stream = cp.cuda.Stream(non_blocking=True)
    graph = Graph(lambda: attention_cuda(q_d, k_d, v_d, meta, out, 1 / np.sqrt(128)), stream)
    out.view(cp.uint16).fill(0x7FC0)
    stream.synchronize()
    graph()
    stream.synchronize()
    rel, report = rel_err_report(to_host_f64(out),
                                 attention_numpy(q64, k64, v64, cu, start, pre, 1 / np.sqrt(128)))
    assert rel <= 1e-2, report


@requires_gpu
def test_cuda_rejects_bad_input():
    import cupy as cp
    from tw.ops.attention import attention_cuda, attention_meta
    meta = attention_meta(np.array([0, 4]), np.array([0]), np.array([0]))
    q = cp.zeros((4, 4, 128), dtype=BF16)
    kv = cp.zeros((8, 2, 128), dtype=BF16)
    out = cp.zeros((4, 4, 128), dtype=BF16)
    with pytest.raises(TypeError, match="bfloat16"):
        attention_cuda(cp.zeros((4, 4, 128), cp.float16), kv, kv, meta, out, 0.1)
    with pytest.raises(ValueError, match="head_dim 96"):
        attention_cuda(cp.zeros((4, 4, 96), BF16), cp.zeros((8, 2, 96), BF16), cp.zeros((8, 2, 96), BF16),
                       meta, cp.zeros((4, 4, 96), BF16), 0.1)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention_cuda(q, cp.zeros((8, 3, 128), BF16), cp.zeros((8, 3, 128), BF16), meta, out, 0.1)
    with pytest.raises(ValueError, match="aligned"):
        flat = cp.zeros(4 * 4 * 128 + 1, dtype=BF16)
        attention_cuda(flat[1:].reshape(4, 4, 128), kv, kv, meta, out, 0.1)
    with pytest.raises(ValueError, match="cache holds"):
        attention_cuda(q, kv[:3], kv[:3], meta, out, 0.1)
    with pytest.raises(ValueError, match="meta describes"):
        attention_cuda(q[:3], kv, kv, meta, out[:3], 0.1)
    with pytest.raises(ValueError, match="wgmma kernel needs head_dim 128"):
        attention_cuda(cp.zeros((4, 4, 64), BF16), cp.zeros((8, 2, 64), BF16), cp.zeros((8, 2, 64), BF16),
                       attention_meta(np.array([0, 4]), np.array([0]), np.array([0]), kernel="wgmma"),
                       cp.zeros((4, 4, 64), BF16), 0.1)
