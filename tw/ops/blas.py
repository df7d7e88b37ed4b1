"""GEMMs through cuBLAS (cublasGemmEx, grouped batched GEMM) with an optional SM-count target; NumPy on
the CPU.

cuBLAS is called through entry points written here with ctypes; why, in _Cublas's docstring."""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from tw.ops.elementwise import check_bf16, is_cpu

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
        # cuBLAS >= 12.5 (tw/ops/moe.grouped_linear); None on an older library
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
                               "(the MoE block's default, a loop of GEMMs, does not need it: tw.model.moe.moe_forward's gemm_mode)")
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


def linear(x, w, out, stream=None, sm_target: int | None = None):
    """out[M, N] = x[M, K] @ w[N, K]^T  (weights stored [out_features, in_features], as nn.Linear).

    GPU: one cublasGemmEx, bf16 operands, fp32 accumulation, bf16 output (or float32 where `out` is
    float32: the MoE router's logits); `out` may be a row range of a larger buffer (e.g. the
    registered communication buffer) as long as its rows are contiguous.
    sm_target: plan the GEMM for this many SMs (cublasSetSmCountTarget; None or 0: every SM), for a GEMM
    that runs beside a comm kernel holding some SMs: planned for all SMs, its last wave waits for the SMs
    the comm holds (docs/hardware.md#measured). The handle's target is set at each call, so a captured
    GEMM keeps the one it was issued with. Ignored on the CPU.
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
    blas.set_sm_target(int(sm_target or 0))
    # Row-major out[M,N] = x w^T is column-major out^T[N,M] = op_T(w_cm[K,N]) @ x_cm[K,M].
    blas.gemm_tn(stream.ptr, n, m, k, w.data.ptr, x.data.ptr, out.data.ptr, _CUDA_R_32F if f32 else _CUDA_R_16BF)
    return out
