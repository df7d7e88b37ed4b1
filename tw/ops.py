"""The model's operators, on the GPU (cuBLAS + cuda/*.cu kernels) or the CPU (NumPy).

Each op takes preallocated outputs and never allocates on the GPU, so a whole forward pass can be
captured in a CUDA graph. The array type picks the path: `numpy.ndarray` -> NumPy (in the arrays'
dtype, float32 for the CPU model), `cupy.ndarray` -> GPU (bf16 only). The CPU versions round to the
storage dtype at the same points as the kernels, and are checked against tw/reference.py in the tests.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools

import ml_dtypes
import numpy as np

from . import kernels

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


# ---------------------------------------------------------------- GEMM (cuBLAS)

_CUDA_R_32F, _CUDA_R_16BF, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT, _OP_N, _OP_T = 0, 14, 68, -1, 0, 1
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)  # host scalars, alive for the process
_WORKSPACE_BYTES = 64 << 20


class _Cublas:
    """cuBLAS called through ctypes, with our own handle per device.

    Not through cupy_backends' wrapper: it refuses every cuBLAS call while a stream is being captured,
    and we capture whole forward passes. The handle gets a fixed workspace, so capture never allocates.
    """

    def __init__(self):
        import cupy as cp
        from cuda.pathfinder import load_nvidia_dynamic_lib
        self.lib = ctypes.CDLL(load_nvidia_dynamic_lib("cublas").abs_path)
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cp.empty(_WORKSPACE_BYTES, dtype=cp.uint8)
        self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                   ctypes.c_size_t(_WORKSPACE_BYTES)), "cublasSetWorkspace")
        g = self.lib.cublasGemmEx
        g.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int]
        self.lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cublasSetSmCountTarget.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.sm_target = 0  # what the handle holds now (0: cuBLAS plans for every SM)
        # cuBLAS >= 12.5 (tw/moe_ops.grouped_linear); None on an older library
        self.grouped = getattr(self.lib, "cublasGemmGroupedBatchedEx", None)

    def set_sm_target(self, n: int) -> None:
        """cublasSetSmCountTarget: the GEMM heuristics plan for n SMs (0 = all). It is read when a GEMM is
        issued, so under graph capture each captured GEMM keeps the target it was issued with."""
        if n != self.sm_target:
            self._check(self.lib.cublasSetSmCountTarget(self.handle, int(n)), f"cublasSetSmCountTarget({n})")
            self.sm_target = n

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def gemm_tn(self, stream_ptr, n, m, k, w_ptr, x_ptr, out_ptr, out_type=_CUDA_R_16BF):
        """Column-major out^T[N, M] = op_T(w[K, N]) @ x[K, M], bf16 in, fp32 accumulation, bf16 (or
        out_type) out."""
        self._check(self.lib.cublasSetStream_v2(self.handle, stream_ptr), "cublasSetStream")
        self._check(self.lib.cublasGemmEx(self.handle, _OP_T, _OP_N, n, m, k, _ONE.ctypes.data, w_ptr,
                                          _CUDA_R_16BF, k, x_ptr, _CUDA_R_16BF, k, _ZERO.ctypes.data, out_ptr,
                                          out_type, n, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT),
                    f"cublasGemmEx(m={m}, n={n}, k={k})")

    def gemm_grouped_tn(self, stream_ptr, n: int, ms, k: int, w_ptrs, x_ptrs, out_ptrs):
        """gemm_tn for len(ms) problems of one (N, K) and M = ms[g] rows each, in one
        cublasGemmGroupedBatchedEx (one problem per group). *_ptrs: device arrays of device pointers."""
        if self.grouped is None:
            raise RuntimeError("cublasGemmGroupedBatchedEx needs cuBLAS >= 12.5; this libcublas lacks it "
                               "(the MoE block's default, a loop of GEMMs, does not need it: tw.moe.gemm_mode)")
        g = len(ms)
        i32 = lambda v: np.full(g, v, np.int32)
        args = {"ta": i32(_OP_T), "tb": i32(_OP_N), "m": i32(n), "n": np.ascontiguousarray(ms, np.int32),
                "k": i32(k), "alpha": np.ones(g, np.float32), "beta": np.zeros(g, np.float32), "ld_w": i32(k),
                "ld_x": i32(k), "ld_out": i32(n), "size": i32(1)}
        p = {name: a.ctypes.data_as(ctypes.c_void_p) for name, a in args.items()}
        vp = ctypes.c_void_p
        self._check(self.lib.cublasSetStream_v2(self.handle, stream_ptr), "cublasSetStream")
        self._check(self.grouped(self.handle, p["ta"], p["tb"], p["m"], p["n"], p["k"], p["alpha"], vp(w_ptrs),
                                 ctypes.c_int(_CUDA_R_16BF), p["ld_w"], vp(x_ptrs), ctypes.c_int(_CUDA_R_16BF),
                                 p["ld_x"], p["beta"], vp(out_ptrs), ctypes.c_int(_CUDA_R_16BF), p["ld_out"],
                                 ctypes.c_int(g), p["size"], ctypes.c_int(_CUBLAS_COMPUTE_32F)),
                    f"cublasGemmGroupedBatchedEx(groups={g}, n={n}, k={k})")


@functools.lru_cache(maxsize=None)
def _cublas(device_id: int) -> _Cublas:
    return _Cublas()


_SM_TARGET = [0]  # the SM-count target of the GEMMs issued now (0: none); see sm_target()


@contextlib.contextmanager
def sm_target(n: int | None):
    """GEMMs issued inside plan for `n` SMs (cublasSetSmCountTarget); None or 0: no target. For GEMMs that
    run beside a comm kernel holding some SMs: planned for all SMs, their last wave waits for the SMs
    the comm holds (docs/hardware.md#measured). A no-op on the CPU."""
    old = _SM_TARGET[0]
    _SM_TARGET[0] = int(n or 0)
    try:
        yield
    finally:
        _SM_TARGET[0] = old


def linear(x, w, out, stream=None):
    """out[M, N] = x[M, K] @ w[N, K]^T  (weights stored [out_features, in_features], as nn.Linear).

    GPU: one cublasGemmEx, bf16 operands, fp32 accumulation, bf16 output (or float32 where `out` is
    float32: the MoE router's logits); `out` may be a row range of a larger buffer (e.g. the
    registered communication buffer) as long as its rows are contiguous.
    """
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or out.shape != (m, n):
        raise ValueError(f"linear: x {x.shape} @ w{w.shape}^T -> out {out.shape} do not fit")
    if is_cpu(x):
        np.matmul(x, w.T, out=out)
        return out
    import cupy as cp
    f32 = out.dtype == np.float32
    for name, a in (("x", x), ("w", w)) + ((("out", out),) if not f32 else ()):
        check_bf16(f"linear {name}", a)
    if f32 and not (out.flags.c_contiguous and out.data.ptr % 16 == 0):
        raise ValueError(f"linear out (float32) must be C-contiguous and 16-byte aligned, got {out.strides}")
    if m == 0:
        return out
    stream = stream or cp.cuda.get_current_stream()
    blas = _cublas(cp.cuda.Device().id)
    blas.set_sm_target(_SM_TARGET[0])
    # Row-major out[M,N] = x w^T is column-major out^T[N,M] = op_T(w_cm[K,N]) @ x_cm[K,M].
    blas.gemm_tn(stream.ptr, n, m, k, w.data.ptr, x.data.ptr, out.data.ptr, _CUDA_R_32F if f32 else _CUDA_R_16BF)
    return out


# ---------------------------------------------------------------- memory-bound kernels

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


def _num_sms() -> int:
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
        kernels.launch(fn, min(_num_sms() * 8, -(-rows * ffn // 8 // 256)), 256,
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
