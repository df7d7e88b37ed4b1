"""The GPU operators of the MoE block (tw/model/moe.py): the cuda/moe.cu kernels and the cuBLAS grouped GEMM.

Like the other operators (tw/ops/), each takes preallocated outputs and checks what a kernel would silently misread.
"""
from __future__ import annotations

import functools

import numpy as np

from tw.ops import blas, elementwise
from tw.runtime import kernels

MAX_EXPERTS, MAX_K = 64, 8   # TW_MOE_MAX_EXPERTS, TW_MOE_MAX_K in cuda/moe.cu
PERMUTE_THREADS = 1024


def _check_int32(name, a):
    if a.dtype != np.int32 or not a.flags.c_contiguous:
        raise TypeError(f"{name} must be a contiguous int32 array, got {a.dtype} {a.strides}")


def _check_f32(name, a):
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        raise TypeError(f"{name} must be a contiguous float32 array, got {a.dtype} {a.strides}")


def pinned_int32(n: int) -> np.ndarray:
    """A host int32 array of n in page-locked memory (device -> host copies into it are asynchronous)."""
    import cupy as cp
    mem = cp.cuda.alloc_pinned_memory(4 * n)
    return np.frombuffer(mem, np.int32, n)   # the array's base keeps the memory alive


def topk_softmax(logits, top_k: int, experts, weights, stream=None):
    """experts [n, k] int32, weights [n, k] float32 from logits [n, E] float32."""
    n, num_experts = logits.shape
    if not 1 <= top_k <= min(num_experts, MAX_K) or num_experts > MAX_EXPERTS:
        raise ValueError(f"MoE routing: top_k {top_k} of {num_experts} experts; the kernel takes k <= {MAX_K} "
                         f"and E <= {MAX_EXPERTS}")
    _check_f32("logits", logits)
    _check_int32("experts", experts)
    _check_f32("weights", weights)
    if experts.shape != (n, top_k) or weights.shape != (n, top_k):
        raise ValueError(f"MoE routing: experts {experts.shape} and weights {weights.shape} must be [{n}, {top_k}]")
    if n:
        fn = kernels.function("moe", "moe_topk_softmax")
        kernels.launch(fn, -(-n // 128), 128, (logits.data.ptr, np.int32(n), np.int32(num_experts), np.int32(top_k),
                                               experts.data.ptr, weights.data.ptr), stream=stream)


def permute(experts, num_experts: int, offsets, inverse, source, stream=None):
    """offsets [E + 1], inverse [n k], source [n k] (int32) from experts [n, k] int32: one CTA."""
    n, k = experts.shape
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"MoE permute: {num_experts} experts; the kernel takes 1..{MAX_EXPERTS}")
    for name, a in (("experts", experts), ("offsets", offsets), ("inverse", inverse), ("source", source)):
        _check_int32(name, a)
    if offsets.shape != (num_experts + 1,) or inverse.shape != (n * k,) or source.shape != (n * k,):
        raise ValueError(f"MoE permute: offsets {offsets.shape}, inverse {inverse.shape}, source {source.shape} "
                         f"must be [{num_experts + 1}], [{n * k}], [{n * k}]")
    fn = kernels.function("moe", "moe_permute")
    kernels.launch(fn, 1, PERMUTE_THREADS, (experts.data.ptr, np.int32(n * k), np.int32(num_experts), np.int32(k),
                                            offsets.data.ptr, inverse.data.ptr, source.data.ptr), stream=stream)


