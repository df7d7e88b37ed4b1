"""The model's operators, on the GPU (cuBLAS + cuda/*.cu kernels) or the CPU (NumPy).

Each op takes preallocated outputs and never allocates on the GPU, so a whole forward pass can be
captured in a CUDA graph. The array type picks the path: `numpy.ndarray` -> NumPy (in the arrays'
dtype, float32 for the CPU model), `cupy.ndarray` -> GPU (bf16 only). The CPU versions round to the
storage dtype at the same points as the kernels, and are checked against tw/model/reference.py in the tests.
"""
from tw.ops.blas import linear
from tw.ops.elementwise import BF16, add_rmsnorm, check_bf16, embedding, is_cpu, rope_store_kv, silu_mul

__all__ = ["BF16", "add_rmsnorm", "check_bf16", "embedding", "is_cpu", "linear", "rope_store_kv", "silu_mul"]