def start_offsets_copy(offsets, host, stream):
    """Queue the copy of the device offsets [E + 1] into the pinned `host` array on `stream` and return an
    event recorded right after it: work queued after (the row gather) keeps the GPU busy while the host
    waits for the event (wait_offsets). One event per device: wait before starting the next copy."""
    import cupy as cp
    stream = stream or cp.cuda.get_current_stream()
    if stream.is_capturing():
        raise RuntimeError("an MoE block cannot be captured in a CUDA graph: it reads its per-expert row counts "
                           "back to the host (cuBLAS takes GEMM sizes from there); run MoE models eagerly")
    cp.cuda.runtime.memcpyAsync(host.ctypes.data, offsets.data.ptr, offsets.nbytes,
                                cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
    done = _copy_event(cp.cuda.Device().id)
    done.record(stream)
    return done


def wait_offsets(done, host) -> np.ndarray:
    """The host wait of an MoE block: until the copy behind event `done` has landed; a copy of `host`."""
    done.synchronize()
    return host.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _copy_event(device_id: int):
    import cupy as cp
    return cp.cuda.Event(disable_timing=True)


def _grid_rows(rows: int) -> int:
    """CTAs of 256 threads for the warp-per-row copies (cuda/moe.cu): 8 rows each, at most 8 per SM."""
    return max(1, min(elementwise.num_sms() * 8, -(-rows // 8)))


def gather_rows(x, source, xs, stream=None):
    """xs[r] = x[source[r]] for every row of xs (bf16)."""
    rows, hidden = xs.shape
    elementwise.check_bf16("moe gather x", x)
    elementwise.check_bf16("moe gather xs", xs)
    _check_int32("source", source)
    if source.shape != (rows,) or x.shape[1] != hidden:
        raise ValueError(f"MoE gather: x {x.shape}, source {source.shape}, xs {xs.shape} do not fit")
    if rows:
        fn = kernels.function("moe", "moe_gather_rows_bf16")
        kernels.launch(fn, _grid_rows(rows), 256, (x.data.ptr, source.data.ptr, xs.data.ptr,
                                                            np.int32(rows), np.int32(hidden)), stream=stream)


def unpermute(out, inverse, weights, y, stream=None):
    """y[t] = sum_j weights[t, j] out[inverse[t k + j]] (bf16 rows, float32 sums)."""
    n, hidden = y.shape
    k = weights.shape[1]
    elementwise.check_bf16("moe unpermute out", out)
    elementwise.check_bf16("moe unpermute y", y)
    _check_int32("inverse", inverse)
    _check_f32("weights", weights)
    if inverse.shape != (n * k,) or weights.shape != (n, k) or out.shape[1] != hidden:
        raise ValueError(f"MoE unpermute: out {out.shape}, inverse {inverse.shape}, weights {weights.shape}, "
                         f"y {y.shape} do not fit")
    if n:
        fn = kernels.function("moe", "moe_unpermute_bf16")
        kernels.launch(fn, _grid_rows(n), 256, (out.data.ptr, inverse.data.ptr, weights.data.ptr, y.data.ptr,
                                                         np.int32(n), np.int32(k), np.int32(hidden)), stream=stream)


class _Grouped:
    """Host and device argument arrays of cublasGemmGroupedBatchedEx for up to MAX_EXPERTS groups, one
    per call site (`slot`), reused: each use is followed by the next block's host wait (wait_offsets, on
    an event recorded after it on the same stream) before its arrays are rewritten, so the asynchronous
    copy of the last use has finished."""

    def __init__(self):
        import cupy as cp
        self.ptrs_host = [np.frombuffer(cp.cuda.alloc_pinned_memory(3 * 8 * MAX_EXPERTS), np.uint64) for _ in range(2)]
        self.ptrs_dev = [cp.zeros(3 * MAX_EXPERTS, cp.uint64) for _ in range(2)]


@functools.lru_cache(maxsize=None)
def _grouped(device_id: int) -> _Grouped:
    return _Grouped()


def grouped_linear(x, w, out, spans, slot: int, stream=None, sm_target: int | None = None):
    """out[lo:hi] = x[lo:hi] @ w[e]^T for every (e, lo, hi) in spans, in one cublasGemmGroupedBatchedEx
    (one group per expert: their row counts differ). x [R, K], w [E, N, K], out [R, N], bf16.
    sm_target: as in tw.ops.blas.linear."""
    import cupy as cp
    if not spans:
        return
    for name, a in (("x", x), ("w", w), ("out", out)):
        elementwise.check_bf16(f"grouped linear {name}", a)
    _, n, k = w.shape
    if x.shape[1] != k or out.shape[1] != n:
        raise ValueError(f"grouped linear: x {x.shape} @ w {w.shape}^T -> out {out.shape} do not fit")
    g = _grouped(cp.cuda.Device().id)
    count = len(spans)
    e, lo = np.array([s[0] for s in spans]), np.array([s[1] for s in spans], np.uint64)
    m = np.array([s[2] - s[1] for s in spans], np.int32)
    host = g.ptrs_host[slot]
    host[:count] = np.uint64(w.data.ptr) + e.astype(np.uint64) * np.uint64(n * k * 2)
    host[count:2 * count] = np.uint64(x.data.ptr) + lo * np.uint64(k * 2)
    host[2 * count:3 * count] = np.uint64(out.data.ptr) + lo * np.uint64(n * 2)
    dev = g.ptrs_dev[slot]
    stream = stream or cp.cuda.get_current_stream()
    cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, 3 * 8 * count, cp.cuda.runtime.memcpyHostToDevice,
                                stream.ptr)
    handle = blas._cublas(cp.cuda.Device().id)
    handle.set_sm_target(int(sm_target or 0))
    handle.gemm_grouped_tn(stream.ptr, n, m, k, dev.data.ptr, dev.data.ptr + 8 * count, dev.data.ptr + 16 * count)


__all__ = ["topk_softmax", "permute", "start_offsets_copy", "wait_offsets", "gather_rows", "unpermute", "grouped_linear", "pinned_int32"]
